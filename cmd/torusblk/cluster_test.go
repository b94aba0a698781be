package main

// Multi-process cluster tests: an embedded etcd in the test
// process, three torusd processes on 127.0.0.1, 127.0.0.2 and 127.0.0.3,
// torusctl to make volumes, and torusblk serving a cluster volume over NBD
// to fio and to a small Go NBD client.

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/torus-storage/torus/engine"
	"github.com/torus-storage/torus/internal/alignbuf"
	"github.com/torus-storage/torus/internal/nbdtest"
	"github.com/torus-storage/torus/internal/testcluster"
	"github.com/torus-storage/torus/store"
)

// testCluster is a cluster of torusd processes (testcluster.Cluster) with
// the helpers of these tests.
type testCluster struct {
	*testcluster.Cluster
	t *testing.T
}

// startCluster starts a cluster (R=3, 1 MiB chunks) of n nodes and waits
// until they are all in the ring.
func startCluster(t *testing.T, n int) *testCluster {
	t.Helper()
	c := &testCluster{Cluster: testcluster.NewCluster(t, testcluster.Options{Replication: 3}), t: t}
	c.AddNodes(n)
	return c
}

// serve runs torusblk serve NAME and waits until it accepts NBD connections.
func (c *testCluster) serve(name string, extra ...string) (*testcluster.Proc, string) {
	c.t.Helper()
	p, sock := c.startServe(name, extra...)
	if err := p.AwaitSocket(context.Background(), sock, 20*time.Second); err != nil {
		c.t.Fatalf("%v\n%s", err, p.Log())
	}
	return p, sock
}

// startServe starts torusblk serve NAME on a fresh unix socket.
func (c *testCluster) startServe(name string, extra ...string) (*testcluster.Proc, string) {
	c.t.Helper()
	sock := filepath.Join(c.t.TempDir(), "nbd.sock")
	args := append([]string{"serve", name, "--etcd", c.Endpoint, "--tls-dir", c.TLSDir, "--listen", "unix:" + sock}, extra...)
	return testcluster.StartT(c.t, testcluster.Spec{Name: "torusblk serve " + name, Bin: torusblkBin, Args: args}), sock
}

func fioVerify(t *testing.T, sock string, extra ...string) string {
	t.Helper()
	args := append([]string{"--name=verify", "--ioengine=nbd", "--uri=nbd+unix:///torus?socket=" + sock,
		"--bs=4k", "--verify=crc32c", "--verify_fatal=1", "--verify_state_save=0",
		"--output-format=terse", "--terse-version=3"}, extra...)
	out, err := runTool(t, 5*time.Minute, "fio", args...)
	if err != nil {
		t.Fatalf("fio %v: %v\n%s", extra, err, out)
	}
	f := strings.Split(strings.TrimSpace(out[strings.LastIndex(out, "3;fio"):]), ";")
	if len(f) < 50 || f[4] != "0" || f[6] == "0" {
		t.Fatalf("fio did not verify without error: %s", out)
	}
	return out
}

