package main

// Cluster volume source: `torusblk serve NAME --etcd URL --tls-dir DIR` and
// `torusblk attach NAME ...` take a volume of a Torus cluster instead of a
// local store. The volume is held under its attach lock by cluster.Attach,
// whose file (cluster/attach.go) keeps the invariants of holding it; this
// file only turns the flags into its options and adds hints to its errors.

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"time"

	"github.com/spf13/pflag"

	"github.com/torus-storage/torus/cluster"
	"github.com/torus-storage/torus/internal/cli"
	"github.com/torus-storage/torus/meta"
	"github.com/torus-storage/torus/netquic"
)

// clusterFlags select a cluster volume.
type clusterFlags struct {
	cluster           cli.Cluster
	tlsDir, localNode string
	holder            string
	ttl, timeout      time.Duration
	after             uint64 // recover: the epoch the device was served under
}

func (c *clusterFlags) register(fs *pflag.FlagSet) {
	c.cluster.Flags(fs)
	cli.TLSDirFlag(fs, &c.tlsDir)
	clusterOnly(fs, "etcd", "prefix", "tls-dir")
	fs.StringVar(&c.localNode, "local-node", "", "cluster volume: id of a storage node on this host, whose replica reads prefer (default: the node registered with this host name, if any)")
	fs.DurationVar(&c.timeout, "replica-timeout", 5*time.Second, "cluster volume: how long a replica may take to answer before it is taken out of the write path (its chunks are marked for rebuild) and reads move on")
	fs.DurationVar(&c.ttl, "lease-ttl", cluster.DefaultAttachTTL, "cluster volume: attach lock lease; after a crash the volume can be attached elsewhere once it expires")
	fs.StringVar(&c.holder, "holder", "", "cluster volume: `WHO` holds the attach lock, as torusctl volume info shows it (default: torusblk pid N on HOST; torus-csi names its node)")
}

// clusterOnly marks the named flags of fs, in its help, as being for
// cluster volumes only.
func clusterOnly(fs *pflag.FlagSet, names ...string) {
	for _, n := range names {
		f := fs.Lookup(n)
		f.Usage = "cluster volume: " + f.Usage
	}
}

// clusterVolume is a cluster volume attached through its own etcd client;
// Close closes the client after the volume and its lock.
type clusterVolume struct {
	*cluster.Attached
	ms *meta.Client
}

// Close closes the volume, releases its attach lock, then closes etcd.
func (v *clusterVolume) Close() error {
	err := v.Attached.Close()
	v.ms.Close()
	return err
}

// openCluster attaches cluster volume name (cluster.Attach) through the
// etcd and the client certificate cf names, with the periodic scrub and
// the metrics endpoint sf asks for. wait > 0 keeps trying while the attach
// lock is still held (by a server that died and whose lease has not
// expired yet).
func openCluster(ctx context.Context, name string, cf clusterFlags, wait time.Duration, sf serviceFlags, log *slog.Logger) (*clusterVolume, error) {
	tlsConf, err := netquic.LoadTLS(cf.tlsDir)
	if err != nil {
		return nil, fmt.Errorf("--tls-dir %s: %w", cf.tlsDir, err)
	}
	ms, err := meta.Open(ctx, cf.cluster.Endpoints(), cf.cluster.Prefix, meta.Options{Logger: log})
	if err != nil {
		if errors.Is(err, meta.ErrUnreachable) {
			return nil, fmt.Errorf("%w: is etcd running at %s? (--etcd or TORUS_ETCD)", err, cf.cluster.Etcd)
		}
		return nil, err
	}
	host, _ := os.Hostname()
	av, err := cluster.Attach(ctx, ms, name, cluster.AttachOptions{
		Options: cluster.Options{
			Holder:    holderName(cf.holder, host),
			TLS:       tlsConf.Client,
			LocalNode: cf.localNode,
			Timeout:   cf.timeout,
			Logger:    log,
		},
		TTL:           cf.ttl,
		Wait:          wait,
		After:         cf.after,
		ScrubInterval: sf.scrubInterval,
	})
	if err != nil {
		ms.Close()
		switch {
		case errors.Is(err, meta.ErrAttached):
			return nil, fmt.Errorf("%w; detach it there first (if that process died, its lock expires within %v)", err, cf.ttl)
		case errors.Is(err, meta.ErrNotFound):
			return nil, fmt.Errorf("%w (list volumes with `torusctl volume list`, create one with `torusctl volume create %s SIZE`)", err, name)
		}
		return nil, err
	}
	cv := &clusterVolume{Attached: av, ms: ms}
	if sf.metrics != "" {
		if _, err := av.ServeMetrics(sf.metrics); err != nil {
			cv.Close()
			return nil, fmt.Errorf("--metrics: %w: pick another HOST:PORT", err)
		}
	}
	return cv, nil
}

// holderName is the attach lock's holder: who (--holder), then this
// process and host.
func holderName(who, host string) string {
	if who == "" {
		return fmt.Sprintf("torusblk pid %d on %s", os.Getpid(), host)
	}
	return fmt.Sprintf("%s (torusblk pid %d on %s)", who, os.Getpid(), host)
}

// snapshotVolume is a read-only view of a snapshot through its own etcd
// client; Close closes the client after the view.
type snapshotVolume struct {
	*cluster.Volume
	ms *meta.Client
}

// Close closes the view, then etcd.
func (v *snapshotVolume) Close() error {
	err := v.Volume.Close()
	v.ms.Close()
	return err
}

// openSnapshot opens a read-only view of snapshot VOLUME@SNAPSHOT: no attach
// lock, so the volume may be attached and written meanwhile.
func openSnapshot(ctx context.Context, volume, snapshot string, cf clusterFlags, log *slog.Logger) (*snapshotVolume, error) {
	tlsConf, err := netquic.LoadTLS(cf.tlsDir)
	if err != nil {
		return nil, fmt.Errorf("--tls-dir %s: %w", cf.tlsDir, err)
	}
	ms, err := meta.Open(ctx, cf.cluster.Endpoints(), cf.cluster.Prefix, meta.Options{Logger: log})
	if err != nil {
		if errors.Is(err, meta.ErrUnreachable) {
			return nil, fmt.Errorf("%w: is etcd running at %s? (--etcd or TORUS_ETCD)", err, cf.cluster.Etcd)
		}
		return nil, err
	}
	v, err := cluster.OpenSnapshot(ctx, ms, volume, snapshot, cluster.Options{
		TLS: tlsConf.Client, LocalNode: cf.localNode, Timeout: cf.timeout, Logger: log,
		Holder: fmt.Sprintf("torusblk pid %d (snapshot view)", os.Getpid()),
	})
	if err != nil {
		ms.Close()
		if errors.Is(err, meta.ErrNotFound) {
			return nil, fmt.Errorf("%w (list snapshots with `torusctl snapshot list %s`)", err, volume)
		}
		return nil, err
	}
	log.Info("opened snapshot read-only", "volume", volume, "snapshot", snapshot)
	return &snapshotVolume{Volume: v, ms: ms}, nil
}
