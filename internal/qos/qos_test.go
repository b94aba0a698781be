package qos

import (
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/torus-storage/torus/engine"
)

// recorder is a Submitter that keeps the requests it is given, in order,
// in a buffer sized up front (so it allocates nothing).
type recorder struct {
	mu   sync.Mutex
	reqs []*engine.Request
}

func (r *recorder) Submit(req *engine.Request) {
	r.mu.Lock()
	r.reqs = append(r.reqs, req)
	r.mu.Unlock()
}

func (r *recorder) count() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.reqs)
}

func (r *recorder) reset() {
	r.mu.Lock()
	r.reqs = r.reqs[:0]
	r.mu.Unlock()
}

// manual is a Limiter on a clock the test moves, without its releaser
// goroutine: step does what the releaser does when a timer fires.
type manual struct {
	*Limiter
	t   int64
	rec *recorder
}

func newManual(l Limits) *manual {
	m := &manual{rec: &recorder{reqs: make([]*engine.Request, 0, 1<<16)}}
	m.Limiter = newLimiter(m.rec, l)
	m.clock = func() int64 { return m.t }
	return m
}

// at moves the clock to t and releases what is due.
func (m *manual) at(t time.Duration) {
	m.t = int64(t)
	m.release(&m.dirs[dirRead], false)
	m.release(&m.dirs[dirWrite], false)
}

// reqs returns n requests of op and length each.
func reqs(n int, op engine.Op, length int64) []engine.Request {
	rs := make([]engine.Request, n)
	for i := range rs {
		rs[i] = engine.Request{Op: op, Offset: int64(i) * length, Length: length, Tag: uint64(i)}
	}
	return rs
}

func (m *manual) submitAll(rs []engine.Request) {
	for i := range rs {
		m.Submit(&rs[i])
	}
}

// checkOrder fails unless the recorder got rs in order.
func (m *manual) checkOrder(t *testing.T, rs []engine.Request) {
	t.Helper()
	for i, r := range m.rec.reqs {
		if i < len(rs) && r != &rs[i] {
			t.Fatalf("admission %d is request %d, want %d (FIFO)", i, r.Tag, i)
		}
	}
}

// TestRateIOPS: at 1000 IOPS with no burst, 100 requests submitted at once
// are admitted one per millisecond, in order, and none early; the throttle
// counters add up what they waited.
func TestRateIOPS(t *testing.T) {
	m := newManual(Limits{ReadIOPS: 1000})
	rs := reqs(100, engine.OpRead, 4096)
	m.submitAll(rs)
	if got := m.rec.count(); got != 1 {
		t.Fatalf("%d admitted at t=0, want 1", got)
	}
	for k := 1; k < 100; k++ {
		m.at(time.Duration(k)*time.Millisecond - 1)
		if got := m.rec.count(); got != k {
			t.Fatalf("just before %d ms: %d admitted, want %d", k, got, k)
		}
		m.at(time.Duration(k) * time.Millisecond)
		if got := m.rec.count(); got != k+1 {
			t.Fatalf("at %d ms: %d admitted, want %d", k, got, k+1)
		}
	}
	m.checkOrder(t, rs)
	st := m.Stats().Read
	// Request k waited k ms, so 1+2+...+99 ms in all.
	if st.Throttled != 99 || st.ThrottledTime != 4950*time.Millisecond || st.Queued != 0 {
		t.Fatalf("stats %+v, want 99 throttled for 4.95s, none queued", st)
	}
	if w := m.Stats().Write; w != (DirStats{}) {
		t.Fatalf("write stats %+v, want none", w)
	}
}

