package store

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"hash/crc32"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/torus-storage/torus/engine"
	"github.com/torus-storage/torus/internal/alignbuf"
	"github.com/torus-storage/torus/internal/voltest"
)

const crashChildEnv = "TORUS_ENGINE_CRASH_CHILD"

func TestMain(m *testing.M) {
	if p := os.Getenv(crashChildEnv); p != "" {
		if rest, ok := strings.CutPrefix(p, "dirty:"); ok {
			dirtyCrashChild(rest)
		} else {
			crashChild(p)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func openTest(t testing.TB, path string, size int64, opt LocalOptions) *Local {
	t.Helper()
	l, err := OpenLocal(path, size, opt)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

func TestLocalConcurrentRoundTrip(t *testing.T) {
	const size = 64 << 20
	const workers = 128
	l := openTest(t, filepath.Join(t.TempDir(), "v.store"), size, LocalOptions{})
	defer l.Close()
	model := make([]byte, size)
	region := int64(size / workers)
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(w), 1))
			buf, _ := alignbuf.Alloc(32 * engine.BlockSize)
			rb, _ := alignbuf.Alloc(32 * engine.BlockSize)
			defer alignbuf.Free(buf)
			defer alignbuf.Free(rb)
			base := int64(w) * region
			for i := 0; i < 20; i++ {
				n := int64(1+r.IntN(32)) * engine.BlockSize
				off := base + int64(r.IntN(int((region-n)/engine.BlockSize)+1))*engine.BlockSize
				voltest.Fill(buf[:n], r.Uint64())
				if err := voltest.Do(l, engine.OpWrite, 0, off, n, buf[:n]); err != nil {
					errs <- fmt.Errorf("write %d+%d: %w", off, n, err)
					return
				}
				copy(model[off:off+n], buf[:n])
				if err := voltest.Do(l, engine.OpRead, 0, off, n, rb[:n]); err != nil {
					errs <- fmt.Errorf("read %d+%d: %w", off, n, err)
					return
				}
				if !bytes.Equal(rb[:n], buf[:n]) {
					errs <- fmt.Errorf("read %d+%d: data differs from what was written", off, n)
					return
				}
			}
		}(w)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	all := voltest.Buf(t, size)
	if err := voltest.Do(l, engine.OpRead, 0, 0, size, all); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(all, model) {
		t.Fatal("whole-volume read differs from the model")
	}
}

// Concurrent overlapping writes to one block: afterwards the block reads
// back (no checksum error) as one of the written images.
func TestLocalOverlappingWrites(t *testing.T) {
	l := openTest(t, filepath.Join(t.TempDir(), "v.store"), 8<<20, LocalOptions{})
	defer l.Close()
	const n = 64
	bufs := make([][]byte, n)
	var wg sync.WaitGroup
	for i := range bufs {
		bufs[i] = voltest.Buf(t, 2*engine.BlockSize)
		voltest.Fill(bufs[i], uint64(i))
	}
	for round := 0; round < 5; round++ {
		for i := 0; i < n; i++ {
			wg.Add(1)
			go func(i int) {
				defer wg.Done()
				off := int64(engine.BlockSize * (i % 2)) // overlapping 8 KiB writes
				if err := voltest.Do(l, engine.OpWrite, 0, off, 2*engine.BlockSize, bufs[i]); err != nil {
					t.Error(err)
				}
				rb, _ := alignbuf.Alloc(engine.BlockSize)
				defer alignbuf.Free(rb)
				if err := voltest.Do(l, engine.OpRead, 0, engine.BlockSize, engine.BlockSize, rb); err != nil {
					t.Error(err)
				}
			}(i)
		}
		wg.Wait()
	}
	rb := voltest.Buf(t, 3*engine.BlockSize)
	if err := voltest.Do(l, engine.OpRead, 0, 0, 3*engine.BlockSize, rb); err != nil {
		t.Fatal(err)
	}
}

func TestLocalZerosAndBoundaries(t *testing.T) {
	const size = 16 << 20
	l := openTest(t, filepath.Join(t.TempDir(), "v.store"), size, LocalOptions{ChunkSize: 1 << 20})
	defer l.Close()
	b := voltest.Buf(t, 3<<20)
	voltest.Fill(b, 1)
	if err := voltest.Do(l, engine.OpRead, 0, 0, 3<<20, b); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(b, make([]byte, len(b))) {
		t.Fatal("never-written space is not zero")
	}
	// 2 MiB + 8 KiB starting 4 KiB before a chunk boundary spans 4 chunks.
	off, n := int64(1<<20-engine.BlockSize), int64(2<<20+2*engine.BlockSize)
	voltest.Fill(b[:n], 2)
	if err := voltest.Do(l, engine.OpWrite, 0, off, n, b[:n]); err != nil {
		t.Fatal(err)
	}
	r := voltest.Buf(t, 4<<20)
	if err := voltest.Do(l, engine.OpRead, 0, 0, 4<<20, r); err != nil {
		t.Fatal(err)
	}
	want := make([]byte, 4<<20)
	copy(want[off:], b[:n])
	if !bytes.Equal(r, want) {
		t.Fatal("boundary-spanning write did not read back")
	}
	if got := l.Store().Stats().UsedSlots; got != 4 {
		t.Fatalf("used slots %d, want 4", got)
	}
	// Write-zeroes of two blocks across a boundary, then of whole chunk 1.
	if err := voltest.Do(l, engine.OpWriteZeroes, 0, 2<<20-engine.BlockSize, 2*engine.BlockSize, nil); err != nil {
		t.Fatal(err)
	}
	clear(want[2<<20-engine.BlockSize : 2<<20+engine.BlockSize])
	if err := voltest.Do(l, engine.OpWriteZeroes, engine.FlagFUA, 1<<20, 1<<20, nil); err != nil {
		t.Fatal(err)
	}
	clear(want[1<<20 : 2<<20])
	if err := voltest.Do(l, engine.OpRead, 0, 0, 4<<20, r); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(r, want) {
		t.Fatal("write-zeroes did not read back as zeros")
	}
	if got := l.Store().Stats().UsedSlots; got != 3 {
		t.Fatalf("used slots %d after zeroing chunk 1, want 3", got)
	}
	for _, c := range []struct{ off, n int64 }{{-4096, 4096}, {size, 4096}, {size - 4096, 8192}, {1, 4096}, {0, 100}} {
		if err := voltest.Do(l, engine.OpRead, 0, c.off, c.n, r[:max(c.n, 0)]); !errors.Is(err, engine.ErrRange) {
			t.Errorf("read %d+%d: %v, want ErrRange", c.off, c.n, err)
		}
	}
}

func blocksOf(t *testing.T, path string) int64 {
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks
}

func TestLocalDiscardFreesSpace(t *testing.T) {
	path := filepath.Join(t.TempDir(), "v.store")
	l := openTest(t, path, 8<<20, LocalOptions{})
	defer l.Close()
	b := voltest.Buf(t, 4<<20)
	voltest.Fill(b, 3)
	if err := voltest.Do(l, engine.OpWrite, 0, 0, 4<<20, b); err != nil {
		t.Fatal(err)
	}
	if err := voltest.Do(l, engine.OpFlush, 0, 0, 0, nil); err != nil {
		t.Fatal(err)
	}
	before := blocksOf(t, path)
	// Partial discard punches a hole too.
	if err := voltest.Do(l, engine.OpDiscard, 0, 0, 64<<10, nil); err != nil {
		t.Fatal(err)
	}
	mid := blocksOf(t, path)
	if mid >= before {
		t.Fatalf("partial discard: st_blocks %d -> %d, want a drop", before, mid)
	}
	if err := voltest.Do(l, engine.OpDiscard, 0, 0, 4<<20, nil); err != nil {
		t.Fatal(err)
	}
	after := blocksOf(t, path)
	if before-after < (4<<20)/512*9/10 {
		t.Fatalf("discard of 4 MiB: st_blocks %d -> %d", before, after)
	}
	if got := l.Store().Stats().UsedSlots; got != 0 {
		t.Fatalf("used slots %d after discarding everything", got)
	}
	if err := voltest.Do(l, engine.OpRead, 0, 0, 4<<20, b); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(b, make([]byte, len(b))) {
		t.Fatal("discarded space does not read as zeros")
	}
}

func TestLocalNoSpace(t *testing.T) {
	l := openTest(t, filepath.Join(t.TempDir(), "v.store"), 8<<20, LocalOptions{Slots: 2})
	defer l.Close()
	b := voltest.Buf(t, engine.BlockSize)
	for i := int64(0); i < 2; i++ {
		if err := voltest.Do(l, engine.OpWrite, 0, i<<20, engine.BlockSize, b); err != nil {
			t.Fatal(err)
		}
	}
	err := voltest.Do(l, engine.OpWrite, 0, 2<<20, engine.BlockSize, b)
	if !errors.Is(err, engine.ErrNoSpace) || engine.Errno(err) != syscall.ENOSPC {
		t.Fatalf("write to a third chunk: %v, want ErrNoSpace", err)
	}
	if err := voltest.Do(l, engine.OpDiscard, 0, 0, 1<<20, nil); err != nil {
		t.Fatal(err)
	}
	if err := voltest.Do(l, engine.OpWrite, 0, 2<<20, engine.BlockSize, b); err != nil {
		t.Fatalf("write after discard freed a slot: %v", err)
	}
}

func TestLocalChecksumAndReopen(t *testing.T) {
	path := filepath.Join(t.TempDir(), "v.store")
	l := openTest(t, path, 8<<20, LocalOptions{})
	b := voltest.Buf(t, 1<<20)
	voltest.Fill(b, 4)
	if err := voltest.Do(l, engine.OpWrite, 0, 1<<20, 1<<20, b); err != nil {
		t.Fatal(err)
	}
	off, ok := l.Store().SlotDataOffset(ChunkID{Index: 1})
	if !ok {
		t.Fatal("chunk 1 has no slot after a write")
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	// Reopen after a clean close keeps the data.
	l = openTest(t, path, 8<<20, LocalOptions{})
	r := voltest.Buf(t, 1<<20)
	if err := voltest.Do(l, engine.OpRead, 0, 1<<20, 1<<20, r); err != nil || !bytes.Equal(r, b) {
		t.Fatalf("read after reopen: %v (equal %v)", err, bytes.Equal(r, b))
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte{b[8192+5] ^ 0x40}, off+8192+5); err != nil {
		t.Fatal(err)
	}
	f.Close()
	l = openTest(t, path, 8<<20, LocalOptions{})
	defer l.Close()
	err = voltest.Do(l, engine.OpRead, 0, 1<<20, 1<<20, r)
	if !errors.Is(err, engine.ErrChecksum) || engine.Errno(err) != syscall.EIO {
		t.Fatalf("read of corrupted block: %v, want ErrChecksum", err)
	}
	if err := voltest.Do(l, engine.OpRead, 0, 1<<20, 8192, r[:8192]); err != nil {
		t.Fatalf("read of the intact blocks before the corrupted one: %v", err)
	}
}

func TestLocalOpenErrors(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "volume.store")
	l := openTest(t, path, 10<<30, LocalOptions{})
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	_, err := OpenLocal(path, 20<<30, LocalOptions{})
	want := "store " + path + " was made for a 10 GiB volume, not 20 GiB: use --size 10GiB or a new --store"
	if err == nil || err.Error() != want {
		t.Fatalf("size mismatch error:\n got %v\nwant %s", err, want)
	}
	for _, sz := range []int64{0, 4095, 1<<20 + 1} {
		if _, err := OpenLocal(filepath.Join(dir, "x"), sz, LocalOptions{}); err == nil || !strings.Contains(err.Error(), "multiple of 4096") {
			t.Errorf("size %d: %v", sz, err)
		}
	}
	if _, err := OpenLocal(filepath.Join(dir, "missing", "v.store"), 1<<20, LocalOptions{}); err == nil {
		t.Error("store in a missing directory opened")
	}
	bad := filepath.Join(dir, "bad")
	if err := os.WriteFile(bad, bytes.Repeat([]byte("x"), 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := OpenLocal(bad, 1<<20, LocalOptions{}); !errors.Is(err, ErrNotStore) {
		t.Errorf("bad magic: %v", err)
	}
	// Corrupt superblock: flip a byte of the volume size.
	f, _ := os.OpenFile(path, os.O_RDWR, 0)
	f.WriteAt([]byte{0xff}, sbVolSize+1)
	f.Close()
	if _, err := OpenLocal(path, 10<<30, LocalOptions{}); !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "superblock checksum") {
		t.Errorf("corrupt superblock: %v", err)
	}
	// Wrong version.
	f, _ = os.OpenFile(path, os.O_RDWR, 0)
	sbuf := make([]byte, engine.BlockSize)
	f.ReadAt(sbuf, 0)
	sbuf[sbVolSize+1] ^= 0xff
	sb, err := decodeSuperblock(sbuf, crcTable())
	if err != nil {
		t.Fatal(err)
	}
	sb.version = 9
	sb.encode(sbuf, crcTable())
	f.WriteAt(sbuf, 0)
	f.Close()
	if _, err := OpenLocal(path, 10<<30, LocalOptions{}); err == nil || !strings.Contains(err.Error(), "format version 9") {
		t.Errorf("wrong version: %v", err)
	}
}

func TestLocalForceBuffered(t *testing.T) {
	path := filepath.Join(t.TempDir(), "v.store")
	l := openTest(t, path, 4<<20, LocalOptions{ForceBuffered: true})
	if l.Store().Direct() {
		t.Fatal("ForceBuffered store reports O_DIRECT")
	}
	b := voltest.Buf(t, 64<<10)
	voltest.Fill(b, 5)
	if err := voltest.Do(l, engine.OpWrite, engine.FlagFUA, 4096, 64<<10, b); err != nil {
		t.Fatal(err)
	}
	if err := voltest.Do(l, engine.OpFlush, 0, 0, 0, nil); err != nil {
		t.Fatal(err)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	l = openTest(t, path, 4<<20, LocalOptions{})
	defer l.Close()
	if !l.Store().Direct() {
		t.Fatal("store on a filesystem with O_DIRECT does not use it")
	}
	r := voltest.Buf(t, 64<<10)
	if err := voltest.Do(l, engine.OpRead, 0, 4096, 64<<10, r); err != nil || !bytes.Equal(r, b) {
		t.Fatalf("read back: %v", err)
	}
}

// crashChild writes, flushes, reports and keeps writing until killed.
func crashChild(path string) {
	l, err := OpenLocal(path, 32<<20, LocalOptions{})
	if err != nil {
		fmt.Println("error:", err)
		return
	}
	buf, _ := alignbuf.Alloc(64 << 10)
	const n = 200
	for i := 0; i < n; i++ {
		off, length := crashWrite(i)
		voltest.Fill(buf[:length], uint64(i))
		if err := voltest.Do(l, engine.OpWrite, 0, off, length, buf[:length]); err != nil {
			fmt.Println("error:", err)
			return
		}
	}
	if err := voltest.Do(l, engine.OpFlush, 0, 0, 0, nil); err != nil {
		fmt.Println("error:", err)
		return
	}
	fmt.Printf("flushed %d writes\n", n)
	// Keep many unflushed writes in flight in the upper half until killed.
	var wg sync.WaitGroup
	for g := 0; g < 32; g++ {
		wg.Add(1)
		go func(g int) {
			b, _ := alignbuf.Alloc(64 << 10)
			r := rand.New(rand.NewPCG(uint64(g), 9))
			for {
				off := 16<<20 + int64(r.IntN(256))*engine.BlockSize*16
				voltest.Fill(b, r.Uint64())
				voltest.Do(l, engine.OpWrite, 0, off, 64<<10, b)
			}
		}(g)
	}
	wg.Wait()
}

// crashWrite is the i-th flushed write of crashChild: in the lower 16 MiB,
// later writes overwrite earlier ones.
func crashWrite(i int) (off, length int64) {
	r := rand.New(rand.NewPCG(uint64(i), 3))
	length = int64(1+r.IntN(16)) * engine.BlockSize
	off = int64(r.IntN(int((16<<20-length)/engine.BlockSize)+1)) * engine.BlockSize
	return off, length
}

// startCrashChild re-runs the test binary as a writer child (see
// crashChildEnv) with arg and returns it with a scanner over its stdout, on
// which it reports progress until the test kills it.
func startCrashChild(t *testing.T, arg string) (*exec.Cmd, *bufio.Scanner) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), crashChildEnv+"="+arg)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	return cmd, bufio.NewScanner(out)
}

