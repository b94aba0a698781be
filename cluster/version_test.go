package cluster

import (
	"bytes"
	"context"
	"testing"
	"time"

	"github.com/torus-storage/torus/engine"
	"github.com/torus-storage/torus/internal/voltest"
	"github.com/torus-storage/torus/store"
)

// cleanSnapshot stops nd cleanly, copies its store file and starts it again:
// an image of its disk taken while the store was closed, whose chunk
// versions are all known.
func (tc *testCluster) cleanSnapshot(nd *testNode) []byte {
	t := tc.t
	t.Helper()
	nd.srv.Close()
	if err := nd.st.Close(); err != nil {
		t.Fatal(err)
	}
	snap := snapshotStore(t, nd)
	st, err := store.OpenStore(nd.path, store.StoreOptions{Shards: 1, Logger: quietLog})
	if err != nil {
		t.Fatalf("%s: reopen: %v", nd.id, err)
	}
	nd.st = st
	tc.serve(nd, nd.addr)
	return snap
}

// rollBack writes A over the whole of chunk ch through a client opened with
// open at attach epoch 1, flushes and detaches; takes an image of the disks
// of nodes (stopped cleanly, so that their versions are known); then writes
// B over it through a new client at epoch 2 and flushes (every replica took
// and flushed B: no mark, no unflushed or suspect chunk covers it). It
// returns that client and restore, which puts each node's image back and
// restarts it: a disk that rolled back. After restore those nodes hold A,
// the other owners B, and nothing in etcd says so (restore checks it).
func rollBack(t *testing.T, tc *testCluster, open func(epoch uint64) *Volume, ch int64, nodes ...*testNode) (c *Volume, a, b []byte, restore func()) {
	t.Helper()
	a, b = voltest.Buf(t, testChunk), voltest.Buf(t, testChunk)
	voltest.Fill(a, 1000+uint64(ch))
	voltest.Fill(b, 2000+uint64(ch))
	off := ch * testChunk
	c1 := open(1)
	if err := voltest.Do(c1, engine.OpWrite, 0, off, testChunk, a); err != nil {
		t.Fatal(err)
	}
	if err := c1.Close(); err != nil {
		t.Fatal(err)
	}
	snaps := make([][]byte, len(nodes))
	for i, nd := range nodes {
		snaps[i] = tc.cleanSnapshot(nd)
	}
	c = open(2)
	if err := voltest.Do(c, engine.OpWrite, 0, off, testChunk, b); err != nil {
		t.Fatal(err)
	}
	if err := voltest.Do(c, engine.OpFlush, 0, 0, 0, nil); err != nil {
		t.Fatal(err)
	}
	restore = func() {
		t.Helper()
		for i, nd := range nodes {
			tc.powerLoss(nd, snaps[i])
		}
		if missed, err := tc.ms.Missed(context.Background(), c.vol.ID); err != nil || len(missed) != 0 {
			t.Fatalf("marks in etcd after the flushed writes: %v %v, want none", missed, err)
		}
		rolled := map[*testNode]bool{}
		for _, nd := range nodes {
			rolled[nd] = true
		}
		for _, nd := range ownerNodes(t, tc, c, ch) {
			want, what := b, "B"
			if rolled[nd] {
				want, what = a, "A (rolled back)"
			}
			if got, ok := readCopy(t, nd, c.vol.ID, uint64(ch)); !ok || !bytes.Equal(got, want) {
				t.Fatalf("setup: %s's copy of chunk %d is not %s", nd.id, ch, what)
			}
		}
	}
	return c, a, b, restore
}

// whichData names the data a copy or read holds: A, B or something else.
func whichData(got, a, b []byte) string {
	switch {
	case bytes.Equal(got, a):
		return "A (the older write)"
	case bytes.Equal(got, b):
		return "B (the last write)"
	}
	return "neither A nor B"
}

