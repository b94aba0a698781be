package nbdtest

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"sync"
)

// Client is a small pipelined NBD client (fixed newstyle, NBD_OPT_GO,
// simple replies) for tests that need exact knowledge of which writes were
// acknowledged and flushed. Requests may be started from any goroutine;
// each completes on its own channel, with nil, an Errno the server
// answered, or the error that broke the connection.
type Client struct {
	conn net.Conn
	size uint64

	wmu sync.Mutex
	bw  *bufio.Writer

	mu      sync.Mutex
	next    uint64
	pending map[uint64]*call
	err     error
}

type call struct {
	buf  []byte // read destination
	done chan error
}

// DialClient connects to the unix socket sock and attaches to export.
func DialClient(sock, export string) (*Client, error) {
	c, err := net.Dial("unix", sock)
	if err != nil {
		return nil, fmt.Errorf("nbd dial %s: %w", sock, err)
	}
	fail := func(err error) (*Client, error) {
		c.Close()
		return nil, fmt.Errorf("nbd handshake with %s: %w", sock, err)
	}
	if _, err := ReadGreeting(c); err != nil {
		return fail(err)
	}
	if _, err := c.Write(AppendClientFlags(nil, ClientFlagFixedNewstyle|ClientFlagNoZeroes)); err != nil {
		return fail(err)
	}
	exp, err := Go(c, export)
	if err != nil {
		return fail(err)
	}
	cl := &Client{conn: c, size: exp.Size, bw: bufio.NewWriterSize(c, 1<<20), pending: map[uint64]*call{}}
	go cl.readLoop()
	return cl, nil
}

// Size returns the export's size.
func (cl *Client) Size() uint64 { return cl.size }

func (cl *Client) readLoop() {
	for {
		h, errno, err := ReadSimpleReply(cl.conn)
		if err != nil {
			cl.failAll(err)
			return
		}
		cl.mu.Lock()
		c := cl.pending[h]
		delete(cl.pending, h)
		cl.mu.Unlock()
		if c == nil {
			cl.failAll(fmt.Errorf("nbd: reply for unknown handle %d", h))
			return
		}
		if errno != 0 {
			err = Errno(errno)
		} else if c.buf != nil {
			if _, rerr := io.ReadFull(cl.conn, c.buf); rerr != nil {
				c.done <- rerr
				cl.failAll(rerr)
				return
			}
		}
		c.done <- err
	}
}

func (cl *Client) failAll(err error) {
	cl.mu.Lock()
	if cl.err == nil {
		cl.err = err
	}
	for h, c := range cl.pending {
		c.done <- err
		delete(cl.pending, h)
	}
	cl.mu.Unlock()
}

// Err returns the error that broke the connection, or nil while it works.
func (cl *Client) Err() error {
	cl.mu.Lock()
	defer cl.mu.Unlock()
	return cl.err
}

// start sends one request; the returned channel gets its result.
func (cl *Client) start(cmd uint16, off uint64, data []byte, length uint32, readInto []byte) <-chan error {
	c := &call{buf: readInto, done: make(chan error, 1)}
	cl.mu.Lock()
	if cl.err != nil {
		cl.mu.Unlock()
		c.done <- cl.err
		return c.done
	}
	h := cl.next
	cl.next++
	cl.pending[h] = c
	cl.mu.Unlock()

	req := AppendRequest(make([]byte, 0, RequestSize), cmd, 0, h, off, length)
	cl.wmu.Lock()
	cl.bw.Write(req)
	if data != nil {
		cl.bw.Write(data)
	}
	err := cl.bw.Flush()
	cl.wmu.Unlock()
	if err != nil {
		cl.failAll(err)
	}
	return c.done
}

// Write writes data at off.
func (cl *Client) Write(off uint64, data []byte) <-chan error {
	return cl.start(CmdWrite, off, data, uint32(len(data)), nil)
}

// Read reads len(buf) bytes at off into buf.
func (cl *Client) Read(off uint64, buf []byte) <-chan error {
	return cl.start(CmdRead, off, nil, uint32(len(buf)), buf)
}

// Flush asks for everything acknowledged so far to be made durable.
func (cl *Client) Flush() <-chan error { return cl.start(CmdFlush, 0, nil, 0, nil) }

// Close sends NBD_CMD_DISC and closes the connection.
func (cl *Client) Close() error {
	cl.start(CmdDisc, 0, nil, 0, nil)
	return cl.conn.Close()
}
