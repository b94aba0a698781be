package cluster

// The Prometheus metrics of an attached volume (Attached.ServeMetrics,
// torusblk --metrics HOST:PORT): one sample each, labelled volume="NAME",
// served with the Go runtime and process metrics (internal/metrics). A
// collector reads the volume's counters when /metrics is scraped. It lives
// here, as the node's does in package node, because it reads counters only
// this package keeps (Stats, the scrub totals); internal/metrics knows no
// component's counters.
//
// Invariants:
//   - The data path only bumps its own atomics (Volume's counters, the
//     scrub totals, the QoS limiter's); nothing on the I/O path calls
//     Prometheus.
//   - The endpoint is stopped and waited for before the volume closes
//     (Attached.Close).
//   - Counters end in _total and only grow while the process lives.
//   - Every metric here is a row of the metric table in docs/OPERATIONS.md
//     with the same type and labels (TestVolumeMetrics).

import (
	"fmt"
	"net"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/torus-storage/torus/internal/metrics"
)

// statsSource is what the volume metrics read of an attached volume.
type statsSource interface {
	Size() int64
	Stats() Stats
	ScrubTotals() ScrubTotals
	QoSStats() QoSStats
}

// volumeSample is what one scrape reads of the volume, once.
type volumeSample struct {
	size  int64
	st    Stats
	scrub ScrubTotals
	qos   QoSStats
}

// volumeMetric is one metric family and how to read it: value, or seconds
// for a metric in seconds.
type volumeMetric struct {
	desc    *prometheus.Desc
	typ     prometheus.ValueType
	value   func(s *volumeSample) uint64
	seconds func(s *volumeSample) time.Duration
}

func volumeGauge(name, help string, value func(*volumeSample) uint64) volumeMetric {
	return volumeMetric{prometheus.NewDesc(name, help, []string{"volume"}, nil), prometheus.GaugeValue, value, nil}
}

func volumeCounter(name, help string, value func(*volumeSample) uint64) volumeMetric {
	return volumeMetric{prometheus.NewDesc(name, help, []string{"volume"}, nil), prometheus.CounterValue, value, nil}
}

func volumeSeconds(typ prometheus.ValueType, name, help string, seconds func(*volumeSample) time.Duration) volumeMetric {
	return volumeMetric{prometheus.NewDesc(name, help, []string{"volume"}, nil), typ, nil, seconds}
}

