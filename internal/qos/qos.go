// Package qos limits the I/O a client admits to a volume: read and write
// IOPS and bytes per second, each a token bucket with a burst, enforced in
// front of an engine.Volume's Submit without allocating, sleeping or
// starting a goroutine per request.
//
// Model. Each limit is a bucket that fills at its rate and holds at most
// rate × Burst: a volume idle for Burst may run that much above its rate,
// then it is held to the rate. Burst 0 paces requests at exactly the rate.
// A request costs one op and, for reads and writes, its length in bytes of
// its direction's buckets; discard and write-zeroes are writes of no bytes;
// flushes are not limited. A request larger than a bucket is admitted when
// the bucket is full and leaves it in debt, so any size goes through and
// the average rate still holds. 0 is unlimited.
//
// The buckets are kept as theoretical arrival times (GCRA, the generic cell
// rate algorithm): a bucket of rate r and burst τ admits a request of cost
// c at time t if tat − τ ≤ t, and then tat = max(tat, t) + c/r. A request
// released late by the timer is admitted at the time it was due, not at
// the time it was released, so timer latency does not lower the long-run
// rate.
//
// Invariants:
//   - Per direction (reads; writes and the other changes), requests are
//     admitted in the order they were submitted: a request is admitted at
//     once only when nothing of its direction waits; otherwise it joins the
//     FIFO, and only the releaser takes from the FIFO, head first.
//   - Within any interval of admission times of length T, a bucket of rate
//     r and burst τ admits at most r·(T + τ) units plus one request.
//   - Submit never sleeps: a request that must wait is queued under its
//     direction's mutex and Submit returns. One releaser goroutine per
//     Limiter, woken by one timer per direction armed for the FIFO's head,
//     passes due requests on. A frontend thread that submits (a ublk queue
//     thread, an NBD connection's thread) is never stalled by the limit.
//   - Nothing is allocated per request: the FIFO is a ring buffer that grows
//     (doubling) only past the largest backlog seen, and a frontend bounds
//     its requests in flight.
//   - Each direction has its own mutex, held for a few arithmetic operations
//     and a ring-buffer push or pop; an unlimited direction costs one atomic
//     load and no lock.
//   - SetLimits applies at once, to queued requests too; lifting a limit
//     releases what waits on it. Close releases everything queued.
package qos

import (
	"sync"
	"sync/atomic"
	"time"

	"github.com/torus-storage/torus/engine"
)

// Limits are the QoS limits of one volume. A zero field is unlimited; the
// zero Limits limit nothing.
type Limits struct {
	// ReadIOPS and WriteIOPS are requests per second.
	ReadIOPS, WriteIOPS uint64
	// ReadBPS and WriteBPS are bytes per second.
	ReadBPS, WriteBPS uint64
	// Burst is how much credit an idle bucket saves: a bucket holds
	// rate × Burst. 0 paces requests at the rate with no burst.
	Burst time.Duration
}

// Unlimited reports whether l limits nothing.
func (l Limits) Unlimited() bool {
	return l.ReadIOPS == 0 && l.WriteIOPS == 0 && l.ReadBPS == 0 && l.WriteBPS == 0
}

// Stats are what a Limiter held back, per direction, since New.
type Stats struct {
	// Read and Write count requests of each direction (Write includes
	// discard and write-zeroes).
	Read, Write DirStats
}

// DirStats are the throttle counters of one direction.
type DirStats struct {
	// Throttled counts requests that had to wait.
	Throttled uint64
	// ThrottledTime adds up how long they waited, from Submit to their
	// release to the volume.
	ThrottledTime time.Duration
	// Queued is the number of requests waiting now.
	Queued int
}

// Submitter is what a Limiter passes admitted requests to: an
// engine.Volume.
type Submitter interface {
	Submit(r *engine.Request)
}

// Limiter admits requests to a Submitter within its Limits. Its Submit has
// the contract of engine.Volume.Submit.
type Limiter struct {
	next  Submitter
	base  time.Time    // the zero of the nanosecond clock now reads
	clock func() int64 // now; tests replace it with a clock they move
	dirs  [2]direction
	kick  chan struct{} // wakes the releaser after SetLimits or Close
	done  chan struct{} // closed by Close: the releaser drains and ends
	ended chan struct{} // closed by the releaser when it ends

	lmu    sync.Mutex // guards limits and closed
	limits Limits
	closed bool
}

// Directions.
const (
	dirRead = iota
	dirWrite
)

// direction is the buckets and the FIFO of one direction.
type direction struct {
	limited atomic.Bool // a bucket has a rate; read without mu on the fast path
	timer   *time.Timer // armed for the head's due time while the FIFO is not empty

	mu         sync.Mutex
	ops, bytes bucket
	tau        int64 // burst, ns
	fifo       ring

	throttled   atomic.Uint64
	throttledNs atomic.Int64
	queued      atomic.Int64
}

