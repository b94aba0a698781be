package cluster

import (
	"context"
	"testing"
	"time"

	"github.com/torus-storage/torus/engine"
	"github.com/torus-storage/torus/internal/voltest"
	"github.com/torus-storage/torus/meta"
)

// A clone of a snapshot reads the snapshot; writes to it (partial chunks,
// discards) leave the parent and its snapshot unchanged and survive a
// re-attach; a snapshot of the clone keeps what it read through to the
// parent; flatten copies the rest and drops the parent, after which the
// parent's snapshot can be deleted and the clone still reads the same.
func TestClone(t *testing.T) {
	tc := startCluster(t, 3, 96)
	ctx := context.Background()
	const size = 6 * testChunk
	tc.volume("vol", size, 2)
	ao := func(h string) AttachOptions {
		return AttachOptions{Options: Options{TLS: tc.client.Client, Timeout: time.Second, Logger: quietLog, Holder: h}}
	}
	a, err := Attach(ctx, tc.ms, "vol", ao("parent"))
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
	write(a, 0, 5*testChunk, 'A') // the last chunk never written
	if _, err := tc.ms.TakeSnapshots(ctx, "", []meta.SnapshotRequest{{Volume: "vol", Name: "gold"}}, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	write(a, 0, 2*testChunk, 'B')
	gold := func(off int64) byte {
		if off < 5*testChunk {
			return 'A'
		}
		return 0
	}
	if _, err := tc.ms.CloneVolume(ctx, meta.SnapshotRequest{Volume: "vol", Name: "gold"}, "c"); err != nil {
		t.Fatal(err)
	}
	c, err := Attach(ctx, tc.ms, "c", ao("clone"))
	if err != nil {
		t.Fatal(err)
	}
	expect(t, "clone before any write", c, gold)
	// One block in the middle of chunk 1, a whole chunk 3, a discard of
	// chunk 4, a write into the never-written chunk 5.
	write(c, testChunk+8*engine.BlockSize, engine.BlockSize, 'C')
	write(c, 3*testChunk, testChunk, 'C')
	if err := voltest.Do(c, engine.OpDiscard, 0, 4*testChunk, testChunk, nil); err != nil {
		t.Fatal(err)
	}
	write(c, 5*testChunk, engine.BlockSize, 'C')
	afterC := func(off int64) byte {
		switch {
		case off == testChunk+8*engine.BlockSize, off >= 3*testChunk && off < 4*testChunk, off == 5*testChunk:
			return 'C'
		case off >= 4*testChunk:
			return 0
		}
		return 'A'
	}
	expect(t, "clone after C", c, afterC)
	expect(t, "parent after the clone's writes", a, func(off int64) byte {
		if off < 2*testChunk {
			return 'B'
		}
		return gold(off)
	})
	gv := tc.snapView(t, "vol", "gold")
	expect(t, "parent's snapshot after the clone's writes", gv, gold)
	gv.Close()
	if st := c.Volume.Stats(); st.CloneCopies == 0 {
		t.Errorf("no chunk copied from the parent: %+v", st)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	// Re-attached: what the clone holds is found again; a snapshot of it
	// keeps the chunks it reads from the parent.
	c, err = Attach(ctx, tc.ms, "c", ao("clone2"))
	if err != nil {
		t.Fatal(err)
	}
	expect(t, "clone re-attached", c, afterC)
	if _, err := tc.ms.TakeSnapshots(ctx, "", []meta.SnapshotRequest{{Volume: "c", Name: "cs"}}, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	write(c, 0, testChunk, 'D')
	write(c, testChunk, engine.BlockSize, 'D')
	afterD := func(off int64) byte {
		if off < testChunk || off == testChunk {
			return 'D'
		}
		return afterC(off)
	}
	expect(t, "clone after D", c, afterD)
	cv := tc.snapView(t, "c", "cs")
	expect(t, "clone's snapshot", cv, afterC)
	cv.Close()

	// Flatten, by the attached client.
	if _, err := tc.ms.FlattenVolume(ctx, "c"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the clone flattened", func() bool {
		v, err := tc.ms.Volume(ctx, "c")
		return err == nil && v.Parent == nil
	})
	expect(t, "clone flattened", c, afterD)
	if err := tc.ms.DeleteSnapshot(ctx, "vol", "gold"); err != nil {
		t.Fatalf("delete of the parent snapshot after flatten: %v", err)
	}
	expect(t, "clone after its parent's snapshot was deleted", c, afterD)
	expect(t, "clone's snapshot after flatten", tc.snapView(t, "c", "cs"), afterC)
	c.Close()
	a.Close()
}
