package cluster

import (
	"context"
	"testing"
	"time"

	"github.com/torus-storage/torus/engine"
	"github.com/torus-storage/torus/internal/voltest"
	"github.com/torus-storage/torus/netquic"
	"github.com/torus-storage/torus/ring"
)

// TestClusterBothOwnersMarked: a chunk's first owner misses a write (down),
// then its second owner, which took the write, cannot be flushed (down
// too). Both copies are marked; when the second comes back without a
// restart, it holds every write it took, so its mark goes and the chunk is
// readable and rebuilt again instead of lost for good.
func TestClusterBothOwnersMarked(t *testing.T) {
	tc := startCluster(t, 3, 128)
	const size = 4 << 20
	vol := tc.volume("both", size, 2)
	c := tc.mustOpen(vol, 1)
	defer c.Close()
	model := make([]byte, size)
	voltest.Fill(model, 31)
	buf := voltest.Buf(t, size)
	copy(buf, model)
	if err := voltest.Do(c, engine.OpWrite, 0, 0, size, buf); err != nil {
		t.Fatal(err)
	}
	if err := voltest.Do(c, engine.OpFlush, 0, 0, 0, nil); err != nil {
		t.Fatal(err)
	}
	const chunk = 5
	r, _, _ := tc.ms.Ring(context.Background())
	owners := r.Owners(ring.ChunkKey(vol.ID, chunk, 0), 2, nil)
	var a, b *testNode
	for _, n := range tc.nodes {
		switch n.id {
		case owners[0]:
			a = n
		case owners[1]:
			b = n
		}
	}
	a.srv.Close()
	off := int64(chunk) * testChunk
	w := voltest.Buf(t, engine.BlockSize)
	voltest.Fill(w, 32)
	if err := voltest.Do(c, engine.OpWrite, 0, off, engine.BlockSize, w); err != nil {
		t.Fatalf("write with %s down: %v", a.id, err)
	}
	copy(model[off:], w)
	b.srv.Close()
	if err := voltest.Do(c, engine.OpFlush, 0, 0, 0, nil); err != nil {
		t.Fatalf("flush with both owners of chunk %d down: %v", chunk, err)
	}
	missed, err := tc.ms.Missed(context.Background(), vol.ID)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("marks with both down: %v", missed)
	// A partition heals: the same node.Server (same incarnation) answers.
	srv, err := netquic.Listen(b.addr, b.tls.Server, b.ns, &netquic.Options{Logger: quietLog, Transport: tc.transport})
	if err != nil {
		t.Fatal(err)
	}
	b.srv = srv
	deadline := time.Now().Add(20 * time.Second)
	got := voltest.Buf(t, engine.BlockSize)
	for {
		err := voltest.Do(c, engine.OpRead, 0, off, engine.BlockSize, got)
		if err == nil {
			if string(got) != string(w) {
				t.Fatalf("read of block %d returned other bytes than the last acknowledged write", off/engine.BlockSize)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("chunk %d stays unreadable after %s came back without a restart: %v", chunk, b.id, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	tc.serve(a, a.addr)
	for c.Stats().Missed > 0 {
		if time.Now().After(deadline.Add(20 * time.Second)) {
			t.Fatalf("rebuild did not finish: %+v", c.Stats())
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err := voltest.Do(c, engine.OpFlush, 0, 0, 0, nil); err != nil {
		t.Fatal(err)
	}
	verify(t, c, model)
	checkReplicas(t, tc, vol, 2, model)
}
