package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/torus-storage/torus/internal/metrics/metricstest"
	"github.com/torus-storage/torus/internal/testcluster"
	"github.com/torus-storage/torus/meta"
	"github.com/torus-storage/torus/netquic"
)

// Tests run the real binary against a real embedded etcd shared by the
// whole package; each test uses its own --prefix, so they are independent.
var (
	binPath  string
	endpoint string
)

func TestMain(m *testing.M) {
	os.Exit(testcluster.Main(m, testcluster.MainOptions{Build: map[string]*string{"torusd": &binPath}, Etcd: &endpoint}))
}

func prefix(t *testing.T) string { return "/" + t.Name() + "/" }

// newCluster initialises a cluster (R=1, 1 MiB chunks) under prefix pfx of
// the shared etcd, with its CA.
func newCluster(t *testing.T, pfx string) *testcluster.Cluster {
	t.Helper()
	return testcluster.NewCluster(t, testcluster.Options{Endpoint: endpoint, Prefix: pfx, Replication: 1})
}

// start starts torusd with args (TORUS_ETCD unset), its stdout kept apart
// from its log (stderr), which the test's output gets if it fails.
func start(t *testing.T, args ...string) *testcluster.Proc {
	t.Helper()
	return testcluster.StartT(t, testcluster.Spec{Name: "torusd", Bin: binPath, Args: args, Env: []string{"TORUS_ETCD="},
		SeparateStdout: true, StopTimeout: 20 * time.Second, LogOnFailure: true})
}

func nodeArgs(pfx, dataDir, caDir string, extra ...string) []string {
	return append([]string{"--etcd", endpoint, "--prefix", pfx, "--data-dir", dataDir, "--listen", "127.0.0.1:0",
		"--size", "64MiB", "--cluster-dir", caDir, "--lease-ttl", "2s"}, extra...)
}

// chunkCall sends one request in the chunk wire format (see
// internal/wire: volume, index, epoch, offset and length in 4 KiB
// blocks) and returns the status and payload.
func chunkCall(t *testing.T, c *netquic.Client, op uint8, vol, epoch uint64, payload []byte, n int) (uint8, []byte) {
	return chunkCallAt(t, c, op, vol, 0, epoch, payload, n)
}

// chunkCallAt is chunkCall on chunk index idx.
func chunkCallAt(t *testing.T, c *netquic.Client, op uint8, vol, idx, epoch uint64, payload []byte, n int) (uint8, []byte) {
	t.Helper()
	req := netquic.Message{Code: op, Payload: payload}
	binary.LittleEndian.PutUint64(req.Header[0:], vol)
	binary.LittleEndian.PutUint64(req.Header[8:], idx)
	binary.LittleEndian.PutUint64(req.Header[16:], epoch)
	binary.LittleEndian.PutUint16(req.Header[26:], uint16(n/4096))
	resp := netquic.Message{Payload: make([]byte, 0, n)}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := c.Call(ctx, &req, &resp); err != nil {
		t.Fatalf("chunk op %d: %v", op, err)
	}
	return resp.Code, resp.Payload
}

// Ops and statuses of the chunk wire format.
const (
	opRead, opWrite, bogusOp                        uint8 = 1, 2, 99
	statusOK, statusNoSpace, statusStale, statusBad uint8 = 0, 2, 4, 6
	blockSize                                             = 4096
	metricsRe                                             = `msg="serving metrics" addr=(http://[0-9.:]+/metrics)`
)

// sample returns the value of metric name for node in a scrape, as an
// integer when it is one ("67108864", where the text format may say
// 6.7108864e+07).
func sample(t *testing.T, body, name, node string) string {
	t.Helper()
	fams, err := metricstest.Parse(body)
	if err != nil {
		t.Fatalf("%v\n%s", err, body)
	}
	f := fams[name]
	if f == nil || f.Help == "" || f.Type == "" {
		t.Fatalf("metric %s missing or without HELP or TYPE:\n%s", name, body)
	}
	v, ok := f.Value("node", node)
	if !ok {
		t.Fatalf("no sample %s for node %s in:\n%s", name, node, body)
	}
	return strconv.FormatFloat(v, 'f', -1, 64)
}

