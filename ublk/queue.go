package ublk

// One ublk queue: a goroutine locked to its OS thread that owns the queue's
// io_uring, fetches requests from /dev/ublkcN and hands them to the Volume.
//
// Invariants:
//   - The queue goroutine calls runtime.LockOSThread before it creates the
//     ring and never unlocks: the thread that FETCHes is the queue's daemon
//     for the kernel, and the ring (SINGLE_ISSUER|DEFER_TASKRUN) belongs to
//     it. The goroutine returns only when every tag is finished (the device
//     stopped) or the queue was told to quit after STOP_DEV; the locked
//     thread then dies with it.
//   - Every tag is in exactly one place: in the kernel (a FETCH or
//     COMMIT_AND_FETCH outstanding, counted by inKernel), at the volume
//     (counted by inVolume), or finished (dead). Only the queue goroutine
//     changes the counters.
//   - Completions arrive on other goroutines. tag.Complete stores the result
//     in the tag and appends the tag number to q.done under q.mu. q.signaled
//     is false only while the queue thread is about to sleep with q.done
//     empty (it checks and clears it under q.mu); the push that finds it
//     false sets it and writes the eventfd, and the READ of the eventfd kept
//     in flight in the ring completes and wakes the thread out of
//     io_uring_enter (with DEFER_TASKRUN nothing else could). While the
//     thread is awake pushes make no syscall. q.done and q.spare have
//     capacity depth and each tag is in at most one of them, so append never
//     allocates.
//   - The eventfd is written only under q.mu and closed only under q.mu
//     (q.efdClosed), so no late completer or requestQuit writes to a closed
//     and possibly reused descriptor number.
//   - The descriptor area is mapped read-only and read only for a tag the
//     kernel just handed over (FETCH CQE with result 0).
//   - A queue that drives store shards (drv, see store.ShardDriver) runs
//     them on this thread and ring: CQEs whose user_data drv.Owns go to the
//     shards, the rest are ours. Every request it submits completes on this
//     thread, so its tags commit directly (commit), without q.mu or the
//     eventfd. drv is set in setup before the first Submit and released
//     after the loop, before the ring is closed.
//   - Tag buffers are alignbuf memory (outside the Go heap): the kernel copies
//     WRITE data into them before the FETCH CQE and READ data out of them at
//     COMMIT, so they must not move. A queue that drives store shards
//     registers them as its ring's fixed buffer (pinned until the ring
//     closes, which release does before freeing them).

import (
	"errors"
	"fmt"
	"log/slog"
	"runtime"
	"sync"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/torus-storage/torus/engine"
	"github.com/torus-storage/torus/internal/alignbuf"
	"github.com/torus-storage/torus/iouring"
	"github.com/torus-storage/torus/store"
)

// pollData is the user_data of the eventfd POLL_ADD; tag commands use the tag.
const pollData = 1 << 32

type tagState struct {
	q    *queue
	req  engine.Request
	buf  []byte
	res  int32
	tag  uint16
	dead bool
}

// Complete is the engine.Completer of the tag's request; it may run on any
// goroutine, possibly inside Submit.
func (t *tagState) Complete(r *engine.Request, err error) {
	switch {
	case err != nil:
		t.res = -int32(engine.Errno(err))
	case r.Op == engine.OpRead || r.Op == engine.OpWrite:
		t.res = int32(r.Length)
	default:
		t.res = 0
	}
	if t.q.drv != nil {
		t.q.commit(t.tag)
		return
	}
	t.q.push(t.tag)
}

// driveable is a Volume whose store shards a queue thread can run itself
// (store.Local).
type driveable interface {
	Shards() int
	DriveShards(r *iouring.Uring, ids ...int) (*store.ShardDriver, error)
}

type queue struct {
	id    int
	depth int
	maxIO int
	cfd   int // /dev/ublkcN
	vol   engine.Volume
	log   *slog.Logger

	opFetch, opCommit uint32

	uring *iouring.Uring
	descs []byte
	bufs  []byte
	efd   int
	tags  []tagState
	cqes  []iouring.CQE

	inKernel    int
	inVolume    int
	efdBuf      []byte // 8 bytes of alignbuf memory the eventfd READ fills
	quitting    bool
	ioErrLogged bool

	mu        sync.Mutex
	done      []uint16
	spare     []uint16
	signaled  bool
	efdClosed bool
	one       [8]byte

	drvIDs []int              // shards this queue drives
	drv    *store.ShardDriver // nil when the queue drives no shard

	quit   atomic.Bool
	exited chan struct{}
	err    error // set before exited is closed
}

