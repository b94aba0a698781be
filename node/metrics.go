package node

// The storage node's Prometheus metrics. A collector reads the counters of
// each node when /metrics is scraped and reports one sample per node,
// labelled node="ID", so that torusd dev serves all its nodes on one
// endpoint. The Go runtime and process metrics come with them
// (internal/metrics).
//
// Invariants:
//   - The data path only bumps its own atomics (Server, store, gc, dead
//     watch, maintainer); nothing on the I/O path calls Prometheus.
//   - Counters end in _total and only grow while the process lives.
//   - Every metric here is a row of the metric table in docs/OPERATIONS.md
//     with the same type and labels (TestServeMetrics).

import (
	"context"
	"fmt"
	"log/slog"
	"net"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/torus-storage/torus/internal/metrics"
	"github.com/torus-storage/torus/store"
)

// nodeSample is what one scrape reads of one node, once.
type nodeSample struct {
	n     *Node
	cs    Stats
	store store.StoreStats
}

// nodeMetric is one metric family and how to read it from a node.
type nodeMetric struct {
	desc  *prometheus.Desc
	typ   prometheus.ValueType
	value func(s *nodeSample) uint64
}

func nodeGauge(name, help string, value func(*nodeSample) uint64) nodeMetric {
	return nodeMetric{prometheus.NewDesc(name, help, []string{"node"}, nil), prometheus.GaugeValue, value}
}

func nodeCounter(name, help string, value func(*nodeSample) uint64) nodeMetric {
	return nodeMetric{prometheus.NewDesc(name, help, []string{"node"}, nil), prometheus.CounterValue, value}
}

// nodeMetrics lists every metric of a node (the endpoint sorts them by name).
var nodeMetrics = []nodeMetric{
	nodeGauge("torus_up", "1 while the node serves.",
		func(*nodeSample) uint64 { return 1 }),
	nodeGauge("torus_store_slots", "Chunk slots in the node's store.",
		func(s *nodeSample) uint64 { return uint64(s.store.Slots) }),
	nodeGauge("torus_store_slots_used", "Chunk slots holding data.",
		func(s *nodeSample) uint64 { return uint64(s.store.UsedSlots) }),
	nodeGauge("torus_store_capacity_bytes", "Bytes of chunk data the store can hold.",
		func(s *nodeSample) uint64 { return uint64(s.store.Slots * s.store.ChunkSize) }),
	nodeGauge("torus_store_used_bytes", "Bytes of the store's slots in use.",
		func(s *nodeSample) uint64 { return uint64(s.store.UsedSlots * s.store.ChunkSize) }),
	nodeGauge("torus_store_near_full", "1 while the store's used slots are at or above the node's --near-full ratio of its slots.",
		func(s *nodeSample) uint64 {
			if s.n.isNearFull(s.store) {
				return 1
			}
			return 0
		}),
	nodeCounter("torus_node_reads_total", "Chunk reads served.",
		func(s *nodeSample) uint64 { return s.cs.Reads }),
	nodeCounter("torus_node_writes_total", "Chunk writes served.",
		func(s *nodeSample) uint64 { return s.cs.Writes }),
	nodeCounter("torus_node_read_bytes_total", "Bytes read by clients.",
		func(s *nodeSample) uint64 { return s.cs.ReadBytes }),
	nodeCounter("torus_node_write_bytes_total", "Bytes written by clients.",
		func(s *nodeSample) uint64 { return s.cs.WriteBytes }),
	nodeCounter("torus_node_flushes_total", "Flushes served.",
		func(s *nodeSample) uint64 { return s.cs.Flushes }),
	nodeCounter("torus_node_discards_total", "Discards served.",
		func(s *nodeSample) uint64 { return s.cs.Discards }),
	nodeCounter("torus_node_errors_total", "Requests answered with an error (any cause).",
		func(s *nodeSample) uint64 { return s.cs.Errors }),
	nodeCounter("torus_node_no_space_total", "Writes refused because the store is full.",
		func(s *nodeSample) uint64 { return s.cs.NoSpace }),
	nodeCounter("torus_node_stale_epoch_total", "Writes refused because they carried a superseded attach epoch.",
		func(s *nodeSample) uint64 { return s.cs.StaleEpoch }),
	nodeCounter("torus_dead_nodes_removed_total", "Nodes this node removed from the ring after --dead-timeout unregistered.",
		func(s *nodeSample) uint64 { return s.n.dead.total() }),
	nodeCounter("torus_maintenance_jobs_total", "Maintenance jobs this node started on volumes no client held.",
		func(s *nodeSample) uint64 {
			return s.n.maint.stat(func(m *maintainer) uint64 { return m.jobs.Load() })
		}),
	nodeCounter("torus_maintenance_finished_total", "Maintenance jobs that left their volume with no mark and no move.",
		func(s *nodeSample) uint64 {
			return s.n.maint.stat(func(m *maintainer) uint64 { return m.finished.Load() })
		}),
	nodeCounter("torus_maintenance_yielded_total", "Maintenance jobs that gave their volume up to an attaching client.",
		func(s *nodeSample) uint64 {
			return s.n.maint.stat(func(m *maintainer) uint64 { return m.preempted.Load() })
		}),
	nodeGauge("torus_maintenance_running", "Maintenance jobs running on this node.",
		func(s *nodeSample) uint64 { return s.n.maint.runningJobs() }),
	nodeCounter("torus_gc_chunks_total", "Chunks of deleted volumes freed by garbage collection.",
		func(s *nodeSample) uint64 {
			if s.n.gc == nil {
				return 0
			}
			return s.n.gc.total.Load()
		}),
}

// metricsCollector is the prometheus.Collector of nodes: every metric of
// nodeMetrics, one sample per node.
type metricsCollector struct {
	nodes []*Node
}

// Describe implements prometheus.Collector.
func (c metricsCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, m := range nodeMetrics {
		ch <- m.desc
	}
}

// Collect implements prometheus.Collector: it reads every node once.
func (c metricsCollector) Collect(ch chan<- prometheus.Metric) {
	samples := make([]nodeSample, len(c.nodes))
	for i, n := range c.nodes {
		samples[i] = nodeSample{n: n, cs: n.cs.Stats(), store: n.store.Stats()}
	}
	for _, m := range nodeMetrics {
		for i := range samples {
			s := &samples[i]
			pm, err := prometheus.NewConstMetric(m.desc, m.typ, float64(m.value(s)), s.n.id.NodeID)
			if err != nil {
				pm = prometheus.NewInvalidMetric(m.desc, fmt.Errorf("node %s: %w", s.n.id.NodeID, err))
			}
			ch <- pm
		}
	}
}

// ServeMetrics serves the metrics of nodes, with the Go runtime and process
// metrics, at GET /metrics on addr until ctx is done. It returns once
// listening, or the error.
func ServeMetrics(ctx context.Context, addr string, nodes []*Node, log *slog.Logger) (net.Addr, error) {
	reg, err := metrics.NewRegistry(metricsCollector{nodes: nodes})
	if err != nil {
		return nil, err
	}
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("metrics: listen on %s: %w: pick another --metrics", addr, err)
	}
	metrics.Serve(ctx, l, reg, log)
	log.Info("serving metrics", "addr", "http://"+l.Addr().String()+"/metrics")
	return l.Addr(), nil
}
