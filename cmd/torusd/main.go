// Command torusd is a Torus storage node: it keeps chunks in a local store
// and serves them to clients over QUIC.
//
//	torusd [--etcd URL[,URL]] --data-dir DIR --listen HOST:PORT --size SIZE
//	       [--zone Z] [--host H] [--id ID] [--advertise HOST:PORT]
//	       [--metrics HOST:PORT] [--cluster-dir CADIR | --tls-dir DIR] [--prefix P]
//	       [--dead-timeout DURATION]
//	torusd dev --nodes 3 --data-dir DIR [--etcd-listen 127.0.0.1:2379]
//	       [--size 1GiB] [--replication 3] [--metrics HOST:PORT]
//
// --etcd defaults to $TORUS_ETCD, else http://127.0.0.1:2379 (where torusd
// dev serves by default). A node keeps its store in DIR/store and its identity (node id, cluster id)
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

	"github.com/torus-storage/torus/internal/procs"
	"github.com/torus-storage/torus/internal/units"
	"github.com/torus-storage/torus/meta"
	"github.com/torus-storage/torus/node"
)

const usage = `torusd: a Torus storage node

Usage:
  torusd [--etcd URL[,URL]] --data-dir DIR --listen HOST:PORT --size SIZE
         [--zone Z] [--host H] [--id ID] [--advertise HOST:PORT]
         [--metrics HOST:PORT] [--cluster-dir CADIR | --tls-dir DIR] [--prefix P]
         [--dead-timeout DURATION]
  torusd dev --nodes 3 --data-dir DIR [--etcd-listen 127.0.0.1:2379] [--size 1GiB]
         [--replication 3] [--metrics HOST:PORT]

Run 'torusd --help' or 'torusd dev --help' for the flags.
`

// errUsage marks errors caused by how the command was called; they exit 2.
var errUsage = errors.New("usage")

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

	name, f := "torusd", cmdNode
	if len(args) > 0 && args[0] == "dev" {
		name, f, args = "torusd dev", cmdDev, args[1:]
	}
	err := f(ctx, args, stdout, log)
	switch {
	case err == nil, errors.Is(err, pflag.ErrHelp):
		return 0
	case errors.Is(err, errUsage), errors.Is(err, node.ErrConfig):
		fmt.Fprintf(stderr, "%s: %v\n\n%s", name, err, usage)
		return 2
	default:
		fmt.Fprintf(stderr, "%s: %v\n", name, err)
		return 1
	}
}

// newFlagSet returns a flag set whose --help prints to stdout and whose
// parse errors are returned as usage errors.
func newFlagSet(name string, stdout io.Writer) *pflag.FlagSet {
	fs := pflag.NewFlagSet(name, pflag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.Usage = func() { fmt.Fprintf(stdout, "%s\nFlags:\n%s", usage, fs.FlagUsages()) }
	return fs
}

// parse parses args and rejects positional arguments.
func parse(fs *pflag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			fs.Usage()
			return err
		}
		return fmt.Errorf("%w: %v", errUsage, err)
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("%w: unexpected arguments %q", errUsage, fs.Args())
	}
	return nil
}

