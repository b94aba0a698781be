// Command torusd is a Torus storage node: it keeps chunks in a local store
// and serves them to clients over QUIC.
//
//	torusd [--etcd URL[,URL]] --data-dir DIR --listen HOST:PORT --size SIZE
//	       [--zone Z] [--host H] [--id ID] [--advertise HOST:PORT]
//	       [--metrics HOST:PORT] [--cluster-dir CADIR | --tls-dir DIR] [--prefix P]
//	       [--dead-timeout DURATION] [--near-full RATIO]
//	torusd dev --nodes 3 --data-dir DIR [--etcd-listen 127.0.0.1:2379]
//	       [--size 1GiB] [--replication 3] [--metrics HOST:PORT]
//
// --etcd defaults to $TORUS_ETCD, else http://127.0.0.1:2379 (where torusd
// dev serves by default). --help prints the flags; usage errors, a bad
// node configuration among them, exit 2, other failures 1 (the conventions
// of internal/cli). A node keeps its store in DIR/store and its identity (node id, cluster id)
// in DIR/identity.json; it refuses a data dir of another cluster, and a
// restart on the same data dir is the same node with the same data. At
// start-up it raises every volume's write fence to the attach epoch in etcd,
// serves, registers itself under a lease and joins the placement ring. On
// SIGINT or SIGTERM it stops serving, closes the store cleanly and revokes
// its registration.
//
// torusd dev runs a whole development cluster in one process: an embedded
// etcd (data in DIR/etcd), the cluster CA (DIR/ca), N nodes on 127.0.0.1
// (DIR/node1..N, each on its own host label so replicas spread) and a client
// certificate (DIR/client). Once ready it prints two lines on stdout,
//
//	etcd: http://127.0.0.1:2379
//	tls: DIR/client
//
// and serves until signalled. Running it again on the same DIR restarts the
// same cluster with its data. --nodes 0 runs only etcd (with the CA and the
// cluster config): nodes are then started as separate torusd processes with
// --cluster-dir DIR/ca, so tests can kill etcd and nodes independently.
//
// Every node garbage-collects the chunks of deleted volumes: at start-up and
// whenever the volumes in etcd change, it discards the whole chunks of
// volumes that no longer exist, freeing their slots (metric
// torus_gc_chunks_total).
//
// Every node publishes in etcd the chunks it holds per volume and snapshot
// (after every garbage collection and every --usage-interval), which
// torusctl adds up, and warns (log, registration, torusctl status) once
// --near-full of its store is used, before it refuses writes.
//
// Every node also watches the registry: a node of the ring that stays
// unregistered longer than --dead-timeout (default 10m, 0 = never) is removed
// from the ring, so its chunks are re-replicated to the remaining nodes by
// the attached clients (metric torus_dead_nodes_removed_total).
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/pflag"

	"github.com/torus-storage/torus/internal/cli"
	"github.com/torus-storage/torus/internal/procs"
	"github.com/torus-storage/torus/meta"
	"github.com/torus-storage/torus/node"
)

// defaultLeaseTTL is how long a node's registration outlives the process
// when it dies without revoking it.
const defaultLeaseTTL = 10 * time.Second

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	slog.SetDefault(log) // packages that log through the default (netquic) log alike
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	return cli.Main(ctx, program(log), args, stdout, stderr)
}

// program is torusd: a storage node, and torusd dev.
func program(log *slog.Logger) *cli.Command {
	n := &nodeCmd{log: log}
	d := &devCmd{log: log}
	return &cli.Command{
		Name:    "torusd",
		Summary: "a Torus storage node",
		Usage: `[--etcd URL[,URL]] --data-dir DIR --listen HOST:PORT --size SIZE
 [--zone Z] [--host H] [--id ID] [--advertise HOST:PORT]
 [--metrics HOST:PORT] [--cluster-dir CADIR | --tls-dir DIR] [--prefix P]
 [--dead-timeout DURATION] [--near-full RATIO]`,
		Flags: n.flags,
		Run:   configErrors(n.run),
		Sub: []*cli.Command{{
			Name:    "dev",
			Summary: "a development cluster in one process: etcd, the CA and N nodes",
			Usage: `--nodes 3 --data-dir DIR [--etcd-listen 127.0.0.1:2379] [--size 1GiB]
 [--replication 3] [--metrics HOST:PORT]`,
			Flags: d.flags,
			Run:   configErrors(d.run),
		}},
	}
}

