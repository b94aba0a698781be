package netquic

// Server invariants (kept by this file):
//   - One goroutine per stream reads requests and calls Handler.Serve inline;
//     there is no goroutine per request. The handler answers with
//     ServerRequest.Reply exactly once, from any goroutine, now or later
//     (e.g. from an io_uring completion).
//   - A ServerRequest and its payload buffer belong to the stream's free
//     list, except between the read of its frame and its Reply. Buffers are
//     page-aligned memory outside the Go heap (internal/alignbuf), so a
//     handler may give them to the kernel for O_DIRECT I/O; they are freed
//     when the stream is gone and the request has been replied to.
//   - At most Options.Depth requests per stream are with the handler; the
//     reader stops reading until one is answered (back-pressure).
//   - A malformed frame aborts its stream only; the connection and its other
//     streams keep serving.

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
	"github.com/torus-storage/torus/internal/alignbuf"
)

// Handler serves requests. Serve is called on the stream's reader
// goroutine and must not block for I/O: it either replies at once or starts
// the work and replies later from another goroutine.
type Handler interface {
	Serve(r *ServerRequest)
}

// HandlerFunc adapts a function to Handler.
type HandlerFunc func(r *ServerRequest)

// Serve calls f(r).
func (f HandlerFunc) Serve(r *ServerRequest) { f(r) }

// ServerRequest is a request received by a Server. Its fields and buffers
// are valid until Reply returns.
type ServerRequest struct {
	// Message holds the request: Code (op), Header and Payload. Payload is
	// page-aligned memory from the server's pool.
	Message

	id  uint64
	st  *serverStream
	buf []byte // backing store of Payload and Buffer, from alignbuf
}

// PeerName is the common name of the peer's certificate (the node name
// given to IssueCert), verified against the cluster CA.
func (r *ServerRequest) PeerName() string { return r.st.peerName }

// Buffer returns n bytes of page-aligned scratch owned by r, for the
// response payload (a read's data). It shares storage with r.Payload, so
// consume the request payload first (when the buffer has to grow, r.Payload
// is set to nil). n is at most Options.MaxPayload.
func (r *ServerRequest) Buffer(n int) ([]byte, error) {
	if n > r.st.srv.opts.MaxPayload {
		return nil, fmt.Errorf("netquic: buffer of %d bytes over limit %d", n, r.st.srv.opts.MaxPayload)
	}
	if n > cap(r.buf) {
		r.Payload = nil // its memory is about to be unmapped
		if err := r.grow(n); err != nil {
			return nil, err
		}
	}
	return r.buf[:n], nil
}

// Request buffers come in two classes: small (smallBuf) and large (at
// least largeBuf, or MaxPayload if smaller; a larger payload gets a buffer
// of its own size, kept for the request's reuse). So a MaxPayload above
// largeBuf costs memory only for the payloads that need it. A stream keeps
// at most maxLargeFree idle large buffers.
const (
	smallBuf     = 64 << 10
	largeBuf     = 1<<20 + 4096
	maxLargeFree = 8
)

func (r *ServerRequest) grow(n int) error {
	if n <= cap(r.buf) {
		return nil
	}
	size := smallBuf
	if n > smallBuf {
		size = max(n, min(largeBuf, r.st.srv.opts.MaxPayload))
	}
	b, err := alignbuf.Alloc(size)
	if err != nil {
		return fmt.Errorf("netquic: request buffer: %w", err)
	}
	if r.buf != nil {
		_ = alignbuf.Free(r.buf)
	}
	r.buf = b
	return nil
}

