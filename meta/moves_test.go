package meta

import (
	"context"
	"errors"
	"testing"

	"github.com/torus-storage/torus/ring"
)

func TestMoves(t *testing.T) {
	s := initStore(t, startEtcd(t))
	ctx := context.Background()
	v, err := s.CreateVolume(ctx, "m", 1<<30, 3)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := s.Moves(ctx, v.ID); err != nil || got != nil {
		t.Fatalf("Moves of a volume with none: %v %v", got, err)
	}
	r1, _ := ring.New([]ring.Node{{ID: "a", Capacity: 1}, {ID: "b", Capacity: 1}}, ring.Options{Version: 4})
	r2, _ := ring.New([]ring.Node{{ID: "a", Capacity: 1}, {ID: "b", Capacity: 1}, {ID: "c", Capacity: 2}}, ring.Options{Version: 5})
	if err := s.SetMoves(ctx, v.ID, []*ring.Ring{r1, r2}); err != nil {
		t.Fatal(err)
	}
	got, err := s.Moves(ctx, v.ID)
	if err != nil || len(got) != 2 || got[0].Version() != 4 || got[1].Version() != 5 || got[1].Len() != 3 {
		t.Fatalf("Moves: %v %v", got, err)
	}
	if err := s.SetMoves(ctx, 999, []*ring.Ring{r1}); !errors.Is(err, ErrNotFound) {
		t.Fatalf("SetMoves of a missing volume: %v, want ErrNotFound", err)
	}
	if err := s.SetMoves(ctx, v.ID, nil); err != nil {
		t.Fatal(err)
	}
	if got, err := s.Moves(ctx, v.ID); err != nil || got != nil {
		t.Fatalf("Moves after clearing: %v %v", got, err)
	}
	// Deleted with the volume.
	if err := s.SetMoves(ctx, v.ID, []*ring.Ring{r1}); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteVolume(ctx, "m"); err != nil {
		t.Fatal(err)
	}
	if got, err := s.Moves(ctx, v.ID); err != nil || got != nil {
		t.Fatalf("Moves after the volume was deleted: %v %v", got, err)
	}
}

// TestRingHistoryAndPlaced: every ring CASRing writes is kept by version; a
// volume records the ring current at its creation; SetPlaced only grows;
// PruneRings keeps every ring some volume's placement still needs.
func TestRingHistoryAndPlaced(t *testing.T) {
	s := initStore(t, startEtcd(t))
	ctx := context.Background()
	early, err := s.CreateVolume(ctx, "early", 1<<30, 1)
	if err != nil {
		t.Fatal(err)
	}
	if ver, ok, err := s.Placed(ctx, early.ID); err != nil || !ok || ver != 0 {
		t.Fatalf("placement of a volume made before any ring: %d %v %v, want 0", ver, ok, err)
	}
	cur, rev, _ := s.Ring(ctx)
	ids := []string{"a", "b", "c"}
	for i := range ids {
		next := mkRing(t, cur, ids[:i+1]...)
		if err := s.CASRing(ctx, rev, next); err != nil {
			t.Fatal(err)
		}
		cur, rev, _ = s.Ring(ctx)
	}
	v, err := s.CreateVolume(ctx, "late", 1<<30, 1)
	if err != nil {
		t.Fatal(err)
	}
	if ver, ok, err := s.Placed(ctx, v.ID); err != nil || !ok || ver != cur.Version() {
		t.Fatalf("placement of a new volume: %d %v %v, want %d", ver, ok, err, cur.Version())
	}
	hist, err := s.RingHistory(ctx, 0, cur.Version())
	if err != nil || len(hist) != int(cur.Version()) {
		t.Fatalf("ring history: %d rings, %v; want %d", len(hist), err, cur.Version())
	}
	for i, r := range hist {
		if r.Version() != uint64(i+1) || r.Len() != i+1 {
			t.Fatalf("history[%d]: version %d with %d nodes", i, r.Version(), r.Len())
		}
	}
	if r, ok, err := s.RingAt(ctx, 2); err != nil || !ok || r.Len() != 2 {
		t.Fatalf("RingAt(2): %v %v %v", r, ok, err)
	}
	if err := s.SetPlaced(ctx, early.ID, 2); err != nil {
		t.Fatal(err)
	}
	if err := s.SetPlaced(ctx, early.ID, 1); err != nil {
		t.Fatal(err)
	}
	if ver, _, _ := s.Placed(ctx, early.ID); ver != 2 {
		t.Fatalf("placement went back to %d, want 2", ver)
	}
	if n, err := s.PruneRings(ctx); err != nil || n != 1 {
		t.Fatalf("PruneRings: %d %v, want ring 1 pruned", n, err)
	}
	if _, ok, _ := s.RingAt(ctx, 2); !ok {
		t.Fatal("PruneRings dropped ring 2, which volume early still needs")
	}
	if err := s.SetPlaced(ctx, 999, 3); !errors.Is(err, ErrNotFound) {
		t.Fatalf("SetPlaced of a missing volume: %v", err)
	}
	if err := s.DeleteVolume(ctx, "early"); err != nil {
		t.Fatal(err)
	}
	if _, ok, _ := s.Placed(ctx, early.ID); ok {
		t.Fatal("placement record outlived its volume")
	}
}
