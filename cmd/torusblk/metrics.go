package main

// Companions of a served cluster volume: the periodic scrub
// (--scrub-interval) and the Prometheus endpoint (--metrics HOST:PORT).
//
// The endpoint writes the text exposition format (0.0.4) by hand, like
// torusd's: every metric has one HELP and one TYPE line followed by one
// sample labelled volume="NAME". Counters end in _total and only grow while
// the process lives.
//
// Invariants:
//   - One scrub runs at a time per volume (a single goroutine runs them in
//     turn), and it is stopped and waited for before the volume closes
//     (extrasVolume.Close), so a scrub never uses a closed volume.
//   - The scrub counters grow once per finished scrub, by its ScrubResult.

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
	"sync"
	"sync/atomic"
	"time"

	"github.com/spf13/pflag"
	"github.com/torus-storage/torus/cluster"
	"github.com/torus-storage/torus/internal/cli"
)

// extraFlags configure the companions of a cluster volume.
type extraFlags struct {
	metrics       string
	scrubInterval time.Duration
}

func (e *extraFlags) register(fs *pflag.FlagSet) {
	fs.StringVar(&e.metrics, "metrics", "", "cluster volume: serve Prometheus metrics on `HOST:PORT` (/metrics)")
	fs.DurationVar(&e.scrubInterval, "scrub-interval", 24*time.Hour, "cluster volume: verify every replica this often (first run one interval after attach); 0 turns scrubbing off")
}

