//go:build faults

package main

// The fault-injection suite (`make test-faults`, part of
// `make test`). Every case starts its own cluster with the helpers of
// cluster_test.go and internal/testcluster (an embedded etcd in the test
// process, three torusd processes on 127.0.0.1-3, torusctl, `torusblk serve
// NAME` on a unix socket) and checks with fio (verify=crc32c,
// verify_fatal) before, during and after the fault that no acknowledged data
// is lost:
//
//   - TestFaultClientKill: kill -9 of torusblk serve in the middle of
//     writes, then a re-attach: the data fio verified before, and every block
//     the Go NBD client saw flushed before the kill, read back intact.
//   - TestFaultCorruptChunk: one node's store file gets a flipped byte in
//     every chunk of a volume (at store.Store.SlotDataOffset, found with
//     the node stopped); reads prefer that node (--local-node) and fail over,
//     so fio verify passes.
//   - TestFaultDiskFull: one node has a tiny --size; once another volume
//     filled it, writes to new chunks fail with ENOSPC through NBD, while
//     writes to chunks that already have a slot and all existing data keep
//     working; after `torusctl volume delete` of the volume that filled it,
//     writes to new chunks succeed again without a restart.
//   - TestFaultEtcdOutage: etcd is stopped for 60 s while a volume is
//     served: fio keeps writing and verifying, torusctl says etcd is
//     unreachable, and after etcd is back everything written verifies.
//
// This file is built only with -tags faults: it sets GOFLAGS so that the
// torusd, torusctl and torusblk binaries the tests build carry the netquic
// fault hook (netquic/faults.go) too. The cases with degraded-mode writes
// (kill -9 of a node mid-write, a partitioned node, two nodes lost in turn)
// are in faults_degraded_test.go.

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/torus-storage/torus/engine"
	"github.com/torus-storage/torus/internal/alignbuf"
	"github.com/torus-storage/torus/internal/nbdtest"
	"github.com/torus-storage/torus/internal/testcluster"
	"github.com/torus-storage/torus/store"
)

// init makes every `go build` of this test process (testcluster's builds of
// torusblk, torusd and torusctl) use the faults tag, before TestMain runs.
func init() {
	flags := strings.TrimSpace(os.Getenv("GOFLAGS") + " -tags=faults")
	if err := os.Setenv("GOFLAGS", flags); err != nil {
		panic(err)
	}
}

// fioRegion is a sequential fio write job over [off, off+size) with verify:
// every block is written once with a crc32c header, so the same job with
// verify_only re-reads and checks all of it later.
func fioRegion(off, size string, extra ...string) []string {
	return append([]string{"--rw=write", "--iodepth=16", "--offset=" + off, "--size=" + size}, extra...)
}

// fioWriteVerify writes the region and verifies it in the same run.
func fioWriteVerify(t *testing.T, sock, off, size string) {
	t.Helper()
	fioVerify(t, sock, fioRegion(off, size, "--do_verify=1")...)
}

// fioVerifyOnly re-reads and checks a region written by fioWriteVerify.
func fioVerifyOnly(t *testing.T, sock, off, size string) {
	t.Helper()
	fioVerify(t, sock, fioRegion(off, size, "--verify_only=1")...)
}

// block is a 4 KiB pattern naming its offset and a generation, so a block
// read back proves which write it came from.
func block(off uint64, gen uint32) []byte {
	b := make([]byte, 4096)
	for i := 0; i < len(b); i += 16 {
		binary.LittleEndian.PutUint64(b[i:], off)
		binary.LittleEndian.PutUint32(b[i+8:], gen)
		binary.LittleEndian.PutUint32(b[i+12:], 0x70727573)
	}
	return b
}

