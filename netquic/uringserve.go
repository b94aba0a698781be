package netquic

// A unix connection served on one io_uring thread.
//
// When the Server's Handler is a UringHandler, each accepted unix connection
// is first offered to it: a goroutine locked to its OS thread creates an
// io_uring and calls AttachUring. If the handler takes the ring (the node
// server drives its store's shards on it, which only one connection at a
// time can do), that thread serves the connection: it receives frames with
// RECV into rbuf, parses every whole frame and calls Serve inline, and the
// handler issues the request's I/O on the same ring through the driver, whose
// completions the loop hands back. A request from the node's own host is then
// read, issued, completed and answered on one thread, with no netpoller wake,
// no goroutine hand-off and no eventfd. Otherwise the connection is served
// by the ordinary reader goroutine.
//
// Invariants:
//   - rbuf, rhead, rtail, recvArmed and readDone are touched only by the ring
//     thread. At most one RECV is in flight, into rbuf[rtail:]; rbuf is
//     compacted (bytes moved to the front) only while none is.
//   - A frame is taken out of rbuf only whole (header and payload) and only
//     while fewer than Options.Depth requests are with the handler (whole
//     frames left when the stream ends are still served); its
//     payload is copied into the request's own buffer, so rbuf can be reused
//     at once. Otherwise it waits in rbuf, and no RECV is armed while rbuf is
//     full: that is the back-pressure.
//   - Replies go through ServerRequest.Reply like on any stream (stream
//     write lock, frame written whole) and never block the uring thread:
//     what a full socket does not take waits in uringSock.pend for a flusher
//     goroutine, and meanwhile the thread takes no new frames from this
//     connection (its other work, the driver's, goes on). A peer that reads
//     nothing for ReplyTimeout is shut down.
//   - The loop ends only when reading is done, no request is with the
//     handler and no RECV is in flight; the driver is released and the ring
//     closed before the stream is finished and the descriptor closed (see
//     uringSock), so no CQE can name a closed descriptor.

import (
	"errors"
	"fmt"
	"net"
	"runtime"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/torus-storage/torus/internal/alignbuf"
	"github.com/torus-storage/torus/iouring"
)

// UringHandler is a Handler that can run its work on the io_uring thread of
// a unix connection.
type UringHandler interface {
	Handler
	// AttachUring is called on the connection's locked thread, which owns
	// r, before its first request. It returns the work the handler runs on
	// r, or nil to decline (the connection then gets the goroutine
	// reader). Serve is then called on that thread, with
	// ServerRequest.Driver returning the driver. Replies should come from
	// that thread too (inline or from the driver's work): a reply from
	// another goroutine does not wake it, so while Options.Depth requests
	// wait for such replies the connection reads nothing further until
	// something else does.
	AttachUring(r *iouring.Uring) (UringDriver, error)
}

// UringDriver is the handler's work on a connection's ring (an
// store.ShardDriver): the loop calls Poll every turn, Sleep before it
// blocks in io_uring_enter and Woke after, passes the CQEs Owns accepts to
// Handle, and calls Release when the connection is done, before it closes
// the ring.
type UringDriver interface {
	Owns(userData uint64) bool
	Handle(c *iouring.CQE)
	Poll()
	Sleep() bool
	Woke()
	Release() error
}

// Driver returns the UringDriver of the connection thread r arrived on, or
// nil when r did not arrive on a uring connection. It is meant for Serve,
// which that thread calls.
func (r *ServerRequest) Driver() UringDriver { return r.st.drv }

const (
	uringConnEntries = 1024
	// Our user_data values; the driver's have a non-zero top byte.
	udUringRecv = 1
	udUringWake = 2
)

