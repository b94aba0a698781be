package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/torus-storage/torus/meta"
)

// qemuIO runs qemu-io commands against the NBD export at sock.
func qemuIO(t *testing.T, sock string, cmds ...string) {
	t.Helper()
	qemuIOArgs(t, sock, []string{"-f", "raw"}, cmds...)
}

// qemuIORead runs qemu-io commands against the read-only export at sock.
func qemuIORead(t *testing.T, sock string, cmds ...string) {
	t.Helper()
	qemuIOArgs(t, sock, []string{"-r", "-f", "raw"}, cmds...)
}

func qemuIOArgs(t *testing.T, sock string, args []string, cmds ...string) {
	t.Helper()
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	args = append(args, "nbd+unix:///torus?socket="+sock)
	out, err := runTool(t, 2*time.Minute, "qemu-io", args...)
	if err != nil || strings.Contains(out, "Pattern verification failed") || strings.Contains(out, "failed") {
		t.Fatalf("qemu-io %v: %v\n%s", cmds, err, out)
	}
}

// snapshots returns the volume's snapshots as torusctl lists them.
func (c *testCluster) snapshots(vol string) []meta.Snapshot {
	c.t.Helper()
	var rows []meta.Snapshot
	if err := json.Unmarshal([]byte(c.Ctl("--output", "json", "snapshot", "list", vol)), &rows); err != nil {
		c.t.Fatal(err)
	}
	return rows
}

