package nbd

// The transmission phase of one connection on one io_uring thread.
//
// When the export's volume lets a caller run its store shards
// (store.Local.DriveShards), a connection is served by one goroutine locked
// to its OS thread that owns one io_uring: it receives requests with RECV
// into a large buffer, parses every whole request in it, submits them to the
// shards it drives (their reads and writes go on the same ring), and sends
// the replies that completed during one turn of the loop with one SENDMSG.
// The thread blocks only in io_uring_enter. No goroutine, channel hand-off,
// mutex or eventfd is on the path of a request whose chunks live on a
// driven shard.
//
// Invariants:
//   - Everything below (slots, buffers, rbuf, replies, the send state, the
//     ShardDriver) is touched only by the uring thread, except stopping,
//     which shutdown sets, and fdOpen, guarded by fdMu. store.ShardDriver
//     completes every request submitted through it on this thread (inside
//     Submit, Handle or Poll), so rslot.Complete runs here too.
//   - A slot is in exactly one place: free, being filled (payload), at the
//     volume (counted by inflight), in replies, or held by the send in flight
//     (its read data is sent from its own buffer). It goes back to free, with
//     its payload buffer, once its reply bytes were copied into sbuf or sent.
//   - At most one RECV and one SENDMSG are in flight. The RECV writes into
//     rbuf[rtail:] or, for a large write (payload), into the rest of that
//     slot's buffer; rbuf is compacted (bytes moved) only while no RECV is in
//     flight. The SENDMSG reads sbuf, iov, msg and the held slots' buffers,
//     which are not touched until its CQE; replies completed meanwhile wait
//     in replies, so reply bytes never interleave.
//   - The parser consumes exactly the bytes of each accepted request: a
//     rejected write's payload is skipped (discard), a request that cannot be
//     taken yet (no slot or buffer, or a small write whose payload has not
//     all arrived) stays in rbuf unconsumed. A broken stream (bad magic,
//     absurd rejected write) ends reading.
//   - Our user_data values have a zero top byte (the driven shards' have a
//     non-zero one).
//   - The loop ends only when reading is done, no request is at the volume,
//     every reply is sent (or dropped after a send error), and no RECV or
//     SENDMSG is in flight; then the shards are released and the ring is
//     closed, and only then are the buffers freed (by close).
//   - The data path allocates nothing.

import (
	"errors"
	"fmt"
	"io"
	"runtime"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/torus-storage/torus/engine"
	"github.com/torus-storage/torus/internal/alignbuf"
	"github.com/torus-storage/torus/iouring"
	"github.com/torus-storage/torus/store"
)

// driveable is a volume whose store shards a connection thread can run
// itself (store.Local).
type driveable interface {
	Shards() int
	DriveShards(r *iouring.Uring, ids ...int) (*store.ShardDriver, error)
}

const (
	// uringRecvSize is the receive buffer: many small requests per RECV.
	uringRecvSize = 256 << 10
	// uringRecvMin is the free tail below which rbuf is compacted before a
	// RECV.
	uringRecvMin = 128 << 10
	// uringSmallWrite is the largest write whose payload is waited for in
	// rbuf; larger payloads are received straight into their buffer.
	uringSmallWrite = 64 << 10
	// uringSendSize is the send buffer: reply headers and copied read data.
	uringSendSize = 256 << 10
	// uringCopyMax is the largest read reply copied into sbuf; larger ones
	// are sent from the slot's buffer.
	uringCopyMax = 32 << 10
	// uringMaxIov bounds the iovecs of one SENDMSG.
	uringMaxIov = 64
	// uringEntries is the SQ size: our three ops and the shards' I/O.
	uringEntries = 1024

	udRecv   = 1
	udSend   = 2
	udCancel = 3
)

// rslot is a preallocated request of a uring connection.
type rslot struct {
	c      *uringConn
	req    engine.Request
	cookie uint64
	typ    uint16
	errno  uint32
	buf    []byte // payload buffer (whole class buffer), nil if none
	class  int
	hdr    [structuredHeaderSize + 8]byte
}

// Complete implements engine.Completer; it runs on the uring thread.
func (s *rslot) Complete(_ *engine.Request, err error) {
	if err != nil {
		s.errno = nbdErrno(err)
	}
	c := s.c
	c.inflight--
	c.replies = append(c.replies, s)
}

