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
//   - The data path (read header, get slot and buffer, Submit, Complete,
//     write reply, release) allocates nothing.

import (
	"bufio"
	"fmt"
	"io"
	"sync"
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
	s.c.enqueue(s)
}

// deadliner is implemented by net.Conn; tests may pass plain streams.
type deadliner interface {
	SetReadDeadline(t time.Time) error
	SetWriteDeadline(t time.Time) error
}

// conn serves the transmission phase for one client.
type conn struct {
	rw         io.ReadWriter
	r          *bufio.Reader
	w          *bufio.Writer
	vol        engine.Volume
	size       uint64
	readOnly   bool
	structured bool
	maxPayload int

	slots []slot
	free  chan *slot
	pool  *bufPool
	hdr   [requestSize]byte

	mu     sync.Mutex
	queue  []*slot // completed requests awaiting their reply; guarded by mu
	spare  []*slot // writer-owned second queue buffer
	notify chan struct{}

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
		size:       uint64(e.Volume.Size()),
		readOnly:   e.ReadOnly,
		structured: structured,
		maxPayload: opt.MaxPayload,
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
		if s.errno != 0 {
			c.enqueue(s)
			continue
		}
		c.vol.Submit(&s.req)
	}
}

// check returns the NBD errno with which rq is rejected, or 0.
func (c *conn) check(rq request) uint32 {
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
	if rq.length == 0 || rq.offset%blockSize != 0 || rq.length%blockSize != 0 ||
		rq.offset > c.size || uint64(rq.length) > c.size-rq.offset {
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

// enqueue hands a finished slot to the writer. It never blocks for long: the
// queue has room for every slot.
func (c *conn) enqueue(s *slot) {
	c.mu.Lock()
	c.queue = append(c.queue, s)
	c.mu.Unlock()
	select {
	case c.notify <- struct{}{}:
	default:
	}
}

// writeLoop writes replies in completion order, flushing when the queue
// drains.
func (c *conn) writeLoop() {
	defer close(c.writerDone)
	for {
		select {
		case <-c.notify:
		case <-c.writerExit:
			c.drainQueue()
			if c.werr == nil {
				if err := c.w.Flush(); err != nil {
					c.werr = fmt.Errorf("nbd: writing replies: %w", err)
				}
			}
			return
		}
		c.drainQueue()
		if c.werr == nil {
			if err := c.w.Flush(); err != nil {
				c.fail(err)
			}
		}
	}
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
	withData := s.typ == cmdRead && s.errno == 0
	if !c.structured {
		putSimpleReply(s.hdr[:], s.errno, s.cookie)
		if _, err := c.w.Write(s.hdr[:simpleReplySize]); err != nil {
			return err
		}
		if withData {
			_, err := c.w.Write(s.req.Buf)
			return err
		}
		return nil
	}
	var h []byte
	switch {
	case withData:
		putStructuredHeader(s.hdr[:], replyFlagDone, replyTypeOffsetData, s.cookie, uint32(8+len(s.req.Buf)))
		putUint64(s.hdr[structuredHeaderSize:], uint64(s.req.Offset))
		h = s.hdr[:structuredHeaderSize+8]
	case s.errno != 0:
		putStructuredHeader(s.hdr[:], replyFlagDone, replyTypeError, s.cookie, 6)
		putUint32(s.hdr[structuredHeaderSize:], s.errno)
		s.hdr[structuredHeaderSize+4], s.hdr[structuredHeaderSize+5] = 0, 0 // no message
		h = s.hdr[:structuredHeaderSize+6]
	default:
		putStructuredHeader(s.hdr[:], replyFlagDone, replyTypeNone, s.cookie, 0)
		h = s.hdr[:structuredHeaderSize]
	}
	if _, err := c.w.Write(h); err != nil {
		return err
	}
	if withData {
		_, err := c.w.Write(s.req.Buf)
		return err
	}
	return nil
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
