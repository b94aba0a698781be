package store

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/torus-storage/torus/engine"
	"github.com/torus-storage/torus/internal/alignbuf"
	"github.com/torus-storage/torus/internal/voltest"
	"github.com/torus-storage/torus/iouring"
)

// simulateCrash stops the store as kill -9 would: no final sync, no clean
// flag, dirty headers left unwritten.
// chunkWaiter is a ChunkCompleter that sends each op's result on the channel.
type chunkWaiter chan error

func (w chunkWaiter) CompleteChunk(_ *ChunkOp, err error) { w <- err }

// quietLog logs warnings and errors only.
var quietLog = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))

func (s *Store) simulateCrash() {
	s.skipClean.Store(true)
	s.closed.Store(true)
	s.stopShards()
	s.f.Close()
}

// The activity log scopes recovery: a damaged block in a slot with writes in
// flight at the crash reads back as what is on disk, a damaged block in a
// slot that was quiet still fails with engine.ErrChecksum.
func TestStoreActivityLogRecovery(t *testing.T) {
	path := filepath.Join(t.TempDir(), "v.store")
	opt := LocalOptions{Shards: 1}
	l := openTest(t, path, 8<<20, opt)
	b := voltest.Buf(t, 64<<10)
	voltest.Fill(b, 1)
	for c := int64(0); c < 4; c++ {
		if err := voltest.Do(l, engine.OpWrite, 0, c<<20, 64<<10, b); err != nil {
			t.Fatal(err)
		}
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	l = openTest(t, path, 8<<20, opt)
	voltest.Fill(b, 2)
	if err := voltest.Do(l, engine.OpWrite, 0, 0, 64<<10, b); err != nil {
		t.Fatal(err)
	}
	off0, _ := l.Store().SlotDataOffset(ChunkID{Index: 0})
	off1, _ := l.Store().SlotDataOffset(ChunkID{Index: 1})
	l.Store().simulateCrash()

	// Tear a block of chunk 0 (hot) and rot a block of chunk 1 (quiet).
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	torn := bytes.Repeat([]byte{0xab}, 512)
	f.WriteAt(torn, off0+4096)
	f.WriteAt([]byte{0xcd}, off1+100)
	f.Close()

	l = openTest(t, path, 8<<20, opt)
	defer l.Close()
	st := l.Store().Stats()
	// The 16 blocks rewritten before the crash had their CRCs only in RAM
	// (dirty header), one of them is also torn: all 16 are rechecksummed.
	if st.RecoveryChecked != 1 || st.RecoveryFixed != 16 {
		t.Fatalf("recovery checked %d slots and fixed %d blocks, want 1 and 16", st.RecoveryChecked, st.RecoveryFixed)
	}
	r := voltest.Buf(t, 64<<10)
	if err := voltest.Do(l, engine.OpRead, 0, 0, 64<<10, r); err != nil {
		t.Fatalf("read of a block torn by the crash: %v", err)
	}
	want := append([]byte(nil), b...)
	copy(want[4096:], torn)
	if !bytes.Equal(r, want) {
		t.Fatal("torn block does not read as the data on disk")
	}
	if err := voltest.Do(l, engine.OpRead, 0, 1<<20, 64<<10, r); !errors.Is(err, engine.ErrChecksum) {
		t.Fatalf("read of a rotted block in a quiet slot: %v, want ErrChecksum", err)
	}
}

func TestStoreClosed(t *testing.T) {
	l := openTest(t, filepath.Join(t.TempDir(), "v.store"), 4<<20, LocalOptions{})
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if err := voltest.Do(l, engine.OpRead, 0, 0, 4096, voltest.Buf(t, 4096)); !errors.Is(err, engine.ErrClosed) {
		t.Fatalf("read after close: %v", err)
	}
}

// A working set larger than the activity log: the shard writes dirty headers
// of idle slots, evicts them after an fdatasync and keeps going. After a crash
// with dirty headers left, recovery checks at most one log's worth of slots
// and every flushed write reads back.
func TestStoreActivityLogEviction(t *testing.T) {
	path := filepath.Join(t.TempDir(), "v.store")
	const chunks = alShardMax + 300
	const size = chunks * MinChunkSize
	opt := LocalOptions{Shards: 1, ChunkSize: MinChunkSize}
	l := openTest(t, path, size, opt)
	// Round 0 allocates every chunk (header writes); rounds 1 and 2
	// overwrite the same blocks in another order (data writes only, dirty
	// headers), cycling the whole working set through the log.
	const rounds = 3
	parallel(t, chunks, func(i int, b []byte) error {
		c := int64(i)
		stampBlocks(b, c*MinChunkSize, 0)
		return voltest.Do(l, engine.OpWrite, 0, c*MinChunkSize, engine.BlockSize, b)
	})
	for r := uint64(1); r < rounds; r++ {
		parallel(t, chunks, func(i int, b []byte) error {
			c := int64(i*7919) % chunks
			stampBlocks(b, c*MinChunkSize, r)
			return voltest.Do(l, engine.OpWrite, 0, c*MinChunkSize, engine.BlockSize, b)
		})
	}
	if err := voltest.Do(l, engine.OpFlush, 0, 0, 0, nil); err != nil {
		t.Fatal(err)
	}
	st := l.Store()
	st.simulateCrash()
	dirty := 0
	for i := range st.slots {
		if st.slots[i].dirty {
			dirty++
		}
	}
	if dirty == 0 || dirty > alShardMax {
		t.Fatalf("%d dirty headers at the crash, want 1..%d", dirty, alShardMax)
	}
	l = openTest(t, path, size, opt)
	defer l.Close()
	if got := l.Store().Stats().RecoveryChecked; got == 0 || got > alShardMax {
		t.Fatalf("recovery checked %d slots, want 1..%d", got, alShardMax)
	}
	b, want := voltest.Buf(t, engine.BlockSize), voltest.Buf(t, engine.BlockSize)
	for c := int64(0); c < chunks; c++ {
		stampBlocks(want, c*MinChunkSize, rounds-1)
		if err := voltest.Do(l, engine.OpRead, 0, c*MinChunkSize, engine.BlockSize, b); err != nil || !bytes.Equal(b, want) {
			t.Fatalf("chunk %d after crash: %v (data equal %v)", c, err, bytes.Equal(b, want))
		}
	}
}

// parallel runs f(i, buf) for i in [0, n) on 32 goroutines, each with its own
// 4 KiB aligned buffer, and fails t on the first error.
func parallel(t *testing.T, n int, f func(i int, b []byte) error) {
	t.Helper()
	var next atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, 32)
	for g := 0; g < 32; g++ {
		b := voltest.Buf(t, engine.BlockSize)
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= n {
					return
				}
				if err := f(i, b); err != nil {
					errs <- fmt.Errorf("item %d: %w", i, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	if err := <-errs; err != nil {
		t.Fatal(err)
	}
}

// A FUA write may skip its header only once the written bits it relies on
// are durable; until then it writes the header with RWF_DSYNC.
func TestStoreFUAHeaderDurability(t *testing.T) {
	path := filepath.Join(t.TempDir(), "v.store")
	opt := LocalOptions{Shards: 1}
	l := openTest(t, path, 4<<20, opt)
	b := voltest.Buf(t, engine.BlockSize)
	m := func() *slotMeta {
		off, ok := l.Store().SlotDataOffset(ChunkID{})
		if !ok {
			t.Fatal("chunk 0 has no slot")
		}
		return &l.Store().slots[(off-int64(l.Store().sb.dataOff))/l.Store().chunk]
	}
	write := func(flags engine.Flags, seed uint64) {
		t.Helper()
		stampBlocks(b, 8192, seed)
		if err := voltest.Do(l, engine.OpWrite, flags, 8192, engine.BlockSize, b); err != nil {
			t.Fatal(err)
		}
	}
	// The slot's first header write is durable (RWF_DSYNC): take the slot
	// with a write to another block first.
	stampBlocks(b, 0, 9)
	if err := voltest.Do(l, engine.OpWrite, 0, 0, engine.BlockSize, b); err != nil {
		t.Fatal(err)
	}
	write(0, 1) // sets the bit: header written, not yet durable
	if m().dirty {
		t.Fatal("a write that sets a written bit left the header dirty")
	}
	write(0, 2)
	if !m().dirty {
		t.Fatal("an overwrite wrote the header")
	}
	write(engine.FlagFUA, 3)
	if m().dirty {
		t.Fatal("a FUA write relied on a written bit that was not durable yet")
	}
	if err := voltest.Do(l, engine.OpFlush, 0, 0, 0, nil); err != nil {
		t.Fatal(err)
	}
	write(0, 4)
	if err := voltest.Do(l, engine.OpFlush, 0, 0, 0, nil); err != nil {
		t.Fatal(err)
	}
	write(engine.FlagFUA, 5)
	if !m().dirty {
		t.Fatal("a FUA overwrite of a durable block wrote the header")
	}
	l.Store().simulateCrash()
	l = openTest(t, path, 4<<20, opt)
	defer l.Close()
	want := voltest.Buf(t, engine.BlockSize)
	stampBlocks(want, 8192, 5)
	if err := voltest.Do(l, engine.OpRead, 0, 8192, engine.BlockSize, b); err != nil || !bytes.Equal(b, want) {
		t.Fatalf("FUA write after crash: %v (equal %v)", err, bytes.Equal(b, want))
	}
}

// stampBlocks fills b (for volume offset off) with self-describing blocks.
func stampBlocks(b []byte, off int64, seed uint64) {
	for i := 0; i < len(b); i += engine.BlockSize {
		blk := b[i : i+engine.BlockSize]
		voltest.Fill(blk[16:], seed+uint64(i))
		binary.LittleEndian.PutUint64(blk, uint64(off)+uint64(i))
		binary.LittleEndian.PutUint64(blk[8:], seed+uint64(i))
	}
}

// checkBlocks reports a block of b that is neither zeros nor a block
// stamped for its own offset.
func checkBlocks(b []byte, off int64) error {
	tmp := make([]byte, engine.BlockSize-16)
	for i := 0; i < len(b); i += engine.BlockSize {
		blk := b[i : i+engine.BlockSize]
		if bytes.Equal(blk, make([]byte, engine.BlockSize)) {
			continue
		}
		at := binary.LittleEndian.Uint64(blk)
		voltest.Fill(tmp, binary.LittleEndian.Uint64(blk[8:]))
		if at != uint64(off)+uint64(i) || !bytes.Equal(tmp, blk[16:]) {
			return fmt.Errorf("block at %d holds data stamped for %d", off+int64(i), at)
		}
	}
	return nil
}

// A random mix of reads, writes, discards and write-zeroes on a few chunks
// never fails and never shows a block from elsewhere.
func TestStoreMixedStress(t *testing.T) {
	const size = 1 << 20
	l := openTest(t, filepath.Join(t.TempDir(), "v.store"), size, LocalOptions{ChunkSize: MinChunkSize})
	defer l.Close()
	var wg sync.WaitGroup
	for g := 0; g < 32; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(g), 5))
			b, _ := alignbuf.Alloc(64 << 10)
			defer alignbuf.Free(b)
			for i := 0; i < 300; i++ {
				n := int64(1+r.IntN(8)) * engine.BlockSize
				off := int64(r.IntN(int((size-n)/engine.BlockSize)+1)) * engine.BlockSize
				var err error
				switch k := r.IntN(10); {
				case k < 3:
					stampBlocks(b[:n], off, r.Uint64())
					err = voltest.Do(l, engine.OpWrite, engine.Flags(r.IntN(2)), off, n, b[:n])
				case k < 6:
					if err = voltest.Do(l, engine.OpRead, 0, off, n, b[:n]); err == nil {
						err = checkBlocks(b[:n], off)
					}
				case k < 8:
					err = voltest.Do(l, engine.OpDiscard, 0, off, n, nil)
				default:
					err = voltest.Do(l, engine.OpWriteZeroes, engine.Flags(r.IntN(4)), off, n, nil)
				}
				if err != nil {
					t.Error(err)
					return
				}
			}
		}(g)
	}
	wg.Wait()
	all := voltest.Buf(t, size)
	if err := voltest.Do(l, engine.OpRead, 0, 0, size, all); err != nil {
		t.Fatal(err)
	}
	if err := checkBlocks(all, 0); err != nil {
		t.Fatal(err)
	}
}

