package node

import (
	"bytes"
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/torus-storage/torus/engine"
	"github.com/torus-storage/torus/internal/wire"
	"github.com/torus-storage/torus/netquic"
	"github.com/torus-storage/torus/store"
)

// FuzzNodeServer sends arbitrary chunk-protocol requests (op, the 48-byte
// header, a payload) to a Server with a real store over the node's unix
// socket, where the connection is served on the store's uring thread as a
// node's own-host client is. The framing is the client's (FuzzUringFrames
// covers bytes off the wire); what a peer controls here is every field. Each
// request must be answered with a known status, a reply to anything but a
// well-formed request must not be OK, and the node must keep serving: after
// each input a probe writes a block and reads it back.
func FuzzNodeServer(f *testing.F) {
	dir := f.TempDir()
	st, err := store.CreateStore(filepath.Join(dir, "s"), store.StoreOptions{ChunkSize: testChunk, Slots: 16, Shards: 1, Logger: quietLog})
	if err != nil {
		f.Fatal(err)
	}
	ns := NewServer(st, ServerOptions{NodeID: "fuzz", Logger: quietLog})
	sock := filepath.Join(dir, "node.sock")
	srv, err := netquic.Listen(sock, nil, ns, &netquic.Options{Transport: netquic.TransportUnix, Logger: quietLog})
	if err != nil {
		f.Fatal(err)
	}
	cli, err := netquic.NewClient(sock, nil, &netquic.Options{Transport: netquic.TransportUnix, Streams: 1, Logger: quietLog})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() {
		cli.Close()
		srv.Close()
		st.Close()
	})

	hdr := func(h wire.Header) []byte {
		var b [wire.HeaderSize]byte
		h.Encode(&b)
		return b[:]
	}
	block := bytes.Repeat([]byte{0x5a}, engine.BlockSize)
	f.Add(uint8(wire.OpWrite), hdr(wire.Header{Volume: 1, Epoch: 1, Len: engine.BlockSize}), block)
	f.Add(uint8(wire.OpWrite), hdr(wire.Header{Volume: 1, Index: 3, Epoch: 1, Off: testChunk - engine.BlockSize, Len: engine.BlockSize, Flags: wire.FlagFUA}), block)
	f.Add(uint8(wire.OpRead), hdr(wire.Header{Volume: 1, Len: 2 * engine.BlockSize}), []byte(nil))
	f.Add(uint8(wire.OpRead), hdr(wire.Header{Volume: 1, Off: 100, Len: engine.BlockSize}), []byte(nil))
	f.Add(uint8(wire.OpDiscard), hdr(wire.Header{Volume: 1, Epoch: 1, Len: testChunk}), []byte(nil))
	f.Add(uint8(wire.OpWriteZeroes), hdr(wire.Header{Volume: 1, Index: 9, Epoch: 1, Off: engine.BlockSize, Len: engine.BlockSize}), []byte(nil))
	f.Add(uint8(wire.OpFlush), hdr(wire.Header{}), []byte(nil))
	f.Add(uint8(wire.OpFence), hdr(wire.Header{Volume: 1, Epoch: 7}), []byte(nil))
	f.Add(uint8(wire.OpHello), hdr(wire.Header{}), []byte("x"))
	f.Add(uint8(0xee), []byte{1, 2, 3}, block[:17])

	const probeVolume = 0x7d3a91c5e2b46f18 // not a value mutators try (0, 1, powers of two)
	probe := bytes.Repeat([]byte{0xc3}, engine.BlockSize)
	resp := netquic.Message{Payload: make([]byte, testChunk+engine.BlockSize)}
	call := func(t *testing.T, op wire.Op, h []byte, payload []byte) wire.Status {
		t.Helper()
		req := netquic.Message{Code: uint8(op), Payload: payload}
		copy(req.Header[:], h)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		resp.Payload = resp.Payload[:cap(resp.Payload)]
		if err := cli.Call(ctx, &req, &resp); err != nil {
			t.Fatalf("%v request not answered: %v", op, err)
		}
		s := wire.Status(resp.Code)
		if s > wire.StatusBadRequest {
			t.Fatalf("%v: unknown status %d", op, s)
		}
		return s
	}
	// The probe's chunk takes its slot now, so the fuzzer's writes filling
	// the store cannot turn the probe into a no-space answer.
	probeHdr := wire.Header{Volume: probeVolume, Index: 1, Epoch: ^uint64(0), Off: engine.BlockSize, Len: engine.BlockSize}
	var pb [wire.HeaderSize]byte
	probeHdr.Encode(&pb)
	if err := cli.Call(context.Background(), &netquic.Message{Code: uint8(wire.OpWrite), Header: pb, Payload: probe}, &resp); err != nil || resp.Code != uint8(wire.StatusOK) {
		f.Fatalf("probe chunk: %v, status %d", err, resp.Code)
	}
	f.Fuzz(func(t *testing.T, op uint8, h []byte, payload []byte) {
		if len(payload) > testChunk+engine.BlockSize {
			payload = payload[:testChunk+engine.BlockSize]
		}
		var hb [wire.HeaderSize]byte
		copy(hb[:], h)
		var dh wire.Header
		valid := wire.Decode(wire.Op(op), &hb, &dh) == nil
		if s := call(t, wire.Op(op), hb[:], payload); s == wire.StatusOK && !valid {
			t.Fatalf("%v with a header Decode refuses was answered OK", wire.Op(op))
		}

		// The node still serves: write a block and read it back (the
		// highest epoch is never stale).
		ph := probeHdr
		if s := call(t, wire.OpWrite, hdr(ph), probe); s != wire.StatusOK {
			t.Fatalf("probe write: status %d", s)
		}
		if s := call(t, wire.OpRead, hdr(ph), nil); s != wire.StatusOK || !bytes.Equal(resp.Payload, probe) {
			t.Fatalf("probe read back: status %d, %d bytes, equal %v", s, len(resp.Payload), bytes.Equal(resp.Payload, probe))
		}
	})
}