func TestLocalCrashRecovery(t *testing.T) {
	path := filepath.Join(t.TempDir(), "v.store")
	cmd, sc := startCrashChild(t, path)
	flushed := 0
	for sc.Scan() {
		line := sc.Text()
		if rest, ok := strings.CutPrefix(line, "flushed "); ok {
			flushed, _ = strconv.Atoi(strings.Fields(rest)[0])
			break
		}
		if strings.HasPrefix(line, "error") {
			cmd.Process.Kill()
			cmd.Wait()
			t.Fatalf("child: %s", line)
		}
	}
	if flushed == 0 {
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatal("child never reported a flush")
	}
	time.Sleep(100 * time.Millisecond) // let unflushed writes pile up
	cmd.Process.Signal(syscall.SIGKILL)
	cmd.Wait()

	l := openTest(t, path, 32<<20, LocalOptions{})
	defer l.Close()
	model := make([]byte, 16<<20)
	buf := make([]byte, 64<<10)
	for i := 0; i < flushed; i++ {
		off, length := crashWrite(i)
		voltest.Fill(buf[:length], uint64(i))
		copy(model[off:], buf[:length])
	}
	r := voltest.Buf(t, 32<<20)
	if err := voltest.Do(l, engine.OpRead, 0, 0, 32<<20, r); err != nil {
		t.Fatalf("read after crash (unflushed writes must read as old or new data): %v", err)
	}
	if !bytes.Equal(r[:16<<20], model) {
		t.Fatal("flushed writes lost in the crash")
	}
}

