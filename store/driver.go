package store

// A ShardDriver lets a frontend's locked OS thread run store shards itself:
// the shards' SQEs go on the frontend's io_uring and the frontend's loop
// handles their CQEs, so a request whose chunks live on a driven shard is
// submitted, issued and completed on one thread, with no mutex, eventfd or
// cross-thread wake-up.
//
// Invariants:
//   - Every method runs on the thread that called DriveShards (locked with
//     runtime.LockOSThread, the only issuer of the ring), except that other
//     goroutines keep pushing ops of foreign-submitted chunks to a driven
//     shard through its queue and eventfd, as with an undriven shard.
//   - A driven shard's state (see shard.go) is touched only by the driver's
//     thread, from DriveShards until Release hands it back to a new own
//     goroutine. Both hand-overs happen only while the shard is quiet.
//   - Every request submitted with Submit completes (engine.Request.Done) on
//     the driver's thread, inside Submit, Handle or Poll: parts finished by
//     other shards forward the request to the driver (see local.go). pending
//     counts those not yet completed; Release waits for zero.
//   - Shard user_data has a non-zero top byte; the frontend keeps it zero.

import (
	"errors"
	"fmt"
	"unsafe"

	"github.com/torus-storage/torus/engine"
	"github.com/torus-storage/torus/iouring"
)

// ShardDriver runs some of a Local volume's store shards on the caller's
// thread and io_uring. Make one with Local.DriveShards.
type ShardDriver struct {
	l       *Local
	st      *Store
	uring   *iouring.Uring
	shards  []*shard
	mine    [alShards]bool
	fixed   bool
	bufs    []fixedRange // the ring's registered buffers; index i is bufs[i]
	pending int
	cqes    [64]iouring.CQE
}

// fixedRange is the address range of one registered buffer.
type fixedRange struct{ lo, hi uintptr }

// RegisterBuffers registers bufs as the ring's fixed buffers (bufs[i] gets
// index i). From then on a read or write of a driven shard whose Buf lies
// inside one of them uses READ_FIXED or WRITE_FIXED, which saves pinning and
// unpinning its pages on every I/O. Call it once, on the driver's thread,
// before the first Submit; bufs must stay mapped until the ring is closed.
func (d *ShardDriver) RegisterBuffers(bufs [][]byte) error {
	if len(d.bufs) > 0 {
		return errors.New("store: RegisterBuffers: already registered")
	}
	if err := d.uring.RegisterBuffers(bufs); err != nil {
		return fmt.Errorf("store: RegisterBuffers: %w", err)
	}
	for _, b := range bufs {
		p := uintptr(unsafe.Pointer(unsafe.SliceData(b)))
		d.bufs = append(d.bufs, fixedRange{p, p + uintptr(len(b))})
	}
	return nil
}

// fixedIndex returns the index of the registered buffer that holds b.
func (d *ShardDriver) fixedIndex(b []byte) (uint16, bool) {
	p := uintptr(unsafe.Pointer(unsafe.SliceData(b)))
	for i, r := range d.bufs {
		if p >= r.lo && p+uintptr(len(b)) <= r.hi {
			return uint16(i), true
		}
	}
	return 0, false
}

// Shards returns the number of store shards; DriveShards takes ids in
// [0, Shards()).
func (l *Local) Shards() int { return l.st.nshards }

// DriveShards hands shards ids of the store to the calling goroutine, which
// must be locked to its OS thread (runtime.LockOSThread) and be the only
// submitter of r. It waits for each shard's own goroutine to finish what it
// has in flight. From then on the caller must run a loop that, on this
// thread only, calls Poll, Sleep before blocking in r.SubmitAndWait and Woke
// after, and passes every CQE whose user_data Owns accepts to Handle; and
// call Release before it closes r. Requests go in with Submit.
//
// r needs room for the shards' I/O besides the caller's: the shards submit
// the ring when the SQ is full and keep at most about 300 ops in flight
// each. DriveShards registers the store as r's fixed file 0 if r has no
// registered files; otherwise it uses the plain descriptor. Close of the
// volume waits until every driver has released its shards.
func (l *Local) DriveShards(r *iouring.Uring, ids ...int) (*ShardDriver, error) {
	return driveShards(l.st, l, r, ids)
}

// Shards returns the number of the store's shards; DriveShards takes ids in
// [0, Shards()).
func (s *Store) Shards() int { return s.nshards }

// DriveShards is Local.DriveShards for a frontend that submits chunk ops
// itself (the node server's unix connection): requests go in with
// SubmitChunk, not Submit, and an op of a driven shard completes (its
// ChunkCompleter is called) on the driver's thread. Close of the store
// waits until the driver has released its shards.
func (s *Store) DriveShards(r *iouring.Uring, ids ...int) (*ShardDriver, error) {
	return driveShards(s, nil, r, ids)
}

func driveShards(st *Store, l *Local, r *iouring.Uring, ids []int) (*ShardDriver, error) {
	if len(ids) == 0 {
		return nil, errors.New("store: DriveShards: no shard")
	}
	d := &ShardDriver{l: l, st: st, uring: r}
	for _, id := range ids {
		if id < 0 || id >= st.nshards || d.mine[id] {
			return nil, fmt.Errorf("store: DriveShards: bad shard %d of %d", id, st.nshards)
		}
		d.mine[id] = true
	}
	d.fixed = r.RegisterFiles([]int32{st.fd}) == nil
	for _, id := range ids {
		sh := st.shards[id]
		sh.mu.Lock()
		if sh.closed || sh.driver != nil || sh.yield {
			sh.mu.Unlock()
			err := fmt.Errorf("store: DriveShards: shard %d is closed or driven already", id)
			if rerr := d.Release(); rerr != nil {
				err = errors.Join(err, rerr)
			}
			return nil, err
		}
		sh.yield = true
		ch := sh.runDone
		sh.mu.Unlock()
		sh.wakeNow()
		<-ch // the own goroutine is quiet and gone
		sh.mu.Lock()
		sh.yield = false
		sh.driver = d
		sh.runDone = make(chan struct{})
		sh.mu.Unlock()
		sh.useUring(r, d.fixed)
		sh.armWake()
		d.shards = append(d.shards, sh)
	}
	return d, nil
}

