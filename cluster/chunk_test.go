package cluster

import (
	"bytes"
	"context"
	"testing"

	"github.com/torus-storage/torus/engine"
	"github.com/torus-storage/torus/internal/voltest"
	"github.com/torus-storage/torus/netquic"
	"github.com/torus-storage/torus/store"
)

// TestClusterLargestChunk: a cluster with the largest chunk size meta.Init
// accepts works end to end: whole-chunk writes and reads go through the
// transport to every replica (no owner is marked down), and after a node
// missed writes the rebuild copies whole chunks to it (a read of a whole
// chunk from a replica, a whole-chunk FUA write to the node) until every
// copy is identical.
func TestClusterLargestChunk(t *testing.T) {
	const chunk = store.MaxChunkSize
	tc := startClusterChunk(t, 3, 8, netquic.TransportQUIC, chunk)
	const size = 4 * chunk
	vol := tc.volume("largest", size, 3)
	// The default per-call timeout, not the tests' 1 s: a call here moves
	// 2 MiB, and twelve of them run at once.
	c, err := Open(context.Background(), tc.ms, vol, Options{TLS: tc.client.Client, Epoch: 1, Logger: quietLog})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	model := make([]byte, size)
	voltest.Fill(model, 21)
	buf := voltest.Buf(t, size)
	copy(buf, model)
	// One request of four whole chunks.
	if err := voltest.Do(c, engine.OpWrite, 0, 0, size, buf); err != nil {
		t.Fatalf("write of whole %d-byte chunks: %v", chunk, err)
	}
	if err := voltest.Do(c, engine.OpFlush, 0, 0, 0, nil); err != nil {
		t.Fatal(err)
	}
	if st := c.Stats(); st.NodeFailures != 0 || st.Missed != 0 {
		t.Fatalf("after a healthy write: %+v, want no failed node and no mark", st)
	}
	verify(t, c, model)
	got := voltest.Buf(t, chunk)
	for ch := int64(0); ch < size/chunk; ch++ {
		if err := voltest.Do(c, engine.OpRead, 0, ch*chunk, chunk, got); err != nil {
			t.Fatalf("read of whole chunk %d: %v", ch, err)
		}
		if !bytes.Equal(got, model[ch*chunk:(ch+1)*chunk]) {
			t.Fatalf("whole chunk %d differs", ch)
		}
	}

	// A node misses whole-chunk overwrites of chunks 1 and 3, then is back:
	// the rebuild copies those two chunks whole.
	down := tc.nodes[1]
	down.srv.Close()
	for _, ch := range []int64{1, 3} {
		off := ch * chunk
		voltest.Fill(model[off:off+chunk], uint64(30+ch))
		copy(buf[off:off+chunk], model[off:off+chunk])
		if err := voltest.Do(c, engine.OpWrite, 0, off, chunk, buf[off:off+chunk]); err != nil {
			t.Fatalf("degraded write of chunk %d: %v", ch, err)
		}
	}
	tc.serve(down, down.addr)
	waitFor(t, "the rebuild", func() bool { return c.Stats().Missed == 0 })
	st := c.Stats()
	if st.Rebuilt != 2 || st.RebuiltBytes != 2*chunk {
		t.Fatalf("rebuild: %+v, want 2 whole-chunk copies of %d bytes", st, chunk)
	}
	t.Logf("stats: %+v", st)
	if err := voltest.Do(c, engine.OpFlush, 0, 0, 0, nil); err != nil {
		t.Fatal(err)
	}
	w := make(chunkWaiter, 1)
	for _, nd := range tc.nodes {
		for ch := int64(0); ch < size/chunk; ch++ {
			nd.st.Submit(&store.ChunkOp{Op: engine.OpRead, Chunk: store.ChunkID{Volume: vol.ID, Index: uint64(ch)}, Length: chunk, Buf: got, Done: w})
			if err := <-w; err != nil {
				t.Fatalf("%s: chunk %d: %v", nd.id, ch, err)
			}
			if !bytes.Equal(got, model[ch*chunk:(ch+1)*chunk]) {
				t.Fatalf("%s: copy of chunk %d differs", nd.id, ch)
			}
		}
	}
	verify(t, c, model)
	if missed, err := tc.ms.Missed(context.Background(), vol.ID); err != nil || len(missed) != 0 {
		t.Fatalf("marks in etcd after the rebuild: %v %v", missed, err)
	}
}
