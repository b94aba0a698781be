package main

// Cluster volume source: `torusblk serve NAME --etcd URL --tls-dir DIR` and
// `torusblk attach NAME ...` take a volume of a Torus cluster instead of a
// local store.
//
// Invariants:
//   - A cluster volume is served only while this process holds the volume's
//     attach lock (meta.Attach); every write carries the lock's epoch, so a
//     process that lost the lock without noticing is fenced by the nodes.
//   - The volume's metadata writes (missed marks, moves, progress) go
//     through a client guarded by the lock (meta.Client.Guarded): etcd refuses
//     them once this process no longer holds the lock with its epoch.
//   - After the lease is lost (etcd unreachable past the TTL) the lock is
//     taken back only with the same epoch and only if nobody attached in
//     between (meta.AttachLease.Reattach, a compare-and-swap on the epoch).
//     If someone did, even if they have detached since, this process is
//     fenced for good (cluster.Volume.Fence): every I/O fails with EIO until
//     it is detached, because its marks, moves and the kernel's page cache
//     may predate the other holder's writes.
//   - clusterVolume.Close closes the replicated volume (which makes completed
//     writes durable on every replica) before it releases the lock, so the
//     next holder never sees a write of ours land after it attached.

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/spf13/pflag"

	"github.com/torus-storage/torus/cluster"
	"github.com/torus-storage/torus/internal/cli"
	"github.com/torus-storage/torus/internal/procs"
	"github.com/torus-storage/torus/meta"
	"github.com/torus-storage/torus/netquic"
)

// clusterFlags select a cluster volume.
type clusterFlags struct {
	cluster           cli.Cluster
	tlsDir, localNode string
	ttl, timeout      time.Duration
}

func (c *clusterFlags) register(fs *pflag.FlagSet) {
	c.cluster.Flags(fs)
	cli.TLSDirFlag(fs, &c.tlsDir)
	clusterOnly(fs, "etcd", "prefix", "tls-dir")
	fs.StringVar(&c.localNode, "local-node", "", "cluster volume: id of a storage node on this host, whose replica reads prefer (default: the node registered with this host name, if any)")
	fs.DurationVar(&c.timeout, "replica-timeout", 5*time.Second, "cluster volume: how long a replica may take to answer before it is taken out of the write path (its chunks are marked for rebuild) and reads move on")
	fs.DurationVar(&c.ttl, "lease-ttl", 10*time.Second, "cluster volume: attach lock lease; after a crash the volume can be attached elsewhere once it expires")
}

// clusterOnly marks the named flags of fs, in its help, as being for
// cluster volumes only.
func clusterOnly(fs *pflag.FlagSet, names ...string) {
	for _, n := range names {
		f := fs.Lookup(n)
		f.Usage = "cluster volume: " + f.Usage
	}
}

// clusterVolume is a replicated volume held under its attach lock.
type clusterVolume struct {
	*cluster.Volume
	ms    *meta.Client
	mu    sync.Mutex // guards lease (replaced after an etcd outage)
	lease *meta.AttachLease
	wg    sync.WaitGroup
	info  meta.Volume
	stop  context.CancelFunc
}

// openCluster takes the attach lock of volume name and opens it for I/O.
func openCluster(ctx context.Context, name string, cf clusterFlags, log *slog.Logger) (*clusterVolume, error) {
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
	holder := fmt.Sprintf("torusblk pid %d on %s", os.Getpid(), host)
	lease, err := ms.Attach(ctx, name, holder, cf.ttl)
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
	if cf.localNode == "" {
		if nodes, err := ms.Nodes(ctx); err == nil {
			cf.localNode = localNode(nodes, host, log)
		}
	}
	vol, err := cluster.Open(ctx, ms.Guarded(lease), lease.Volume(), cluster.Options{
		Holder:    holder,
		TLS:       tlsConf.Client,
		Epoch:     lease.Epoch(),
		LocalNode: cf.localNode,
		Timeout:   cf.timeout,
		Logger:    log,
	})
	if err != nil {
		rctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		lease.Release(rctx)
		cancel()
		ms.Close()
		return nil, fmt.Errorf("opening volume %s: %w", name, err)
	}
	wctx, stop := context.WithCancel(context.Background())
	cv := &clusterVolume{Volume: vol, ms: ms, lease: lease, info: lease.Volume(), stop: stop}
	cv.wg.Add(2)
	go cv.keepLock(wctx, name, cf.ttl, log)
	// Requests to the nodes leave every P idle while they wait; the
	// keeper spares the runtime a sysmon wake-up on each (internal/procs).
	go func() {
		defer cv.wg.Done()
		new(procs.Keeper).Keep(wctx)
	}()
	log.Info("attached cluster volume", "volume", name, "id", cv.info.ID, "replication", cv.info.Replication, "epoch", lease.Epoch())
	return cv, nil
}