// volumeMetrics lists every metric of a volume (the endpoint sorts them by
// name).
var volumeMetrics = []volumeMetric{
	volumeGauge("torus_volume_size_bytes", "Size of the volume.",
		func(s *volumeSample) uint64 { return uint64(s.size) }),
	volumeGauge("torus_volume_missed_chunks", "Chunk copies marked as missed (a replica to rebuild); 0 when the volume is healthy.",
		func(s *volumeSample) uint64 { return uint64(s.st.Missed) }),
	volumeCounter("torus_volume_rebuilt_chunks_total", "Chunk copies rebuilt from a good replica.",
		func(s *volumeSample) uint64 { return s.st.Rebuilt }),
	volumeCounter("torus_volume_rebuilt_bytes_total", "Bytes copied by rebuilds.",
		func(s *volumeSample) uint64 { return s.st.RebuiltBytes }),
	volumeCounter("torus_volume_read_failovers_total", "Reads that moved to another replica after an error.",
		func(s *volumeSample) uint64 { return s.st.Failovers }),
	volumeCounter("torus_volume_replicas_behind_total", "Replicas reads or rebuilds found behind: their chunk version older than a change acknowledged or held by another replica (marked for rebuild).",
		func(s *volumeSample) uint64 { return s.st.Behind }),
	volumeCounter("torus_volume_node_failures_total", "Storage nodes that failed while the volume was attached (writes went on degraded).",
		func(s *volumeSample) uint64 { return s.st.NodeFailures }),
	volumeCounter("torus_volume_snapshot_pauses_total", "Pauses of new writes for a snapshot (each waits for the writes in flight and flushes).",
		func(s *volumeSample) uint64 { return s.st.SnapshotPauses }),
	volumeCounter("torus_volume_snapshot_copies_total", "Chunks whose nodes copied the head before its first change after a snapshot (copy-on-write).",
		func(s *volumeSample) uint64 { return s.st.SnapshotCopies }),
	volumeGauge("torus_volume_scrub_running", "1 while a scrub runs.",
		func(s *volumeSample) uint64 { return boolValue(s.scrub.Running) }),
	volumeCounter("torus_volume_scrub_runs_total", "Scrubs finished or stopped.",
		func(s *volumeSample) uint64 { return s.scrub.Runs }),
	volumeGauge("torus_volume_scrub_last_success_timestamp_seconds", "Unix time the last scrub finished (0: none yet).",
		func(s *volumeSample) uint64 { return unixSeconds(s.scrub.LastSuccess) }),
	volumeCounter("torus_volume_scrub_chunks_total", "Chunks whose replicas a scrub compared.",
		func(s *volumeSample) uint64 { return s.scrub.Chunks }),
	volumeCounter("torus_volume_scrub_skipped_chunks_total", "Chunks a scrub left out because writes to them kept racing its reads.",
		func(s *volumeSample) uint64 { return s.scrub.Skipped }),
	volumeCounter("torus_volume_scrub_checksum_errors_total", "Replicas a scrub found failing their checksum on the node.",
		func(s *volumeSample) uint64 { return s.scrub.Checksum }),
	volumeCounter("torus_volume_scrub_mismatches_total", "Replicas a scrub found differing from the good copy.",
		func(s *volumeSample) uint64 { return s.scrub.Mismatches }),
	volumeCounter("torus_volume_scrub_behind_total", "Replicas a scrub found behind the newest version of a chunk.",
		func(s *volumeSample) uint64 { return s.scrub.Behind }),
	volumeCounter("torus_volume_scrub_repaired_total", "Bad replicas found by a scrub and rebuilt from a good copy.",
		func(s *volumeSample) uint64 { return s.scrub.Repaired }),
	volumeCounter("torus_volume_scrub_lost_chunks_total", "Chunks a scrub found with no good replica at all (restore from a backup).",
		func(s *volumeSample) uint64 { return s.scrub.Lost }),
	volumeGauge("torus_volume_qos_read_iops_limit", "QoS limit on read requests per second (0: unlimited).",
		func(s *volumeSample) uint64 { return s.qos.Limits.ReadIOPS }),
	volumeGauge("torus_volume_qos_write_iops_limit", "QoS limit on write, discard and write-zeroes requests per second (0: unlimited).",
		func(s *volumeSample) uint64 { return s.qos.Limits.WriteIOPS }),
	volumeGauge("torus_volume_qos_read_bytes_per_second_limit", "QoS limit on bytes read per second (0: unlimited).",
		func(s *volumeSample) uint64 { return s.qos.Limits.ReadBPS }),
	volumeGauge("torus_volume_qos_write_bytes_per_second_limit", "QoS limit on bytes written per second (0: unlimited).",
		func(s *volumeSample) uint64 { return s.qos.Limits.WriteBPS }),
	volumeSeconds(prometheus.GaugeValue, "torus_volume_qos_burst_seconds", "QoS burst: how long an idle volume saves credit above its limits.",
		func(s *volumeSample) time.Duration { return s.qos.Limits.Burst() }),
	volumeCounter("torus_volume_qos_throttled_read_requests_total", "Read requests that waited for a QoS limit.",
		func(s *volumeSample) uint64 { return s.qos.ReadThrottled }),
	volumeCounter("torus_volume_qos_throttled_write_requests_total", "Write, discard and write-zeroes requests that waited for a QoS limit.",
		func(s *volumeSample) uint64 { return s.qos.WriteThrottled }),
	volumeSeconds(prometheus.CounterValue, "torus_volume_qos_throttled_read_seconds_total", "Time read requests waited for a QoS limit, added up.",
		func(s *volumeSample) time.Duration { return s.qos.ReadThrottledTime }),
	volumeSeconds(prometheus.CounterValue, "torus_volume_qos_throttled_write_seconds_total", "Time write, discard and write-zeroes requests waited for a QoS limit, added up.",
		func(s *volumeSample) time.Duration { return s.qos.WriteThrottledTime }),
	volumeGauge("torus_volume_qos_queued_requests", "Requests waiting for a QoS limit now.",
		func(s *volumeSample) uint64 { return uint64(s.qos.Queued) }),
}

// boolValue is 1 for true, 0 for false.
func boolValue(b bool) uint64 {
	if b {
		return 1
	}
	return 0
}

// unixSeconds is t in Unix seconds, 0 for the zero time.
func unixSeconds(t time.Time) uint64 {
	if t.IsZero() {
		return 0
	}
	return uint64(t.Unix())
}

// volumeCollector is the prometheus.Collector of one volume: every metric
// of volumeMetrics, labelled volume=name.
type volumeCollector struct {
	name string
	src  statsSource
}

// Describe implements prometheus.Collector.
func (c *volumeCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, m := range volumeMetrics {
		ch <- m.desc
	}
}

// Collect implements prometheus.Collector: it reads the volume once.
func (c *volumeCollector) Collect(ch chan<- prometheus.Metric) {
	s := volumeSample{size: c.src.Size(), st: c.src.Stats(), scrub: c.src.ScrubTotals(), qos: c.src.QoSStats()}
	for _, m := range volumeMetrics {
		var v float64
		if m.seconds != nil {
			v = m.seconds(&s).Seconds()
		} else {
			v = float64(m.value(&s))
		}
		pm, err := prometheus.NewConstMetric(m.desc, m.typ, v, c.name)
		if err != nil {
			pm = prometheus.NewInvalidMetric(m.desc, fmt.Errorf("volume %s: %w", c.name, err))
		}
		ch <- pm
	}
}

// ServeMetrics serves the volume's metrics, with the Go runtime and process
// metrics, at GET /metrics on addr (HOST:PORT) until Close, which stops the
// server before it closes the volume; call it before Close. It returns the
// address once listening, or the error.
func (a *Attached) ServeMetrics(addr string) (net.Addr, error) {
	name := a.info.Name
	reg, err := metrics.NewRegistry(&volumeCollector{name: name, src: a})
	if err != nil {
		return nil, fmt.Errorf("metrics of volume %s: %w", name, err)
	}
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("metrics of volume %s: listen on %s: %w", name, addr, err)
	}
	done := metrics.Serve(a.svcCtx, l, reg, a.log)
	a.svcWG.Go(func() { <-done })
	a.log.Info("serving metrics", "volume", name, "addr", "http://"+l.Addr().String()+"/metrics")
	return l.Addr(), nil
}
