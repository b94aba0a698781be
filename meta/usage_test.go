package meta

import (
	"context"
	"errors"
	"testing"
	"time"
)

// A usage record lives under its node's registration lease: it is read
// back as written, a rewrite of the same record costs no etcd write, a
// record too large loses its per-snapshot breakdown, and it goes when the
// node unregisters. Another node's id is refused.
func TestUsageRecord(t *testing.T) {
	ctx := context.Background()
	s := initStore(t, startEtcd(t))
	reg, err := s.RegisterNode(ctx, Node{ID: "n1", Addr: "127.0.0.1:7000", Capacity: 1 << 30}, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	u := NodeUsage{Node: "n1", ChunkSize: 1 << 20, Volumes: map[uint64]VolumeUsage{
		3: {Head: 5, Copies: 2, Only: map[uint64]uint64{1: 2}},
	}}
	if partial, err := reg.PutUsage(ctx, u); err != nil || partial {
		t.Fatalf("PutUsage: partial %v, %v", partial, err)
	}
	got, err := s.Usage(ctx)
	if err != nil || len(got) != 1 || got["n1"].Volumes[3].Head != 5 || got["n1"].Volumes[3].Only[1] != 2 {
		t.Fatalf("Usage = %+v, %v", got, err)
	}
	resp, err := s.cli.Get(ctx, s.usageKey("n1"))
	if err != nil || len(resp.Kvs) != 1 || resp.Kvs[0].Lease != int64(reg.Lease()) {
		t.Fatalf("usage key: %+v, %v; want it under lease %x", resp.Kvs, err, reg.Lease())
	}
	rev := resp.Kvs[0].ModRevision
	if _, err := reg.PutUsage(ctx, u); err != nil {
		t.Fatal(err)
	}
	if resp, err := s.cli.Get(ctx, s.usageKey("n1")); err != nil || resp.Kvs[0].ModRevision != rev {
		t.Fatalf("an unchanged record was written again: %v", err)
	}

	big := NodeUsage{Node: "n1", ChunkSize: 1 << 20, Volumes: map[uint64]VolumeUsage{}}
	for v := range uint64(2000) {
		only := map[uint64]uint64{}
		for sn := range uint64(20) {
			only[sn+1000] = sn + 1
		}
		big.Volumes[v+1] = VolumeUsage{Head: 100, Copies: 50, Only: only}
	}
	if partial, err := reg.PutUsage(ctx, big); err != nil || !partial {
		t.Fatalf("PutUsage of a large record: partial %v, %v", partial, err)
	}
	got, err = s.Usage(ctx)
	if err != nil || !got["n1"].Partial || len(got["n1"].Volumes) != 2000 || got["n1"].Volumes[7].Copies != 50 || got["n1"].Volumes[7].Only != nil {
		t.Fatalf("large record read back: partial %v, %d volumes, %v", got["n1"].Partial, len(got["n1"].Volumes), err)
	}

	if _, err := reg.PutUsage(ctx, NodeUsage{Node: "n2"}); !errors.Is(err, ErrInvalid) {
		t.Fatalf("PutUsage of another node: %v", err)
	}
	if err := reg.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if got, err := s.Usage(ctx); err != nil || len(got) != 0 {
		t.Fatalf("Usage after the node unregistered = %+v, %v", got, err)
	}
}
