package store

import (
	"bytes"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/torus-storage/torus/engine"
	"github.com/torus-storage/torus/internal/voltest"
)

// noDiscardLoop returns a loop device whose backing file lives on ramfs,
// which has no fallocate: the kernel gives such a device neither discard
// nor write-zeroes, as many real disks and virtual devices lack them. It
// needs root (mount, losetup) and fails the test, loudly, without them.
func noDiscardLoop(t *testing.T, size int64) string {
	t.Helper()
	dir := mountRamfs(t)
	img := filepath.Join(dir, "disk.img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, size); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("losetup", "--find", "--show", img).CombinedOutput()
	if err != nil {
		t.Fatalf("losetup (needs root and /dev/loop-control): %v: %s", err, out)
	}
	dev := strings.TrimSpace(string(out))
	t.Cleanup(func() {
		if out, err := exec.Command("losetup", "-d", dev).CombinedOutput(); err != nil {
			t.Errorf("losetup -d %s: %v: %s", dev, err, out)
		}
	})
	for _, q := range []string{"discard_max_bytes", "write_zeroes_max_bytes"} {
		b, err := os.ReadFile(filepath.Join("/sys/block", filepath.Base(dev), "queue", q))
		if err != nil {
			t.Fatal(err)
		}
		if v := strings.TrimSpace(string(b)); v != "0" {
			t.Fatalf("%s of %s is %s, want 0: the device supports discard after all", q, dev, v)
		}
	}
	return dev
}

// mountRamfs mounts a ramfs (a filesystem without fallocate) on a new
// temporary directory, for the test's lifetime.
func mountRamfs(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "ramfs", "ramfs", dir).CombinedOutput(); err != nil {
		t.Fatalf("mount ramfs on %s (needs root): %v: %s", dir, err, out)
	}
	t.Cleanup(func() {
		// The kernel lets go of a detached loop device's file
		// asynchronously: retry for a while.
		var out []byte
		var err error
		for i := 0; i < 100; i++ {
			if out, err = exec.Command("umount", dir).CombinedOutput(); err == nil {
				return
			}
			time.Sleep(50 * time.Millisecond)
		}
		t.Errorf("umount %s: %v: %s", dir, err, out)
	})
	return dir
}