// configErrors makes the errors of a node's configuration (node.ErrConfig)
// usage errors: they come from how torusd was called.
func configErrors(run func(context.Context, []string, cli.IO) error) func(context.Context, []string, cli.IO) error {
	return func(ctx context.Context, args []string, io cli.IO) error {
		err := run(ctx, args, io)
		if errors.Is(err, node.ErrConfig) {
			return cli.UsageError(err)
		}
		return err
	}
}

// storeSize checks the size of a node's store (--size): at least 4 KiB.
func storeSize(s cli.Size) (int64, error) {
	if s < 4096 {
		return 0, cli.Usagef("--size %s: too small (example: --size 100GiB)", &s)
	}
	return int64(s), nil
}

// openMeta opens the cluster metadata and reads its config, with errors
// that say what to do.
func openMeta(ctx context.Context, endpoints []string, prefix string, log *slog.Logger) (*meta.Client, meta.Config, error) {
	eps := strings.Join(endpoints, ",")
	ms, err := meta.Open(ctx, endpoints, prefix, meta.Options{Logger: log})
	if errors.Is(err, meta.ErrUnreachable) {
		return nil, meta.Config{}, fmt.Errorf("cannot reach etcd: is etcd running at %s? start one, or use 'torusd dev' "+
			"for a development cluster with its own etcd (%w)", eps, err)
	}
	if err != nil {
		return nil, meta.Config{}, err
	}
	cfg, err := ms.Config(ctx)
	if errors.Is(err, meta.ErrNotInitialized) {
		ms.Close()
		return nil, cfg, fmt.Errorf("no cluster under prefix %s of etcd %s: run 'torusctl --etcd %s init --cluster-dir DIR' first",
			ms.Prefix(), eps, eps)
	}
	if err != nil {
		ms.Close()
		return nil, cfg, err
	}
	return ms, cfg, nil
}

// gomaxprocsUsage documents --gomaxprocs of torusd and torusd dev.
const gomaxprocsUsage = "GOMAXPROCS: 0 = CPUs + one per store shard (so goroutines never wait for shards blocked in io_uring), -1 = Go's default"

// nodeCmd is torusd itself: one storage node.
type nodeCmd struct {
	log               *slog.Logger
	fs                *pflag.FlagSet
	cluster           cli.Cluster
	nc                node.Config
	size, rebuildRate cli.Size
	metricsAddr       string
	maxProcs          int
}

func (c *nodeCmd) flags(fs *pflag.FlagSet) {
	c.fs = fs
	c.cluster.Flags(fs)
	nc := &c.nc
	*nc = node.Config{OpenMaintenance: openMaintenance}
	fs.StringVar(&nc.DataDir, "data-dir", "", "`DIR` of the node's store and identity")
	fs.StringVar(&nc.Listen, "listen", "", "QUIC address to serve on, `HOST:PORT`")
	fs.StringVar(&nc.Advertise, "advertise", "", "address clients dial, `HOST:PORT` (default: --listen)")
	fs.Var(&c.size, "size", "capacity of the store, e.g. 100GiB")
	fs.StringVar(&nc.Zone, "zone", "", "failure domain: zone (rack, room) of the node")
	host, _ := os.Hostname()
	fs.StringVar(&nc.Host, "host", host, "failure domain: machine of the node")
	fs.StringVar(&nc.ID, "id", "", "node id for a new data dir (default: random); must match an existing one")
	fs.StringVar(&c.metricsAddr, "metrics", "", "serve Prometheus metrics on `HOST:PORT` (/metrics)")
	fs.StringVar(&nc.ClusterDir, "cluster-dir", "", "cluster CA directory `CADIR` (from torusctl init): issue the node certificate from it")
	fs.StringVar(&nc.TLSDir, "tls-dir", "", "`DIR` with this node's node.crt, node.key and ca.crt")
	fs.DurationVar(&nc.LeaseTTL, "lease-ttl", defaultLeaseTTL, "how long the registration outlives a crashed node")
	fs.DurationVar(&nc.DeadTimeout, "dead-timeout", node.DefaultDeadTimeout, "remove a node of the ring that stays unregistered this long, so its chunks are re-replicated; 0 = never")
	fs.StringVar(&nc.Socket, "socket", "", "unix socket for clients on this host, instead of QUIC (default DATA_DIR/node.sock; none: no socket)")
	fs.DurationVar(&nc.Maintenance, "maintenance-interval", node.DefaultMaintenance, "how often to look for volumes no client holds that need a rebuild or a move, and repair them; 0 = never")
	fs.DurationVar(&nc.MaintenanceDelay, "maintenance-delay", node.DefaultMaintenanceDelay, "how long a volume must have no holder before a node maintains it (a client whose lease lapsed takes it back first)")
	fs.Var(&c.rebuildRate, "rebuild-rate", "bytes per second one maintenance job copies, e.g. 64MiB (default 64MiB)")
	fs.IntVar(&c.maxProcs, "gomaxprocs", procs.Auto, gomaxprocsUsage)
	fs.Float64Var(&nc.NearFull, "near-full", node.DefaultNearFull, "warn (log, torusctl status) once this `RATIO` of the store is used, before writes are refused; between 0 and 1")
	fs.DurationVar(&nc.UsageInterval, "usage-interval", node.DefaultUsageInterval, "how often to list the store and publish its bytes per volume and snapshot (also after every garbage collection)")
}