// Snapshots end to end with real processes: a snapshot of a volume served
// by torusblk (the barrier goes through it), exported read-only by another
// torusblk while the volume is written, backed up with qemu-img convert and
// nbdcopy; a kill -9 of the serving client and of a node during snapshot
// create leaves the snapshot complete or absent; a node that missed writes
// and copies is rebuilt with the snapshot's data; rollback; delete.
func TestClusterSnapshot(t *testing.T) {
	needTool(t, "qemu-img")
	needTool(t, "nbdcopy")
	c := startCluster(t, 3)
	c.Ctl("volume", "create", "db", "--size", "32MiB", "--replication", "2")
	s, sock := c.serve("db", "--lease-ttl", "1s")
	qemuIO(t, sock, "write -P 0xaa 0 16M")
	start := time.Now()
	out := c.Ctl("snapshot", "create", "db@a")
	attached := time.Since(start)
	if !strings.Contains(out, "snapshot db@a taken") {
		t.Fatalf("snapshot create: %s", out)
	}
	qemuIO(t, sock, "write -P 0xbb 0 8M", "write -z 12M 4M")

	// The snapshot, exported read-only while the volume is written.
	rs, rsock := c.serve("db@a", "--read-only")
	if out, err := runTool(t, time.Minute, "nbdinfo", "--can", "write", "nbd+unix:///torus?socket="+rsock); err == nil {
		t.Fatalf("nbdinfo --can write on a snapshot export: %s", out)
	}
	qemuIORead(t, rsock, "read -P 0xaa 0 16M", "read -P 0 16M 16M")
	qemuIO(t, sock, "read -P 0xbb 0 8M", "read -P 0xaa 8M 4M", "read -P 0 12M 20M")
	dir := t.TempDir()
	img := filepath.Join(dir, "a.img")
	if out, err := runTool(t, 2*time.Minute, "qemu-img", "convert", "-f", "raw", "-O", "raw", "nbd+unix:///torus?socket="+rsock, img); err != nil {
		t.Fatalf("qemu-img convert: %v\n%s", err, out)
	}
	raw := filepath.Join(dir, "a.raw")
	if out, err := runTool(t, 2*time.Minute, "nbdcopy", "nbd+unix:///torus?socket="+rsock, raw); err != nil {
		t.Fatalf("nbdcopy: %v\n%s", err, out)
	}
	want := append(bytes.Repeat([]byte{0xaa}, 16<<20), make([]byte, 16<<20)...)
	for _, f := range []string{img, raw} {
		got, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("%s differs from the snapshot's data", f)
		}
	}
	rs.Stop(t)

	// kill -9 of the serving client during snapshot create: complete or
	// absent, never pending.
	ctx := context.Background()
	done := make(chan error, 1)
	go func() {
		_, err := c.Torusctl(ctx, "snapshot", "create", "db@k", "--wait", "3s")
		done <- err
	}()
	time.Sleep(5 * time.Millisecond)
	s.Kill()
	err := <-done
	snaps := c.snapshots("db")
	var k *meta.Snapshot
	for i := range snaps {
		if snaps[i].Name == "k" {
			k = &snaps[i]
		}
	}
	switch {
	case err == nil && (k == nil || k.Pending):
		t.Fatalf("snapshot create succeeded but the snapshot is %+v", k)
	case err != nil && k != nil:
		t.Fatalf("snapshot create failed (%v) but left %+v", err, *k)
	}
	t.Logf("kill -9 of the client during snapshot create: create error %v, snapshot %+v", err, k)

	// kill -9 of a node during snapshot create, with a new client (once
	// the killed one's lease ended).
	deadline := time.Now().Add(20 * time.Second)
	for s, sock = c.tryServe("db", "--replica-timeout", "1s"); s == nil; s, sock = c.tryServe("db", "--replica-timeout", "1s") {
		if time.Now().After(deadline) {
			t.Fatal("no new client could attach within 20 s of the kill")
		}
		time.Sleep(300 * time.Millisecond)
	}
	go func() {
		_, err := c.Torusctl(ctx, "snapshot", "create", "db@n")
		done <- err
	}()
	c.Nodes[2].Proc.Kill()
	err = <-done
	snaps = c.snapshots("db")
	found := false
	for _, sn := range snaps {
		if sn.Name == "n" {
			found = !sn.Pending
			if sn.Pending {
				t.Fatalf("snapshot n left pending: %+v", sn)
			}
		}
	}
	if (err == nil) != found {
		t.Fatalf("snapshot create with a node killed: error %v, snapshot present %v", err, found)
	}
	t.Logf("kill -9 of a node during snapshot create: create error %v", err)

	// The dead node misses writes and head copies; once back it is rebuilt,
	// snapshot copies included: with another node stopped, the snapshot
	// still reads whole.
	c.Ctl("snapshot", "create", "db@b")
	qemuIO(t, sock, "write -P 0xcc 0 32M")
	c.StartNode(c.Nodes[2])
	c.WaitNodes(3)
	deadline = time.Now().Add(60 * time.Second)
	for {
		v, err := c.Meta.Volume(ctx, "db")
		if err != nil {
			t.Fatal(err)
		}
		m, err := c.Meta.Missed(ctx, v.ID)
		if err != nil {
			t.Fatal(err)
		}
		if len(m) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("marks left after 60 s: %v\n%s", m, s.Log())
		}
		time.Sleep(200 * time.Millisecond)
	}
	s.Stop(t)
	c.Nodes[0].Proc.Stop(t)
	rs, rsock = c.serve("db@b", "--read-only")
	qemuIORead(t, rsock, "read -P 0xbb 0 8M", "read -P 0xaa 8M 4M", "read -P 0 12M 20M")
	rs.Stop(t)
	c.StartNode(c.Nodes[0])
	c.WaitNodes(3)

	// Rollback to a, then the snapshots are deleted and the nodes give
	// their copies back.
	out = c.Ctl("volume", "rollback", "db@a", "--tls-dir", c.TLSDir)
	if !strings.Contains(out, "is back at snapshot a") {
		t.Fatalf("rollback: %s", out)
	}
	s, sock = c.serve("db")
	qemuIO(t, sock, "read -P 0xaa 0 16M", "read -P 0 16M 16M")
	s.Stop(t)
	for _, sn := range c.snapshots("db") {
		c.Ctl("snapshot", "delete", "db@"+sn.Name)
	}
	if n := len(c.snapshots("db")); n != 0 {
		t.Fatalf("%d snapshots left after deleting all", n)
	}
	t.Logf("snapshot create attached: %v", attached.Round(time.Millisecond))
}