// bucket is one rate in GCRA form.
type bucket struct {
	rate uint64 // units per second; 0: unlimited
	tat  int64  // theoretical arrival time, ns on the Limiter's clock
}

// New returns a Limiter that passes requests to next within l. Close it to
// stop its releaser goroutine; it does not close next.
func New(next Submitter, l Limits) *Limiter {
	q := newLimiter(next, l)
	go q.releaser()
	return q
}

// newLimiter is New without the releaser goroutine.
func newLimiter(next Submitter, l Limits) *Limiter {
	q := &Limiter{next: next, base: time.Now(), kick: make(chan struct{}, 1),
		done: make(chan struct{}), ended: make(chan struct{})}
	q.clock = q.monotonic
	for i := range q.dirs {
		d := &q.dirs[i]
		d.timer = time.NewTimer(time.Hour)
		d.timer.Stop()
		d.fifo.init(64)
	}
	q.SetLimits(l)
	return q
}

// monotonic is the time since New in nanoseconds, on the monotonic clock.
func (q *Limiter) monotonic() int64 { return int64(time.Since(q.base)) }

// now is the Limiter's clock in nanoseconds.
func (q *Limiter) now() int64 { return q.clock() }

// Limits returns the limits in force.
func (q *Limiter) Limits() Limits {
	q.lmu.Lock()
	defer q.lmu.Unlock()
	return q.limits
}

// Stats returns the throttle counters.
func (q *Limiter) Stats() Stats {
	get := func(d *direction) DirStats {
		return DirStats{Throttled: d.throttled.Load(), ThrottledTime: time.Duration(d.throttledNs.Load()),
			Queued: int(d.queued.Load())}
	}
	return Stats{Read: get(&q.dirs[dirRead]), Write: get(&q.dirs[dirWrite])}
}

// SetLimits replaces the limits. It applies to requests already queued: a
// lifted limit releases them, a changed one reschedules the head. What a
// bucket admitted ahead of its old rate is repaid at the new one. After
// Close it does nothing.
func (q *Limiter) SetLimits(l Limits) {
	q.lmu.Lock()
	defer q.lmu.Unlock()
	if !q.closed {
		q.apply(l)
	}
}

// apply puts l in force and wakes the releaser; q.lmu is held.
func (q *Limiter) apply(l Limits) {
	l.Burst = max(l.Burst, 0)
	q.limits = l
	now := q.now()
	q.dirs[dirRead].set(l.ReadIOPS, l.ReadBPS, l.Burst, now)
	q.dirs[dirWrite].set(l.WriteIOPS, l.WriteBPS, l.Burst, now)
	select {
	case q.kick <- struct{}{}:
	default:
	}
}

// set changes the rates of d (see SetLimits).
func (d *direction) set(ops, bytes uint64, burst time.Duration, now int64) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.ops.setRate(ops, now)
	d.bytes.setRate(bytes, now)
	d.tau = int64(burst)
	d.limited.Store(ops != 0 || bytes != 0)
}

// setRate changes the rate of b. Its debt (what it admitted ahead of its
// rate) is kept in units, and so takes the time of the new rate to repay.
func (b *bucket) setRate(rate uint64, now int64) {
	if b.rate == rate {
		return
	}
	if b.rate != 0 && rate != 0 && b.tat > now {
		b.tat = now + int64(float64(b.tat-now)*float64(b.rate)/float64(rate))
	} else {
		b.tat = min(b.tat, now)
	}
	b.rate = rate
}

// dirOf is the direction of op, or nil for an op that is not limited.
func (q *Limiter) dirOf(op engine.Op) *direction {
	switch op {
	case engine.OpRead:
		return &q.dirs[dirRead]
	case engine.OpWrite, engine.OpDiscard, engine.OpWriteZeroes:
		return &q.dirs[dirWrite]
	}
	return nil
}

// cost is the bytes r takes from its direction's byte bucket.
func cost(r *engine.Request) uint64 {
	if r.Op == engine.OpRead || r.Op == engine.OpWrite {
		return uint64(r.Length)
	}
	return 0
}

