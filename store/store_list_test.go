package store

import (
	"errors"
	"path/filepath"
	"slices"
	"sync"
	"testing"

	"github.com/torus-storage/torus/engine"
	"github.com/torus-storage/torus/internal/voltest"
)

// listWaiter completes a ChunkOp into a channel.
type listWaiter chan error

func (w listWaiter) CompleteChunk(_ *ChunkOp, err error) { w <- err }

// chunkDo runs one op on a store and waits for it.
func chunkDo(st *Store, o engine.Op, id ChunkID, off, length int64, buf []byte) error {
	w := make(listWaiter, 1)
	op := &ChunkOp{Op: o, Chunk: id, Off: off, Length: length, Buf: buf, Done: w}
	st.Submit(op)
	return <-w
}

func TestStoreChunks(t *testing.T) {
	path := filepath.Join(t.TempDir(), "s")
	opt := StoreOptions{ChunkSize: 64 << 10, Slots: 64, Shards: 3}
	st, err := CreateStore(path, opt)
	if err != nil {
		t.Fatal(err)
	}
	if ids, err := st.Chunks(); err != nil || len(ids) != 0 {
		t.Fatalf("Chunks of a new store = %v, %v", ids, err)
	}
	b := voltest.Buf(t, engine.BlockSize)
	var want []ChunkID
	for v := uint64(3); v >= 1; v-- {
		for i := uint64(0); i < 5; i++ {
			id := ChunkID{Volume: v, Index: i * 7}
			if err := chunkDo(st, engine.OpWrite, id, engine.BlockSize, engine.BlockSize, b); err != nil {
				t.Fatal(err)
			}
			want = append(want, id)
		}
	}
	snap := ChunkID{Volume: 2, Index: 0, Snap: 1}
	if err := chunkDo(st, engine.OpWrite, snap, 0, engine.BlockSize, b); err != nil {
		t.Fatal(err)
	}
	want = append(want, snap)
	sortIDs := func(ids []ChunkID) {
		slices.SortFunc(ids, func(a, b ChunkID) int {
			switch {
			case a.Volume != b.Volume:
				return int(a.Volume) - int(b.Volume)
			case a.Snap != b.Snap:
				return int(a.Snap) - int(b.Snap)
			}
			return int(a.Index) - int(b.Index)
		})
	}
	sortIDs(want)
	got, err := st.Chunks()
	if err != nil || !slices.Equal(got, want) {
		t.Fatalf("Chunks = %v, %v\nwant %v (sorted by volume, snap, index)", got, err, want)
	}

	// A whole-chunk discard frees the slot: the chunk leaves the list. A
	// partial one does not.
	if err := chunkDo(st, engine.OpDiscard, ChunkID{Volume: 2, Index: 7}, 0, 64<<10, nil); err != nil {
		t.Fatal(err)
	}
	if err := chunkDo(st, engine.OpDiscard, ChunkID{Volume: 2, Index: 14}, 0, engine.BlockSize, nil); err != nil {
		t.Fatal(err)
	}
	want = slices.DeleteFunc(want, func(id ChunkID) bool { return id == ChunkID{Volume: 2, Index: 7} })
	if got, err := st.Chunks(); err != nil || !slices.Equal(got, want) {
		t.Fatalf("Chunks after discards = %v, %v\nwant %v", got, err, want)
	}
	if got := st.Stats().UsedSlots; got != int64(len(want)) {
		t.Fatalf("UsedSlots = %d, want %d", got, len(want))
	}

	// Reopen: the list comes from the headers on disk.
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := st.Chunks(); !errors.Is(err, engine.ErrClosed) {
		t.Fatalf("Chunks after Close: %v, want ErrClosed", err)
	}
	st, err = OpenStore(path, opt)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	if got, err := st.Chunks(); err != nil || !slices.Equal(got, want) {
		t.Fatalf("Chunks after reopen = %v, %v\nwant %v", got, err, want)
	}
}

// TestStoreChunksConcurrent lists while writers and freeing discards run:
// every chunk whose write completed before the call and that nobody frees
// is listed, and Close waits for a listing instead of stranding it (run with
// -race).
func TestStoreChunksConcurrent(t *testing.T) {
	st, err := CreateStore(filepath.Join(t.TempDir(), "s"), StoreOptions{ChunkSize: 64 << 10, Slots: 256, Shards: 2})
	if err != nil {
		t.Fatal(err)
	}
	b := voltest.Buf(t, engine.BlockSize)
	stable := make(map[ChunkID]bool)
	for i := range uint64(50) {
		id := ChunkID{Volume: 1, Index: i}
		if err := chunkDo(st, engine.OpWrite, id, 0, engine.BlockSize, b); err != nil {
			t.Fatal(err)
		}
		stable[id] = true
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Go(func() {
			buf := voltest.Buf(t, engine.BlockSize)
			for i := uint64(0); ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				id := ChunkID{Volume: 2 + uint64(w), Index: i % 20}
				if err := chunkDo(st, engine.OpWrite, id, 0, engine.BlockSize, buf); err != nil {
					t.Error(err)
					return
				}
				if err := chunkDo(st, engine.OpDiscard, id, 0, 64<<10, nil); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	for range 50 {
		ids, err := st.Chunks()
		if err != nil {
			t.Fatal(err)
		}
		seen := 0
		for _, id := range ids {
			if stable[id] {
				seen++
			} else if id.Volume < 2 || id.Volume > 5 {
				t.Fatalf("Chunks listed %v, never written", id)
			}
		}
		if seen != len(stable) {
			t.Fatalf("Chunks listed %d of the %d stable chunks", seen, len(stable))
		}
	}
	close(stop)
	wg.Wait()
	// Listing and closing at once: either the listing completes or it
	// reports engine.ErrClosed; neither hangs.
	done := make(chan error, 1)
	go func() { _, err := st.Chunks(); done <- err }()
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil && !errors.Is(err, engine.ErrClosed) {
		t.Fatalf("Chunks racing Close: %v", err)
	}
}

// BenchmarkStoreChunks lists a store holding 4096 chunks (the time each
// shard stops serving I/O is about this divided by the shard count).
func BenchmarkStoreChunks(b *testing.B) {
	st, err := CreateStore(filepath.Join(b.TempDir(), "s"), StoreOptions{ChunkSize: 64 << 10, Slots: 4096, Shards: 2})
	if err != nil {
		b.Fatal(err)
	}
	defer st.Close()
	buf := voltest.Buf(b, engine.BlockSize)
	for i := range uint64(4096) {
		if err := chunkDo(st, engine.OpWrite, ChunkID{Volume: 1 + i%7, Index: i}, 0, engine.BlockSize, buf); err != nil {
			b.Fatal(err)
		}
	}
	b.ResetTimer()
	for b.Loop() {
		ids, err := st.Chunks()
		if err != nil || len(ids) != 4096 {
			b.Fatalf("Chunks: %d, %v", len(ids), err)
		}
	}
}
