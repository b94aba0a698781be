package nbd

import (
	"bytes"
	"context"
	"encoding/binary"
	"io"
	"net"
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/torus-storage/torus/internal/nbdtest"
)

// optBytes is one client option with its data.
func optBytes(opt uint32, data []byte) []byte { return nbdtest.AppendOption(nil, opt, data) }

// FuzzHandshake feeds arbitrary client bytes to a server connection over
// net.Pipe. The server must neither panic nor hang.
func FuzzHandshake(f *testing.F) {
	flags := binary.BigEndian.AppendUint32(nil, clientFlagFixedNewstyle|clientFlagNoZeroes)
	cat := func(parts ...[]byte) []byte { return bytes.Join(parts, nil) }
	read := nbdtest.AppendRequest(nil, cmdRead, 0, 1, 0, 4096)
	f.Add(cat(flags, optBytes(optGo, nbdtest.InfoData("", infoBlockSize, infoName)), read))
	f.Add(cat(flags, optBytes(optStructuredReply, nil), optBytes(optGo, nbdtest.InfoData("disk")), read))
	f.Add(cat(flags, optBytes(optList, nil), optBytes(optInfo, nbdtest.InfoData("x")), optBytes(optAbort, nil)))
	f.Add(cat(flags, optBytes(optExportName, []byte("disk")), read))
	f.Add(cat(binary.BigEndian.AppendUint32(nil, 1), optBytes(optExportName, nil)))
	f.Add(cat(flags, optBytes(optStartTLS, nil), optBytes(77, []byte("zz")), optBytes(optGo, []byte{0, 0})))
	f.Add(cat(flags, optBytes(optGo, nbdtest.InfoData("")), optBytes(optList, nil)))

	v := newMemVolume(1 << 20)
	srv, err := NewServer(oneExport(v), Options{MaxInFlight: 128, MaxPayload: 1 << 20})
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		cli, sc := net.Pipe()
		done := make(chan struct{})
		go func() {
			defer close(done)
			srv.serveConn(context.Background(), sc)
		}()
		cli.SetDeadline(time.Now().Add(2 * time.Second))
		drained := make(chan struct{})
		go func() {
			io.Copy(io.Discard, cli)
			close(drained)
		}()
		cli.Write(data)
		cli.Close()
		<-drained
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Fatal("server connection did not finish")
		}
	})
}

// seedReq is one request (cookie 1) and its payload, for fuzz seeds.
func seedReq(typ, flags uint16, off uint64, n uint32, payload []byte) []byte {
	return append(nbdtest.AppendRequest(nil, typ, flags, 1, off, n), payload...)
}

// seedCat joins seed parts.
func seedCat(parts ...[]byte) []byte { return bytes.Join(parts, nil) }

// FuzzRequest runs the transmission-phase parser and dispatcher over
// arbitrary bytes against an in-memory volume. The first byte selects
// structured replies and a read-only export.
func FuzzRequest(f *testing.F) {
	req, cat := seedReq, seedCat
	f.Add(cat([]byte{0}, req(cmdWrite, cmdFlagFUA, 4096, 4096, make([]byte, 4096)), req(cmdRead, 0, 4096, 4096, nil), req(cmdDisc, 0, 0, 0, nil)))
	f.Add(cat([]byte{1}, req(cmdFlush, 0, 0, 0, nil), req(cmdTrim, 0, 0, 8192, nil), req(cmdWriteZeroes, cmdFlagNoHole, 0, 4096, nil)))
	f.Add(cat([]byte{2}, req(cmdWrite, 0, 100, 10, make([]byte, 10)), req(cmdRead, 0, 1<<40, 4096, nil), req(9, 0, 0, 0, nil)))
	f.Add(cat([]byte{3}, req(cmdWrite, 0, 0, 4096, make([]byte, 100))))
	f.Add(cat([]byte{0}, req(cmdRead, 0, 0, 1<<20, nil), []byte("garbage")))
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) == 0 {
			return
		}
		v := newMemVolume(1 << 20)
		e := &Export{Name: "x", Volume: v, ReadOnly: data[0]&2 != 0}
		rw := struct {
			io.Reader
			io.Writer
		}{bytes.NewReader(data[1:]), io.Discard}
		c, err := newConn(rw, e, data[0]&1 != 0, Options{MaxInFlight: 4, MaxPayload: 1 << 20})
		if err != nil {
			t.Fatal(err)
		}
		defer c.close()
		c.serve()
		// serve returns only after taking every slot back from the writer.
		if len(c.free) != 0 || len(c.queue) != 0 {
			t.Fatalf("after serve: %d free slots, %d queued replies", len(c.free), len(c.queue))
		}
	})
}