// Backups by diff: a full export and two incrementals, imported in order
// into another volume, restore it byte-identical to the source at each
// snapshot; an incremental out of order is refused; snapshot diff lists
// the changed extents; a damaged diff is refused before anything is
// written past the damage.
func TestClusterDiffBackup(t *testing.T) {
	needTool(t, "nbdcopy")
	c := startCluster(t, 3)
	c.Ctl("volume", "create", "src", "--size", "16MiB", "--replication", "2")
	c.Ctl("volume", "create", "dst", "--size", "16MiB", "--replication", "2")
	s, sock := c.serve("src")
	qemuIO(t, sock, "write -P 0x11 0 12M")
	c.Ctl("snapshot", "create", "src@s1")
	qemuIO(t, sock, "write -P 0x22 1M 64k", "write -z 4M 1M", "write -P 0x23 15M 4k")
	c.Ctl("snapshot", "create", "src@s2")
	qemuIO(t, sock, "write -P 0x33 8M 8k", "discard 10M 1M")
	c.Ctl("snapshot", "create", "src@s3")
	qemuIO(t, sock, "write -P 0x44 0 16M") // after the last snapshot: in no diff
	s.Stop(t)

	dir := t.TempDir()
	export := func(rng, file string) int64 {
		t.Helper()
		var stdout, stderr bytes.Buffer
		path := filepath.Join(dir, file)
		if code := runWithTimeout(t, []string{"export-diff", rng, path, "--etcd", c.Endpoint, "--tls-dir", c.TLSDir}, &stdout, &stderr); code != 0 {
			t.Fatalf("export-diff %s: exit %d\n%s", rng, code, stderr.String())
		}
		st, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		return st.Size()
	}
	importDiff := func(file string) (int, string) {
		t.Helper()
		var stdout, stderr bytes.Buffer
		code := runWithTimeout(t, []string{"import-diff", filepath.Join(dir, file), "dst", "--etcd", c.Endpoint, "--tls-dir", c.TLSDir}, &stdout, &stderr)
		return code, stderr.String()
	}
	full := export("src@s1", "full")
	inc1 := export("src@s1..@s2", "inc1")
	inc2 := export("src@s2..@s3", "inc2")
	t.Logf("diff sizes: full %d, s1..s2 %d, s2..s3 %d bytes", full, inc1, inc2)
	if inc1 > 2<<20 || inc2 > 1<<20 || full < 12<<20 {
		t.Errorf("diff sizes: full %d, incrementals %d and %d bytes: the incrementals should hold only what changed", full, inc1, inc2)
	}
	if code, msg := importDiff("inc1"); code == 0 || !strings.Contains(msg, "lacks") {
		t.Fatalf("an incremental before the full import: exit %d\n%s", code, msg)
	}
	// A damaged diff: one bit flipped in the data of the full backup.
	b, err := os.ReadFile(filepath.Join(dir, "full"))
	if err != nil {
		t.Fatal(err)
	}
	b[len(b)/2] ^= 1
	if err := os.WriteFile(filepath.Join(dir, "bad"), b, 0o600); err != nil {
		t.Fatal(err)
	}
	if code, msg := importDiff("bad"); code == 0 || !strings.Contains(msg, "checksum mismatch") {
		t.Fatalf("a damaged diff: exit %d\n%s", code, msg)
	}
	for _, f := range []string{"full", "inc1", "inc2"} {
		if code, msg := importDiff(f); code != 0 {
			t.Fatalf("import-diff %s: exit %d\n%s", f, code, msg)
		}
	}
	// Each restored snapshot equals the source's.
	for _, sn := range []string{"s1", "s2", "s3"} {
		var imgs [2][]byte
		for i, vol := range []string{"src", "dst"} {
			rs, rsock := c.serve(vol+"@"+sn, "--read-only")
			out := filepath.Join(dir, vol+"."+sn)
			if o, err := runTool(t, 2*time.Minute, "nbdcopy", "nbd+unix:///torus?socket="+rsock, out); err != nil {
				t.Fatalf("nbdcopy: %v\n%s", err, o)
			}
			rs.Stop(t)
			if imgs[i], err = os.ReadFile(out); err != nil {
				t.Fatal(err)
			}
		}
		if !bytes.Equal(imgs[0], imgs[1]) {
			t.Fatalf("dst@%s differs from src@%s", sn, sn)
		}
	}
	out := c.Ctl("--output", "json", "snapshot", "diff", "src@s2", "src@s3", "--tls-dir", c.TLSDir)
	var d struct {
		Extents []struct {
			Offset, Length int64
			Zero           bool
		}
		ChunksRead int `json:"chunks_read"`
	}
	if err := json.Unmarshal([]byte(out), &d); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	if len(d.Extents) != 2 || d.Extents[0].Offset != 8<<20 || d.Extents[0].Length != 8<<10 || d.Extents[0].Zero ||
		d.Extents[1].Offset != 10<<20 || d.Extents[1].Length != 1<<20 || !d.Extents[1].Zero || d.ChunksRead != 2 {
		t.Fatalf("snapshot diff s2 s3: %s", out)
	}
}

