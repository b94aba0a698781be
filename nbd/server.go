// Package nbd serves engine.Volume exports over the Network Block Device
// protocol (fixed newstyle handshake, simple and structured replies).
//
// A connection to a volume that lends its store shards (store.Local, see
// store.ShardDriver) is served by one OS thread with one io_uring that
// receives requests, runs the shards' I/O and sends the replies (see
// uringconn.go), as long as the volume has shards no other connection runs.
// Any other connection runs two goroutines: a reader that parses requests
// and submits them to the volume without waiting, and a writer that batches
// the replies of completed requests. Requests live in preallocated
// per-connection slots with payload buffers outside the Go heap, so the data
// path does not allocate.
//
// Requests must be aligned to the volume's 4096-byte block size (advertised
// with NBD_INFO_BLOCK_SIZE); anything else is answered with NBD_EINVAL.
// Connections to the same export share its Volume, so NBD_CMD_FLUSH on any
// connection covers writes completed on every connection (CAN_MULTI_CONN).
// The server never closes the volumes it serves.
//
// AttachKernel attaches a volume as /dev/nbdN through the Linux kernel's own
// NBD client, served in process over socketpairs (see kernel.go);
// DisconnectKernel and ListKernel manage such devices from any process.
package nbd

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/torus-storage/torus/engine"
	"github.com/torus-storage/torus/internal/unixsock"
)

// Export is one named volume offered by a Server.
type Export struct {
	// Name is what clients ask for; the first export is also the default
	// (empty name).
	Name string
	// Description is shown to clients that ask for it.
	Description string
	// Volume serves the I/O. The server does not close it.
	Volume engine.Volume
	// ReadOnly rejects writes, trims and write-zeroes with EPERM.
	ReadOnly bool

	// liveSize checks requests against the volume's size at each request
	// instead of the size at the connection's start: for the kernel's
	// client, whose size AttachKernel raises when the volume grows.
	liveSize bool
}

// Options tune a Server. Zero values pick defaults.
type Options struct {
	// Logger receives connection-level events; nil discards them.
	Logger *slog.Logger
	// MaxInFlight bounds the requests in flight per connection (default 256).
	// When it is reached the connection stops reading until a reply is sent.
	MaxInFlight int
	// MaxPayload is the largest read or write accepted (default 32 MiB).
	MaxPayload int
	// NoDirectReplies makes every reply go through the connection's writer
	// goroutine. By default the goroutine that completes a request (a store
	// thread) writes the reply itself with a non-blocking write when no other
	// reply is being written, which saves a goroutine wake-up per reply.
	// It applies to the goroutine path only (see NoUring).
	NoDirectReplies bool
	// NoUring serves every connection with a reader and a writer goroutine.
	// By default, a connection to an export whose volume can lend its store
	// shards (store.Local) is served by one OS thread with one io_uring
	// that runs those shards itself, as long as the volume has shards no
	// other connection runs; the others use the goroutine path.
	NoUring bool
}

const (
	defaultMaxInFlight = 256
	defaultMaxPayload  = 32 << 20
	minMaxInFlight     = 128
	maxMaxInFlight     = 1 << 14
	blockSize          = 4096
	// handshakeTimeout bounds the option haggling phase.
	handshakeTimeout = 30 * time.Second
	// drainTimeout bounds how long replies may take to reach a client when the
	// server shuts down.
	drainTimeout = 10 * time.Second
)

// Server serves a fixed set of exports. It is safe to call Serve on several
// listeners.
type Server struct {
	exports []Export
	opt     Options
	log     *slog.Logger

	mu     sync.Mutex
	driven map[driveable][]bool // shards run by uring connections; guarded by mu
}

// NewServer checks the exports and options and returns a server.
func NewServer(exports []Export, opt Options) (*Server, error) {
	if len(exports) == 0 {
		return nil, errors.New("nbd: no exports")
	}
	seen := make(map[string]bool)
	for i, e := range exports {
		if e.Volume == nil {
			return nil, fmt.Errorf("nbd: export %q has no volume", e.Name)
		}
		if len(e.Name) > maxStringLen || len(e.Description) > maxStringLen {
			return nil, fmt.Errorf("nbd: export %d: name or description longer than %d bytes", i, maxStringLen)
		}
		if seen[e.Name] {
			return nil, fmt.Errorf("nbd: duplicate export name %q", e.Name)
		}
		seen[e.Name] = true
		if bs := e.Volume.BlockSize(); bs != blockSize {
			return nil, fmt.Errorf("nbd: export %q: block size %d, want %d", e.Name, bs, blockSize)
		}
		if sz := e.Volume.Size(); sz < 0 || sz%blockSize != 0 {
			return nil, fmt.Errorf("nbd: export %q: size %d is not a multiple of %d", e.Name, sz, blockSize)
		}
	}
	if opt.MaxInFlight == 0 {
		opt.MaxInFlight = defaultMaxInFlight
	}
	if opt.MaxInFlight < minMaxInFlight || opt.MaxInFlight > maxMaxInFlight {
		return nil, fmt.Errorf("nbd: MaxInFlight %d is outside [%d, %d]", opt.MaxInFlight, minMaxInFlight, maxMaxInFlight)
	}
	if opt.MaxPayload == 0 {
		opt.MaxPayload = defaultMaxPayload
	}
	if opt.MaxPayload < 1<<20 || opt.MaxPayload%blockSize != 0 || opt.MaxPayload > 1<<30 {
		return nil, fmt.Errorf("nbd: MaxPayload %d must be a multiple of %d between 1 MiB and 1 GiB", opt.MaxPayload, blockSize)
	}
	log := opt.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Server{exports: append([]Export(nil), exports...), opt: opt, log: log, driven: make(map[driveable][]bool)}, nil
}

