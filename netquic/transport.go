package netquic

// Transport invariants (kept by this file):
//   - A Transport value ("quic" or "tcp") only decides how a byte stream is
//     obtained; framing, pipelining and deadlines are identical on both, so a
//     benchmark of one against the other measures the transport alone.
//   - The UDP socket of every QUIC endpoint is created here, so its buffer
//     sizes are set (and logged) before quic-go sees it.

import (
	"context"
	"crypto/ecdsa"
	"crypto/sha256"
	"crypto/tls"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/torus-storage/torus/internal/unixsock"
	"golang.org/x/sys/unix"
)

// Transport names accepted in Options.Transport.
const (
	TransportQUIC = "quic"
	TransportTCP  = "tcp"
	// TransportUnix carries the same frames over a unix domain socket,
	// without TLS, for a client on the node's own machine. The address is
	// the socket's path; who may connect is decided by the socket file's
	// permissions (Listen makes it 0600), not by certificates.
	TransportUnix = "unix"
)

// UnixPeerName is what ServerRequest.PeerName returns on the unix
// transport.
const UnixPeerName = "local"

// Options tune a Client or a Server. The zero value is usable.
type Options struct {
	// Transport is TransportQUIC (default), TransportTCP (TLS 1.3 over
	// TCP, one TCP connection per stream) or TransportUnix (plain frames
	// over one unix socket connection per stream).
	Transport string
	// Streams is the number of long-lived streams a client opens per
	// connection (default 4). Requests go to the least loaded one.
	Streams int
	// Depth is the most requests in flight per stream (default 64); on the
	// server it bounds the requests handed to the Handler and not yet
	// answered, per stream.
	Depth int
	// MaxPayload is the largest payload accepted in a frame (default
	// DefaultMaxPayload). A larger length is a malformed frame.
	MaxPayload int
	// ReplyTimeout bounds how long a server's Reply may block on a peer
	// that does not read (default 10 s); the stream is then aborted.
	ReplyTimeout time.Duration
	// UDPBuffer is the socket buffer size asked for (default 7 MiB).
	UDPBuffer int
	// QUIC overrides the QUIC configuration built by QUICConfig.
	QUIC *quic.Config
	// Logger receives connection-level events (default slog.Default()).
	Logger *slog.Logger
}

func (o *Options) withDefaults() Options {
	var r Options
	if o != nil {
		r = *o
	}
	if r.Transport == "" {
		r.Transport = TransportQUIC
	}
	if r.Streams <= 0 {
		r.Streams = 4
	}
	if r.Depth <= 0 {
		r.Depth = 64
	}
	if r.MaxPayload <= 0 {
		r.MaxPayload = DefaultMaxPayload
	}
	if r.ReplyTimeout <= 0 {
		r.ReplyTimeout = 10 * time.Second
	}
	if r.UDPBuffer <= 0 {
		r.UDPBuffer = 7 << 20
	}
	if r.Logger == nil {
		r.Logger = slog.Default()
	}
	if r.QUIC == nil {
		r.QUIC = QUICConfig(r.Streams)
	}
	return r
}

// QUICConfig returns the QUIC configuration used by default: receive windows
// sized for 1 MiB requests pipelined on a few streams, room for streams
// incoming streams and then some, keep-alives so an idle connection
// survives, and an idle timeout that notices a vanished peer within seconds.
func QUICConfig(streams int) *quic.Config {
	return &quic.Config{
		HandshakeIdleTimeout:           5 * time.Second,
		MaxIdleTimeout:                 15 * time.Second,
		KeepAlivePeriod:                3 * time.Second,
		InitialStreamReceiveWindow:     4 << 20,
		MaxStreamReceiveWindow:         16 << 20,
		InitialConnectionReceiveWindow: 16 << 20,
		MaxConnectionReceiveWindow:     64 << 20,
		MaxIncomingStreams:             int64(max(4*streams, 64)),
		MaxIncomingUniStreams:          -1,
	}
}

// rawStream is one ordered byte stream carrying frames.
type rawStream interface {
	io.Reader
	io.Writer
	// abort ends the stream in both directions with an error.
	abort()
	// Close ends the sending side cleanly.
	Close() error
}