// Submit admits r to the next Submitter now, or queues it until its
// direction's buckets allow it. It never blocks beyond the next
// Submitter's own back-pressure and allocates nothing.
func (q *Limiter) Submit(r *engine.Request) {
	d := q.dirOf(r.Op)
	if d == nil || !d.limited.Load() {
		q.next.Submit(r)
		return
	}
	d.mu.Lock()
	// Read under the lock: a time read before it could be older than
	// what another submitter admitted at, and wait for no reason.
	now := q.now()
	if d.fifo.n == 0 {
		if !d.limitedLocked() {
			d.mu.Unlock()
			q.next.Submit(r)
			return
		}
		if t := d.admitTime(r, now); t <= now {
			d.admit(r, t)
			d.mu.Unlock()
			q.next.Submit(r)
			return
		}
	}
	d.fifo.push(r, now)
	d.queued.Add(1)
	if d.fifo.n == 1 {
		d.timer.Reset(time.Duration(d.admitTime(r, now) - now))
	}
	d.mu.Unlock()
}

// limitedLocked reports whether a bucket of d has a rate; d.mu is held.
func (d *direction) limitedLocked() bool { return d.ops.rate != 0 || d.bytes.rate != 0 }

// admitTime is the earliest time r may be admitted, not before at; d.mu is
// held.
func (d *direction) admitTime(r *engine.Request, at int64) int64 {
	t := at
	if d.ops.rate != 0 {
		t = max(t, d.ops.tat-d.tau)
	}
	if d.bytes.rate != 0 && cost(r) != 0 {
		t = max(t, d.bytes.tat-d.tau)
	}
	return t
}

// admit charges r to d's buckets as admitted at time t; d.mu is held.
func (d *direction) admit(r *engine.Request, t int64) {
	d.ops.charge(1, t)
	d.bytes.charge(cost(r), t)
}

// charge takes c units from b at time t.
func (b *bucket) charge(c uint64, t int64) {
	if b.rate == 0 || c == 0 {
		return
	}
	b.tat = max(b.tat, t) + int64(c*uint64(time.Second)/b.rate)
}

// releaser passes queued requests on when they are due, until Close.
func (q *Limiter) releaser() {
	defer close(q.ended)
	for {
		closing := false
		select {
		case <-q.dirs[dirRead].timer.C:
		case <-q.dirs[dirWrite].timer.C:
		case <-q.kick:
		case <-q.done:
			closing = true
		}
		q.release(&q.dirs[dirRead], closing)
		q.release(&q.dirs[dirWrite], closing)
		if closing {
			return
		}
	}
}

// release passes on every request of d that is due (all of them when
// closing), head first, and arms d's timer for the next.
func (q *Limiter) release(d *direction, closing bool) {
	for {
		d.mu.Lock()
		if d.fifo.n == 0 {
			d.mu.Unlock()
			return
		}
		now := q.now()
		limited := d.limitedLocked() && !closing
		r, at := d.fifo.peek()
		if limited {
			// Computed again each time: SetLimits may have changed the
			// buckets since the timer was armed.
			due := d.admitTime(r, at)
			if due > now {
				d.timer.Reset(time.Duration(due - now))
				d.mu.Unlock()
				return
			}
			d.admit(r, due)
		}
		d.fifo.pop()
		d.queued.Add(-1)
		d.mu.Unlock()
		d.throttled.Add(1)
		d.throttledNs.Add(now - at)
		q.next.Submit(r)
	}
}

// Close releases every queued request to the next Submitter, whatever the
// limits, and stops the releaser. Later requests pass unlimited. It does
// not close the next Submitter.
func (q *Limiter) Close() {
	q.lmu.Lock()
	if q.closed {
		q.lmu.Unlock()
		return
	}
	// Once every direction is unlimited nothing more joins a FIFO, so the
	// releaser's last pass leaves them empty.
	q.closed = true
	q.apply(Limits{})
	q.lmu.Unlock()
	close(q.done)
	<-q.ended
	for i := range q.dirs {
		q.dirs[i].timer.Stop()
	}
}

// ring is a FIFO of requests and their submission times.
type ring struct {
	buf  []entry
	head int
	n    int
}

type entry struct {
	r  *engine.Request
	at int64
}

func (f *ring) init(n int) { f.buf = make([]entry, n) }

// push appends r, doubling the buffer when it is full.
func (f *ring) push(r *engine.Request, at int64) {
	if f.n == len(f.buf) {
		nb := make([]entry, 2*len(f.buf))
		for i := range f.n {
			nb[i] = f.buf[(f.head+i)%len(f.buf)]
		}
		f.buf, f.head = nb, 0
	}
	f.buf[(f.head+f.n)%len(f.buf)] = entry{r, at}
	f.n++
}

// peek returns the head; the ring is not empty.
func (f *ring) peek() (*engine.Request, int64) {
	e := f.buf[f.head]
	return e.r, e.at
}

// pop drops the head; the ring is not empty.
func (f *ring) pop() {
	f.buf[f.head] = entry{}
	f.head = (f.head + 1) % len(f.buf)
	f.n--
}