func newQueue(id, depth, maxIO, cfd int, legacy bool, vol engine.Volume, drvIDs []int, log *slog.Logger) *queue {
	q := &queue{
		id: id, depth: depth, maxIO: maxIO, cfd: cfd, vol: vol, log: log, drvIDs: drvIDs,
		opFetch:  ioOp(ioFetchReq, legacy),
		opCommit: ioOp(ioCommitAndFetchReq, legacy),
		efd:      -1,
		tags:     make([]tagState, depth),
		cqes:     make([]iouring.CQE, 2*depth+4),
		done:     make([]uint16, 0, depth),
		spare:    make([]uint16, 0, depth),
		exited:   make(chan struct{}),
	}
	q.one[0] = 1
	for i := range q.tags {
		t := &q.tags[i]
		t.q, t.tag = q, uint16(i)
		t.req.Done = t
		t.req.Tag = uint64(i)
	}
	return q
}

// push hands a completed tag back to the queue thread.
func (q *queue) push(tag uint16) {
	q.mu.Lock()
	q.done = append(q.done, tag)
	if !q.signaled {
		q.signaled = true
		q.wakeLocked()
	}
	q.mu.Unlock()
}

// wakeLocked writes the eventfd; q.mu is held.
func (q *queue) wakeLocked() {
	if q.efdClosed || q.efd < 0 {
		return
	}
	for {
		_, err := unix.Write(q.efd, q.one[:])
		if err != unix.EINTR {
			return
		}
	}
}

// requestQuit makes the queue stop committing, wait for the volume and exit,
// closing its ring (which cancels the commands still in the kernel).
func (q *queue) requestQuit() {
	q.quit.Store(true)
	q.mu.Lock()
	q.wakeLocked()
	q.mu.Unlock()
}

// run is the queue goroutine. It reports setup (ring, mapping, FETCH of every
// tag submitted) on ready, then serves until the queue is finished.
func (q *queue) run(ready chan<- error) {
	runtime.LockOSThread() // never unlocked: see the invariants
	defer close(q.exited)
	if err := q.setup(); err != nil {
		q.err = err
		q.release()
		ready <- err
		return
	}
	ready <- nil
	q.err = q.loop()
	q.release()
}

func (q *queue) setup() error {
	// Avoid reclaim recursion through our own device (as ublksrv does);
	// needs CAP_SYS_RESOURCE, so failure is only logged.
	if err := unix.Prctl(unix.PR_SET_IO_FLUSHER, 1, 0, 0, 0); err != nil {
		q.log.Debug("ublk: PR_SET_IO_FLUSHER refused", "queue", q.id, "err", err)
	}
	entries := uint32(q.depth + 2)
	if len(q.drvIDs) > 0 {
		entries += 512 // the shards' I/O (they submit when the SQ is full)
	}
	var err error
	q.uring, err = iouring.NewThreadUring(entries)
	if err != nil {
		return fmt.Errorf("ublk: queue %d ring: %w", q.id, err)
	}
	if uint32(len(q.cqes)) < q.uring.CQEntries() {
		q.cqes = make([]iouring.CQE, q.uring.CQEntries())
	}
	ps := unix.Getpagesize()
	q.descs, err = unix.Mmap(q.cfd, descOffset(q.id, ps), descLen(q.depth, ps), unix.PROT_READ, unix.MAP_SHARED|unix.MAP_POPULATE)
	if err != nil {
		return fmt.Errorf("ublk: queue %d: mmap descriptors: %w", q.id, err)
	}
	if err := q.allocBufs(); err != nil {
		return err
	}
	if len(q.drvIDs) > 0 {
		drv, err := q.vol.(driveable).DriveShards(q.uring, q.drvIDs...)
		if err != nil {
			return fmt.Errorf("ublk: queue %d: %w", q.id, err)
		}
		q.drv = drv
		// The tag buffers become the ring's fixed buffer: the store's reads
		// and writes into them (READ_FIXED/WRITE_FIXED) skip pinning and
		// unpinning their pages on every I/O. That pins depth*maxIO bytes
		// for the device's life; where the kernel refuses (RLIMIT_MEMLOCK)
		// plain buffers work the same, a little slower.
		if err := drv.RegisterBuffers([][]byte{q.bufs[:q.depth*q.maxIO]}); err != nil {
			q.log.Warn("ublk: tag buffers not registered with io_uring; using plain buffers",
				"queue", q.id, "bytes", q.depth*q.maxIO, "err", err)
		}
	}
	// Blocking, so that the ring's READ waits (a non-blocking fd would
	// make it fail with EAGAIN); writes never block at our counts.
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
	if err != nil {
		return fmt.Errorf("ublk: queue %d eventfd: %w", q.id, err)
	}
	q.efd = efd
	for i := range q.tags {
		q.prepCmd(q.opFetch, uint16(i), 0)
	}
	q.armWake()
	if _, err := q.uring.Submit(); err != nil {
		return fmt.Errorf("ublk: queue %d: submit FETCH_REQ: %w", q.id, err)
	}
	return nil
}