// Reply sends the response (status code, header, payload) on the stream
// the request came from and releases r; r must not be used afterwards.
// It blocks only while the peer's flow-control window is full, at most
// Options.ReplyTimeout, after which the stream is aborted.
// payload may be r.Payload, memory from r.Buffer, or any other slice.
func (r *ServerRequest) Reply(code uint8, header *[UserHeaderSize]byte, payload []byte) error {
	st := r.st
	h := frameHeader{kind: kindResponse, code: code, id: r.id, length: uint32(len(payload))}
	if header != nil {
		h.user = *header
	}
	st.wmu.Lock()
	var err error
	if st.werr != nil {
		err = st.werr
	} else {
		st.wsince.Store(st.srv.tick.Load())
		if err = writeFrame(st.raw, st.wbuf, &h, payload); err != nil {
			// A frame may be half written: the stream is done for.
			st.werr = err
			st.raw.abort()
		}
		st.wsince.Store(0)
	}
	st.wmu.Unlock()
	st.release(r)
	if err != nil {
		return fmt.Errorf("netquic: reply: %w", err)
	}
	return nil
}

// Server accepts connections and serves their streams with a Handler.
type Server struct {
	h    Handler
	opts Options
	tls  *tls.Config

	ln    *quic.Listener
	tr    *quic.Transport
	udp   *net.UDPConn
	tcpLn net.Listener

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu      sync.Mutex // guards streams; not on the request path
	streams map[*serverStream]struct{}

	tick atomic.Int64 // coarse clock of the reply watchdog, starts at 1
}

// serverTick is the period of the server's coarse clock.
const serverTick = 250 * time.Millisecond

// watchdog advances the coarse clock and aborts streams whose reply write
// has been blocked for ReplyTimeout (a peer that stopped reading), so a
// completion goroutine cannot be stalled for longer. A per-reply stream
// write deadline would cost quic-go a timer per Write.
func (s *Server) watchdog() {
	t := time.NewTicker(serverTick)
	defer t.Stop()
	limit := int64(s.opts.ReplyTimeout/serverTick) + 1
	for {
		select {
		case <-s.ctx.Done():
			return
		case <-t.C:
		}
		now := s.tick.Add(1)
		s.mu.Lock()
		for st := range s.streams {
			if since := st.wsince.Load(); since != 0 && now-since >= limit {
				s.opts.Logger.Warn("netquic: reply blocked, aborting stream", "peer", st.peer.String(), "timeout", s.opts.ReplyTimeout)
				st.raw.abort()
			}
		}
		s.mu.Unlock()
	}
}

// Listen starts a server on addr (host:port; port 0 picks one) with the
// node's server TLS configuration (LoadTLS) and serves every request with h
// until Close. With TransportUnix, addr is a socket path (a stale socket
// file there is replaced; Close removes it) and tlsConf is not used.
func Listen(addr string, tlsConf *tls.Config, h Handler, opts *Options) (*Server, error) {
	o := opts.withDefaults()
	ctx, cancel := context.WithCancel(context.Background())
	s := &Server{h: h, opts: o, tls: tlsConf, ctx: ctx, cancel: cancel, streams: make(map[*serverStream]struct{})}
	s.tick.Store(1)
	s.wg.Go(s.watchdog)
	switch o.Transport {
	case TransportQUIC:
		udp, err := listenUDP(addr, o.UDPBuffer, o.Logger)
		if err != nil {
			cancel()
			return nil, fmt.Errorf("netquic: listen %s: %w", addr, err)
		}
		s.udp = udp
		s.tr = &quic.Transport{Conn: faultPacketConn(udp, o.Logger), StatelessResetKey: resetKey(tlsConf)}
		ln, err := s.tr.Listen(tlsConf, o.QUIC)
		if err != nil {
			udp.Close()
			cancel()
			return nil, fmt.Errorf("netquic: listen %s: %w", addr, err)
		}
		s.ln = ln
		s.wg.Go(s.acceptQUIC)
	case TransportTCP:
		ln, err := tls.Listen("tcp", addr, tlsConf)
		if err != nil {
			cancel()
			return nil, fmt.Errorf("netquic: listen %s: %w", addr, err)
		}
		s.tcpLn = ln
		s.wg.Go(s.acceptTCP)
	case TransportUnix:
		ln, err := listenUnix(addr)
		if err != nil {
			cancel()
			return nil, fmt.Errorf("netquic: listen unix:%s: %w", addr, err)
		}
		s.tcpLn = ln
		s.wg.Go(s.acceptUnix)
	default:
		cancel()
		return nil, fmt.Errorf("netquic: listen %s: unknown transport %q", addr, o.Transport)
	}
	return s, nil
}

