package main

import (
	"context"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/torus-storage/torus/internal/metrics/metricstest"
	"github.com/torus-storage/torus/meta"
)

// TestGCDeletedVolume fills a four-chunk node, two of them of volume a, then
// deletes a: without a restart the node frees those slots (and counts them),
// keeps the chunks of a live volume and of an id never allocated, and
// accepts the write it refused before.
func TestGCDeletedVolume(t *testing.T) {
	pfx := prefix(t)
	c := newCluster(t, pfx)
	ctx := context.Background()
	a, err := c.Meta.CreateVolume(ctx, "a", 1<<30, 1)
	if err != nil {
		t.Fatal(err)
	}
	b, err := c.Meta.CreateVolume(ctx, "b", 1<<30, 1)
	if err != nil {
		t.Fatal(err)
	}
	p := start(t, nodeArgs(pfx, t.TempDir(), c.CADir, "--id", "g1", "--size", "4MiB", "--metrics", "127.0.0.1:0")...)
	url := p.WaitLog(t, metricsRe)
	addr := p.WaitLog(t, `msg="node ready" node=\S+ addr=(\S+)`)
	cli := chunkClient(t, c.CADir, addr)
	block := make([]byte, blockSize)
	block[0] = 0x5a
	unallocated := b.ID + 100 // no such volume yet: not garbage
	for _, w := range []struct{ vol, idx uint64 }{{a.ID, 0}, {a.ID, 1}, {b.ID, 0}, {unallocated, 0}} {
		if st, _ := chunkCallAt(t, cli, opWrite, w.vol, w.idx, 0, block, blockSize); st != statusOK {
			t.Fatalf("write of volume %d chunk %d: status %d", w.vol, w.idx, st)
		}
	}
	if st, _ := chunkCallAt(t, cli, opWrite, b.ID, 1, 0, block, blockSize); st != statusNoSpace {
		t.Fatalf("write to a full node: status %d, want no space (%d)", st, statusNoSpace)
	}
	if got := sample(t, metricstest.Scrape(t, url), "torus_gc_chunks_total", "g1"); got != "0" {
		t.Fatalf("torus_gc_chunks_total before any delete = %s", got)
	}

	if err := c.Meta.DeleteVolume(ctx, "a"); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		st, _ := chunkCallAt(t, cli, opWrite, b.ID, 1, 0, block, blockSize)
		if st == statusOK {
			break
		}
		if st != statusNoSpace || time.Now().After(deadline) {
			t.Fatalf("write after deleting volume a: status %d (not freed within 20s)\n%s", st, p.Log())
		}
		time.Sleep(50 * time.Millisecond)
	}
	p.WaitLog(t, `msg="gc: freed chunks of deleted volumes and snapshots" node=g1 chunks=2 failed=0 volumes=1`)
	body := metricstest.Scrape(t, url)
	if got := sample(t, body, "torus_gc_chunks_total", "g1"); got != "2" {
		t.Fatalf("torus_gc_chunks_total = %s, want 2", got)
	}
	if got := sample(t, body, "torus_store_slots_used", "g1"); got != "3" {
		t.Fatalf("torus_store_slots_used = %s, want 3 (b/0, b/1 and the unallocated id's chunk)", got)
	}
	for _, r := range []struct{ vol, idx uint64 }{{b.ID, 0}, {b.ID, 1}, {unallocated, 0}} {
		if st, got := chunkCallAt(t, cli, opRead, r.vol, r.idx, 0, nil, blockSize); st != statusOK || got[0] != 0x5a {
			t.Fatalf("read of kept chunk %d/%d: status %d, first byte %#x", r.vol, r.idx, st, got[0])
		}
	}
	if st, got := chunkCallAt(t, cli, opRead, a.ID, 0, 0, nil, blockSize); st != statusOK || got[0] != 0 {
		t.Fatalf("read of a collected chunk: status %d, first byte %#x; want zeros", st, got[0])
	}
	p.Stop(t)
}

// TestDevNoNodes: torusd dev --nodes 0 serves etcd with an initialised
// cluster and the CA; a node started separately joins it.
func TestDevNoNodes(t *testing.T) {
	dir := t.TempDir()
	p := start(t, "dev", "--nodes", "0", "--data-dir", dir, "--etcd-listen", "127.0.0.1:0")
	p.WaitLog(t, `msg="dev cluster ready" nodes=0`)
	lines := strings.Split(strings.TrimSpace(p.Stdout()), "\n")
	if len(lines) != 2 || !strings.HasPrefix(lines[0], "etcd: http://127.0.0.1:") {
		t.Fatalf("stdout %q", p.Stdout())
	}
	ep := strings.TrimPrefix(lines[0], "etcd: ")
	ctx := context.Background()
	ms, err := meta.Open(ctx, []string{ep}, "", meta.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer ms.Close()
	if cfg, err := ms.Config(ctx); err != nil || cfg.Replication != 3 {
		t.Fatalf("config %+v, %v; want replication 3", cfg, err)
	}
	if nodes, err := ms.Nodes(ctx); err != nil || len(nodes) != 0 {
		t.Fatalf("Nodes = %+v, %v; want none", nodes, err)
	}
	n := start(t, "--etcd", ep, "--data-dir", filepath.Join(t.TempDir(), "n"), "--listen", "127.0.0.1:0",
		"--size", "64MiB", "--cluster-dir", filepath.Join(dir, "ca"), "--id", "solo", "--lease-ttl", "2s")
	n.WaitLog(t, `msg="node ready"`)
	if r, _, err := ms.Ring(ctx); err != nil || r.Len() != 1 || r.Node(0).ID != "solo" {
		t.Fatalf("ring after a separate node joined: %v", err)
	}
	n.Stop(t)
	p.Signal(syscall.SIGINT)
	if code := p.WaitExit(t); code != 0 {
		t.Fatalf("exit %d after SIGINT\n%s", code, p.Log())
	}
	// Still refused: a negative count, and replication above a nonzero count.
	for _, args := range [][]string{{"--nodes", "-1"}, {"--nodes", "2", "--replication", "3"}} {
		q := start(t, append([]string{"dev", "--data-dir", t.TempDir(), "--etcd-listen", "127.0.0.1:0"}, args...)...)
		if code := q.WaitExit(t); code != 2 {
			t.Fatalf("dev %q: exit %d, want 2\n%s", args, code, q.Log())
		}
	}
}
