package main

import (
	"bytes"
	"encoding/xml"
	"errors"
	"io"
	"math"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

func TestLoadResults(t *testing.T) {
	r, err := loadResults("testdata/results-host.json")
	if err != nil {
		t.Fatal(err)
	}
	if r.Bench != "host" || r.Commit != "abc1234" || r.Subject != "torus" || len(r.Results) != 6 || r.Rounds != 2 {
		t.Fatalf("loaded %+v", r)
	}
	if v, ok := r.iops("randread-4k-qd32", "nbdkit"); !ok || v != 38400 {
		t.Errorf("iops(randread-4k-qd32, nbdkit) = %v, %v", v, ok)
	}
	x, ok := r.lookup("randread-4k-qd32", "torus")
	if !ok || *x.P99us != 1515.5 || !reflect.DeepEqual(x.RoundIOPS, []float64{55000, 57600}) {
		t.Errorf("lookup(randread-4k-qd32, torus) = %+v, %v", x, ok)
	}
	if v, peer, ok := r.peerRatio("randread-4k-qd32"); !ok || peer != "nbdkit" || math.Abs(v-56300.0/38400) > 1e-9 {
		t.Errorf("peerRatio = %v, %q, %v", v, peer, ok)
	}
	if _, _, ok := r.peerRatio("randwrite-4k-qd1"); ok {
		t.Error("peerRatio of a job the run did not have succeeded")
	}
}

func TestParseResultsRejects(t *testing.T) {
	good := `{"format":1,"bench":"host","date":"2026-01-02","subject":"torus","peers":["nbdkit"],
		"targets":["torus","nbdkit"],"jobs":["randread-4k-qd1"],"machine":{},
		"results":[{"job":"randread-4k-qd1","target":"torus","iops":1}]}`
	if _, err := parseResults([]byte(good)); err != nil {
		t.Fatalf("the base case: %v", err)
	}
	for name, edit := range map[string][2]string{
		"format":         {`"format":1`, `"format":2`},
		"bench":          {`"bench":"host"`, `"bench":"lab"`},
		"no date":        {`"date":"2026-01-02"`, `"date":""`},
		"unknown field":  {`"machine":{}`, `"machine":{},"colour":"blue"`},
		"subject":        {`"subject":"torus"`, `"subject":"raw"`},
		"peer":           {`"peers":["nbdkit"]`, `"peers":["qemu-nbd"]`},
		"repeated job":   {`"jobs":["randread-4k-qd1"]`, `"jobs":["randread-4k-qd1","randread-4k-qd1"]`},
		"unlisted job":   {`"job":"randread-4k-qd1","target"`, `"job":"randread-4k-qd32","target"`},
		"unlisted tgt":   {`"target":"torus","iops"`, `"target":"raw","iops"`},
		"negative":       {`"iops":1}`, `"iops":-1}`},
		"two results":    {`"iops":1}]`, `"iops":1},{"job":"randread-4k-qd1","target":"torus"}]`},
		"no results":     {`"results":[{"job":"randread-4k-qd1","target":"torus","iops":1}]`, `"results":[]`},
		"trailing data":  {`"iops":1}]}`, `"iops":1}]} {}`},
		"not json":       {`{"format"`, `"format"`},
		"no targets":     {`"targets":["torus","nbdkit"]`, `"targets":[]`},
		"string for num": {`"iops":1}`, `"iops":"1"}`},
	} {
		bad := strings.Replace(good, edit[0], edit[1], 1)
		if bad == good {
			t.Fatalf("%s: the edit did not apply", name)
		}
		if _, err := parseResults([]byte(bad)); err == nil {
			t.Errorf("%s: accepted %s", name, bad)
		}
	}
}

// TestCommittedResults checks that every results file kept in the
// repository parses.
func TestCommittedResults(t *testing.T) {
	paths, err := filepath.Glob("results/*.json")
	if err != nil {
		t.Fatal(err)
	}
	if len(paths) == 0 {
		t.Fatal("no results files under bench/results")
	}
	for _, p := range paths {
		if _, err := loadResults(p); err != nil {
			t.Error(err)
		}
	}
	if _, err := newestResults("results", "host"); err != nil {
		t.Error(err)
	}
}

func TestWriteResultsRoundTrip(t *testing.T) {
	started := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	j1, _ := findJob("randread-4k-qd1")
	j2, _ := findJob("seqwrite-1m-qd8")
	rep := &report{
		LoadAvgEnd: "1.00 0.50 0.40",
		Machine: machine{CPUs: 2, CPUModel: "Test CPU", MemBytes: 4 << 30, Kernel: "6.1.0", Dir: "/tmp/x",
			FSType: "ext4", FSSource: "/dev/vda", Mount: "/", Tools: "fio-3.33", LoadAvg: "0.10 0.20 0.30"},
		Size: 1 << 30, Runtime: "5s", Started: started,
		Targets: []string{"torus", "qemu-nbd", "raw"},
		Jobs:    []job{j1, j2},
	}
	for i := 0; i < 2; i++ {
		rd := round{Results: map[string]map[string]result{}}
		for k, tg := range rep.Targets {
			rd.Results[tg] = map[string]result{}
			for _, j := range rep.Jobs {
				rd.Results[tg][j.Name] = result{IOPS: float64(1000*(k+1) + i), P50us: 50, P99us: 99}
			}
		}
		rep.Rounds = append(rep.Rounds, rd)
	}
	rep.Results = medians(rep.Rounds)
	cfg := config{args: []string{"--rounds", "2"}}
	want := newRunResults(cfg, rep, "abc1234")
	if want.Subject != "torus" || !reflect.DeepEqual(want.Peers, []string{"qemu-nbd"}) || len(want.Results) != 6 {
		t.Fatalf("newRunResults = %+v", want)
	}
	dir := t.TempDir()
	path, err := writeResults(dir, want, started)
	if err != nil {
		t.Fatal(err)
	}
	if filepath.Base(path) != "2026-01-02T030405Z-host-abc1234.json" {
		t.Errorf("file name %s", filepath.Base(path))
	}
	got, err := loadResults(path)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("round trip:\n got %+v\nwant %+v", got, want)
	}
	if x, _ := got.lookup("randread-4k-qd1", "qemu-nbd"); *x.IOPS != 2000.5 || !reflect.DeepEqual(x.RoundIOPS, []float64{2000, 2001}) {
		t.Errorf("qemu-nbd randread-4k-qd1 = %+v", x)
	}
	if got.Command != "go run ./bench --rounds 2" {
		t.Errorf("command %q", got.Command)
	}
	if _, err := writeResults(dir, want, started); err == nil {
		t.Error("a second write of the same run overwrote the first")
	}
}