// TestRateBytes: at 1 MiB/s, 64 KiB writes go at 16 per second; the IOPS
// limit, looser, does not bind; the other direction is not held.
func TestRateBytes(t *testing.T) {
	m := newManual(Limits{WriteBPS: 1 << 20, WriteIOPS: 1000})
	rs := reqs(32, engine.OpWrite, 64<<10)
	m.submitAll(rs)
	const step = time.Second / 16
	for k := 1; k < 32; k++ {
		m.at(time.Duration(k)*step - time.Microsecond)
		if got := m.rec.count(); got != k {
			t.Fatalf("before %v: %d admitted, want %d", time.Duration(k)*step, got, k)
		}
		m.at(time.Duration(k) * step)
		if got := m.rec.count(); got != k+1 {
			t.Fatalf("at %v: %d admitted, want %d", time.Duration(k)*step, got, k+1)
		}
	}
	m.checkOrder(t, rs)
	n := m.rec.count()
	other := reqs(10, engine.OpRead, 64<<10)
	m.submitAll(other)
	flush := engine.Request{Op: engine.OpFlush}
	m.Submit(&flush)
	if got := m.rec.count() - n; got != 11 {
		t.Fatalf("%d of 10 reads and a flush passed, want all: only writes are limited", got)
	}
}

// TestBothBuckets: with an IOPS and a byte limit, the tighter one for the
// request size binds; discard and write-zeroes take an op but no bytes.
func TestBothBuckets(t *testing.T) {
	m := newManual(Limits{WriteIOPS: 100, WriteBPS: 100 << 10}) // 25 4 KiB writes/s by bytes
	m.submitAll(reqs(60, engine.OpWrite, 4096))
	m.at(time.Second)
	if got := m.rec.count(); got != 26 {
		t.Fatalf("4 KiB writes after 1s: %d admitted, want 26 (bytes bind)", got)
	}
	m.at(10 * time.Second) // drain
	m.rec.reset()
	m.SetLimits(Limits{WriteIOPS: 100, WriteBPS: 100 << 10})
	m.submitAll(reqs(150, engine.OpDiscard, 1<<20))
	m.at(11 * time.Second)
	if got := m.rec.count(); got != 101 {
		t.Fatalf("discards after 1s: %d admitted, want 101 (ops bind, no bytes)", got)
	}
}

// TestBurst: a bucket idle for long holds rate × Burst, so that many pass
// at once (plus the request that empties it), then the rate holds; half the
// burst time idle refills half of it.
func TestBurst(t *testing.T) {
	m := newManual(Limits{ReadIOPS: 100, Burst: time.Second})
	m.t = int64(time.Hour)
	m.submitAll(reqs(300, engine.OpRead, 4096))
	if got := m.rec.count(); got != 101 {
		t.Fatalf("burst: %d admitted at once, want 101 (100 IOPS × 1s + 1)", got)
	}
	m.at(time.Hour + time.Second)
	if got := m.rec.count(); got != 201 {
		t.Fatalf("1s after the burst: %d admitted, want 201", got)
	}
	m.at(time.Hour + 2*time.Second) // the last at 1.99s
	if got := m.rec.count(); got != 300 {
		t.Fatalf("2s after the burst: %d admitted, want 300", got)
	}
	m.rec.reset()
	m.at(time.Hour + 2500*time.Millisecond)
	m.submitAll(reqs(100, engine.OpRead, 4096))
	if got := m.rec.count(); got != 51 {
		t.Fatalf("after 0.5s idle: %d admitted at once, want 51", got)
	}
}

// TestLargeRequest: a request larger than its bucket is admitted when the
// bucket is full and the debt delays the next by its cost.
func TestLargeRequest(t *testing.T) {
	m := newManual(Limits{WriteBPS: 64 << 10}) // 64 KiB/s, no burst
	rs := reqs(2, engine.OpWrite, 1<<20)
	m.submitAll(rs)
	if got := m.rec.count(); got != 1 {
		t.Fatalf("%d admitted, want the first 1 MiB write at once", got)
	}
	m.at(16*time.Second - 1)
	if got := m.rec.count(); got != 1 {
		t.Fatalf("%d admitted before 16s, want 1", got)
	}
	m.at(16 * time.Second)
	if got := m.rec.count(); got != 2 {
		t.Fatalf("%d admitted at 16s, want 2", got)
	}
}

