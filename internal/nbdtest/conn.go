package nbdtest

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"testing"
	"time"
)

// Conn is one client connection driven step by step, for protocol tests:
// every step that meets a protocol violation or an I/O error fails the test
// (Fatal from the test goroutine; Send, which may run in another goroutine,
// uses Error).
type Conn struct {
	// NC is the connection, for tests that write or read raw bytes.
	NC net.Conn
	// Size and Flags are the export's size and transmission flags from the
	// last acknowledged NBD_OPT_INFO or NBD_OPT_GO.
	Size  uint64
	Flags uint16
	// Structured says that structured replies were negotiated.
	Structured bool

	t       testing.TB
	mu      sync.Mutex
	readLen map[uint64]uint32 // cookie -> expected read length (simple replies)
}

// NewConn wraps nc, a connection already in the transmission phase with
// simple replies (the kernel's end, say), for the request steps.
func NewConn(t testing.TB, nc net.Conn) *Conn {
	return &Conn{t: t, NC: nc, readLen: map[uint64]uint32{}}
}

// DialRaw connects to the unix socket at path, checks the greeting (fixed
// newstyle, no zeroes) and sends clientFlags. The connection has a 20 s
// deadline and is closed when the test ends.
func DialRaw(t testing.TB, path string, clientFlags uint32) *Conn {
	t.Helper()
	nc, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	nc.SetDeadline(time.Now().Add(20 * time.Second))
	t.Cleanup(func() { nc.Close() })
	c := NewConn(t, nc)
	f, err := ReadGreeting(nc)
	if err != nil {
		t.Fatal(err)
	}
	if f != FlagFixedNewstyle|FlagNoZeroes {
		t.Fatalf("handshake flags %#x", f)
	}
	c.Write(AppendClientFlags(nil, clientFlags))
	return c
}

// Dial connects, optionally negotiates structured replies, and attaches to
// the default export with NBD_OPT_GO (asking for NBD_INFO_BLOCK_SIZE).
func Dial(t testing.TB, path string, structured bool) *Conn {
	t.Helper()
	c := DialRaw(t, path, ClientFlagFixedNewstyle|ClientFlagNoZeroes)
	if structured {
		c.SendOpt(OptStructuredReply, nil)
		if _, typ, _ := c.ReadOptReply(); typ != RepAck {
			t.Fatalf("structured reply: %#x", typ)
		}
		c.Structured = true
	}
	if _, rep := c.Info(OptGo, "", InfoBlockSize); rep != RepAck {
		t.Fatalf("NBD_OPT_GO: reply %#x", rep)
	}
	return c
}

// ReadFull reads exactly len(b) bytes.
func (c *Conn) ReadFull(b []byte) {
	c.t.Helper()
	if _, err := io.ReadFull(c.NC, b); err != nil {
		c.t.Fatalf("read: %v", err)
	}
}

// Write writes b.
func (c *Conn) Write(b []byte) {
	c.t.Helper()
	if _, err := c.NC.Write(b); err != nil {
		c.t.Fatalf("write: %v", err)
	}
}

// SendOpt sends one option with its data.
func (c *Conn) SendOpt(opt uint32, data []byte) {
	c.t.Helper()
	c.Write(AppendOption(nil, opt, data))
}

// ReadOptReply returns the option, reply type and data of one option reply.
func (c *Conn) ReadOptReply() (uint32, uint32, []byte) {
	c.t.Helper()
	rep, err := ReadOptReply(c.NC)
	if err != nil {
		c.t.Fatal(err)
	}
	return rep.Opt, rep.Type, rep.Data
}

// Info sends NBD_OPT_INFO or NBD_OPT_GO (opt) and collects the NBD_REP_INFO
// payloads by type until the final reply, whose type it returns as rep. An
// ACK sets Size and Flags.
func (c *Conn) Info(opt uint32, name string, infos ...uint16) (got map[uint16][]byte, rep uint32) {
	c.t.Helper()
	c.SendOpt(opt, InfoData(name, infos...))
	exp, final, err := ReadInfoReplies(c.NC, opt)
	if err != nil {
		c.t.Fatal(err)
	}
	if final.Type == RepAck {
		c.Size, c.Flags = exp.Size, exp.Flags
	}
	return exp.Infos, final.Type
}

