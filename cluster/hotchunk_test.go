package cluster

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/torus-storage/torus/engine"
	"github.com/torus-storage/torus/internal/voltest"
)

// TestClusterRebuildHotChunk: a chunk that is written without pause (a
// database's log, say) is still rebuilt: the copy holds new writes to the
// chunk back for its duration instead of giving up whenever one is in
// flight, and the writes that waited land on every replica afterwards.
func TestClusterRebuildHotChunk(t *testing.T) {
	tc := startCluster(t, 2, 64)
	const size = 2 * testChunk
	vol := tc.volume("hot", size, 2)
	c := tc.mustOpen(vol, 1)
	defer c.Close()
	model := make([]byte, size)
	voltest.Fill(model, 7)
	buf := voltest.Buf(t, size)
	copy(buf, model)
	if err := voltest.Do(c, engine.OpWrite, 0, 0, size, buf); err != nil {
		t.Fatal(err)
	}

	// One node misses a write to chunk 0, then comes back.
	down := tc.nodes[1]
	down.srv.Close()
	voltest.Fill(model[:testChunk], 8)
	copy(buf, model)
	if err := voltest.Do(c, engine.OpWrite, 0, 0, testChunk, buf[:testChunk]); err != nil {
		t.Fatalf("write with one replica down: %v", err)
	}
	if c.Stats().Missed == 0 {
		t.Fatal("no mark for the node that missed the write")
	}

	// Writers keep chunk 0 busy: each owns some blocks and rewrites them
	// back to back, several in flight at all times.
	const writers = 4
	blocks := testChunk / engine.BlockSize
	var stop atomic.Bool
	var wg sync.WaitGroup
	var writes atomic.Int64
	errs := make(chan error, writers)
	for w := range writers {
		wb := voltest.Buf(t, engine.BlockSize)
		wg.Add(1)
		go func() {
			defer wg.Done()
			for seq := uint64(1); !stop.Load(); seq++ {
				blk := w + int(seq%uint64(blocks/writers))*writers
				voltest.Fill(wb, uint64(w)<<32|seq)
				if err := voltest.Do(c, engine.OpWrite, 0, int64(blk*engine.BlockSize), engine.BlockSize, wb); err != nil {
					errs <- err
					return
				}
				copy(model[blk*engine.BlockSize:], wb) // this writer's blocks only
				writes.Add(1)
			}
		}()
	}
	tc.serve(down, down.addr)
	deadline := time.Now().Add(20 * time.Second)
	for c.Stats().Missed > 0 && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	before := writes.Load()
	time.Sleep(200 * time.Millisecond) // writes go on after the rebuild
	after := writes.Load()
	stop.Store(true)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("write during the rebuild: %v", err)
	}
	if st := c.Stats(); st.Missed > 0 {
		t.Fatalf("the busy chunk was not rebuilt in 20 s under %d writes: %+v", writes.Load(), st)
	}
	if after == before {
		t.Fatal("writes stopped after the rebuild")
	}
	missed, err := tc.ms.Missed(context.Background(), vol.ID)
	if err != nil || len(missed) != 0 {
		t.Fatalf("marks in etcd after the rebuild: %v %v", missed, err)
	}
	t.Logf("%d writes to the chunk during the test; stats %+v", writes.Load(), c.Stats())
	if err := voltest.Do(c, engine.OpFlush, 0, 0, 0, nil); err != nil {
		t.Fatal(err)
	}
	checkReplicas(t, tc, vol, 2, model)
	verify(t, c, model)
}