// TestNode starts a node on a cluster where a volume was attached twice
// (epoch 2), then checks registration, the ring, the fence raised before
// serving, real chunk I/O, the metrics, a clean stop and a restart that
// keeps the node id, the ring version and the data.
func TestNode(t *testing.T) {
	pfx := prefix(t)
	c := newCluster(t, pfx)
	ctx := context.Background()
	vol, err := c.Meta.CreateVolume(ctx, "v", 1<<30, 1)
	if err != nil {
		t.Fatal(err)
	}
	for range 2 {
		l, err := c.Meta.Attach(ctx, "v", "test", 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		l.Release(ctx)
	}

	data := filepath.Join(t.TempDir(), "data")
	p := start(t, nodeArgs(pfx, data, c.CADir, "--metrics", "127.0.0.1:0", "--zone", "z1", "--host", "h1")...)
	metricsURL := p.WaitLog(t, metricsRe)
	addr := p.WaitLog(t, `msg="node ready" node=\S+ addr=(\S+)`)

	nodes, err := c.Meta.Nodes(ctx)
	if err != nil || len(nodes) != 1 || nodes[0].Addr != addr || nodes[0].Capacity != 64<<20 || nodes[0].Zone != "z1" {
		t.Fatalf("Nodes = %+v, %v; want one node at %s with 64 MiB in z1", nodes, err, addr)
	}
	id := nodes[0].ID
	// The unix socket for clients on this host: registered, 0600.
	if want := filepath.Join(data, "node.sock"); nodes[0].Socket != want {
		t.Fatalf("registered socket %q, want %q", nodes[0].Socket, want)
	}
	if fi, err := os.Stat(nodes[0].Socket); err != nil || fi.Mode().Type() != os.ModeSocket || fi.Mode().Perm() != 0o600 {
		t.Fatalf("node socket: %v, %v; want a 0600 socket", fi, err)
	}
	r, _, err := c.Meta.Ring(ctx)
	if err != nil || r.Len() != 1 || r.Node(0).ID != id || r.Node(0).Capacity != 64<<20 || r.Node(0).Host != "h1" {
		t.Fatalf("ring: %d nodes, %+v, %v", r.Len(), r.Node(0), err)
	}
	ringVersion := r.Version()

	// Real chunk I/O with a client certificate of the cluster CA.
	cli := chunkClient(t, c.CADir, addr)
	block := bytes.Repeat([]byte("torus!"), blockSize/6+1)[:blockSize]
	if st, _ := chunkCall(t, cli, opWrite, vol.ID, 1, block, blockSize); st != statusStale {
		t.Fatalf("write with epoch 1 after two attaches: status %d, want stale epoch (%d): fence not raised at start-up",
			st, statusStale)
	}
	// Requests carry fence epochs: the attach epoch in the high 32 bits.
	if st, _ := chunkCall(t, cli, opWrite, vol.ID, 2<<32, block, blockSize); st != statusOK {
		t.Fatalf("write with epoch 2: status %d", st)
	}
	if st, got := chunkCall(t, cli, opRead, vol.ID, 2<<32, nil, blockSize); st != statusOK || !bytes.Equal(got, block) {
		t.Fatalf("read back: status %d, equal %v", st, bytes.Equal(got, block))
	}
	if st, _ := chunkCall(t, cli, bogusOp, vol.ID, 2, nil, 0); st != statusBad {
		t.Fatalf("unknown op: status %d, want %d", st, statusBad)
	}

	body := metricstest.Scrape(t, metricsURL)
	for name, want := range map[string]string{
		"torus_up": "1", "torus_store_slots": "64", "torus_store_slots_used": "1",
		"torus_store_capacity_bytes": "67108864", "torus_node_writes_total": "1", "torus_node_reads_total": "1",
		"torus_node_write_bytes_total": "4096", "torus_node_stale_epoch_total": "1", "torus_node_errors_total": "2",
		"torus_node_no_space_total": "0",
	} {
		if got := sample(t, body, name, id); got != want {
			t.Errorf("%s = %s, want %s", name, got, want)
		}
	}
	if t.Failed() {
		t.Fatalf("metrics:\n%s", body)
	}

	// SIGTERM: the registration is revoked at once; the ring keeps the node.
	p.Stop(t)
	if _, err := os.Lstat(nodes[0].Socket); !os.IsNotExist(err) {
		t.Fatalf("node socket left after SIGTERM: %v", err)
	}
	if nodes, err := c.Meta.Nodes(ctx); err != nil || len(nodes) != 0 {
		t.Fatalf("Nodes after SIGTERM = %+v, %v; want none (lease revoked)", nodes, err)
	}
	if !strings.Contains(p.Log(), `msg="node stopped"`) {
		t.Fatalf("no clean stop logged:\n%s", p.Log())
	}

	// Restart on the same data dir: same id, same ring version, same data.
	p2 := start(t, nodeArgs(pfx, data, c.CADir, "--zone", "z1", "--host", "h1")...)
	addr2 := p2.WaitLog(t, `msg="node ready" node=\S+ addr=(\S+)`)
	nodes, err = c.Meta.Nodes(ctx)
	if err != nil || len(nodes) != 1 || nodes[0].ID != id {
		t.Fatalf("Nodes after restart = %+v, %v; want node %s", nodes, err, id)
	}
	if r, _, err := c.Meta.Ring(ctx); err != nil || r.Version() != ringVersion || r.Len() != 1 {
		t.Fatalf("ring after restart: v%d (was v%d), %d nodes, %v", r.Version(), ringVersion, r.Len(), err)
	}
	cli2 := chunkClient(t, c.CADir, addr2)
	if st, got := chunkCall(t, cli2, opRead, vol.ID, 2<<32, nil, blockSize); st != statusOK || !bytes.Equal(got, block) {
		t.Fatalf("read after restart: status %d, equal %v", st, bytes.Equal(got, block))
	}
	p2.Stop(t)
}

// TestRefusals checks the start-up errors a user can run into.
func TestRefusals(t *testing.T) {
	a := newCluster(t, prefix(t)+"a/")
	b := newCluster(t, prefix(t)+"b/")
	data := filepath.Join(t.TempDir(), "data")
	p := start(t, nodeArgs(prefix(t)+"a/", data, a.CADir, "--id", "n1")...)
	p.WaitLog(t, `msg="node ready"`)
	p.Stop(t)

	fails := func(code int, want string, args ...string) {
		t.Helper()
		p := start(t, args...)
		if got := p.WaitExit(t); got != code || !strings.Contains(p.Log(), want) {
			t.Fatalf("torusd %q: exit %d, stderr:\n%s\nwant exit %d with %q", args, got, p.Log(), code, want)
		}
	}
	// A data dir of cluster a on cluster b: both ids named.
	fails(1, fmt.Sprintf("belongs to cluster %s, but etcd holds cluster %s", a.Config.ClusterID, b.Config.ClusterID),
		nodeArgs(prefix(t)+"b/", data, b.CADir)...)
	fails(1, "belongs to node n1, not --id n2", nodeArgs(prefix(t)+"a/", data, a.CADir, "--id", "n2")...)
	// A smaller store than the existing one.
	fails(1, "--size 32 MiB is smaller than the existing store", nodeArgs(prefix(t)+"a/", data, a.CADir, "--size", "32MiB")...)
	fails(1, "run 'torusctl --etcd "+endpoint+" init --cluster-dir DIR' first",
		nodeArgs(prefix(t)+"none/", t.TempDir(), a.CADir)...)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := "http://" + l.Addr().String()
	l.Close()
	fails(1, "is etcd running at "+dead+"? start one, or use 'torusd dev'",
		"--etcd", dead, "--data-dir", t.TempDir(), "--listen", "127.0.0.1:0", "--size", "1GiB", "--cluster-dir", a.CADir)
	fails(2, "--size", nodeArgs(prefix(t)+"a/", t.TempDir(), a.CADir, "--size", "lots")...)
	fails(2, "--data-dir, --listen required", "--etcd", endpoint, "--size", "1GiB", "--cluster-dir", a.CADir)
	fails(2, "exactly one of --cluster-dir", "--etcd", endpoint, "--data-dir", "d", "--listen", ":1", "--size", "1GiB")
	fails(2, "pass --advertise", nodeArgs(prefix(t)+"a/", t.TempDir(), a.CADir, "--listen", "0.0.0.0:0")...)
	// A chunk size no node store takes, refused before anything starts.
	fails(2, "--chunk-size 4MiB: a power of two from 64KiB to 2MiB", "dev", "--data-dir", t.TempDir(), "--chunk-size", "4MiB")
	ro := filepath.Join(t.TempDir(), "ro")
	os.Mkdir(ro, 0o500)
	if os.Geteuid() != 0 { // root writes anywhere: the next case covers it
		fails(1, "is not writable", nodeArgs(prefix(t)+"a/", ro, a.CADir)...)
	}
	file := filepath.Join(t.TempDir(), "file")
	os.WriteFile(file, nil, 0o600)
	fails(1, "pick a --data-dir you can write", nodeArgs(prefix(t)+"a/", filepath.Join(file, "d"), a.CADir)...)
	// The port of a running node.
	p = start(t, nodeArgs(prefix(t)+"a/", data, a.CADir)...)
	addr := p.WaitLog(t, `msg="node ready" node=\S+ addr=(\S+)`)
	fails(1, "the port is in use", nodeArgs(prefix(t)+"a/", t.TempDir(), a.CADir, "--listen", addr)...)
	p.Stop(t)
}

// TestDev starts a three-node dev cluster, checks what it prints and
// registers, and restarts it on the same directory.
func TestDev(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	var firstIDs []string
	for round := range 2 {
		p := start(t, "dev", "--nodes", "3", "--data-dir", dir, "--etcd-listen", "127.0.0.1:0", "--size", "64MiB")
		p.WaitLog(t, `msg="dev cluster ready"`)
		// stdout and stderr are two pipes copied apart: the lines printed
		// before the log line may still be on their way.
		lines := p.WaitStdout(t, 2)
		if len(lines) != 2 || !strings.HasPrefix(lines[0], "etcd: http://127.0.0.1:") ||
			lines[1] != "tls: "+filepath.Join(dir, "client") {
			t.Fatalf("round %d: stdout %q", round, p.Stdout())
		}
		ep := strings.TrimPrefix(lines[0], "etcd: ")
		ms, err := meta.Open(ctx, []string{ep}, "", meta.Options{})
		if err != nil {
			t.Fatal(err)
		}
		nodes, err := ms.Nodes(ctx)
		if err != nil || len(nodes) != 3 {
			t.Fatalf("round %d: Nodes = %+v, %v", round, nodes, err)
		}
		r, _, err := ms.Ring(ctx)
		if err != nil || r.Len() != 3 || r.Hosts() != 3 || r.Version() != 3 {
			t.Fatalf("round %d: ring of %d nodes on %d hosts, v%d, %v; want 3 on 3, v3", round, r.Len(), r.Hosts(), r.Version(), err)
		}
		cfg, err := ms.Config(ctx)
		if err != nil || cfg.Replication != 3 {
			t.Fatalf("round %d: config %+v, %v", round, cfg, err)
		}
		var ids []string
		for _, n := range nodes {
			ids = append(ids, n.ID+"@"+n.Addr)
		}
		if round == 0 {
			firstIDs = ids
		} else if fmt.Sprint(ids) != fmt.Sprint(firstIDs) {
			t.Fatalf("nodes after restart %v, before %v", ids, firstIDs)
		}
		// The client TLS dir talks to a node.
		tc, err := netquic.LoadTLS(filepath.Join(dir, "client"))
		if err != nil {
			t.Fatal(err)
		}
		cli, err := netquic.NewClient(nodes[0].Addr, tc.Client, nil)
		if err != nil {
			t.Fatal(err)
		}
		if st, _ := chunkCall(t, cli, opRead, 1, 0, nil, blockSize); st != statusOK {
			t.Fatalf("round %d: read of an absent chunk: status %d", round, st)
		}
		cli.Close()
		ms.Close()
		p.Signal(syscall.SIGINT)
		if code := p.WaitExit(t); code != 0 {
			t.Fatalf("round %d: exit %d after SIGINT\n%s", round, code, p.Log())
		}
	}
}

// TestKillRestart kills a node with SIGKILL and restarts it at once: the
// new process waits for the old lease to expire, then registers with the
// same id, and its store recovers.
func TestKillRestart(t *testing.T) {
	pfx := prefix(t)
	c := newCluster(t, pfx)
	data := filepath.Join(t.TempDir(), "data")
	p := start(t, nodeArgs(pfx, data, c.CADir, "--id", "k1")...)
	p.WaitLog(t, `msg="node ready"`)
	p.Kill()

	p2 := start(t, nodeArgs(pfx, data, c.CADir, "--id", "k1")...)
	p2.WaitLog(t, `msg="waiting for the previous lease of this node to expire"`)
	p2.WaitLog(t, `msg="node ready"`)
	nodes, err := c.Meta.Nodes(context.Background())
	if err != nil || len(nodes) != 1 || nodes[0].ID != "k1" {
		t.Fatalf("Nodes after kill and restart = %+v, %v", nodes, err)
	}
	p2.Stop(t)
}

// TestNoSpace fills a two-chunk node: the third chunk's write is refused
// with the no-space status, and the metric counts it.
func TestNoSpace(t *testing.T) {
	pfx := prefix(t)
	c := newCluster(t, pfx)
	p := start(t, nodeArgs(pfx, t.TempDir(), c.CADir, "--id", "s1", "--size", "2MiB", "--metrics", "127.0.0.1:0")...)
	url := p.WaitLog(t, metricsRe)
	addr := p.WaitLog(t, `msg="node ready" node=\S+ addr=(\S+)`)
	cli := chunkClient(t, c.CADir, addr)
	block := make([]byte, blockSize)
	for idx, want := range []uint8{statusOK, statusOK, statusNoSpace} {
		if st, _ := chunkCallAt(t, cli, opWrite, 7, uint64(idx), 0, block, blockSize); st != want {
			t.Fatalf("write of chunk %d: status %d, want %d", idx, st, want)
		}
	}
	body := metricstest.Scrape(t, url)
	if got := sample(t, body, "torus_node_no_space_total", "s1"); got != "1" {
		t.Fatalf("torus_node_no_space_total = %s, want 1\n%s", got, body)
	}
	if got := sample(t, body, "torus_store_slots_used", "s1"); got != "2" {
		t.Fatalf("torus_store_slots_used = %s, want 2", got)
	}
	p.Stop(t)
}

// chunkClient dials the node at addr with a client certificate of the CA
// in caDir; the client is closed when the test ends.
func chunkClient(t *testing.T, caDir, addr string) *netquic.Client {
	t.Helper()
	cdir := filepath.Join(t.TempDir(), "client")
	if err := netquic.IssueCert(caDir, "client", []string{"127.0.0.1"}, cdir); err != nil {
		t.Fatal(err)
	}
	tc, err := netquic.LoadTLS(cdir)
	if err != nil {
		t.Fatal(err)
	}
	cli, err := netquic.NewClient(addr, tc.Client, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	return cli
}

// TestHelpAndUsage: --help, -h and help print the usage and the flags to
// stdout and exit 0; a usage error prints the error and the usage to
// stderr and exits 2.
func TestHelpAndUsage(t *testing.T) {
	for _, args := range [][]string{{"--help"}, {"-h"}, {"help"}, {"dev", "--help"}, {"help", "dev"}} {
		p := start(t, args...)
		if code := p.WaitExit(t); code != 0 || p.Log() != "" || !strings.Contains(p.Stdout(), "torusd dev --nodes 3 --data-dir DIR") {
			t.Errorf("torusd %q: exit %d, stderr %q, stdout:\n%s", args, code, p.Log(), p.Stdout())
		}
		wantFlag := "--cluster-dir CADIR"
		if args[len(args)-1] == "dev" || args[0] == "dev" {
			wantFlag = "--etcd-listen HOST:PORT"
		}
		if !strings.Contains(p.Stdout(), wantFlag) {
			t.Errorf("torusd %q: no %q in the flags:\n%s", args, wantFlag, p.Stdout())
		}
	}
	for _, args := range [][]string{{"--nope"}, {"dev", "--nope"}, {"bogus"}, {"dev", "--size", "lots"}, {"dev"}} {
		p := start(t, args...)
		if code := p.WaitExit(t); code != 2 || p.Stdout() != "" || !strings.Contains(p.Log(), "usage: ") ||
			!strings.Contains(p.Log(), "\nUsage:\n  torusd ") {
			t.Errorf("torusd %q: exit %d, stdout %q, stderr:\n%s", args, code, p.Stdout(), p.Log())
		}
	}
}
