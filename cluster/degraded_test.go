package cluster

import (
	"context"
	"testing"
	"time"

	"github.com/torus-storage/torus/engine"
	"github.com/torus-storage/torus/internal/voltest"
)

// TestClusterDegraded: a node goes down under writes; the writes succeed
// (R=3, two live), every chunk the node missed is marked in etcd, reads never
// return the down node's stale bytes, and when the node is back the rebuild
// copies exactly what it missed, clears the marks, and all three copies are
// identical again.
func TestClusterDegraded(t *testing.T) {
	tc := startCluster(t, 3, 128)
	const size = 8 << 20
	vol := tc.volume("degraded", size, 3)
	c := tc.mustOpen(vol, 1)
	defer c.Close()
	model := make([]byte, size)
	voltest.Fill(model, 3)
	buf := voltest.Buf(t, size)
	copy(buf, model)
	if err := voltest.Do(c, engine.OpWrite, 0, 0, size, buf); err != nil {
		t.Fatal(err)
	}
	if err := voltest.Do(c, engine.OpFlush, 0, 0, 0, nil); err != nil {
		t.Fatal(err)
	}

	down := tc.nodes[1]
	down.srv.Close()
	// Overwrite the first half while the node is down.
	voltest.Fill(model[:size/2], 4)
	copy(buf, model)
	if err := voltest.Do(c, engine.OpWrite, 0, 0, size/2, buf[:size/2]); err != nil {
		t.Fatalf("write with one of three replicas down: %v", err)
	}
	if err := voltest.Do(c, engine.OpFlush, 0, 0, 0, nil); err != nil {
		t.Fatalf("flush with one of three replicas down: %v", err)
	}
	missed, err := tc.ms.Missed(context.Background(), vol.ID)
	if err != nil {
		t.Fatal(err)
	}
	if len(missed[down.id]) < int(size/2/testChunk) {
		t.Fatalf("marks for %s: %v, want every chunk of the first half", down.id, missed)
	}
	if st := c.Stats(); st.Missed == 0 || st.NodeFailures == 0 {
		t.Fatalf("stats %+v: want marks and a node failure", st)
	}
	verify(t, c, model)

	// The node's own copy is stale now; after it is back, the rebuild fixes it.
	tc.serve(down, down.addr)
	deadline := time.Now().Add(30 * time.Second)
	for c.Stats().Missed > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("rebuild did not finish: %+v", c.Stats())
		}
		time.Sleep(100 * time.Millisecond)
	}
	missed, err = tc.ms.Missed(context.Background(), vol.ID)
	if err != nil || len(missed) != 0 {
		t.Fatalf("marks in etcd after rebuild: %v %v", missed, err)
	}
	st := c.Stats()
	if st.Rebuilt == 0 || st.Rebuilt > uint64(size/2/testChunk)+2 {
		t.Fatalf("rebuilt %d chunks; want about the %d the node missed (no full copy)", st.Rebuilt, size/2/testChunk)
	}
	t.Logf("stats after rebuild: %+v", st)
	if err := voltest.Do(c, engine.OpFlush, 0, 0, 0, nil); err != nil {
		t.Fatal(err)
	}
	checkReplicas(t, tc, vol, 3, model)
	verify(t, c, model)
}

// TestClusterDegradedReopen: marks survive the client: a volume reopened
// (a new attach) while a node is still stale never reads from it and
// rebuilds it.
func TestClusterDegradedReopen(t *testing.T) {
	tc := startCluster(t, 3, 128)
	const size = 4 << 20
	vol := tc.volume("reopen", size, 3)
	c := tc.mustOpen(vol, 1)
	model := make([]byte, size)
	voltest.Fill(model, 5)
	buf := voltest.Buf(t, size)
	copy(buf, model)
	if err := voltest.Do(c, engine.OpWrite, 0, 0, size, buf); err != nil {
		t.Fatal(err)
	}
	down := tc.nodes[2]
	down.srv.Close()
	voltest.Fill(model, 6)
	copy(buf, model)
	if err := voltest.Do(c, engine.OpWrite, 0, 0, size, buf); err != nil {
		t.Fatalf("degraded write: %v", err)
	}
	if err := c.Close(); err != nil {
		t.Fatalf("close with a node down: %v", err)
	}
	// Bring the stale node back before the new attach, and make it the
	// preferred reader: it must still not be read until rebuilt.
	tc.serve(down, down.addr)
	c2, err := Open(context.Background(), tc.ms, vol, Options{TLS: tc.client.Client, Epoch: 2,
		Timeout: time.Second, Logger: quietLog, LocalNode: down.id})
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	verify(t, c2, model)
	deadline := time.Now().Add(30 * time.Second)
	for c2.Stats().Missed > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("rebuild did not finish: %+v", c2.Stats())
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err := voltest.Do(c2, engine.OpFlush, 0, 0, 0, nil); err != nil {
		t.Fatal(err)
	}
	checkReplicas(t, tc, vol, 3, model)
}

// TestClusterDegradedNeedsEtcd: with a node down and etcd down too, a write
// that would need a new missed mark fails instead of being acknowledged
// without the metadata that says which copy is stale; reads still work.
func TestClusterDegradedNeedsEtcd(t *testing.T) {
	tc := startCluster(t, 3, 128)
	const size = 1 << 20
	vol := tc.volume("needsetcd", size, 3)
	c := tc.mustOpen(vol, 1)
	defer c.Close()
	model := make([]byte, size)
	voltest.Fill(model, 8)
	buf := voltest.Buf(t, size)
	copy(buf, model)
	if err := voltest.Do(c, engine.OpWrite, 0, 0, size, buf); err != nil {
		t.Fatal(err)
	}
	tc.nodes[0].srv.Close()
	tc.etcd.Close()
	b := voltest.Buf(t, engine.BlockSize)
	voltest.Fill(b, 99)
	if err := voltest.Do(c, engine.OpWrite, 0, 0, engine.BlockSize, b); err == nil {
		t.Fatal("a degraded write was acknowledged while etcd could not record the missed chunk")
	} else {
		t.Logf("degraded write without etcd: %v", err)
	}
	// Reads go on from the live nodes (the failed write may or may not have
	// landed on them: a failed block write leaves old or new data).
	got := voltest.Buf(t, size)
	if err := voltest.Do(c, engine.OpRead, 0, 0, size, got); err != nil {
		t.Fatalf("read with a node and etcd down: %v", err)
	}
	if st := c.Stats(); st.Missed != 0 {
		t.Fatalf("marks in memory that etcd never took: %+v", st)
	}
}
