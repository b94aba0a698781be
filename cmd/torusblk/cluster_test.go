package main

// Multi-process cluster tests: an embedded etcd in the test
// process, three torusd processes on 127.0.0.1, 127.0.0.2 and 127.0.0.3,
// torusctl to make volumes, and torusblk serving a cluster volume over NBD
// to fio and to a small Go NBD client.

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/torus-storage/torus/engine"
	"github.com/torus-storage/torus/internal/alignbuf"
	"github.com/torus-storage/torus/internal/devetcd"
	"github.com/torus-storage/torus/internal/nbdtest"
	"github.com/torus-storage/torus/meta"
	"github.com/torus-storage/torus/netquic"
	"github.com/torus-storage/torus/store"
)

var (
	clusterBinsOnce sync.Once
	clusterBinsErr  error
	torusdBin       string
	torusctlBin     string
)

// clusterBins builds torusd and torusctl next to the torusblk binary.
func clusterBins(t *testing.T) {
	t.Helper()
	clusterBinsOnce.Do(func() {
		dir := filepath.Dir(torusblkBin)
		torusdBin, torusctlBin = filepath.Join(dir, "torusd"), filepath.Join(dir, "torusctl")
		for bin, pkg := range map[string]string{torusdBin: "../torusd", torusctlBin: "../torusctl"} {
			if out, err := exec.Command("go", "build", "-o", bin, pkg).CombinedOutput(); err != nil {
				clusterBinsErr = fmt.Errorf("building %s: %v\n%s", pkg, err, out)
				return
			}
		}
	})
	if clusterBinsErr != nil {
		t.Fatal(clusterBinsErr)
	}
}

// proc is a child process whose stderr is kept for failure messages.
type proc struct {
	name string
	cmd  *exec.Cmd
	log  *syncBuffer
	done chan error
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func startProc(t *testing.T, name, bin string, args ...string) *proc {
	t.Helper()
	p := &proc{name: name, cmd: exec.Command(bin, args...), log: new(syncBuffer), done: make(chan error, 1)}
	p.cmd.Stderr = p.log
	p.cmd.Stdout = p.log
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("starting %s: %v", name, err)
	}
	go func() { p.done <- p.cmd.Wait() }()
	t.Cleanup(func() { p.kill() })
	return p
}

func (p *proc) exited() bool {
	select {
	case err := <-p.done:
		p.done <- err
		return true
	default:
		return false
	}
}

// stop sends SIGTERM and requires a clean exit.
func (p *proc) stop(t *testing.T) {
	t.Helper()
	if p.cmd.ProcessState != nil {
		return
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-p.done:
		p.done <- err
		if err != nil {
			t.Fatalf("%s exited with %v after SIGTERM\n%s", p.name, err, p.log)
		}
	case <-time.After(30 * time.Second):
		p.cmd.Process.Kill()
		t.Fatalf("%s did not exit within 30s of SIGTERM\n%s", p.name, p.log)
	}
}

func (p *proc) kill() {
	if p.cmd.ProcessState == nil {
		p.cmd.Process.Signal(syscall.SIGCONT)
		p.cmd.Process.Kill()
		<-p.done
	}
}

// testCluster is an etcd plus storage nodes.
type testCluster struct {
	t       *testing.T
	etcd    *devetcd.Server
	ms      *meta.Client
	caDir   string
	tlsDir  string
	nodes   []*testNode
	workDir string
}

type testNode struct {
	id, dataDir, listen string
	p                   *proc
}

