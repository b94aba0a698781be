package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/torus-storage/torus/cluster"
	"github.com/torus-storage/torus/engine"
	"github.com/torus-storage/torus/internal/testcluster"
	"github.com/torus-storage/torus/internal/voltest"
	"github.com/torus-storage/torus/meta"
	"github.com/torus-storage/torus/netquic"
)

const mib = 1 << 20

// spaceCluster starts n real torusd nodes (1 MiB chunks, replication repl)
// under the test's prefix, each with extra flags, and waits for them.
func spaceCluster(t *testing.T, n, repl int, size string, extra ...string) *testcluster.Cluster {
	t.Helper()
	c := testcluster.NewCluster(t, testcluster.Options{Endpoint: endpoint, Prefix: prefix(t), Replication: repl})
	for i := range n {
		nd := c.NewNode(i + 1)
		nd.Size, nd.Args = size, extra
		c.StartNode(nd)
	}
	c.WaitNodes(n)
	return c
}

// attachVolume attaches volume name of c as a client (it pauses for
// snapshots) until the test ends.
func attachVolume(t *testing.T, c *testcluster.Cluster, name string) *cluster.Attached {
	t.Helper()
	tc, err := netquic.LoadTLS(c.TLSDir)
	if err != nil {
		t.Fatal(err)
	}
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	a, err := cluster.Attach(context.Background(), c.Meta, name, cluster.AttachOptions{Options: cluster.Options{TLS: tc.Client,
		Logger: quiet, Holder: "space test"}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	return a
}

// writeChunk writes the first 64 KiB of chunk idx of v (1 MiB chunks).
func writeChunk(t *testing.T, v engine.Volume, idx int64, fill byte) {
	t.Helper()
	buf := voltest.Buf(t, 64<<10)
	for i := range buf {
		buf[i] = fill
	}
	if err := voltest.Do(v, engine.OpWrite, 0, idx*mib, int64(len(buf)), buf); err != nil {
		t.Fatalf("write chunk %d: %v", idx, err)
	}
}

// regexpFind reports whether re matches somewhere in s.
func regexpFind(re, s string) bool { return regexp.MustCompile(re).MatchString(s) }

// eventually runs check every 200 ms until it returns "" or 30 s pass,
// then fails with its last answer.
func eventually(t *testing.T, what string, check func() string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		msg := check()
		if msg == "" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: %s", what, msg)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// TestSpaceUsage writes a volume of two replicas on two real nodes, takes
// snapshots and overwrites chunks, and checks the bytes volume list,
// volume info and snapshot list add up from the nodes' records: live data
// and snapshot copies apart, a copy counted for a snapshot only while no
// other snapshot reads it, and a node that is down said missing rather
// than counted as empty.
func TestSpaceUsage(t *testing.T) {
	c := spaceCluster(t, 2, 2, "64MiB", "--usage-interval", "300ms")
	must(t, "volume", "create", "vol", "--size", "8MiB")
	a := attachVolume(t, c, "vol")
	ctx := context.Background()
	snap := func(name string) {
		t.Helper()
		if _, err := c.Meta.TakeSnapshots(ctx, "", []meta.SnapshotRequest{{Volume: "vol", Name: name}}, 10*time.Second); err != nil {
			t.Fatalf("snapshot %s: %v", name, err)
		}
	}
	for i := range int64(3) {
		writeChunk(t, a, i, 'A')
	}
	snap("a")
	writeChunk(t, a, 0, 'B') // copy 1 of chunk 0: read by a alone
	snap("b")
	snap("c")
	writeChunk(t, a, 1, 'C') // copy 3 of chunk 1: read by a, b and c
	writeChunk(t, a, 0, 'C') // copy 3 of chunk 0: read by b and c
	if err := voltest.Do(a, engine.OpFlush, 0, 0, 0, nil); err != nil {
		t.Fatal(err)
	}

	// Per node: 3 head chunks and 3 copies; both nodes hold every chunk.
	type want struct {
		alloc, snaps uint64
		excl         map[string]uint64
		reported     int
	}
	check := func(w want) func() string {
		return func() string {
			var vols []volumeRow
			if err := json.Unmarshal([]byte(must(t, "--output", "json", "volume", "list")), &vols); err != nil || len(vols) != 1 {
				return fmt.Sprintf("volume list: %v %+v", err, vols)
			}
			v := vols[0]
			if v.AllocatedBytes != w.alloc || v.SnapshotBytes != w.snaps || v.Reported != w.reported || v.Nodes != 2 {
				return fmt.Sprintf("volume list: allocated %d, snapshots %d, %d of %d nodes reported; want %d, %d, %d of 2",
					v.AllocatedBytes, v.SnapshotBytes, v.Reported, v.Nodes, w.alloc, w.snaps, w.reported)
			}
			var snaps []snapshotRow
			if err := json.Unmarshal([]byte(must(t, "--output", "json", "snapshot", "list", "vol")), &snaps); err != nil {
				return err.Error()
			}
			got := map[string]uint64{}
			for _, s := range snaps {
				got[s.Name] = s.Exclusive
				if s.ExclusiveUnknown || s.Reported != w.reported {
					return fmt.Sprintf("snapshot %s: %+v", s.Name, s)
				}
			}
			if fmt.Sprint(got) != fmt.Sprint(w.excl) {
				return fmt.Sprintf("exclusive bytes %v, want %v", got, w.excl)
			}
			return ""
		}
	}
	eventually(t, "after the writes", check(want{6 * mib, 6 * mib, map[string]uint64{"a": 2 * mib, "b": 0, "c": 0}, 2}))

	out := must(t, "volume", "list")
	if !strings.Contains(out, "ALLOCATED") || !regexpFind(`vol\s+\d+\s+8 MiB\s+2\s+ready\s+6 MiB\s+6 MiB\s`, out) ||
		!strings.Contains(out, "all replicas; 2 of 2 nodes reported") {
		t.Fatalf("volume list:\n%s", out)
	}
	out = must(t, "snapshot", "list", "vol")
	if !regexpFind(`vol@a\s+1\s+8 MiB\s+2 MiB\s`, out) || !regexpFind(`vol@b\s+2\s+8 MiB\s+0 B\s`, out) || !strings.Contains(out, "EXCLUSIVE") {
		t.Fatalf("snapshot list:\n%s", out)
	}

	// Without b, copy 3 of chunk 0 is read by c alone; nothing is freed.
	must(t, "snapshot", "delete", "vol@b")
	eventually(t, "after deleting b", check(want{6 * mib, 6 * mib, map[string]uint64{"a": 2 * mib, "c": 2 * mib}, 2}))
	// Without a, copy 1 of chunk 0 is garbage and is freed on both nodes;
	// copy 3 of chunk 1 is now c's alone.
	must(t, "snapshot", "delete", "vol@a")
	eventually(t, "after deleting a", check(want{6 * mib, 4 * mib, map[string]uint64{"c": 4 * mib}, 2}))

	// A node that is down: its bytes are missing, and the output says so.
	c.Nodes[1].Proc.Stop(t)
	eventually(t, "with node2 down", check(want{3 * mib, 2 * mib, map[string]uint64{"c": 2 * mib}, 1}))
	out = must(t, "volume", "info", "vol")
	if !regexpFind(`allocated:\s+3 MiB on the nodes' disks, all replicas \(only 1 of 2 nodes reported; missing node2`, out) ||
		!regexpFind(`snapshot copies:\s+2 MiB on the nodes`, out) {
		t.Fatalf("volume info with a node down:\n%s", out)
	}
	if out := must(t, "volume", "list"); !strings.Contains(out, "only 1 of 2 nodes reported; missing node2") {
		t.Fatalf("volume list with a node down:\n%s", out)
	}
}

// TestStatusNearFull fills a real node's four-chunk store past its
// --near-full ratio: status and node list flag it with its used and total
// space (not as out of space), the node logs the warning, and below the
// ratio nothing is flagged.
func TestStatusNearFull(t *testing.T) {
	c := spaceCluster(t, 1, 1, "4MiB", "--near-full", "0.5")
	must(t, "volume", "create", "vol", "--size", "8MiB")
	a := attachVolume(t, c, "vol")
	writeChunk(t, a, 0, 'A')
	eventually(t, "one chunk of four used", func() string {
		if out := must(t, "node", "list"); !regexpFind(`node1\s.*\s4 MiB\s+1 MiB\s+ok\n`, out) {
			return "node list:\n" + out
		}
		return ""
	})
	if out := must(t, "status"); strings.Contains(out, "NEAR FULL") {
		t.Fatalf("status below the near-full ratio:\n%s", out)
	}
	writeChunk(t, a, 1, 'A')
	eventually(t, "two chunks of four used", func() string {
		out := must(t, "status")
		if !regexpFind(`NEAR FULL:\s+node node1: 2 MiB of 4 MiB used \(50%, warns at 50%\): free space`, out) ||
			strings.Contains(out, "OUT OF SPACE") {
			return "status:\n" + out
		}
		return ""
	})
	var st statusResult
	if err := json.Unmarshal([]byte(must(t, "--output", "json", "status")), &st); err != nil {
		t.Fatal(err)
	}
	if len(st.NearFull) != 1 || st.NearFull[0] != (nearFullNode{"node1", 2 * mib, 4 * mib, 0.5}) || len(st.Full) != 0 {
		t.Fatalf("status --output json: near_full %+v, full %+v", st.NearFull, st.Full)
	}
	if out := must(t, "node", "list"); !strings.Contains(out, "near full: 2 MiB of 4 MiB used (50%, warns at 50%)") {
		t.Fatalf("node list:\n%s", out)
	}
	c.Nodes[0].Proc.WaitLog(t, `level=WARN msg="node is nearly full`)
}
