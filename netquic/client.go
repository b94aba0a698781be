package netquic

// Client invariants (kept by this file):
//   - A client session is one connection with Options.Streams long-lived
//     streams; each stream has Depth slots. A request id is
//     generation<<32 | slot index, so a response finds its slot without a
//     map and a stale id never matches a reused slot.
//   - Slot states: idle → waiting (caller wrote the request) → receiving
//     (reader owns the caller's response buffer) → done (caller owns it
//     again). A caller whose context ends moves waiting → abandoned and
//     returns at once; the reader then drains the late response and frees the
//     slot. A caller never returns while the reader may still write into its
//     buffer (state receiving).
//   - The slot index goes back to the stream's free list exactly once: by the
//     caller after done, or by the reader after an abandoned slot's response.
//   - A session dies once (first stream or connection error); every waiting
//     slot then completes with ErrConnLost, and the next Call dials anew.
//   - Asynchronous calls (Go) use the same slots with a Completer instead of
//     a waiting caller: whoever moves the slot out of waiting (the reader
//     with the response, failWaiting, or the watchdog at the deadline, which
//     moves it to abandoned) completes it, exactly once. An async slot's
//     deadline is cleared and the slot freed under the stream's amu, which
//     the watchdog holds while it scans deadlines, so the deadline it reads
//     always belongs to the slot's current occupant.

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/quic-go/quic-go"
)

// ErrConnLost is wrapped by the error of every call that was in flight when
// its connection failed; the request may or may not have been executed.
var ErrConnLost = errors.New("netquic: connection lost")

// ErrClosed is returned by calls on a closed Client.
var ErrClosed = errors.New("netquic: client closed")

// ErrTimeout is wrapped by the error of an asynchronous call (Go) whose
// deadline passed before its response arrived; it also wraps
// context.DeadlineExceeded.
var ErrTimeout = errors.New("netquic: call timed out")

// ErrResponseTooLarge is returned when a response payload exceeds the
// capacity of the buffer the caller provided.
var ErrResponseTooLarge = errors.New("netquic: response larger than the caller's buffer")

const (
	slotIdle uint32 = iota
	slotWaiting
	slotReceiving
	slotDone
	slotAbandoned
)

// smallWrite is the largest payload copied next to its header so the frame
// goes out in one stream Write.
const smallWrite = 64 << 10

// Client sends requests to one peer over a pool of long-lived streams and
// matches responses by id. It is safe for concurrent use; it dials lazily
// and redials after the connection fails.
type Client struct {
	addr string
	tls  *tls.Config
	opts Options

	mu     sync.Mutex // serializes dialing and Close
	tr     *quic.Transport
	udp    *net.UDPConn
	sess   atomic.Pointer[clientSession]
	closed atomic.Bool
}

// NewClient returns a client of the server at addr (host:port). tlsConf is
// the node's client configuration (LoadTLS); when its ServerName is empty the
// host of addr is verified. With TransportUnix, addr is the socket path and
// tlsConf is not used. Nothing is dialed until the first Call.
func NewClient(addr string, tlsConf *tls.Config, opts *Options) (*Client, error) {
	o := opts.withDefaults()
	switch o.Transport {
	case TransportUnix:
		if addr == "" {
			return nil, fmt.Errorf("netquic: unix client: empty socket path")
		}
		return &Client{addr: addr, opts: o}, nil
	case TransportQUIC, TransportTCP:
	default:
		return nil, fmt.Errorf("netquic: client %s: unknown transport %q", addr, o.Transport)
	}
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, fmt.Errorf("netquic: client %s: %w", addr, err)
	}
	tc := tlsConf.Clone()
	if tc.ServerName == "" {
		tc.ServerName = host
	}
	return &Client{addr: addr, tls: tc, opts: o}, nil
}

