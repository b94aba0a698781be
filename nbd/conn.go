package nbd

// The transmission phase of one connection.
//
// Invariants:
//   - A slot is in exactly one place: the free channel, owned by the reader
//     while it prepares a request, owned by the volume between Submit and
//     Complete, in the completion queue, or owned by the writer while its
//     reply is written. The writer puts it back on free after the reply left
//     (or was dropped because the connection is broken).
//   - The reader consumes exactly the bytes of every request it accepts
//     (header plus, for NBD_CMD_WRITE, length payload bytes) even when it
//     rejects the request, so the stream never desynchronises. When it cannot
//     (bad magic, absurd write length, read error) it stops reading and the
//     connection closes after in-flight requests complete.
//   - The reader stops, then takes every slot back from free, then lets the
//     writer flush and exit: every submitted request has completed and every
//     reply has been written before the socket closes.
//   - The output stream (w, dbuf, left, spare, werr) has one owner at a time:
//     whoever set writing under mu, either the writer goroutine or a
//     completer writing directly. Bytes of one reply are written by one owner
//     in one piece (copied whole into w or dbuf), so replies never
//     interleave; their order between each other is free (NBD allows it).
//   - A completer that finds the stream free, no other request of the
//     connection in flight and the reader without buffered requests writes
//     the queued replies itself with non-blocking writes (no writer wake-up
//     on the fast path, one write per burst: with more requests coming, the
//     writer goroutine batches them). What the
//     socket does not take stays in left with hasLeft set; from then on only
//     the writer goroutine may take the stream, and it writes left first.
//   - Whoever enqueues while writing is set relies on the owner: on giving
//     the stream up, the owner looks at the queue again and either keeps
//     writing or notifies the writer goroutine.
//   - The data path (read header, get slot and buffer, Submit, Complete,
//     write reply, release) allocates nothing.

import (
	"bufio"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/torus-storage/torus/engine"
)

const (
	readBufSize  = 128 << 10
	writeBufSize = 256 << 10
)

// slot is a preallocated request with its reply header.
type slot struct {
	c      *conn
	req    engine.Request
	cookie uint64
	typ    uint16
	errno  uint32
	buf    []byte // payload buffer (whole class buffer), nil if none
	class  int
	hdr    [structuredHeaderSize + 8]byte
}

// Complete implements engine.Completer: it queues the reply for the writer.
func (s *slot) Complete(_ *engine.Request, err error) {
	if err != nil {
		s.errno = nbdErrno(err)
	}
	s.c.pending.Add(-1)
	s.c.enqueue(s)
}

// deadliner is implemented by net.Conn; tests may pass plain streams.
type deadliner interface {
	SetReadDeadline(t time.Time) error
	SetWriteDeadline(t time.Time) error
}

// conn serves the transmission phase for one client.
type conn struct {
	rw  io.ReadWriter
	r   *bufio.Reader
	w   *bufio.Writer
	vol engine.Volume
	limits
	structured bool

	slots []slot
	free  chan *slot
	pool  *bufPool
	hdr   [requestSize]byte

	mu      sync.Mutex
	queue   []*slot // completed requests awaiting their reply; guarded by mu
	writing bool    // the output stream has an owner; guarded by mu
	hasLeft bool    // left holds unwritten bytes; guarded by mu
	spare   []*slot // stream-owned second queue buffer
	notify  chan struct{}

	// Direct writes from the completing goroutine (nil raw: disabled).
	pending    atomic.Int32 // submitted and not completed
	readerBusy atomic.Bool  // the reader holds more buffered requests
	raw        syscall.RawConn
	rawFn      func(fd uintptr) bool // c.rawWrite, bound once
	dbuf       []byte                // stream-owned: replies of one direct write
	left       []byte                // stream-owned: tail of dbuf the socket refused
	dsend      []byte                // rawWrite's input
	dn         int                   // rawWrite's byte count
	derr       error                 // rawWrite's hard error

	stop       chan struct{} // closed by shutdown
	stopOnce   sync.Once
	writerExit chan struct{} // closed by the reader once all slots are back
	writerDone chan struct{}
	werr       error // writer-owned
}

