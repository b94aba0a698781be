package main

import (
	"encoding/json"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/torus-storage/torus/internal/metrics/metricstest"
)

// fioRate runs fio (libnbd engine) against the NBD socket for runtime and
// returns the IOPS and bytes per second it measured in the direction of rw.
func fioRate(t *testing.T, sock, rw, bs string, qd int, runtime time.Duration) (iops, bps float64) {
	t.Helper()
	out, err := runTool(t, runtime+2*time.Minute, "fio", "--name=qos", "--ioengine=nbd", "--uri=nbd+unix:///torus?socket="+sock,
		"--rw="+rw, "--bs="+bs, fmt.Sprintf("--iodepth=%d", qd), "--size=32M", "--time_based",
		fmt.Sprintf("--runtime=%dms", runtime.Milliseconds()), "--output-format=json")
	if err != nil {
		t.Fatalf("fio %s: %v\n%s", rw, err, out)
	}
	var res struct {
		Jobs []struct {
			Error       int `json:"error"`
			Read, Write struct {
				IOPS    float64 `json:"iops"`
				BWBytes float64 `json:"bw_bytes"`
			}
		} `json:"jobs"`
	}
	if err := json.Unmarshal([]byte(out[strings.Index(out, "{"):]), &res); err != nil || len(res.Jobs) != 1 || res.Jobs[0].Error != 0 {
		t.Fatalf("fio %s output (%v):\n%s", rw, err, out)
	}
	d := res.Jobs[0].Read
	if strings.Contains(rw, "write") {
		d = res.Jobs[0].Write
	}
	return d.IOPS, d.BWBytes
}

// TestClusterQoS: a cluster volume created with torusctl QoS flags and
// served by torusblk holds fio under its read IOPS and write bandwidth
// limits; torusctl volume set-qos raises the read limit while the volume
// stays attached, and fio follows; the metrics show the limit in force and
// the throttled requests and time. The bounds are upper bounds (a limiter
// that lets more through is wrong, whatever the machine) plus a loose lower
// bound showing the raise took effect.
func TestClusterQoS(t *testing.T) {
	needTool(t, "fio")
	c := startCluster(t, 3)
	c.Ctl("volume", "create", "limited", "--size", "64MiB", "--replication", "3",
		"--read-iops", "300", "--write-bps", "4MiB")
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	maddr := l.Addr().String()
	l.Close()
	s, sock := c.serve("limited", "--metrics", maddr)
	const runtime = 3 * time.Second
	// fio's IOPS over the run can exceed the limit by the requests in
	// flight when it ends and the one a bucket admits at once.
	slack := func(qd int) float64 { return float64(qd+1) / runtime.Seconds() }

	iops, _ := fioRate(t, sock, "randread", "4k", 16, runtime)
	t.Logf("read IOPS limit 300: fio %.1f IOPS", iops)
	if iops > 300*1.05+slack(16) || iops < 150 {
		t.Fatalf("randread at a 300 IOPS limit: %.1f IOPS\n%s", iops, s.Log())
	}
	_, bps := fioRate(t, sock, "randwrite", "64k", 8, runtime)
	t.Logf("write limit 4 MiB/s: fio %.0f B/s", bps)
	if lim := float64(4 << 20); bps > lim*1.05+slack(8)*(64<<10) || bps < lim/2 {
		t.Fatalf("randwrite at a 4 MiB/s limit: %.0f B/s\n%s", bps, s.Log())
	}

	c.Ctl("volume", "set-qos", "limited", "--read-iops", "1200")
	s.WaitLog(t, "qos limits changed")
	iops, _ = fioRate(t, sock, "randread", "4k", 16, runtime)
	t.Logf("read IOPS limit raised live to 1200: fio %.1f IOPS", iops)
	if iops > 1200*1.05+slack(16) || iops < 450 {
		t.Fatalf("randread after raising the limit to 1200 IOPS: %.1f IOPS (before: at most 315)\n%s", iops, s.Log())
	}

	fams, err := metricstest.Parse(metricstest.Scrape(t, "http://"+maddr+"/metrics"))
	if err != nil {
		t.Fatal(err)
	}
	for m, min := range map[string]float64{
		"torus_volume_qos_read_iops_limit":                1200,
		"torus_volume_qos_write_bytes_per_second_limit":   4 << 20,
		"torus_volume_qos_throttled_read_requests_total":  1,
		"torus_volume_qos_throttled_write_requests_total": 1,
		"torus_volume_qos_throttled_read_seconds_total":   0.001,
		"torus_volume_qos_throttled_write_seconds_total":  0.001,
	} {
		if v, ok := fams[m].Value("volume", "limited"); !ok || v < min {
			t.Errorf("%s = %v (present %v), want at least %v", m, v, ok, min)
		}
	}
	s.Stop(t)
}
