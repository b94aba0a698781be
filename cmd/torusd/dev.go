package main

// Layout of a dev cluster directory (all of it reused by a re-run):
//
//	DIR/etcd       embedded etcd data
//	DIR/ca         cluster CA (ca.crt, ca.key)
//	DIR/client     client TLS dir (node.crt, node.key, ca.crt; name "client")
//	DIR/nodeI      data dir of node I (1..N): identity.json, store, tls/
//
// Nodes are called node1..nodeN and get host labels dev-host1..N, so that
// with R <= N every chunk's replicas land on distinct nodes.

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"time"

	"github.com/spf13/pflag"

	"github.com/torus-storage/torus/internal/cli"
	"github.com/torus-storage/torus/internal/devetcd"
	"github.com/torus-storage/torus/internal/procs"
	"github.com/torus-storage/torus/internal/units"
	"github.com/torus-storage/torus/meta"
	"github.com/torus-storage/torus/netquic"
	"github.com/torus-storage/torus/node"
)

// devCmd is torusd dev: a development cluster in one process.
type devCmd struct {
	log             *slog.Logger
	nodes, repl     int
	dir, etcdListen string
	size, chunk     cli.Size
	metricsAddr     string
	maxProcs        int
}

func (c *devCmd) flags(fs *pflag.FlagSet) {
	fs.IntVar(&c.nodes, "nodes", 3, "number of storage nodes (0: only etcd, the CA and the cluster config)")
	fs.StringVar(&c.dir, "data-dir", "", "`DIR` of the whole dev cluster (etcd, CA, nodes)")
	fs.StringVar(&c.etcdListen, "etcd-listen", "127.0.0.1:2379", "etcd client address, `HOST:PORT` (port 0 picks one)")
	c.size = cli.Size(units.GiB)
	fs.Var(&c.size, "size", "capacity of each node's store")
	fs.IntVar(&c.repl, "replication", 3, "default replication of a new cluster")
	c.chunk = cli.Size(units.MiB)
	fs.Var(&c.chunk, "chunk-size", "chunk size of a new cluster, a power of two from 64KiB to 2MiB")
	fs.StringVar(&c.metricsAddr, "metrics", "", "serve Prometheus metrics of all nodes on `HOST:PORT` (/metrics)")
	fs.IntVar(&c.maxProcs, "gomaxprocs", procs.Auto, gomaxprocsUsage)
}