// TestSetLimits: a raised limit speeds up requests already queued, a
// lowered one slows them from now on (the debt of the request admitted
// last is repaid at the new rate), a lifted one releases them at once,
// and a new limit applies to a direction that had none.
func TestSetLimits(t *testing.T) {
	m := newManual(Limits{ReadIOPS: 10})
	rs := reqs(200, engine.OpRead, 4096)
	m.submitAll(rs)
	m.at(time.Second)
	if got := m.rec.count(); got != 11 {
		t.Fatalf("at 10 IOPS after 1s: %d, want 11", got)
	}
	m.SetLimits(Limits{ReadIOPS: 100})
	m.at(2 * time.Second)
	if got := m.rec.count(); got != 111 {
		t.Fatalf("1s after raising to 100 IOPS: %d, want 111", got)
	}
	m.SetLimits(Limits{ReadIOPS: 20})
	m.at(3 * time.Second)
	if got := m.rec.count(); got != 131 {
		t.Fatalf("1s after lowering to 20 IOPS: %d, want 131", got)
	}
	if got := m.Limits(); got != (Limits{ReadIOPS: 20}) {
		t.Fatalf("Limits() = %+v", got)
	}
	m.SetLimits(Limits{})
	m.at(3 * time.Second)
	if got := m.rec.count(); got != 200 {
		t.Fatalf("after lifting the limit: %d, want all 200", got)
	}
	m.checkOrder(t, rs)
	m.SetLimits(Limits{WriteIOPS: 1})
	m.submitAll(reqs(3, engine.OpWrite, 4096))
	if got := m.rec.count(); got != 201 {
		t.Fatalf("writes under a new 1 IOPS limit: %d admitted at once, want 1", got-200)
	}
}

// TestClose: Close passes every queued request on at once, and later
// requests pass unlimited; SetLimits after Close changes nothing.
func TestClose(t *testing.T) {
	rec := &recorder{}
	q := New(rec, Limits{ReadIOPS: 1, WriteIOPS: 1})
	rs := reqs(10, engine.OpRead, 4096)
	ws := reqs(10, engine.OpWrite, 4096)
	for i := range rs {
		q.Submit(&rs[i])
		q.Submit(&ws[i])
	}
	if got := rec.count(); got != 2 {
		t.Fatalf("%d admitted before Close, want 2", got)
	}
	q.Close()
	if got := rec.count(); got != 20 {
		t.Fatalf("%d admitted after Close, want 20", got)
	}
	q.SetLimits(Limits{ReadIOPS: 1})
	more := reqs(5, engine.OpRead, 4096)
	for i := range more {
		q.Submit(&more[i])
	}
	if got := rec.count(); got != 25 {
		t.Fatalf("%d admitted, want 25: after Close nothing waits", got)
	}
	q.Close()
}

// TestNoAllocs: neither an admitted nor a queued and released request
// allocates, and neither does an unlimited one.
func TestNoAllocs(t *testing.T) {
	m := newManual(Limits{ReadIOPS: 1000, WriteBPS: 1 << 30})
	rs := reqs(4, engine.OpRead, 4096)
	ws := reqs(1, engine.OpWrite, 4096)
	flush := engine.Request{Op: engine.OpFlush}
	var tick time.Duration
	allocs := testing.AllocsPerRun(1000, func() {
		m.rec.reset()
		for i := range rs {
			m.Submit(&rs[i]) // the first at once, the rest queued
		}
		m.Submit(&ws[0])
		m.Submit(&flush)
		tick += 4 * time.Millisecond
		m.at(tick)
		if m.rec.count() != 6 {
			panic("not every request was admitted")
		}
	})
	if allocs != 0 {
		t.Fatalf("%v allocations per run, want 0", allocs)
	}
	if st := m.Stats().Read; st.Throttled == 0 {
		t.Fatalf("no request was queued: %+v", st)
	}
}