// storeDo runs one chunk op on s and waits for it.
func storeDo(s *Store, op *ChunkOp) error {
	w := make(chunkWaiter, 1)
	op.Done = w
	s.Submit(op)
	return <-w
}

// The fdatasync that makes an evicted slot durable and the activity-log
// write that drops it are one IOSQE_IO_LINK chain. With the SQ one entry
// short of full when the log write is prepared, the chain must still reach
// the kernel whole: both entries are handed out before anything is
// submitted, so neither is consumed while the other is still missing (a
// linked SQE submitted as the last of its batch would run unlinked).
func TestStoreEvictionChainAtSQEdge(t *testing.T) {
	path := filepath.Join(t.TempDir(), "s.store")
	st, err := CreateStore(path, StoreOptions{ChunkSize: MinChunkSize, Slots: alShardMax + 1, Shards: 1})
	if err != nil {
		t.Fatal(err)
	}
	// Fill the shard's log with clean, idle slots.
	parallel(t, alShardMax, func(i int, b []byte) error {
		stampBlocks(b, int64(i)*MinChunkSize, 0)
		return storeDo(st, &ChunkOp{Op: engine.OpWrite, Chunk: ChunkID{Index: uint64(i)}, Length: engine.BlockSize, Buf: b})
	})
	b := voltest.Buf(t, engine.BlockSize)
	stampBlocks(b, alShardMax*MinChunkSize, 0)
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		errc <- func() error {
			r, err := iouring.New(8, 0)
			if err != nil {
				return err
			}
			defer r.Close()
			d, err := st.DriveShards(r, 0)
			if err != nil {
				return err
			}
			// The shard's wake poll is pending; leave one free entry.
			nops := 0
			for r.SQSpace() > 1 {
				r.SQE().PrepNop()
				nops++
			}
			done := make(chunkWaiter, 1)
			d.SubmitChunk(&ChunkOp{Op: engine.OpWrite, Chunk: ChunkID{Index: alShardMax}, Length: engine.BlockSize, Buf: b, Done: done})
			// The new slot must evict one: fdatasync + log write. Nothing
			// else may be prepared before the log write completes.
			if p := r.Pending(); p != 2 {
				return fmt.Errorf("after preparing the evicting log write, %d SQEs are unconsumed, want 2 (the linked fdatasync and the log write, not yet submitted)", p)
			}
			cqes := make([]iouring.CQE, 16)
			for len(done) == 0 {
				if _, err := r.SubmitAndWait(1); err != nil {
					return err
				}
				n := r.PeekCQEs(cqes)
				for i := 0; i < n; i++ {
					if d.Owns(cqes[i].UserData) {
						d.Handle(&cqes[i])
					} else {
						nops--
					}
				}
			}
			if err := <-done; err != nil {
				return err
			}
			for nops > 0 {
				n, err := r.WaitCQEs(cqes, 1)
				if err != nil {
					return err
				}
				for i := 0; i < n; i++ {
					if !d.Owns(cqes[i].UserData) {
						nops--
					}
				}
			}
			return d.Release()
		}()
	}()
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	r := voltest.Buf(t, engine.BlockSize)
	if err := storeDo(st, &ChunkOp{Op: engine.OpRead, Chunk: ChunkID{Index: alShardMax}, Length: engine.BlockSize, Buf: r}); err != nil || !bytes.Equal(r, b) {
		t.Fatalf("read back: %v (equal %v)", err, bytes.Equal(r, b))
	}
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
}

