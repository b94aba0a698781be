package cluster

import (
	"bytes"
	"context"
	"errors"
	"net/http"
	"testing"
	"time"

	"github.com/torus-storage/torus/engine"
	"github.com/torus-storage/torus/internal/metrics/metricstest"
	"github.com/torus-storage/torus/internal/voltest"
	"github.com/torus-storage/torus/meta"
)

// TestAttach: an Attached volume holds its attach lock, so a second Attach
// fails with meta.ErrAttached, or with Wait takes the lock once the first
// closes, under a higher epoch, and reads what the first wrote; the
// periodic scrub runs and adds up, and the metrics endpoint shows it until
// Close stops it; Close releases the lock; a missing volume is
// meta.ErrNotFound.
func TestAttach(t *testing.T) {
	tc := startCluster(t, 3, 64)
	tc.volume("held", 1<<20, 3)
	ctx := context.Background()
	opt := func(holder string) AttachOptions {
		return AttachOptions{Options: Options{TLS: tc.client.Client, Timeout: time.Second, Logger: quietLog, Holder: holder},
			TTL: 10 * time.Second}
	}
	ao := opt("a")
	ao.ScrubInterval = 100 * time.Millisecond
	a, err := Attach(ctx, tc.ms, "held", ao)
	if err != nil {
		t.Fatal(err)
	}
	epochA, err := tc.ms.Epoch(ctx, "held")
	if err != nil {
		t.Fatal(err)
	}
	if a.Info().Name != "held" || a.Size() != 1<<20 {
		t.Fatalf("attached %+v, size %d", a.Info(), a.Size())
	}
	data := voltest.Buf(t, engine.BlockSize)
	voltest.Fill(data, 7)
	if err := voltest.Do(a, engine.OpWrite, 0, 0, engine.BlockSize, data); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "a finished scrub", func() bool {
		s := a.ScrubTotals()
		return s.Runs >= 1 && !s.LastSuccess.IsZero()
	})
	if s := a.ScrubTotals(); s.Chunks == 0 || s.Mismatches+s.Checksum+s.Lost != 0 {
		t.Fatalf("scrub totals of a healthy volume: %+v", s)
	}
	maddr, err := a.ServeMetrics("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	murl := "http://" + maddr.String() + "/metrics"
	fams, err := metricstest.Parse(metricstest.Scrape(t, murl))
	if err != nil {
		t.Fatal(err)
	}
	if runs, ok := fams["torus_volume_scrub_runs_total"].Value("volume", "held"); !ok || runs < 1 {
		t.Fatalf("torus_volume_scrub_runs_total{volume=held} = %v (present %v), want >= 1", runs, ok)
	}
	if _, err := a.ServeMetrics(maddr.String()); err == nil {
		t.Fatal("a second endpoint on the same address started")
	}

	if _, err := Attach(ctx, tc.ms, "held", opt("b")); !errors.Is(err, meta.ErrAttached) {
		t.Fatalf("second Attach while a holds the lock: %v, want meta.ErrAttached", err)
	}
	type result struct {
		a   *Attached
		err error
	}
	done := make(chan result, 1)
	go func() {
		bo := opt("b")
		bo.Wait = 30 * time.Second
		b, err := Attach(ctx, tc.ms, "held", bo)
		done <- result{b, err}
	}()
	time.Sleep(700 * time.Millisecond) // b tries at least once while a holds the lock
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	if resp, err := http.Get(murl); err == nil {
		resp.Body.Close()
		t.Fatalf("the metrics endpoint still answers after Close: %s", resp.Status)
	}
	r := <-done
	if r.err != nil {
		t.Fatalf("Attach with Wait after a closed: %v", r.err)
	}
	b := r.a
	if ep, err := tc.ms.Epoch(ctx, "held"); err != nil || ep <= epochA {
		t.Fatalf("b's epoch %d (%v), want above a's %d", ep, err, epochA)
	}
	got := voltest.Buf(t, engine.BlockSize)
	if err := voltest.Do(b, engine.OpRead, 0, 0, engine.BlockSize, got); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatal("b does not read what a wrote before it closed")
	}
	if s := b.ScrubTotals(); s.Runs != 0 || s.Running {
		t.Fatalf("b scrubbed without a ScrubInterval: %+v", s)
	}
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	l, err := tc.ms.Attach(ctx, "held", "c", 10*time.Second)
	if err != nil {
		t.Fatalf("the lock after b closed: %v", err)
	}
	l.Release(ctx)

	if _, err := Attach(ctx, tc.ms, "nosuch", opt("d")); !errors.Is(err, meta.ErrNotFound) {
		t.Fatalf("Attach of a missing volume: %v, want meta.ErrNotFound", err)
	}
}
