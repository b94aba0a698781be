package cluster

import (
	"bytes"
	"context"
	"errors"
	"testing"
	"time"

	"github.com/torus-storage/torus/engine"
	"github.com/torus-storage/torus/internal/voltest"
	"github.com/torus-storage/torus/meta"
	"github.com/torus-storage/torus/store"
)

// fillPattern fills b, the bytes at volume offset off, with pattern p: each
// 4 KiB block names its offset and the pattern.
func fillPattern(b []byte, off int64, p byte) {
	for i := 0; i < len(b); i += engine.BlockSize {
		blk := b[i : i+engine.BlockSize]
		for j := range blk {
			blk[j] = p
		}
		o := off + int64(i)
		for j := 0; j < 8; j++ {
			blk[j] = byte(o >> (8 * j))
		}
	}
}

// snapView opens a read-only view of vol as of snapshot name.
func (tc *testCluster) snapView(t *testing.T, volume, name string) *Volume {
	t.Helper()
	ctx := context.Background()
	v, err := tc.ms.Volume(ctx, volume)
	if err != nil {
		t.Fatal(err)
	}
	s, ok := v.Snapshot(name)
	if !ok {
		t.Fatalf("no snapshot %s@%s in %+v", volume, name, v.Snapshots)
	}
	c, err := Open(ctx, tc.ms, v, Options{TLS: tc.client.Client, Timeout: time.Second, Logger: quietLog, Snapshot: s.ID})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// expect reads the whole of v and checks block by block that it holds
// pattern want(off) (0: zeros).
func expect(t *testing.T, what string, v engine.Volume, want func(off int64) byte) {
	t.Helper()
	size := v.Size()
	got := voltest.Buf(t, int(size))
	if err := voltest.Do(v, engine.OpRead, 0, 0, size, got); err != nil {
		t.Fatalf("%s: read: %v", what, err)
	}
	blk := voltest.Buf(t, engine.BlockSize)
	for off := int64(0); off < size; off += engine.BlockSize {
		p := want(off)
		if p == 0 {
			clear(blk)
		} else {
			fillPattern(blk, off, p)
		}
		if !bytes.Equal(got[off:off+engine.BlockSize], blk) {
			t.Fatalf("%s: block at %d: got %q..., want pattern %q", what, off, got[off+8:off+12], p)
		}
	}
}

// Pattern A, snapshot, pattern B: the snapshot reads A, the volume B; a
// second snapshot after B and pattern C keep B and C apart; a discarded
// chunk reads as zeros in the volume and as before in the snapshots; the
// snapshots are unchanged by a write of the volume after the holder
// closed and another attached, and by a snapshot of the detached volume.
func TestSnapshotPatterns(t *testing.T) {
	tc := startCluster(t, 3, 64)
	ctx := context.Background()
	const size = 8 * testChunk
	tc.volume("vol", size, 2)
	ao := AttachOptions{Options: Options{TLS: tc.client.Client, Timeout: time.Second, Logger: quietLog, Holder: "t"}}
	a, err := Attach(ctx, tc.ms, "vol", ao)
	if err != nil {
		t.Fatal(err)
	}
	buf := voltest.Buf(t, size)
	write := func(v engine.Volume, off, n int64, p byte) {
		t.Helper()
		fillPattern(buf[:n], off, p)
		if err := voltest.Do(v, engine.OpWrite, 0, off, n, buf[:n]); err != nil {
			t.Fatalf("write %q at %d: %v", p, off, err)
		}
	}
	write(a, 0, size-2*testChunk, 'A') // the last two chunks never written
	snap := func(name string) {
		t.Helper()
		if _, err := tc.ms.TakeSnapshots(ctx, "", []meta.SnapshotRequest{{Volume: "vol", Name: name}}, 5*time.Second); err != nil {
			t.Fatalf("snapshot %s: %v", name, err)
		}
	}
	snap("s1")
	if got := a.Volume.SnapSeq(); got != 1 {
		t.Fatalf("holder's snapshot number after s1: %d", got)
	}
	// B over the first half, a chunk discarded, a chunk first written.
	write(a, 0, 4*testChunk, 'B')
	if err := voltest.Do(a, engine.OpDiscard, 0, 5*testChunk, testChunk, nil); err != nil {
		t.Fatal(err)
	}
	write(a, 6*testChunk, testChunk, 'B')
	afterB := func(off int64) byte {
		switch {
		case off < 4*testChunk, off >= 6*testChunk && off < 7*testChunk:
			return 'B'
		case off >= 5*testChunk:
			return 0
		}
		return 'A'
	}
	s1 := func(off int64) byte {
		if off < size-2*testChunk {
			return 'A'
		}
		return 0
	}
	expect(t, "volume after B", a, afterB)
	expect(t, "s1 after B", tc.snapView(t, "vol", "s1"), s1)
	snap("s2")
	write(a, 2*testChunk, 4*testChunk, 'C')
	afterC := func(off int64) byte {
		if off >= 2*testChunk && off < 6*testChunk {
			return 'C'
		}
		return afterB(off)
	}
	expect(t, "volume after C", a, afterC)
	expect(t, "s1 after C", tc.snapView(t, "vol", "s1"), s1)
	expect(t, "s2 after C", tc.snapView(t, "vol", "s2"), afterB)
	if st := a.Volume.Stats(); st.SnapshotCopies == 0 {
		t.Errorf("no chunk head copied: %+v", st)
	}
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}

	// Detached: a snapshot needs no holder; a new holder writes under it.
	snap("s3")
	b, err := Attach(ctx, tc.ms, "vol", ao)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if got := b.Volume.SnapSeq(); got != 3 {
		t.Fatalf("new holder's snapshot number: %d, want 3", got)
	}
	write(b, 0, size, 'D')
	expect(t, "volume after D", b, func(int64) byte { return 'D' })
	expect(t, "s1 after D", tc.snapView(t, "vol", "s1"), s1)
	expect(t, "s2 after D", tc.snapView(t, "vol", "s2"), afterB)
	expect(t, "s3 after D", tc.snapView(t, "vol", "s3"), afterC)

	// A view is read-only; a snapshot name is unique.
	if err := voltest.Do(tc.snapView(t, "vol", "s1"), engine.OpWrite, 0, 0, engine.BlockSize, buf[:engine.BlockSize]); !errors.Is(err, engine.ErrReadOnly) {
		t.Fatalf("write to a snapshot view: %v", err)
	}
	if _, err := tc.ms.TakeSnapshots(ctx, "", []meta.SnapshotRequest{{Volume: "vol", Name: "s1"}}, time.Second); !errors.Is(err, meta.ErrExists) {
		t.Fatalf("second snapshot s1: %v", err)
	}
}