// run runs a development cluster until ctx is done.
func (c *devCmd) run(ctx context.Context, args []string, io cli.IO) error {
	if len(args) > 0 {
		return cli.Usagef("unexpected arguments %q", args)
	}
	log, stdout := c.log, io.Stdout
	if c.dir == "" {
		return cli.Usagef("--data-dir is required (example: torusd dev --nodes 3 --data-dir /tmp/torus-dev)")
	}
	if c.nodes < 0 || c.nodes > 64 {
		return cli.Usagef("--nodes %d: between 0 and 64", c.nodes)
	}
	// With --nodes 0 the nodes run as separate processes (fault tests kill
	// them and etcd independently), so any replication may be meant.
	if c.repl < 1 || c.nodes > 0 && c.repl > c.nodes {
		return cli.Usagef("--replication %d: between 1 and --nodes (%d)", c.repl, c.nodes)
	}
	sz, err := storeSize(c.size)
	if err != nil {
		return err
	}
	cs := int64(c.chunk)
	if cs <= 0 || meta.CheckChunkSize(uint64(cs)) != nil {
		return cli.Usagef("--chunk-size %s: a power of two from 64KiB to 2MiB", &c.chunk)
	}
	if _, _, err := net.SplitHostPort(c.etcdListen); err != nil {
		return cli.Usagef("--etcd-listen %q: %v (example: 127.0.0.1:2379)", c.etcdListen, err)
	}
	// Every node's store runs one shard per CPU.
	if _, err := procs.Set(c.maxProcs, max(c.nodes, 1)*runtime.NumCPU(), log); err != nil {
		return err
	}
	root, err := filepath.Abs(c.dir)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(root, 0o700); err != nil {
		return fmt.Errorf("data dir %s: %w: pick a --data-dir you can write", root, err)
	}

	etcd, err := startDevEtcd(ctx, filepath.Join(root, "etcd"), c.etcdListen)
	if err != nil {
		return err
	}
	defer etcd.Close()
	ms, err := meta.Open(ctx, []string{etcd.Endpoint()}, "", meta.Options{Logger: log})
	if err != nil {
		return err
	}
	defer ms.Close()
	caDir := filepath.Join(root, "ca")
	cfg, err := devInit(ctx, ms, caDir, uint64(cs), c.repl, log)
	if err != nil {
		return err
	}
	clientDir := filepath.Join(root, "client")
	if _, err := os.Stat(filepath.Join(clientDir, netquic.NodeKeyFile)); errors.Is(err, os.ErrNotExist) {
		if err := netquic.IssueCert(caDir, "client", []string{"127.0.0.1", "localhost"}, clientDir); err != nil {
			return fmt.Errorf("issue the client certificate: %w", err)
		}
	}

	var running []*node.Node
	defer func() {
		for _, n := range running {
			n.Stop(context.WithoutCancel(ctx))
		}
	}()
	for i := 1; i <= c.nodes; i++ {
		id := "node" + strconv.Itoa(i)
		n, err := node.Start(ctx, ms, cfg, node.Config{
			DataDir:    filepath.Join(root, id),
			Listen:     "127.0.0.1:0",
			Size:       sz,
			Host:       "dev-host" + strconv.Itoa(i),
			ID:         id,
			ClusterDir: caDir,
			LeaseTTL:   5 * time.Second,
			// Maintenance of volumes no client holds.
			Maintenance:      node.DefaultMaintenance,
			MaintenanceDelay: node.DefaultMaintenanceDelay,
			OpenMaintenance:  openMaintenance,
		}, log)
		if err != nil {
			return fmt.Errorf("start %s: %w", id, err)
		}
		running = append(running, n)
	}
	mctx, stopMetrics := context.WithCancel(ctx)
	defer stopMetrics()
	if c.metricsAddr != "" {
		if _, err := node.ServeMetrics(mctx, c.metricsAddr, running, log); err != nil {
			return err
		}
	}
	fmt.Fprintf(stdout, "etcd: %s\ntls: %s\n", etcd.Endpoint(), clientDir)
	log.Info("dev cluster ready", "nodes", len(running), "cluster", cfg.ClusterID, "replication", cfg.Replication)

	select {
	case <-ctx.Done():
		log.Info("signalled, shutting down")
	case err := <-etcd.Err():
		log.Error("embedded etcd failed", "err", err)
	}
	stopMetrics()
	var errs []error
	for _, n := range running {
		errs = append(errs, n.Stop(context.WithoutCancel(ctx)))
	}
	running = nil
	return errors.Join(errs...)
}

// startDevEtcd starts the embedded etcd on listen, with a clear error when
// the port is taken.
func startDevEtcd(ctx context.Context, dir, listen string) (*devetcd.Server, error) {
	l, err := net.Listen("tcp", listen)
	if err != nil {
		return nil, fmt.Errorf("etcd address %s is taken (another etcd or torusd dev?): stop it, or pass --etcd-listen 127.0.0.1:0: %w",
			listen, err)
	}
	addr := l.Addr().String() // resolves port 0
	l.Close()
	e, err := devetcd.Start(ctx, dir, "http://"+addr, "")
	if err != nil {
		return nil, fmt.Errorf("start embedded etcd: %w", err)
	}
	return e, nil
}

// devInit initialises the cluster on first run (CA, then config) and
// returns its config; later runs reuse both.
func devInit(ctx context.Context, ms *meta.Client, caDir string, chunk uint64, repl int, log *slog.Logger) (meta.Config, error) {
	cfg, err := ms.Config(ctx)
	if err == nil {
		if _, err := os.Stat(filepath.Join(caDir, netquic.CAKeyFile)); err != nil {
			return cfg, fmt.Errorf("the dev cluster's CA is missing (%v): remove the whole --data-dir to start afresh", err)
		}
		return cfg, nil
	}
	if !errors.Is(err, meta.ErrNotInitialized) {
		return cfg, err
	}
	if _, err := os.Stat(filepath.Join(caDir, netquic.CAKeyFile)); errors.Is(err, os.ErrNotExist) {
		if err := netquic.NewCA(caDir); err != nil {
			return cfg, err
		}
	}
	if err := ms.Init(ctx, meta.Config{ChunkSize: chunk, Replication: repl}); err != nil {
		return cfg, err
	}
	log.Info("initialised dev cluster", "chunk_size", chunk, "replication", repl, "ca", caDir)
	return ms.Config(ctx)
}
