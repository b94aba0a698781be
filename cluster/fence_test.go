package cluster

import (
	"context"
	"errors"
	"syscall"
	"testing"
	"time"

	"github.com/torus-storage/torus/engine"
	"github.com/torus-storage/torus/internal/voltest"
	"github.com/torus-storage/torus/meta"
)

// TestClusterFenceGuard: client A opened the volume with a meta.Client guarded
// by its attach lease. A's lease ends and B attaches in etcd, but B never
// reaches the nodes (as when they are partitioned from it), so they still
// take A's epoch. With a node down, A's next write needs a missed mark:
// etcd refuses it because A no longer holds the lock with its epoch, the
// write fails, no mark is recorded, and A is fenced: its reads and
// flushes fail from then on.
func TestClusterFenceGuard(t *testing.T) {
	tc := startCluster(t, 3, 64)
	vol := tc.volume("guarded", 1<<20, 3)
	ctx := context.Background()
	la, err := tc.ms.Attach(ctx, vol.Name, "a", 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	a, err := Open(ctx, tc.ms.Guarded(la), la.Volume(), Options{TLS: tc.client.Client,
		Epoch: la.Epoch(), Timeout: time.Second, Logger: quietLog})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	b1 := voltest.Buf(t, engine.BlockSize)
	voltest.Fill(b1, 1)
	if err := voltest.Do(a, engine.OpWrite, 0, 0, engine.BlockSize, b1); err != nil {
		t.Fatal(err)
	}
	if err := la.Release(ctx); err != nil { // the lease ends
		t.Fatal(err)
	}
	lb, err := tc.ms.Attach(ctx, vol.Name, "b", 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer lb.Release(ctx)
	if a.Fenced() != nil {
		t.Fatalf("fenced before it learnt anything: %v", a.Fenced())
	}

	tc.nodes[2].srv.Close()
	voltest.Fill(b1, 2)
	err = voltest.Do(a, engine.OpWrite, 0, 0, engine.BlockSize, b1)
	if !errors.Is(err, meta.ErrNotHolder) {
		t.Fatalf("degraded write after B attached: err %v, want meta.ErrNotHolder", err)
	}
	t.Logf("degraded write after B attached: %v", err)
	if !errors.Is(a.Fenced(), meta.ErrNotHolder) {
		t.Fatalf("Fenced() = %v, want meta.ErrNotHolder", a.Fenced())
	}
	if m, err := tc.ms.Missed(ctx, vol.ID); err != nil || len(m) != 0 {
		t.Fatalf("marks after the refused write: %v, %v; want none", m, err)
	}
	got := voltest.Buf(t, engine.BlockSize)
	for _, op := range []engine.Op{engine.OpRead, engine.OpWrite, engine.OpFlush} {
		var buf []byte
		length := int64(engine.BlockSize)
		switch op {
		case engine.OpRead:
			buf = got
		case engine.OpWrite:
			buf = b1
		case engine.OpFlush:
			length = 0
		}
		if err := voltest.Do(a, op, 0, 0, length, buf); !errors.Is(err, engine.ErrFenced) {
			t.Fatalf("%v by the fenced client: err %v, want ErrFenced", op, err)
		}
	}
	if _, err := a.Scrub(ctx); !errors.Is(err, engine.ErrFenced) {
		t.Fatalf("scrub by the fenced client: err %v, want ErrFenced", err)
	}
}

// TestClusterFence: Fence stops every request at once, with one atomic
// load and no allocation per request.
func TestClusterFence(t *testing.T) {
	tc := startCluster(t, 3, 64)
	vol := tc.volume("fence", 1<<20, 3)
	c := tc.mustOpen(vol, 1)
	defer c.Close()
	b := voltest.Buf(t, engine.BlockSize)
	if err := voltest.Do(c, engine.OpWrite, 0, 0, engine.BlockSize, b); err != nil {
		t.Fatal(err)
	}
	cause := errors.New("test: someone else attached")
	c.Fence(cause)
	c.Fence(errors.New("second cause: ignored"))
	if c.Fenced() != cause {
		t.Fatalf("Fenced() = %v, want the first cause", c.Fenced())
	}
	w := make(voltest.Waiter, 1)
	r := &engine.Request{Op: engine.OpRead, Offset: 0, Length: engine.BlockSize, Buf: b, Done: w}
	allocs := testing.AllocsPerRun(100, func() {
		c.Submit(r)
		if err := <-w; !errors.Is(err, engine.ErrFenced) {
			t.Fatalf("read after Fence: %v, want ErrFenced", err)
		}
	})
	if allocs != 0 {
		t.Fatalf("%v allocations per fenced request, want 0", allocs)
	}
	if engine.Errno(engine.ErrFenced) != syscall.EIO { // what ublk and NBD return
		t.Fatalf("Errno(ErrFenced) = %v, want EIO", engine.Errno(engine.ErrFenced))
	}
}
