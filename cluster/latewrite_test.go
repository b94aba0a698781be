package cluster

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/torus-storage/torus/engine"
	"github.com/torus-storage/torus/internal/voltest"
	"github.com/torus-storage/torus/internal/wire"
	"github.com/torus-storage/torus/netquic"
	"github.com/torus-storage/torus/node"
	"github.com/torus-storage/torus/ring"
)

// holdingHandler passes requests to a node.Server, except the first write
// to one chunk while armed: it waits until release (a request the network
// delivers late).
type holdingHandler struct {
	ns    *node.Server
	chunk uint64

	mu    sync.Mutex
	armed bool
	held  []*netquic.ServerRequest
	got   chan struct{}
}

func (h *holdingHandler) Serve(r *netquic.ServerRequest) {
	var hd wire.Header
	if wire.Op(r.Code) == wire.OpWrite && wire.Decode(wire.OpWrite, &r.Header, &hd) == nil && hd.Index == h.chunk {
		h.mu.Lock()
		if h.armed {
			h.armed = false
			h.held = append(h.held, r)
			h.mu.Unlock()
			h.got <- struct{}{}
			return
		}
		h.mu.Unlock()
	}
	h.ns.Serve(r)
}

// release delivers the held requests now.
func (h *holdingHandler) release() {
	h.mu.Lock()
	held := h.held
	h.held = nil
	h.mu.Unlock()
	for _, r := range held {
		h.ns.Serve(r)
	}
}

// TestClusterLateWriteAfterRebuild: a write to a replica times out (the
// network holds it), the replica is marked and later rebuilt from a good
// copy that has a newer write of the same block; then the held write
// arrives. It must not land: the rebuilt copy would silently go stale.
func TestClusterLateWriteAfterRebuild(t *testing.T) {
	tc := startCluster(t, 3, 128)
	const size = 4 << 20
	vol := tc.volume("late", size, 2)
	c := tc.mustOpen(vol, 1)
	defer c.Close()
	model := make([]byte, size)
	voltest.Fill(model, 21)
	buf := voltest.Buf(t, size)
	copy(buf, model)
	if err := voltest.Do(c, engine.OpWrite, 0, 0, size, buf); err != nil {
		t.Fatal(err)
	}
	const chunk = 3
	r, _, _ := tc.ms.Ring(context.Background())
	owners := r.Owners(ring.ChunkKey(vol.ID, chunk, 0), 2, nil)
	var slow *testNode
	for _, n := range tc.nodes {
		if n.id == owners[0] {
			slow = n
		}
	}
	// Serve the slow owner through the holding handler from now on.
	h := &holdingHandler{ns: slow.ns, chunk: chunk, got: make(chan struct{}, 4)}
	slow.srv.Close()
	srv, err := netquic.Listen(slow.addr, slow.tls.Server, h, &netquic.Options{Logger: quietLog, Transport: tc.transport})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	// Let the client reconnect (and repair whatever the swap cost) first.
	deadline := time.Now().Add(30 * time.Second)
	for {
		if err := voltest.Do(c, engine.OpWrite, 0, 0, size, buf); err == nil && c.Stats().Missed == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the client did not settle after the server swap: %+v", c.Stats())
		}
		time.Sleep(100 * time.Millisecond)
	}
	h.mu.Lock()
	h.armed = true
	h.mu.Unlock()

	off := int64(chunk) * testChunk
	w1 := voltest.Buf(t, engine.BlockSize)
	voltest.Fill(w1, 22)
	if err := voltest.Do(c, engine.OpWrite, 0, off, engine.BlockSize, w1); err != nil {
		t.Fatalf("write with one owner holding it: %v", err)
	}
	<-h.got // the slow owner has it, undelivered
	w2 := voltest.Buf(t, engine.BlockSize)
	voltest.Fill(w2, 23)
	if err := voltest.Do(c, engine.OpWrite, 0, off, engine.BlockSize, w2); err != nil {
		t.Fatal(err)
	}
	copy(model[off:], w2)
	// The slow owner answers again (flushes pass) and is rebuilt.
	deadline = time.Now().Add(30 * time.Second)
	for {
		st := c.Stats()
		if st.Missed == 0 && st.Rebuilt > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("rebuild of the slow owner did not finish: %+v", st)
		}
		time.Sleep(50 * time.Millisecond)
	}
	h.release()
	time.Sleep(200 * time.Millisecond)
	got, ok := readCopy(t, slow, vol.ID, chunk)
	if !ok {
		t.Fatalf("%s has no copy of chunk %d", slow.id, chunk)
	}
	if string(got[:engine.BlockSize]) != string(w2) {
		t.Fatalf("the late write landed on %s after its rebuild: its copy of block %d is stale", slow.id, off/engine.BlockSize)
	}
	verify(t, c, model)
}
