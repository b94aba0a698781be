package node

// The metrics endpoint writes the Prometheus text exposition format (0.0.4)
// by hand: every metric has one HELP and one TYPE line followed by one
// sample per node, labelled node="ID", so that torusd dev serves all its
// nodes on one endpoint. Counters end in _total and only grow while the
// process lives.

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// metric is one metric family and how to read it from a node.
type metric struct {
	name, typ, help string
	value           func(n *Node, ns Stats) uint64
}

// metrics lists every metric the endpoint serves, in output order.
var metrics = []metric{
	{"torus_up", "gauge", "1 while the node serves.",
		func(*Node, Stats) uint64 { return 1 }},
	{"torus_store_slots", "gauge", "Chunk slots in the node's store.",
		func(n *Node, _ Stats) uint64 { return uint64(n.store.Stats().Slots) }},
	{"torus_store_slots_used", "gauge", "Chunk slots holding data.",
		func(n *Node, _ Stats) uint64 { return uint64(n.store.Stats().UsedSlots) }},
	{"torus_store_capacity_bytes", "gauge", "Bytes of chunk data the store can hold.",
		func(n *Node, _ Stats) uint64 { s := n.store.Stats(); return uint64(s.Slots * s.ChunkSize) }},
	{"torus_store_used_bytes", "gauge", "Bytes of the store's slots in use.",
		func(n *Node, _ Stats) uint64 { s := n.store.Stats(); return uint64(s.UsedSlots * s.ChunkSize) }},
	{"torus_node_reads_total", "counter", "Chunk reads served.",
		func(_ *Node, s Stats) uint64 { return s.Reads }},
	{"torus_node_writes_total", "counter", "Chunk writes served.",
		func(_ *Node, s Stats) uint64 { return s.Writes }},
	{"torus_node_read_bytes_total", "counter", "Bytes read by clients.",
		func(_ *Node, s Stats) uint64 { return s.ReadBytes }},
	{"torus_node_write_bytes_total", "counter", "Bytes written by clients.",
		func(_ *Node, s Stats) uint64 { return s.WriteBytes }},
	{"torus_node_flushes_total", "counter", "Flushes served.",
		func(_ *Node, s Stats) uint64 { return s.Flushes }},
	{"torus_node_discards_total", "counter", "Discards served.",
		func(_ *Node, s Stats) uint64 { return s.Discards }},
	{"torus_node_errors_total", "counter", "Requests answered with an error (any cause).",
		func(_ *Node, s Stats) uint64 { return s.Errors }},
	{"torus_node_no_space_total", "counter", "Writes refused because the store is full.",
		func(_ *Node, s Stats) uint64 { return s.NoSpace }},
	{"torus_node_stale_epoch_total", "counter", "Writes refused because they carried a superseded attach epoch.",
		func(_ *Node, s Stats) uint64 { return s.StaleEpoch }},
	{"torus_dead_nodes_removed_total", "counter", "Nodes this node removed from the ring after --dead-timeout unregistered.",
		func(n *Node, _ Stats) uint64 { return n.dead.total() }},
	{"torus_maintenance_jobs_total", "counter", "Maintenance jobs this node started on volumes no client held.",
		func(n *Node, _ Stats) uint64 {
			return n.maint.stat(func(m *maintainer) uint64 { return m.jobs.Load() })
		}},
	{"torus_maintenance_finished_total", "counter", "Maintenance jobs that left their volume with no mark and no move.",
		func(n *Node, _ Stats) uint64 {
			return n.maint.stat(func(m *maintainer) uint64 { return m.finished.Load() })
		}},
	{"torus_maintenance_yielded_total", "counter", "Maintenance jobs that gave their volume up to an attaching client.",
		func(n *Node, _ Stats) uint64 {
			return n.maint.stat(func(m *maintainer) uint64 { return m.preempted.Load() })
		}},
	{"torus_maintenance_running", "gauge", "Maintenance jobs running on this node.",
		func(n *Node, _ Stats) uint64 { return n.maint.runningJobs() }},
	{"torus_gc_chunks_total", "counter", "Chunks of deleted volumes freed by garbage collection.",
		func(n *Node, _ Stats) uint64 {
			if n.gc == nil {
				return 0
			}
			return n.gc.total.Load()
		}},
}

// writeMetrics writes every metric of nodes in the text exposition format.
func writeMetrics(w *bufio.Writer, nodes []*Node) {
	stats := make([]Stats, len(nodes))
	for i, n := range nodes {
		stats[i] = n.cs.Stats()
	}
	for _, m := range metrics {
		fmt.Fprintf(w, "# HELP %s %s\n# TYPE %s %s\n", m.name, m.help, m.name, m.typ)
		for i, n := range nodes {
			fmt.Fprintf(w, "%s{node=\"%s\"} %s\n", m.name, escapeLabel(n.id.NodeID),
				strconv.FormatUint(m.value(n, stats[i]), 10))
		}
	}
}

// escapeLabel escapes a label value: backslash, double quote and newline.
func escapeLabel(s string) string {
	return strings.NewReplacer(`\`, `\\`, `"`, `\"`, "\n", `\n`).Replace(s)
}

// ServeMetrics serves /metrics on addr until ctx is done. It returns once
// listening, or the listen error.
func ServeMetrics(ctx context.Context, addr string, nodes []*Node, log *slog.Logger) (net.Addr, error) {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("metrics: listen on %s: %w: pick another --metrics", addr, err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /metrics", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
		bw := bufio.NewWriter(w)
		writeMetrics(bw, nodes)
		bw.Flush()
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("metrics server failed", "err", err)
		}
	}()
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
		defer cancel()
		srv.Shutdown(sctx)
	}()
	log.Info("serving metrics", "addr", "http://"+l.Addr().String()+"/metrics")
	return l.Addr(), nil
}
