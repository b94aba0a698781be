package main

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
)

// testClient is a small pipelined NBD client (fixed newstyle, OPT_GO, simple
// replies) for tests that need exact knowledge of which writes were
// acknowledged and flushed, which fio does not expose.
type testClient struct {
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

const (
	nbdReqMagic   = 0x25609513
	nbdReplyMagic = 0x67446698
	cmdRead       = 0
	cmdWrite      = 1
	cmdDisc       = 2
	cmdFlush      = 3
)

func dialNBD(sock, export string) (*testClient, error) {
	c, err := net.Dial("unix", sock)
	if err != nil {
		return nil, err
	}
	fail := func(err error) (*testClient, error) { c.Close(); return nil, err }
	var hs [18]byte
	if _, err := io.ReadFull(c, hs[:]); err != nil {
		return fail(fmt.Errorf("handshake: %w", err))
	}
	if string(hs[:8]) != "NBDMAGIC" || binary.BigEndian.Uint64(hs[8:16]) != 0x49484156454F5054 {
		return fail(errors.New("handshake: bad magic"))
	}
	// Client flags: FIXED_NEWSTYLE | NO_ZEROES.
	opt := binary.BigEndian.AppendUint32(nil, 3)
	// NBD_OPT_GO with the export name and no info requests.
	opt = binary.BigEndian.AppendUint64(opt, 0x49484156454F5054)
	opt = binary.BigEndian.AppendUint32(opt, 7)
	opt = binary.BigEndian.AppendUint32(opt, uint32(4+len(export)+2))
	opt = binary.BigEndian.AppendUint32(opt, uint32(len(export)))
	opt = append(opt, export...)
	opt = binary.BigEndian.AppendUint16(opt, 0)
	if _, err := c.Write(opt); err != nil {
		return fail(err)
	}
	var size uint64
	for {
		var rh [20]byte
		if _, err := io.ReadFull(c, rh[:]); err != nil {
			return fail(fmt.Errorf("option reply: %w", err))
		}
		typ := binary.BigEndian.Uint32(rh[12:16])
		data := make([]byte, binary.BigEndian.Uint32(rh[16:20]))
		if _, err := io.ReadFull(c, data); err != nil {
			return fail(err)
		}
		switch {
		case typ == 1: // NBD_REP_ACK
			cl := &testClient{conn: c, size: size, bw: bufio.NewWriterSize(c, 1<<20), pending: map[uint64]*call{}}
			go cl.readLoop()
			return cl, nil
		case typ == 3 && len(data) >= 12 && binary.BigEndian.Uint16(data) == 0: // NBD_REP_INFO, NBD_INFO_EXPORT
			size = binary.BigEndian.Uint64(data[2:10])
		case typ&(1<<31) != 0:
			return fail(fmt.Errorf("OPT_GO refused: reply type %#x %q", typ, data))
		}
	}
}

func (cl *testClient) readLoop() {
	var rh [16]byte
	for {
		if _, err := io.ReadFull(cl.conn, rh[:]); err != nil {
			cl.failAll(err)
			return
		}
		if binary.BigEndian.Uint32(rh[:4]) != nbdReplyMagic {
			cl.failAll(errors.New("bad reply magic"))
			return
		}
		h := binary.BigEndian.Uint64(rh[8:16])
		cl.mu.Lock()
		c := cl.pending[h]
		delete(cl.pending, h)
		cl.mu.Unlock()
		if c == nil {
			cl.failAll(fmt.Errorf("reply for unknown handle %d", h))
			return
		}
		var err error
		if e := binary.BigEndian.Uint32(rh[4:8]); e != 0 {
			err = fmt.Errorf("nbd error %d", e)
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

func (cl *testClient) failAll(err error) {
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

// start sends one request; the returned channel gets its result.
func (cl *testClient) start(cmd uint16, off uint64, data []byte, length uint32, readInto []byte) <-chan error {
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

	var req [28]byte
	binary.BigEndian.PutUint32(req[0:], nbdReqMagic)
	binary.BigEndian.PutUint16(req[6:], cmd)
	binary.BigEndian.PutUint64(req[8:], h)
	binary.BigEndian.PutUint64(req[16:], off)
	binary.BigEndian.PutUint32(req[24:], length)
	cl.wmu.Lock()
	cl.bw.Write(req[:])
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

func (cl *testClient) Write(off uint64, data []byte) <-chan error {
	return cl.start(cmdWrite, off, data, uint32(len(data)), nil)
}

func (cl *testClient) Read(off uint64, buf []byte) <-chan error {
	return cl.start(cmdRead, off, nil, uint32(len(buf)), buf)
}

func (cl *testClient) Flush() <-chan error { return cl.start(cmdFlush, 0, nil, 0, nil) }

func (cl *testClient) Close() error {
	cl.start(cmdDisc, 0, nil, 0, nil)
	return cl.conn.Close()
}