// newConn prepares the transmission phase of e over rw.
func newConn(rw io.ReadWriter, e *Export, structured bool, opt Options) (*conn, error) {
	n := opt.MaxInFlight
	pool, err := newBufPool(n, opt.MaxPayload)
	if err != nil {
		return nil, err
	}
	c := &conn{
		rw:         rw,
		r:          bufio.NewReaderSize(rw, readBufSize),
		w:          bufio.NewWriterSize(rw, writeBufSize),
		vol:        e.Volume,
		limits:     newLimits(e, opt),
		structured: structured,
		slots:      make([]slot, n),
		free:       make(chan *slot, n),
		pool:       pool,
		queue:      make([]*slot, 0, n),
		spare:      make([]*slot, 0, n),
		notify:     make(chan struct{}, 1),
		stop:       make(chan struct{}),
		writerExit: make(chan struct{}),
		writerDone: make(chan struct{}),
	}
	if sc, ok := rw.(syscall.Conn); ok && !opt.NoDirectReplies {
		if raw, err := sc.SyscallConn(); err == nil {
			c.raw = raw
			c.rawFn = c.rawWrite
			c.dbuf = make([]byte, 0, writeBufSize)
		}
	}
	for i := range c.slots {
		s := &c.slots[i]
		s.c = c
		s.req.Done = s
		s.req.Tag = uint64(i)
		c.free <- s
	}
	return c, nil
}

// close releases the payload buffers; serve must have returned.
func (c *conn) close() { c.pool.close() }

// shutdown stops the reader from taking new requests; in-flight requests
// still complete and their replies are still sent (within drainTimeout).
func (c *conn) shutdown() {
	c.stopOnce.Do(func() {
		close(c.stop)
		if d, ok := c.rw.(deadliner); ok {
			d.SetReadDeadline(time.Now())
			d.SetWriteDeadline(time.Now().Add(drainTimeout))
		}
	})
}

// serve runs the transmission phase until the client disconnects, breaks the
// protocol, or shutdown is called. It returns after every in-flight request
// has completed and its reply has been written.
func (c *conn) serve() error {
	go c.writeLoop()
	err := c.readLoop()
	for range c.slots {
		<-c.free
	}
	close(c.writerExit)
	<-c.writerDone
	if err == nil {
		err = c.werr
	}
	return err
}

// readLoop parses requests and submits them. A nil return is an orderly end
// (NBD_CMD_DISC or EOF on a request boundary).
func (c *conn) readLoop() error {
	for {
		if _, err := io.ReadFull(c.r, c.hdr[:]); err != nil {
			if err == io.EOF {
				return nil
			}
			return fmt.Errorf("nbd: reading request: %w", err)
		}
		rq, err := parseRequest(c.hdr[:])
		if err != nil {
			return err
		}
		if rq.typ == cmdDisc {
			return nil
		}
		var s *slot
		select {
		case s = <-c.free:
		case <-c.stop:
			return errStopped
		}
		if err := c.prepare(s, rq); err != nil {
			c.free <- s
			return err
		}
		c.readerBusy.Store(c.r.Buffered() >= requestSize)
		if s.errno != 0 {
			c.enqueue(s)
			continue
		}
		c.pending.Add(1)
		c.vol.Submit(&s.req)
	}
}

// limits are what a connection checks every request against.
type limits struct {
	size       uint64
	live       engine.Volume // non-nil: its current Size is the limit, not size
	readOnly   bool
	maxPayload int
}

func newLimits(e *Export, opt Options) limits {
	l := limits{size: uint64(e.Volume.Size()), readOnly: e.ReadOnly, maxPayload: opt.MaxPayload}
	if e.liveSize {
		l.live = e.Volume
	}
	return l
}

