package netquic

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"
)

// FuzzClientResponses has a fake node answer a Client's call with arbitrary
// bytes and then close the connection: what a broken or hostile node can
// send. With the first byte's low bit set, the id of the first response
// frame is replaced by the request's, so the fuzzer reaches past the id
// check (payload lengths, oversized responses, duplicate answers). The
// call must end on its own once the connection is gone (no hang, no panic),
// a successful one must have a payload within the buffer's capacity, and
// Close must return.
func FuzzClientResponses(f *testing.F) {
	resp := func(code uint8, id uint64, payload []byte) []byte {
		b := make([]byte, FrameHeaderSize, FrameHeaderSize+len(payload))
		putHeader(b, &frameHeader{kind: kindResponse, code: code, id: id, length: uint32(len(payload))})
		return append(b, payload...)
	}
	cat := func(parts ...[]byte) []byte { return bytes.Join(parts, nil) }
	f.Add(cat([]byte{1}, resp(0, 0, []byte("pong"))))
	f.Add(cat([]byte{1}, resp(0, 0, make([]byte, 100))))                    // larger than the buffer
	f.Add(cat([]byte{1}, resp(0, 0, []byte("a")), resp(0, 0, []byte("b")))) // answered twice
	f.Add(cat([]byte{0}, resp(0, 7, nil)))                                  // unknown id
	f.Add(cat([]byte{1}, resp(0, 0, []byte("torn"))[:FrameHeaderSize+2]))
	f.Add([]byte{1, frameMagic, kindRequest, 0, 0})

	dir := f.TempDir()
	var n atomic.Int64
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) == 0 {
			return
		}
		path := filepath.Join(dir, fmt.Sprintf("%d.sock", n.Add(1)))
		l, err := net.Listen("unix", path)
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		served := make(chan error, 1)
		go func() {
			c, err := l.Accept()
			if err != nil {
				served <- err
				return
			}
			defer c.Close()
			var h frameHeader
			hb := make([]byte, FrameHeaderSize)
			if err := readHeader(c, hb, kindRequest, DefaultMaxPayload, &h); err != nil {
				served <- err
				return
			}
			if _, err := io.CopyN(io.Discard, c, int64(h.length)); err != nil {
				served <- err
				return
			}
			out := append([]byte(nil), data[1:]...)
			if data[0]&1 != 0 && len(out) >= 12 {
				binary.LittleEndian.PutUint64(out[4:12], h.id)
			}
			c.Write(out) // the client may have hung up already
			served <- nil
		}()

		cli, err := NewClient(path, nil, &Options{Transport: TransportUnix, Streams: 1, Logger: quiet})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		r := Message{Payload: make([]byte, 0, 64)}
		err = cli.Call(ctx, &Message{Code: 3, Payload: []byte("ping")}, &r)
		if errors.Is(err, context.DeadlineExceeded) {
			t.Fatal("call still waiting 10 s after the node closed the connection")
		}
		if err == nil && len(r.Payload) > 64 {
			t.Fatalf("response of %d bytes in a buffer of 64", len(r.Payload))
		}
		if err := <-served; err != nil {
			t.Fatalf("fake node: %v", err)
		}
		closed := make(chan struct{})
		go func() { cli.Close(); close(closed) }()
		select {
		case <-closed:
		case <-time.After(10 * time.Second):
			t.Fatal("Client.Close did not return")
		}
	})
}