// release frees what setup made; ring first so that the kernel lets go of
// the buffers before they are unmapped.
func (q *queue) release() {
	if q.drv != nil {
		if err := q.drv.Release(); err != nil {
			q.log.Error("ublk: giving the store shards back failed", "queue", q.id, "err", err)
		}
		q.drv = nil
	}
	if q.uring != nil {
		q.uring.Close()
	}
	if q.descs != nil {
		unix.Munmap(q.descs)
		q.descs = nil
	}
	q.mu.Lock()
	if q.efd >= 0 {
		unix.Close(q.efd)
		q.efd = -1
	}
	q.efdClosed = true
	q.mu.Unlock()
	if q.bufs != nil {
		alignbuf.Free(q.bufs)
		q.bufs = nil
	}
}

// allocBufs maps the tag buffers and, after them, the eventfd read buffer.
func (q *queue) allocBufs() error {
	n := q.depth * q.maxIO
	var err error
	q.bufs, err = alignbuf.Alloc(n + alignbuf.PageSize)
	if err != nil {
		return fmt.Errorf("ublk: queue %d buffers: %w", q.id, err)
	}
	for i := range q.tags {
		q.tags[i].buf = q.bufs[i*q.maxIO : (i+1)*q.maxIO : (i+1)*q.maxIO]
	}
	q.efdBuf = q.bufs[n : n+8 : n+8]
	return nil
}

func (q *queue) prepCmd(op uint32, tag uint16, res int32) {
	q.fillCmd(q.sqe(), op, tag, res)
	q.inKernel++
}

// sqe returns a free SQE. Without shards it is never short (at most depth
// commands plus one read); with them it submits a full SQ to make room.
func (q *queue) sqe() *iouring.SQE {
	for {
		if e := q.uring.SQE(); e != nil {
			return e
		}
		if _, err := q.uring.Submit(); err != nil {
			q.log.Error("ublk: io_uring submit failed", "queue", q.id, "err", err)
		}
	}
}

// fillCmd prepares sqe (fresh from Ring.SQE) as I/O command op for tag.
// The buffer address goes with every command: COMMIT_AND_FETCH_REQ carries
// it too (the kernel re-reads it for the next request).
func (q *queue) fillCmd(sqe *iouring.SQE, op uint32, tag uint16, res int32) {
	sqe.PrepURingCmd(int32(q.cfd), op)
	c := (*ioCmd)(unsafe.Pointer(sqe.Cmd()))
	c.qID = uint16(q.id)
	c.tag = tag
	c.result = res
	c.addr = uint64(uintptr(unsafe.Pointer(&q.tags[tag].buf[0])))
	sqe.UserData = uint64(tag)
}

// armWake keeps a READ of the eventfd in flight: it completes (resetting
// the counter) when a completer writes the eventfd.
func (q *queue) armWake() {
	sqe := q.sqe()
	sqe.PrepRead(int32(q.efd), q.efdBuf, ^uint64(0))
	sqe.UserData = pollData
}