// uringConn serves the transmission phase of one client on one io_uring.
type uringConn struct {
	limits
	structured bool
	fd         int
	vol        driveable
	ids        []int

	uring *iouring.Uring
	drv   *store.ShardDriver
	cqes  [256]iouring.CQE

	slots    []rslot
	free     []*rslot
	pool     *bufPool
	inflight int // requests at the volume

	// Receiving.
	rbuf         []byte
	rhead, rtail int    // unparsed bytes are rbuf[rhead:rtail]
	recvArmed    bool   // a RECV is in flight
	cancelSent   bool   // an ASYNC_CANCEL of it was submitted
	payload      *rslot // a large write whose payload is being received
	payloadHave  int
	discard      int64 // bytes of a rejected write's payload still to skip
	blocked      bool  // the parser waits for a slot or a buffer
	readDone     bool
	readErr      error

	// Sending.
	replies []*rslot // completed, not yet in a send
	sending bool     // a SENDMSG is in flight
	sbuf    []byte
	iov     []unix.Iovec
	msg     unix.Msghdr
	held    []*rslot // slots whose buffers the send in flight reads
	werr    error

	stopping atomic.Bool
	stopOnce sync.Once
	fdMu     sync.Mutex
	fdOpen   bool // guarded by fdMu: fd may be shut down
	drain    *time.Timer
}

// newUringConn prepares a uring connection on socket fd; run serves it.
func newUringConn(fd int, e *Export, vol driveable, ids []int, structured bool, opt Options) (*uringConn, error) {
	n := opt.MaxInFlight
	pool, err := newBufPool(n, opt.MaxPayload)
	if err != nil {
		return nil, err
	}
	c := &uringConn{
		limits:     newLimits(e, opt),
		structured: structured,
		fd:         fd,
		vol:        vol,
		ids:        ids,
		slots:      make([]rslot, n),
		free:       make([]*rslot, 0, n),
		pool:       pool,
		replies:    make([]*rslot, 0, n),
		iov:        make([]unix.Iovec, 0, uringMaxIov),
		held:       make([]*rslot, 0, n),
		fdOpen:     true,
	}
	for i := range c.slots {
		s := &c.slots[i]
		s.c = c
		s.req.Done = s
		s.req.Tag = uint64(i)
		c.free = append(c.free, s)
	}
	if c.rbuf, err = alignbuf.Alloc(uringRecvSize); err != nil {
		c.close()
		return nil, fmt.Errorf("nbd: receive buffer: %w", err)
	}
	if c.sbuf, err = alignbuf.Alloc(uringSendSize); err != nil {
		c.close()
		return nil, fmt.Errorf("nbd: send buffer: %w", err)
	}
	return c, nil
}

// close frees the buffers; run must have returned (or never started).
func (c *uringConn) close() {
	c.pool.close()
	if c.rbuf != nil {
		alignbuf.Free(c.rbuf)
		c.rbuf = nil
	}
	if c.sbuf != nil {
		alignbuf.Free(c.sbuf)
		c.sbuf = nil
	}
}

// shutdown stops the connection from taking new requests; in-flight
// requests still complete and their replies are still sent, within
// drainTimeout. It may be called from any goroutine.
func (c *uringConn) shutdown() {
	c.stopOnce.Do(func() {
		c.stopping.Store(true)
		c.fdMu.Lock()
		defer c.fdMu.Unlock()
		if !c.fdOpen {
			return
		}
		// Ends the RECV in flight (it completes with 0).
		unix.Shutdown(c.fd, unix.SHUT_RD)
		c.drain = time.AfterFunc(drainTimeout, func() {
			c.fdMu.Lock()
			defer c.fdMu.Unlock()
			if c.fdOpen {
				unix.Shutdown(c.fd, unix.SHUT_RDWR) // fails the send in flight
			}
		})
	})
}

// run serves the connection on the calling goroutine, which it locks to its
// OS thread for good (the thread exits with the goroutine). setup reports
// whether the ring and the shards were set up; if not, nothing was read
// from the socket and the caller may serve it another way.
func (c *uringConn) run(setup chan<- error) error {
	runtime.LockOSThread() // never unlocked: the thread owned the ring
	defer func() {
		c.fdMu.Lock()
		c.fdOpen = false
		if c.drain != nil {
			c.drain.Stop()
		}
		c.fdMu.Unlock()
	}()
	if err := c.setup(); err != nil {
		c.teardown()
		setup <- err
		return err
	}
	setup <- nil
	err := c.loop()
	if terr := c.teardown(); err == nil {
		err = terr
	}
	if err == nil {
		err = c.readErr
	}
	if err == nil {
		err = c.werr
	}
	return err
}

