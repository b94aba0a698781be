package main

import (
	"math"
	"os"
	"strings"
	"testing"
	"time"
)

func TestParseFio(t *testing.T) {
	cases := []struct {
		file  string
		write bool
		iops  float64
		p50   float64
		p99   float64
	}{
		{"testdata/fio-randread-qd32.json", false, 48806.397867, 602.112, 1826.816},
		{"testdata/fio-randwrite-qd1.json", true, 13011.996001, 52.48, 126.464},
	}
	for _, c := range cases {
		raw, err := os.ReadFile(c.file)
		if err != nil {
			t.Fatalf("read fixture: %v", err)
		}
		r, err := parseFio(raw, c.write)
		if err != nil {
			t.Fatalf("%s: %v", c.file, err)
		}
		if math.Abs(r.IOPS-c.iops) > 1e-3 || math.Abs(r.P50us-c.p50) > 1e-6 || math.Abs(r.P99us-c.p99) > 1e-6 {
			t.Errorf("%s: got %+v, want iops=%v p50=%v p99=%v", c.file, r, c.iops, c.p50, c.p99)
		}
		// The other direction did no I/O: parsing it must fail, not report zeros.
		if _, err := parseFio(raw, !c.write); err == nil {
			t.Errorf("%s: parsing the idle direction succeeded", c.file)
		}
	}
	if _, err := parseFio([]byte("fio: connected to NBD server\n{}"), false); err == nil {
		t.Error("garbage before the JSON was accepted")
	}
}

func TestParseSize(t *testing.T) {
	for in, want := range map[string]int64{"1GiB": 1 << 30, "512M": 512 << 20, "4096": 4096, "2g": 2 << 30} {
		got, err := parseSize(in)
		if err != nil || got != want {
			t.Errorf("parseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "GiB", "1XB", "-"} {
		if _, err := parseSize(in); err == nil {
			t.Errorf("parseSize(%q) succeeded", in)
		}
	}
}

func TestFioArgs(t *testing.T) {
	j, _ := findJob("randwrite-4k-qd32")
	args := strings.Join(fioArgs(j, nbdIO("/s.sock"), 1<<30, 3*time.Second, true, "/o.json"), " ")
	for _, want := range []string{"--rw=randwrite", "--bs=4k", "--iodepth=32", "--numjobs=1", "--time_based", "--runtime=3s",
		"--size=1073741824", "--ioengine=nbd", "--uri=nbd+unix:///?socket=/s.sock", "--output-format=json", "--output=/o.json"} {
		if !strings.Contains(args, want) {
			t.Errorf("fio args %q lack %q", args, want)
		}
	}
	args = strings.Join(fioArgs(prefillJob, rawIO("/f"), 1<<30, 3*time.Second, false, "/o.json"), " ")
	if strings.Contains(args, "time_based") || !strings.Contains(args, "--direct=1") {
		t.Errorf("prefill args %q: want a size-bound O_DIRECT run", args)
	}
}

func TestUnescapeMount(t *testing.T) {
	if got := unescapeMount(`/mnt/a\040b`); got != "/mnt/a b" {
		t.Errorf("unescapeMount = %q", got)
	}
}

// TestQoSFlags: bench qos measures the four kinds of limit with the
// defaults, takes limits from its flags and refuses bad ones.
func TestQoSFlags(t *testing.T) {
	cfg, err := parseQoSFlags([]string{"--no-results", "--read-bps", "10MiB", "--write-iops", "500"})
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]float64{"read-iops": 2000, "write-iops": 500, "read-bps": 10 << 20, "write-bps": 10 << 20}
	if len(cfg.cases) != len(want) || cfg.results != "" {
		t.Fatalf("cases %+v, results %q", cfg.cases, cfg.results)
	}
	for _, c := range cfg.cases {
		if c.Limit != want[c.Kind] || c.Job.write() != strings.HasPrefix(c.Kind, "write") || c.metric == "" {
			t.Errorf("case %+v", c)
		}
	}
	for _, bad := range [][]string{{"--read-iops", "0"}, {"--write-bps", "x"}, {"--runtime", "10ms"}, {"--size", "1MiB"}, {"extra"}} {
		if _, err := parseQoSFlags(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}
