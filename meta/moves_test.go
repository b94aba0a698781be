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
