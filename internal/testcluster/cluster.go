// Package testcluster runs Torus as real processes for tests and the
// benchmark: the commands built once per test binary (Main, BuildOnce,
// Bin), child processes with their output kept (Proc), and a test cluster
// (Cluster): an etcd (embedded in the test process, or one a test binary
// shares), the cluster's configuration and CA, a client TLS dir, and torusd
// node processes on 127.0.0.1, 127.0.0.2, ...
//
// The functions that need no test return errors (Start, Build, BuildOnce,
// Proc.Terminate, Proc.AwaitLog, Proc.AwaitSocket), so that code outside
// tests (bench) shares them; the ones taking a testing.TB fail the test
// instead.
package testcluster

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/torus-storage/torus/internal/devetcd"
	"github.com/torus-storage/torus/meta"
	"github.com/torus-storage/torus/netquic"
)

// Options configure NewCluster.
type Options struct {
	// Endpoint is the etcd to use (Main's shared one, say); empty starts
	// an embedded etcd for this cluster alone.
	Endpoint string
	// Prefix is the cluster's etcd prefix; meta.DefaultPrefix if empty.
	Prefix string
	// ClusterID is the cluster's id; a random one if empty.
	ClusterID string
	// ChunkSize is the placement chunk size; 1 MiB if zero.
	ChunkSize uint64
	// Replication is the default number of copies; 3 if zero.
	Replication int
	// Logger is the meta client's logger; slog's default if nil.
	Logger *slog.Logger
}

// Cluster is an initialised cluster and its torusd nodes.
type Cluster struct {
	// Etcd is the cluster's embedded etcd; nil on a shared one.
	Etcd *devetcd.Server
	// Endpoint is the etcd's client URL.
	Endpoint string
	// Prefix is the cluster's etcd prefix.
	Prefix string
	// Meta is a client of the cluster's etcd, closed when the test ends.
	Meta *meta.Client
	// Config is the cluster's configuration as etcd holds it.
	Config meta.Config
	// Dir holds the cluster's files: etcd's data, the CA, the client TLS
	// dir and the nodes' data dirs.
	Dir string
	// CADir is the cluster CA (the nodes' --cluster-dir).
	CADir string
	// TLSDir holds a client certificate of the CA (a client's --tls-dir).
	TLSDir string
	// Nodes are the nodes made with NewNode, in order.
	Nodes []*Node

	t testing.TB
}

// Node is a storage node of a Cluster: a torusd process.
type Node struct {
	// ID is the node's id and host name (--id, --host).
	ID string
	// DataDir is its --data-dir.
	DataDir string
	// Listen is its --listen address, a UDP port picked on 127.0.0.i.
	Listen string
	// Size is its store's --size.
	Size string
	// Args and Env are more flags and environment for every start.
	Args, Env []string
	// Proc is its current (or last) process; nil before StartNode.
	Proc *Proc
}