// Serve accepts connections on l until ctx is done or l fails. On return the
// listener is closed and every connection has finished: on cancellation each
// connection stops reading requests, waits for its in-flight requests to
// complete and their replies to be sent, then closes.
func (s *Server) Serve(ctx context.Context, l net.Listener) error {
	// Deferred in this order so that, whichever way Serve ends, connections
	// are told to stop (cancel) before Serve waits for them (wg.Wait).
	var wg sync.WaitGroup
	defer wg.Wait()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stop := context.AfterFunc(ctx, func() { l.Close() })
	defer stop()

	var tempDelay time.Duration
	for {
		nc, err := l.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			var ne net.Error
			if errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) ||
				errors.Is(err, syscall.ECONNABORTED) || (errors.As(err, &ne) && ne.Timeout()) {
				// Transient: out of descriptors or an aborted handshake. Back off.
				tempDelay = min(max(2*tempDelay, 5*time.Millisecond), time.Second)
				s.log.Warn("nbd: accept", "err", err, "retry_in", tempDelay)
				time.Sleep(tempDelay)
				continue
			}
			l.Close()
			return fmt.Errorf("nbd: accept on %s: %w", l.Addr(), err)
		}
		tempDelay = 0
		wg.Add(1)
		go func() {
			defer wg.Done()
			s.serveConn(ctx, nc)
		}()
	}
}

// serveConn runs the handshake and then the transmission phase of one client.
func (s *Server) serveConn(ctx context.Context, nc net.Conn) {
	defer nc.Close()
	log := s.log.With("remote", nc.RemoteAddr().String())
	// Cancellation interrupts a blocked handshake read; the transmission
	// phase installs its own hook.
	unhook := context.AfterFunc(ctx, func() { nc.SetDeadline(time.Now()) })
	nc.SetDeadline(time.Now().Add(handshakeTimeout))
	hs, err := s.handshake(nc)
	unhook()
	if err != nil {
		if !errors.Is(err, errAbort) {
			log.Debug("nbd: handshake ended", "err", err)
		}
		return
	}
	nc.SetDeadline(time.Time{})
	if ctx.Err() != nil {
		return
	}
	log.Debug("nbd: client attached", "export", hs.export.Name, "structured", hs.structured)
	if err := s.transmit(ctx, nc, hs.export, hs.structured); err != nil {
		log.Debug("nbd: connection ended", "err", err)
	}
}

// transmit serves the transmission phase of e on nc: on a uring connection
// when it can (see Options.NoUring), else on the reader and writer
// goroutines. It returns when the client disconnects, breaks the protocol,
// or ctx is done, after every in-flight request completed and its reply was
// sent.
func (s *Server) transmit(ctx context.Context, nc net.Conn, e *Export, structured bool) error {
	if ok, err := s.transmitUring(ctx, nc, e, structured); ok {
		return err
	}
	c, err := newConn(nc, e, structured, s.opt)
	if err != nil {
		return fmt.Errorf("nbd: connection setup: %w", err)
	}
	defer c.close()
	hook := context.AfterFunc(ctx, func() { c.shutdown() })
	defer hook()
	return c.serve()
}

