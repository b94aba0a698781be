package store

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/torus-storage/torus/engine"
	"github.com/torus-storage/torus/internal/alignbuf"
	"github.com/torus-storage/torus/internal/voltest"
)

// syncSnaps records the store file as it was when each fdatasync was
// prepared: after a power loss, what the latest completed one covered is
// on disk for sure, anything written since may or may not be.
type syncSnaps struct {
	mu    sync.Mutex
	path  string
	snaps []syncSnap
	err   error
}

type syncSnap struct {
	epoch uint64
	img   []byte
}

func watchSyncs(st *Store, path string) *syncSnaps {
	w := &syncSnaps{path: path}
	st.syncHook = func(ep uint64) {
		img, err := os.ReadFile(path)
		w.mu.Lock()
		defer w.mu.Unlock()
		if err != nil && w.err == nil {
			w.err = err
		}
		w.snaps = append(w.snaps, syncSnap{ep, img})
	}
	return w
}

// durable returns the image the latest fdatasync completed by synced
// covered.
func (w *syncSnaps) durable(t *testing.T, synced uint64) []byte {
	t.Helper()
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.err != nil {
		t.Fatal(w.err)
	}
	var img []byte
	for _, s := range w.snaps {
		if s.epoch <= synced {
			img = s.img
		}
	}
	if img == nil {
		t.Fatal("no fdatasync completed")
	}
	return img
}

// region is a byte range of the store file.
type region struct {
	name    string
	off, ln int64
}

// powerLossImages opens, after an unclean shutdown, every image a power loss
// at the crash could leave: each listed region holds either its durable or
// its current bytes (4 KiB writes are atomic, so a region is one unit per
// write that touched it), everything else its current bytes (the activity
// log is written with RWF_DSYNC). check gets each opened volume.
func powerLossImages(t *testing.T, durable, current []byte, regions []region, size int64, opt LocalOptions,
	check func(l *Local, combo string) error) {
	t.Helper()
	dir := t.TempDir()
	for mask := 0; mask < 1<<len(regions); mask++ {
		img := append([]byte(nil), current...)
		combo := ""
		for i, r := range regions {
			which := "new"
			if mask&(1<<i) == 0 {
				copy(img[r.off:r.off+r.ln], durable[r.off:r.off+r.ln])
				which = "old"
			}
			combo += fmt.Sprintf(" %s=%s", r.name, which)
		}
		path := filepath.Join(dir, fmt.Sprintf("img%d.store", mask))
		if err := os.WriteFile(path, img, 0o600); err != nil {
			t.Fatal(err)
		}
		l, err := OpenLocal(path, size, opt)
		if err != nil {
			t.Errorf("power loss with%s: open: %v", combo, err)
			continue
		}
		if err := check(l, combo); err != nil {
			t.Errorf("power loss with%s: %v", combo, err)
		}
		if err := l.Close(); err != nil {
			t.Errorf("power loss with%s: close: %v", combo, err)
		}
	}
}

// checkFreedReuse reads every chunk: each block must be zeros or a block
// stamped for its own offset (never another chunk's data, never an error),
// and a slot free on disk must hold only zeros, so that whoever gets it
// next cannot inherit its data.
func checkFreedReuse(l *Local, size int64) error {
	st := l.Store()
	b, err := alignbuf.Alloc(int(st.chunk))
	if err != nil {
		return err
	}
	defer alignbuf.Free(b)
	for off := int64(0); off < size; off += st.chunk {
		if err := voltest.Do(l, engine.OpRead, 0, off, st.chunk, b); err != nil {
			return fmt.Errorf("read chunk at %d: %w", off, err)
		}
		if err := checkBlocks(b, off); err != nil {
			return err
		}
	}
	f, err := os.Open(st.path)
	if err != nil {
		return err
	}
	defer f.Close()
	raw := make([]byte, st.chunk)
	for i := range st.slots {
		if st.slots[i].used {
			continue
		}
		if _, err := f.ReadAt(raw, st.dataOff(int32(i))); err != nil {
			return err
		}
		if !bytes.Equal(raw, make([]byte, len(raw))) {
			return fmt.Errorf("slot %d is free but its data region is not zeros", i)
		}
	}
	return nil
}

