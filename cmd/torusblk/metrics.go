package main

// Companions of a served cluster volume: the periodic scrub
// (--scrub-interval) and the Prometheus endpoint (--metrics HOST:PORT).
//
// The endpoint serves the volume's metrics, one sample each labelled
// volume="NAME", with the Go runtime and process metrics (internal/metrics).
// A collector reads the volume's counters when /metrics is scraped.
//
// Invariants:
//   - One scrub runs at a time per volume (a single goroutine runs them in
//     turn), and it is stopped and waited for before the volume closes
//     (servicedVolume.Close), so a scrub never uses a closed volume.
//   - The scrub counters grow once per finished scrub, by its ScrubResult.
//   - The data path only bumps its own atomics (cluster.Volume's counters,
//     scrubStats); nothing on the I/O path calls Prometheus.
//   - Counters end in _total and only grow while the process lives.
//   - Every metric here is a row of the metric table in docs/OPERATIONS.md
//     with the same type and labels (TestVolumeMetrics).

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/pflag"
	"github.com/torus-storage/torus/cluster"
	"github.com/torus-storage/torus/internal/cli"
	"github.com/torus-storage/torus/internal/metrics"
)

// serviceFlags configure the services that run beside a cluster volume: the
// periodic scrub and the metrics endpoint.
type serviceFlags struct {
	metrics       string
	scrubInterval time.Duration
}

func (e *serviceFlags) register(fs *pflag.FlagSet) {
	fs.StringVar(&e.metrics, "metrics", "", "cluster volume: serve Prometheus metrics on `HOST:PORT` (/metrics)")
	fs.DurationVar(&e.scrubInterval, "scrub-interval", 24*time.Hour, "cluster volume: verify every replica this often (first run one interval after attach); 0 turns scrubbing off")
}

// check validates the flags; local says the volume is not a cluster volume.
func (e *serviceFlags) check(local bool) error {
	if e.scrubInterval < 0 {
		return cli.Usagef("--scrub-interval %v: want a duration >= 0 (0 = off)", e.scrubInterval)
	}
	if local && e.metrics != "" {
		return cli.Usagef("--metrics is for cluster volumes (a local volume has no replicas to report on)")
	}
	return nil
}

// scrubStats are the scrub counters of one volume.
type scrubStats struct {
	runs, chunks, skipped, checksum, mismatches, behind, repaired, lost atomic.Uint64
	running                                                             atomic.Bool
	lastSuccess                                                         atomic.Int64 // Unix seconds of the last finished scrub
}

func (s *scrubStats) add(r cluster.ScrubResult) {
	s.runs.Add(1)
	s.chunks.Add(r.Chunks)
	s.skipped.Add(r.Skipped)
	s.checksum.Add(r.Checksum)
	s.mismatches.Add(r.Mismatches)
	s.behind.Add(r.Behind)
	s.repaired.Add(r.Repaired)
	s.lost.Add(r.Lost)
}

// servicedVolume is a cluster volume with its scrubber and metrics endpoint;
// Close stops them before it closes the volume.
type servicedVolume struct {
	*clusterVolume
	scrub  scrubStats
	cancel context.CancelFunc
	wg     sync.WaitGroup
	addr   net.Addr // metrics endpoint, if any
}

// withServices starts the services ef asks for around cv. On error cv is
// left open (the caller closes it).
func withServices(cv *clusterVolume, ef serviceFlags, log *slog.Logger) (*servicedVolume, error) {
	ctx, cancel := context.WithCancel(context.Background())
	v := &servicedVolume{clusterVolume: cv, cancel: cancel}
	if ef.metrics != "" {
		addr, err := v.serveMetrics(ctx, ef.metrics, log)
		if err != nil {
			cancel()
			return nil, err
		}
		v.addr = addr
	}
	if ef.scrubInterval > 0 {
		v.wg.Go(func() { v.scrubber(ctx, ef.scrubInterval, log) })
	}
	return v, nil
}

// scrubber runs a scrub every interval until ctx is done.
func (v *servicedVolume) scrubber(ctx context.Context, interval time.Duration, log *slog.Logger) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		v.scrub.running.Store(true)
		res, err := v.Scrub(ctx)
		v.scrub.running.Store(false)
		v.scrub.add(res)
		if err != nil {
			if ctx.Err() == nil {
				log.Error("scrub failed; retrying at the next interval", "volume", v.info.Name, "err", err)
			}
			continue
		}
		v.scrub.lastSuccess.Store(time.Now().Unix())
	}
}

// Close stops the scrubber and the metrics endpoint, then closes the volume.
func (v *servicedVolume) Close() error {
	v.cancel()
	v.wg.Wait()
	return v.clusterVolume.Close()
}