// TestCluster runs the replicated-volume scenarios on one cluster.
func TestCluster(t *testing.T) {
	needTool(t, "fio")
	c := startCluster(t, 3)
	c.Ctl("volume", "create", "r3", "--size", "256MiB", "--replication", "3")
	c.Ctl("volume", "create", "r2", "--size", "128MiB", "--replication", "2")

	// fio verify through the NBD export of a replicated volume, at QD1 and
	// QD32; the written data stays for the replica checks below.
	fioJob := []string{"--rw=randwrite", "--iodepth=32", "--size=48M", "--do_verify=1", "--number_ios=3000"}
	s, sock := c.serve("r3")
	fioVerify(t, sock, fioJob...)
	fioVerify(t, sock, "--rw=randwrite", "--iodepth=1", "--size=8M", "--offset=64M", "--do_verify=1", "--number_ios=500")

	// A second attach of the same volume is refused while the first holds it.
	var stdout, stderr bytes.Buffer
	code := runWithTimeout(t, []string{"serve", "r3", "--etcd", c.Endpoint, "--tls-dir", c.TLSDir,
		"--listen", "unix:" + filepath.Join(t.TempDir(), "s")}, &stdout, &stderr)
	if code != 1 || !strings.Contains(stderr.String(), "is attached by") {
		t.Fatalf("second attach of r3: exit %d, %q; want exit 1 saying who holds it", code, stderr.String())
	}
	s.Stop(t)

	// A node restart keeps its data and rejoins; the same data verifies
	// afterwards (fio verify_only re-reads what the first job wrote).
	c.Nodes[1].Proc.Stop(t)
	c.StartNode(c.Nodes[1])
	c.WaitNodes(3)
	s, sock = c.serve("r3")
	fioVerify(t, sock, append(fioJob, "--verify_only=1")...)
	s.Stop(t)

	// R=2 volume for the placement check: exactly 2 copies per chunk.
	s, sock = c.serve("r2")
	fioVerify(t, sock, "--rw=randwrite", "--iodepth=16", "--size=32M", "--do_verify=1", "--number_ios=1500")
	s.Stop(t)

	t.Run("Fencing", func(t *testing.T) { testFencing(t, c) })

	// Every written chunk is on exactly R nodes with identical bytes: stop
	// the nodes and read each store directly.
	for _, nd := range c.Nodes {
		nd.Proc.Stop(t)
	}
	ctx := context.Background()
	for _, vc := range []struct {
		name   string
		r      int
		chunks int
		min    int // chunks the fio jobs above wrote (1 MiB chunks)
	}{{"r3", 3, 256, 56}, {"r2", 2, 128, 32}} {
		v, err := c.Meta.Volume(ctx, vc.name)
		if err != nil {
			t.Fatal(err)
		}
		checkReplicas(t, c, v.ID, vc.r, vc.chunks, vc.min)
	}
}

// testFencing: writer A loses its attach lock (stopped past its lease), B
// attaches with a higher epoch and writes; A wakes up and its writes fail
// and change nothing.
func testFencing(t *testing.T, c *testCluster) {
	c.Ctl("volume", "create", "fence", "--size", "16MiB", "--replication", "3")
	a, asock := c.serve("fence", "--lease-ttl", "1s")
	ac, err := nbdtest.DialClient(asock, "torus")
	if err != nil {
		t.Fatalf("%v\n%s", err, a.Log())
	}
	defer ac.Close()
	pat := func(b byte) []byte { return bytes.Repeat([]byte{b}, 4096) }
	if err := <-ac.Write(0, pat('A')); err != nil {
		t.Fatalf("A's first write: %v\n%s", err, a.Log())
	}
	if err := <-ac.Flush(); err != nil {
		t.Fatal(err)
	}
	a.Signal(syscall.SIGSTOP)
	// B attaches once A's lease has expired.
	var b *testcluster.Proc
	var bsock string
	deadline := time.Now().Add(20 * time.Second)
	for {
		b, bsock = c.tryServe("fence")
		if b != nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("B could not attach within 20s of A's lease TTL")
		}
		time.Sleep(300 * time.Millisecond)
	}
	bc, err := nbdtest.DialClient(bsock, "torus")
	if err != nil {
		t.Fatal(err)
	}
	defer bc.Close()
	if err := <-bc.Write(0, pat('B')); err != nil {
		t.Fatalf("B's write: %v\n%s", err, b.Log())
	}
	if err := <-bc.Flush(); err != nil {
		t.Fatal(err)
	}
	a.Signal(syscall.SIGCONT)
	if err := <-ac.Write(0, pat('C')); err == nil {
		if ferr := <-ac.Flush(); ferr == nil {
			t.Fatalf("the fenced writer A could write and flush\n%s", a.Log())
		}
	}
	if err := <-ac.Write(8192, pat('C')); err == nil {
		t.Fatalf("the fenced writer A could write a second time\n%s", a.Log())
	}
	got := make([]byte, 4096)
	if err := <-bc.Read(0, got); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, pat('B')) {
		t.Fatalf("block 0 after the fenced write holds %q..., want B's data", got[:8])
	}
	if err := <-bc.Read(8192, got); err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(got, pat('C')) {
		t.Fatal("the fenced writer's write landed")
	}
	a.Kill()
	b.Stop(t)
}