// Owns reports whether a CQE with this user_data belongs to the shards.
func (d *ShardDriver) Owns(userData uint64) bool { return userData&udMask != 0 }

// Handle processes a CQE that Owns accepted.
func (d *ShardDriver) Handle(c *iouring.CQE) {
	id := int(c.UserData>>udShardShift) & 0xff
	if id >= len(d.mine) || !d.mine[id] {
		return // a shard released earlier: only its wake poll can be left
	}
	d.st.shards[id].complete(c.UserData, c.Res)
}

// Submit starts r like Local.Submit but never blocks; r completes on this
// thread (possibly inside Submit). Only a driver made by Local.DriveShards
// takes requests; one made by Store.DriveShards fails them.
func (d *ShardDriver) Submit(r *engine.Request) {
	if d.l == nil {
		r.Done.Complete(r, errors.New("store: Submit on a store's shard driver; use SubmitChunk"))
		return
	}
	d.l.submit(r, d)
}

// SubmitChunk starts op like Store.Submit but never blocks: an op of a
// driven shard is issued on this thread and completes here (inside
// SubmitChunk, Handle or Poll); an op of another shard goes through that
// shard's queue and completes on its thread.
func (d *ShardDriver) SubmitChunk(op *ChunkOp) {
	if err := d.st.check(op); err != nil {
		op.sh = nil
		op.Done.CompleteChunk(op, err)
		return
	}
	d.submitOp(op)
}

// submitOp starts one chunk op: right here for a driven shard, else through
// the owning shard's queue.
func (d *ShardDriver) submitOp(op *ChunkOp) {
	op.sh = nil
	if d.st.closed.Load() {
		op.Done.CompleteChunk(op, engine.ErrClosed)
		return
	}
	var sh *shard
	if op.Op == engine.OpFlush {
		sh = d.shards[0]
	} else {
		id := d.st.shardOfIndex(op.Chunk)
		if !d.mine[id] {
			d.st.shards[id].push(op)
			return
		}
		sh = d.st.shards[id]
	}
	op.sh = sh
	sh.accept(op)
}

// Poll takes in what other goroutines pushed to the driven shards (ops and
// requests to complete). Call it every turn of the loop.
func (d *ShardDriver) Poll() {
	for _, sh := range d.shards {
		sh.mu.Lock()
		if len(sh.queue) == 0 {
			sh.mu.Unlock()
			continue
		}
		sh.local, sh.queue = sh.queue, sh.local[:0]
		sh.mu.Unlock()
		for i, op := range sh.local {
			sh.local[i] = nil
			sh.accept(op)
		}
		sh.local = sh.local[:0]
	}
}

// Sleep prepares to block in SubmitAndWait: pushes from now on wake the
// ring. It returns false, and the caller must not block, when something
// was pushed already.
func (d *ShardDriver) Sleep() bool {
	for _, sh := range d.shards {
		sh.sleeping.Store(1)
	}
	for _, sh := range d.shards {
		sh.mu.Lock()
		n := len(sh.queue)
		sh.mu.Unlock()
		if n > 0 {
			d.Woke()
			return false
		}
	}
	return true
}

// Woke ends what Sleep began.
func (d *ShardDriver) Woke() {
	for _, sh := range d.shards {
		sh.sleeping.Store(0)
	}
}

// Release waits until every request submitted through d has completed and
// the shards have nothing in flight, handling the ring's CQEs meanwhile
// (others than the shards' are dropped: call it after the frontend is done
// with the ring), then gives the shards back to their own goroutines. The
// caller may close the ring afterwards.
func (d *ShardDriver) Release() error {
	for {
		d.Poll()
		busy := d.pending > 0
		for _, sh := range d.shards {
			if !sh.quiet() {
				busy = true
			}
		}
		if !busy {
			break
		}
		wait := uint32(0)
		if d.Sleep() {
			wait = 1
		}
		_, err := d.uring.SubmitAndWait(wait)
		d.Woke()
		if err != nil && !errors.Is(err, iouring.ErrCQOverflow) {
			return fmt.Errorf("store: release shards: %w", err)
		}
		n := d.uring.PeekCQEs(d.cqes[:])
		for i := 0; i < n; i++ {
			if c := &d.cqes[i]; d.Owns(c.UserData) {
				d.Handle(c)
			}
		}
	}
	var errs []error
	for _, sh := range d.shards {
		sh.mu.Lock()
		sh.driver = nil
		old := sh.runDone
		done := make(chan struct{})
		sh.runDone = done
		sh.mu.Unlock()
		ready := make(chan error, 1)
		go sh.run(ready, done)
		if err := <-ready; err != nil {
			errs = append(errs, fmt.Errorf("store: release shard %d: %w", sh.id, err))
		}
		close(old)
	}
	for i := range d.mine {
		d.mine[i] = false
	}
	d.shards = nil
	return errors.Join(errs...)
}