// TestClusterVersionReadBehind: a replica whose disk rolled back to before
// a write that every replica took and flushed holds older data than its
// peers, and nothing in etcd says so. A read through the client that wrote
// the last data, with that replica preferred (local), must still return the
// last data once the client trusts the restarted node again: the replica's
// copy is older than what the client acknowledged, so it is treated as
// missed (marked or rebuilt) and the read goes to the other replica.
func TestClusterVersionReadBehind(t *testing.T) {
	tc := startCluster(t, 2, 64)
	vol := tc.volume("vread", 4*testChunk, 2)
	x := tc.nodes[0]
	open := func(epoch uint64) *Volume {
		c, err := Open(context.Background(), tc.ms, vol, Options{TLS: tc.client.Client, Epoch: epoch,
			Timeout: time.Second, Logger: quietLog, LocalNode: x.id})
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	const ch = 1
	c, a, b, restore := rollBack(t, tc, open, ch, x)
	defer c.Close()
	p := peerOf(t, c, x.id)
	inc := p.inc.Load()
	restore()

	// Read until the client has seen x's new process, read its marks again
	// (none) and tries it first again: every read must return B.
	got := voltest.Buf(t, testChunk)
	read := func() {
		t.Helper()
		if err := voltest.Do(c, engine.OpRead, 0, ch*testChunk, testChunk, got); err != nil {
			t.Fatalf("read of chunk %d: %v", ch, err)
		}
		if !bytes.Equal(got, b) {
			t.Fatalf("read of chunk %d returned %s: the stale copy of %s, whose disk rolled back", ch, whichData(got, a, b), x.id)
		}
	}
	waitFor(t, "the client to trust the restarted node again", func() bool {
		read()
		return p.inc.Load() != inc && !p.reload.Load() && p.downTill.Load() < time.Now().UnixNano()
	})
	read()
	waitFor(t, "the stale copy to be marked or rebuilt", func() bool {
		cp, _ := readCopy(t, x, vol.ID, ch)
		return c.marks.has(x.id, ch) || bytes.Equal(cp, b)
	})
	read()
	if n := c.Stats().Behind; n != 1 {
		t.Fatalf("replicas found behind: %d, want 1 (once per node and chunk)", n)
	}
}

// TestScrubStaleMajority: two of three replicas roll back (their disks lose
// a write every replica took and flushed) and a new holder, which knows no
// versions from writes of its own, scrubs. The copy with the newest data
// must win over the stale majority: the two stale copies are repaired from
// it, and the last write survives everywhere.
func TestScrubStaleMajority(t *testing.T) {
	tc := startCluster(t, 3, 64)
	vol := tc.volume("vscrub", 4*testChunk, 3)
	c0 := tc.mustOpen(vol, 1)
	const ch = 2
	owners := ownerNodes(t, tc, c0, ch)
	if err := c0.Close(); err != nil {
		t.Fatal(err)
	}
	// The primary and the second owner roll back: neither the majority nor
	// ring order favours the last copy with B.
	c1, a, b, restore := rollBack(t, tc, func(e uint64) *Volume { return tc.mustOpen(vol, e) }, ch, owners[0], owners[1])
	if err := c1.Close(); err != nil {
		t.Fatal(err)
	}
	restore()

	c2 := tc.mustOpen(vol, 3)
	defer c2.Close()
	res, err := c2.Scrub(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("scrub: %+v", res)
	waitMarks(t, c2)
	for _, nd := range owners {
		got, ok := readCopy(t, nd, vol.ID, ch)
		if !ok || !bytes.Equal(got, b) {
			t.Errorf("after the scrub %s's copy of chunk %d is %s, want B", nd.id, ch, whichData(got, a, b))
		}
	}
	got := voltest.Buf(t, testChunk)
	if err := voltest.Do(c2, engine.OpRead, 0, ch*testChunk, testChunk, got); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, b) {
		t.Fatalf("read after the scrub returned %s, want B", whichData(got, a, b))
	}
}

// TestClusterRebuildNeverOverwritesNewer: a replica whose disk rolled back
// holds older data than the other one, unknown to etcd; the other one then
// gets a missed mark (as if it had missed a write). The rebuild, run by a
// new holder (as torusd's maintenance is) that knows no version from
// writes of its own, must not copy the stale copy over the newer one: the
// copy carries its source's version and the target refuses one older than
// what it holds. Both copies are kept, the target keeps its mark, and the
// copy is not tried again while the chunk is not written.
func TestClusterRebuildNeverOverwritesNewer(t *testing.T) {
	tc := startCluster(t, 2, 64)
	vol := tc.volume("vrebuild", 4*testChunk, 2)
	c0 := tc.mustOpen(vol, 1)
	const ch = 3
	owners := ownerNodes(t, tc, c0, ch)
	if err := c0.Close(); err != nil {
		t.Fatal(err)
	}
	x, y := owners[0], owners[1]
	c1, a, b, restore := rollBack(t, tc, func(e uint64) *Volume { return tc.mustOpen(vol, e) }, ch, x)
	if err := c1.Close(); err != nil {
		t.Fatal(err)
	}
	restore()
	c := tc.mustOpen(vol, 3)
	defer c.Close()

	if err := c.recordMarks(y.id, []int64{ch}); err != nil {
		t.Fatal(err)
	}
	if !c.marks.has(y.id, ch) {
		t.Fatalf("no mark of %s for chunk %d in memory", y.id, ch)
	}
	c.kickRebuild()
	// Until the rebuild acted: a copy refused, or y's copy overwritten.
	waitFor(t, "the rebuild to act on the chunk", func() bool {
		cy, _ := readCopy(t, y, vol.ID, ch)
		return c.Stats().CopiesRefused > 0 || !bytes.Equal(cy, b)
	})
	if got, ok := readCopy(t, y, vol.ID, ch); !ok || !bytes.Equal(got, b) {
		t.Fatalf("the rebuild left %s's copy of chunk %d as %s, want B: the copy from %s (rolled back) overwrote newer data",
			y.id, ch, whichData(got, a, b), x.id)
	}
	if !c.marks.has(y.id, ch) {
		t.Fatalf("%s's mark was cleared though no copy reached it", y.id)
	}
	// While nothing writes the chunk, the refused copy is not tried again.
	for range 3 {
		c.kickRebuild()
		time.Sleep(100 * time.Millisecond)
	}
	if n := c.Stats().CopiesRefused; n != 1 {
		t.Fatalf("%d copies refused, want 1: the rebuild retried a copy of an idle chunk that the target refuses", n)
	}
}