// setup creates the ring and takes the shards.
func (c *uringConn) setup() error {
	var err error
	c.uring, err = iouring.NewThreadUring(uringEntries)
	if err != nil {
		return fmt.Errorf("nbd: connection ring: %w", err)
	}
	c.drv, err = c.vol.DriveShards(c.uring, c.ids...)
	if err != nil {
		return fmt.Errorf("nbd: connection ring: %w", err)
	}
	// Reads and writes into the small buffers skip pinning their pages.
	// Without (RLIMIT_MEMLOCK too low for a non-root user) they still work.
	if a := c.pool.fixedArenas(); len(a) > 0 {
		_ = c.drv.RegisterBuffers(a)
	}
	return nil
}

// teardown gives the shards back and closes the ring.
func (c *uringConn) teardown() error {
	var err error
	if c.drv != nil {
		err = c.drv.Release()
		c.drv = nil
	}
	if c.uring != nil {
		c.uring.Close()
		c.uring = nil
	}
	return err
}

// loop runs until the connection is finished (see the invariants).
func (c *uringConn) loop() error {
	for {
		c.drv.Poll()
		if c.stopping.Load() && !c.readDone {
			c.endRead(errStopped)
		}
		c.parse()
		c.armRecv()
		c.startSend()
		if c.readDone && !c.recvArmed && c.payload != nil {
			c.release(c.payload)
			c.payload = nil
		}
		if c.readDone && c.inflight == 0 && len(c.replies) == 0 && !c.sending && !c.recvArmed {
			return nil
		}
		// Never wait for more than one CQE: with DEFER_TASKRUN the kernel
		// wakes a waiter only when the queued task work could post as
		// many CQEs as it still waits for, and the retry of a send
		// blocked on a full socket posts none, so waiting for two could
		// stall a reply the client is waiting for.
		wait := uint32(1)
		if wait > 0 && !c.drv.Sleep() {
			wait = 0
		}
		_, err := c.uring.SubmitAndWait(wait)
		c.drv.Woke()
		if err != nil && !errors.Is(err, iouring.ErrCQOverflow) {
			return fmt.Errorf("nbd: connection ring: %w", err)
		}
		for {
			n := c.uring.PeekCQEs(c.cqes[:])
			for i := 0; i < n; i++ {
				cq := &c.cqes[i]
				if c.drv.Owns(cq.UserData) {
					c.drv.Handle(cq)
					continue
				}
				c.handle(cq)
			}
			if n < len(c.cqes) {
				break
			}
		}
	}
}

// sqe returns a free SQE, submitting a full SQ to make room.
func (c *uringConn) sqe() *iouring.SQE {
	for {
		if e := c.uring.SQE(); e != nil {
			return e
		}
		c.uring.Submit()
	}
}

// handle processes one of our CQEs.
func (c *uringConn) handle(cq *iouring.CQE) {
	switch cq.UserData {
	case udRecv:
		c.recvDone(cq.Res)
	case udSend:
		c.sendDone(cq.Res)
	}
}

// endRead stops reading requests; err is why (nil for an orderly end).
func (c *uringConn) endRead(err error) {
	if c.readDone {
		return
	}
	c.readDone, c.readErr = true, err
	if c.recvArmed && !c.cancelSent {
		e := c.sqe()
		e.Opcode = iouring.OpAsyncCancel
		e.Addr = udRecv
		e.UserData = udCancel
		c.cancelSent = true
	}
}

// armRecv keeps a RECV in flight while requests may come.
func (c *uringConn) armRecv() {
	if c.readDone || c.recvArmed {
		return
	}
	var b []byte
	if c.payload != nil {
		b = c.payload.req.Buf[c.payloadHave:]
	} else {
		if c.rhead == c.rtail {
			c.rhead, c.rtail = 0, 0
		} else if len(c.rbuf)-c.rtail < uringRecvMin && c.rhead > 0 {
			n := copy(c.rbuf, c.rbuf[c.rhead:c.rtail])
			c.rhead, c.rtail = 0, n
		}
		b = c.rbuf[c.rtail:]
		if len(b) == 0 {
			return // full of requests waiting for slots
		}
	}
	e := c.sqe()
	e.PrepRecv(int32(c.fd), b)
	e.UserData = udRecv
	c.recvArmed = true
}

