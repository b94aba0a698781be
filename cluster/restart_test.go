package cluster

import (
	"bytes"
	"context"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/torus-storage/torus/engine"
	"github.com/torus-storage/torus/internal/voltest"
	"github.com/torus-storage/torus/ring"
	"github.com/torus-storage/torus/store"
)

// snapshotStore returns nd's store file as it is now: what a power loss at
// this moment would leave on the node's disk once every later write is lost.
// Take it only while no I/O is in flight to the node (right after a Flush).
func snapshotStore(t testing.TB, nd *testNode) []byte {
	t.Helper()
	b, err := os.ReadFile(nd.path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// powerLoss stops nd and starts it again on its store file as it was at
// snap, on the same address: the node process restarts (a new
// incarnation) and every write it took after snap is gone, as after a
// power loss that cost it the writes no flush covered. The store is opened
// as after an unclean shutdown (the snapshot was taken while it was open).
func (tc *testCluster) powerLoss(nd *testNode, snap []byte) {
	t := tc.t
	t.Helper()
	nd.srv.Close()
	if err := nd.st.Close(); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(nd.path, snap, 0o600); err != nil {
		t.Fatal(err)
	}
	st, err := store.OpenStore(nd.path, store.StoreOptions{Shards: 1, Logger: quietLog})
	if err != nil {
		t.Fatalf("%s: reopen after power loss: %v", nd.id, err)
	}
	nd.st = st
	tc.serve(nd, nd.addr)
}

// peerOf returns c's peer of node id.
func peerOf(t *testing.T, c *Volume, id string) *peer {
	t.Helper()
	for _, p := range c.state.Load().all {
		if p.id == id {
			return p
		}
	}
	t.Fatalf("no peer %s", id)
	return nil
}

// waitFor polls cond until it holds, failing the test after 30 s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestClusterRestartLosesUnflushed: a replica loses power after taking
// writes no flush covered and comes back (a new incarnation) without them.
// Whatever reply first shows the client the new incarnation (a read, the
// prober's, a rebuild copy's write, a flush), the client must mark exactly the
// chunks whose last write on that node no flush covered, must not return
// the node's stale copy of them meanwhile (the node is the preferred
// reader), and the rebuild must make all three copies equal again.
func TestClusterRestartLosesUnflushed(t *testing.T) {
	for _, first := range []string{"read", "prober", "rebuild", "flush"} {
		t.Run(first, func(t *testing.T) { testRestartLosesUnflushed(t, first) })
	}
}

func testRestartLosesUnflushed(t *testing.T, first string) {
	tc := startCluster(t, 3, 128)
	const size = 2 << 20 // 32 chunks
	vol := tc.volume("restart", size, 3)
	victim := tc.nodes[0]
	c, err := Open(context.Background(), tc.ms, vol, Options{TLS: tc.client.Client, Epoch: 1,
		Timeout: time.Second, Logger: quietLog, LocalNode: victim.id})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	model := make([]byte, size)
	voltest.Fill(model, 11)
	buf := voltest.Buf(t, size)
	copy(buf, model)
	if err := voltest.Do(c, engine.OpWrite, 0, 0, size, buf); err != nil {
		t.Fatal(err)
	}
	if err := voltest.Do(c, engine.OpFlush, 0, 0, 0, nil); err != nil {
		t.Fatal(err)
	}
	snap := snapshotStore(t, victim)

	// Writes every replica took but no flush covered: whole chunks 2, 5
	// and 9, and 8 KiB of chunk 12.
	lost := []int64{2, 5, 9, 12}
	for _, ch := range lost {
		off, n := ch*testChunk, int64(testChunk)
		if ch == 12 {
			off, n = off+4*engine.BlockSize, 2*engine.BlockSize
		}
		voltest.Fill(model[off:off+n], uint64(100+ch))
		copy(buf[off:off+n], model[off:off+n])
		if err := voltest.Do(c, engine.OpWrite, 0, off, n, buf[off:off+n]); err != nil {
			t.Fatal(err)
		}
	}
	// A chunk the victim misses while it is down (prober, rebuild cases):
	// the rebuild copies it to the victim.
	const downChunk = 20
	wantRebuilt := uint64(len(lost))
	p := peerOf(t, c, victim.id)

	switch first {
	case "read":
		tc.powerLoss(victim, snap)
		// The client may first find its connection to the old process
		// broken: that read fails over and the victim is tried last for
		// peerRetry. Wait that out so reads go to the victim first again
		// and its first reply is a read's.
		waitFor(t, "the victim to be preferred again", func() bool {
			return p.downTill.Load() < time.Now().UnixNano()
		})
	case "prober":
		victim.srv.Close()
		off := int64(downChunk * testChunk)
		voltest.Fill(model[off:off+engine.BlockSize], 7)
		copy(buf[off:off+engine.BlockSize], model[off:off+engine.BlockSize])
		if err := voltest.Do(c, engine.OpWrite, 0, off, engine.BlockSize, buf[off:off+engine.BlockSize]); err != nil {
			t.Fatalf("degraded write: %v", err)
		}
		if !p.isDown() {
			t.Fatal("the victim is not down after a write to it failed")
		}
		tc.powerLoss(victim, snap)
		// The prober's flush is the first reply of the new process.
		waitFor(t, "the prober to reach the victim", func() bool { return !p.isDown() })
		wantRebuilt++
	case "rebuild":
		tc.powerLoss(victim, snap)
		// A mark the client already has (as from a scrub): the rebuild's
		// copy to the victim is the first reply of the new process.
		if err := c.recordMarks(victim.id, []int64{downChunk}); err != nil {
			t.Fatal(err)
		}
		waitFor(t, "the rebuild to copy to the victim", func() bool { return c.Stats().Rebuilt > 0 })
		wantRebuilt++
	case "flush":
		tc.powerLoss(victim, snap)
		// A Flush is the first thing sent to the new process; it must
		// not complete before the lost chunks' marks are in etcd (the
		// rebuild clears a mark only after copying its chunk).
		if err := voltest.Do(c, engine.OpFlush, 0, 0, 0, nil); err != nil {
			t.Fatalf("flush after the restart: %v", err)
		}
		if st := c.Stats(); st.Missed+int(st.Rebuilt) < len(lost) {
			t.Fatalf("flush completed with %+v: want the %d lost chunks marked (or already rebuilt)", st, len(lost))
		}
	}

	// The victim is the preferred reader: no read may return its stale
	// copy of a lost chunk.
	verify(t, c, model)
	if first == "read" && c.Failovers() == 0 {
		t.Fatal("no read failed over from the restarted victim")
	}
	if err := voltest.Do(c, engine.OpFlush, 0, 0, 0, nil); err != nil {
		t.Fatalf("flush after the restart: %v", err)
	}
	waitFor(t, "the rebuild", func() bool { return c.Stats().Missed == 0 && c.Stats().Rebuilt >= wantRebuilt })
	missed, err := tc.ms.Missed(context.Background(), vol.ID)
	if err != nil || len(missed) != 0 {
		t.Fatalf("marks in etcd after the rebuild: %v %v", missed, err)
	}
	// Exactly the lost chunks (and the one missed while down) were marked
	// and copied: nothing else.
	st := c.Stats()
	if st.Rebuilt != wantRebuilt {
		t.Fatalf("rebuilt %d chunks, want %d (the chunks whose writes no flush covered)", st.Rebuilt, wantRebuilt)
	}
	if st.NodeRestarts == 0 {
		t.Fatal("the client counted no node restart")
	}
	t.Logf("%s first: %+v", first, st)
	if err := voltest.Do(c, engine.OpFlush, 0, 0, 0, nil); err != nil {
		t.Fatal(err)
	}
	checkReplicas(t, tc, vol, 3, model)
	got, _ := readCopy(t, victim, vol.ID, 2)
	if !bytes.Equal(got, model[2*testChunk:3*testChunk]) {
		t.Fatal("the victim's copy of a lost chunk was not rebuilt")
	}
	verify(t, c, model)
}

// TestClusterFirstReplyAfterAttach: a node that could not be fenced at
// attach (down) loses power meanwhile and, as torusd does, marks what it may
// have lost before it serves. Its first reply to the new holder comes long
// after the holder read the marks: the holder must read them again before
// it trusts the node, so no read returns the node's stale copy.
func TestClusterFirstReplyAfterAttach(t *testing.T) {
	tc := startCluster(t, 3, 128)
	const size = 1 << 20 // 16 chunks
	vol := tc.volume("first", size, 2)
	victim := tc.nodes[0]
	a := tc.mustOpen(vol, 1)
	defer a.Close()
	model := make([]byte, size)
	voltest.Fill(model, 1)
	buf := voltest.Buf(t, size)
	copy(buf, model)
	if err := voltest.Do(a, engine.OpWrite, 0, 0, size, buf); err != nil {
		t.Fatal(err)
	}
	if err := voltest.Do(a, engine.OpFlush, 0, 0, 0, nil); err != nil {
		t.Fatal(err)
	}
	snap := snapshotStore(t, victim)
	// Acknowledged by every owner, not flushed; the holder then dies.
	voltest.Fill(model, 2)
	copy(buf, model)
	if err := voltest.Do(a, engine.OpWrite, 0, 0, size, buf); err != nil {
		t.Fatal(err)
	}

	victim.srv.Close()
	b, err := Open(context.Background(), tc.ms, vol, Options{TLS: tc.client.Client, Epoch: 2,
		Timeout: time.Second, Logger: quietLog, LocalNode: victim.id})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	time.Sleep(1500 * time.Millisecond) // the prober has looked at the victim's marks (none yet)

	tc.powerLoss(victim, snap)
	var chunks []uint64
	r, _, _ := tc.ms.Ring(context.Background())
	for ch := range uint64(size / testChunk) {
		if slices.Contains(r.Owners(ring.ChunkKey(vol.ID, ch, 0), 2, nil), victim.id) {
			chunks = append(chunks, ch)
		}
	}
	if err := tc.ms.MarkMissed(context.Background(), vol.ID, victim.id, chunks...); err != nil {
		t.Fatal(err)
	}
	p := peerOf(t, b, victim.id)
	waitFor(t, "the victim to be preferred again", func() bool { return p.downTill.Load() < time.Now().UnixNano() })
	// The victim's first reply to b (the flush) comes after b read the
	// marks at attach.
	if err := voltest.Do(b, engine.OpFlush, 0, 0, 0, nil); err != nil {
		t.Fatal(err)
	}
	verify(t, b, model)
	waitFor(t, "b to know the victim's marks", func() bool { st := b.Stats(); return st.Missed+int(st.Rebuilt) >= len(chunks) })
	t.Logf("%d chunks of the victim marked; stats %+v", len(chunks), b.Stats())
}