// Addr is the address the server listens on.
func (s *Server) Addr() net.Addr {
	if s.ln != nil {
		return s.ln.Addr()
	}
	return s.tcpLn.Addr()
}

// Close stops accepting, closes every connection and waits for the stream
// readers to stop. Requests still with the handler may be replied to later;
// their replies fail.
func (s *Server) Close() error {
	s.cancel()
	if s.ln != nil {
		s.ln.Close()
		s.tr.Close()
		s.udp.Close()
	} else if s.tcpLn != nil {
		s.tcpLn.Close() // a UnixListener also removes its socket file
	}
	s.mu.Lock()
	for st := range s.streams {
		st.raw.abort()
	}
	s.mu.Unlock()
	s.wg.Wait()
	return nil
}

func (s *Server) acceptQUIC() {
	for {
		conn, err := s.ln.Accept(s.ctx)
		if err != nil {
			return
		}
		s.wg.Go(func() {
			for {
				st, err := conn.AcceptStream(s.ctx)
				if err != nil {
					if s.ctx.Err() == nil {
						s.opts.Logger.Debug("netquic: connection ended", "peer", conn.RemoteAddr().String(), "err", err)
					}
					conn.CloseWithError(0, "")
					return
				}
				s.serveStream(quicStream{st}, conn.RemoteAddr(), peerName(conn.ConnectionState().TLS))
			}
		})
	}
}

func (s *Server) acceptUnix() {
	for {
		c, err := s.tcpLn.Accept()
		if err != nil {
			return
		}
		if rh, ok := s.h.(UringHandler); ok && s.tryUring(rh, c.(*net.UnixConn)) {
			continue
		}
		s.serveStream(unixStream{c.(*net.UnixConn)}, c.RemoteAddr(), UnixPeerName)
	}
}

func (s *Server) acceptTCP() {
	for {
		c, err := s.tcpLn.Accept()
		if err != nil {
			return
		}
		tc := c.(*tls.Conn)
		setNoDelay(tc.NetConn())
		s.serveStream(tcpStream{tc}, c.RemoteAddr(), "")
	}
}

// newStream makes the server side of one stream.
func (s *Server) newStream(raw rawStream, peer net.Addr, name string) *serverStream {
	return &serverStream{
		srv:      s,
		raw:      raw,
		peer:     peer,
		peerName: name,
		wbuf:     make([]byte, FrameHeaderSize+smallWrite),
		rbuf:     make([]byte, FrameHeaderSize),
		room:     make(chan struct{}, 1),
	}
}

// serveStream starts the reader goroutine of one stream.
func (s *Server) serveStream(raw rawStream, peer net.Addr, name string) {
	st := s.newStream(raw, peer, name)
	s.mu.Lock()
	if s.ctx.Err() != nil {
		s.mu.Unlock()
		raw.abort()
		return
	}
	s.streams[st] = struct{}{}
	s.mu.Unlock()
	s.wg.Go(st.readLoop)
}

// serverStream is one stream of a connection, server side.
type serverStream struct {
	srv      *Server
	raw      rawStream
	peer     net.Addr
	peerName string      // certificate common name, set before the first Serve
	drv      UringDriver // the handler's driver on a uring connection, else nil

	wmu  sync.Mutex
	wbuf []byte
	werr error // first write error; later replies fail fast
	// wsince is the server tick at which the current reply write started,
	// 0 when none is in progress; the watchdog aborts a stream whose write
	// has blocked for ReplyTimeout.
	wsince atomic.Int64

	rbuf []byte

	mu        sync.Mutex // guards freeSmall, freeLarge, inflight, gone
	freeSmall []*ServerRequest
	freeLarge []*ServerRequest
	inflight  int
	gone      bool          // reader stopped: released requests free their buffers
	room      chan struct{} // signalled when inflight drops below Depth
}