// dirtyCrashChild fills a 32 MiB volume, flushes, overwrites the lower half
// (data writes only, dirty headers), flushes, FUA-overwrites more of it
// without a flush, reports, then keeps writing the upper half until killed.
func dirtyCrashChild(path string) {
	l, err := OpenLocal(path, 32<<20, LocalOptions{})
	if err != nil {
		fmt.Println("error:", err)
		return
	}
	check := func(err error) {
		if err != nil {
			fmt.Println("error:", err)
			os.Exit(0)
		}
	}
	buf, _ := alignbuf.Alloc(1 << 20)
	for off := int64(0); off < 32<<20; off += 1 << 20 {
		stampBlocks(buf, off, 0)
		check(voltest.Do(l, engine.OpWrite, 0, off, 1<<20, buf))
	}
	check(voltest.Do(l, engine.OpFlush, 0, 0, 0, nil))
	for i := 0; i < dirtyWrites; i++ {
		off, length := crashWrite(i)
		stampBlocks(buf[:length], off, uint64(i+1)<<32)
		flags := engine.Flags(0)
		if i >= dirtyFlushed {
			flags = engine.FlagFUA
		}
		check(voltest.Do(l, engine.OpWrite, flags, off, length, buf[:length]))
		if i == dirtyFlushed-1 {
			check(voltest.Do(l, engine.OpFlush, 0, 0, 0, nil))
		}
	}
	fmt.Printf("done %d writes\n", dirtyWrites)
	var wg sync.WaitGroup
	for g := 0; g < 16; g++ {
		wg.Add(1)
		go func(g int) {
			b, _ := alignbuf.Alloc(64 << 10)
			r := rand.New(rand.NewPCG(uint64(g), 11))
			for {
				off := 16<<20 + int64(r.IntN(256))*engine.BlockSize*16
				stampBlocks(b, off, r.Uint64())
				voltest.Do(l, engine.OpWrite, engine.Flags(r.IntN(2)), off, 64<<10, b)
			}
		}(g)
	}
	wg.Wait()
}