// check returns the NBD errno with which rq is rejected, or 0.
func (c *limits) check(rq request) uint32 {
	var op engine.Op
	switch rq.typ {
	case cmdRead:
		op = engine.OpRead
	case cmdWrite:
		op = engine.OpWrite
	case cmdFlush:
		op = engine.OpFlush
	case cmdTrim:
		op = engine.OpDiscard
	case cmdWriteZeroes:
		op = engine.OpWriteZeroes
	default:
		return errInval
	}
	if rq.flags&^validFlags(rq.typ) != 0 {
		return errInval
	}
	if c.readOnly && op != engine.OpRead && op != engine.OpFlush {
		return errPerm
	}
	if op == engine.OpFlush {
		return 0
	}
	size := c.size
	if c.live != nil {
		size = uint64(c.live.Size())
	}
	if rq.length == 0 || rq.offset%blockSize != 0 || rq.length%blockSize != 0 ||
		rq.offset > size || uint64(rq.length) > size-rq.offset {
		return errInval
	}
	if (op == engine.OpRead || op == engine.OpWrite) && int64(rq.length) > int64(c.maxPayload) {
		return errInval
	}
	return 0
}

// prepare fills s for rq, reading a write's payload. It sets s.errno when the
// request is rejected. An error means the stream cannot continue.
func (c *conn) prepare(s *slot, rq request) error {
	s.cookie, s.typ, s.errno = rq.cookie, rq.typ, c.check(rq)
	s.buf, s.req.Buf = nil, nil
	if s.errno != 0 {
		if rq.typ == cmdWrite {
			// Keep the stream in sync: swallow the payload of a rejected write.
			if int64(rq.length) > 2*int64(c.maxPayload) {
				return fmt.Errorf("nbd: write of %d bytes exceeds %d: cannot resync", rq.length, c.maxPayload)
			}
			if _, err := c.r.Discard(int(rq.length)); err != nil {
				return fmt.Errorf("nbd: discarding rejected write payload: %w", err)
			}
		}
		return nil
	}
	s.req.Offset, s.req.Length, s.req.Flags = int64(rq.offset), int64(rq.length), 0
	if rq.flags&cmdFlagFUA != 0 && rq.typ != cmdRead && rq.typ != cmdFlush {
		s.req.Flags |= engine.FlagFUA
	}
	switch rq.typ {
	case cmdRead, cmdWrite:
		b, ci, err := c.pool.get(c.pool.classFor(int(rq.length)), c.stop)
		if err != nil {
			return err
		}
		s.buf, s.class = b, ci
		s.req.Buf = b[:rq.length]
		if rq.typ == cmdRead {
			s.req.Op = engine.OpRead
			return nil
		}
		s.req.Op = engine.OpWrite
		if _, err := io.ReadFull(c.r, s.req.Buf); err != nil {
			c.pool.put(ci, b)
			s.buf, s.req.Buf = nil, nil
			return fmt.Errorf("nbd: reading write payload: %w", err)
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
	return nil
}

// enqueue hands a finished slot to the output stream. When the stream is
// free it writes the queued replies itself, without blocking; otherwise the
// current owner or the writer goroutine sends it. It never blocks for long:
// the queue has room for every slot.
func (c *conn) enqueue(s *slot) {
	c.mu.Lock()
	c.queue = append(c.queue, s)
	if c.writing {
		c.mu.Unlock()
		return
	}
	if c.raw == nil || c.hasLeft || c.pending.Load() != 0 || c.readerBusy.Load() {
		c.mu.Unlock()
		c.wake()
		return
	}
	c.writing = true
	c.mu.Unlock()
	c.directWrite()
}

// wake notifies the writer goroutine.
func (c *conn) wake() {
	select {
	case c.notify <- struct{}{}:
	default:
	}
}

// directMaxRounds bounds how many batches one completer writes before it
// leaves the rest to the writer goroutine, so a store thread is not held.
const directMaxRounds = 4

// directWrite writes queued replies with non-blocking writes; the caller
// owns the stream and directWrite gives it up.
func (c *conn) directWrite() {
	for round := 0; ; round++ {
		c.mu.Lock()
		batch := c.queue
		c.queue = c.spare
		c.mu.Unlock()
		buf := c.dbuf[:0]
		keep := batch[:0]
		for _, s := range batch {
			if c.werr != nil {
				c.release(s)
				continue
			}
			h, d := c.replyParts(s)
			if len(buf)+len(h)+len(d) > cap(buf) {
				keep = append(keep, s) // too big for dbuf: the writer sends it
				continue
			}
			buf = append(buf, h...)
			buf = append(buf, d...)
			c.release(s)
		}
		n, err := 0, error(nil)
		if len(buf) > 0 {
			n, err = c.writeNonBlocking(buf)
		}
		if err != nil {
			c.fail(err)
		}
		c.mu.Lock()
		c.queue = append(c.queue, keep...)
		clear(batch)
		c.spare = batch[:0]
		if n < len(buf) && err == nil {
			c.left, c.hasLeft = buf[n:], true
		}
		if len(c.queue) > 0 && !c.hasLeft && len(keep) == 0 && round+1 < directMaxRounds {
			c.mu.Unlock()
			continue
		}
		c.writing = false
		handOff := c.hasLeft || len(c.queue) > 0
		c.mu.Unlock()
		if handOff {
			c.wake()
		}
		return
	}
}

// writeNonBlocking writes what the socket takes now of b; a short count with
// a nil error means the socket is full.
func (c *conn) writeNonBlocking(b []byte) (int, error) {
	c.dsend, c.dn, c.derr = b, 0, nil
	err := c.raw.Write(c.rawFn)
	n, derr := c.dn, c.derr
	c.dsend, c.derr = nil, nil
	if derr != nil {
		return n, derr
	}
	return n, err
}

// rawWrite is the syscall.RawConn callback of writeNonBlocking: it never
// waits for the socket.
func (c *conn) rawWrite(fd uintptr) bool {
	for len(c.dsend) > 0 {
		n, err := syscall.Write(int(fd), c.dsend)
		if err == syscall.EINTR {
			continue
		}
		if err != nil {
			if err != syscall.EAGAIN {
				c.derr = err
			}
			return true
		}
		c.dn += n
		c.dsend = c.dsend[n:]
	}
	return true
}

// writeLoop writes replies in completion order, flushing when the queue
// drains. It takes the stream only when nobody owns it.
func (c *conn) writeLoop() {
	defer close(c.writerDone)
	for {
		select {
		case <-c.notify:
		case <-c.writerExit:
			// Every slot is back, but a direct writer may still be
			// finishing its write: wait for it to give the stream up.
			for {
				c.mu.Lock()
				busy := c.writing
				if !busy {
					c.writing = true
				}
				c.mu.Unlock()
				if !busy {
					break
				}
				time.Sleep(50 * time.Microsecond)
			}
			c.writeLeft()
			c.drainQueue()
			if c.werr == nil {
				if err := c.w.Flush(); err != nil {
					c.werr = fmt.Errorf("nbd: writing replies: %w", err)
				}
			}
			return
		}
		c.mu.Lock()
		if c.writing {
			c.mu.Unlock()
			continue // the owner notifies again if it leaves work behind
		}
		c.writing = true
		c.mu.Unlock()
		for {
			c.writeLeft()
			c.drainQueue()
			if c.werr == nil {
				if err := c.w.Flush(); err != nil {
					c.fail(err)
				}
			}
			c.mu.Lock()
			if len(c.queue) == 0 {
				c.writing = false
				c.mu.Unlock()
				break
			}
			c.mu.Unlock()
		}
	}
}

// writeLeft writes what a direct write left behind; the caller owns the
// stream.
func (c *conn) writeLeft() {
	c.mu.Lock()
	has := c.hasLeft
	c.mu.Unlock()
	if !has {
		return
	}
	if c.werr == nil {
		if _, err := c.w.Write(c.left); err != nil {
			c.fail(err)
		}
	}
	c.mu.Lock()
	c.left, c.hasLeft = nil, false
	c.mu.Unlock()
}

// drainQueue writes and releases queued slots until the queue is empty.
func (c *conn) drainQueue() {
	for {
		c.mu.Lock()
		batch := c.queue
		c.queue = c.spare
		c.mu.Unlock()
		if len(batch) == 0 {
			c.spare = batch
			return
		}
		for i, s := range batch {
			if c.werr == nil {
				if err := c.writeReply(s); err != nil {
					c.fail(err)
				}
			}
			c.release(s)
			batch[i] = nil
		}
		c.spare = batch[:0]
	}
}

// fail records a write error and stops the reader; replies are dropped from
// now on but slots keep being recycled.
func (c *conn) fail(err error) {
	c.werr = fmt.Errorf("nbd: writing replies: %w", err)
	c.shutdown()
}

// writeReply writes the reply of s into the buffered writer.
func (c *conn) writeReply(s *slot) error {
	h, d := c.replyParts(s)
	if _, err := c.w.Write(h); err != nil {
		return err
	}
	if len(d) > 0 {
		_, err := c.w.Write(d)
		return err
	}
	return nil
}

// replyParts encodes the reply header of s into s.hdr and returns it with
// the reply's payload (nil if none).
func (c *conn) replyParts(s *slot) (h, data []byte) {
	return encodeReply(&s.hdr, c.structured, s.typ, s.errno, s.cookie, s.req.Offset, s.req.Buf)
}

// encodeReply encodes into hdr the reply to a request of type typ with the
// given errno and cookie (simple or structured) and returns the header with
// the reply's payload: buf for a successful read, else nil. off is the
// read's offset (structured replies carry it).
func encodeReply(hdr *[structuredHeaderSize + 8]byte, structured bool, typ uint16, errno uint32, cookie uint64, off int64, buf []byte) (h, data []byte) {
	withData := typ == cmdRead && errno == 0
	if withData {
		data = buf
	}
	if !structured {
		putSimpleReply(hdr[:], errno, cookie)
		return hdr[:simpleReplySize], data
	}
	switch {
	case withData:
		putStructuredHeader(hdr[:], replyFlagDone, replyTypeOffsetData, cookie, uint32(8+len(buf)))
		putUint64(hdr[structuredHeaderSize:], uint64(off))
		h = hdr[:structuredHeaderSize+8]
	case errno != 0:
		putStructuredHeader(hdr[:], replyFlagDone, replyTypeError, cookie, 6)
		putUint32(hdr[structuredHeaderSize:], errno)
		hdr[structuredHeaderSize+4], hdr[structuredHeaderSize+5] = 0, 0 // no message
		h = hdr[:structuredHeaderSize+6]
	default:
		putStructuredHeader(hdr[:], replyFlagDone, replyTypeNone, cookie, 0)
		h = hdr[:structuredHeaderSize]
	}
	return h, data
}

// release returns the payload buffer and the slot.
func (c *conn) release(s *slot) {
	if s.buf != nil {
		c.pool.put(s.class, s.buf)
		s.buf, s.req.Buf = nil, nil
	}
	c.free <- s
}

// nbdErrno maps a volume error to the protocol's errno values.
func nbdErrno(err error) uint32 {
	switch engine.Errno(err) {
	case 0:
		return 0
	case syscall.EPERM, syscall.EROFS:
		return errPerm
	case syscall.EINVAL:
		return errInval
	case syscall.ENOSPC:
		return errNoSpc
	case syscall.ENOMEM:
		return errNoMem
	case syscall.EOVERFLOW:
		return errOverflow
	case syscall.ENOTSUP:
		return errNotSup
	case syscall.ESHUTDOWN:
		return errShutdown
	}
	return errIO
}