// loop is a Submitter that completes each request on a goroutine of its
// own, which submits it again at once: a client keeping qd requests in
// flight.
type loop struct {
	q      *Limiter
	ch     chan *engine.Request
	n      atomic.Int64
	stop   atomic.Bool
	wg     sync.WaitGroup
	stopCh chan struct{}
}

func (l *loop) Submit(r *engine.Request) {
	l.n.Add(1)
	l.ch <- r
}

func runLoop(q *Limiter, rec *loop, rs []engine.Request) {
	rec.q = q
	rec.ch = make(chan *engine.Request, len(rs))
	rec.stopCh = make(chan struct{})
	rec.wg.Go(func() {
		for {
			select {
			case r := <-rec.ch:
				if !rec.stop.Load() {
					q.Submit(r)
				}
			case <-rec.stopCh:
				return
			}
		}
	})
	for i := range rs {
		q.Submit(&rs[i])
	}
}

// TestRealClock runs the Limiter with its releaser and timers against a
// client keeping 32 reads in flight: what passes in a second never exceeds
// the limit (plus the one request the bucket admits at once), requests wait
// and are counted, and a raised limit applies live. The lower bounds are
// loose: they only say the limiter does not stall.
func TestRealClock(t *testing.T) {
	const limit = 2000
	l := &loop{}
	q := New(l, Limits{ReadIOPS: limit})
	defer q.Close()
	start := time.Now()
	runLoop(q, l, reqs(32, engine.OpRead, 4096))
	time.Sleep(time.Second)
	n1, el := l.n.Load(), time.Since(start)
	if max := int64(limit*el.Seconds()) + 1; n1 > max {
		t.Fatalf("%d admitted in %v, above %d (limit %d IOPS)", n1, el, max, limit)
	}
	if n1 < limit/2 {
		t.Fatalf("%d admitted in %v at a %d IOPS limit: the limiter stalls", n1, el, limit)
	}
	t.Logf("limit %d IOPS: %d in %v = %.1f IOPS (%.2f%% of the limit)", limit, n1, el, float64(n1)/el.Seconds(),
		100*float64(n1)/el.Seconds()/limit)
	st := q.Stats().Read
	if st.Throttled == 0 || st.ThrottledTime <= 0 {
		t.Fatalf("stats %+v: nothing throttled", st)
	}
	q.SetLimits(Limits{ReadIOPS: 4 * limit})
	start2 := time.Now()
	time.Sleep(time.Second)
	n2, el2 := l.n.Load()-n1, time.Since(start2)
	t.Logf("raised to %d IOPS: %.1f IOPS", 4*limit, float64(n2)/el2.Seconds())
	if max := int64(4*limit*(el2.Seconds()+0.01)) + 2; n2 > max {
		t.Fatalf("%d admitted in %v after raising to %d IOPS, above %d", n2, el2, 4*limit, max)
	}
	if n2 < 2*n1 {
		t.Fatalf("%d admitted in the second after raising the limit 4×, %d before: the raise did not apply", n2, n1)
	}
	l.stop.Store(true)
	close(l.stopCh)
	l.wg.Wait()
}

// BenchmarkSubmit measures a request's way through an unlimited and a
// limited Limiter whose limit never binds: the fast path's cost and
// allocations (0 allocs/op).
func BenchmarkSubmit(b *testing.B) {
	for _, c := range []struct {
		name string
		l    Limits
	}{{"unlimited", Limits{}}, {"limited", Limits{ReadIOPS: 1 << 40, ReadBPS: 1 << 50}}} {
		b.Run(c.name, func(b *testing.B) {
			q := New(discard{}, c.l)
			defer q.Close()
			b.ReportAllocs()
			b.RunParallel(func(pb *testing.PB) {
				r := engine.Request{Op: engine.OpRead, Length: 4096}
				for pb.Next() {
					q.Submit(&r)
				}
			})
		})
	}
}

type discard struct{}

func (discard) Submit(*engine.Request) {}