// On a block device without discard or write-zeroes, discard and
// write-zeroes still succeed and read back as zeros: the written bits are
// what make blocks read as zeros, the device-level punch only reclaims
// space. A discard that empties a chunk still frees its slot, whose data is
// zeroed on the device before anything else can take it.
func TestStoreDiscardWithoutDeviceSupport(t *testing.T) {
	const chunk = MinChunkSize
	const size = 8 * chunk
	dev := noDiscardLoop(t, 8<<20)
	opt := LocalOptions{Shards: 1, ChunkSize: chunk, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}
	l := openTest(t, dev, size, opt)
	// Runs before the device's cleanups; closing twice is harmless.
	t.Cleanup(func() { l.Close() })
	b := voltest.Buf(t, 2*chunk)
	stampBlocks(b, 0, 1)
	if err := voltest.Do(l, engine.OpWrite, 0, 0, 2*chunk, b); err != nil {
		t.Fatal(err)
	}
	slot0, _ := l.Store().SlotDataOffset(ChunkID{Index: 0})
	want := append([]byte(nil), b...)
	for _, c := range []struct {
		op          engine.Op
		flags       engine.Flags
		off, length int64
	}{
		{engine.OpDiscard, 0, chunk + 2*engine.BlockSize, 3 * engine.BlockSize},
		{engine.OpWriteZeroes, 0, chunk + 8*engine.BlockSize, 2 * engine.BlockSize},
		{engine.OpWriteZeroes, engine.FlagFUA, chunk + 12*engine.BlockSize, engine.BlockSize},
		{engine.OpDiscard, 0, 0, chunk}, // empties chunk 0: frees its slot
	} {
		if err := voltest.Do(l, c.op, c.flags, c.off, c.length, nil); err != nil {
			t.Fatalf("%v of [%d, +%d) on a device without discard: %v", c.op, c.off, c.length, err)
		}
		clear(want[c.off : c.off+c.length])
	}
	r := voltest.Buf(t, 2*chunk)
	if err := voltest.Do(l, engine.OpRead, 0, 0, 2*chunk, r); err != nil || !bytes.Equal(r, want) {
		t.Fatalf("read after discards: %v (equal %v)", err, bytes.Equal(r, want))
	}
	if _, ok := l.Store().SlotDataOffset(ChunkID{Index: 0}); ok {
		t.Fatal("discarding all of chunk 0 kept its slot")
	}
	raw := make([]byte, chunk)
	f, err := os.Open(dev)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.ReadAt(raw, slot0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(raw, make([]byte, chunk)) {
		t.Fatal("the freed slot's data was not zeroed on the device")
	}
	// The next chunk takes the slot and sees only its own data.
	stampBlocks(b[:engine.BlockSize], 5*chunk, 2)
	if err := voltest.Do(l, engine.OpWrite, 0, 5*chunk, engine.BlockSize, b[:engine.BlockSize]); err != nil {
		t.Fatal(err)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	l = openTest(t, dev, size, opt)
	copy(want[0:], make([]byte, chunk))
	all := voltest.Buf(t, size)
	if err := voltest.Do(l, engine.OpRead, 0, 0, size, all); err != nil {
		t.Fatal(err)
	}
	full := make([]byte, size)
	copy(full, want)
	copy(full[5*chunk:], b[:engine.BlockSize])
	if !bytes.Equal(all, full) {
		t.Fatal("volume after reopen differs")
	}
	// A fresh open learns that punching is refused from a free.
	slot5, _ := l.Store().SlotDataOffset(ChunkID{Index: 5})
	if err := voltest.Do(l, engine.OpDiscard, 0, 5*chunk, chunk, nil); err != nil {
		t.Fatalf("discard of a whole chunk as the first discard: %v", err)
	}
	if _, ok := l.Store().SlotDataOffset(ChunkID{Index: 5}); ok {
		t.Fatal("discarding all of chunk 5 kept its slot")
	}
	if _, err := f.ReadAt(raw, slot5); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(raw, make([]byte, chunk)) {
		t.Fatal("the freed slot's data was not zeroed on the device")
	}
}

// On a file that can neither punch holes nor zero ranges (ramfs), discard
// and write-zeroes succeed and read as zeros; a chunk emptied by a discard
// keeps its slot (with no written block) rather than hand its data to the
// slot's next owner.
func TestStoreDiscardWithoutFallocate(t *testing.T) {
	const chunk = MinChunkSize
	const size = 4 * chunk
	path := filepath.Join(mountRamfs(t), "v.store")
	opt := LocalOptions{Shards: 1, ChunkSize: chunk, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}
	l := openTest(t, path, size, opt)
	t.Cleanup(func() { l.Close() })
	b := voltest.Buf(t, chunk)
	stampBlocks(b, 0, 1)
	if err := voltest.Do(l, engine.OpWrite, 0, 0, chunk, b); err != nil {
		t.Fatal(err)
	}
	if err := voltest.Do(l, engine.OpWriteZeroes, 0, 0, engine.BlockSize, nil); err != nil {
		t.Fatalf("write-zeroes without fallocate: %v", err)
	}
	if err := voltest.Do(l, engine.OpDiscard, 0, 0, chunk, nil); err != nil {
		t.Fatalf("discard of a whole chunk without fallocate: %v", err)
	}
	if got := l.Store().Stats().UsedSlots; got != 1 {
		t.Fatalf("used slots %d, want 1 (kept: its data could not be cleared)", got)
	}
	if err := voltest.Do(l, engine.OpRead, 0, 0, chunk, b); err != nil || !bytes.Equal(b, make([]byte, chunk)) {
		t.Fatalf("read after discard: %v (zeros %v)", err, bytes.Equal(b, make([]byte, chunk)))
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	l = openTest(t, path, size, opt)
	if err := voltest.Do(l, engine.OpRead, 0, 0, chunk, b); err != nil || !bytes.Equal(b, make([]byte, chunk)) {
		t.Fatalf("read after reopen: %v (zeros %v)", err, bytes.Equal(b, make([]byte, chunk)))
	}
}