func (q *queue) loop() error {
	for {
		if q.quit.Load() {
			q.quitting = true
		}
		if q.inVolume == 0 && (q.inKernel == 0 || q.quitting) {
			return nil
		}
		drv := q.drv
		if drv != nil {
			drv.Poll()
		}
		// Sleep only if nothing was handed back since the last drain; from
		// here on a push must write the eventfd.
		wait := uint32(1)
		q.mu.Lock()
		if len(q.done) > 0 {
			wait = 0
		} else {
			q.signaled = false
		}
		q.mu.Unlock()
		if wait == 1 && drv != nil && !drv.Sleep() {
			wait = 0
		}
		_, err := q.uring.SubmitAndWait(wait)
		if drv != nil {
			drv.Woke()
		}
		if err != nil && !errors.Is(err, iouring.ErrCQOverflow) {
			return fmt.Errorf("ublk: queue %d: %w", q.id, err)
		}
		n := q.uring.PeekCQEs(q.cqes)
		for i := 0; i < n; i++ {
			c := &q.cqes[i]
			if drv != nil && drv.Owns(c.UserData) {
				drv.Handle(c)
				continue
			}
			q.handle(c)
		}
		q.drain()
	}
}

// handle processes one CQE of the queue ring.
func (q *queue) handle(c *iouring.CQE) {
	if c.UserData == pollData {
		if c.Res >= 0 || c.Res == -int32(unix.EINTR) || c.Res == -int32(unix.EAGAIN) {
			// Kept armed while quitting too: the volume's last completions
			// must still wake the thread.
			q.armWake()
		}
		return
	}
	tag := uint16(c.UserData)
	q.inKernel--
	switch c.Res {
	case ioResOK:
		if q.quitting {
			q.tags[tag].dead = true
			return
		}
		q.start(tag)
	case ioResAbort:
		q.tags[tag].dead = true
	default:
		q.tags[tag].dead = true
		if !q.ioErrLogged {
			q.ioErrLogged = true
			q.log.Error("ublk: queue command failed; tag abandoned", "queue", q.id, "tag", tag, "err", unix.Errno(-c.Res))
		}
	}
}

// start turns the descriptor of tag into a Request and submits it.
func (q *queue) start(tag uint16) {
	d := (*ioDesc)(unsafe.Pointer(&q.descs[int(tag)*int(unsafe.Sizeof(ioDesc{}))]))
	t := &q.tags[tag]
	r := &t.req
	opFlags := d.opFlags
	r.Offset = int64(d.startSector) << 9
	r.Length = int64(d.nrSectors) << 9
	r.Flags = 0
	r.Buf = nil
	if opFlags&ioFlagFUA != 0 {
		r.Flags |= engine.FlagFUA
	}
	switch uint8(opFlags) {
	case opRead, opWrite:
		if r.Length > int64(len(t.buf)) {
			q.finish(tag, -int32(unix.EINVAL))
			return
		}
		r.Op = engine.OpRead
		if uint8(opFlags) == opWrite {
			r.Op = engine.OpWrite
		}
		r.Buf = t.buf[:r.Length]
	case opFlush:
		r.Op, r.Offset, r.Length = engine.OpFlush, 0, 0
	case opDiscard:
		r.Op = engine.OpDiscard
	case opWriteZeroes:
		r.Op = engine.OpWriteZeroes
		if opFlags&ioFlagNoUnmap != 0 {
			r.Flags |= engine.FlagNoUnmap
		}
	default:
		q.finish(tag, -int32(unix.EOPNOTSUPP))
		return
	}
	q.inVolume++
	if q.drv != nil {
		q.drv.Submit(r)
		return
	}
	q.vol.Submit(r)
}

// commit commits tag, which the volume completed, on the queue thread.
func (q *queue) commit(tag uint16) {
	q.inVolume--
	if q.quitting {
		q.tags[tag].dead = true
		return
	}
	res := q.tags[tag].res
	if res == 0 && q.tags[tag].req.Op == engine.OpRead {
		res = -int32(unix.EIO) // never happens for a non-empty read
	}
	q.prepCmd(q.opCommit, tag, res)
}

// finish commits tag's result right away (a request the volume never saw).
func (q *queue) finish(tag uint16, res int32) {
	q.prepCmd(q.opCommit, tag, res)
}

// drain commits the tags the volume completed since the last drain.
func (q *queue) drain() {
	q.mu.Lock()
	list := q.done
	q.done = q.spare[:0]
	q.spare = list
	q.mu.Unlock()
	for _, tag := range list {
		q.commit(tag)
	}
}