// uringSock is the socket of a uring connection: a duplicate descriptor out
// of the netpoller. Writes (replies) never block: what the socket does not
// take goes to pend, in order, and a flusher goroutine writes it as the
// socket drains; while pend is not empty the uring thread takes no new
// frames (backlogged), so pend holds at most the replies of the requests
// already in flight. A flusher that makes no progress for ReplyTimeout
// shuts the socket down. Writes and the flusher hold mu shared; the ring
// thread closes the descriptor under mu exclusively, after shutdown, so no
// write ever acts on a reused number. The flusher wakes the uring thread
// through efd when pend has drained.
type uringSock struct {
	mu sync.RWMutex
	fd int // -1 once closed

	timeout time.Duration
	log     func(msg string, args ...any)
	efd     int // the uring thread's wake-up eventfd

	pmu      sync.Mutex // guards pend, flushing, err
	pend     []byte
	flushing bool
	err      error // a failed flush: later writes fail
}

func (s *uringSock) Read([]byte) (int, error) {
	return 0, errors.New("netquic: a uring connection is read by its io_uring")
}

func (s *uringSock) Write(p []byte) (int, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.fd < 0 {
		return 0, net.ErrClosed
	}
	s.pmu.Lock()
	defer s.pmu.Unlock()
	if s.err != nil {
		return 0, s.err
	}
	if len(s.pend) > 0 {
		s.pend = append(s.pend, p...)
		return len(p), nil
	}
	done := 0
	for done < len(p) {
		n, err := unix.Write(s.fd, p[done:])
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EAGAIN:
			s.pend = append(s.pend, p[done:]...)
			if !s.flushing {
				s.flushing = true
				go s.flush()
			}
			return len(p), nil
		case err != nil:
			return done, &net.OpError{Op: "write", Net: "unix", Err: err}
		}
		done += n
	}
	return done, nil
}

// backlogged reports whether replies wait for the socket.
func (s *uringSock) backlogged() bool {
	s.pmu.Lock()
	defer s.pmu.Unlock()
	return len(s.pend) > 0
}

// flush writes pend as the socket takes it (see uringSock).
func (s *uringSock) flush() {
	last := time.Now()
	for {
		s.mu.RLock()
		if s.fd < 0 {
			s.mu.RUnlock()
			return
		}
		s.pmu.Lock()
		n, err := unix.Write(s.fd, s.pend)
		if n > 0 {
			s.pend = s.pend[:copy(s.pend, s.pend[n:])]
			last = time.Now()
		}
		if err != nil && err != unix.EAGAIN && err != unix.EINTR {
			s.err = &net.OpError{Op: "write", Net: "unix", Err: err}
		}
		done := len(s.pend) == 0 || s.err != nil
		if !done && time.Since(last) > s.timeout {
			s.err = fmt.Errorf("netquic: reply blocked for %v: the peer does not read", s.timeout)
			s.log("netquic: reply blocked, aborting stream", "timeout", s.timeout)
			_ = unix.Shutdown(s.fd, unix.SHUT_RDWR)
			done = true
		}
		if done {
			s.pend, s.flushing = nil, false
			s.pmu.Unlock()
			var one [8]byte
			one[0] = 1
			_, _ = unix.Write(s.efd, one[:]) // the ring may take frames again
			s.mu.RUnlock()
			return
		}
		s.pmu.Unlock()
		pfd := []unix.PollFd{{Fd: int32(s.fd), Events: unix.POLLOUT}}
		_, _ = unix.Poll(pfd, int(pollSleep/time.Millisecond))
		s.mu.RUnlock()
	}
}

// abort and Close shut the socket down: the RECV in flight ends, blocked
// writes fail. The descriptor stays open until release.
func (s *uringSock) abort() { _ = s.Close() }

func (s *uringSock) Close() error {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.fd >= 0 {
		_ = unix.Shutdown(s.fd, unix.SHUT_RDWR)
	}
	return nil
}

func (s *uringSock) release() {
	_ = s.Close()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.fd >= 0 {
		unix.Close(s.fd)
		s.fd = -1
	}
}

// uringServe is the state of one uring connection.
type uringServe struct {
	st        *serverStream
	sock      *uringSock
	uring     *iouring.Uring
	buf       []byte // rbuf and, in its last page, the eventfd's read buffer
	rbuf      []byte
	wakeBuf   []byte
	rhead     int
	rtail     int
	recvArmed bool
	readDone  bool // no more RECVs: end of stream, an error or broken
	broken    bool // a malformed frame: nothing more is parsed
	cqes      [64]iouring.CQE
}

