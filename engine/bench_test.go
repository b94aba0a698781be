package engine

import (
	"os"
	"path/filepath"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/torus-storage/torus/iouring"
)

// benchLoop keeps qd requests in flight, each resubmitted from its
// completion to a new random 4 KiB offset, until b.N have completed.
type benchLoop struct {
	v      Volume
	n      int64
	issued atomic.Int64
	done   atomic.Int64
	fin    chan struct{}
	blocks uint64
	errs   atomic.Int64
}

type benchReq struct {
	Request
	lp  *benchLoop
	rng uint64
}

func (q *benchReq) next() {
	q.rng ^= q.rng << 13
	q.rng ^= q.rng >> 7
	q.rng ^= q.rng << 17
	q.Offset = int64(q.rng%q.lp.blocks) * BlockSize
}

func (q *benchReq) Complete(_ *Request, err error) {
	lp := q.lp
	if err != nil {
		lp.errs.Add(1)
	}
	if lp.done.Add(1) == lp.n {
		close(lp.fin)
		return
	}
	if lp.issued.Add(1) <= lp.n {
		q.next()
		lp.v.Submit(&q.Request)
	}
}

func benchLocal(b *testing.B, op Op, qd int) {
	const size = 256 << 20
	l, err := OpenLocal(filepath.Join(b.TempDir(), "v.store"), size, LocalOptions{})
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	big := abuf(b, 4<<20)
	fill(big, 1)
	for off := int64(0); off < size; off += int64(len(big)) {
		if err := do(l, OpWrite, 0, off, int64(len(big)), big); err != nil {
			b.Fatal(err)
		}
	}
	lp := &benchLoop{v: l, n: int64(b.N), fin: make(chan struct{}), blocks: size / BlockSize}
	reqs := make([]benchReq, qd)
	for i := range reqs {
		q := &reqs[i]
		q.lp, q.rng = lp, uint64(i)*0x9e3779b97f4a7c15+1
		q.Op, q.Length, q.Buf, q.Done = op, BlockSize, abuf(b, BlockSize), q
	}
	b.ReportAllocs()
	b.ResetTimer()
	start := time.Now()
	for i := range reqs {
		if lp.issued.Add(1) > lp.n {
			break
		}
		reqs[i].next()
		l.Submit(&reqs[i].Request)
	}
	<-lp.fin
	el := time.Since(start)
	b.StopTimer()
	if e := lp.errs.Load(); e != 0 {
		b.Fatalf("%d requests failed", e)
	}
	b.ReportMetric(float64(b.N)/el.Seconds(), "IOPS")
}

func BenchmarkLocalRandRead4K(b *testing.B) {
	b.Run("QD32", func(b *testing.B) { benchLocal(b, OpRead, 32) })
	b.Run("QD128", func(b *testing.B) { benchLocal(b, OpRead, 128) })
}

func BenchmarkLocalRandWrite4K(b *testing.B) {
	b.Run("QD32", func(b *testing.B) { benchLocal(b, OpWrite, 32) })
	b.Run("QD128", func(b *testing.B) { benchLocal(b, OpWrite, 128) })
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
	big := abuf(b, 4<<20)
	fill(big, 1)
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
	bufs := abuf(b, qd*BlockSize)
	rng := uint64(0x9e3779b97f4a7c15)
	issue := func(i int) {
		rng ^= rng << 13
		rng ^= rng >> 7
		rng ^= rng << 17
		e := r.SQE()
		e.PrepWrite(fd, bufs[i*BlockSize:(i+1)*BlockSize], (rng%(size/BlockSize))*BlockSize)
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
			if c.Res != BlockSize {
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