// A chunk discarded whole frees its slot, and the next new chunk takes that
// slot. A power loss right after the reuse must leave neither chunk reading
// the other's data, nor an error, nor a store that does not open: the old
// owner reads its old data or zeros, the new one its new data or zeros.
func TestStoreFreedSlotReuseCrash(t *testing.T) {
	const chunk = MinChunkSize
	const size = 4 * chunk
	opt := LocalOptions{Shards: 1, ChunkSize: chunk}
	slotOf := func(st *Store, c int64) int32 {
		off, ok := st.SlotDataOffset(ChunkID{Index: uint64(c)})
		if !ok {
			return -1
		}
		return int32((off - int64(st.sb.dataOff)) / st.chunk)
	}
	write := func(t *testing.T, l *Local, c int64, seed uint64) {
		t.Helper()
		b := voltest.Buf(t, chunk)
		stampBlocks(b, c*chunk, seed)
		if err := voltest.Do(l, engine.OpWrite, 0, c*chunk, chunk, b); err != nil {
			t.Fatal(err)
		}
	}
	run := func(t *testing.T, l *Local, w *syncSnaps, path string, slots ...int32) {
		t.Helper()
		st := l.Store()
		st.simulateCrash()
		current, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		durable := w.durable(t, st.synced.Load())
		var regions []region
		for _, s := range slots {
			regions = append(regions,
				region{fmt.Sprintf("header%d", s), st.hdrOff(s), engine.BlockSize},
				region{fmt.Sprintf("data%d", s), st.dataOff(s), chunk})
		}
		powerLossImages(t, durable, current, regions, size, opt, func(l *Local, _ string) error {
			return checkFreedReuse(l, size)
		})
	}

	// Chunk 0 is written and flushed, then discarded whole; chunk 1 takes
	// its slot.
	t.Run("other chunk takes the slot", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "v.store")
		l := openTest(t, path, size, opt)
		w := watchSyncs(l.Store(), path)
		write(t, l, 0, 1)
		if err := voltest.Do(l, engine.OpFlush, 0, 0, 0, nil); err != nil {
			t.Fatal(err)
		}
		s := slotOf(l.Store(), 0)
		if err := voltest.Do(l, engine.OpDiscard, 0, 0, chunk, nil); err != nil {
			t.Fatal(err)
		}
		write(t, l, 1, 2)
		if got := slotOf(l.Store(), 1); got != s {
			t.Fatalf("chunk 1 got slot %d, want the freed slot %d", got, s)
		}
		run(t, l, w, path, s)
	})

	// Chunks 0 and 1 are written and flushed, both discarded whole, then
	// chunk 0 is written again and takes chunk 1's old slot.
	t.Run("discarded chunk takes another slot", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "v.store")
		l := openTest(t, path, size, opt)
		w := watchSyncs(l.Store(), path)
		write(t, l, 0, 1)
		write(t, l, 1, 2)
		if err := voltest.Do(l, engine.OpFlush, 0, 0, 0, nil); err != nil {
			t.Fatal(err)
		}
		s0, s1 := slotOf(l.Store(), 0), slotOf(l.Store(), 1)
		for c := int64(0); c < 2; c++ {
			if err := voltest.Do(l, engine.OpDiscard, 0, c*chunk, chunk, nil); err != nil {
				t.Fatal(err)
			}
		}
		write(t, l, 0, 3)
		if got := slotOf(l.Store(), 0); got != s1 {
			t.Fatalf("chunk 0 got slot %d, want chunk 1's freed slot %d", got, s1)
		}
		run(t, l, w, path, s0, s1)
	})
}

// Recovery reads whole chunks: it must work with the largest chunk size.
func TestStoreRecoveryMaxChunk(t *testing.T) {
	path := filepath.Join(t.TempDir(), "v.store")
	const size = 2 * MaxChunkSize
	opt := LocalOptions{Shards: 1, ChunkSize: MaxChunkSize}
	l := openTest(t, path, size, opt)
	b := voltest.Buf(t, MaxChunkSize)
	stampBlocks(b, MaxChunkSize, 1)
	if err := voltest.Do(l, engine.OpWrite, 0, MaxChunkSize, MaxChunkSize, b); err != nil {
		t.Fatal(err)
	}
	l.Store().simulateCrash()
	l = openTest(t, path, size, opt)
	defer l.Close()
	if got := l.Store().Stats().RecoveryChecked; got != 1 {
		t.Fatalf("recovery checked %d slots, want 1", got)
	}
	r := voltest.Buf(t, MaxChunkSize)
	if err := voltest.Do(l, engine.OpRead, 0, MaxChunkSize, MaxChunkSize, r); err != nil || !bytes.Equal(r, b) {
		t.Fatalf("read after recovery: %v (equal %v)", err, bytes.Equal(r, b))
	}
}
