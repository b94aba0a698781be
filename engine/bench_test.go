package engine

import (
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"
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