func startCluster(t *testing.T, n int) *testCluster {
	t.Helper()
	clusterBins(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	work := t.TempDir()
	etcd, err := devetcd.Start(ctx, filepath.Join(work, "etcd"), "", "")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(etcd.Close)
	c := &testCluster{t: t, etcd: etcd, caDir: filepath.Join(work, "ca"), tlsDir: filepath.Join(work, "client"), workDir: work}
	c.ctl("init", "--cluster-dir", c.caDir, "--chunk-size", "1MiB", "--replication", "3")
	if err := netquic.IssueCert(c.caDir, "client", []string{"127.0.0.1"}, c.tlsDir); err != nil {
		t.Fatal(err)
	}
	if c.ms, err = meta.Open(ctx, []string{etcd.Endpoint()}, meta.DefaultPrefix, meta.Options{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.ms.Close() })
	for i := 1; i <= n; i++ {
		l, err := net.ListenPacket("udp", fmt.Sprintf("127.0.0.%d:0", i))
		if err != nil {
			t.Fatal(err)
		}
		addr := l.LocalAddr().String()
		l.Close()
		nd := &testNode{id: fmt.Sprintf("node%d", i), dataDir: filepath.Join(work, fmt.Sprintf("node%d", i)), listen: addr}
		c.nodes = append(c.nodes, nd)
		c.startNode(nd)
	}
	c.waitNodes(n)
	return c
}

func (c *testCluster) startNode(nd *testNode) {
	c.t.Helper()
	nd.p = startProc(c.t, nd.id, torusdBin, "--etcd", c.etcd.Endpoint(), "--data-dir", nd.dataDir,
		"--listen", nd.listen, "--size", "512MiB", "--id", nd.id, "--host", nd.id, "--cluster-dir", c.caDir)
}

// waitNodes waits until n nodes are registered and in the ring.
func (c *testCluster) waitNodes(n int) {
	c.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		nodes, err := c.ms.Nodes(ctx)
		r, _, rerr := c.ms.Ring(ctx)
		cancel()
		if err == nil && rerr == nil && len(nodes) == n && r != nil && len(r.Nodes()) >= n {
			return
		}
		for _, nd := range c.nodes {
			if nd.p.exited() {
				c.t.Fatalf("torusd %s exited:\n%s", nd.id, nd.p.log)
			}
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("%d nodes registered (err %v), want %d", len(nodes), err, n)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// ctl runs torusctl and fails the test on error.
func (c *testCluster) ctl(args ...string) string {
	c.t.Helper()
	out, err := exec.Command(torusctlBin, append([]string{"--etcd", c.etcd.Endpoint()}, args...)...).CombinedOutput()
	if err != nil {
		c.t.Fatalf("torusctl %v: %v\n%s", args, err, out)
	}
	return string(out)
}

// serve runs torusblk serve NAME and waits until it accepts NBD connections.
func (c *testCluster) serve(name string, extra ...string) (*proc, string) {
	c.t.Helper()
	sock := filepath.Join(c.t.TempDir(), "nbd.sock")
	args := append([]string{"serve", name, "--etcd", c.etcd.Endpoint(), "--tls-dir", c.tlsDir, "--listen", "unix:" + sock}, extra...)
	p := startProc(c.t, "torusblk serve "+name, torusblkBin, args...)
	deadline := time.Now().Add(20 * time.Second)
	for {
		if conn, err := net.Dial("unix", sock); err == nil {
			conn.Close()
			return p, sock
		}
		if p.exited() {
			c.t.Fatalf("torusblk serve %s exited early:\n%s", name, p.log)
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("torusblk serve %s did not listen within 20s\n%s", name, p.log)
		}
		time.Sleep(20 * time.Millisecond)
	}
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
	c.ctl("volume", "create", "r3", "--size", "256MiB", "--replication", "3")
	c.ctl("volume", "create", "r2", "--size", "128MiB", "--replication", "2")

	// fio verify through the NBD export of a replicated volume, at QD1 and
	// QD32; the written data stays for the replica checks below.
	fioJob := []string{"--rw=randwrite", "--iodepth=32", "--size=48M", "--do_verify=1", "--number_ios=3000"}
	s, sock := c.serve("r3")
	fioVerify(t, sock, fioJob...)
	fioVerify(t, sock, "--rw=randwrite", "--iodepth=1", "--size=8M", "--offset=64M", "--do_verify=1", "--number_ios=500")

	// A second attach of the same volume is refused while the first holds it.
	var stdout, stderr bytes.Buffer
	code := runWithTimeout(t, []string{"serve", "r3", "--etcd", c.etcd.Endpoint(), "--tls-dir", c.tlsDir,
		"--listen", "unix:" + filepath.Join(t.TempDir(), "s")}, &stdout, &stderr)
	if code != 1 || !strings.Contains(stderr.String(), "is attached by") {
		t.Fatalf("second attach of r3: exit %d, %q; want exit 1 saying who holds it", code, stderr.String())
	}
	s.stop(t)

	// A node restart keeps its data and rejoins; the same data verifies
	// afterwards (fio verify_only re-reads what the first job wrote).
	c.nodes[1].p.stop(t)
	c.startNode(c.nodes[1])
	c.waitNodes(3)
	s, sock = c.serve("r3")
	fioVerify(t, sock, append(fioJob, "--verify_only=1")...)
	s.stop(t)

	// R=2 volume for the placement check: exactly 2 copies per chunk.
	s, sock = c.serve("r2")
	fioVerify(t, sock, "--rw=randwrite", "--iodepth=16", "--size=32M", "--do_verify=1", "--number_ios=1500")
	s.stop(t)

	t.Run("Fencing", func(t *testing.T) { testFencing(t, c) })

	// Every written chunk is on exactly R nodes with identical bytes: stop
	// the nodes and read each store directly.
	for _, nd := range c.nodes {
		nd.p.stop(t)
	}
	ctx := context.Background()
	for _, vc := range []struct {
		name   string
		r      int
		chunks int
		min    int // chunks the fio jobs above wrote (1 MiB chunks)
	}{{"r3", 3, 256, 56}, {"r2", 2, 128, 32}} {
		v, err := c.ms.Volume(ctx, vc.name)
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
	c.ctl("volume", "create", "fence", "--size", "16MiB", "--replication", "3")
	a, asock := c.serve("fence", "--lease-ttl", "1s")
	ac, err := nbdtest.DialClient(asock, "torus")
	if err != nil {
		t.Fatalf("%v\n%s", err, a.log)
	}
	defer ac.Close()
	pat := func(b byte) []byte { return bytes.Repeat([]byte{b}, 4096) }
	if err := <-ac.Write(0, pat('A')); err != nil {
		t.Fatalf("A's first write: %v\n%s", err, a.log)
	}
	if err := <-ac.Flush(); err != nil {
		t.Fatal(err)
	}
	a.cmd.Process.Signal(syscall.SIGSTOP)
	// B attaches once A's lease has expired.
	var b *proc
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
		t.Fatalf("B's write: %v\n%s", err, b.log)
	}
	if err := <-bc.Flush(); err != nil {
		t.Fatal(err)
	}
	a.cmd.Process.Signal(syscall.SIGCONT)
	if err := <-ac.Write(0, pat('C')); err == nil {
		if ferr := <-ac.Flush(); ferr == nil {
			t.Fatalf("the fenced writer A could write and flush\n%s", a.log)
		}
	}
	if err := <-ac.Write(8192, pat('C')); err == nil {
		t.Fatalf("the fenced writer A could write a second time\n%s", a.log)
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
	a.kill()
	b.stop(t)
}

// tryServe starts torusblk serve NAME and returns nil if it exits (the
// volume is still attached elsewhere).
func (c *testCluster) tryServe(name string, extra ...string) (*proc, string) {
	c.t.Helper()
	sock := filepath.Join(c.t.TempDir(), "nbd.sock")
	args := append([]string{"serve", name, "--etcd", c.etcd.Endpoint(), "--tls-dir", c.tlsDir, "--listen", "unix:" + sock}, extra...)
	p := startProc(c.t, "torusblk serve "+name, torusblkBin, args...)
	deadline := time.Now().Add(20 * time.Second)
	for {
		if conn, err := net.Dial("unix", sock); err == nil {
			conn.Close()
			return p, sock
		}
		if p.exited() {
			if !strings.Contains(p.log.String(), "is attached by") {
				c.t.Fatalf("torusblk serve %s failed for another reason than the attach lock:\n%s", name, p.log)
			}
			return nil, ""
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("torusblk serve %s did not listen within 20s\n%s", name, p.log)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// checkReplicas opens every node's store and checks that each chunk of
// volume id that exists anywhere exists on exactly r nodes with the same
// bytes, and that some chunks were written at all.
func checkReplicas(t *testing.T, c *testCluster, id uint64, r, chunks, min int) {
	t.Helper()
	var stores []*store.Store
	for _, nd := range c.nodes {
		st, err := store.OpenStore(filepath.Join(nd.dataDir, "store"), store.StoreOptions{Shards: 1})
		if err != nil {
			t.Fatalf("opening %s's store: %v", nd.id, err)
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
					t.Fatalf("volume %d chunk %d on %s: %v", id, idx, c.nodes[i].id, err)
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
				t.Fatalf("volume %d chunk %d differs between %s and %s", id, idx, c.nodes[have[0]].id, c.nodes[i].id)
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
