package meta

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestVolumeQoS: limits set at creation are in the record; UpdateQoS
// changes them (a concurrent change of another field is kept), refuses
// invalid ones without writing, and survives a resize; WatchQoS delivers
// the limits at once and after each change.
func TestVolumeQoS(t *testing.T) {
	ep := startEtcd(t)
	ctx := context.Background()
	s := initStore(t, ep)
	want := QoS{ReadIOPS: 1000, WriteBPS: 10 << 20, BurstMS: 500}
	v, err := s.CreateVolume(ctx, "q", 1<<30, 1, WithQoS(want))
	if err != nil || v.QoS != want {
		t.Fatalf("CreateVolume with QoS = %+v, %v", v, err)
	}
	if got, _ := s.Volume(ctx, "q"); got.QoS != want {
		t.Fatalf("stored QoS %+v, want %+v", got.QoS, want)
	}
	for _, bad := range []QoS{{ReadBPS: 100}, {WriteBPS: 4095}, {BurstMS: 60001}, {BurstMS: 1 << 63}} {
		_, err := s.CreateVolume(ctx, "bad", 1<<30, 1, WithQoS(bad))
		if !errors.Is(err, ErrInvalid) {
			t.Fatalf("CreateVolume with %+v: %v, want ErrInvalid", bad, err)
		}
		if _, err := s.UpdateQoS(ctx, "q", func(q *QoS) { *q = bad }); !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "volume q") {
			t.Fatalf("UpdateQoS to %+v: %v, want ErrInvalid naming the volume", bad, err)
		}
	}
	if _, err := s.Volume(ctx, "bad"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("a volume with invalid QoS was created: %v", err)
	}

	watch, cancel := context.WithCancel(ctx)
	defer cancel()
	ch := s.WatchQoS(watch, v.ID)
	next := func(what string, want QoS) {
		t.Helper()
		deadline := time.After(10 * time.Second)
		for {
			select {
			case q := <-ch:
				if q == want {
					return
				}
			case <-deadline:
				t.Fatalf("%s: WatchQoS did not deliver %+v", what, want)
			}
		}
	}
	next("at start", want)

	// Two writers change different fields at once: both changes are kept.
	var wg sync.WaitGroup
	for i := range 2 {
		wg.Go(func() {
			_, err := s.UpdateQoS(ctx, "q", func(q *QoS) {
				if i == 0 {
					q.WriteIOPS = 200
				} else {
					q.ReadIOPS = 0
				}
			})
			if err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	want = QoS{WriteIOPS: 200, WriteBPS: 10 << 20, BurstMS: 500}
	if got, _ := s.Volume(ctx, "q"); got.QoS != want {
		t.Fatalf("after two concurrent updates: %+v, want %+v", got.QoS, want)
	}
	next("after the updates", want)
	if _, err := s.ResizeVolume(ctx, "q", 2<<30); err != nil {
		t.Fatal(err)
	}
	if got, _ := s.Volume(ctx, "q"); got.QoS != want || got.Size != 2<<30 {
		t.Fatalf("after resize: %+v", got)
	}
	if v, err := s.UpdateQoS(ctx, "q", func(q *QoS) { *q = QoS{} }); err != nil || !v.QoS.Unlimited() {
		t.Fatalf("clearing the QoS: %+v, %v", v, err)
	}
	next("after clearing", QoS{})
	if _, err := s.UpdateQoS(ctx, "nope", func(*QoS) {}); !errors.Is(err, ErrNotFound) {
		t.Fatalf("UpdateQoS of a missing volume: %v", err)
	}
	cancel()
	for range ch { // closed once the watch ends
	}
}
