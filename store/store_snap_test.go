package store

import (
	"bytes"
	"encoding/binary"
	"path/filepath"
	"testing"

	"github.com/torus-storage/torus/engine"
	"github.com/torus-storage/torus/internal/voltest"
)

// Snapshot copies of a chunk: an AsOf read resolves to the smallest copy at
// or above the snapshot, else the head; ListSnaps lists the copies; a write
// with IfAbsent does not replace an existing chunk; all of it holds after a
// reopen (the index is rebuilt from the headers) and after a copy is freed.
func TestStoreSnapshotCopies(t *testing.T) {
	path := filepath.Join(t.TempDir(), "s")
	const chunk = 64 << 10
	st, err := CreateStore(path, StoreOptions{ChunkSize: chunk, Slots: 64, Shards: 2})
	if err != nil {
		t.Fatal(err)
	}
	buf := voltest.Buf(t, chunk)
	write := func(snap uint64, fill byte, ifAbsent bool) bool {
		t.Helper()
		for i := range buf {
			buf[i] = fill
		}
		op := &ChunkOp{Op: engine.OpWrite, Chunk: ChunkID{Volume: 7, Index: 3, Snap: snap}, Length: chunk, Buf: buf, IfAbsent: ifAbsent}
		if err := storeDo(st, op); err != nil {
			t.Fatal(err)
		}
		return op.Found
	}
	asOf := func(snap uint64) (uint64, byte) {
		t.Helper()
		op := &ChunkOp{Op: engine.OpRead, Chunk: ChunkID{Volume: 7, Index: 3, Snap: snap}, Length: chunk, Buf: buf, AsOf: true}
		if err := storeDo(st, op); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(buf, bytes.Repeat(buf[:1], chunk)) {
			t.Fatalf("as of %d: chunk not uniform", snap)
		}
		return op.From, buf[0]
	}
	list := func() []uint64 {
		t.Helper()
		b := voltest.Buf(t, engine.BlockSize)
		op := &ChunkOp{Op: engine.OpRead, Chunk: ChunkID{Volume: 7, Index: 3, Snap: 99}, Length: engine.BlockSize, Buf: b, ListSnaps: true}
		if err := storeDo(st, op); err != nil {
			t.Fatal(err)
		}
		var l []uint64
		for i := 0; i+8 <= len(b); i += 8 {
			if v := binary.LittleEndian.Uint64(b[i:]); v != 0 {
				l = append(l, v)
			}
		}
		return l
	}
	write(0, 'a', false)
	write(5, 'a', false) // copy taken before the first change under snapshot 5
	write(0, 'b', false)
	write(9, 'b', false)
	write(0, 'c', false)
	if found := write(5, 'x', true); !found {
		t.Fatal("IfAbsent write of an existing copy: Found false")
	}
	check := func(when string) {
		t.Helper()
		for _, c := range []struct {
			snap, from uint64
			want       byte
		}{{1, 5, 'a'}, {5, 5, 'a'}, {6, 9, 'b'}, {9, 9, 'b'}, {10, 0, 'c'}} {
			if from, got := asOf(c.snap); from != c.from || got != c.want {
				t.Fatalf("%s: as of %d: read %q from %d, want %q from %d", when, c.snap, got, from, c.want, c.from)
			}
		}
		if l := list(); len(l) != 2 || l[0] != 5 || l[1] != 9 {
			t.Fatalf("%s: snapshot copies %v, want [5 9]", when, l)
		}
	}
	check("open")
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	if st, err = OpenStore(path, StoreOptions{Shards: 3}); err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	check("reopened")
	if err := storeDo(st, &ChunkOp{Op: engine.OpDiscard, Chunk: ChunkID{Volume: 7, Index: 3, Snap: 5}, Length: chunk}); err != nil {
		t.Fatal(err)
	}
	if from, got := asOf(1); from != 9 || got != 'b' {
		t.Fatalf("copy 5 freed: as of 1: read %q from %d, want 'b' from 9", got, from)
	}
	if l := list(); len(l) != 1 || l[0] != 9 {
		t.Fatalf("copy 5 freed: snapshot copies %v, want [9]", l)
	}
}
