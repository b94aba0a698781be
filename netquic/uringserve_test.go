package netquic

import (
	"bytes"
	"context"
	"io"
	"net"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/torus-storage/torus/iouring"
)

// uringEcho is a UringHandler: the first connection to ask gets a fakeDriver
// (one at a time, like the node's store shards). Serve echoes like echo,
// reporting in Code whether the request came with a driver (Code+1 without,
// Code+101 with); code 9 is answered later, from the driver's Poll on the
// uring thread.
type uringEcho struct {
	mu       sync.Mutex
	held     bool
	drv      *fakeDriver // the last one handed out
	attached atomic.Int32
	released atomic.Int32
}

func (h *uringEcho) AttachUring(r *iouring.Uring) (UringDriver, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.held {
		return nil, nil
	}
	h.held = true
	h.attached.Add(1)
	h.drv = &fakeDriver{h: h}
	return h.drv, nil
}

func (h *uringEcho) Serve(r *ServerRequest) {
	d, _ := r.Driver().(*fakeDriver)
	code := r.Code + 1
	if d != nil {
		code = r.Code + 101
		if r.Code == 9 {
			d.later = append(d.later, r) // answered by Poll
			return
		}
	}
	_ = r.Reply(code, &r.Header, r.Payload)
}

// fakeDriver owns no CQEs; Poll answers the deferred requests and counts
// the loop's turns. While busy, Sleep refuses, so the loop keeps turning
// (as it would with other work to do).
type fakeDriver struct {
	h     *uringEcho
	later []*ServerRequest
	busy  atomic.Bool
	polls atomic.Int64
}

func (d *fakeDriver) Owns(ud uint64) bool { return ud>>56 != 0 }
func (d *fakeDriver) Handle(*iouring.CQE) {}
func (d *fakeDriver) Sleep() bool         { return len(d.later) == 0 && !d.busy.Load() }
func (d *fakeDriver) Woke()               {}
func (d *fakeDriver) Poll() {
	d.polls.Add(1)
	for _, r := range d.later {
		_ = r.Reply(r.Code+101, &r.Header, r.Payload)
	}
	d.later = d.later[:0]
}
func (d *fakeDriver) Release() error {
	d.h.mu.Lock()
	d.h.held = false
	d.h.mu.Unlock()
	d.h.released.Add(1)
	return nil
}

func call(t *testing.T, cli *Client, code uint8, payload []byte) *Message {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp := Message{Payload: make([]byte, len(payload)+16)}
	var hb [UserHeaderSize]byte
	hb[0] = code
	if err := cli.Call(ctx, &Message{Code: code, Header: hb, Payload: payload}, &resp); err != nil {
		t.Fatalf("call %d (%d bytes): %v", code, len(payload), err)
	}
	if !bytes.Equal(resp.Payload, payload) || resp.Header[0] != code {
		t.Fatalf("call %d: echo of %d bytes came back as %d bytes, header %d", code, len(payload), len(resp.Payload), resp.Header[0])
	}
	return &resp
}

