package cluster

import (
	"bytes"
	"context"
	"math/rand/v2"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/torus-storage/torus/engine"
	"github.com/torus-storage/torus/internal/voltest"
	"github.com/torus-storage/torus/meta"
	"github.com/torus-storage/torus/store"
)

// scrubVolume writes a volume of size bytes full of random data through
// the cluster, flushes, and returns it open with its model.
func scrubVolume(t *testing.T, tc *testCluster, name string, size int64, r int) (meta.Volume, *Volume, []byte) {
	t.Helper()
	vol := tc.volume(name, uint64(size), r)
	c := tc.mustOpen(vol, 1)
	t.Cleanup(func() { c.Close() })
	model := make([]byte, size)
	voltest.Fill(model, uint64(size)+uint64(r))
	buf := voltest.Buf(t, int(size))
	copy(buf, model)
	if err := voltest.Do(c, engine.OpWrite, 0, 0, size, buf); err != nil {
		t.Fatal(err)
	}
	if err := voltest.Do(c, engine.OpFlush, 0, 0, 0, nil); err != nil {
		t.Fatal(err)
	}
	return vol, c, model
}

// ownerNodes returns the test nodes owning chunk ch, in ring order (the
// primary first).
func ownerNodes(t *testing.T, tc *testCluster, c *Volume, ch int64) []*testNode {
	t.Helper()
	st := c.state.Load()
	var out []*testNode
	for _, k := range st.r.OwnerIndices(chunkKey(c.vol.ID, ch), c.repl, nil) {
		for _, nd := range tc.nodes {
			if nd.id == st.r.Node(k).ID {
				out = append(out, nd)
			}
		}
	}
	if len(out) != c.repl {
		t.Fatalf("chunk %d has owners %v, want %d", ch, out, c.repl)
	}
	return out
}

