package node

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/torus-storage/torus/engine"
	"github.com/torus-storage/torus/internal/voltest"
	"github.com/torus-storage/torus/internal/wire"
	"github.com/torus-storage/torus/netquic"
	"github.com/torus-storage/torus/store"
)

// nodeClient is a raw protocol client of one Server.
type nodeClient struct {
	t   *testing.T
	cli *netquic.Client
}

func (nc *nodeClient) call(op wire.Op, h wire.Header, payload []byte, resp []byte) (wire.Status, wire.Header) {
	nc.t.Helper()
	req := netquic.Message{Code: uint8(op), Payload: payload}
	h.Encode(&req.Header)
	r := netquic.Message{Payload: resp}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := nc.cli.Call(ctx, &req, &r); err != nil {
		nc.t.Fatalf("%v: %v", op, err)
	}
	var rh wire.Header
	_ = wire.Decode(wire.OpFence, &r.Header, &rh)
	return wire.Status(r.Code), rh
}

// testChunk is the chunk size of the tests' stores.
const testChunk = 64 << 10

// quietLog logs warnings and errors only.
var quietLog = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))

// startNode serves a store of slots chunks with a Server over QUIC.
func startNode(t *testing.T, slots int64) (*Server, *nodeClient) {
	t.Helper()
	dir := t.TempDir()
	ca := filepath.Join(dir, "ca")
	if err := netquic.NewCA(ca); err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{"node", "client"} {
		if err := netquic.IssueCert(ca, n, []string{"127.0.0.1"}, filepath.Join(dir, n)); err != nil {
			t.Fatal(err)
		}
	}
	ntls, err := netquic.LoadTLS(filepath.Join(dir, "node"))
	if err != nil {
		t.Fatal(err)
	}
	st, err := store.CreateStore(filepath.Join(dir, "s"), store.StoreOptions{ChunkSize: testChunk, Slots: slots, Shards: 1, Logger: quietLog})
	if err != nil {
		t.Fatal(err)
	}
	ns := NewServer(st, ServerOptions{NodeID: "node", Logger: quietLog})
	srv, err := netquic.Listen("127.0.0.1:0", ntls.Server, ns, &netquic.Options{Logger: quietLog})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		srv.Close()
		st.Close()
	})
	ctls, err := netquic.LoadTLS(filepath.Join(dir, "client"))
	if err != nil {
		t.Fatal(err)
	}
	cli, err := netquic.NewClient(srv.Addr().String(), ctls.Client, &netquic.Options{Logger: quietLog})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	return ns, &nodeClient{t: t, cli: cli}
}