// reattach serves name again once the attach lock of a killed holder has
// expired.
func (c *testCluster) reattach(name string, extra ...string) (*testcluster.Proc, string) {
	c.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		p, sock := c.tryServe(name, extra...)
		if p != nil {
			return p, sock
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("%s could not be attached again within 30s of its holder's death", name)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// TestFaultClientKill: kill -9 of the client mid-write, then re-attach.
func TestFaultClientKill(t *testing.T) {
	needTool(t, "fio")
	c := startCluster(t, 3)
	c.Ctl("volume", "create", "vol", "--size", "64MiB", "--replication", "3")
	s, sock := c.serve("vol", "--lease-ttl", "2s")

	// Before: a verified region.
	fioWriteVerify(t, sock, "0", "16M")

	// During: fio writes one region, the Go client writes and flushes
	// another, and the client process is killed while both are running.
	fio := exec.Command("fio", "--name=during", "--ioengine=nbd", "--uri=nbd+unix:///torus?socket="+sock,
		"--bs=4k", "--rw=randwrite", "--iodepth=16", "--offset=16M", "--size=16M", "--time_based", "--runtime=60")
	var fioOut bytes.Buffer
	fio.Stdout, fio.Stderr = &fioOut, &fioOut
	if err := fio.Start(); err != nil {
		t.Fatal(err)
	}
	defer fio.Process.Kill()
	cl, err := nbdtest.DialClient(sock, "torus")
	if err != nil {
		t.Fatal(err)
	}
	const base, batch = 32 << 20, 8
	flushed := 0 // blocks [base, base+flushed*4K) are acknowledged by a flush
	var writeErr error
	for flushed < 4096 && writeErr == nil {
		for i := range batch {
			off := uint64(base + (flushed+i)*4096)
			if writeErr = <-cl.Write(off, block(off, 1)); writeErr != nil {
				break
			}
		}
		if writeErr == nil {
			if writeErr = <-cl.Flush(); writeErr == nil {
				flushed += batch
			}
		}
		if flushed == 256 {
			// Enough is flushed and fio is writing: kill the client.
			s.Signal(os.Kill)
		}
	}
	cl.Close()
	if writeErr == nil {
		t.Fatalf("writes kept succeeding after kill -9 of torusblk serve")
	}
	if err := fio.Wait(); err == nil {
		t.Fatalf("fio kept running without error through kill -9 of its server:\n%s", fioOut.String())
	}
	t.Logf("%d blocks flushed before the kill; the next write failed with %v", flushed, writeErr)

	// After: a new holder attaches once the old lease expired; everything
	// verified or flushed before the kill is intact, and new writes verify.
	s, sock = c.reattach("vol")
	fioVerifyOnly(t, sock, "0", "16M")
	cl, err = nbdtest.DialClient(sock, "torus")
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 4096)
	for i := range flushed {
		off := uint64(base + i*4096)
		if err := <-cl.Read(off, got); err != nil {
			t.Fatalf("reading flushed block at %d: %v", off, err)
		}
		if !bytes.Equal(got, block(off, 1)) {
			t.Fatalf("block at %d was flushed before the kill but reads back %x...", off, got[:16])
		}
	}
	cl.Close()
	fioWriteVerify(t, sock, "16M", "16M")
	s.Stop(t)
}

// volumeChunks returns the chunk ids of volume name that have a slot in st.
func volumeChunks(t *testing.T, c *testCluster, st *store.Store, name string, chunks int) []store.ChunkID {
	t.Helper()
	v, err := c.Meta.Volume(context.Background(), name)
	if err != nil {
		t.Fatal(err)
	}
	var ids []store.ChunkID
	for i := range chunks {
		id := store.ChunkID{Volume: v.ID, Index: uint64(i)}
		if _, ok := st.SlotDataOffset(id); ok {
			ids = append(ids, id)
		}
	}
	return ids
}

// TestFaultCorruptChunk: a flipped byte on one replica is detected and
// read around.
func TestFaultCorruptChunk(t *testing.T) {
	needTool(t, "fio")
	c := startCluster(t, 3)
	c.Ctl("volume", "create", "vol", "--size", "32MiB", "--replication", "3")
	bad := c.Nodes[0]
	s, sock := c.serve("vol", "--local-node", bad.ID)
	fioWriteVerify(t, sock, "0", "8M")
	s.Stop(t)

	// The fault: with the node stopped, flip one byte in the first block of
	// every chunk of the volume in its store file.
	bad.Proc.Stop(t)
	storePath := filepath.Join(bad.DataDir, "store")
	st, err := store.OpenStore(storePath, store.StoreOptions{Shards: 1})
	if err != nil {
		t.Fatal(err)
	}
	ids := volumeChunks(t, c, st, "vol", 32)
	var offs []int64
	for _, id := range ids {
		off, _ := st.SlotDataOffset(id)
		offs = append(offs, off+100)
	}
	st.Close()
	if len(ids) < 8 {
		t.Fatalf("%s holds %d chunks of the volume, want at least the 8 fio wrote", bad.ID, len(ids))
	}
	flipBytes(t, storePath, offs, 0xff)
	// The store itself sees the damage: every corrupted chunk fails to read.
	st, err = store.OpenStore(storePath, store.StoreOptions{Shards: 1})
	if err != nil {
		t.Fatal(err)
	}
	buf, err := alignbuf.Alloc(int(st.ChunkSize()))
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range ids {
		if err := readChunk(st, id, buf); !errors.Is(err, engine.ErrChecksum) {
			t.Fatalf("reading corrupted chunk %d on %s: %v, want a checksum error", id.Index, bad.ID, err)
		}
	}
	alignbuf.Free(buf)
	st.Close()

	// During: the node serves again with bad copies; reads prefer it and
	// must fail over to the good replicas.
	c.StartNode(bad)
	c.WaitNodes(3)
	s, sock = c.serve("vol", "--local-node", bad.ID)
	fioVerifyOnly(t, sock, "0", "8M")
	if !strings.Contains(bad.Proc.Log(), "checksum") {
		t.Fatalf("fio verified, but %s never reported a checksum error: the reads did not touch the corrupted copies\n%s", bad.ID, bad.Proc.Log())
	}
	// After: new writes verify, the old data still does.
	fioWriteVerify(t, sock, "8M", "8M")
	fioVerifyOnly(t, sock, "0", "8M")
	s.Stop(t)
	if bad.Proc.Exited() {
		t.Fatalf("%s exited while serving corrupted chunks:\n%s", bad.ID, bad.Proc.Log())
	}
}

// startSmallNode adds storage node i with a store of size bytes.
func (c *testCluster) startSmallNode(i int, size string) *testcluster.Node {
	c.t.Helper()
	nd := c.NewNode(i)
	nd.Size = size
	c.StartNode(nd)
	return nd
}

const errNoSpace = "nbd error 28" // ENOSPC as nbdtest.Client reports it

// TestFaultDiskFull: a full node refuses new chunks with ENOSPC and nothing
// else breaks.
func TestFaultDiskFull(t *testing.T) {
	needTool(t, "fio")
	c := startCluster(t, 2)
	small := c.startSmallNode(3, "8MiB")
	c.WaitNodes(3)
	c.Ctl("volume", "create", "data", "--size", "64MiB", "--replication", "3")
	c.Ctl("volume", "create", "filler", "--size", "64MiB", "--replication", "3")

	// Before: data gets 3 verified chunks and one more chunk (3) holding a
	// block written by the Go client.
	ds, dsock := c.serve("data")
	fioWriteVerify(t, dsock, "0", "3M")
	dcl, err := nbdtest.DialClient(dsock, "torus")
	if err != nil {
		t.Fatal(err)
	}
	defer dcl.Close()
	if err := <-dcl.Write(3<<20, block(3<<20, 1)); err != nil {
		t.Fatalf("write to chunk 3 of data: %v\n%s", err, ds.Log())
	}

	// The fault: filler takes every remaining slot of the small node, one
	// block per chunk, until a write fails with ENOSPC.
	fs, fsock := c.serve("filler")
	fcl, err := nbdtest.DialClient(fsock, "torus")
	if err != nil {
		t.Fatal(err)
	}
	defer fcl.Close()
	filled := 0
	for ; filled < 64; filled++ {
		off := uint64(filled) << 20
		err := <-fcl.Write(off, block(off, 1))
		if err == nil {
			continue
		}
		if !strings.Contains(err.Error(), errNoSpace) {
			t.Fatalf("write to filler chunk %d: %v, want ENOSPC", filled, err)
		}
		break
	}
	if filled == 64 || filled == 0 {
		t.Fatalf("filler wrote %d chunks before ENOSPC; the 8 MiB node should have filled in between", filled)
	}
	t.Logf("the small node filled after %d chunks of filler", filled)

	// During: a new chunk of data fails with ENOSPC, every time; a chunk
	// that has its slot takes writes; the verified data still verifies and
	// the filler's blocks read back.
	for range 2 {
		if err := <-dcl.Write(32<<20, block(32<<20, 1)); err == nil || !strings.Contains(err.Error(), errNoSpace) {
			t.Fatalf("write to a new chunk of data on a full node: %v, want ENOSPC", err)
		}
	}
	if err := <-dcl.Write(3<<20+4096, block(3<<20+4096, 2)); err != nil {
		t.Fatalf("write to chunk 3 of data, which has its slot on every node: %v", err)
	}
	if err := <-dcl.Flush(); err != nil {
		t.Fatalf("flush on data after the node filled: %v", err)
	}
	got := make([]byte, 4096)
	for _, w := range []struct {
		cl  *nbdtest.Client
		off uint64
		gen uint32
	}{{dcl, 3 << 20, 1}, {dcl, 3<<20 + 4096, 2}, {fcl, 0, 1}, {fcl, uint64(filled-1) << 20, 1}} {
		if err := <-w.cl.Read(w.off, got); err != nil {
			t.Fatalf("read at %d: %v", w.off, err)
		}
		if !bytes.Equal(got, block(w.off, w.gen)) {
			t.Fatalf("block at %d reads back %x..., want generation %d", w.off, got[:16], w.gen)
		}
	}
	fioVerifyOnly(t, dsock, "0", "3M")
	// status and node list show it.
	waitStatus(t, c, func(out string) bool {
		return strings.Contains(out, "OUT OF SPACE:") && strings.Contains(out, small.ID)
	},
		"torusctl status to name the full node")
	if out := c.Ctl("node", "list"); !strings.Contains(out, "out of space") {
		t.Fatalf("node list does not show the full node:\n%s", out)
	}

	// After: deleting filler frees the small node's slots without a
	// restart (torusd's collector discards chunks of deleted volumes):
	// the write to a new chunk that failed succeeds, new chunks verify, and
	// the old data still does, also through a fresh attach.
	fcl.Close()
	fs.Stop(t)
	c.Ctl("volume", "delete", "filler")
	deadline := time.Now().Add(30 * time.Second)
	for {
		err := <-dcl.Write(32<<20, block(32<<20, 1))
		if err == nil {
			break
		}
		if !strings.Contains(err.Error(), errNoSpace) {
			t.Fatalf("write to a new chunk of data after deleting filler: %v", err)
		}
		if time.Now().After(deadline) {
			t.Fatalf("writes to new chunks still fail with ENOSPC 30 s after deleting the volume that filled the node\n%s", small.Proc.Log())
		}
		time.Sleep(200 * time.Millisecond)
	}
	waitStatus(t, c, func(out string) bool { return !strings.Contains(out, "OUT OF SPACE") },
		"torusctl status to stop reporting the node full after space was freed")
	fioWriteVerify(t, dsock, "33M", "3M")
	dcl.Close()
	ds.Stop(t)
	if small.Proc.Exited() {
		t.Fatalf("the full node exited:\n%s", small.Proc.Log())
	}
	ds, dsock = c.serve("data")
	fioVerifyOnly(t, dsock, "0", "3M")
	fioVerifyOnly(t, dsock, "33M", "3M")
	ds.Stop(t)
}

// waitStatus polls torusctl status for up to 30 s until ok accepts it.
func waitStatus(t *testing.T, c *testCluster, ok func(string) bool, what string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		out := c.Ctl("status")
		if ok(out) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("waited 30 s for %s:\n%s", what, out)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// TestFaultEtcdOutage: a served volume keeps working through 60 s without
// etcd, torusctl says etcd is unreachable, and all is well once it is back.
func TestFaultEtcdOutage(t *testing.T) {
	needTool(t, "fio")
	c := startCluster(t, 3)
	c.Ctl("volume", "create", "vol", "--size", "128MiB", "--replication", "3")
	s, sock := c.serve("vol")
	fioWriteVerify(t, sock, "0", "8M")

	// The fault: etcd stops (the embedded server in this process; its data
	// directory and client URL are reused for the restart).
	c.StopEtcd()
	down := time.Now()

	out, err := c.Torusctl(context.Background(), "status")
	if err == nil || !strings.Contains(string(out), "unreachable") {
		t.Fatalf("torusctl status with etcd down: %v\n%s\nwant an error saying etcd is unreachable", err, out)
	}
	// During: 60 s of fio write+verify rounds on fresh 2 MiB regions.
	rounds := 0
	for off := 8 << 20; time.Since(down) < 60*time.Second; off += 2 << 20 {
		if off+(2<<20) > 128<<20 {
			off = 8 << 20
		}
		fioWriteVerify(t, sock, fmt.Sprint(off), "2M")
		rounds++
	}
	for _, nd := range c.Nodes {
		if nd.Proc.Exited() {
			t.Fatalf("%s exited during the etcd outage:\n%s", nd.ID, nd.Proc.Log())
		}
	}
	if s.Exited() {
		t.Fatalf("torusblk serve exited during the etcd outage:\n%s", s.Log())
	}
	t.Logf("%d fio write+verify rounds during %v of etcd downtime", rounds, time.Since(down).Round(time.Second))

	// After: etcd is back on the same data and URL; torusctl answers, the
	// data written before the outage verifies, and new writes verify.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := c.RestartEtcd(ctx); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		out, err := c.Torusctl(context.Background(), "status")
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("torusctl status 30s after etcd came back: %v\n%s", err, out)
		}
		time.Sleep(200 * time.Millisecond)
	}
	// Not waited for here: the nodes' registrations. Their etcd clients
	// reconnect on gRPC's default backoff (up to 120 s between attempts),
	// so after a 60 s outage that may take longer than this case may last.
	fioVerifyOnly(t, sock, "0", "8M")
	fioWriteVerify(t, sock, "100M", "8M")
	for _, nd := range c.Nodes {
		if nd.Proc.Exited() {
			t.Fatalf("%s exited after etcd came back:\n%s", nd.ID, nd.Proc.Log())
		}
	}
	// Not checked here: a clean SIGTERM exit of serve after the outage. Its
	// attach lease ended during the outage and the revoke at exit does not
	// reach etcd within its 5 s (see faults_degraded_test.go.draft).
	s.Kill()
}
