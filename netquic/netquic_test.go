package netquic

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
)

// pki is a CA with a server and a client node certificate.
type pki struct {
	ca, server, client string
	srvTLS, cliTLS     *TLSConfigs
}

func newPKI(t testing.TB) *pki {
	t.Helper()
	d := t.TempDir()
	p := &pki{ca: filepath.Join(d, "ca"), server: filepath.Join(d, "n1"), client: filepath.Join(d, "n2")}
	if err := NewCA(p.ca); err != nil {
		t.Fatal(err)
	}
	if err := IssueCert(p.ca, "n1", []string{"127.0.0.1", "localhost"}, p.server); err != nil {
		t.Fatal(err)
	}
	if err := IssueCert(p.ca, "n2", []string{"127.0.0.1"}, p.client); err != nil {
		t.Fatal(err)
	}
	var err error
	if p.srvTLS, err = LoadTLS(p.server); err != nil {
		t.Fatal(err)
	}
	if p.cliTLS, err = LoadTLS(p.client); err != nil {
		t.Fatal(err)
	}
	return p
}

// echo replies with Code+1, the same header and the request payload; op
// 7 answers with the peer's certificate name.
var echo = HandlerFunc(func(r *ServerRequest) {
	if r.Code == 7 {
		_ = r.Reply(0, nil, []byte(r.PeerName()))
		return
	}
	_ = r.Reply(r.Code+1, &r.Header, r.Payload)
})

// transports are every transport; tlsTransports those with certificates.
var (
	transports    = []string{TransportQUIC, TransportTCP, TransportUnix}
	tlsTransports = []string{TransportQUIC, TransportTCP}
)

// testAddr is where a test server of transport tr listens.
func testAddr(t testing.TB, tr string) string {
	if tr == TransportUnix {
		return filepath.Join(t.TempDir(), "node.sock")
	}
	return "127.0.0.1:0"
}

// quiet logs warnings only, keeping benchmark output readable.
var quiet = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))