// get returns an idle request whose buffer holds n bytes if one is free.
func (st *serverStream) get(n int) *ServerRequest {
	st.mu.Lock()
	defer st.mu.Unlock()
	st.inflight++
	list := &st.freeSmall
	if n > smallBuf && len(st.freeLarge) > 0 {
		list = &st.freeLarge
	}
	if k := len(*list); k > 0 {
		r := (*list)[k-1]
		*list = (*list)[:k-1]
		return r
	}
	return &ServerRequest{st: st}
}

func (st *serverStream) release(r *ServerRequest) {
	r.Payload = nil
	st.mu.Lock()
	st.inflight--
	var drop []byte
	switch {
	case st.gone:
		drop, r.buf = r.buf, nil
	case cap(r.buf) > smallBuf && len(st.freeLarge) < maxLargeFree:
		st.freeLarge = append(st.freeLarge, r)
	default:
		if cap(r.buf) > smallBuf {
			drop, r.buf = r.buf, nil
		}
		st.freeSmall = append(st.freeSmall, r)
	}
	wake := !st.gone && st.inflight == st.srv.opts.Depth-1
	st.mu.Unlock()
	if drop != nil {
		_ = alignbuf.Free(drop)
	}
	if wake {
		select {
		case st.room <- struct{}{}:
		default:
		}
	}
}

// waitRoom blocks while Depth requests are with the handler.
func (st *serverStream) waitRoom() bool {
	for {
		st.mu.Lock()
		ok := st.inflight < st.srv.opts.Depth
		st.mu.Unlock()
		if ok {
			return true
		}
		select {
		case <-st.room:
		case <-st.srv.ctx.Done():
			return false
		}
	}
}

func (st *serverStream) readLoop() {
	defer st.finish()
	var h frameHeader
	max := uint32(st.srv.opts.MaxPayload)
	for {
		if !st.waitRoom() {
			return
		}
		if err := readHeader(st.raw, st.rbuf, kindRequest, max, &h); err != nil {
			st.fail(err)
			return
		}
		if st.peerName == "" {
			if ts, ok := st.raw.(tcpStream); ok {
				st.peerName = peerName(ts.ConnectionState()) // handshake done by the read above
			}
		}
		r := st.get(int(h.length))
		if err := r.grow(int(h.length)); err != nil {
			st.release(r)
			st.fail(err)
			return
		}
		r.Payload = r.buf[:h.length]
		if err := readPayload(st.raw, r.Payload); err != nil {
			st.release(r)
			st.fail(err)
			return
		}
		r.id = h.id
		r.Code = h.code
		r.Header = h.user
		st.srv.h.Serve(r)
	}
}

// fail ends the stream after a read error, logging what is not a plain
// close.
func (st *serverStream) fail(err error) {
	if errors.Is(err, ErrMalformed) {
		st.srv.opts.Logger.Warn("netquic: closing stream", "peer", st.peer.String(), "err", err)
		st.raw.abort()
		return
	}
	if st.srv.ctx.Err() == nil && !isClosed(err) {
		st.srv.opts.Logger.Debug("netquic: stream ended", "peer", st.peer.String(), "err", err)
	}
	st.raw.Close()
}

// finish marks the stream gone and frees the buffers of idle requests.
func (st *serverStream) finish() {
	st.srv.mu.Lock()
	delete(st.srv.streams, st)
	st.srv.mu.Unlock()
	st.mu.Lock()
	st.gone = true
	free := append(st.freeSmall, st.freeLarge...)
	st.freeSmall, st.freeLarge = nil, nil
	st.mu.Unlock()
	for _, r := range free {
		_ = alignbuf.Free(r.buf)
		r.buf = nil
	}
}

func peerName(cs tls.ConnectionState) string {
	if len(cs.PeerCertificates) == 0 {
		return ""
	}
	return cs.PeerCertificates[0].Subject.CommonName
}

func isClosed(err error) bool {
	var ae *quic.ApplicationError
	var se *quic.StreamError
	return errors.Is(err, net.ErrClosed) || errors.As(err, &ae) || errors.As(err, &se) || errors.Is(err, context.Canceled)
}