// run runs one storage node until ctx is done.
func (c *nodeCmd) run(ctx context.Context, args []string, _ cli.IO) error {
	if len(args) > 0 {
		return cli.Usagef("unexpected arguments %q", args)
	}
	nc, log := c.nc, c.log
	var missing []string
	for _, f := range []struct {
		name  string
		given bool
	}{
		{"etcd", strings.TrimSpace(c.cluster.Etcd) != ""}, {"data-dir", strings.TrimSpace(nc.DataDir) != ""},
		{"listen", strings.TrimSpace(nc.Listen) != ""}, {"size", c.fs.Changed("size")},
	} {
		if !f.given {
			missing = append(missing, "--"+f.name)
		}
	}
	if len(missing) > 0 {
		return cli.Usagef("%s required (example: torusd --etcd http://10.0.0.1:2379 --data-dir /var/lib/torus "+
			"--listen 10.0.0.5:7000 --size 100GiB --cluster-dir /etc/torus)", strings.Join(missing, ", "))
	}
	if (nc.ClusterDir == "") == (nc.TLSDir == "") {
		return cli.Usagef("pass exactly one of --cluster-dir (the CA from torusctl init) and --tls-dir (a node certificate)")
	}
	var err error
	if nc.Size, err = storeSize(c.size); err != nil {
		return err
	}
	if nc.DeadTimeout < 0 {
		return cli.Usagef("--dead-timeout %v: want a duration >= 0 (0 = never remove dead nodes)", nc.DeadTimeout)
	}
	if nc.LeaseTTL < time.Second {
		return cli.Usagef("--lease-ttl %v: at least 1s", nc.LeaseTTL)
	}
	if !(nc.NearFull > 0 && nc.NearFull < 1) {
		return cli.Usagef("--near-full %v: want a ratio between 0 and 1, exclusive (example: --near-full 0.85)", nc.NearFull)
	}
	if nc.UsageInterval <= 0 {
		return cli.Usagef("--usage-interval %v: want a positive duration (example: --usage-interval 15s)", nc.UsageInterval)
	}
	if nc.MaintenanceDelay < 0 {
		return cli.Usagef("--maintenance-delay %v: want a duration >= 0", nc.MaintenanceDelay)
	}
	if nc.Maintenance < 0 {
		return cli.Usagef("--maintenance-interval %v: want a duration >= 0 (0 = never)", nc.Maintenance)
	}
	if c.fs.Changed("rebuild-rate") {
		if c.rebuildRate <= 0 {
			return cli.Usagef("--rebuild-rate %s: want a positive size per second (example: --rebuild-rate 64MiB)", &c.rebuildRate)
		}
		nc.RebuildRate = int64(c.rebuildRate)
	}

	if _, err := procs.Set(c.maxProcs, 0, log); err != nil {
		return err
	}
	ms, cfg, err := openMeta(ctx, c.cluster.Endpoints(), c.cluster.Prefix, log)
	if err != nil {
		return err
	}
	defer ms.Close()
	n, err := node.Start(ctx, ms, cfg, nc, log)
	if err != nil {
		return err
	}
	mctx, stopMetrics := context.WithCancel(ctx)
	if c.metricsAddr != "" {
		if _, err := node.ServeMetrics(mctx, c.metricsAddr, []*node.Node{n}, log); err != nil {
			stopMetrics()
			n.Stop(context.WithoutCancel(ctx))
			return err
		}
	}
	<-ctx.Done()
	log.Info("signalled, shutting down")
	stopMetrics()
	return n.Stop(context.WithoutCancel(ctx))
}