// tryUring serves c on a uring thread if the handler takes one; it reports
// false, leaving c untouched, if not.
func (s *Server) tryUring(rh UringHandler, c *net.UnixConn) bool {
	raw, err := c.SyscallConn()
	if err != nil {
		return false
	}
	fd := -1
	var derr error
	if err := raw.Control(func(f uintptr) { fd, derr = unix.Dup(int(f)) }); err != nil || derr != nil {
		return false
	}
	unix.CloseOnExec(fd)
	sock := &uringSock{fd: fd, efd: -1, timeout: s.opts.ReplyTimeout, log: s.opts.Logger.Warn}
	st := s.newStream(sock, c.RemoteAddr(), UnixPeerName)
	s.mu.Lock()
	if s.ctx.Err() != nil {
		s.mu.Unlock()
		unix.Close(fd)
		return false
	}
	s.streams[st] = struct{}{}
	s.mu.Unlock()
	ready := make(chan bool, 1)
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		runtime.LockOSThread() // never unlocked: the thread owned a ring
		rs := &uringServe{st: st, sock: sock}
		if !rs.setup(rh) {
			ready <- false
			return
		}
		ready <- true
		if err := rs.loop(); err != nil {
			st.fail(err)
		}
		rs.teardown()
	}()
	if !<-ready {
		s.mu.Lock()
		delete(s.streams, st)
		s.mu.Unlock()
		unix.Close(fd)
		return false
	}
	c.Close() // the duplicate keeps the socket; it leaves the netpoller
	return true
}

// setup creates the ring and asks the handler for its driver.
func (rs *uringServe) setup(rh UringHandler) bool {
	var err error
	rs.uring, err = iouring.NewThreadUring(uringConnEntries)
	if err != nil {
		return false
	}
	drv, err := rh.AttachUring(rs.uring)
	if err != nil || drv == nil {
		if err != nil {
			rs.st.srv.opts.Logger.Warn("netquic: unix connection not served on a ring", "err", err)
		}
		rs.uring.Close()
		return false
	}
	size := (2*(FrameHeaderSize+rs.st.srv.opts.MaxPayload) + alignbuf.PageSize - 1) &^ (alignbuf.PageSize - 1)
	if rs.buf, err = alignbuf.Alloc(size + alignbuf.PageSize); err == nil {
		rs.sock.efd, err = unix.Eventfd(0, unix.EFD_CLOEXEC)
		if err != nil {
			_ = alignbuf.Free(rs.buf)
		}
	}
	if err != nil {
		rs.st.srv.opts.Logger.Warn("netquic: unix connection not served on a ring", "err", err)
		_ = drv.Release()
		rs.uring.Close()
		return false
	}
	rs.rbuf = rs.buf[:size:size]
	rs.wakeBuf = rs.buf[size : size+8 : size+8]
	rs.st.drv = drv
	rs.armWake()
	return true
}

// armWake keeps a READ of the eventfd in flight: the flusher writes it
// when the replies it held have gone out.
func (rs *uringServe) armWake() {
	e := rs.sqe()
	if e == nil {
		return
	}
	e.PrepRead(int32(rs.sock.efd), rs.wakeBuf, ^uint64(0))
	e.UserData = udUringWake
}

// sqe returns a free SQE, submitting a full SQ to make room.
func (rs *uringServe) sqe() *iouring.SQE {
	if e := rs.uring.SQE(); e != nil {
		return e
	}
	if _, err := rs.uring.Submit(); err != nil {
		return nil
	}
	return rs.uring.SQE()
}

// teardown releases the driver, closes the ring, finishes the stream and
// closes the descriptor, in that order.
func (rs *uringServe) teardown() {
	if err := rs.st.drv.Release(); err != nil {
		rs.st.srv.opts.Logger.Error("netquic: releasing the ring's driver", "err", err)
	}
	rs.uring.Close()
	rs.st.finish()
	rs.sock.release() // waits for a flusher, the eventfd's last writer
	unix.Close(rs.sock.efd)
	_ = alignbuf.Free(rs.buf)
}

