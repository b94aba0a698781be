package meta

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/torus-storage/torus/ring"
)

// TestLiveCopies: every chunk has R live good copies on a healthy cluster;
// a missed mark or a node gone from the registry takes copies away, and
// the chunks down to one are counted.
func TestLiveCopies(t *testing.T) {
	s := initStore(t, startEtcd(t))
	ctx := context.Background()
	regs := map[string]*Registration{}
	for i := range 3 {
		n := Node{ID: fmt.Sprintf("n%d", i), Addr: fmt.Sprintf("127.0.0.1:%d", 7000+i), Capacity: 1 << 40, Host: fmt.Sprint(i)}
		if _, err := s.JoinRing(ctx, n); err != nil {
			t.Fatal(err)
		}
		r, err := s.RegisterNode(ctx, n, 10*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { r.Close(context.Background()) })
		regs[n.ID] = r
	}
	v, err := s.CreateVolume(ctx, "c", 8<<20, 2) // 8 chunks of 1 MiB
	if err != nil {
		t.Fatal(err)
	}
	check := func(what string, fewest int, one uint64) {
		t.Helper()
		f, o, err := s.LiveCopies(ctx, v)
		if err != nil || f != fewest || o != one {
			t.Fatalf("%s: LiveCopies = %d, %d, %v; want %d, %d", what, f, o, err, fewest, one)
		}
	}
	check("healthy", 2, 0)
	r, _, err := s.Ring(ctx)
	if err != nil {
		t.Fatal(err)
	}
	owners := r.Owners(ring.ChunkKey(v.ID, 5, 0), 2, nil)
	if err := s.MarkMissed(ctx, v.ID, owners[0], 5); err != nil {
		t.Fatal(err)
	}
	check("one copy of chunk 5 marked", 1, 1)
	if err := s.MarkMissed(ctx, v.ID, owners[1], 5); err != nil {
		t.Fatal(err)
	}
	check("both copies of chunk 5 marked", 0, 1)
	s.ClearMissed(ctx, v.ID, owners[0], 5)
	s.ClearMissed(ctx, v.ID, owners[1], 5)
	// A node gone from the registry: every chunk it owns is down to one.
	gone := owners[0]
	if err := regs[gone].Close(ctx); err != nil {
		t.Fatal(err)
	}
	var want uint64
	for ch := range uint64(8) {
		for _, o := range r.Owners(ring.ChunkKey(v.ID, ch, 0), 2, nil) {
			if o == gone {
				want++
			}
		}
	}
	check("node "+gone+" unregistered", 1, want)
}

// TestMoving: a volume is moving while its placement lags the ring or a
// move is recorded, and no longer once both are done.
func TestMoving(t *testing.T) {
	s := initStore(t, startEtcd(t))
	ctx := context.Background()
	for i := range 3 {
		if _, err := s.JoinRing(ctx, Node{ID: fmt.Sprintf("n%d", i), Capacity: 1 << 40, Host: fmt.Sprint(i)}); err != nil {
			t.Fatal(err)
		}
	}
	v, err := s.CreateVolume(ctx, "m", 1<<30, 2)
	if err != nil {
		t.Fatal(err)
	}
	moving := func() []MovingVolume {
		t.Helper()
		vols, err := s.Volumes(ctx)
		if err != nil {
			t.Fatal(err)
		}
		r, _, err := s.Ring(ctx)
		if err != nil {
			t.Fatal(err)
		}
		m, err := s.Moving(ctx, vols, r.Version())
		if err != nil {
			t.Fatal(err)
		}
		return m
	}
	if m := moving(); m == nil || len(m) != 0 {
		t.Fatalf("Moving before any ring change = %#v, want an empty list", m)
	}
	old, _, err := s.Ring(ctx)
	if err != nil {
		t.Fatal(err)
	}
	next, err := s.RemoveNode(ctx, "n2")
	if err != nil {
		t.Fatal(err)
	}
	if m := moving(); len(m) != 1 || m[0] != (MovingVolume{Volume: "m", ID: v.ID, PlacedRing: old.Version()}) {
		t.Fatalf("Moving after a removal nobody recorded = %+v", m)
	}
	if err := s.SetMoves(ctx, v.ID, []*ring.Ring{old}); err != nil {
		t.Fatal(err)
	}
	if err := s.SetPlaced(ctx, v.ID, next.Version()); err != nil {
		t.Fatal(err)
	}
	if m := moving(); len(m) != 1 || m[0] != (MovingVolume{Volume: "m", ID: v.ID, PlacedRing: next.Version(), Moves: 1}) {
		t.Fatalf("Moving with the move recorded = %+v", m)
	}
	if err := s.SetMoves(ctx, v.ID, nil); err != nil {
		t.Fatal(err)
	}
	if m := moving(); len(m) != 0 {
		t.Fatalf("Moving after the move ended = %+v", m)
	}
}

func TestProgressPercent(t *testing.T) {
	for _, c := range []struct {
		done, total uint64
		want        float64
	}{{0, 0, 100}, {5, 0, 100}, {0, 4, 0}, {1, 4, 25}, {4, 4, 100}, {9, 4, 100}} {
		if got := (Progress{Done: c.done, Total: c.total}).Percent(); got != c.want {
			t.Errorf("Progress{Done: %d, Total: %d}.Percent() = %v, want %v", c.done, c.total, got, c.want)
		}
	}
}