// recvDone handles the RECV's completion.
func (c *uringConn) recvDone(res int32) {
	c.recvArmed = false
	switch {
	case res == -int32(unix.EINTR) || res == -int32(unix.EAGAIN):
		return // armed again
	case res == -int32(unix.ECANCELED) && c.readDone:
		return
	case res < 0:
		if c.stopping.Load() {
			c.endRead(errStopped)
			return
		}
		c.endRead(fmt.Errorf("nbd: reading request: %w", unix.Errno(-res)))
		return
	case res == 0:
		switch {
		case c.stopping.Load():
			c.endRead(errStopped)
		case c.payload == nil && c.discard == 0 && c.rhead == c.rtail:
			c.endRead(nil)
		default:
			c.endRead(fmt.Errorf("nbd: reading request: %w", io.ErrUnexpectedEOF))
		}
		return
	}
	if c.readDone {
		return // bytes after the end are ignored
	}
	if p := c.payload; p != nil {
		c.payloadHave += int(res)
		if c.payloadHave == len(p.req.Buf) {
			c.payload = nil
			c.submit(p)
		}
		return
	}
	c.rtail += int(res)
}

// parse takes every whole request out of rbuf that it can start now.
func (c *uringConn) parse() {
	c.blocked = false
	for !c.readDone && c.payload == nil {
		avail := c.rtail - c.rhead
		if c.discard > 0 {
			n := int(min(c.discard, int64(avail)))
			c.rhead += n
			c.discard -= int64(n)
			if c.discard > 0 {
				return
			}
			continue
		}
		if avail < requestSize {
			return
		}
		rq, err := parseRequest(c.rbuf[c.rhead : c.rhead+requestSize])
		if err != nil {
			c.endRead(err)
			return
		}
		if rq.typ == cmdDisc {
			c.rhead += requestSize
			c.endRead(nil)
			return
		}
		errno := c.check(rq)
		if errno == 0 && rq.typ == cmdWrite && int(rq.length) <= uringSmallWrite && avail < requestSize+int(rq.length) {
			return // wait for the payload in rbuf
		}
		if len(c.free) == 0 {
			c.blocked = true
			return
		}
		s := c.free[len(c.free)-1]
		s.cookie, s.typ, s.errno = rq.cookie, rq.typ, errno
		s.buf, s.req.Buf = nil, nil
		if errno != 0 {
			if rq.typ == cmdWrite && int64(rq.length) > 2*int64(c.maxPayload) {
				c.endRead(fmt.Errorf("nbd: write of %d bytes exceeds %d: cannot resync", rq.length, c.maxPayload))
				return
			}
			c.free = c.free[:len(c.free)-1]
			c.rhead += requestSize
			if rq.typ == cmdWrite {
				c.discard = int64(rq.length)
			}
			c.replies = append(c.replies, s)
			continue
		}
		s.req.Offset, s.req.Length, s.req.Flags = int64(rq.offset), int64(rq.length), 0
		if rq.flags&cmdFlagFUA != 0 && rq.typ != cmdRead && rq.typ != cmdFlush {
			s.req.Flags |= engine.FlagFUA
		}
		switch rq.typ {
		case cmdRead, cmdWrite:
			b, ci, ok, err := c.pool.tryGet(c.pool.classFor(int(rq.length)))
			if err != nil {
				c.endRead(err)
				return
			}
			if !ok {
				c.blocked = true
				return
			}
			s.buf, s.class = b, ci
			s.req.Buf = b[:rq.length]
			s.req.Op = engine.OpRead
			if rq.typ == cmdWrite {
				s.req.Op = engine.OpWrite
			}
		case cmdFlush:
			s.req.Op, s.req.Offset, s.req.Length = engine.OpFlush, 0, 0
		case cmdTrim:
			s.req.Op = engine.OpDiscard
		case cmdWriteZeroes:
			s.req.Op = engine.OpWriteZeroes
			if rq.flags&cmdFlagNoHole != 0 {
				s.req.Flags |= engine.FlagNoUnmap
			}
		}
		c.free = c.free[:len(c.free)-1]
		c.rhead += requestSize
		if rq.typ == cmdWrite {
			n := copy(s.req.Buf, c.rbuf[c.rhead:c.rtail])
			c.rhead += n
			if n < len(s.req.Buf) {
				c.payload, c.payloadHave = s, n // receive the rest in place
				return
			}
		}
		c.submit(s)
	}
}

