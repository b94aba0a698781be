package main

import (
	"strings"
	"testing"

	"github.com/torus-storage/torus/internal/metrics/metricstest"
)

// TestDevMetrics: torusd dev serves the metrics of all its nodes on one
// endpoint: every torus_ metric once per node, labelled with its id, the Go
// runtime and process metrics once, and exactly the torus_ metrics
// docs/OPERATIONS.md lists for torusd, with their types and labels.
func TestDevMetrics(t *testing.T) {
	p := start(t, "dev", "--nodes", "2", "--replication", "2", "--data-dir", t.TempDir(),
		"--etcd-listen", "127.0.0.1:0", "--size", "64MiB", "--metrics", "127.0.0.1:0")
	url := p.WaitLog(t, metricsRe)
	p.WaitLog(t, `msg="dev cluster ready"`)
	body := metricstest.Scrape(t, url)
	for _, id := range []string{"node1", "node2"} {
		for name, want := range map[string]string{
			"torus_up": "1", "torus_store_slots": "64", "torus_store_capacity_bytes": "67108864",
			"torus_store_slots_used": "0", "torus_node_writes_total": "0",
		} {
			if got := sample(t, body, name, id); got != want {
				t.Errorf("%s{node=%q} = %s, want %s", name, id, got, want)
			}
		}
	}
	fams, err := metricstest.Parse(body)
	if err != nil {
		t.Fatal(err)
	}
	for name, f := range fams {
		if strings.HasPrefix(name, "torus_") && len(f.Samples) != 2 {
			t.Errorf("%s: %d samples, want one per node", name, len(f.Samples))
		}
	}
	metricstest.CheckRuntime(t, fams)
	metricstest.CheckDocumented(t, "../../docs/OPERATIONS.md", "torusd", fams)
	if t.Failed() {
		t.Logf("scrape:\n%s", body)
	}
	p.Stop(t)
}