// loop serves the connection until it ends (see the invariants).
func (rs *uringServe) loop() error {
	drv := rs.st.drv
	var lastErr error
	for {
		drv.Poll()
		if err := rs.parse(); err != nil {
			rs.broken, rs.readDone = true, true
			lastErr = err
			rs.sock.abort() // ends the RECV in flight
		}
		rs.armRecv()
		if rs.readDone && !rs.recvArmed && rs.inflight() == 0 {
			return lastErr
		}
		wait := uint32(1)
		if !drv.Sleep() {
			wait = 0
		}
		_, err := rs.uring.SubmitAndWait(wait)
		drv.Woke()
		if err != nil && !errors.Is(err, iouring.ErrCQOverflow) {
			return fmt.Errorf("netquic: connection ring: %w", err)
		}
		for {
			n := rs.uring.PeekCQEs(rs.cqes[:])
			for i := 0; i < n; i++ {
				c := &rs.cqes[i]
				if drv.Owns(c.UserData) {
					drv.Handle(c)
					continue
				}
				switch c.UserData {
				case udUringRecv:
					rs.recvDone(c.Res)
				case udUringWake:
					if c.Res >= 0 || c.Res == -int32(unix.EINTR) || c.Res == -int32(unix.EAGAIN) {
						rs.armWake()
					}
				}
			}
			if n < len(rs.cqes) {
				break
			}
		}
	}
}

func (rs *uringServe) inflight() int {
	rs.st.mu.Lock()
	defer rs.st.mu.Unlock()
	return rs.st.inflight
}

// armRecv keeps one RECV in flight while there is room in rbuf.
func (rs *uringServe) armRecv() {
	if rs.readDone || rs.recvArmed {
		return
	}
	if rs.rhead == rs.rtail {
		rs.rhead, rs.rtail = 0, 0
	} else if rs.rhead > 0 && len(rs.rbuf)-rs.rtail < FrameHeaderSize+rs.st.srv.opts.MaxPayload {
		n := copy(rs.rbuf, rs.rbuf[rs.rhead:rs.rtail])
		rs.rhead, rs.rtail = 0, n
	}
	b := rs.rbuf[rs.rtail:]
	if len(b) == 0 {
		return // full of frames waiting for room at the handler
	}
	e := rs.sqe()
	if e == nil {
		return
	}
	e.PrepRecv(int32(rs.sock.fd), b)
	e.UserData = udUringRecv
	rs.recvArmed = true
}

// recvDone handles the RECV's completion.
func (rs *uringServe) recvDone(res int32) {
	rs.recvArmed = false
	switch {
	case res == -int32(unix.EINTR) || res == -int32(unix.EAGAIN):
		return // armed again
	case res <= 0:
		rs.readDone = true // EOF, shutdown or an error: the peer is gone
		return
	}
	if !rs.readDone {
		rs.rtail += int(res)
	}
}

// parse serves every whole frame in rbuf while the handler has room.
func (rs *uringServe) parse() error {
	st := rs.st
	max := uint32(st.srv.opts.MaxPayload)
	var h frameHeader
	for !rs.broken && rs.rtail-rs.rhead >= FrameHeaderSize && !rs.sock.backlogged() {
		if err := parseHeader(rs.rbuf[rs.rhead:rs.rtail], kindRequest, max, &h); err != nil {
			return err
		}
		end := rs.rhead + FrameHeaderSize + int(h.length)
		if end > rs.rtail {
			return nil // the rest of the payload is still coming
		}
		st.mu.Lock()
		room := st.inflight < st.srv.opts.Depth
		st.mu.Unlock()
		if !room {
			return nil
		}
		r := st.get(int(h.length))
		if err := r.grow(int(h.length)); err != nil {
			st.release(r)
			return err
		}
		r.Payload = r.buf[:h.length]
		copy(r.Payload, rs.rbuf[rs.rhead+FrameHeaderSize:end])
		rs.rhead = end
		r.id = h.id
		r.Code = h.code
		r.Header = h.user
		st.srv.h.Serve(r)
	}
	return nil
}

// pollSleep is how long the flusher waits for a full socket before it looks
// again (the watchdog's shutdown ends the wait at the next look).
const pollSleep = 100 * time.Millisecond