// svgBar is what the test reads of a bar.
type svgBar struct{ metric, job, target string }

// parseSVG decodes the whole SVG (failing on malformed XML) and returns its
// bars and the number of ratio points.
func parseSVG(t *testing.T, b []byte) (bars []svgBar, points int) {
	t.Helper()
	dec := xml.NewDecoder(bytes.NewReader(b))
	depth, root := 0, ""
	for {
		tok, err := dec.Token()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("the SVG is not well-formed XML: %v", err)
		}
		switch el := tok.(type) {
		case xml.StartElement:
			if depth == 0 {
				root = el.Name.Space + " " + el.Name.Local
			}
			depth++
			attr := map[string]string{}
			for _, a := range el.Attr {
				attr[a.Name.Local] = a.Value
			}
			switch {
			case el.Name.Local == "rect" && attr["class"] == "bar":
				bars = append(bars, svgBar{attr["data-metric"], attr["data-job"], attr["data-target"]})
			case el.Name.Local == "circle" && attr["class"] == "ratio-point":
				points++
			}
		case xml.EndElement:
			depth--
		}
	}
	if root != "http://www.w3.org/2000/svg svg" || depth != 0 {
		t.Fatalf("root element %q, depth at the end %d", root, depth)
	}
	return bars, points
}

func TestWriteChart(t *testing.T) {
	r, err := loadResults("testdata/results-host.json")
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if err := writeChart(&buf, []*runResults{r}); err != nil {
		t.Fatal(err)
	}
	bars, points := parseSVG(t, buf.Bytes())
	// One bar per job and target in each of the two panels.
	n := map[string]int{}
	seen := map[svgBar]bool{}
	for _, b := range bars {
		n[b.metric]++
		if seen[b] {
			t.Errorf("two bars for %+v", b)
		}
		seen[b] = true
	}
	want := len(r.Jobs) * len(r.Targets)
	if n["iops"] != want || n["p99"] != want || len(bars) != 2*want {
		t.Errorf("bars per metric %v, want %d each", n, want)
	}
	for _, j := range r.Jobs {
		for _, tg := range r.Targets {
			if !seen[svgBar{"iops", j, tg}] || !seen[svgBar{"p99", j, tg}] {
				t.Errorf("no bar for %s on %s", j, tg)
			}
		}
	}
	if points != len(r.Jobs) {
		t.Errorf("%d ratio points, want one per job (%d)", points, len(r.Jobs))
	}
	// The CPU model's & and < came from the file and must be escaped; the
	// decoder above would have failed otherwise, but check it is there.
	if !strings.Contains(buf.String(), "abc1234") {
		t.Error("the chart does not name the run's commit")
	}

	// Two runs: bars of the last one only, a ratio line for each; a figure
	// that was not recorded draws no bar.
	older := *r
	older.Results = append([]runResult(nil), r.Results[1:]...) // no torus randread-4k-qd32
	older.Partial = true
	buf.Reset()
	if err := writeChart(&buf, []*runResults{&older, r}); err != nil {
		t.Fatal(err)
	}
	bars, points = parseSVG(t, buf.Bytes())
	if len(bars) != 2*want || points != 2*len(r.Jobs)-1 {
		t.Errorf("two runs: %d bars, %d ratio points; want %d and %d", len(bars), points, 2*want, 2*len(r.Jobs)-1)
	}
	buf.Reset()
	if err := writeChart(&buf, []*runResults{r, &older}); err != nil {
		t.Fatal(err)
	}
	if bars, _ = parseSVG(t, buf.Bytes()); len(bars) != 2*want-2 {
		t.Errorf("bars of a partial run: %d, want %d", len(bars), 2*want-2)
	}
}