// TestNodeServer drives a Server with raw protocol messages: data round
// trip, every validation, epoch fencing and out of space.
func TestNodeServer(t *testing.T) {
	ns, nc := startNode(t, 2)
	data := voltest.Buf(t, 2*engine.BlockSize)
	voltest.Fill(data, 3)
	resp := voltest.Buf(t, testChunk)
	wr := wire.Header{Volume: 7, Index: 0, Epoch: 3, Off: engine.BlockSize, Len: 2 * engine.BlockSize}
	if s, _ := nc.call(wire.OpWrite, wr, data, nil); s != wire.StatusOK {
		t.Fatalf("write: %v", s)
	}
	rd := wr
	if s, _ := nc.call(wire.OpRead, rd, nil, resp[:2*engine.BlockSize]); s != wire.StatusOK || !bytes.Equal(resp[:2*engine.BlockSize], data) {
		t.Fatalf("read back: %v", s)
	}
	// Reads of a superseded holder are refused too.
	rd.Epoch = 2
	if s, h := nc.call(wire.OpRead, rd, nil, resp[:2*engine.BlockSize]); s != wire.StatusStaleEpoch || h.Epoch != 3 {
		t.Fatalf("read with epoch 2 after 3: %v (node epoch %d)", s, h.Epoch)
	}

	// Validation: nothing reaches the store.
	for _, tc := range []struct {
		name    string
		op      wire.Op
		h       wire.Header
		payload []byte
		want    wire.Status
	}{
		{"unknown op", 99, wire.Header{Volume: 7, Len: engine.BlockSize}, nil, wire.StatusBadRequest},
		{"zero-length read", wire.OpRead, wire.Header{Volume: 7}, nil, wire.StatusBadRequest},
		{"unknown flag", wire.OpRead, wire.Header{Volume: 7, Len: engine.BlockSize, Flags: 0x80}, nil, wire.StatusBadRequest},
		{"write to a snapshot copy", wire.OpWrite, wire.Header{Volume: 7, Epoch: 3, Len: engine.BlockSize, Snap: 1}, data[:engine.BlockSize], wire.StatusBadRequest},
		{"as-of write", wire.OpWrite, wire.Header{Volume: 7, Epoch: 3, Len: engine.BlockSize, Snap: 1, Flags: wire.FlagAsOf}, data[:engine.BlockSize], wire.StatusBadRequest},
		{"as-of read of snapshot 0", wire.OpRead, wire.Header{Volume: 7, Len: engine.BlockSize, Flags: wire.FlagAsOf}, nil, wire.StatusBadRequest},
		{"clone to snapshot 0", wire.OpClone, wire.Header{Volume: 7, Epoch: 3}, nil, wire.StatusBadRequest},
		{"past the chunk", wire.OpRead, wire.Header{Volume: 7, Off: testChunk - engine.BlockSize, Len: 2 * engine.BlockSize}, nil, wire.StatusRange},
		{"short payload", wire.OpWrite, wire.Header{Volume: 7, Epoch: 3, Len: 2 * engine.BlockSize}, data[:engine.BlockSize], wire.StatusRange},
		{"payload on a read", wire.OpRead, wire.Header{Volume: 7, Len: engine.BlockSize}, data[:engine.BlockSize], wire.StatusRange},
	} {
		if s, _ := nc.call(tc.op, tc.h, tc.payload, resp[:engine.BlockSize]); s != tc.want {
			t.Errorf("%s: status %v, want %v", tc.name, s, tc.want)
		}
	}

	// Fencing: older epochs change nothing.
	old := data[:engine.BlockSize]
	voltest.Fill(old, 99)
	stale := wr
	stale.Epoch, stale.Len = 2, engine.BlockSize
	if s, h := nc.call(wire.OpWrite, stale, old, nil); s != wire.StatusStaleEpoch || h.Epoch != 3 {
		t.Fatalf("write with epoch 2 after 3: %v (node epoch %d)", s, h.Epoch)
	}
	if s, _ := nc.call(wire.OpFence, wire.Header{Volume: 7, Epoch: 2}, nil, nil); s != wire.StatusStaleEpoch {
		t.Fatalf("fence 2 after 3: %v", s)
	}
	if s, _ := nc.call(wire.OpFence, wire.Header{Volume: 7, Epoch: 5}, nil, nil); s != wire.StatusOK {
		t.Fatalf("fence 5: %v", s)
	}
	stale.Epoch = 4
	for _, op := range []wire.Op{wire.OpDiscard, wire.OpWriteZeroes} {
		if s, _ := nc.call(op, stale, nil, nil); s != wire.StatusStaleEpoch {
			t.Fatalf("%v with epoch 4 after fence 5: %v", op, s)
		}
	}
	ns.RaiseEpoch(7, 10) // an attach epoch: fence epoch 10<<32
	stale.Epoch = 9 << 32
	if s, _ := nc.call(wire.OpWrite, stale, old, nil); s != wire.StatusStaleEpoch {
		t.Fatalf("write with attach epoch 9 after RaiseEpoch 10: %v", s)
	}
	if got := ns.Epoch(7); got != 10 {
		t.Fatalf("Epoch after RaiseEpoch 10: %d", got)
	}
	voltest.Fill(data, 3)
	rd.Epoch = wire.FenceEpoch(10, 0)
	if s, _ := nc.call(wire.OpRead, rd, nil, resp[:2*engine.BlockSize]); s != wire.StatusOK || !bytes.Equal(resp[:2*engine.BlockSize], data) {
		t.Fatalf("stale writes changed the data (status %v)", s)
	}
	// Other volumes are not fenced.
	if s, _ := nc.call(wire.OpWrite, wire.Header{Volume: 8, Index: 1, Epoch: 1, Len: engine.BlockSize}, old, nil); s != wire.StatusOK {
		t.Fatalf("write to another volume: %v", s)
	}
	if got := ns.Stats().StaleEpoch; got != 6 {
		t.Errorf("StaleEpoch = %d, want 6", got)
	}

	// Two slots are used (7/0 and 8/1): a third chunk has no space.
	full := wire.Header{Volume: 7, Index: 5, Epoch: wire.FenceEpoch(10, 0), Len: engine.BlockSize}
	if s, _ := nc.call(wire.OpWrite, full, old, nil); s != wire.StatusNoSpace {
		t.Fatalf("write to a full store: %v", s)
	}
	if !errors.Is(wire.ErrOf(wire.StatusNoSpace), engine.ErrNoSpace) || !errors.Is(wire.ErrOf(wire.StatusStaleEpoch), engine.ErrFenced) {
		t.Fatal("status to error mapping")
	}
	if s, _ := nc.call(wire.OpFlush, wire.Header{}, nil, nil); s != wire.StatusOK {
		t.Fatalf("flush: %v", s)
	}
	st := ns.Stats()
	if st.NoSpace != 1 || st.Flushes != 1 || st.Writes != 3 || st.Reads != 2 || st.Errors != 17 {
		t.Errorf("stats %+v", st)
	}
}

