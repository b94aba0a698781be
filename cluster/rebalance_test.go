package cluster

import (
	"context"
	"fmt"
	"math"
	"testing"
	"time"

	"github.com/torus-storage/torus/engine"
	"github.com/torus-storage/torus/internal/voltest"
	"github.com/torus-storage/torus/ring"
)

// addNode starts one more node and joins it to the ring.
func (tc *testCluster) addNode(slots int64) *testNode {
	tc.t.Helper()
	nd := tc.startNode(fmt.Sprintf("node%d", len(tc.nodes)+1), slots)
	if _, err := tc.ms.JoinRing(context.Background(), nd.meta); err != nil {
		tc.t.Fatal(err)
	}
	return nd
}

// waitMoved waits until a rebalance beyond done finished and nothing is
// missed.
func waitMoved(t *testing.T, c *Volume, done uint64) Stats {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		st := c.Stats()
		if st.Rebalances > done && st.Missed == 0 && !st.Moving {
			return st
		}
		if time.Now().After(deadline) {
			t.Fatalf("rebalance did not finish: %+v", st)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestClusterRebalance: a node joins, another leaves, a third changes weight, under a volume
// with R=2 being written; chunks move to their new owners while reads and
// writes go on, the bytes verify afterwards, each chunk ends on exactly its
// R owners (old copies discarded), and the number of chunk copies moved
// matches the ring's prediction.
func TestClusterRebalance(t *testing.T) {
	tc := startCluster(t, 3, 256)
	const size = 8 << 20 // 128 chunks
	vol := tc.volume("move", size, 2)
	c := tc.mustOpen(vol, 1)
	defer c.Close()
	model := make([]byte, size)
	voltest.Fill(model, 7)
	buf := voltest.Buf(t, size)
	copy(buf, model)
	if err := voltest.Do(c, engine.OpWrite, 0, 0, size, buf); err != nil {
		t.Fatal(err)
	}
	old, _, err := tc.ms.Ring(context.Background())
	if err != nil {
		t.Fatal(err)
	}

	// A node joins. Keep writing and reading while the chunks move.
	tc.addNode(256)
	deadline := time.Now().Add(10 * time.Second)
	for !c.Stats().Moving && c.Stats().Rebalances == 0 {
		if time.Now().After(deadline) {
			t.Fatal("the client did not start a rebalance after the ring changed")
		}
		time.Sleep(20 * time.Millisecond)
	}
	for i := 0; i < 16; i++ {
		off := int64(i) * 7 * testChunk % size
		voltest.Fill(model[off:off+engine.BlockSize], uint64(20+i))
		copy(buf[off:off+engine.BlockSize], model[off:off+engine.BlockSize])
		if err := voltest.Do(c, engine.OpWrite, 0, off, engine.BlockSize, buf[off:off+engine.BlockSize]); err != nil {
			t.Fatalf("write during rebalance: %v", err)
		}
	}
	verify(t, c, model)
	st := waitMoved(t, c, 0)
	cur, _, _ := tc.ms.Ring(context.Background())
	want := cur.Moved(old, 2, sampleChunkKeys(vol.ID, size/testChunk)) * float64(size/testChunk*2)
	t.Logf("node added: %d chunk copies moved, ring predicts %.1f (%+v)", st.MoveCopies, want, st)
	if math.Abs(float64(st.MoveCopies)-want) > 0.5 {
		t.Fatalf("moved %d chunk copies, the ring predicts %.1f for this volume's chunks", st.MoveCopies, want)
	}
	if err := voltest.Do(c, engine.OpFlush, 0, 0, 0, nil); err != nil {
		t.Fatal(err)
	}
	verify(t, c, model)
	checkReplicas(t, tc, vol, 2, model)

	// A node leaves (removed from the ring while still running).
	old = cur
	if _, err := tc.ms.RemoveNode(context.Background(), tc.nodes[0].id); err != nil {
		t.Fatal(err)
	}
	st = waitMoved(t, c, st.Rebalances)
	cur, _, _ = tc.ms.Ring(context.Background())
	want = cur.Moved(old, 2, sampleChunkKeys(vol.ID, size/testChunk)) * float64(size/testChunk*2)
	t.Logf("node removed: %d chunk copies moved, ring predicts %.1f", st.MoveCopies, want)
	if math.Abs(float64(st.MoveCopies)-want) > 0.5 {
		t.Fatalf("moved %d chunk copies, the ring predicts %.1f", st.MoveCopies, want)
	}
	if err := voltest.Do(c, engine.OpFlush, 0, 0, 0, nil); err != nil {
		t.Fatal(err)
	}
	verify(t, c, model)
	checkReplicas(t, tc, vol, 2, model) // node1 (removed) holds nothing any more
	if moves, err := tc.ms.Moves(context.Background(), vol.ID); err != nil || moves != nil {
		t.Fatalf("moves record after the rebalance: %v %v", moves, err)
	}

	// A weight change: node2 doubles its capacity.
	old = cur
	heavy := tc.nodes[1].meta
	heavy.Capacity *= 2
	if _, err := tc.ms.JoinRing(context.Background(), heavy); err != nil {
		t.Fatal(err)
	}
	st = waitMoved(t, c, st.Rebalances)
	cur, _, _ = tc.ms.Ring(context.Background())
	want = cur.Moved(old, 2, sampleChunkKeys(vol.ID, size/testChunk)) * float64(size/testChunk*2)
	t.Logf("node2's weight doubled: %d chunk copies moved, ring predicts %.1f", st.MoveCopies, want)
	if math.Abs(float64(st.MoveCopies)-want) > 0.5 || st.MoveCopies == 0 {
		t.Fatalf("moved %d chunk copies, the ring predicts %.1f", st.MoveCopies, want)
	}
	if err := voltest.Do(c, engine.OpFlush, 0, 0, 0, nil); err != nil {
		t.Fatal(err)
	}
	verify(t, c, model)
	checkReplicas(t, tc, vol, 2, model)
}

// sampleChunkKeys returns the ring keys of chunks 0..n-1 of volume vol.
func sampleChunkKeys(vol uint64, n int) []uint64 {
	keys := make([]uint64, n)
	for i := range keys {
		keys[i] = ring.ChunkKey(vol, uint64(i), 0)
	}
	return keys
}
