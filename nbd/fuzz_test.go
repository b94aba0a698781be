package nbd

import (
	"bytes"
	"context"
	"encoding/binary"
	"io"
	"net"
	"testing"
	"time"
)

func optBytes(opt uint32, data []byte) []byte {
	b := binary.BigEndian.AppendUint64(nil, optMagic)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	return append(b, data...)
}

// FuzzHandshake feeds arbitrary client bytes to a server connection over
// net.Pipe. The server must neither panic nor hang.
func FuzzHandshake(f *testing.F) {
	flags := binary.BigEndian.AppendUint32(nil, clientFlagFixedNewstyle|clientFlagNoZeroes)
	cat := func(parts ...[]byte) []byte { return bytes.Join(parts, nil) }
	read := appendRequest(nil, cmdRead, 0, 1, 0, 4096)
	f.Add(cat(flags, optBytes(optGo, infoData("", infoBlockSize, infoName)), read))
	f.Add(cat(flags, optBytes(optStructuredReply, nil), optBytes(optGo, infoData("disk")), read))
	f.Add(cat(flags, optBytes(optList, nil), optBytes(optInfo, infoData("x")), optBytes(optAbort, nil)))
	f.Add(cat(flags, optBytes(optExportName, []byte("disk")), read))
	f.Add(cat(binary.BigEndian.AppendUint32(nil, 1), optBytes(optExportName, nil)))
	f.Add(cat(flags, optBytes(optStartTLS, nil), optBytes(77, []byte("zz")), optBytes(optGo, []byte{0, 0})))
	f.Add(cat(flags, optBytes(optGo, infoData("")), optBytes(optList, nil)))

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

// FuzzRequest runs the transmission-phase parser and dispatcher over
// arbitrary bytes against an in-memory volume. The first byte selects
// structured replies and a read-only export.
func FuzzRequest(f *testing.F) {
	req := func(typ, flags uint16, off uint64, n uint32, payload []byte) []byte {
		return append(appendRequest(nil, typ, flags, 1, off, n), payload...)
	}
	cat := func(parts ...[]byte) []byte { return bytes.Join(parts, nil) }
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