// parseSize parses a store size: at least 4 KiB.
func parseSize(s string) (int64, error) {
	n, err := units.ParseSize(s)
	if err != nil {
		return 0, fmt.Errorf("%w: --size %q: %v (example: --size 100GiB)", errUsage, s, err)
	}
	if n < 4096 {
		return 0, fmt.Errorf("%w: --size %s: too small (example: --size 100GiB)", errUsage, s)
	}
	return n, nil
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

// splitEndpoints splits a comma-separated --etcd.
func splitEndpoints(s string) []string {
	var eps []string
	for e := range strings.SplitSeq(s, ",") {
		if e = strings.TrimSpace(e); e != "" {
			eps = append(eps, e)
		}
	}
	return eps
}

// gomaxprocsUsage documents --gomaxprocs of torusd and torusd dev.
const gomaxprocsUsage = "GOMAXPROCS: 0 = CPUs + one per store shard (so goroutines never wait for shards blocked in io_uring), -1 = Go's default"

// cmdNode runs one storage node until ctx is done.
func cmdNode(ctx context.Context, args []string, stdout io.Writer, log *slog.Logger) error {
	fs := newFlagSet("torusd", stdout)
	defEtcd := "http://127.0.0.1:2379"
	if e := os.Getenv("TORUS_ETCD"); e != "" {
		defEtcd = e
	}
	etcd := fs.String("etcd", defEtcd, "etcd endpoints, comma separated (env TORUS_ETCD)")
	prefix := fs.String("prefix", meta.DefaultPrefix, "etcd key prefix of the cluster")
	nc := node.Config{OpenRepair: openRepair}
	fs.StringVar(&nc.DataDir, "data-dir", "", "directory of the node's store and identity")
	fs.StringVar(&nc.Listen, "listen", "", "QUIC address to serve on, host:port")
	fs.StringVar(&nc.Advertise, "advertise", "", "address clients dial (default: --listen)")
	size := fs.String("size", "", "capacity of the store, e.g. 100GiB")
	fs.StringVar(&nc.Zone, "zone", "", "failure domain: zone (rack, room) of the node")
	host, _ := os.Hostname()
	fs.StringVar(&nc.Host, "host", host, "failure domain: machine of the node")
	fs.StringVar(&nc.ID, "id", "", "node id for a new data dir (default: random); must match an existing one")
	metricsAddr := fs.String("metrics", "", "serve Prometheus metrics on host:port (/metrics)")
	fs.StringVar(&nc.ClusterDir, "cluster-dir", "", "cluster CA directory (from torusctl init): issue the node certificate from it")
	fs.StringVar(&nc.TLSDir, "tls-dir", "", "directory with node.crt, node.key and ca.crt")
	fs.DurationVar(&nc.LeaseTTL, "lease-ttl", defaultLeaseTTL, "how long the registration outlives a crashed node")
	fs.DurationVar(&nc.DeadTimeout, "dead-timeout", node.DefaultDeadTimeout, "remove a node of the ring that stays unregistered this long, so its chunks are re-replicated; 0 = never")
	fs.StringVar(&nc.Socket, "socket", "", "unix socket for clients on this host, instead of QUIC (default DATA_DIR/node.sock; none: no socket)")
	fs.DurationVar(&nc.Maintenance, "maintenance-interval", node.DefaultMaintenance, "how often to look for volumes no client holds that need a rebuild or a move, and repair them; 0 = never")
	fs.DurationVar(&nc.MaintenanceDelay, "maintenance-delay", node.DefaultMaintenanceDelay, "how long a volume must have no holder before a node maintains it (a client whose lease lapsed takes it back first)")
	rebuildRate := fs.String("rebuild-rate", "", "bytes per second one maintenance job copies, e.g. 64MiB (default 64MiB)")
	maxProcs := fs.Int("gomaxprocs", procs.Auto, gomaxprocsUsage)
	if err := parse(fs, args); err != nil {
		return err
	}
	var missing []string
	for _, f := range []struct{ name, v string }{{"etcd", *etcd}, {"data-dir", nc.DataDir}, {"listen", nc.Listen}, {"size", *size}} {
		if strings.TrimSpace(f.v) == "" {
			missing = append(missing, "--"+f.name)
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("%w: %s required (example: torusd --etcd http://10.0.0.1:2379 --data-dir /var/lib/torus "+
			"--listen 10.0.0.5:7000 --size 100GiB --cluster-dir /etc/torus)", errUsage, strings.Join(missing, ", "))
	}
	if (nc.ClusterDir == "") == (nc.TLSDir == "") {
		return fmt.Errorf("%w: pass exactly one of --cluster-dir (the CA from torusctl init) and --tls-dir (a node certificate)", errUsage)
	}
	var err error
	if nc.Size, err = parseSize(*size); err != nil {
		return err
	}
	if nc.DeadTimeout < 0 {
		return fmt.Errorf("%w: --dead-timeout %v: want a duration >= 0 (0 = never remove dead nodes)", errUsage, nc.DeadTimeout)
	}
	if nc.LeaseTTL < time.Second {
		return fmt.Errorf("%w: --lease-ttl %v: at least 1s", errUsage, nc.LeaseTTL)
	}
	if nc.MaintenanceDelay < 0 {
		return fmt.Errorf("%w: --maintenance-delay %v: want a duration >= 0", errUsage, nc.MaintenanceDelay)
	}
	if nc.Maintenance < 0 {
		return fmt.Errorf("%w: --maintenance-interval %v: want a duration >= 0 (0 = never)", errUsage, nc.Maintenance)
	}
	if *rebuildRate != "" {
		if nc.RebuildRate, err = units.ParseSize(*rebuildRate); err != nil || nc.RebuildRate <= 0 {
			return fmt.Errorf("%w: --rebuild-rate %q: want a positive size per second (example: --rebuild-rate 64MiB)", errUsage, *rebuildRate)
		}
	}

	if _, err := procs.Set(*maxProcs, 0, log); err != nil {
		return err
	}
	ms, cfg, err := openMeta(ctx, splitEndpoints(*etcd), *prefix, log)
	if err != nil {
		return err
	}
	defer ms.Close()
	n, err := node.Start(ctx, ms, cfg, nc, log)
	if err != nil {
		return err
	}
	mctx, stopMetrics := context.WithCancel(ctx)
	if *metricsAddr != "" {
		if _, err := node.ServeMetrics(mctx, *metricsAddr, []*node.Node{n}, log); err != nil {
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
