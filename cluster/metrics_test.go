package cluster

import (
	"log/slog"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/torus-storage/torus/internal/metrics"
	"github.com/torus-storage/torus/internal/metrics/metricstest"
	"github.com/torus-storage/torus/meta"
)

// TestVolumeMetrics serves the metrics of a volume whose counters all
// differ: each metric reads its own counter, labelled with the volume's
// name; the Go runtime and process metrics come with them; and the torus_
// metrics are exactly those docs/OPERATIONS.md lists for torusblk, with
// their types and labels.
func TestVolumeMetrics(t *testing.T) {
	src := fakeVolume{size: 8 << 30, st: Stats{
		Missed: 2, Rebuilt: 3, RebuiltBytes: 4 << 20, Failovers: 5, NodeFailures: 6, Behind: 7,
		NodeRestarts: 100, CopiesRefused: 101, MoveCopies: 102, Rebalances: 103, Moving: true,
	}}
	src.scrub = ScrubTotals{Runs: 11, Chunks: 12, Skipped: 13, Checksum: 14, Mismatches: 15, Behind: 16, Repaired: 17, Lost: 18,
		Running: true, LastSuccess: time.Unix(1_700_000_000, 0)}
	src.qos = QoSStats{Limits: meta.QoS{ReadIOPS: 21, WriteIOPS: 22, ReadBPS: 23 << 20, WriteBPS: 24 << 20, BurstMS: 2500},
		ReadThrottled: 25, WriteThrottled: 26, ReadThrottledTime: 1500 * time.Millisecond, WriteThrottledTime: 27 * time.Second,
		Queued: 28}
	const name = `vol"\1`
	c := &volumeCollector{name: name, src: src}
	ped := prometheus.NewPedanticRegistry()
	if err := ped.Register(c); err != nil {
		t.Fatal(err)
	}
	if _, err := ped.Gather(); err != nil {
		t.Fatalf("pedantic gather: %v", err)
	}
	reg, err := metrics.NewRegistry(c)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(metrics.Handler(reg, slog.New(slog.DiscardHandler)))
	defer srv.Close()
	body := metricstest.Scrape(t, srv.URL+"/metrics")
	fams, err := metricstest.Parse(body)
	if err != nil {
		t.Fatalf("%v\n%s", err, body)
	}
	for metric, want := range map[string]float64{
		"torus_volume_size_bytes":                           8 << 30,
		"torus_volume_missed_chunks":                        2,
		"torus_volume_rebuilt_chunks_total":                 3,
		"torus_volume_rebuilt_bytes_total":                  4 << 20,
		"torus_volume_read_failovers_total":                 5,
		"torus_volume_node_failures_total":                  6,
		"torus_volume_replicas_behind_total":                7,
		"torus_volume_scrub_running":                        1,
		"torus_volume_scrub_last_success_timestamp_seconds": 1_700_000_000,
		"torus_volume_scrub_runs_total":                     11,
		"torus_volume_scrub_chunks_total":                   12,
		"torus_volume_scrub_skipped_chunks_total":           13,
		"torus_volume_scrub_checksum_errors_total":          14,
		"torus_volume_scrub_mismatches_total":               15,
		"torus_volume_scrub_behind_total":                   16,
		"torus_volume_scrub_repaired_total":                 17,
		"torus_volume_scrub_lost_chunks_total":              18,
		"torus_volume_qos_read_iops_limit":                  21,
		"torus_volume_qos_write_iops_limit":                 22,
		"torus_volume_qos_read_bytes_per_second_limit":      23 << 20,
		"torus_volume_qos_write_bytes_per_second_limit":     24 << 20,
		"torus_volume_qos_burst_seconds":                    2.5,
		"torus_volume_qos_throttled_read_requests_total":    25,
		"torus_volume_qos_throttled_write_requests_total":   26,
		"torus_volume_qos_throttled_read_seconds_total":     1.5,
		"torus_volume_qos_throttled_write_seconds_total":    27,
		"torus_volume_qos_queued_requests":                  28,
	} {
		f := fams[metric]
		if f == nil {
			t.Errorf("%s missing", metric)
			continue
		}
		if got, ok := f.Value("volume", name); !ok || got != want || len(f.Samples) != 1 {
			t.Errorf("%s{volume=%q} = %v (present %v, %d samples), want %v", metric, name, got, ok, len(f.Samples), want)
		}
	}
	metricstest.CheckRuntime(t, fams)
	metricstest.CheckDocumented(t, "../docs/OPERATIONS.md", "torusblk", fams)
	if t.Failed() {
		t.Logf("scrape:\n%s", body)
	}
}

// fakeVolume is a statsSource with fixed counters.
type fakeVolume struct {
	size  int64
	st    Stats
	scrub ScrubTotals
	qos   QoSStats
}

func (f fakeVolume) Size() int64              { return f.size }
func (f fakeVolume) Stats() Stats             { return f.st }
func (f fakeVolume) ScrubTotals() ScrubTotals { return f.scrub }
func (f fakeVolume) QoSStats() QoSStats       { return f.qos }