// dirtyCrashChild writes dirtyFlushed flushed writes, then FUA writes up to
// dirtyWrites.
const dirtyWrites, dirtyFlushed = 400, 300

// laggingBlocks counts the written blocks whose CRC in the slot header on
// disk does not match their data: blocks of dirty headers.
func laggingBlocks(t *testing.T, path string) int {
	t.Helper()
	img, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	tab := crcTable()
	sb, err := decodeSuperblock(img, tab)
	if err != nil {
		t.Fatal(err)
	}
	blocks := int(sb.chunkSize / engine.BlockSize)
	m := slotMeta{crcs: make([]uint32, blocks)}
	n := 0
	for slot := 0; slot < int(sb.slots); slot++ {
		h := int(sb.hdrOff) + slot*engine.BlockSize
		if err := m.decode(img[h:h+engine.BlockSize], blocks, tab); err != nil {
			t.Fatalf("slot %d: %v", slot, err)
		}
		if !m.used {
			continue
		}
		d := int(sb.dataOff) + slot*int(sb.chunkSize)
		for b := 0; b < blocks; b++ {
			if m.bit(b) && crc32.Checksum(img[d+b*engine.BlockSize:d+(b+1)*engine.BlockSize], tab) != m.crcs[b] {
				n++
			}
		}
	}
	return n
}

