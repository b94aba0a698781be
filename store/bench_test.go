package store

import (
	"os"
	"path/filepath"
	"runtime"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/torus-storage/torus/engine"
	"github.com/torus-storage/torus/internal/voltest"
	"github.com/torus-storage/torus/iouring"
)

func benchLocal(b *testing.B, op engine.Op, qd int) {
	const size = 256 << 20
	l, err := OpenLocal(filepath.Join(b.TempDir(), "v.store"), size, LocalOptions{})
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	big := voltest.Buf(b, 4<<20)
	voltest.Fill(big, 1)
	for off := int64(0); off < size; off += int64(len(big)) {
		if err := voltest.Do(l, engine.OpWrite, 0, off, int64(len(big)), big); err != nil {
			b.Fatal(err)
		}
	}
	voltest.Bench(b, l, op, qd, size)
}

func BenchmarkLocalRandRead4K(b *testing.B) {
	b.Run("QD32", func(b *testing.B) { benchLocal(b, engine.OpRead, 32) })
	b.Run("QD128", func(b *testing.B) { benchLocal(b, engine.OpRead, 128) })
}

func BenchmarkLocalRandWrite4K(b *testing.B) {
	b.Run("QD32", func(b *testing.B) { benchLocal(b, engine.OpWrite, 32) })
	b.Run("QD128", func(b *testing.B) { benchLocal(b, engine.OpWrite, 128) })
}

// benchRaw keeps qd random 4 KiB O_DIRECT writes in flight on a 256 MiB file
// through one io_uring: the device ceiling the store's write path is measured
// against (same file system, same conditions, run back to back).
func benchRaw(b *testing.B, qd int) {
	const size = 256 << 20
	path := filepath.Join(b.TempDir(), "raw")
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|unix.O_DIRECT, 0o600)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	big := voltest.Buf(b, 4<<20)
	voltest.Fill(big, 1)
	for off := int64(0); off < size; off += int64(len(big)) {
		if _, err := f.WriteAt(big, off); err != nil {
			b.Fatal(err)
		}
	}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	r, err := newRing()
	if err != nil {
		b.Fatal(err)
	}
	defer r.Close()
	fd := int32(f.Fd())
	bufs := voltest.Buf(b, qd*engine.BlockSize)
	rng := uint64(0x9e3779b97f4a7c15)
	issue := func(i int) {
		rng ^= rng << 13
		rng ^= rng >> 7
		rng ^= rng << 17
		e := r.SQE()
		e.PrepWrite(fd, bufs[i*engine.BlockSize:(i+1)*engine.BlockSize], (rng%(size/engine.BlockSize))*engine.BlockSize)
		e.UserData = uint64(i)
	}
	var cqes [128]iouring.CQE
	b.ReportAllocs()
	b.ResetTimer()
	start := time.Now()
	issued, done := 0, 0
	for ; issued < min(qd, b.N); issued++ {
		issue(issued)
	}
	for done < b.N {
		if _, err := r.SubmitAndWait(1); err != nil {
			b.Fatal(err)
		}
		n := r.PeekCQEs(cqes[:])
		for _, c := range cqes[:n] {
			if c.Res != engine.BlockSize {
				b.Fatalf("write: %d", c.Res)
			}
			done++
			if issued < b.N {
				issue(int(c.UserData))
				issued++
			}
		}
	}
	el := time.Since(start)
	b.StopTimer()
	b.ReportMetric(float64(b.N)/el.Seconds(), "IOPS")
}

func BenchmarkRawRandWrite4K(b *testing.B) {
	b.Run("QD32", func(b *testing.B) { benchRaw(b, 32) })
	b.Run("QD128", func(b *testing.B) { benchRaw(b, 128) })
}
