package cluster

import (
	"bytes"
	"context"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/torus-storage/torus/engine"
	"github.com/torus-storage/torus/internal/voltest"
	"github.com/torus-storage/torus/ring"
)

func nodeByID(tc *testCluster, id string) *testNode {
	for _, n := range tc.nodes {
		if n.id == id {
			return n
		}
	}
	return nil
}

// TestClusterMoveEndKeepsNewMoveMarks: while a move ends, a write misses an
// owner Y of the ring just reached, and the next ring change starts a new
// move under which Y only owns the chunk as a previous owner. The end of
// the first move must not drop Y's mark: Y would become a copy source and
// a read fallback with data older than the acknowledged write.
func TestClusterMoveEndKeepsNewMoveMarks(t *testing.T) {
	tc := startCluster(t, 3, 256)
	const size = 4 << 20
	vol := tc.volume("v", size, 2)
	model := make([]byte, size)
	voltest.Fill(model, 5)
	buf := voltest.Buf(t, size)
	copy(buf, model)
	c := tc.mustOpen(vol, 1)
	defer c.Close()
	if err := voltest.Do(c, engine.OpWrite, 0, 0, size, buf); err != nil {
		t.Fatal(err)
	}
	if err := voltest.Do(c, engine.OpFlush, 0, 0, 0, nil); err != nil {
		t.Fatal(err)
	}
	r0, _, _ := tc.ms.Ring(context.Background())
	n4 := tc.startNode("node4", 256)
	n5 := tc.startNode("node5", 256)
	r1, _ := r0.Next(append(r0.Nodes(), n4.meta.RingNode()))
	r2, _ := r1.Next(append(r1.Nodes(), n5.meta.RingNode()))
	ch := int64(-1)
	var y, z string
	for idx := int64(0); idx < size/testChunk && ch < 0; idx++ {
		k := ring.ChunkKey(vol.ID, uint64(idx), 0)
		a, b := r1.Owners(k, 2, nil), r2.Owners(k, 2, nil)
		if !slices.Contains(b, "node5") || slices.Contains(a, "node4") {
			continue
		}
		y, z = "", ""
		for _, o := range a {
			if slices.Contains(b, o) {
				z = o
			} else {
				y = o
			}
		}
		if y != "" && z != "" {
			ch = idx
		}
	}
	if ch < 0 {
		t.Fatal("no chunk that leaves a node of the first ring for node5 in the second")
	}
	ny, nz := nodeByID(tc, y), nodeByID(tc, z)
	w := voltest.Buf(t, engine.BlockSize)
	voltest.Fill(w, 99)
	var fired atomic.Bool
	var werr error
	hook := func() bool {
		if fired.Swap(true) {
			return false
		}
		ny.srv.Close() // a write misses y
		werr = voltest.Do(c, engine.OpWrite, 0, ch*testChunk, engine.BlockSize, w)
		tc.serve(ny, ny.addr)
		if _, err := tc.ms.JoinRing(context.Background(), n5.meta); err != nil {
			t.Error(err)
		}
		for c.state.Load().r.Version() != r2.Version() {
			time.Sleep(10 * time.Millisecond)
		}
		nz.srv.Close() // the one complete copy is away
		return false
	}
	c.testMoveSwitched.Store(&hook)
	if _, err := tc.ms.JoinRing(context.Background(), n4.meta); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the end of the first move", fired.Load)
	if werr != nil {
		t.Fatalf("write with one owner down: %v", werr)
	}
	deadline := time.Now().Add(90 * time.Second)
	for c.Stats().Rebalances == 0 { // the end of the first move runs its course
		if time.Now().After(deadline) {
			t.Fatalf("the end of the first move did not finish: %+v", c.Stats())
		}
		time.Sleep(50 * time.Millisecond)
	}
	if !c.marks.has(y, ch) {
		t.Fatalf("the mark of %s for chunk %d was dropped by the end of the previous move", y, ch)
	}
	got := voltest.Buf(t, engine.BlockSize)
	if err := voltest.Do(c, engine.OpRead, 0, ch*testChunk, engine.BlockSize, got); err == nil && !bytes.Equal(got, w) {
		t.Fatalf("stale read: chunk %d returns bytes older than an acknowledged write", ch)
	}
}

// TestClusterMoveEndStopped: the holder stops at the end of a move, right
// after it took the previous rings out of its placement; the next holder
// finds every byte.
func TestClusterMoveEndStopped(t *testing.T) {
	tc := startCluster(t, 3, 256)
	const size = 4 << 20
	vol := tc.volume("s", size, 1)
	model := make([]byte, size)
	voltest.Fill(model, 6)
	buf := voltest.Buf(t, size)
	copy(buf, model)
	c := tc.mustOpen(vol, 1)
	if err := voltest.Do(c, engine.OpWrite, 0, 0, size, buf); err != nil {
		t.Fatal(err)
	}
	if err := voltest.Do(c, engine.OpFlush, 0, 0, 0, nil); err != nil {
		t.Fatal(err)
	}
	var fired atomic.Bool
	stop := func() bool {
		fired.Store(true)
		c.Fence(nil)
		return true
	}
	c.testMoveSwitched.Store(&stop)
	tc.addNode(256)
	waitFor(t, "the end of the move", fired.Load)
	c.Close()
	tc.addNode(256) // another ring change before the next holder
	c2 := tc.mustOpen(vol, 2)
	defer c2.Close()
	verify(t, c2, model)
	waitMoved(t, c2, 0)
	verify(t, c2, model)
}

// TestClusterDropsMarksOfNodesInNoRing: a mark of a node that owns the chunk
// under no ring of the placement (left behind by a flush that failed on a
// removed node just as the move ended) is dropped by the repair loop, not
// kept for good: nothing can rebuild it and it keeps the volume degraded.
func TestClusterDropsMarksOfNodesInNoRing(t *testing.T) {
	tc := startCluster(t, 2, 256)
	vol := tc.volume("v", 4<<20, 2)
	ctx := context.Background()
	if err := tc.ms.MarkMissed(ctx, vol.ID, "gone", 2); err != nil {
		t.Fatal(err)
	}
	c := tc.mustOpen(vol, 1)
	defer c.Close()
	deadline := time.Now().Add(10 * time.Second)
	for {
		m, err := tc.ms.Missed(ctx, vol.ID)
		if err != nil {
			t.Fatal(err)
		}
		if len(m) == 0 && c.Stats().Missed == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("marks of a node in no ring kept: etcd %v, in memory %d", m, c.Stats().Missed)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