// Call sends req and waits for the response, which it stores in resp:
// resp.Payload must have the capacity of the largest response accepted and
// receives its length. req.Payload may be reused once Call returns. When ctx
// ends first, Call returns ctx.Err() (wrapped) and the late response is
// dropped. Call does not allocate in steady state.
func (c *Client) Call(ctx context.Context, req, resp *Message) error {
	if len(req.Payload) > c.opts.MaxPayload {
		return fmt.Errorf("netquic: call %s: payload %d over limit %d", c.addr, len(req.Payload), c.opts.MaxPayload)
	}
	s, err := c.session(ctx)
	if err != nil {
		return err
	}
	return s.call(ctx, req, resp)
}

// Completer is told when an asynchronous call (Client.Go) ends.
type Completer interface {
	// CallDone receives the response message given to Go, filled in when
	// err is nil. It is called on a netquic goroutine and must not block.
	CallDone(resp *Message, err error)
}

// Go sends req like Call but does not wait for the response:
// done.CallDone(resp, err) is called exactly once when the response has been
// stored in resp, the call failed, or deadline (zero: none) passed, in which
// case err wraps ErrTimeout and the late response is dropped, never written
// to resp. req.Payload may be reused once Go returns; resp belongs to the
// client until CallDone. Go never waits for a dial (without a live
// connection it dials on a goroutine, with a copy of req); it blocks only
// while every slot of the least-loaded stream is taken. It does not allocate
// in steady state. CallDone may run before Go returns.
func (c *Client) Go(req, resp *Message, deadline time.Time, done Completer) {
	if len(req.Payload) > c.opts.MaxPayload {
		done.CallDone(resp, fmt.Errorf("netquic: call %s: payload %d over limit %d", c.addr, len(req.Payload), c.opts.MaxPayload))
		return
	}
	var dl int64
	if !deadline.IsZero() {
		dl = deadline.UnixNano()
	}
	if s := c.sess.Load(); s != nil && !s.isDead() {
		s.start(req, resp, dl, done)
		return
	}
	// No live connection: dial on a goroutine so the caller (an I/O
	// submitter) never waits for a handshake or a dead peer. req is
	// copied: its payload may be reused once Go returns.
	r := *req
	if len(req.Payload) > 0 {
		r.Payload = append([]byte(nil), req.Payload...)
	}
	go func() {
		ctx, cancel := context.Background(), context.CancelFunc(func() {})
		if !deadline.IsZero() {
			ctx, cancel = context.WithDeadline(ctx, deadline)
		}
		s, err := c.session(ctx)
		cancel()
		if err != nil {
			done.CallDone(resp, err)
			return
		}
		s.start(&r, resp, dl, done)
	}()
}

// Close closes the connection; calls in flight fail with ErrConnLost.
func (c *Client) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed.Swap(true) {
		return nil
	}
	if s := c.sess.Load(); s != nil {
		s.fail(ErrClosed)
	}
	if c.tr != nil {
		c.tr.Close()
		c.udp.Close()
	}
	return nil
}

