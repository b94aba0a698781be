package main

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/torus-storage/torus/internal/metrics/metricstest"
	"github.com/torus-storage/torus/internal/testcluster"
)

// TestDeadNodeRemoved: three nodes with --dead-timeout 2s; one is killed
// with -9. Once its lease has expired and the timeout passed, one of the
// survivors removes it from the ring (logged, counted in
// torus_dead_nodes_removed_total). Then, with replication 2, the next dead
// node is kept: removing it would leave fewer nodes than the replication.
func TestDeadNodeRemoved(t *testing.T) {
	pfx := prefix(t)
	c := newCluster(t, pfx)
	ctx := context.Background()
	var procs []*testcluster.Proc
	var urls []string
	for _, id := range []string{"d1", "d2", "d3"} {
		p := start(t, nodeArgs(pfx, filepath.Join(t.TempDir(), id), c.CADir, "--id", id, "--dead-timeout", "2s",
			"--metrics", "127.0.0.1:0")...)
		urls = append(urls, p.WaitLog(t, metricsRe))
		p.WaitLog(t, `msg="node ready"`)
		procs = append(procs, p)
	}
	ringHas := func(id string) bool {
		r, _, err := c.Meta.Ring(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for _, n := range r.Nodes() {
			if n.ID == id {
				return true
			}
		}
		return false
	}
	if !ringHas("d3") {
		t.Fatal("d3 is not in the ring after it started")
	}
	procs[2].Kill()

	deadline := time.Now().Add(60 * time.Second)
	for ringHas("d3") {
		if time.Now().After(deadline) {
			t.Fatalf("d3 still in the ring 60s after kill -9 with --dead-timeout 2s\n%s\n%s", procs[0].Log(), procs[1].Log())
		}
		time.Sleep(100 * time.Millisecond)
	}
	// The remover logs and counts right after its ring CAS, which the loop
	// above may see first: give its log line and counter a moment.
	var removed, total int
	for wait := time.Now().Add(10 * time.Second); ; {
		removed, total = 0, 0
		for i, p := range procs[:2] {
			if strings.Contains(p.Log(), "DEAD NODE REMOVED FROM THE RING") {
				removed++
			}
			switch v := sample(t, metricstest.Scrape(t, urls[i]), "torus_dead_nodes_removed_total", []string{"d1", "d2"}[i]); v {
			case "1":
				total++
			case "0":
			default:
				t.Fatalf("torus_dead_nodes_removed_total on d%d = %s, want 0 or 1", i+1, v)
			}
		}
		if removed >= 1 && total >= 1 || time.Now().After(wait) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if removed != 1 || total != 1 {
		t.Fatalf("%d survivors logged the removal and %d counted it, want exactly 1 (the other saw it done)", removed, total)
	}
	if !ringHas("d1") || !ringHas("d2") {
		t.Fatal("a live node was removed from the ring")
	}

	// With replication 2 on a ring of two, a dead node stays.
	if err := c.Meta.SetReplication(ctx, 2); err != nil {
		t.Fatal(err)
	}
	procs[1].Kill()
	procs[0].WaitLog(t, `removing it would leave fewer nodes than the replication.*dead_node=d2`)
	if !ringHas("d2") {
		t.Fatal("d2 was removed although the ring would then hold fewer nodes than the replication")
	}
	procs[0].Stop(t)
}