// Snapshot copies through the protocol: OpClone copies the head once (a
// second clone to the same snapshot changes nothing), an absent head gives
// a copy that reads as zeros, as-of reads resolve to the right copy and
// say which, OpSnaps lists the copies, and clones are fenced like writes.
func TestNodeServerSnapshots(t *testing.T) {
	_, nc := startNode(t, 16)
	blk := voltest.Buf(t, engine.BlockSize)
	resp := voltest.Buf(t, engine.BlockSize)
	const e = 1 << 32
	write := func(idx uint64, fill byte) {
		t.Helper()
		for i := range blk {
			blk[i] = fill
		}
		if s, _ := nc.call(wire.OpWrite, wire.Header{Volume: 7, Index: idx, Epoch: e, Len: engine.BlockSize}, blk, nil); s != wire.StatusOK {
			t.Fatalf("write: %v", s)
		}
	}
	clone := func(idx uint64, snap uint32) {
		t.Helper()
		if s, _ := nc.call(wire.OpClone, wire.Header{Volume: 7, Index: idx, Epoch: e, Snap: snap}, nil, nil); s != wire.StatusOK {
			t.Fatalf("clone %d to %d: %v", idx, snap, s)
		}
	}
	asOf := func(idx uint64, snap uint32) (byte, uint32) {
		t.Helper()
		s, h := nc.call(wire.OpRead, wire.Header{Volume: 7, Index: idx, Len: engine.BlockSize, Snap: snap, Flags: wire.FlagAsOf}, nil, resp)
		if s != wire.StatusOK {
			t.Fatalf("as-of read %d@%d: %v", idx, snap, s)
		}
		return resp[0], h.Snap
	}
	write(0, 'a')
	clone(0, 3)
	write(0, 'b')
	clone(0, 3) // again: the copy keeps 'a'
	clone(1, 3) // no head: a copy of zeros
	write(1, 'z')
	for _, c := range []struct {
		idx  uint64
		snap uint32
		want byte
		from uint32
	}{{0, 1, 'a', 3}, {0, 3, 'a', 3}, {0, 4, 'b', 0}, {1, 2, 0, 3}, {1, 4, 'z', 0}} {
		if got, from := asOf(c.idx, c.snap); got != c.want || from != c.from {
			t.Errorf("chunk %d as of %d: %q from %d, want %q from %d", c.idx, c.snap, got, from, c.want, c.from)
		}
	}
	list := voltest.Buf(t, engine.BlockSize)
	if s, _ := nc.call(wire.OpSnaps, wire.Header{Volume: 7, Index: 0}, nil, list); s != wire.StatusOK || list[0] != 3 || list[8] != 0 {
		t.Fatalf("snaps of chunk 0: %v %v", s, list[:16])
	}
	if s, _ := nc.call(wire.OpFence, wire.Header{Volume: 7, Epoch: 2 << 32}, nil, nil); s != wire.StatusOK {
		t.Fatalf("fence: %v", s)
	}
	if s, _ := nc.call(wire.OpClone, wire.Header{Volume: 7, Index: 2, Epoch: e, Snap: 5}, nil, nil); s != wire.StatusStaleEpoch {
		t.Fatalf("clone after a fence: %v", s)
	}
	// As-of reads are not fenced.
	if got, _ := asOf(0, 2); got != 'a' {
		t.Fatalf("as-of read after a fence: %q", got)
	}
}