// session returns the live session, dialing a new one if there is none.
func (c *Client) session(ctx context.Context) (*clientSession, error) {
	if s := c.sess.Load(); s != nil && !s.isDead() {
		return s, nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed.Load() {
		return nil, ErrClosed
	}
	if s := c.sess.Load(); s != nil && !s.isDead() {
		return s, nil
	}
	s, err := c.dial(ctx)
	if err != nil {
		return nil, fmt.Errorf("netquic: dial %s (%s): %w", c.addr, c.opts.Transport, err)
	}
	c.sess.Store(s)
	return s, nil
}

// dial opens a connection and its streams. Called with c.mu held.
func (c *Client) dial(ctx context.Context) (*clientSession, error) {
	s := &clientSession{c: c, dead: make(chan struct{})}
	raws := make([]rawStream, 0, c.opts.Streams)
	switch c.opts.Transport {
	case TransportQUIC:
		if c.tr == nil {
			udp, err := listenUDP(":0", c.opts.UDPBuffer, c.opts.Logger)
			if err != nil {
				return nil, err
			}
			c.udp = udp
			c.tr = &quic.Transport{Conn: faultPacketConn(udp, c.opts.Logger)}
		}
		ra, err := net.ResolveUDPAddr("udp", c.addr)
		if err != nil {
			return nil, err
		}
		conn, err := c.tr.Dial(ctx, ra, c.tls, c.opts.QUIC)
		if err != nil {
			return nil, err
		}
		s.closeConn = func() { conn.CloseWithError(0, "closed") }
		for range c.opts.Streams {
			st, err := conn.OpenStreamSync(ctx)
			if err != nil {
				conn.CloseWithError(1, "open stream failed")
				return nil, fmt.Errorf("open stream: %w", err)
			}
			raws = append(raws, quicStream{st})
		}
		s.connDone = conn.Context()
	case TransportTCP, TransportUnix:
		// One connection per stream.
		abortAll := func() {
			for _, r := range raws {
				r.abort()
			}
		}
		for range c.opts.Streams {
			raw, err := c.dialStream(ctx)
			if err != nil {
				abortAll()
				return nil, err
			}
			raws = append(raws, raw)
		}
		s.closeConn = abortAll
	}
	s.streams = make([]*clientStream, len(raws))
	for i, r := range raws {
		s.streams[i] = newClientStream(s, r, c.opts.Depth)
	}
	// Start the goroutines that may call fail only once s is complete.
	for _, cs := range s.streams {
		go cs.readLoop()
	}
	go s.watchdog()
	if s.connDone != nil {
		go func() {
			<-s.connDone.Done()
			s.fail(context.Cause(s.connDone))
		}()
	}
	return s, nil
}

// dialStream opens one connection of the TCP (TLS) or unix transport.
func (c *Client) dialStream(ctx context.Context) (rawStream, error) {
	if c.opts.Transport == TransportUnix {
		var d net.Dialer
		nc, err := d.DialContext(ctx, "unix", c.addr)
		if err != nil {
			return nil, err
		}
		return unixStream{nc.(*net.UnixConn)}, nil
	}
	d := tls.Dialer{Config: c.tls}
	nc, err := d.DialContext(ctx, "tcp", c.addr)
	if err != nil {
		return nil, err
	}
	tc := nc.(*tls.Conn)
	setNoDelay(tc.NetConn())
	return tcpStream{tc}, nil
}

// clientSession is one connection and its streams.
type clientSession struct {
	c         *Client
	streams   []*clientStream
	closeConn func()
	connDone  context.Context // QUIC: ends with the connection

	once sync.Once
	dead chan struct{}
	err  error // set before dead is closed
}

func (s *clientSession) isDead() bool {
	select {
	case <-s.dead:
		return true
	default:
		return false
	}
}

// fail kills the session: the connection is closed and every waiting call
// completes with ErrConnLost wrapping cause.
func (s *clientSession) fail(cause error) {
	s.once.Do(func() {
		if cause == nil {
			cause = errors.New("connection closed")
		}
		s.err = fmt.Errorf("%w: %s: %w", ErrConnLost, s.c.addr, cause)
		close(s.dead)
		if s.closeConn != nil {
			s.closeConn()
		}
		for _, cs := range s.streams {
			cs.failWaiting(s.err)
		}
	})
}

func (s *clientSession) call(ctx context.Context, req, resp *Message) error {
	cs := s.leastLoaded()
	defer cs.inflight.Add(-1)

	var idx uint32
	select {
	case idx = <-cs.free:
	case <-ctx.Done():
		return fmt.Errorf("netquic: call %s: waiting for a slot: %w", s.c.addr, context.Cause(ctx))
	case <-s.dead:
		return s.err
	}
	sl := &cs.slots[idx]
	sl.gen++
	id := uint64(sl.gen)<<32 | uint64(idx)
	sl.resp = resp
	sl.err = nil
	sl.cb = nil
	sl.id.Store(id)
	sl.state.Store(slotWaiting)
	if s.isDead() {
		// fail may have swept the slots before this one became waiting.
		if sl.state.CompareAndSwap(slotWaiting, slotIdle) {
			cs.free <- idx
			return s.err
		}
	}

	var dl int64
	if d, ok := ctx.Deadline(); ok {
		dl = d.UnixNano()
	}
	werr := cs.write(dl, id, req)
	if werr != nil {
		// A frame may be half written; the stream is unusable.
		s.fail(werr)
	}

	select {
	case <-sl.done:
	case <-ctx.Done():
		if sl.state.CompareAndSwap(slotWaiting, slotAbandoned) {
			return fmt.Errorf("netquic: call %s: %w", s.c.addr, context.Cause(ctx))
		}
		<-sl.done // the reader owns the buffer right now; wait for it
	}
	err := sl.err
	sl.resp = nil
	sl.state.Store(slotIdle)
	cs.free <- idx
	if werr != nil && ctx.Err() != nil {
		return fmt.Errorf("netquic: call %s: write blocked: %w (%w)", s.c.addr, context.Cause(ctx), ErrConnLost)
	}
	return err
}

// leastLoaded returns the stream with the fewest calls in flight (ties go to
// the first) after counting one more on it.
func (s *clientSession) leastLoaded() *clientStream {
	cs := s.streams[0]
	best := cs.inflight.Load()
	for _, o := range s.streams[1:] {
		if n := o.inflight.Load(); n < best {
			cs, best = o, n
		}
	}
	cs.inflight.Add(1)
	return cs
}

// start begins an asynchronous call; dl is the deadline in Unix ns (0:
// none).
func (s *clientSession) start(req, resp *Message, dl int64, done Completer) {
	cs := s.leastLoaded()
	var idx uint32
	select {
	case idx = <-cs.free:
	default:
		var tc <-chan time.Time
		if dl != 0 {
			t := time.NewTimer(time.Until(time.Unix(0, dl)))
			defer t.Stop()
			tc = t.C
		}
		select {
		case idx = <-cs.free:
		case <-tc:
			cs.inflight.Add(-1)
			done.CallDone(resp, fmt.Errorf("netquic: call %s: waiting for a slot: %w (%w)", s.c.addr, ErrTimeout, context.DeadlineExceeded))
			return
		case <-s.dead:
			cs.inflight.Add(-1)
			done.CallDone(resp, s.err)
			return
		}
	}
	sl := &cs.slots[idx]
	sl.gen++
	id := uint64(sl.gen)<<32 | uint64(idx)
	sl.resp = resp
	sl.err = nil
	sl.cb = done
	sl.deadline.Store(dl)
	sl.id.Store(id)
	sl.state.Store(slotWaiting)
	if s.isDead() {
		if sl.state.CompareAndSwap(slotWaiting, slotDone) {
			cs.finishAsync(idx, sl, s.err)
			return
		}
	}
	if err := cs.write(dl, id, req); err != nil {
		// A frame may be half written; the stream is unusable. fail
		// completes this call with the others.
		s.fail(err)
	}
}

// finishAsync completes the asynchronous call in slot idx, which the
// caller moved out of waiting: it frees the slot, then calls the Completer.
func (cs *clientStream) finishAsync(idx uint32, sl *slot, err error) {
	cb, resp := sl.cb, sl.resp
	sl.cb, sl.resp = nil, nil
	cs.amu.Lock()
	sl.deadline.Store(0)
	sl.state.Store(slotIdle)
	cs.free <- idx
	cs.amu.Unlock()
	cs.inflight.Add(-1)
	cb.CallDone(resp, err)
}

// expire abandons the asynchronous calls of cs whose deadline is before now
// and completes them with ErrTimeout.
func (cs *clientStream) expire(now int64) {
	cs.amu.Lock()
	exp := cs.expired[:0]
	for i := range cs.slots {
		sl := &cs.slots[i]
		if d := sl.deadline.Load(); d == 0 || d > now {
			continue
		}
		if sl.state.CompareAndSwap(slotWaiting, slotAbandoned) {
			// The reader drains the late response and frees the slot.
			exp = append(exp, asyncDone{sl.cb, sl.resp})
			sl.cb, sl.resp = nil, nil
			sl.deadline.Store(0)
		}
	}
	cs.expired = exp[:0]
	cs.amu.Unlock()
	for _, e := range exp {
		cs.inflight.Add(-1)
		e.cb.CallDone(e.resp, fmt.Errorf("netquic: call %s: %w (%w)", cs.s.c.addr, ErrTimeout, context.DeadlineExceeded))
	}
}

type asyncDone struct {
	cb   Completer
	resp *Message
}

// clientStream is one long-lived stream of a session.
type clientStream struct {
	s        *clientSession
	raw      rawStream
	inflight atomic.Int32
	free     chan uint32
	slots    []slot

	wmu  sync.Mutex
	wbuf []byte // header, and small payloads next to it
	// wdl is the caller's deadline (Unix ns) while a write with one is in
	// progress, else 0; the session watchdog fails the session when a write
	// is blocked past it.
	wdl atomic.Int64

	rbuf    []byte // header scratch of the reader
	discard []byte // sink for abandoned responses

	amu     sync.Mutex  // see the invariants: async deadlines and frees
	expired []asyncDone // watchdog scratch, under amu
}

type slot struct {
	state atomic.Uint32
	id    atomic.Uint64
	gen   uint32   // owned by the caller holding the slot
	resp  *Message // the caller's response, valid while waiting/receiving
	err   error
	done  chan struct{} // capacity 1; one send per transition to done
	// cb is the Completer of an asynchronous call (nil for Call), set
	// before the slot becomes waiting; deadline is its deadline in Unix ns
	// (0: none or not async).
	cb       Completer
	deadline atomic.Int64
}

func newClientStream(s *clientSession, raw rawStream, depth int) *clientStream {
	cs := &clientStream{
		s:       s,
		raw:     raw,
		free:    make(chan uint32, depth),
		slots:   make([]slot, depth),
		wbuf:    make([]byte, FrameHeaderSize+smallWrite),
		rbuf:    make([]byte, FrameHeaderSize),
		discard: make([]byte, 64<<10),
		expired: make([]asyncDone, 0, depth),
	}
	for i := range cs.slots {
		cs.slots[i].done = make(chan struct{}, 1)
		cs.free <- uint32(i)
	}
	return cs
}

// write sends one request frame, in a single Write when the payload is small.
// A write blocked past deadline dl (Unix ns, 0: none) (a peer that stopped reading) is
// ended by the session watchdog.
func (cs *clientStream) write(dl int64, id uint64, m *Message) error {
	h := frameHeader{kind: kindRequest, code: m.Code, id: id, length: uint32(len(m.Payload)), user: m.Header}
	cs.wmu.Lock()
	defer cs.wmu.Unlock()
	if dl != 0 {
		cs.wdl.Store(dl)
		defer cs.wdl.Store(0)
	}
	return writeFrame(cs.raw, cs.wbuf, &h, m.Payload)
}

// watchdogTick is how often blocked writes are checked against their
// callers' deadlines, hence the slack of the deadline of a blocked write.
const watchdogTick = 20 * time.Millisecond

// watchdog fails the session when a write is blocked past its caller's
// deadline, and returns when the session dies. Setting stream write
// deadlines instead would cost quic-go a timer per Write.
func (s *clientSession) watchdog() {
	t := time.NewTicker(watchdogTick)
	defer t.Stop()
	for {
		select {
		case <-s.dead:
			return
		case now := <-t.C:
			for _, cs := range s.streams {
				if d := cs.wdl.Load(); d != 0 && now.UnixNano() > d {
					s.fail(errors.New("write blocked past the caller's deadline (peer not reading)"))
					return
				}
			}
			for _, cs := range s.streams {
				cs.expire(now.UnixNano())
			}
		}
	}
}

// writeFrame writes header h and payload p to w using wbuf as scratch.
func writeFrame(w rawStream, wbuf []byte, h *frameHeader, p []byte) error {
	putHeader(wbuf, h)
	if len(p) <= len(wbuf)-FrameHeaderSize {
		n := copy(wbuf[FrameHeaderSize:], p)
		_, err := w.Write(wbuf[:FrameHeaderSize+n])
		return err
	}
	if _, err := w.Write(wbuf[:FrameHeaderSize]); err != nil {
		return err
	}
	_, err := w.Write(p)
	return err
}

// failWaiting completes every waiting slot with err.
func (cs *clientStream) failWaiting(err error) {
	for i := range cs.slots {
		sl := &cs.slots[i]
		if sl.state.CompareAndSwap(slotWaiting, slotDone) {
			if sl.cb != nil {
				cs.finishAsync(uint32(i), sl, err)
				continue
			}
			sl.err = err
			sl.done <- struct{}{}
		}
	}
}

// readLoop reads responses and completes their slots until the stream fails.
func (cs *clientStream) readLoop() {
	var h frameHeader
	max := uint32(cs.s.c.opts.MaxPayload)
	for {
		if err := readHeader(cs.raw, cs.rbuf, kindResponse, max, &h); err != nil {
			cs.s.fail(fmt.Errorf("read response: %w", err))
			return
		}
		idx := uint32(h.id)
		if int(idx) >= len(cs.slots) || cs.slots[idx].id.Load() != h.id {
			cs.s.fail(fmt.Errorf("%w: response for unknown id %#x", ErrMalformed, h.id))
			return
		}
		sl := &cs.slots[idx]
		if sl.state.CompareAndSwap(slotWaiting, slotReceiving) {
			var err error
			m := sl.resp
			if int(h.length) > cap(m.Payload) {
				err = fmt.Errorf("%w: %d > %d", ErrResponseTooLarge, h.length, cap(m.Payload))
				if derr := cs.drain(int(h.length)); derr != nil {
					cs.complete(idx, sl, derr)
					cs.s.fail(derr)
					return
				}
			} else {
				m.Payload = m.Payload[:h.length]
				if rerr := readPayload(cs.raw, m.Payload); rerr != nil {
					cs.complete(idx, sl, fmt.Errorf("%w: %s: read response: %w", ErrConnLost, cs.s.c.addr, rerr))
					cs.s.fail(rerr)
					return
				}
				m.Code = h.code
				m.Header = h.user
			}
			cs.complete(idx, sl, err)
			continue
		}
		if sl.state.CompareAndSwap(slotAbandoned, slotIdle) {
			err := cs.drain(int(h.length))
			cs.free <- idx
			if err != nil {
				cs.s.fail(err)
				return
			}
			continue
		}
		cs.s.fail(fmt.Errorf("%w: response for id %#x in state %d", ErrMalformed, h.id, sl.state.Load()))
		return
	}
}

// complete ends the call in slot idx, which the reader holds in state
// receiving.
func (cs *clientStream) complete(idx uint32, sl *slot, err error) {
	if sl.cb != nil {
		cs.finishAsync(idx, sl, err)
		return
	}
	sl.err = err
	sl.state.Store(slotDone)
	sl.done <- struct{}{}
}

// drain reads and drops n payload bytes.
func (cs *clientStream) drain(n int) error {
	for n > 0 {
		k := min(n, len(cs.discard))
		if err := readPayload(cs.raw, cs.discard[:k]); err != nil {
			return fmt.Errorf("drain response: %w", err)
		}
		n -= k
	}
	return nil
}