// submit hands s to the volume.
func (c *uringConn) submit(s *rslot) {
	c.inflight++
	c.drv.Submit(&s.req)
}

// startSend sends the queued replies with one SENDMSG unless one is in
// flight.
func (c *uringConn) startSend() {
	if c.sending || len(c.replies) == 0 {
		return
	}
	if c.werr != nil {
		for i, s := range c.replies {
			c.release(s)
			c.replies[i] = nil
		}
		c.replies = c.replies[:0]
		return
	}
	sb, iov := c.sbuf[:0], c.iov[:0]
	seg := 0 // start of the sbuf bytes not yet in iov
	i := 0
	for ; i < len(c.replies); i++ {
		s := c.replies[i]
		h, d := encodeReply(&s.hdr, c.structured, s.typ, s.errno, s.cookie, s.req.Offset, s.req.Buf)
		if len(d) <= uringCopyMax {
			if len(sb)+len(h)+len(d) > cap(sb) {
				break
			}
			sb = append(sb, h...)
			sb = append(sb, d...)
			c.release(s)
			continue
		}
		if len(sb)+len(h) > cap(sb) || len(iov)+3 > cap(iov) {
			break
		}
		sb = append(sb, h...)
		iov = append(iov, iovec(sb[seg:]), iovec(d))
		seg = len(sb)
		c.held = append(c.held, s)
	}
	if seg < len(sb) {
		iov = append(iov, iovec(sb[seg:]))
	}
	n := copy(c.replies, c.replies[i:])
	clear(c.replies[n:])
	c.replies = c.replies[:n]
	c.iov = iov
	c.submitSend()
}

func iovec(b []byte) unix.Iovec {
	v := unix.Iovec{Base: &b[0]}
	v.SetLen(len(b))
	return v
}

// submitSend submits a SENDMSG of c.iov.
func (c *uringConn) submitSend() {
	c.msg = unix.Msghdr{Iov: &c.iov[0]}
	c.msg.SetIovlen(len(c.iov))
	e := c.sqe()
	e.Opcode = iouring.OpSendmsg
	e.Fd = int32(c.fd)
	e.Addr = uint64(uintptr(unsafe.Pointer(&c.msg)))
	e.Len = 1
	e.OpFlags = unix.MSG_NOSIGNAL | unix.MSG_WAITALL
	e.UserData = udSend
	c.sending = true
}

// sendDone handles the SENDMSG's completion: a short send goes on with the
// rest.
func (c *uringConn) sendDone(res int32) {
	if res == -int32(unix.EINTR) || res == -int32(unix.EAGAIN) {
		c.submitSend()
		return
	}
	if res < 0 {
		c.werr = fmt.Errorf("nbd: writing replies: %w", unix.Errno(-res))
		c.endRead(c.werr)
	} else {
		left := int(res)
		k := 0
		for k < len(c.iov) && left >= int(c.iov[k].Len) {
			left -= int(c.iov[k].Len)
			k++
		}
		if k < len(c.iov) {
			n := copy(c.iov, c.iov[k:])
			c.iov = c.iov[:n]
			c.iov[0].Base = (*byte)(unsafe.Add(unsafe.Pointer(c.iov[0].Base), left))
			c.iov[0].SetLen(int(c.iov[0].Len) - left)
			c.submitSend()
			return
		}
	}
	c.sending = false
	c.iov = c.iov[:0]
	for i, s := range c.held {
		c.release(s)
		c.held[i] = nil
	}
	c.held = c.held[:0]
}

// release returns the payload buffer and the slot.
func (c *uringConn) release(s *rslot) {
	if s.buf != nil {
		c.pool.put(s.class, s.buf)
		s.buf, s.req.Buf = nil, nil
	}
	c.free = append(c.free, s)
}