// Rollback: a detached volume reads as its snapshot again, rewriting only
// the chunks that differ; later snapshots keep what they hold; an attached
// volume is refused.
func TestSnapshotRollback(t *testing.T) {
	tc := startCluster(t, 3, 64)
	ctx := context.Background()
	const size = 6 * testChunk
	tc.volume("vol", size, 2)
	ao := AttachOptions{Options: Options{TLS: tc.client.Client, Timeout: time.Second, Logger: quietLog, Holder: "t"}}
	a, err := Attach(ctx, tc.ms, "vol", ao)
	if err != nil {
		t.Fatal(err)
	}
	buf := voltest.Buf(t, size)
	write := func(off, n int64, p byte) {
		t.Helper()
		fillPattern(buf[:n], off, p)
		if err := voltest.Do(a, engine.OpWrite, 0, off, n, buf[:n]); err != nil {
			t.Fatal(err)
		}
	}
	write(0, 4*testChunk, 'A')
	if _, err := tc.ms.TakeSnapshots(ctx, "", []meta.SnapshotRequest{{Volume: "vol", Name: "a"}}, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	write(testChunk, testChunk, 'B')
	write(5*testChunk, testChunk, 'B')
	if err := voltest.Do(a, engine.OpDiscard, 0, 3*testChunk, testChunk, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := tc.ms.TakeSnapshots(ctx, "", []meta.SnapshotRequest{{Volume: "vol", Name: "b"}}, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	if _, err := Rollback(ctx, tc.ms, "vol", "a", ao); !errors.Is(err, meta.ErrAttached) {
		t.Fatalf("rollback of an attached volume: %v", err)
	}
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	res, err := Rollback(ctx, tc.ms, "vol", "a", ao)
	if err != nil {
		t.Fatal(err)
	}
	if res.Chunks != 6 || res.Changed != 3 {
		t.Errorf("rollback: %+v, want 6 chunks compared and 3 rewritten", res)
	}
	a, err = Attach(ctx, tc.ms, "vol", ao)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	snapA := func(off int64) byte {
		if off < 4*testChunk {
			return 'A'
		}
		return 0
	}
	expect(t, "volume after rollback", a, snapA)
	expect(t, "a after rollback", tc.snapView(t, "vol", "a"), snapA)
	expect(t, "b after rollback", tc.snapView(t, "vol", "b"), func(off int64) byte {
		switch {
		case off >= testChunk && off < 2*testChunk, off >= 5*testChunk:
			return 'B'
		case off >= 3*testChunk:
			return 0
		}
		return 'A'
	})
}

// A group snapshot of two volumes held by two clients is one instant: one
// writer numbers its writes across both volumes, each acknowledged before
// the next starts, and the two snapshots hold exactly the writes up to
// some number.
func TestSnapshotGroupInstant(t *testing.T) {
	tc := startCluster(t, 3, 64)
	ctx := context.Background()
	const blocks = 16
	vols := [2]*Attached{}
	for i, name := range []string{"wal", "data"} {
		tc.volume(name, blocks*engine.BlockSize, 2)
		a, err := Attach(ctx, tc.ms, name, AttachOptions{Options: Options{TLS: tc.client.Client, Timeout: time.Second, Logger: quietLog, Holder: name}})
		if err != nil {
			t.Fatal(err)
		}
		defer a.Close()
		vols[i] = a
	}
	// The second holder sees the request late: the first must hold its
	// writes until both paused.
	late := 100 * time.Millisecond
	vols[1].Volume.testSnapDelay.Store(&late)
	stop := make(chan struct{})
	done := make(chan error, 1)
	var hist [][2]int // write n: volume, block
	go func() {
		b := make([]byte, engine.BlockSize)
		for n := 1; ; n++ {
			select {
			case <-stop:
				done <- nil
				return
			default:
			}
			v, blk := n%2, (n/2)%blocks
			for j := 0; j < len(b); j += 8 {
				b[j], b[j+1], b[j+2], b[j+3] = byte(n), byte(n>>8), byte(n>>16), byte(n>>24)
			}
			if err := voltest.Do(vols[v], engine.OpWrite, 0, int64(blk)*engine.BlockSize, engine.BlockSize, b); err != nil {
				done <- err
				return
			}
			hist = append(hist, [2]int{v, blk})
		}
	}()
	time.Sleep(300 * time.Millisecond)
	if _, err := tc.ms.TakeSnapshots(ctx, "g", []meta.SnapshotRequest{{Volume: "wal", Name: "g1"}, {Volume: "data", Name: "g1"}}, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond)
	close(stop)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	// What each snapshot holds: the write number in each block.
	var held [2][blocks]int
	maxN := 0
	for i, name := range []string{"wal", "data"} {
		v := tc.snapView(t, name, "g1")
		b := voltest.Buf(t, blocks*engine.BlockSize)
		if err := voltest.Do(v, engine.OpRead, 0, 0, int64(len(b)), b); err != nil {
			t.Fatal(err)
		}
		for blk := range blocks {
			p := b[blk*engine.BlockSize:]
			held[i][blk] = int(p[0]) | int(p[1])<<8 | int(p[2])<<16 | int(p[3])<<24
			maxN = max(maxN, held[i][blk])
		}
	}
	if maxN == 0 || maxN >= len(hist) {
		t.Fatalf("snapshot holds writes up to %d of %d: not taken during the writes", maxN, len(hist))
	}
	// The prefix up to maxN, replayed, must be what the snapshots hold.
	var want [2][blocks]int
	for n := 1; n <= maxN; n++ {
		w := hist[n-1]
		want[w[0]][w[1]] = n
	}
	if held != want {
		t.Fatalf("the group snapshot is not one instant:\nheld %v\nwant %v (writes 1..%d)", held, want, maxN)
	}
	t.Logf("group snapshot holds writes 1..%d of %d", maxN, len(hist))
}

// A discard or write-zeroes of a chunk never written, after a snapshot,
// makes no snapshot copy (an fstrim would otherwise take a slot per
// chunk); a write after it does, and the snapshot still reads zeros there.
func TestSnapshotDiscardAbsentNoCopy(t *testing.T) {
	tc := startCluster(t, 3, 64)
	ctx := context.Background()
	const size = 8 * testChunk
	tc.volume("vol", size, 2)
	a, err := Attach(ctx, tc.ms, "vol", AttachOptions{Options: Options{TLS: tc.client.Client, Timeout: time.Second, Logger: quietLog, Holder: "t"}})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	buf := voltest.Buf(t, testChunk)
	fillPattern(buf, 0, 'A')
	if err := voltest.Do(a, engine.OpWrite, 0, 0, testChunk, buf); err != nil {
		t.Fatal(err)
	}
	if _, err := tc.ms.TakeSnapshots(ctx, "", []meta.SnapshotRequest{{Volume: "vol", Name: "s"}}, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	if err := voltest.Do(a, engine.OpDiscard, 0, testChunk, size-testChunk, nil); err != nil {
		t.Fatal(err)
	}
	if err := voltest.Do(a, engine.OpWriteZeroes, 0, 2*testChunk, testChunk, nil); err != nil {
		t.Fatal(err)
	}
	copies := 0
	for _, nd := range tc.nodes {
		ids, err := nd.st.Chunks()
		if err != nil {
			t.Fatal(err)
		}
		for _, id := range ids {
			if id.Snap != 0 {
				copies++
			}
		}
	}
	if copies != 0 {
		t.Fatalf("%d snapshot copies after discards of chunks never written", copies)
	}
	fillPattern(buf, 3*testChunk, 'B')
	if err := voltest.Do(a, engine.OpWrite, 0, 3*testChunk, testChunk, buf); err != nil {
		t.Fatal(err)
	}
	expect(t, "snapshot", tc.snapView(t, "vol", "s"), func(off int64) byte {
		if off < testChunk {
			return 'A'
		}
		return 0
	})
}

// Scrub judges snapshot copies too: a copy lost on one replica (discarded
// in its store) and one overwritten with other bytes are found, marked and
// rebuilt, after which every replica reads the snapshot right.
func TestScrubSnapshotCopies(t *testing.T) {
	tc := startCluster(t, 3, 64)
	ctx := context.Background()
	const size = 4 * testChunk
	vol := tc.volume("vol", size, 2)
	a, err := Attach(ctx, tc.ms, "vol", AttachOptions{Options: Options{TLS: tc.client.Client, Timeout: time.Second, Logger: quietLog, Holder: "t"}})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	buf := voltest.Buf(t, size)
	fillPattern(buf, 0, 'A')
	if err := voltest.Do(a, engine.OpWrite, 0, 0, size, buf); err != nil {
		t.Fatal(err)
	}
	if _, err := tc.ms.TakeSnapshots(ctx, "", []meta.SnapshotRequest{{Volume: "vol", Name: "s"}}, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	fillPattern(buf, 0, 'B')
	if err := voltest.Do(a, engine.OpWrite, 0, 0, size, buf); err != nil {
		t.Fatal(err)
	}
	// Chunk 1's copy gone on its second owner, chunk 2's copy garbled on
	// its primary.
	lost := ownerNodes(t, tc, a.Volume, 1)[1]
	w := make(chunkWaiter, 1)
	lost.st.Submit(&store.ChunkOp{Op: engine.OpDiscard, Chunk: store.ChunkID{Volume: vol.ID, Index: 1, Snap: 1}, Length: testChunk, Done: w})
	if err := <-w; err != nil {
		t.Fatal(err)
	}
	garbled := ownerNodes(t, tc, a.Volume, 2)[0]
	junk := voltest.Buf(t, testChunk)
	voltest.Fill(junk, 99)
	garbled.st.Submit(&store.ChunkOp{Op: engine.OpWrite, Flags: engine.FlagFUA | engine.FlagCopy, Chunk: store.ChunkID{Volume: vol.ID, Index: 2, Snap: 1},
		Length: testChunk, Buf: junk, Done: w})
	if err := <-w; err != nil {
		t.Fatal(err)
	}
	res, err := a.Volume.Scrub(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if res.Marked != 2 || res.Repaired != 2 {
		t.Fatalf("scrub: %+v, want 2 copies marked and repaired", res)
	}
	// Each replica alone reads the snapshot right: stop the other owner.
	for _, ch := range []int64{1, 2} {
		for _, nd := range ownerNodes(t, tc, a.Volume, ch) {
			w := make(chunkWaiter, 1)
			got := voltest.Buf(t, testChunk)
			op := &store.ChunkOp{Op: engine.OpRead, Chunk: store.ChunkID{Volume: vol.ID, Index: uint64(ch), Snap: 1}, Length: testChunk,
				Buf: got, AsOf: true, Done: w}
			nd.st.Submit(op)
			if err := <-w; err != nil {
				t.Fatal(err)
			}
			want := voltest.Buf(t, testChunk)
			fillPattern(want, ch*testChunk, 'A')
			if !bytes.Equal(got, want) {
				t.Fatalf("chunk %d as of the snapshot on %s after the scrub: %q...", ch, nd.id, got[8:12])
			}
		}
	}
}