// FuzzUringRequest runs the uring connection (uringconn.go, the path a local
// store's connections take) over arbitrary bytes on a real socket, io_uring
// and store. The first byte selects structured replies and a read-only
// export. The connection must finish once the input ends (no hang), give
// back every slot, and, with structured replies, send a stream that parses
// as whole replies (no desynchronised or torn reply).
func FuzzUringRequest(f *testing.F) {
	req, cat := seedReq, seedCat
	f.Add(cat([]byte{1}, req(cmdWrite, cmdFlagFUA, 4096, 4096, make([]byte, 4096)), req(cmdRead, 0, 4096, 4096, nil), req(cmdDisc, 0, 0, 0, nil)))
	f.Add(cat([]byte{1}, req(cmdFlush, 0, 0, 0, nil), req(cmdTrim, 0, 0, 8192, nil), req(cmdWriteZeroes, cmdFlagNoHole, 0, 4096, nil)))
	f.Add(cat([]byte{0}, req(cmdWrite, 0, 100, 10, make([]byte, 10)), req(cmdRead, 0, 1<<40, 4096, nil), req(9, 0, 0, 0, nil)))
	f.Add(cat([]byte{3}, req(cmdWrite, 0, 0, 4096, make([]byte, 100))))
	f.Add(cat([]byte{1}, req(cmdRead, 0, 0, 1<<20, nil), req(cmdWrite, 0, 0, 70<<10, make([]byte, 70<<10)), []byte("garbage")))
	v := openLocal(f, 2<<20, 1)
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) == 0 {
			return
		}
		structured := data[0]&1 != 0
		e := &Export{Name: "x", Volume: v, ReadOnly: data[0]&2 != 0}
		fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		const depth = 4
		peer := os.NewFile(uintptr(fds[1]), "peer")
		defer peer.Close()
		defer unix.Close(fds[0]) // after run has returned (or never ran)
		c, err := newUringConn(fds[0], e, v, []int{0}, structured, Options{MaxInFlight: depth, MaxPayload: 1 << 20})
		if err != nil {
			t.Fatal(err)
		}
		running := false // the uring thread may still use c's buffers
		defer func() {
			if !running {
				c.close()
			}
		}()
		setup, done := make(chan error, 1), make(chan error, 1)
		go func() { done <- c.run(setup) }()
		if err := <-setup; err != nil {
			<-done
			t.Fatal(err)
		}
		go func() {
			peer.Write(data[1:]) // fails once the server closes; that is fine
			unix.Shutdown(fds[1], unix.SHUT_WR)
		}()
		replies := make(chan []byte, 1)
		go func() {
			b, _ := io.ReadAll(peer)
			replies <- b
		}()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			c.shutdown()
			select {
			case <-done:
			case <-time.After(2 * drainTimeout):
				running = true // leak the buffers rather than unmap them under the thread
			}
			t.Fatal("uring connection did not finish after its input ended")
		}
		unix.Shutdown(fds[0], unix.SHUT_RDWR) // run has returned: ends the reader's stream
		out := <-replies
		if c.inflight != 0 || len(c.free) != depth {
			t.Fatalf("after run: %d requests in flight, %d of %d slots free", c.inflight, len(c.free), depth)
		}
		if structured {
			checkStructuredStream(t, out)
		}
	})
}

// checkStructuredStream fails t unless b is a sequence of whole replies of
// a connection with structured replies on: simple replies (no data: reads
// are answered with structured chunks) and structured chunks.
func checkStructuredStream(t *testing.T, b []byte) {
	t.Helper()
	for off := 0; off < len(b); {
		rest := b[off:]
		if len(rest) < 4 {
			t.Fatalf("reply stream: %d stray bytes at %d", len(rest), off)
		}
		switch binary.BigEndian.Uint32(rest) {
		case simpleMagic:
			off += 16
		case structuredMagic:
			if len(rest) < structuredHeaderSize {
				t.Fatalf("reply stream: torn chunk header at %d", off)
			}
			off += structuredHeaderSize + int(binary.BigEndian.Uint32(rest[16:]))
		default:
			t.Fatalf("reply stream: bad magic %#x at %d of %d", binary.BigEndian.Uint32(rest), off, len(b))
		}
		if off > len(b) {
			t.Fatalf("reply stream: torn reply, ends at %d past %d", off, len(b))
		}
	}
}
