package cluster

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/torus-storage/torus/engine"
	"github.com/torus-storage/torus/internal/metrics/metricstest"
	"github.com/torus-storage/torus/internal/voltest"
	"github.com/torus-storage/torus/meta"
)

// driver keeps qd requests of one op in flight on a volume, each
// resubmitted from its completion, until stopped; it counts completions.
type driver struct {
	v      engine.Volume
	reqs   []driverReq
	done   atomic.Int64
	errs   atomic.Int64
	stop   atomic.Bool
	flight sync.WaitGroup
}

type driverReq struct {
	engine.Request
	d *driver
}

func (r *driverReq) Complete(_ *engine.Request, err error) {
	d := r.d
	if err != nil {
		d.errs.Add(1)
	}
	d.done.Add(1)
	if d.stop.Load() {
		d.flight.Done()
		return
	}
	d.v.Submit(&r.Request)
}

func drive(t *testing.T, v engine.Volume, op engine.Op, qd int, length int64) *driver {
	d := &driver{v: v, reqs: make([]driverReq, qd)}
	for i := range d.reqs {
		r := &d.reqs[i]
		r.d = d
		r.Op, r.Offset, r.Length, r.Buf, r.Done = op, int64(i)*length, length, voltest.Buf(t, int(length)), r
	}
	d.flight.Add(qd)
	for i := range d.reqs {
		v.Submit(&d.reqs[i].Request)
	}
	return d
}

// rate counts completions over d and returns them with the time taken.
func (d *driver) rate(dur time.Duration) (int64, time.Duration) {
	n0, t0 := d.done.Load(), time.Now()
	time.Sleep(dur)
	return d.done.Load() - n0, time.Since(t0)
}

func (d *driver) end(t *testing.T) {
	d.stop.Store(true)
	d.flight.Wait()
	if e := d.errs.Load(); e != 0 {
		t.Fatalf("%d requests failed", e)
	}
}

// TestAttachQoS: an attached volume created with a read IOPS limit is held
// to it (never above limit × time plus the one request a bucket admits at
// once, loosely near it), requests wait and are counted in the metrics;
// writes are not held by a read limit; a change of the record (what
// torusctl volume set-qos does) applies live, without re-attaching; Close
// with requests queued completes them.
func TestAttachQoS(t *testing.T) {
	tc := startCluster(t, 3, 64)
	ctx := context.Background()
	if _, err := tc.ms.CreateVolume(ctx, "limited", 4<<20, 3, meta.WithQoS(meta.QoS{ReadIOPS: 200})); err != nil {
		t.Fatal(err)
	}
	a, err := Attach(ctx, tc.ms, "limited", AttachOptions{Options: Options{TLS: tc.client.Client, Timeout: 5 * time.Second,
		Logger: quietLog, Holder: "qos"}})
	if err != nil {
		t.Fatal(err)
	}
	maddr, err := a.ServeMetrics("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}

	check := func(what string, d *driver, limit int64) {
		t.Helper()
		n, el := d.rate(1500 * time.Millisecond)
		got := float64(n) / el.Seconds()
		t.Logf("%s: %d reads in %v = %.1f IOPS at a limit of %d", what, n, el.Round(time.Millisecond), got, limit)
		// Completions in the window can include requests admitted just
		// before it: qd of them at most.
		if max := int64(float64(limit)*el.Seconds()) + 1 + int64(len(d.reqs)); n > max {
			t.Fatalf("%s: %d reads completed in %v, above %d at a limit of %d IOPS", what, n, el, max, limit)
		}
		if n < int64(float64(limit)*el.Seconds()/2) {
			t.Fatalf("%s: %d reads in %v at a limit of %d IOPS: held far below it", what, n, el, limit)
		}
	}
	d := drive(t, a, engine.OpRead, 16, engine.BlockSize)
	check("200 IOPS", d, 200)

	// A write burst is not held by the read limit: 64 writes at QD16
	// complete while the reads wait.
	w := drive(t, a, engine.OpWrite, 16, engine.BlockSize)
	waitFor(t, "unlimited writes", func() bool { return w.done.Load() >= 64 })
	w.end(t)

	if _, err := tc.ms.UpdateQoS(ctx, "limited", func(q *meta.QoS) { q.ReadIOPS = 800 }); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the new limit in force", func() bool { return a.QoSStats().Limits.ReadIOPS == 800 })
	check("raised to 800 IOPS", d, 800)

	st := a.QoSStats()
	if st.ReadThrottled == 0 || st.ReadThrottledTime <= 0 || st.WriteThrottled != 0 {
		t.Fatalf("QoS stats %+v: want reads throttled, writes not", st)
	}
	fams, err := metricstest.Parse(metricstest.Scrape(t, "http://"+maddr.String()+"/metrics"))
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range []string{"torus_volume_qos_throttled_read_requests_total", "torus_volume_qos_throttled_read_seconds_total"} {
		if v, ok := fams[m].Value("volume", "limited"); !ok || v <= 0 {
			t.Fatalf("%s = %v (present %v), want > 0", m, v, ok)
		}
	}
	if v, ok := fams["torus_volume_qos_read_iops_limit"].Value("volume", "limited"); !ok || v != 800 {
		t.Fatalf("torus_volume_qos_read_iops_limit = %v (present %v), want 800", v, ok)
	}

	// Down to 1 IOPS: requests pile up in the limiter; Close releases
	// them, and each completes.
	if _, err := tc.ms.UpdateQoS(ctx, "limited", func(q *meta.QoS) { q.ReadIOPS = 1 }); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "requests queued at 1 IOPS", func() bool { return a.QoSStats().Queued > 8 })
	d.stop.Store(true)
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	d.flight.Wait()
	if e := d.errs.Load(); e != 0 {
		t.Fatalf("%d reads failed", e)
	}
}
