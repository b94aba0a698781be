// Package voltest holds what the tests of volumes share: a synchronous
// request, page-aligned buffers and reproducible data.
package voltest

import (
	"math/rand/v2"
	"sync/atomic"
	"testing"
	"time"

	"github.com/torus-storage/torus/engine"
	"github.com/torus-storage/torus/internal/alignbuf"
)

// Waiter is an engine.Completer that sends each request's result on the
// channel.
type Waiter chan error

// Complete implements engine.Completer.
func (w Waiter) Complete(_ *engine.Request, err error) { w <- err }

// Do submits one request to v and waits for its result.
func Do(v engine.Volume, op engine.Op, flags engine.Flags, off, length int64, buf []byte) error {
	w := make(Waiter, 1)
	v.Submit(&engine.Request{Op: op, Flags: flags, Offset: off, Length: length, Buf: buf, Done: w})
	return <-w
}

// Buf returns n page-aligned bytes outside the Go heap, freed when the test
// ends.
func Buf(t testing.TB, n int) []byte {
	t.Helper()
	b, err := alignbuf.Alloc(n)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { alignbuf.Free(b) })
	return b
}

// Fill fills b with pseudo-random bytes drawn from seed.
func Fill(b []byte, seed uint64) {
	r := rand.New(rand.NewPCG(seed, 7))
	for i := 0; i+8 <= len(b); i += 8 {
		v := r.Uint64()
		for j := 0; j < 8; j++ {
			b[i+j] = byte(v >> (8 * j))
		}
	}
}

// Bench keeps qd random 4 KiB requests of op in flight on v (whose first
// size bytes were written), each resubmitted from its completion, until b.N
// completed, and reports IOPS; at QD1 ns/op is the mean latency of one
// request. Writes carry data drawn from the request's index.
func Bench(b *testing.B, v engine.Volume, op engine.Op, qd int, size int64) {
	lp := &benchLoop{v: v, n: int64(b.N), fin: make(chan struct{}), blocks: uint64(size / engine.BlockSize)}
	reqs := make([]benchReq, qd)
	for i := range reqs {
		q := &reqs[i]
		q.lp, q.rng = lp, uint64(i)*0x9e3779b97f4a7c15+1
		q.Op, q.Length, q.Buf, q.Done = op, engine.BlockSize, Buf(b, engine.BlockSize), q
		Fill(q.Buf, uint64(i))
	}
	b.ReportAllocs()
	b.ResetTimer()
	start := time.Now()
	for i := range reqs {
		if lp.issued.Add(1) > lp.n {
			break
		}
		reqs[i].next()
		v.Submit(&reqs[i].Request)
	}
	<-lp.fin
	el := time.Since(start)
	b.StopTimer()
	if e := lp.errs.Load(); e != 0 {
		b.Fatalf("%d requests failed", e)
	}
	b.ReportMetric(float64(b.N)/el.Seconds(), "IOPS")
}

// benchLoop is the state of one Bench: requests issued and done.
type benchLoop struct {
	v      engine.Volume
	n      int64
	issued atomic.Int64
	done   atomic.Int64
	fin    chan struct{}
	blocks uint64
	errs   atomic.Int64
}

// benchReq is one of Bench's requests, with its own offset generator.
type benchReq struct {
	engine.Request
	lp  *benchLoop
	rng uint64
}

// next moves q to a new random block (xorshift).
func (q *benchReq) next() {
	q.rng ^= q.rng << 13
	q.rng ^= q.rng >> 7
	q.rng ^= q.rng << 17
	q.Offset = int64(q.rng%q.lp.blocks) * engine.BlockSize
}

// Complete counts q and submits it again while requests are left.
func (q *benchReq) Complete(_ *engine.Request, err error) {
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