func TestUringConnection(t *testing.T) {
	h := &uringEcho{}
	path := filepath.Join(t.TempDir(), "node.sock")
	srv, err := Listen(path, nil, h, &Options{Transport: TransportUnix, Depth: 4, Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	one := &Options{Transport: TransportUnix, Streams: 1, Logger: quiet}
	cli1, err := NewClient(path, nil, one)
	if err != nil {
		t.Fatal(err)
	}
	// Sizes around the frame and buffer edges, up to MaxPayload.
	for _, n := range []int{0, 1, 4096, 65 << 10, DefaultMaxPayload} {
		p := bytes.Repeat([]byte{byte(n)}, n)
		if got := call(t, cli1, 3, p).Code; got != 104 {
			t.Fatalf("%d bytes on the first connection: code %d, want 104 (served on its ring)", n, got)
		}
	}
	if got := call(t, cli1, 9, []byte("later")).Code; got != 110 {
		t.Fatalf("deferred reply: code %d, want 110", got)
	}

	// Pipelined calls, more than Depth, several frames per RECV.
	var wg sync.WaitGroup
	var bad atomic.Int32
	for i := range 64 {
		wg.Go(func() {
			p := bytes.Repeat([]byte{byte(i)}, 100+i*97)
			code := uint8(3)
			if i%3 == 0 {
				code = 9
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			resp := Message{Payload: make([]byte, len(p))}
			if err := cli1.Call(ctx, &Message{Code: code, Payload: p}, &resp); err != nil ||
				!bytes.Equal(resp.Payload, p) || resp.Code != code+101 {
				bad.Add(1)
			}
		})
	}
	wg.Wait()
	if bad.Load() != 0 {
		t.Fatalf("%d of 64 pipelined calls failed or came back wrong", bad.Load())
	}

	// A second connection while the first holds the driver: goroutine path.
	cli2, err := NewClient(path, nil, one)
	if err != nil {
		t.Fatal(err)
	}
	if got := call(t, cli2, 3, []byte("x")).Code; got != 4 {
		t.Fatalf("second connection: code %d, want 4 (no driver)", got)
	}
	cli2.Close()

	// Garbage on a raw connection: closed, nothing else disturbed.
	cli1.Close()
	waitFor := func(what string, cond func() bool) {
		t.Helper()
		for end := time.Now().Add(5 * time.Second); !cond(); time.Sleep(5 * time.Millisecond) {
			if time.Now().After(end) {
				t.Fatal(what)
			}
		}
	}
	waitFor("driver not released after its client closed", func() bool { return h.released.Load() == 1 })
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	waitFor("raw connection did not take the ring", func() bool { return h.attached.Load() == 2 })
	c.Write(bytes.Repeat([]byte{0xee}, 64))
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := c.Read(make([]byte, 1)); err == nil {
		t.Fatalf("malformed frame answered with %d bytes, want the connection closed", n)
	}
	c.Close()
	waitFor("driver not released after a malformed frame", func() bool { return h.released.Load() == 2 })

	// A uring connection open at Close: Close returns and releases it.
	cli3, err := NewClient(path, nil, one)
	if err != nil {
		t.Fatal(err)
	}
	defer cli3.Close()
	if got := call(t, cli3, 3, []byte("y")).Code; got != 104 {
		t.Fatalf("after the first connection ended: code %d, want 104 (ring again)", got)
	}
	done := make(chan struct{})
	go func() { srv.Close(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Close hung with a uring connection open")
	}
	if h.released.Load() != 3 || h.attached.Load() != 3 {
		t.Fatalf("attached %d, released %d; want 3 and 3", h.attached.Load(), h.released.Load())
	}
}

// A peer that sends requests and reads no reply must not stall the ring
// thread (its other work goes on), and is dropped after ReplyTimeout.
func TestUringConnectionSlowReader(t *testing.T) {
	h := &uringEcho{}
	path := filepath.Join(t.TempDir(), "node.sock")
	srv, err := Listen(path, nil, h, &Options{Transport: TransportUnix, ReplyTimeout: 2 * time.Second, Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	deadline := time.Now().Add(5 * time.Second)
	for h.attached.Load() == 0 {
		if time.Now().After(deadline) {
			t.Fatal("the connection did not take the ring")
		}
		time.Sleep(time.Millisecond)
	}
	h.mu.Lock()
	d := h.drv
	h.mu.Unlock()
	d.busy.Store(true)
	go func() { // 64 MiB of echo requests; the replies fill the socket
		p := make([]byte, FrameHeaderSize+(1<<20))
		for i := range 64 {
			putHeader(p, &frameHeader{kind: kindRequest, code: 3, id: uint64(i), length: 1 << 20})
			if _, err := c.Write(p); err != nil {
				return
			}
		}
	}()
	time.Sleep(500 * time.Millisecond)
	p1 := d.polls.Load()
	time.Sleep(300 * time.Millisecond)
	if p2 := d.polls.Load(); p2 <= p1 {
		t.Fatalf("uring thread stuck behind a reply the peer does not read (%d loop turns in 300 ms)", p2-p1)
	}
	deadline = time.Now().Add(10 * time.Second)
	for h.released.Load() == 0 {
		if time.Now().After(deadline) {
			t.Fatal("a peer that reads nothing was not dropped after ReplyTimeout")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// FuzzUringFrames sends arbitrary bytes to a unix connection served on a
// uring thread (uringserve.go, the path of a node's own-host client). Once
// the input ends the server must close the connection (no hang), release
// the ring's driver, and have written only whole, well-formed response
// frames.
func FuzzUringFrames(f *testing.F) {
	frame := func(code uint8, id uint64, payload []byte) []byte {
		b := make([]byte, FrameHeaderSize, FrameHeaderSize+len(payload))
		putHeader(b, &frameHeader{kind: kindRequest, code: code, id: id, length: uint32(len(payload))})
		return append(b, payload...)
	}
	cat := func(parts ...[]byte) []byte { return bytes.Join(parts, nil) }
	f.Add(cat(frame(3, 1, []byte("hello")), frame(9, 2, nil), frame(3, 3, make([]byte, 5000))))
	f.Add(cat(frame(9, 1, []byte("later")), frame(9, 1, []byte("same id")), []byte{frameMagic, kindRequest}))
	f.Add(cat(frame(3, 1, nil), frame(3, 2, make([]byte, 17<<10))))
	f.Add(cat(frame(3, 1, nil), []byte("not a frame at all, and then some more bytes")))
	const maxPayload = 16 << 10
	h := &uringEcho{}
	path := filepath.Join(f.TempDir(), "node.sock")
	srv, err := Listen(path, nil, h, &Options{Transport: TransportUnix, Depth: 4, MaxPayload: maxPayload, Logger: quiet})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { srv.Close() })
	f.Fuzz(func(t *testing.T, data []byte) {
		before := h.attached.Load()
		c, err := net.Dial("unix", path)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		go func() {
			c.Write(data) // fails once the server closes; that is fine
			c.(*net.UnixConn).CloseWrite()
		}()
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		out, err := io.ReadAll(c)
		if err != nil {
			t.Fatalf("reading the responses: %v (the server did not close the connection after the input ended)", err)
		}
		deadline := time.Now().Add(10 * time.Second)
		for h.attached.Load() != h.released.Load() {
			if time.Now().After(deadline) {
				t.Fatalf("ring driver not released: attached %d, released %d", h.attached.Load(), h.released.Load())
			}
			time.Sleep(100 * time.Microsecond)
		}
		if n := h.attached.Load() - before; n != 1 {
			t.Fatalf("%d ring attachments for one connection, want 1 (not served on the ring)", n)
		}
		r := bytes.NewReader(out)
		hb := make([]byte, FrameHeaderSize)
		payload := make([]byte, maxPayload)
		for r.Len() > 0 {
			var fh frameHeader
			if err := readHeader(r, hb, kindResponse, maxPayload, &fh); err != nil {
				t.Fatalf("response stream at byte %d of %d: %v", len(out)-r.Len(), len(out), err)
			}
			if err := readPayload(r, payload[:fh.length]); err != nil {
				t.Fatalf("response stream: torn payload: %v", err)
			}
		}
	})
}