// waitMarks waits until the rebuild loop cleared every mark.
func waitMarks(t *testing.T, c *Volume) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for c.Stats().Missed > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("rebuild did not finish: %+v", c.Stats())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestScrubChecksum: garbage written over one replica's data in its store
// file is caught by the node's CRC during a scrub, marked, and rebuilt from
// a good copy: afterwards every copy equals what was written.
func TestScrubChecksum(t *testing.T) {
	tc := startCluster(t, 3, 128)
	const size = 16 * testChunk
	vol, c, model := scrubVolume(t, tc, "scrub-crc", size, 2)

	// Corrupt chunk 3 on its primary (reads would prefer it) and chunk 7
	// on its second owner.
	victims := map[int64]*testNode{3: ownerNodes(t, tc, c, 3)[0], 7: ownerNodes(t, tc, c, 7)[1]}
	for ch, nd := range victims {
		off, ok := nd.st.SlotDataOffset(store.ChunkID{Volume: vol.ID, Index: uint64(ch)})
		if !ok {
			t.Fatalf("%s has no slot for chunk %d", nd.id, ch)
		}
		f, err := os.OpenFile(nd.path, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := f.WriteAt(bytes.Repeat([]byte("garbage!"), 64), off+2*engine.BlockSize+100); err != nil {
			t.Fatal(err)
		}
		if err := f.Sync(); err != nil {
			t.Fatal(err)
		}
		f.Close()
	}
	if _, ok := readCopyErr(t, victims[3], vol.ID, 3); ok {
		t.Fatal("the corrupted copy still reads fine from its store: the test corrupts nothing")
	}

	res, err := c.Scrub(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("scrub: %+v", res)
	if res.Chunks != size/testChunk || res.Checksum != 2 || res.Mismatches != 0 || res.Marked != 2 || res.Repaired != 2 || res.Lost != 0 {
		t.Fatalf("scrub result %+v: want %d chunks, 2 checksum errors, 2 marked and repaired", res, size/testChunk)
	}
	waitMarks(t, c)
	checkReplicas(t, tc, vol, 2, model)
	verify(t, c, model)
	p, err := tc.ms.Progress(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if pr := p[vol.ID]; pr.Kind != meta.ProgressScrub && pr.Kind != meta.ProgressRebuild {
		t.Fatalf("progress record %+v: want the scrub's (or the rebuild it caused)", pr)
	}

	// A second scrub finds nothing.
	res, err = c.Scrub(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if res.Bad() != 0 || res.Marked != 0 {
		t.Fatalf("second scrub: %+v, want nothing bad", res)
	}
	if p, err := tc.ms.Progress(context.Background()); err != nil || p[vol.ID].Kind != meta.ProgressScrub || !p[vol.ID].Finished() {
		t.Fatalf("progress after the second scrub: %+v %v, want a finished scrub", p[vol.ID], err)
	}
}

// readCopyErr reads nd's copy of a chunk from its store and reports whether
// it read without error.
func readCopyErr(t *testing.T, nd *testNode, vol, idx uint64) ([]byte, bool) {
	t.Helper()
	buf := voltest.Buf(t, testChunk)
	w := make(chunkWaiter, 1)
	nd.st.Submit(&store.ChunkOp{Op: engine.OpRead, Chunk: store.ChunkID{Volume: vol, Index: idx}, Length: testChunk, Buf: buf, Done: w})
	return buf, <-w == nil
}

// writeCopy writes data over nd's copy of a chunk through its own store,
// bypassing the cluster: a replica that is silently different (valid CRCs).
func writeCopy(t *testing.T, nd *testNode, vol, idx uint64, seed uint64) {
	t.Helper()
	buf := voltest.Buf(t, testChunk)
	voltest.Fill(buf, seed)
	w := make(chunkWaiter, 1)
	nd.st.Submit(&store.ChunkOp{Op: engine.OpWrite, Flags: engine.FlagFUA, Chunk: store.ChunkID{Volume: vol, Index: idx}, Length: testChunk, Buf: buf, Done: w})
	if err := <-w; err != nil {
		t.Fatalf("%s: write chunk %d: %v", nd.id, idx, err)
	}
}

// TestScrubMismatch: a replica made different behind the cluster's back
// (valid checksums) is found by comparison and repaired: with R=3 the
// majority wins even over the primary; with R=2 the primary wins.
func TestScrubMismatch(t *testing.T) {
	tc := startCluster(t, 3, 256)
	const size = 16 * testChunk
	t.Run("R3", func(t *testing.T) {
		vol, c, model := scrubVolume(t, tc, "scrub-r3", size, 3)
		writeCopy(t, ownerNodes(t, tc, c, 2)[0], vol.ID, 2, 1001) // the primary is the odd one out
		writeCopy(t, ownerNodes(t, tc, c, 9)[2], vol.ID, 9, 1002)
		res, err := c.Scrub(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("scrub: %+v", res)
		if res.Mismatches != 2 || res.Checksum != 0 || res.Marked != 2 || res.Repaired != 2 {
			t.Fatalf("scrub result %+v: want 2 mismatches marked and repaired", res)
		}
		waitMarks(t, c)
		checkReplicas(t, tc, vol, 3, model)
		verify(t, c, model)
	})
	t.Run("R2", func(t *testing.T) {
		vol, c, model := scrubVolume(t, tc, "scrub-r2", size, 2)
		writeCopy(t, ownerNodes(t, tc, c, 5)[1], vol.ID, 5, 2001) // the secondary differs: the primary wins
		res, err := c.Scrub(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("scrub: %+v", res)
		if res.Mismatches != 1 || res.Marked != 1 || res.Repaired != 1 {
			t.Fatalf("scrub result %+v: want 1 mismatch marked and repaired", res)
		}
		waitMarks(t, c)
		checkReplicas(t, tc, vol, 2, model)
	})
}

// TestScrubUnderWrites: a scrub racing random writes to the same chunks
// reports no bad copy (copies that differ only because a write is landing
// are not judged), and afterwards all replicas are identical.
func TestScrubUnderWrites(t *testing.T) {
	tc := startCluster(t, 3, 128)
	const size = 8 * testChunk
	vol, c, model := scrubVolume(t, tc, "scrub-busy", size, 3)
	var mu sync.Mutex
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	var werr error
	wg.Go(func() {
		buf := voltest.Buf(t, 8*engine.BlockSize)
		rng := rand.New(rand.NewPCG(7, 7))
		for i := 0; ctx.Err() == nil; i++ {
			n := int64(1+rng.IntN(8)) * engine.BlockSize
			off := int64(rng.IntN(int(size-n)/engine.BlockSize)) * engine.BlockSize
			voltest.Fill(buf[:n], uint64(i))
			if err := voltest.Do(c, engine.OpWrite, 0, off, n, buf[:n]); err != nil {
				werr = err
				return
			}
			mu.Lock()
			copy(model[off:], buf[:n])
			mu.Unlock()
		}
	})
	var total ScrubResult
	for range 3 {
		res, err := c.Scrub(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		total.Chunks += res.Chunks
		total.Skipped += res.Skipped
		if res.Bad() != 0 {
			cancel()
			wg.Wait()
			t.Fatalf("scrub under writes found bad copies: %+v", res)
		}
	}
	cancel()
	wg.Wait()
	if werr != nil {
		t.Fatal(werr)
	}
	t.Logf("3 scrubs under writes: %d chunks judged, %d skipped (writes racing)", total.Chunks, total.Skipped)
	if total.Chunks == 0 {
		t.Fatal("no chunk was judged at all")
	}
	if err := voltest.Do(c, engine.OpFlush, 0, 0, 0, nil); err != nil {
		t.Fatal(err)
	}
	checkReplicas(t, tc, vol, 3, model)
}
