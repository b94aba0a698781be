package cluster

import (
	"context"
	"testing"
	"time"

	"github.com/torus-storage/torus/engine"
	"github.com/torus-storage/torus/internal/voltest"
	"github.com/torus-storage/torus/ring"
)

// TestClusterRingChangeDetached: the ring changes while no client holds the
// volume (a node joins, then one is removed). The placement change is
// recorded with the ring, so the next client finds every chunk where it
// lives, reads the data written before, and moves the chunks to their new
// owners.
func TestClusterRingChangeDetached(t *testing.T) {
	tc := startCluster(t, 3, 256)
	const size = 4 << 20 // 64 chunks
	vol := tc.volume("detached", size, 2)
	model := make([]byte, size)
	voltest.Fill(model, 11)
	buf := voltest.Buf(t, size)
	copy(buf, model)
	c := tc.mustOpen(vol, 1)
	if err := voltest.Do(c, engine.OpWrite, 0, 0, size, buf); err != nil {
		t.Fatal(err)
	}
	if err := voltest.Do(c, engine.OpFlush, 0, 0, 0, nil); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}

	// A node joins with no client attached.
	tc.addNode(256)
	c = tc.mustOpen(vol, 2)
	verify(t, c, model)
	st := waitMoved(t, c, 0)
	if st.MoveCopies == 0 {
		t.Fatalf("no chunk moved to the new node: %+v", st)
	}
	if err := voltest.Do(c, engine.OpFlush, 0, 0, 0, nil); err != nil {
		t.Fatal(err)
	}
	checkReplicas(t, tc, vol, 2, model)
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}

	// A node is removed (it keeps running) with no client attached.
	if _, err := tc.ms.RemoveNode(context.Background(), tc.nodes[0].id); err != nil {
		t.Fatal(err)
	}
	c = tc.mustOpen(vol, 3)
	defer c.Close()
	verify(t, c, model)
	waitMoved(t, c, 0)
	if err := voltest.Do(c, engine.OpFlush, 0, 0, 0, nil); err != nil {
		t.Fatal(err)
	}
	verify(t, c, model)
	checkReplicas(t, tc, vol, 2, model)
}

// TestClusterMoveStaleSource: at R=1 a chunk moves to a new node while its
// old owner is down. A write to that chunk must not be acknowledged unless a
// complete copy holds it, and when the old owner comes back its stale bytes
// never overwrite a newer acknowledged write.
func TestClusterMoveStaleSource(t *testing.T) {
	tc := startCluster(t, 3, 256)
	const size = 4 << 20
	vol := tc.volume("stale", size, 1)
	c := tc.mustOpen(vol, 1)
	defer c.Close()
	model := make([]byte, size)
	voltest.Fill(model, 12)
	buf := voltest.Buf(t, size)
	copy(buf, model)
	if err := voltest.Do(c, engine.OpWrite, 0, 0, size, buf); err != nil {
		t.Fatal(err)
	}
	if err := voltest.Do(c, engine.OpFlush, 0, 0, 0, nil); err != nil {
		t.Fatal(err)
	}

	// Predict the ring after node4 joins, and pick a chunk that moves to it.
	cur, _, err := tc.ms.Ring(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	nd := tc.startNode("node4", 256)
	next, err := cur.Next(append(cur.Nodes(), nd.meta.RingNode()))
	if err != nil {
		t.Fatal(err)
	}
	chunk, oldOwner := int64(-1), ""
	for idx := int64(0); idx < size/testChunk; idx++ {
		key := ring.ChunkKey(vol.ID, uint64(idx), 0)
		if o := next.Owners(key, 1, nil)[0]; o == "node4" {
			chunk, oldOwner = idx, cur.Owners(key, 1, nil)[0]
			break
		}
	}
	if chunk < 0 {
		t.Fatal("no chunk moves to node4")
	}
	var old *testNode
	for _, n := range tc.nodes {
		if n.id == oldOwner {
			old = n
		}
	}
	old.srv.Close()
	if _, err := tc.ms.JoinRing(context.Background(), nd.meta); err != nil {
		t.Fatal(err)
	}
	// Wait until the client moves and knows node4's address.
	deadline := time.Now().Add(10 * time.Second)
	for {
		known := false
		st := c.state.Load()
		for i, p := range st.peers {
			if st.r.Node(i).ID == "node4" && p != nil {
				known = true
			}
		}
		if c.Stats().Moving && known {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the client did not start a rebalance to node4 after the ring changed")
		}
		time.Sleep(20 * time.Millisecond)
	}
	off := chunk * testChunk
	w := voltest.Buf(t, engine.BlockSize)
	voltest.Fill(w, 99)
	werr := voltest.Do(c, engine.OpWrite, 0, off, engine.BlockSize, w)
	if werr == nil {
		copy(model[off:], w)
		t.Logf("write to chunk %d acknowledged with its old owner %s down", chunk, oldOwner)
	} else {
		t.Logf("write to chunk %d refused with its old owner %s down: %v", chunk, oldOwner, werr)
	}
	if err := voltest.Do(c, engine.OpFlush, 0, 0, 0, nil); err != nil {
		t.Logf("flush: %v", err)
	}
	tc.serve(old, old.addr)
	waitMoved(t, c, 0)
	verify(t, c, model)
}