// keepLock takes the attach lock back when its lease is lost (etcd was
// unreachable for longer than the lease). I/O goes on meanwhile: the nodes
// keep accepting our epoch until someone else attaches and fences them.
// Once etcd answers, the lock is taken back with the same epoch if nobody
// attached in between (meta.AttachLease.Reattach); if someone did, the
// volume is fenced for good and every I/O fails until it is detached.
func (v *clusterVolume) keepLock(ctx context.Context, name string, ttl time.Duration, log *slog.Logger) {
	defer v.wg.Done()
	for {
		v.mu.Lock()
		lease := v.lease
		v.mu.Unlock()
		select {
		case <-ctx.Done():
			return
		case <-lease.Lost():
		}
		log.Error("attach lock lost (etcd unreachable longer than the lease); I/O goes on, taking the lock back when etcd answers unless another process attached meanwhile",
			"volume", name, "epoch", lease.Epoch())
		for {
			select {
			case <-ctx.Done():
				return
			case <-time.After(time.Second):
			}
			if err := v.Volume.Fenced(); err != nil {
				log.Error("volume fenced for good while its attach lock was lost; not taking the lock back: detach it",
					"volume", name, "err", err)
				return
			}
			actx, cancel := context.WithTimeout(ctx, 5*time.Second)
			nl, err := lease.Reattach(actx, ttl)
			cancel()
			if errors.Is(err, meta.ErrNotHolder) {
				v.Volume.Fence(err)
				log.Error("another process attached this volume while etcd was unreachable: this one is fenced for good and every I/O fails (EIO); detach it",
					"volume", name, "epoch", lease.Epoch(), "err", err)
				return
			}
			if err != nil {
				log.Debug("taking the attach lock back", "volume", name, "err", err)
				continue
			}
			v.mu.Lock()
			v.lease = nl
			v.mu.Unlock()
			log.Info("attach lock taken back: nobody attached meanwhile", "volume", name, "epoch", nl.Epoch())
			break
		}
	}
}

// Close closes the volume, then releases the attach lock and etcd.
func (v *clusterVolume) Close() error {
	err := v.Volume.Close()
	v.stop()
	v.wg.Wait()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	v.mu.Lock()
	lease := v.lease
	v.mu.Unlock()
	if rerr := lease.Release(ctx); rerr != nil {
		err = errors.Join(err, fmt.Errorf("releasing the attach lock: %w", rerr))
	}
	v.ms.Close()
	return err
}

// localNode picks the node on this host whose replica reads prefer: the
// first node registered with this host name (torusd --host defaults to it),
// else the first whose unix socket is on this machine (a dev cluster's
// nodes carry made-up host labels). The replicated volume checks, before it
// uses the socket, that the node behind it is that node. "" when there is none.
func localNode(nodes []meta.Node, host string, log *slog.Logger) string {
	nodes = slices.Clone(nodes)
	slices.SortFunc(nodes, func(a, b meta.Node) int { return strings.Compare(a.ID, b.ID) })
	for _, n := range nodes {
		if n.Host == host {
			log.Info("reads prefer the node on this host", "node", n.ID)
			return n.ID
		}
	}
	for _, n := range nodes {
		if fi, err := os.Stat(n.Socket); n.Socket != "" && err == nil && fi.Mode().Type() == os.ModeSocket {
			log.Info("reads prefer the node whose socket is on this host", "node", n.ID, "socket", n.Socket)
			return n.ID
		}
	}
	return ""
}
