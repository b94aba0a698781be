package nbd

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

// testClient is a minimal NBD client for the tests.
type testClient struct {
	t          testing.TB
	nc         net.Conn
	size       uint64
	flags      uint16
	structured bool

	mu      sync.Mutex
	readLen map[uint64]uint32 // cookie -> expected read length (simple replies)
}

// startServer serves exports on a unix socket until the test ends.
func startServer(t testing.TB, exports []Export, opt Options) string {
	t.Helper()
	srv, err := NewServer(exports, opt)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "nbd.sock")
	l, err := Listen("unix:" + path)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, l) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Serve: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Errorf("Serve did not return after cancel")
		}
	})
	return path
}

// dialRaw connects and performs the greeting with the given client flags.
func dialRaw(t testing.TB, path string, clientFlags uint32) *testClient {
	t.Helper()
	nc, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	nc.SetDeadline(time.Now().Add(20 * time.Second))
	t.Cleanup(func() { nc.Close() })
	c := &testClient{t: t, nc: nc, readLen: map[uint64]uint32{}}
	var hello [18]byte
	c.readFull(hello[:])
	if binary.BigEndian.Uint64(hello[:]) != nbdMagic || binary.BigEndian.Uint64(hello[8:]) != optMagic {
		t.Fatalf("bad greeting %x", hello)
	}
	if f := binary.BigEndian.Uint16(hello[16:]); f != flagFixedNewstyle|flagNoZeroes {
		t.Fatalf("handshake flags %#x", f)
	}
	c.write(binary.BigEndian.AppendUint32(nil, clientFlags))
	return c
}

func (c *testClient) readFull(b []byte) {
	c.t.Helper()
	if _, err := io.ReadFull(c.nc, b); err != nil {
		c.t.Fatalf("read: %v", err)
	}
}

func (c *testClient) write(b []byte) {
	c.t.Helper()
	if _, err := c.nc.Write(b); err != nil {
		c.t.Fatalf("write: %v", err)
	}
}

func (c *testClient) sendOpt(opt uint32, data []byte) {
	c.t.Helper()
	b := binary.BigEndian.AppendUint64(nil, optMagic)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	c.write(append(b, data...))
}

// readOptReply returns the option, reply type and data of one option reply.
func (c *testClient) readOptReply() (uint32, uint32, []byte) {
	c.t.Helper()
	var h [20]byte
	c.readFull(h[:])
	if m := binary.BigEndian.Uint64(h[:]); m != optReplyMagic {
		c.t.Fatalf("option reply magic %#x", m)
	}
	data := make([]byte, binary.BigEndian.Uint32(h[16:]))
	c.readFull(data)
	return binary.BigEndian.Uint32(h[8:]), binary.BigEndian.Uint32(h[12:]), data
}

func infoData(name string, infos ...uint16) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	b = append(b, name...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(infos)))
	for _, i := range infos {
		b = binary.BigEndian.AppendUint16(b, i)
	}
	return b
}

// info sends NBD_OPT_INFO or NBD_OPT_GO and collects NBD_REP_INFO payloads by
// type until ACK; a non-ACK final reply type is returned as rep.
func (c *testClient) info(opt uint32, name string, infos ...uint16) (got map[uint16][]byte, rep uint32) {
	c.t.Helper()
	c.sendOpt(opt, infoData(name, infos...))
	got = map[uint16][]byte{}
	for {
		o, typ, data := c.readOptReply()
		if o != opt {
			c.t.Fatalf("reply for option %d, want %d", o, opt)
		}
		if typ != repInfo {
			if typ == repAck {
				e := got[infoExport]
				if len(e) != 10 {
					c.t.Fatalf("NBD_INFO_EXPORT missing or %d bytes", len(e))
				}
				c.size = binary.BigEndian.Uint64(e)
				c.flags = binary.BigEndian.Uint16(e[8:])
			}
			return got, typ
		}
		if len(data) < 2 {
			c.t.Fatalf("short NBD_REP_INFO")
		}
		got[binary.BigEndian.Uint16(data)] = data[2:]
	}
}