func startPair(t testing.TB, p *pki, transport string, h Handler) (*Server, *Client) {
	t.Helper()
	srv, err := Listen(testAddr(t, transport), p.srvTLS.Server, h, &Options{Transport: transport, Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	cli, err := NewClient(srv.Addr().String(), p.cliTLS.Client, &Options{Transport: transport, Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	return srv, cli
}

func TestKeyFiles(t *testing.T) {
	p := newPKI(t)
	for _, f := range []string{filepath.Join(p.ca, CAKeyFile), filepath.Join(p.server, NodeKeyFile), filepath.Join(p.client, NodeKeyFile)} {
		fi, err := os.Stat(f)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != 0o600 {
			t.Errorf("%s: mode %v, want 0600", f, fi.Mode().Perm())
		}
	}
	if err := NewCA(p.ca); err == nil {
		t.Error("NewCA overwrote an existing CA")
	}
	if err := IssueCert(p.ca, "n1", nil, p.server); err == nil {
		t.Error("IssueCert overwrote an existing node key")
	}
}

func TestMTLS(t *testing.T) {
	p := newPKI(t)
	// A second, unrelated cluster.
	d := t.TempDir()
	if err := NewCA(filepath.Join(d, "ca")); err != nil {
		t.Fatal(err)
	}
	if err := IssueCert(filepath.Join(d, "ca"), "evil", []string{"127.0.0.1"}, filepath.Join(d, "evil")); err != nil {
		t.Fatal(err)
	}
	evil, err := LoadTLS(filepath.Join(d, "evil"))
	if err != nil {
		t.Fatal(err)
	}
	for _, tr := range tlsTransports {
		t.Run(tr, func(t *testing.T) {
			srv, cli := startPair(t, p, tr, echo)
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			resp := Message{Payload: make([]byte, 16)}
			if err := cli.Call(ctx, &Message{Code: 1, Payload: []byte("hello")}, &resp); err != nil {
				t.Fatalf("same-CA call: %v", err)
			}
			if string(resp.Payload) != "hello" || resp.Code != 2 {
				t.Fatalf("got %q code %d", resp.Payload, resp.Code)
			}
			resp.Payload = resp.Payload[:cap(resp.Payload)]
			if err := cli.Call(ctx, &Message{Code: 7}, &resp); err != nil || string(resp.Payload) != "n2" {
				t.Fatalf("PeerName: %q, %v; want n2", resp.Payload, err)
			}
			// A client that trusts our CA but presents a certificate from
			// another CA, or none, is refused by the server.
			foreign := evil.Client.Clone()
			foreign.RootCAs = p.cliTLS.Client.RootCAs
			anon := foreign.Clone()
			anon.Certificates = nil
			for name, tc := range map[string]*tls.Config{"foreign cert": foreign, "no cert": anon} {
				bad, err := NewClient(srv.Addr().String(), tc, &Options{Transport: tr})
				if err != nil {
					t.Fatal(err)
				}
				if err := callOnce(bad, 2*time.Second); err == nil {
					t.Fatalf("client with %s was served", name)
				} else {
					t.Logf("client with %s: %v", name, err)
				}
				bad.Close()
			}
			// A server with a certificate from another CA is refused by our client.
			esrv, err := Listen("127.0.0.1:0", evil.Server, echo, &Options{Transport: tr})
			if err != nil {
				t.Fatal(err)
			}
			defer esrv.Close()
			c2, err := NewClient(esrv.Addr().String(), p.cliTLS.Client, &Options{Transport: tr})
			if err != nil {
				t.Fatal(err)
			}
			defer c2.Close()
			if err := callOnce(c2, 2*time.Second); err == nil {
				t.Fatal("client accepted a server with a foreign certificate")
			} else {
				t.Logf("foreign server: %v", err)
			}
		})
	}
}

func callOnce(c *Client, d time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	resp := Message{Payload: make([]byte, 16)}
	return c.Call(ctx, &Message{Code: 1, Payload: []byte("x")}, &resp)
}

func TestRoundTrip(t *testing.T) {
	p := newPKI(t)
	for _, tr := range transports {
		t.Run(tr, func(t *testing.T) {
			_, cli := startPair(t, p, tr, echo)
			const callers, calls = 16, 100
			var wg sync.WaitGroup
			errs := make(chan error, callers)
			for g := range callers {
				wg.Go(func() {
					rng := rand.New(rand.NewPCG(uint64(g), 7))
					req := Message{Payload: make([]byte, 256<<10)}
					resp := Message{Payload: make([]byte, 256<<10)}
					for i := range calls {
						n := rng.IntN(len(req.Payload) + 1)
						if i%4 != 0 {
							n = rng.IntN(8192)
						}
						req.Code = uint8(rng.UintN(200))
						if req.Code == 7 { // op 7 is PeerName
							req.Code = 8
						}
						for j := range req.Header {
							req.Header[j] = byte(rng.UintN(256))
						}
						pl := req.Payload[:n]
						for j := range pl {
							pl[j] = byte(rng.UintN(256))
						}
						m := req
						m.Payload = pl
						resp.Payload = resp.Payload[:cap(resp.Payload)]
						ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
						err := cli.Call(ctx, &m, &resp)
						cancel()
						if err != nil {
							errs <- fmt.Errorf("caller %d call %d: %w", g, i, err)
							return
						}
						if resp.Code != req.Code+1 || resp.Header != req.Header || !bytes.Equal(resp.Payload, pl) {
							errs <- fmt.Errorf("caller %d call %d: response differs (len %d, want %d)", g, i, len(resp.Payload), n)
							return
						}
					}
				})
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Error(err)
			}
		})
	}
}

// slowEcho replies to op 9 after 1 s from another goroutine, at once
// otherwise.
var slowEcho = HandlerFunc(func(r *ServerRequest) {
	if r.Code == 9 {
		go func() {
			time.Sleep(time.Second)
			_ = r.Reply(r.Code+1, &r.Header, r.Payload)
		}()
		return
	}
	_ = r.Reply(r.Code+1, &r.Header, r.Payload)
})

func TestDeadline(t *testing.T) {
	p := newPKI(t)
	for _, tr := range transports {
		t.Run(tr, func(t *testing.T) {
			_, cli := startPair(t, p, tr, slowEcho)
			if err := callOnce(cli, 5*time.Second); err != nil {
				t.Fatal(err)
			}
			// Many slow calls that time out, with their buffers reused at once.
			for range 20 {
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Millisecond)
				resp := Message{Payload: make([]byte, 64)}
				start := time.Now()
				err := cli.Call(ctx, &Message{Code: 9, Payload: []byte("late")}, &resp)
				cancel()
				if !errors.Is(err, context.DeadlineExceeded) {
					t.Fatalf("slow call: err %v, want deadline exceeded", err)
				}
				if d := time.Since(start); d > 700*time.Millisecond { // the reply comes after 1 s
					t.Fatalf("slow call returned after %v", d)
				}
			}
			// Fast calls keep working while the late responses arrive and are dropped.
			deadline := time.Now().Add(1200 * time.Millisecond)
			for time.Now().Before(deadline) {
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				resp := Message{Payload: make([]byte, 64)}
				err := cli.Call(ctx, &Message{Code: 1, Payload: []byte("fast")}, &resp)
				cancel()
				if err != nil || string(resp.Payload) != "fast" {
					t.Fatalf("fast call: %v %q", err, resp.Payload)
				}
				time.Sleep(10 * time.Millisecond)
			}
		})
	}
}

// TestDeadlineBlockedWrite: a server whose handler stops reading its
// streams fills the flow-control windows; callers writing 1 MiB must still
// return by their deadline.
func TestDeadlineBlockedWrite(t *testing.T) {
	p := newPKI(t)
	for _, tr := range transports {
		t.Run(tr, func(t *testing.T) {
			release := make(chan struct{})
			stuck := HandlerFunc(func(r *ServerRequest) {
				<-release // blocks the stream's reader: nothing more is read
				_ = r.Reply(0, nil, nil)
			})
			_, cli := startPair(t, p, tr, stuck)
			defer close(release) // before the server's cleanup waits for its readers
			payload := make([]byte, 1<<20)
			var wg sync.WaitGroup
			errs := make(chan error, 64)
			start := time.Now()
			for range 64 {
				wg.Go(func() {
					ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
					defer cancel()
					resp := Message{Payload: make([]byte, 16)}
					errs <- cli.Call(ctx, &Message{Code: 2, Payload: payload}, &resp)
				})
			}
			wg.Wait()
			close(errs)
			if d := time.Since(start); d > 3*time.Second {
				t.Errorf("64 calls against a stuck server took %v", d)
			}
			// A write that times out kills the connection (its stream holds a
			// half-written frame), so calls that had already written may see
			// ErrConnLost a moment before their own deadline.
			for err := range errs {
				if !errors.Is(err, context.DeadlineExceeded) && !errors.Is(err, ErrConnLost) {
					t.Errorf("err %v, want deadline exceeded or connection lost", err)
				}
			}
		})
	}
}

// blackhole never replies to op 9.
var blackhole = HandlerFunc(func(r *ServerRequest) {
	if r.Code == 9 {
		return
	}
	_ = r.Reply(r.Code+1, &r.Header, r.Payload)
})

func TestServerRestart(t *testing.T) {
	p := newPKI(t)
	for _, tr := range transports {
		t.Run(tr, func(t *testing.T) {
			srv, err := Listen(testAddr(t, tr), p.srvTLS.Server, blackhole, &Options{Transport: tr})
			if err != nil {
				t.Fatal(err)
			}
			addr := srv.Addr().String()
			cli, err := NewClient(addr, p.cliTLS.Client, &Options{Transport: tr})
			if err != nil {
				t.Fatal(err)
			}
			defer cli.Close()
			if err := callOnce(cli, 5*time.Second); err != nil {
				t.Fatal(err)
			}
			inflight := make(chan error, 1)
			go func() {
				resp := Message{Payload: make([]byte, 16)}
				inflight <- cli.Call(context.Background(), &Message{Code: 9}, &resp)
			}()
			time.Sleep(50 * time.Millisecond)
			srv.Close()
			srv2, err := Listen(addr, p.srvTLS.Server, blackhole, &Options{Transport: tr})
			if err != nil {
				t.Fatal(err)
			}
			defer srv2.Close()
			// The in-flight call fails clearly, within the stateless-reset
			// (QUIC) or RST (TCP) time, well before the idle timeout.
			_ = callOnce(cli, 2*time.Second) // may hit the old connection
			select {
			case err := <-inflight:
				if !errors.Is(err, ErrConnLost) {
					t.Fatalf("in-flight call: err %v, want ErrConnLost", err)
				}
			case <-time.After(5 * time.Second):
				t.Fatal("in-flight call still blocked 5 s after the server restarted")
			}
			if err := callOnce(cli, 5*time.Second); err != nil {
				t.Fatalf("call after restart: %v", err)
			}
		})
	}
}

func TestMalformedFrame(t *testing.T) {
	p := newPKI(t)
	srv, err := Listen("127.0.0.1:0", p.srvTLS.Server, echo, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	tc := p.cliTLS.Client.Clone()
	tc.ServerName = "127.0.0.1"
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := quic.DialAddr(ctx, srv.Addr().String(), tc, QUICConfig(4))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.CloseWithError(0, "")

	good := func() {
		t.Helper()
		st, err := conn.OpenStreamSync(ctx)
		if err != nil {
			t.Fatal(err)
		}
		defer st.Close()
		buf := make([]byte, FrameHeaderSize+3)
		putHeader(buf, &frameHeader{kind: kindRequest, code: 4, id: 77, length: 3})
		copy(buf[FrameHeaderSize:], "abc")
		if _, err := st.Write(buf); err != nil {
			t.Fatal(err)
		}
		st.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadFull(st, buf); err != nil {
			t.Fatalf("good stream: %v", err)
		}
		var h frameHeader
		if err := parseHeader(buf, kindResponse, 16, &h); err != nil || h.id != 77 || h.code != 5 || string(buf[FrameHeaderSize:]) != "abc" {
			t.Fatalf("good stream: bad response %v %+v", err, h)
		}
	}
	good()
	hdr := func(mut func(b []byte)) []byte {
		b := make([]byte, FrameHeaderSize)
		putHeader(b, &frameHeader{kind: kindRequest, id: 1, length: 8})
		mut(b)
		return b
	}
	cases := map[string][]byte{
		"magic":     hdr(func(b []byte) { b[0] = 0x42 }),
		"kind":      hdr(func(b []byte) { b[1] = kindResponse }),
		"length":    hdr(func(b []byte) { b[12], b[13], b[14], b[15] = 0xff, 0xff, 0xff, 0x7f }),
		"truncated": hdr(func(b []byte) {})[:20],
		"shortbody": hdr(func(b []byte) {}), // says 8 bytes, sends none, then FIN
	}
	for name, b := range cases {
		st, err := conn.OpenStreamSync(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := st.Write(b); err != nil {
			t.Fatal(err)
		}
		if name == "truncated" || name == "shortbody" {
			st.Close()
		}
		st.SetReadDeadline(time.Now().Add(5 * time.Second))
		n, err := st.Read(make([]byte, 64))
		var se *quic.StreamError
		switch {
		case errors.As(err, &se):
		case err == io.EOF && n == 0:
		default:
			t.Errorf("%s: stream not closed by the server: n=%d err=%v", name, n, err)
		}
		// The connection still serves other streams.
		good()
	}
}

func TestMalformedFrameTCP(t *testing.T) {
	p := newPKI(t)
	srv, cli := startPair(t, p, TransportTCP, echo)
	tc := p.cliTLS.Client.Clone()
	tc.ServerName = "127.0.0.1"
	c, err := tls.Dial("tcp", srv.Addr().String(), tc)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	b := make([]byte, FrameHeaderSize)
	putHeader(b, &frameHeader{kind: kindRequest, id: 1, length: 8})
	b[0] = 0x42
	if _, err := c.Write(b); err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := c.Read(b); err == nil || isTimeout(err) {
		t.Fatalf("server kept a stream with a bad frame open: n=%d err=%v", n, err)
	}
	if err := callOnce(cli, 5*time.Second); err != nil {
		t.Fatalf("server stopped serving after a bad frame: %v", err)
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// FuzzFrame feeds arbitrary bytes to the frame decoder: it must reject or
// decode them without panicking, and anything it decodes must re-encode to
// the same bytes.
func FuzzFrame(f *testing.F) {
	b := make([]byte, FrameHeaderSize+4)
	putHeader(b, &frameHeader{kind: kindRequest, code: 3, id: 1 << 40, length: 4})
	f.Add(b)
	f.Add(b[:10])
	f.Add([]byte{frameMagic, kindRequest, 0, 1})
	f.Fuzz(func(t *testing.T, data []byte) {
		r := bytes.NewReader(data)
		hb := make([]byte, FrameHeaderSize)
		payload := make([]byte, 1024)
		off := 0
		for {
			var h frameHeader
			err := readHeader(r, hb, kindRequest, uint32(len(payload)), &h)
			if err != nil {
				if err != io.EOF && !errors.Is(err, ErrMalformed) {
					t.Fatalf("unexpected error type: %v", err)
				}
				return
			}
			if h.length > uint32(len(payload)) {
				t.Fatalf("length %d accepted over max", h.length)
			}
			if err := readPayload(r, payload[:h.length]); err != nil {
				if !errors.Is(err, ErrMalformed) {
					t.Fatalf("unexpected payload error: %v", err)
				}
				return
			}
			re := make([]byte, FrameHeaderSize)
			putHeader(re, &h)
			if !bytes.Equal(re, data[off:off+FrameHeaderSize]) {
				t.Fatalf("re-encoded header differs")
			}
			off += FrameHeaderSize + int(h.length)
		}
	})
}

// TestReplyTimeout: a client that stops reading cannot hold a server's
// Reply longer than ReplyTimeout.
func TestReplyTimeout(t *testing.T) {
	p := newPKI(t)
	replyErr := make(chan error, 64)
	h := HandlerFunc(func(r *ServerRequest) {
		b, _ := r.Buffer(1 << 20)
		go func() { replyErr <- r.Reply(0, nil, b) }() // as a completion goroutine would
	})
	srv, err := Listen("127.0.0.1:0", p.srvTLS.Server, h, &Options{ReplyTimeout: 500 * time.Millisecond, Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	tc := p.cliTLS.Client.Clone()
	tc.ServerName = "127.0.0.1"
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := quic.DialAddr(ctx, srv.Addr().String(), tc, QUICConfig(4))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.CloseWithError(0, "")
	st, err := conn.OpenStreamSync(ctx)
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, FrameHeaderSize)
	for i := range 32 { // 32 MiB of responses, far over the windows; never read
		putHeader(b, &frameHeader{kind: kindRequest, code: 3, id: uint64(i)})
		if _, err := st.Write(b); err != nil {
			t.Fatal(err)
		}
	}
	start := time.Now()
	for {
		select {
		case err := <-replyErr:
			if err == nil {
				continue
			}
			if d := time.Since(start); d > 3*time.Second {
				t.Fatalf("blocked reply failed only after %v", d)
			}
			return
		case <-time.After(5 * time.Second):
			t.Fatal("a reply to a client that does not read is still blocked after 5 s")
		}
	}
}

// TestUnixSocketFile checks the unix transport's socket file: 0600, a stale
// one replaced, a live one or a non-socket file refused, removed by Close,
// and requests seen as from UnixPeerName.
func TestUnixSocketFile(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "node.sock")
	opts := &Options{Transport: TransportUnix, Logger: quiet}

	// A stale socket file (its listener gone without removing it).
	stale, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	stale.SetUnlinkOnClose(false)
	stale.Close()
	srv, err := Listen(path, nil, echo, opts)
	if err != nil {
		t.Fatalf("a stale socket file must be replaced: %v", err)
	}
	fi, err := os.Stat(path)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket file: %v, mode %v; want 0600", err, fi.Mode())
	}
	if _, err := Listen(path, nil, echo, opts); !errors.Is(err, syscall.EADDRINUSE) {
		t.Fatalf("second server on a live socket: err %v, want EADDRINUSE", err)
	}
	cli, err := NewClient(path, nil, opts)
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	resp := Message{Payload: make([]byte, 16)}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := cli.Call(ctx, &Message{Code: 7}, &resp); err != nil || string(resp.Payload) != UnixPeerName {
		t.Fatalf("peer name over unix: %q, %v; want %q", resp.Payload, err, UnixPeerName)
	}
	srv.Close()
	if _, err := os.Lstat(path); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("socket file left after Close: %v", err)
	}

	plain := filepath.Join(dir, "plain")
	if err := os.WriteFile(plain, []byte("data"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := Listen(plain, nil, echo, opts); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Fatalf("listen on a regular file: err %v, want 'not a socket'", err)
	}
	if b, _ := os.ReadFile(plain); string(b) != "data" {
		t.Fatal("a regular file in the way was changed")
	}
	if _, err := NewClient("", nil, opts); err == nil {
		t.Fatal("empty socket path accepted")
	}
}