// transmitUring serves nc on a uring connection if the volume has shards to
// lend and nc has a socket descriptor. ok is false when it did not read
// from nc (the caller serves it another way).
func (s *Server) transmitUring(ctx context.Context, nc net.Conn, e *Export, structured bool) (ok bool, err error) {
	dv, isDv := e.Volume.(driveable)
	if s.opt.NoUring || !isDv {
		return false, nil
	}
	fd := socketFD(nc)
	if fd < 0 {
		return false, nil
	}
	ids := s.claimShards(dv)
	if len(ids) == 0 {
		return false, nil
	}
	defer s.releaseShards(dv, ids)
	// The uring thread serves the socket through a duplicate descriptor;
	// once it runs, nc is closed, which takes the socket out of Go's
	// netpoller. Left there, every request arriving would also wake the M
	// that an idle P parks in epoll_wait, for nothing: at QD1 that costs a
	// third of the IOPS on two CPUs.
	dfd, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		s.log.Warn("nbd: uring connection setup failed; serving with goroutines", "err", fmt.Errorf("dup: %w", err))
		return false, nil
	}
	c, err := newUringConn(dfd, e, dv, ids, structured, s.opt)
	if err != nil {
		unix.Close(dfd)
		s.log.Warn("nbd: uring connection setup failed; serving with goroutines", "err", err)
		return false, nil
	}
	defer c.close()
	setup := make(chan error, 1)
	done := make(chan error, 1)
	go func() { done <- c.run(setup) }()
	if err := <-setup; err != nil {
		<-done
		unix.Close(dfd)
		s.log.Warn("nbd: uring connection setup failed; serving with goroutines", "err", err)
		return false, nil
	}
	nc.Close()
	hook := context.AfterFunc(ctx, c.shutdown)
	defer hook()
	err = <-done
	unix.Close(dfd) // run has returned: nothing uses it (fdOpen is false)
	return true, err
}

// socketFD returns nc's descriptor, or -1. It stays valid until nc is
// closed.
func socketFD(nc net.Conn) int {
	sc, ok := nc.(syscall.Conn)
	if !ok {
		return -1
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return -1
	}
	fd := -1
	if err := raw.Control(func(f uintptr) { fd = int(f) }); err != nil {
		return -1
	}
	return fd
}

// claimShards takes every shard of dv that no uring connection runs.
func (s *Server) claimShards(dv driveable) []int {
	s.mu.Lock()
	defer s.mu.Unlock()
	taken := s.driven[dv]
	if taken == nil {
		taken = make([]bool, dv.Shards())
		s.driven[dv] = taken
	}
	var ids []int
	for i, t := range taken {
		if !t {
			taken[i] = true
			ids = append(ids, i)
		}
	}
	return ids
}

// releaseShards hands ids of dv back for the next connection.
func (s *Server) releaseShards(dv driveable, ids []int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, id := range ids {
		s.driven[dv][id] = false
	}
}

// Listen opens a listener for addr, which is "unix:PATH" or "tcp:HOST:PORT".
// A stale unix socket file (nothing accepts on it) is removed first; a live
// one is an error.
func Listen(addr string) (net.Listener, error) {
	kind, rest, ok := strings.Cut(addr, ":")
	if !ok || rest == "" {
		return nil, fmt.Errorf("nbd: listen address %q: want unix:PATH or tcp:HOST:PORT", addr)
	}
	switch kind {
	case "unix":
		l, err := unixsock.Listen(rest)
		switch {
		case errors.Is(err, unixsock.ErrNotSocket):
			return nil, fmt.Errorf("nbd: %s exists and is not a socket: pick another --listen", rest)
		case errors.Is(err, syscall.EADDRINUSE):
			return nil, fmt.Errorf("nbd: %s is in use by another process: pick another --listen", addr)
		case err != nil:
			return nil, fmt.Errorf("nbd: listen on %s: %w", addr, err)
		}
		return l, nil
	case "tcp":
		l, err := net.Listen("tcp", rest)
		if err != nil {
			if errors.Is(err, syscall.EADDRINUSE) {
				return nil, fmt.Errorf("%s is in use by another process: pick another --listen: %w", addr, err)
			}
			return nil, fmt.Errorf("nbd: listen on %s: %w", addr, err)
		}
		return l, nil
	}
	return nil, fmt.Errorf("nbd: listen address %q: want unix:PATH or tcp:HOST:PORT", addr)
}

// ServeTransmission serves the transmission phase of the named export on nc,
// with no handshake and simple replies: the peer must already know the size
// and the flags of TransmissionFlags. This is how the kernel's NBD client
// talks (see AttachKernel). It returns when the peer sends NBD_CMD_DISC or
// hangs up, when the stream breaks, or, after ctx is done, once in-flight
// requests have completed and their replies were sent. nc is closed on return.
func (s *Server) ServeTransmission(ctx context.Context, nc net.Conn, export string) error {
	defer nc.Close()
	e := s.findExport(export)
	if e == nil {
		return fmt.Errorf("nbd: no export %q", export)
	}
	err := s.transmit(ctx, nc, e, false)
	if err != nil && ctx.Err() == nil {
		return err
	}
	// A stop requested through ctx is an orderly end, whatever the
	// interrupted read reported.
	return nil
}

// TransmissionFlags returns the transmission flags (NBD_FLAG_*) the server
// advertises for the named export, or false if there is no such export.
func (s *Server) TransmissionFlags(export string) (uint16, bool) {
	e := s.findExport(export)
	if e == nil {
		return 0, false
	}
	return transmissionFlags(e), true
}