// OnRecover names, after an unclean shutdown, every chunk written since the
// last fdatasync (its replicas elsewhere are then known as missed), before
// the activity log that lists them is cleared: an open that fails in the
// callback finds them again.
func TestStoreOnRecover(t *testing.T) {
	path := filepath.Join(t.TempDir(), "v.store")
	opt := LocalOptions{Shards: 1}
	l := openTest(t, path, 8<<20, opt)
	b := voltest.Buf(t, engine.BlockSize)
	voltest.Fill(b, 1)
	for c := int64(0); c < 4; c++ {
		if err := voltest.Do(l, engine.OpWrite, 0, c<<20, engine.BlockSize, b); err != nil {
			t.Fatal(err)
		}
	}
	if err := voltest.Do(l, engine.OpFlush, 0, 0, 0, nil); err != nil {
		t.Fatal(err)
	}
	for _, c := range []int64{1, 5} {
		if err := voltest.Do(l, engine.OpWrite, 0, c<<20, engine.BlockSize, b); err != nil {
			t.Fatal(err)
		}
	}
	l.Store().simulateCrash()

	var got []ChunkID
	fail := errors.New("etcd is away")
	_, err := OpenStore(path, StoreOptions{Shards: 1, OnRecover: func(lost []ChunkID) error { return fail }})
	if !errors.Is(err, fail) {
		t.Fatalf("open with a failing OnRecover: %v", err)
	}
	st, err := OpenStore(path, StoreOptions{Shards: 1, OnRecover: func(lost []ChunkID) error {
		got = append(got, lost...)
		return nil
	}})
	if err != nil {
		t.Fatal(err)
	}
	idx := map[uint64]bool{}
	for _, id := range got {
		idx[id.Index] = true
	}
	if !idx[1] || !idx[5] {
		t.Fatalf("OnRecover named chunks %v; want 1 and 5 (written after the last flush) among them", got)
	}
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	st, err = OpenStore(path, StoreOptions{Shards: 1, OnRecover: func(lost []ChunkID) error {
		t.Errorf("a clean open called OnRecover with %v", lost)
		return nil
	}})
	if err != nil {
		t.Fatal(err)
	}
	st.Close()
}