// Send writes one request (with payload for writes). Safe for one sender
// goroutine concurrent with one receiver.
func (c *Conn) Send(typ, flags uint16, cookie, off uint64, length uint32, payload []byte) {
	c.t.Helper()
	if typ == CmdRead {
		c.mu.Lock()
		c.readLen[cookie] = length
		c.mu.Unlock()
	}
	b := AppendRequest(nil, typ, flags, cookie, off, length)
	if _, err := c.NC.Write(append(b, payload...)); err != nil {
		c.t.Errorf("send: %v", err)
	}
}

// Reply is one complete reply.
type Reply struct {
	Cookie uint64
	Errno  uint32   // 0: success
	Data   []byte   // of a read
	Offset uint64   // of the data, in structured read chunks
	Types  []uint16 // the chunk types of a structured reply, in order
}

// String sums the reply up for failure messages.
func (r Reply) String() string {
	return fmt.Sprintf("cookie=%d errno=%d len=%d", r.Cookie, r.Errno, len(r.Data))
}

// Recv reads one complete reply (all chunks up to DONE for structured).
func (c *Conn) Recv() Reply {
	c.t.Helper()
	if !c.Structured {
		cookie, errno, err := ReadSimpleReply(c.NC)
		if err != nil {
			c.t.Fatal(err)
		}
		r := Reply{Cookie: cookie, Errno: errno}
		c.mu.Lock()
		n, isRead := c.readLen[r.Cookie]
		delete(c.readLen, r.Cookie)
		c.mu.Unlock()
		if isRead && r.Errno == 0 {
			r.Data = make([]byte, n)
			c.ReadFull(r.Data)
		}
		return r
	}
	var r Reply
	for {
		ch, err := ReadChunk(c.NC)
		if err != nil {
			c.t.Fatal(err)
		}
		r.Cookie = ch.Cookie
		r.Types = append(r.Types, ch.Type)
		switch ch.Type {
		case ReplyTypeOffsetData:
			if len(ch.Payload) < 8 {
				c.t.Fatalf("offset-data chunk of %d bytes", len(ch.Payload))
			}
			r.Offset = binary.BigEndian.Uint64(ch.Payload)
			r.Data = ch.Payload[8:]
		case ReplyTypeError:
			if len(ch.Payload) < 6 {
				c.t.Fatalf("error chunk of %d bytes", len(ch.Payload))
			}
			r.Errno = binary.BigEndian.Uint32(ch.Payload)
			if ml := binary.BigEndian.Uint16(ch.Payload[4:]); int(ml) != len(ch.Payload)-6 {
				c.t.Fatalf("error chunk message length %d in %d bytes", ml, len(ch.Payload))
			}
		case ReplyTypeNone:
		default:
			c.t.Fatalf("unexpected chunk type %d", ch.Type)
		}
		if ch.Flags&ReplyFlagDone != 0 {
			return r
		}
	}
}

// Do sends one request (cookie 7) and waits for its reply.
func (c *Conn) Do(typ, flags uint16, off uint64, length uint32, payload []byte) Reply {
	c.t.Helper()
	c.Send(typ, flags, 7, off, length, payload)
	r := c.Recv()
	if r.Cookie != 7 {
		c.t.Fatalf("cookie %d, want 7", r.Cookie)
	}
	return r
}

// ExpectEOF checks that the server closed the connection.
func (c *Conn) ExpectEOF() {
	c.t.Helper()
	var b [1]byte
	_, err := c.NC.Read(b[:])
	if !errors.Is(err, io.EOF) {
		c.t.Fatalf("expected EOF, got %v", err)
	}
}