// Clones end to end: a clone of a snapshot is served at once, reads the
// snapshot, takes writes that leave the parent alone; flattened while
// detached (by a storage node's maintenance job), it keeps its data and
// the parent's snapshot can then be deleted.
func TestClusterClone(t *testing.T) {
	c := startCluster(t, 3)
	c.Ctl("volume", "create", "golden", "--size", "16MiB", "--replication", "2")
	s, sock := c.serve("golden")
	qemuIO(t, sock, "write -P 0x61 0 12M")
	c.Ctl("snapshot", "create", "golden@v1")
	qemuIO(t, sock, "write -P 0x62 0 4M")
	s.Stop(t)
	out := c.Ctl("volume", "clone", "golden@v1", "vm1")
	if !strings.Contains(out, "is a clone of golden@v1") {
		t.Fatalf("volume clone: %s", out)
	}
	s, sock = c.serve("vm1")
	qemuIO(t, sock, "read -P 0x61 0 12M", "read -P 0 12M 4M", "write -P 0x63 2M 8k", "write -P 0x63 14M 4k", "discard 8M 1M")
	qemuIO(t, sock, "read -P 0x61 0 2M", "read -P 0x63 2M 8k", "read -P 0x61 2056k 6136k", "read -P 0 8M 1M",
		"read -P 0x61 9M 3M", "read -P 0x63 14M 4k")
	s.Stop(t)
	if out, err := c.Torusctl(context.Background(), "snapshot", "delete", "golden@v1"); err == nil || !strings.Contains(out, "clones vm1") {
		t.Fatalf("delete of a snapshot with a clone: %v\n%s", err, out)
	}
	c.Ctl("volume", "flatten", "vm1")
	deadline := time.Now().Add(60 * time.Second)
	for {
		var v meta.Volume
		if err := json.Unmarshal([]byte(c.Ctl("--output", "json", "volume", "info", "vm1")), &v); err != nil {
			t.Fatal(err)
		}
		if v.Parent == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("vm1 not flattened by the nodes within 60 s:\n%s", c.Ctl("status"))
		}
		time.Sleep(300 * time.Millisecond)
	}
	c.Ctl("snapshot", "delete", "golden@v1")
	s, sock = c.serve("vm1")
	qemuIO(t, sock, "read -P 0x61 0 2M", "read -P 0x63 2M 8k", "read -P 0x61 2056k 6136k", "read -P 0 8M 1M",
		"read -P 0x61 9M 3M", "read -P 0 12M 2M", "read -P 0x63 14M 4k")
	s.Stop(t)
	s, sock = c.serve("golden")
	qemuIO(t, sock, "read -P 0x62 0 4M", "read -P 0x61 4M 8M")
	s.Stop(t)
}
