package meta

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"
)

func TestSetReplication(t *testing.T) {
	ep := startEtcd(t)
	ctx := context.Background()
	s := open(t, ep, "")
	if err := s.SetReplication(ctx, 2); !errors.Is(err, ErrNotInitialized) {
		t.Fatalf("SetReplication before Init: %v, want ErrNotInitialized", err)
	}
	if err := s.Init(ctx, Config{ClusterID: "c", ChunkSize: 1 << 20, Replication: 3}); err != nil {
		t.Fatal(err)
	}
	before, _ := s.Config(ctx)
	for _, r := range []int{0, -1} {
		if err := s.SetReplication(ctx, r); !errors.Is(err, ErrInvalid) {
			t.Fatalf("SetReplication(%d): %v, want ErrInvalid", r, err)
		}
	}
	if err := s.SetReplication(ctx, 2); err != nil {
		t.Fatal(err)
	}
	got, err := s.Config(ctx)
	want := before
	want.Replication = 2
	if err != nil || got != want {
		t.Fatalf("Config after SetReplication(2) = %+v, %v; want %+v", got, err, want)
	}
	// New volumes take the new default.
	v, err := s.CreateVolume(ctx, "v", 1<<30, 0)
	if err != nil || v.Replication != 2 {
		t.Fatalf("CreateVolume after SetReplication(2): %+v, %v", v, err)
	}
	// Concurrent setters: all succeed (CAS retries), the last write wins.
	s2 := open(t, ep, "")
	var wg sync.WaitGroup
	errs := make([]error, 8)
	for i := range errs {
		st := s
		if i%2 == 1 {
			st = s2
		}
		wg.Go(func() { errs[i] = st.SetReplication(ctx, 1+i%4) })
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("concurrent SetReplication %d: %v", i, err)
		}
	}
	got, err = s.Config(ctx)
	if err != nil || got.Replication < 1 || got.Replication > 4 || got.ClusterID != "c" || got.ChunkSize != 1<<20 {
		t.Fatalf("Config after concurrent SetReplication: %+v, %v", got, err)
	}
}

func TestEpochs(t *testing.T) {
	ep := startEtcd(t)
	ctx := context.Background()
	s := initStore(t, ep)
	if m, err := s.Epochs(ctx); err != nil || len(m) != 0 {
		t.Fatalf("Epochs with no volume = %v, %v", m, err)
	}
	a, _ := s.CreateVolume(ctx, "a", 1<<30, 1)
	b, _ := s.CreateVolume(ctx, "b", 1<<30, 1)
	s.CreateVolume(ctx, "never", 1<<30, 1)
	for range 3 {
		l, err := s.Attach(ctx, "a", "t", 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		l.Release(ctx)
	}
	l, err := s.Attach(ctx, "b", "t", 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Release(ctx)
	m, err := s.Epochs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(m) != 2 || m[a.ID] != 3 || m[b.ID] != 1 {
		t.Fatalf("Epochs = %v; want {%d:3 %d:1}", m, a.ID, b.ID)
	}
	// Another prefix's epochs are not ours.
	if m, err := open(t, ep, "/other/").Epochs(ctx); err != nil || len(m) != 0 {
		t.Fatalf("Epochs of another prefix = %v, %v", m, err)
	}
}

// TestWatchEpochs: the watch delivers the epochs at once and again after
// every attach.
func TestWatchEpochs(t *testing.T) {
	s := initStore(t, startEtcd(t))
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	v, err := s.CreateVolume(ctx, "w", 1<<30, 1)
	if err != nil {
		t.Fatal(err)
	}
	ch := s.WatchEpochs(ctx)
	if m := <-ch; len(m) != 0 {
		t.Fatalf("first delivery %v, want no epochs", m)
	}
	for want := uint64(1); want <= 3; want++ {
		l, err := s.Attach(ctx, "w", "t", 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		for {
			m, ok := <-ch
			if !ok {
				t.Fatalf("watch closed before epoch %d: %v", want, ctx.Err())
			}
			if m[v.ID] == want {
				break
			}
			if m[v.ID] > want {
				t.Fatalf("epoch %d delivered, want %d first", m[v.ID], want)
			}
		}
		l.Release(ctx)
	}
	cancel()
	for range ch {
	}
}

func TestJoinRing(t *testing.T) {
	ep := startEtcd(t)
	ctx := context.Background()
	s := initStore(t, ep)
	if _, err := s.JoinRing(ctx, Node{ID: "x"}); !errors.Is(err, ErrInvalid) {
		t.Fatalf("JoinRing without capacity: %v, want ErrInvalid", err)
	}
	if _, err := s.JoinRing(ctx, Node{ID: "a/b", Capacity: 1}); !errors.Is(err, ErrInvalid) {
		t.Fatalf("JoinRing with '/' in id: %v, want ErrInvalid", err)
	}
	n1 := Node{ID: "n1", Addr: "127.0.0.1:1", Capacity: 1 << 30, Zone: "z1", Host: "h1"}
	r, err := s.JoinRing(ctx, n1)
	if err != nil || r.Len() != 1 || r.Version() != 1 {
		t.Fatalf("first JoinRing: %v nodes, v%d, %v", r.Len(), r.Version(), err)
	}
	// The same node again (a restart, even on another address): no write.
	_, rev, _ := s.Ring(ctx)
	n1.Addr = "127.0.0.1:2"
	if r, err := s.JoinRing(ctx, n1); err != nil || r.Version() != 1 {
		t.Fatalf("JoinRing of an equal node: v%d, %v", r.Version(), err)
	}
	if _, rev2, _ := s.Ring(ctx); rev2 != rev {
		t.Fatalf("JoinRing of an equal node wrote the ring: rev %d -> %d", rev, rev2)
	}
	// A changed zone is an update, not a second member.
	n1.Zone = "z9"
	r, err = s.JoinRing(ctx, n1)
	if err != nil || r.Len() != 1 || r.Version() != 2 || r.Node(0).Zone != "z9" {
		t.Fatalf("JoinRing with a new zone: %v nodes, v%d, %+v, %v", r.Len(), r.Version(), r.Node(0), err)
	}
	// Concurrent joins all land, each in its own version.
	stores := []*Client{s, open(t, ep, ""), open(t, ep, "")}
	var wg sync.WaitGroup
	errs := make([]error, 9)
	for i := range errs {
		n := Node{ID: fmt.Sprintf("m%d", i), Capacity: 1 << 30, Zone: fmt.Sprintf("z%d", i%3), Host: "h"}
		wg.Go(func() { _, errs[i] = stores[i%3].JoinRing(ctx, n) })
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("concurrent JoinRing %d: %v", i, err)
		}
	}
	got, _, err := s.Ring(ctx)
	if err != nil || got.Len() != 10 || got.Version() != 11 || got.Index("n1") < 0 {
		t.Fatalf("ring after concurrent joins: %d nodes, v%d, %v", got.Len(), got.Version(), err)
	}
}
