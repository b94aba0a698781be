package node

import (
	"context"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/torus-storage/torus/engine"
	"github.com/torus-storage/torus/internal/metrics/metricstest"
	"github.com/torus-storage/torus/internal/voltest"
	"github.com/torus-storage/torus/internal/wire"
)

// TestServeMetrics serves two nodes on one endpoint, as torusd dev does:
// each node's counters show under its node label, the Go runtime and
// process metrics come once, and the torus_ metrics are exactly those
// docs/OPERATIONS.md lists for torusd, with their types and labels.
func TestServeMetrics(t *testing.T) {
	nsA, ncA := startNode(t, 32)
	nsB, _ := startNode(t, 4)
	a := &Node{id: identity{NodeID: "a"}, store: nsA.st, cs: nsA}
	b := &Node{id: identity{NodeID: `b"\`}, store: nsB.st, cs: nsB} // a label value to escape
	data := voltest.Buf(t, 2*engine.BlockSize)
	if s, _ := ncA.call(wire.OpWrite, wire.Header{Volume: 7, Epoch: 3, Len: 2 * engine.BlockSize}, data, nil); s != wire.StatusOK {
		t.Fatalf("write: %v", s)
	}
	if s, _ := ncA.call(wire.OpWrite, wire.Header{Volume: 7, Epoch: 2, Len: engine.BlockSize}, data[:engine.BlockSize], nil); s != wire.StatusStaleEpoch {
		t.Fatalf("write with a superseded epoch: %v", s)
	}

	// The collector's metrics match its descriptions.
	reg := prometheus.NewPedanticRegistry()
	if err := reg.Register(metricsCollector{nodes: []*Node{a, b}}); err != nil {
		t.Fatal(err)
	}
	if _, err := reg.Gather(); err != nil {
		t.Fatalf("pedantic gather: %v", err)
	}

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	addr, err := ServeMetrics(ctx, "127.0.0.1:0", []*Node{a, b}, quietLog)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.Get("http://" + addr.String() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || resp.StatusCode != http.StatusOK || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/plain; version=0.0.4") {
		t.Fatalf("GET /metrics: %s %q %v\n%s", resp.Status, resp.Header.Get("Content-Type"), err, body)
	}
	fams, err := metricstest.Parse(string(body))
	if err != nil {
		t.Fatalf("%v\n%s", err, body)
	}

	for _, tc := range []struct {
		name, node string
		want       float64
	}{
		{"torus_up", "a", 1},
		{"torus_up", `b"\`, 1},
		{"torus_store_slots", "a", 32},
		{"torus_store_slots", `b"\`, 4},
		{"torus_store_slots_used", "a", 1},
		{"torus_store_capacity_bytes", "a", 32 * testChunk},
		{"torus_store_used_bytes", "a", testChunk},
		{"torus_store_used_bytes", `b"\`, 0},
		{"torus_node_writes_total", "a", 1},
		{"torus_node_write_bytes_total", "a", 2 * engine.BlockSize},
		{"torus_node_stale_epoch_total", "a", 1},
		{"torus_node_errors_total", "a", 1},
		{"torus_node_writes_total", `b"\`, 0},
		{"torus_gc_chunks_total", "a", 0},
	} {
		f := fams[tc.name]
		if f == nil {
			t.Errorf("%s missing", tc.name)
			continue
		}
		if got, ok := f.Value("node", tc.node); !ok || got != tc.want {
			t.Errorf("%s{node=%q} = %v (present %v), want %v", tc.name, tc.node, got, ok, tc.want)
		}
	}
	for name, f := range fams {
		if strings.HasPrefix(name, "torus_") && len(f.Samples) != 2 {
			t.Errorf("%s: %d samples, want one per node", name, len(f.Samples))
		}
	}
	metricstest.CheckRuntime(t, fams)
	metricstest.CheckDocumented(t, "../docs/OPERATIONS.md", "torusd", fams)
	if t.Failed() {
		t.Logf("scrape:\n%s", body)
	}
}