// statsSource is what the volume metrics read of a cluster volume.
type statsSource interface {
	Size() int64
	Stats() cluster.Stats
}

// volumeSample is what one scrape reads of the volume, once.
type volumeSample struct {
	size  int64
	st    cluster.Stats
	scrub *scrubStats
}

// volumeMetric is one metric family and how to read it.
type volumeMetric struct {
	desc  *prometheus.Desc
	typ   prometheus.ValueType
	value func(s *volumeSample) uint64
}

func volumeGauge(name, help string, value func(*volumeSample) uint64) volumeMetric {
	return volumeMetric{prometheus.NewDesc(name, help, []string{"volume"}, nil), prometheus.GaugeValue, value}
}

func volumeCounter(name, help string, value func(*volumeSample) uint64) volumeMetric {
	return volumeMetric{prometheus.NewDesc(name, help, []string{"volume"}, nil), prometheus.CounterValue, value}
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
	volumeGauge("torus_volume_scrub_running", "1 while a scrub runs.",
		func(s *volumeSample) uint64 { return b2u(s.scrub.running.Load()) }),
	volumeCounter("torus_volume_scrub_runs_total", "Scrubs finished or stopped.",
		func(s *volumeSample) uint64 { return s.scrub.runs.Load() }),
	volumeGauge("torus_volume_scrub_last_success_timestamp_seconds", "Unix time the last scrub finished (0: none yet).",
		func(s *volumeSample) uint64 { return uint64(s.scrub.lastSuccess.Load()) }),
	volumeCounter("torus_volume_scrub_chunks_total", "Chunks whose replicas a scrub compared.",
		func(s *volumeSample) uint64 { return s.scrub.chunks.Load() }),
	volumeCounter("torus_volume_scrub_skipped_chunks_total", "Chunks a scrub left out because writes to them kept racing its reads.",
		func(s *volumeSample) uint64 { return s.scrub.skipped.Load() }),
	volumeCounter("torus_volume_scrub_checksum_errors_total", "Replicas a scrub found failing their checksum on the node.",
		func(s *volumeSample) uint64 { return s.scrub.checksum.Load() }),
	volumeCounter("torus_volume_scrub_mismatches_total", "Replicas a scrub found differing from the good copy.",
		func(s *volumeSample) uint64 { return s.scrub.mismatches.Load() }),
	volumeCounter("torus_volume_scrub_behind_total", "Replicas a scrub found behind the newest version of a chunk.",
		func(s *volumeSample) uint64 { return s.scrub.behind.Load() }),
	volumeCounter("torus_volume_scrub_repaired_total", "Bad replicas found by a scrub and rebuilt from a good copy.",
		func(s *volumeSample) uint64 { return s.scrub.repaired.Load() }),
	volumeCounter("torus_volume_scrub_lost_chunks_total", "Chunks a scrub found with no good replica at all (restore from a backup).",
		func(s *volumeSample) uint64 { return s.scrub.lost.Load() }),
}

func b2u(b bool) uint64 {
	if b {
		return 1
	}
	return 0
}

// volumeCollector is the prometheus.Collector of one volume: every metric
// of volumeMetrics, labelled volume=name.
type volumeCollector struct {
	name  string
	src   statsSource
	scrub *scrubStats
}

// Describe implements prometheus.Collector.
func (c *volumeCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, m := range volumeMetrics {
		ch <- m.desc
	}
}

// Collect implements prometheus.Collector: it reads the volume once.
func (c *volumeCollector) Collect(ch chan<- prometheus.Metric) {
	s := volumeSample{size: c.src.Size(), st: c.src.Stats(), scrub: c.scrub}
	for _, m := range volumeMetrics {
		pm, err := prometheus.NewConstMetric(m.desc, m.typ, float64(m.value(&s)), c.name)
		if err != nil {
			pm = prometheus.NewInvalidMetric(m.desc, fmt.Errorf("volume %s: %w", c.name, err))
		}
		ch <- pm
	}
}

// serveMetrics serves the volume's metrics, with the Go runtime and process
// metrics, at GET /metrics on addr until ctx is done; Close waits for the
// server to stop. It returns once listening, or the error.
func (v *servicedVolume) serveMetrics(ctx context.Context, addr string, log *slog.Logger) (net.Addr, error) {
	reg, err := metrics.NewRegistry(&volumeCollector{name: v.info.Name, src: v, scrub: &v.scrub})
	if err != nil {
		return nil, err
	}
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("--metrics: listen on %s: %w: pick another HOST:PORT", addr, err)
	}
	done := metrics.Serve(ctx, l, reg, log)
	v.wg.Go(func() { <-done })
	log.Info("serving metrics", "volume", v.info.Name, "addr", "http://"+l.Addr().String()+"/metrics")
	return l.Addr(), nil
}