// dial connects, optionally negotiates structured replies, and attaches to
// the default export with NBD_OPT_GO.
func dial(t testing.TB, path string, structured bool) *testClient {
	t.Helper()
	c := dialRaw(t, path, clientFlagFixedNewstyle|clientFlagNoZeroes)
	if structured {
		c.sendOpt(optStructuredReply, nil)
		if _, typ, _ := c.readOptReply(); typ != repAck {
			t.Fatalf("structured reply: %#x", typ)
		}
		c.structured = true
	}
	if _, rep := c.info(optGo, "", infoBlockSize); rep != repAck {
		t.Fatalf("NBD_OPT_GO: reply %#x", rep)
	}
	return c
}

func appendRequest(b []byte, typ, flags uint16, cookie, off uint64, length uint32) []byte {
	b = binary.BigEndian.AppendUint32(b, requestMagic)
	b = binary.BigEndian.AppendUint16(b, flags)
	b = binary.BigEndian.AppendUint16(b, typ)
	b = binary.BigEndian.AppendUint64(b, cookie)
	b = binary.BigEndian.AppendUint64(b, off)
	return binary.BigEndian.AppendUint32(b, length)
}

// send writes one request (with payload for writes). Safe for one sender
// goroutine concurrent with one receiver.
func (c *testClient) send(typ, flags uint16, cookie, off uint64, length uint32, payload []byte) {
	c.t.Helper()
	if typ == cmdRead {
		c.mu.Lock()
		c.readLen[cookie] = length
		c.mu.Unlock()
	}
	b := appendRequest(nil, typ, flags, cookie, off, length)
	if _, err := c.nc.Write(append(b, payload...)); err != nil {
		c.t.Errorf("send: %v", err)
	}
}

type reply struct {
	cookie uint64
	errno  uint32
	data   []byte
	offset uint64 // structured read chunks
	types  []uint16
}

// recv reads one complete reply (all chunks up to DONE for structured).
func (c *testClient) recv() reply {
	c.t.Helper()
	if !c.structured {
		var h [16]byte
		c.readFull(h[:])
		if m := binary.BigEndian.Uint32(h[:]); m != simpleMagic {
			c.t.Fatalf("simple reply magic %#x", m)
		}
		r := reply{errno: binary.BigEndian.Uint32(h[4:]), cookie: binary.BigEndian.Uint64(h[8:])}
		c.mu.Lock()
		n, isRead := c.readLen[r.cookie]
		delete(c.readLen, r.cookie)
		c.mu.Unlock()
		if isRead && r.errno == 0 {
			r.data = make([]byte, n)
			c.readFull(r.data)
		}
		return r
	}
	var r reply
	for {
		var h [20]byte
		c.readFull(h[:])
		if m := binary.BigEndian.Uint32(h[:]); m != structuredMagic {
			c.t.Fatalf("structured reply magic %#x", m)
		}
		flags, typ := binary.BigEndian.Uint16(h[4:]), binary.BigEndian.Uint16(h[6:])
		r.cookie = binary.BigEndian.Uint64(h[8:])
		payload := make([]byte, binary.BigEndian.Uint32(h[16:]))
		c.readFull(payload)
		r.types = append(r.types, typ)
		switch typ {
		case replyTypeOffsetData:
			r.offset = binary.BigEndian.Uint64(payload)
			r.data = payload[8:]
		case replyTypeError:
			r.errno = binary.BigEndian.Uint32(payload)
			if ml := binary.BigEndian.Uint16(payload[4:]); int(ml) != len(payload)-6 {
				c.t.Fatalf("error chunk message length %d in %d bytes", ml, len(payload))
			}
		case replyTypeNone:
		default:
			c.t.Fatalf("unexpected chunk type %d", typ)
		}
		if flags&replyFlagDone != 0 {
			return r
		}
	}
}

// do sends one request and waits for its reply.
func (c *testClient) do(typ, flags uint16, off uint64, length uint32, payload []byte) reply {
	c.t.Helper()
	c.send(typ, flags, 7, off, length, payload)
	r := c.recv()
	if r.cookie != 7 {
		c.t.Fatalf("cookie %d, want 7", r.cookie)
	}
	return r
}

// expectEOF checks that the server closed the connection.
func (c *testClient) expectEOF() {
	c.t.Helper()
	var b [1]byte
	_, err := c.nc.Read(b[:])
	if !errors.Is(err, io.EOF) {
		c.t.Fatalf("expected EOF, got %v", err)
	}
}

func (r reply) String() string {
	return fmt.Sprintf("cookie=%d errno=%d len=%d", r.cookie, r.errno, len(r.data))
}
