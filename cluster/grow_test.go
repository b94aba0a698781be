package cluster

import (
	"bytes"
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/torus-storage/torus/engine"
	"github.com/torus-storage/torus/internal/voltest"
	"github.com/torus-storage/torus/meta"
)

// TestChunkTableGrow: entries keep their values and addresses across
// growths, and updates racing a growth are never lost (run with -race).
func TestChunkTableGrow(t *testing.T) {
	tb := newChunkTable[atomic.Uint64](3)
	first := tb.at(2)
	var wg sync.WaitGroup
	const adds = 2000
	for w := range 4 {
		wg.Go(func() {
			for range adds {
				tb.at(int64(w % 3)).Add(1)
			}
		})
	}
	for n := int64(4); n <= 64; n += 5 {
		tb.grow(n)
	}
	wg.Wait()
	if tb.len() != 64 {
		t.Fatalf("len %d, want 64", tb.len())
	}
	if tb.at(2) != first {
		t.Fatal("entry 2 moved when the table grew")
	}
	total := uint64(0)
	tb.each(func(i int64, v *atomic.Uint64) { total += v.Load() })
	if total != 4*adds {
		t.Fatalf("sum %d after concurrent adds, want %d: updates were lost", total, 4*adds)
	}
	tb.at(63).Store(7)
	var seen []int64
	tb.each(func(i int64, v *atomic.Uint64) {
		if i == 63 && v.Load() != 7 {
			t.Fatalf("entry 63 = %d through each, want 7", v.Load())
		}
		seen = append(seen, i)
	})
	if len(seen) != 64 || seen[63] != 63 {
		t.Fatalf("each visited %d entries", len(seen))
	}
	if n := testing.AllocsPerRun(100, func() { tb.at(40).Add(1) }); n != 0 {
		t.Fatalf("at allocates %v per call", n)
	}
}

// TestAttachGrow: a resize in etcd reaches an attached volume: Size grows
// (Resized signals it), I/O past the old end works, past the new end is
// refused, and what was written there is read back by the next holder.
// The device record a holder reports is readable and goes with the lock.
// Writers hammering the old end while the volume grows see no error.
func TestAttachGrow(t *testing.T) {
	tc := startCluster(t, 3, 256)
	const oldSize = 5*testChunk/2 + engine.BlockSize // the last chunk is partial
	v := tc.volume("grow", oldSize, 2)
	ctx := context.Background()
	opt := AttachOptions{Options: Options{TLS: tc.client.Client, Timeout: 2 * time.Second, Logger: quietLog, Holder: "grower"},
		TTL: 10 * time.Second}
	a, err := Attach(ctx, tc.ms, "grow", opt)
	if err != nil {
		t.Fatal(err)
	}
	closed := false
	defer func() {
		if !closed {
			a.Close()
		}
	}()
	if err := a.ReportDevice(ctx, meta.Device{Path: "/dev/test0", Frontend: "test", Size: oldSize, Grow: meta.GrowLive}); err != nil {
		t.Fatal(err)
	}
	d, ok, err := tc.ms.VolumeDevice(ctx, v)
	if err != nil || !ok || d.Path != "/dev/test0" || d.Holder != "grower" || d.Grow != meta.GrowLive {
		t.Fatalf("device record %+v, %v, %v", d, ok, err)
	}

	blk := voltest.Buf(t, engine.BlockSize)
	if err := voltest.Do(a, engine.OpWrite, 0, oldSize, engine.BlockSize, blk); !errors.Is(err, engine.ErrRange) {
		t.Fatalf("write at the old end before the resize: %v, want engine.ErrRange", err)
	}

	// Writers at the old end, through the growth.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var ioErr atomic.Pointer[error]
	for w := range 2 {
		wg.Go(func() {
			b := make([]byte, engine.BlockSize)
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				off := oldSize - engine.BlockSize*int64(1+w)
				op := engine.OpWrite
				if i%2 == 1 {
					op = engine.OpRead
				}
				if err := voltest.Do(a, op, 0, off, engine.BlockSize, b); err != nil {
					ioErr.Store(&err)
					return
				}
			}
		})
	}

	const newSize = 7*testChunk + 3*engine.BlockSize
	if _, err := tc.ms.ResizeVolume(ctx, "grow", newSize); err != nil {
		t.Fatal(err)
	}
	select {
	case <-a.Resized():
	case <-time.After(20 * time.Second):
		t.Fatalf("no Resized within 20s; Size %d", a.Size())
	}
	if a.Size() != newSize {
		t.Fatalf("Size %d after Resized, want %d", a.Size(), newSize)
	}
	close(stop)
	wg.Wait()
	if e := ioErr.Load(); e != nil {
		t.Fatalf("I/O at the old end during the growth: %v", *e)
	}

	// Past the old end: the rest of its last chunk, whole new chunks, the
	// new last block.
	span := int64(newSize - oldSize)
	data := voltest.Buf(t, int(span))
	voltest.Fill(data, 42)
	if err := voltest.Do(a, engine.OpWrite, 0, oldSize, span, data); err != nil {
		t.Fatalf("write past the old end: %v", err)
	}
	if err := voltest.Do(a, engine.OpFlush, 0, 0, 0, nil); err != nil {
		t.Fatal(err)
	}
	got := voltest.Buf(t, int(span))
	if err := voltest.Do(a, engine.OpRead, 0, oldSize, span, got); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read past the old end: %v, equal %v", err, bytes.Equal(got, data))
	}
	if err := voltest.Do(a, engine.OpWrite, 0, newSize, engine.BlockSize, blk); !errors.Is(err, engine.ErrRange) {
		t.Fatalf("write at the new end: %v, want engine.ErrRange", err)
	}
	closed = true
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	if _, ok, err := tc.ms.VolumeDevice(ctx, v); ok || err != nil {
		t.Fatalf("device record after Close: present %v (%v), want gone with the lock", ok, err)
	}

	b, err := Attach(ctx, tc.ms, "grow", opt)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if b.Size() != newSize {
		t.Fatalf("next holder's Size %d, want %d", b.Size(), newSize)
	}
	clear(got)
	if err := voltest.Do(b, engine.OpRead, 0, oldSize, span, got); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("next holder reads past the old end: %v, equal %v", err, bytes.Equal(got, data))
	}
}
