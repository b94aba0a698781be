package meta

import (
	"context"
	"errors"
	"testing"
	"time"
)

func TestRegistrationUpdate(t *testing.T) {
	s := initStore(t, startEtcd(t))
	ctx := context.Background()
	n := Node{ID: "n1", Addr: "127.0.0.1:1", Capacity: 1 << 30}
	reg, err := s.RegisterNode(ctx, n, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer reg.Close(ctx)
	n.Used, n.NoSpace = 3<<20, 2
	if err := reg.Update(ctx, n); err != nil {
		t.Fatal(err)
	}
	nodes, err := s.Nodes(ctx)
	if err != nil || len(nodes) != 1 {
		t.Fatalf("Nodes: %v %v", nodes, err)
	}
	if got := nodes[0]; got.Used != 3<<20 || got.NoSpace != 2 || got.Started.IsZero() || got.Capacity != 1<<30 {
		t.Fatalf("after Update: %+v", got)
	}
	if err := reg.Update(ctx, Node{ID: "other"}); !errors.Is(err, ErrInvalid) {
		t.Fatalf("Update of another id: %v, want ErrInvalid", err)
	}
	// The key still lives on the lease: closing the registration removes it.
	if err := reg.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if nodes, _ := s.Nodes(ctx); len(nodes) != 0 {
		t.Fatalf("nodes after Close: %v", nodes)
	}
}
