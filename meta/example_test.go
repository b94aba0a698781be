package meta_test

import (
	"context"
	"fmt"
	"log"
	"os"
	"time"

	"github.com/torus-storage/torus/internal/devetcd"
	"github.com/torus-storage/torus/meta"
	"github.com/torus-storage/torus/ring"
)

// Example shows the life of a dev cluster: an embedded etcd, a node
// joining the ring, a volume attached with a fencing epoch.
func Example() {
	ctx := context.Background()
	dir, _ := os.MkdirTemp("", "etcd")
	defer os.RemoveAll(dir)
	etcd, err := devetcd.Start(ctx, dir, "", "")
	if err != nil {
		log.Fatal(err)
	}
	defer etcd.Close()

	s, err := meta.Open(ctx, []string{etcd.Endpoint()}, "", meta.Options{})
	if err != nil {
		log.Fatal(err) // "etcd at ... is unreachable: start etcd or pass --etcd"
	}
	defer s.Close()
	if err := s.Init(ctx, meta.Config{ChunkSize: 1 << 20, Replication: 1}); err != nil {
		log.Fatal(err)
	}

	n := meta.Node{ID: "n1", Addr: "127.0.0.1:7000", Capacity: 1 << 40}
	reg, err := s.RegisterNode(ctx, n, 10*time.Second)
	if err != nil {
		log.Fatal(err)
	}
	defer reg.Close(ctx)

	// Add the live nodes to the ring; retry on ErrConflict.
	cur, rev, _ := s.Ring(ctx)
	nodes, _ := s.Nodes(ctx)
	var members []ring.Node
	for _, n := range nodes {
		members = append(members, n.RingNode())
	}
	next, _ := cur.Next(members)
	if err := s.CASRing(ctx, rev, next); err != nil {
		log.Fatal(err)
	}

	if _, err := s.CreateVolume(ctx, "vol0", 1<<30, 0); err != nil {
		log.Fatal(err)
	}
	lease, err := s.Attach(ctx, "vol0", "nbd@host", 10*time.Second)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("ring version", next.Version(), "epoch", lease.Epoch())
	lease.Release(ctx)
	// Output: ring version 1 epoch 1
}