// tryServe starts torusblk serve NAME and returns nil if it exits (the
// volume is still attached elsewhere).
func (c *testCluster) tryServe(name string, extra ...string) (*testcluster.Proc, string) {
	c.t.Helper()
	p, sock := c.startServe(name, extra...)
	err := p.AwaitSocket(context.Background(), sock, 20*time.Second)
	switch {
	case err == nil:
		return p, sock
	case !errors.Is(err, testcluster.ErrExited):
		c.t.Fatalf("%v\n%s", err, p.Log())
	case !strings.Contains(p.Log(), "is attached by"):
		c.t.Fatalf("torusblk serve %s failed for another reason than the attach lock:\n%s", name, p.Log())
	}
	return nil, ""
}

// checkReplicas opens every node's store and checks that each chunk of
// volume id that exists anywhere exists on exactly r nodes with the same
// bytes, and that some chunks were written at all.
func checkReplicas(t *testing.T, c *testCluster, id uint64, r, chunks, min int) {
	t.Helper()
	var stores []*store.Store
	for _, nd := range c.Nodes {
		st, err := store.OpenStore(filepath.Join(nd.DataDir, "store"), store.StoreOptions{Shards: 1})
		if err != nil {
			t.Fatalf("opening %s's store: %v", nd.ID, err)
		}
		defer st.Close()
		stores = append(stores, st)
	}
	cs := stores[0].ChunkSize()
	bufs := make([][]byte, len(stores))
	for i := range bufs {
		b, err := alignbuf.Alloc(int(cs))
		if err != nil {
			t.Fatal(err)
		}
		defer alignbuf.Free(b)
		bufs[i] = b
	}
	written := 0
	for idx := 0; idx < chunks; idx++ {
		cid := store.ChunkID{Volume: id, Index: uint64(idx)}
		var have []int
		for i, st := range stores {
			if _, ok := st.SlotDataOffset(cid); ok {
				have = append(have, i)
				if err := readChunk(st, cid, bufs[i]); err != nil {
					t.Fatalf("volume %d chunk %d on %s: %v", id, idx, c.Nodes[i].ID, err)
				}
			}
		}
		if len(have) == 0 {
			continue
		}
		written++
		if len(have) != r {
			t.Fatalf("volume %d chunk %d is on %d nodes %v, want exactly %d", id, idx, len(have), have, r)
		}
		for _, i := range have[1:] {
			if !bytes.Equal(bufs[have[0]], bufs[i]) {
				t.Fatalf("volume %d chunk %d differs between %s and %s", id, idx, c.Nodes[have[0]].ID, c.Nodes[i].ID)
			}
		}
	}
	if written < min {
		t.Fatalf("volume %d: only %d of %d chunks written anywhere, want at least %d", id, written, chunks, min)
	}
	t.Logf("volume %d: %d chunks, each on exactly %d nodes with identical bytes", id, written, r)
}

type chanDone chan error

func (c chanDone) CompleteChunk(op *store.ChunkOp, err error) { c <- err }

func readChunk(st *store.Store, id store.ChunkID, buf []byte) error {
	done := make(chanDone, 1)
	op := &store.ChunkOp{Op: engine.OpRead, Chunk: id, Off: 0, Length: int64(len(buf)), Buf: buf, Done: done}
	st.Submit(op)
	return <-done
}

// flipBytes XORs the byte at each of offs in the file at path with mask and
// syncs the file: a corruption the store's checksums must catch.
func flipBytes(t *testing.T, path string, offs []int64, mask byte) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, 1)
	for _, off := range offs {
		if _, err := f.ReadAt(b, off); err != nil {
			t.Fatal(err)
		}
		b[0] ^= mask
		if _, err := f.WriteAt(b, off); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
}