// kill -9 with dirty headers: every flushed write and every FUA write reads
// back after recovery, unflushed writes read as old or new data, never as a
// checksum error, and a clean close leaves no header behind its data.
func TestLocalCrashDirtyHeaders(t *testing.T) {
	path := filepath.Join(t.TempDir(), "v.store")
	cmd, sc := startCrashChild(t, "dirty:"+path)
	done := false
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "done ") {
			done = true
			break
		}
		if strings.HasPrefix(line, "error") {
			cmd.Process.Kill()
			cmd.Wait()
			t.Fatalf("child: %s", line)
		}
	}
	if !done {
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatal("child never reported its writes")
	}
	time.Sleep(100 * time.Millisecond)
	cmd.Process.Signal(syscall.SIGKILL)
	cmd.Wait()

	if n := laggingBlocks(t, path); n == 0 {
		t.Fatal("no slot header lags its data after the crash: writes still write headers")
	}
	l := openTest(t, path, 32<<20, LocalOptions{})
	model := make([]byte, 16<<20)
	for off := int64(0); off < 16<<20; off += 1 << 20 {
		stampBlocks(model[off:off+1<<20], off, 0)
	}
	for i := 0; i < dirtyWrites; i++ {
		off, length := crashWrite(i)
		stampBlocks(model[off:off+length], off, uint64(i+1)<<32)
	}
	r := voltest.Buf(t, 32<<20)
	if err := voltest.Do(l, engine.OpRead, 0, 0, 32<<20, r); err != nil {
		t.Fatalf("read after crash: %v", err)
	}
	for off := 0; off < 16<<20; off += engine.BlockSize {
		if !bytes.Equal(r[off:off+engine.BlockSize], model[off:off+engine.BlockSize]) {
			t.Fatalf("flushed or FUA write lost at %d", off)
		}
	}
	if err := checkBlocks(r[16<<20:], 16<<20); err != nil {
		t.Fatalf("unflushed writes: %v", err)
	}
	// Dirty the headers again and close cleanly: Close writes them all.
	for i := 0; i < 64; i++ {
		off, length := crashWrite(i)
		if err := voltest.Do(l, engine.OpWrite, 0, off, length, r[off:off+length]); err != nil {
			t.Fatal(err)
		}
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if n := laggingBlocks(t, path); n != 0 {
		t.Fatalf("%d blocks lag their header after a clean close", n)
	}
}

func crcTable() *crc32.Table { return crc32.MakeTable(crc32.Castagnoli) }
