package store

import (
	"errors"
	"path/filepath"
	"testing"

	"github.com/torus-storage/torus/engine"
	"github.com/torus-storage/torus/internal/voltest"
)

// verOp runs one op on st for chunk id with version v and returns the
// version the store left in the op (a read's chunk version, a refused
// copy's).
func verOp(t *testing.T, st *Store, op engine.Op, flags engine.Flags, id ChunkID, buf []byte, v Version) (Version, error) {
	t.Helper()
	done := make(chunkWaiter, 1)
	o := &ChunkOp{Op: op, Flags: flags, Chunk: id, Length: int64(len(buf)), Buf: buf, Ver: v, Done: done}
	if op == engine.OpDiscard {
		o.Length, o.Buf = st.ChunkSize(), nil
	}
	st.Submit(o)
	err := <-done
	return o.Ver, err
}

// TestStoreChunkVersion: the store keeps the newest version a chunk was
// given, across a clean reopen; a copy takes its version exactly and is
// refused (data untouched) when older than the chunk's; a chunk without a
// slot, and after an unclean shutdown every chunk the log listed, has no
// version; a slot taken again after a free starts from the freed version.
func TestStoreChunkVersion(t *testing.T) {
	path := filepath.Join(t.TempDir(), "store")
	const chunk = 64 << 10
	opt := StoreOptions{ChunkSize: chunk, Slots: 8, ClusterID: []byte("test"), Shards: 1, Logger: quietLog}
	st, err := CreateStore(path, opt)
	if err != nil {
		t.Fatal(err)
	}
	id := ChunkID{Volume: 1, Index: 2}
	blk, whole, got := voltest.Buf(t, engine.BlockSize), voltest.Buf(t, chunk), voltest.Buf(t, chunk)
	voltest.Fill(blk, 1)
	voltest.Fill(whole, 2)
	mustVer := func(what string, want Version) {
		t.Helper()
		v, err := verOp(t, st, engine.OpRead, 0, id, got, Version{Epoch: 77, Seq: 77})
		if err != nil {
			t.Fatalf("%s: read: %v", what, err)
		}
		if v != want {
			t.Fatalf("%s: chunk version %v, want %v", what, v, want)
		}
	}
	must := func(_ Version, err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	mustVer("no slot", Version{})
	must(verOp(t, st, engine.OpWrite, 0, id, blk, Version{Epoch: 2, Seq: 5}))
	mustVer("first write", Version{Epoch: 2, Seq: 5})
	must(verOp(t, st, engine.OpWrite, 0, id, blk, Version{Epoch: 2, Seq: 3}))
	mustVer("an older write arriving late", Version{Epoch: 2, Seq: 5})

	v, err := verOp(t, st, engine.OpWrite, engine.FlagCopy|engine.FlagFUA, id, whole, Version{Epoch: 1, Seq: 9})
	if !errors.Is(err, engine.ErrNewer) || v != (Version{Epoch: 2, Seq: 5}) {
		t.Fatalf("older copy: err %v, version %v; want ErrNewer and 2.5", err, v)
	}
	if _, err := verOp(t, st, engine.OpRead, 0, id, got, Version{}); err != nil || got[0] != blk[0] || got[engine.BlockSize] != 0 {
		t.Fatalf("the refused copy changed the chunk (err %v)", err)
	}
	must(verOp(t, st, engine.OpWrite, engine.FlagCopy|engine.FlagFUA, id, whole, Version{Epoch: 3, Seq: 1}))
	mustVer("newer copy", Version{Epoch: 3, Seq: 1})
	must(verOp(t, st, engine.OpWrite, engine.FlagCopy|engine.FlagFUA, id, whole, Version{}))
	mustVer("copy with no version", Version{})
	must(verOp(t, st, engine.OpWrite, 0, id, blk, Version{Epoch: 3, Seq: 2}))

	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	if st, err = OpenStore(path, opt); err != nil {
		t.Fatal(err)
	}
	mustVer("clean reopen", Version{Epoch: 3, Seq: 2})

	// An overwrite leaves the header dirty; after a crash the version on
	// disk may be behind or ahead of the data: unknown.
	must(verOp(t, st, engine.OpWrite, 0, id, blk, Version{Epoch: 4, Seq: 1}))
	st.simulateCrash()
	if st, err = OpenStore(path, opt); err != nil {
		t.Fatal(err)
	}
	mustVer("after an unclean shutdown", Version{})
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	if st, err = OpenStore(path, opt); err != nil {
		t.Fatal(err)
	}
	mustVer("reopen after recovery", Version{})

	must(verOp(t, st, engine.OpWrite, 0, id, blk, Version{Epoch: 4, Seq: 2}))
	must(verOp(t, st, engine.OpDiscard, 0, id, nil, Version{Epoch: 4, Seq: 3}))
	mustVer("freed by a discard", Version{})
	must(verOp(t, st, engine.OpWrite, 0, id, blk, Version{Epoch: 4, Seq: 4}))
	mustVer("slot taken again", Version{Epoch: 4, Seq: 4})
	// A write older than the discard that freed the slot, arriving late,
	// takes a new slot at the discard's version, not its own.
	must(verOp(t, st, engine.OpDiscard, 0, id, nil, Version{Epoch: 4, Seq: 6}))
	must(verOp(t, st, engine.OpWrite, 0, id, blk, Version{Epoch: 4, Seq: 5}))
	mustVer("late write after a free", Version{Epoch: 4, Seq: 6})
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
}