type quicStream struct{ *quic.Stream }

func (s quicStream) abort() {
	s.CancelRead(1)
	s.CancelWrite(1)
}

type tcpStream struct{ *tls.Conn }

// abort closes the TCP connection under the TLS one: tls.Conn.Close would
// first try to send close_notify, which blocks up to 5 s behind a peer that
// does not read.
func (s tcpStream) abort() { s.Conn.NetConn().Close() }

// unixStream is one connection of the unix transport.
type unixStream struct{ *net.UnixConn }

func (s unixStream) abort() { s.UnixConn.Close() }

// listenUnix listens on the unix socket path (unixsock.Listen: a stale
// socket file is replaced, a live one or a non-socket refused) and makes
// the socket file 0600.
func listenUnix(path string) (*net.UnixListener, error) {
	ln, err := unixsock.Listen(path)
	if err != nil {
		return nil, err
	}
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, err
	}
	return ln, nil
}

// listenUDP opens a UDP socket on addr with socket buffers of size bytes if
// the kernel allows it (SO_RCVBUFFORCE/SO_SNDBUFFORCE when root and capped),
// and logs the sizes obtained.
func listenUDP(addr string, size int, log *slog.Logger) (*net.UDPConn, error) {
	ua, err := net.ResolveUDPAddr("udp", addr)
	if err != nil {
		return nil, fmt.Errorf("resolve %s: %w", addr, err)
	}
	c, err := net.ListenUDP("udp", ua)
	if err != nil {
		return nil, fmt.Errorf("listen udp %s: %w", addr, err)
	}
	rcv, snd, err := setUDPBuffers(c, size)
	if err != nil {
		log.Warn("netquic: UDP buffers", "addr", c.LocalAddr().String(), "err", err)
	} else {
		lvl := slog.LevelInfo
		if rcv < size || snd < size {
			lvl = slog.LevelWarn
		}
		log.Log(context.Background(), lvl, "netquic: UDP buffers", "addr", c.LocalAddr().String(),
			"rcvbuf", rcv, "sndbuf", snd, "wanted", size)
	}
	return c, nil
}

// setUDPBuffers asks for size-byte receive and send buffers and returns what
// the kernel granted (Linux reports twice the requested value; this returns
// the reported value halved, the usable size).
func setUDPBuffers(c *net.UDPConn, size int) (rcv, snd int, err error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return 0, 0, fmt.Errorf("syscall conn: %w", err)
	}
	var serr error
	cerr := rc.Control(func(fd uintptr) {
		set := func(opt, force int) int {
			got, _ := unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, opt)
			if got/2 >= size {
				return got / 2
			}
			_ = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, opt, size)
			got, _ = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, opt)
			if got/2 < size {
				_ = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, force, size)
				got, serr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, opt)
			}
			return got / 2
		}
		rcv = set(unix.SO_RCVBUF, unix.SO_RCVBUFFORCE)
		snd = set(unix.SO_SNDBUF, unix.SO_SNDBUFFORCE)
	})
	if cerr != nil {
		return 0, 0, fmt.Errorf("control: %w", cerr)
	}
	if serr != nil {
		return rcv, snd, fmt.Errorf("getsockopt: %w", serr)
	}
	return rcv, snd, nil
}

// resetKey derives the QUIC stateless reset key from the node's private
// key, so a restarted server (same key, same port) resets connections of its
// previous life at once instead of leaving clients to an idle timeout.
func resetKey(tlsConf *tls.Config) *quic.StatelessResetKey {
	if len(tlsConf.Certificates) == 0 {
		return nil
	}
	k, ok := tlsConf.Certificates[0].PrivateKey.(*ecdsa.PrivateKey)
	if !ok {
		return nil
	}
	b, err := k.Bytes()
	if err != nil {
		return nil
	}
	h := sha256.New()
	h.Write([]byte("torus netquic stateless reset v1\x00"))
	h.Write(b)
	var key quic.StatelessResetKey
	copy(key[:], h.Sum(nil))
	return &key
}

// setNoDelay is a no-op guard: Go enables TCP_NODELAY by default; this keeps
// the choice explicit for the TCP transport.
func setNoDelay(c net.Conn) {
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.SetNoDelay(true)
	}
}