// NewCluster makes an initialised cluster without nodes: an embedded etcd
// unless opt names one, the configuration in etcd, a CA and a client TLS
// dir. Everything is stopped and removed when the test ends.
func NewCluster(t testing.TB, opt Options) *Cluster {
	t.Helper()
	dir := t.TempDir()
	c := &Cluster{t: t, Endpoint: opt.Endpoint, Prefix: opt.Prefix, Dir: dir,
		CADir: filepath.Join(dir, "ca"), TLSDir: filepath.Join(dir, "client")}
	if c.Prefix == "" {
		c.Prefix = meta.DefaultPrefix
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if c.Endpoint == "" {
		e, err := devetcd.Start(ctx, c.etcdDir(), "", "")
		if err != nil {
			t.Fatalf("testcluster: %v", err)
		}
		t.Cleanup(e.Close)
		c.Etcd, c.Endpoint = e, e.Endpoint()
	}
	ms, err := meta.Open(ctx, []string{c.Endpoint}, c.Prefix, meta.Options{Logger: opt.Logger})
	if err != nil {
		t.Fatalf("testcluster: %v", err)
	}
	t.Cleanup(func() { ms.Close() })
	c.Meta = ms
	cfg := meta.Config{ClusterID: opt.ClusterID, ChunkSize: opt.ChunkSize, Replication: opt.Replication}
	if cfg.ChunkSize == 0 {
		cfg.ChunkSize = 1 << 20
	}
	if cfg.Replication == 0 {
		cfg.Replication = 3
	}
	if err := ms.Init(ctx, cfg); err != nil {
		t.Fatalf("testcluster: %v", err)
	}
	if c.Config, err = ms.Config(ctx); err != nil {
		t.Fatalf("testcluster: %v", err)
	}
	if err := netquic.NewCA(c.CADir); err != nil {
		t.Fatalf("testcluster: cluster CA: %v", err)
	}
	if err := netquic.IssueCert(c.CADir, "client", []string{"127.0.0.1"}, c.TLSDir); err != nil {
		t.Fatalf("testcluster: client certificate: %v", err)
	}
	return c
}

func (c *Cluster) etcdDir() string { return filepath.Join(c.Dir, "etcd") }

// StopEtcd stops the cluster's embedded etcd (RestartEtcd starts it again).
func (c *Cluster) StopEtcd() { c.Etcd.Close() }

// RestartEtcd starts the cluster's embedded etcd again, on its data and
// client URL, after StopEtcd; it is stopped when the test ends.
func (c *Cluster) RestartEtcd(ctx context.Context) error {
	// A peer port devetcd.Start picks: never the endpoint's.
	e, err := devetcd.Start(ctx, c.etcdDir(), c.Endpoint, "")
	if err != nil {
		return fmt.Errorf("restart etcd at %s: %w", c.Endpoint, err)
	}
	// The restarted server takes the place of the stopped one (whose
	// cleanup's second Close does nothing).
	c.Etcd = e
	c.t.Cleanup(e.Close)
	return nil
}

// flags returns the flags that point a command at the cluster's etcd.
func (c *Cluster) flags() []string {
	f := []string{"--etcd", c.Endpoint}
	if c.Prefix != meta.DefaultPrefix {
		f = append(f, "--prefix", c.Prefix)
	}
	return f
}

// Torusctl runs torusctl on the cluster and returns its combined output.
func (c *Cluster) Torusctl(ctx context.Context, args ...string) (string, error) {
	bin, err := BuildOnce("torusctl")
	if err != nil {
		return "", err
	}
	out, err := exec.CommandContext(ctx, bin, append(c.flags(), args...)...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("torusctl %v: %w", args, err)
	}
	return string(out), nil
}

// Ctl runs torusctl on the cluster and returns its output; it fails the
// test on error.
func (c *Cluster) Ctl(args ...string) string {
	c.t.Helper()
	out, err := c.Torusctl(context.Background(), args...)
	if err != nil {
		c.t.Fatalf("%v\n%s", err, out)
	}
	return out
}

// NewNode adds node i to Nodes, not started: id "node<i>", a free UDP port
// on 127.0.0.i, its data dir under Dir and a 512 MiB store.
func (c *Cluster) NewNode(i int) *Node {
	c.t.Helper()
	l, err := net.ListenPacket("udp", fmt.Sprintf("127.0.0.%d:0", i))
	if err != nil {
		c.t.Fatalf("testcluster: a port for node %d: %v", i, err)
	}
	id := fmt.Sprintf("node%d", i)
	nd := &Node{ID: id, DataDir: filepath.Join(c.Dir, id), Listen: l.LocalAddr().String(), Size: "512MiB"}
	l.Close()
	c.Nodes = append(c.Nodes, nd)
	return nd
}

// StartNode starts torusd for nd, with env added to the environment for
// this start only, and makes it nd.Proc. It does not wait for the node.
func (c *Cluster) StartNode(nd *Node, env ...string) *Proc {
	c.t.Helper()
	args := append(c.flags(), "--data-dir", nd.DataDir, "--listen", nd.Listen, "--size", nd.Size,
		"--id", nd.ID, "--host", nd.ID, "--cluster-dir", c.CADir)
	nd.Proc = StartT(c.t, Spec{Name: nd.ID, Bin: Bin(c.t, "torusd"), Args: append(args, nd.Args...),
		Env: append(append([]string(nil), nd.Env...), env...)})
	return nd.Proc
}

// AddNodes makes and starts n more nodes and waits until every node is
// registered and in the ring.
func (c *Cluster) AddNodes(n int) {
	c.t.Helper()
	for range n {
		c.StartNode(c.NewNode(len(c.Nodes) + 1))
	}
	c.WaitNodes(len(c.Nodes))
}

// WaitNodes waits up to 30 s until n nodes are registered and in the ring;
// it fails the test if a node's process exits meanwhile.
func (c *Cluster) WaitNodes(n int) {
	c.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		nodes, err := c.Meta.Nodes(ctx)
		r, _, rerr := c.Meta.Ring(ctx)
		cancel()
		if err == nil && rerr == nil && len(nodes) == n && r != nil && len(r.Nodes()) >= n {
			return
		}
		for _, nd := range c.Nodes {
			if nd.Proc != nil && nd.Proc.Exited() {
				c.t.Fatalf("torusd %s exited:\n%s", nd.ID, nd.Proc.Log())
			}
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("%d nodes registered (err %v), want %d", len(nodes), err, n)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