// check validates the flags; local says the volume is not a cluster volume.
func (e *extraFlags) check(local bool) error {
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

// extrasVolume is a cluster volume with its scrubber and metrics endpoint;
// Close stops them before it closes the volume.
type extrasVolume struct {
	*clusterVolume
	scrub  scrubStats
	cancel context.CancelFunc
	wg     sync.WaitGroup
	addr   net.Addr // metrics endpoint, if any
}

// withExtras starts the companions ef asks for around cv. On error cv is
// left open (the caller closes it).
func withExtras(cv *clusterVolume, ef extraFlags, log *slog.Logger) (*extrasVolume, error) {
	ctx, cancel := context.WithCancel(context.Background())
	v := &extrasVolume{clusterVolume: cv, cancel: cancel}
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
func (v *extrasVolume) scrubber(ctx context.Context, interval time.Duration, log *slog.Logger) {
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
func (v *extrasVolume) Close() error {
	v.cancel()
	v.wg.Wait()
	return v.clusterVolume.Close()
}

// volumeMetric is one metric family and how to read it.
type volumeMetric struct {
	name, typ, help string
	value           func(v *extrasVolume, s cluster.Stats) uint64
}

// volumeMetrics lists every metric the endpoint serves, in output order.
var volumeMetrics = []volumeMetric{
	{"torus_volume_size_bytes", "gauge", "Size of the volume.",
		func(v *extrasVolume, _ cluster.Stats) uint64 { return uint64(v.Size()) }},
	{"torus_volume_missed_chunks", "gauge", "Chunk copies marked as missed (a replica to rebuild); 0 when the volume is healthy.",
		func(_ *extrasVolume, s cluster.Stats) uint64 { return uint64(s.Missed) }},
	{"torus_volume_rebuilt_chunks_total", "counter", "Chunk copies rebuilt from a good replica.",
		func(_ *extrasVolume, s cluster.Stats) uint64 { return s.Rebuilt }},
	{"torus_volume_rebuilt_bytes_total", "counter", "Bytes copied by rebuilds.",
		func(_ *extrasVolume, s cluster.Stats) uint64 { return s.RebuiltBytes }},
	{"torus_volume_read_failovers_total", "counter", "Reads that moved to another replica after an error.",
		func(_ *extrasVolume, s cluster.Stats) uint64 { return s.Failovers }},
	{"torus_volume_replicas_behind_total", "counter", "Replicas reads or rebuilds found behind: their chunk version older than a change acknowledged or held by another replica (marked for rebuild).",
		func(_ *extrasVolume, s cluster.Stats) uint64 { return s.Behind }},
	{"torus_volume_node_failures_total", "counter", "Storage nodes that failed while the volume was attached (writes went on degraded).",
		func(_ *extrasVolume, s cluster.Stats) uint64 { return s.NodeFailures }},
	{"torus_volume_scrub_running", "gauge", "1 while a scrub runs.",
		func(v *extrasVolume, _ cluster.Stats) uint64 { return b2u(v.scrub.running.Load()) }},
	{"torus_volume_scrub_runs_total", "counter", "Scrubs finished or stopped.",
		func(v *extrasVolume, _ cluster.Stats) uint64 { return v.scrub.runs.Load() }},
	{"torus_volume_scrub_last_success_timestamp_seconds", "gauge", "Unix time the last scrub finished (0: none yet).",
		func(v *extrasVolume, _ cluster.Stats) uint64 { return uint64(v.scrub.lastSuccess.Load()) }},
	{"torus_volume_scrub_chunks_total", "counter", "Chunks whose replicas a scrub compared.",
		func(v *extrasVolume, _ cluster.Stats) uint64 { return v.scrub.chunks.Load() }},
	{"torus_volume_scrub_skipped_chunks_total", "counter", "Chunks a scrub left out because writes to them kept racing its reads.",
		func(v *extrasVolume, _ cluster.Stats) uint64 { return v.scrub.skipped.Load() }},
	{"torus_volume_scrub_checksum_errors_total", "counter", "Replicas a scrub found failing their checksum on the node.",
		func(v *extrasVolume, _ cluster.Stats) uint64 { return v.scrub.checksum.Load() }},
	{"torus_volume_scrub_mismatches_total", "counter", "Replicas a scrub found differing from the good copy.",
		func(v *extrasVolume, _ cluster.Stats) uint64 { return v.scrub.mismatches.Load() }},
	{"torus_volume_scrub_behind_total", "counter", "Replicas a scrub found behind the newest version of a chunk.",
		func(v *extrasVolume, _ cluster.Stats) uint64 { return v.scrub.behind.Load() }},
	{"torus_volume_scrub_repaired_total", "counter", "Bad replicas found by a scrub and rebuilt from a good copy.",
		func(v *extrasVolume, _ cluster.Stats) uint64 { return v.scrub.repaired.Load() }},
	{"torus_volume_scrub_lost_chunks_total", "counter", "Chunks a scrub found with no good replica at all (restore from a backup).",
		func(v *extrasVolume, _ cluster.Stats) uint64 { return v.scrub.lost.Load() }},
}

func b2u(b bool) uint64 {
	if b {
		return 1
	}
	return 0
}

// writeMetrics writes every metric of v in the text exposition format.
func (v *extrasVolume) writeMetrics(w *bufio.Writer) {
	st := v.Stats()
	label := strings.NewReplacer(`\`, `\\`, `"`, `\"`, "\n", `\n`).Replace(v.info.Name)
	for _, m := range volumeMetrics {
		fmt.Fprintf(w, "# HELP %s %s\n# TYPE %s %s\n%s{volume=\"%s\"} %s\n", m.name, m.help, m.name, m.typ,
			m.name, label, strconv.FormatUint(m.value(v, st), 10))
	}
}

// serveMetrics serves /metrics on addr until ctx is done. It returns once
// listening, or the listen error.
func (v *extrasVolume) serveMetrics(ctx context.Context, addr string, log *slog.Logger) (net.Addr, error) {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("--metrics: listen on %s: %w: pick another HOST:PORT", addr, err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /metrics", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
		bw := bufio.NewWriter(w)
		v.writeMetrics(bw)
		bw.Flush()
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	v.wg.Go(func() {
		if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("metrics server failed", "err", err)
		}
	})
	v.wg.Go(func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		srv.Shutdown(sctx)
	})
	log.Info("serving metrics", "volume", v.info.Name, "addr", "http://"+l.Addr().String()+"/metrics")
	return l.Addr(), nil
}
