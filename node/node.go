package node

// Invariants of a running node (the order of start and stop):
//   - The node serves only after its store is open and every volume's fence
//     is raised to the epoch etcd holds, so a writer fenced while the node
//     was down cannot write through it.
//   - It registers (lease) only once it serves, and joins the ring only once
//     registered: a node in the registry answers on its address.
//   - The garbage collector (gc.go), the dead-node watcher (dead.go) and
//     the maintainer (maint.go) start once the node is in the ring and stop
//     first, before the store closes.
//   - Stop runs in reverse: stop serving (close the server), close the store
//     (waits for its ops, records a clean shutdown), then revoke the lease.
//     The ring keeps the node: a stopped node is a dead replica until it
//     comes back, not a reason to move its chunks.

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/torus-storage/torus/internal/units"
	"github.com/torus-storage/torus/meta"
	"github.com/torus-storage/torus/netquic"
	"github.com/torus-storage/torus/store"
)

// Config is what a node is started with (the flags of torusd).
type Config struct {
	DataDir    string
	Listen     string // host:port; port 0 picks one (or reuses the last one)
	Advertise  string // host:port clients dial; default Listen
	Size       int64
	Zone, Host string
	ID         string
	ClusterDir string // CA dir: issue a node certificate into DataDir/tls
	TLSDir     string // ready node TLS dir
	LeaseTTL   time.Duration
	// DeadTimeout: ring nodes unregistered longer are removed from the ring
	// (dead.go); 0 never removes them.
	DeadTimeout time.Duration
	// Socket is the unix socket clients on this host use instead of QUIC:
	// "" means DataDir/node.sock, "none" none.
	Socket string
	// Maintenance is how often the node looks for volumes no client holds
	// that need a rebuild or a move (maint.go); 0 never.
	Maintenance time.Duration
	// MaintenanceDelay is how long such a volume must stay free before the
	// node takes it.
	MaintenanceDelay time.Duration
	// RebuildRate bounds the bytes per second one maintenance job copies
	// (0: the replicated volume's default).
	RebuildRate int64
	// OpenMaintenance opens a volume for a maintenance job; required unless
	// Maintenance is 0.
	OpenMaintenance OpenMaintenance
	// NearFull is the ratio of used to total store space at or above which
	// the node warns (log, registration) that it is nearly full, before it
	// refuses writes; 0 means DefaultNearFull. It must be in (0, 1).
	NearFull float64
	// UsageInterval is how often the node lists its store to publish its
	// usage per volume (usage.go), besides after every garbage-collection
	// pass; 0 means DefaultUsageInterval.
	UsageInterval time.Duration
}

// DefaultNearFull is the near-full ratio of a node whose Config gives none.
const DefaultNearFull = 0.85

// DefaultMaintenance is how often a node looks for volumes to maintain;
// DefaultMaintenanceDelay how long a volume must be free first.
const (
	DefaultMaintenance      = 5 * time.Second
	DefaultMaintenanceDelay = 30 * time.Second
)

// ErrConfig marks an error in a node's Config (what torusd reports as a
// usage error).
var ErrConfig = errors.New("bad node config")

// socketName is the node's unix socket in its data dir.
const socketName = "node.sock"

// maxSocketPath is the longest path a unix socket address holds
// (sun_path is 108 bytes with the terminating NUL).
const maxSocketPath = 107

// Node is a running storage node.
type Node struct {
	id    identity
	addr  string // advertised address
	store *store.Store
	srv   *netquic.Server
	local *netquic.Server // unix socket for clients on this host; nil without
	cs    *Server
	reg   *meta.Registration
	gc    *collector
	dead  *deadWatch  // nil without --dead-timeout
	maint *maintainer // nil without --maintenance-interval
	log   *slog.Logger
	// nearFull is the ratio of used to total slots at or above which the
	// node reports itself nearly full (Config.NearFull).
	nearFull float64
	// usagePartial: the last usage record published lacked the per
	// snapshot breakdown (logged once); the collector's goroutine only.
	usagePartial bool

	stopReport context.CancelFunc
	reported   chan struct{}
	epochsDone chan struct{} // watchEpochs ended (stopped with stopReport)
}

// Start starts a storage node of the cluster behind ms: it returns once
// the node serves, is registered and is in the ring.
func Start(ctx context.Context, ms *meta.Client, cfg meta.Config, nc Config, log *slog.Logger) (_ *Node, err error) {
	if nc.Maintenance > 0 && nc.OpenMaintenance == nil {
		return nil, fmt.Errorf("%w: maintenance every %v but no OpenMaintenance", ErrConfig, nc.Maintenance)
	}
	if nc.NearFull == 0 {
		nc.NearFull = DefaultNearFull
	}
	if !(nc.NearFull > 0 && nc.NearFull < 1) {
		return nil, fmt.Errorf("%w: --near-full %v: want a ratio between 0 and 1 (example: --near-full 0.85)", ErrConfig, nc.NearFull)
	}
	if nc.UsageInterval < 0 {
		return nil, fmt.Errorf("%w: --usage-interval %v: want a positive duration", ErrConfig, nc.UsageInterval)
	}
	if nc.UsageInterval == 0 {
		nc.UsageInterval = DefaultUsageInterval
	}
	if nc.Size < int64(cfg.ChunkSize) {
		return nil, fmt.Errorf("%w: --size %s is below the cluster's chunk size %s",
			ErrConfig, units.FormatSize(nc.Size), units.FormatSize(int64(cfg.ChunkSize)))
	}
	listenHost, _, err := net.SplitHostPort(nc.Listen)
	if err != nil {
		return nil, fmt.Errorf("%w: --listen %q: %v (example: --listen 10.0.0.5:7000)", ErrConfig, nc.Listen, err)
	}
	adv := nc.Advertise
	if adv == "" {
		adv = nc.Listen
	}
	advHost, _, err := net.SplitHostPort(adv)
	if err != nil {
		return nil, fmt.Errorf("%w: --advertise %q: %v (example: --advertise 10.0.0.5:7000)", ErrConfig, adv, err)
	}
	if ip := net.ParseIP(advHost); advHost == "" || ip != nil && ip.IsUnspecified() {
		return nil, fmt.Errorf("%w: --listen %s binds every address: pass --advertise HOST:PORT, the address clients dial",
			ErrConfig, nc.Listen)
	}

	id, err := prepareDataDir(nc.DataDir, nc.ID, cfg.ClusterID)
	if err != nil {
		return nil, err
	}
	log = log.With("node", id.NodeID)
	tc, err := nodeTLS(nc, id.NodeID, []string{advHost, listenHost})
	if err != nil {
		return nil, err
	}
	st, err := openStore(nc.DataDir, nc.Size, int64(cfg.ChunkSize), cfg.ClusterID, log)
	if err != nil {
		return nil, err
	}
	n := &Node{id: id, store: st, log: log, nearFull: nc.NearFull}
	defer func() {
		if err != nil {
			n.Stop(context.WithoutCancel(ctx))
		}
	}()

	inc, err := incarnation(nc.DataDir)
	if err != nil {
		return nil, err
	}
	n.cs = NewServer(st, ServerOptions{NodeID: id.NodeID, Logger: log, Incarnation: inc})
	if err := n.raiseEpochs(ctx, ms); err != nil {
		return nil, err
	}
	if err := markLost(ctx, ms, nc.DataDir, id.NodeID, log); err != nil {
		return nil, err
	}
	if err := recordBoot(nc.DataDir); err != nil {
		return nil, err
	}
	listen := nc.Listen
	if _, port, _ := net.SplitHostPort(listen); port == "0" && id.Addr != "" {
		// Reuse the last port, so a restarted dev node keeps its address.
		if _, last, err := net.SplitHostPort(id.Addr); err == nil {
			if srv, err := netquic.Listen(net.JoinHostPort(listenHost, last), tc.Server, n.cs, nil); err == nil {
				n.srv = srv
			} else {
				log.Warn("last port is taken, picking another", "port", last, "err", err)
			}
		}
	}
	if n.srv == nil {
		if n.srv, err = netquic.Listen(listen, tc.Server, n.cs, nil); err != nil {
			if errors.Is(err, syscall.EADDRINUSE) {
				return nil, fmt.Errorf("listen on %s: the port is in use (another torusd?): pick another --listen: %w", listen, err)
			}
			return nil, fmt.Errorf("listen on %s: %w", listen, err)
		}
	}
	_, port, _ := net.SplitHostPort(n.srv.Addr().String())
	_, advPort, _ := net.SplitHostPort(adv)
	if advPort == "0" {
		advPort = port
	}
	n.addr = net.JoinHostPort(advHost, advPort)
	if id.Addr != n.addr {
		id.Addr = n.addr
		if err := writeIdentity(nc.DataDir, id); err != nil {
			return nil, err
		}
		n.id = id
	}

	sock, err := n.listenLocal(nc)
	if err != nil {
		return nil, err
	}
	stats := st.Stats()
	mn := meta.Node{ID: id.NodeID, Addr: n.addr, Socket: sock, Capacity: uint64(stats.Slots * stats.ChunkSize), Zone: nc.Zone, Host: nc.Host,
		NearFullRatio: nc.NearFull}
	if n.reg, err = register(ctx, ms, mn, nc.LeaseTTL, log); err != nil {
		return nil, err
	}
	r, err := ms.JoinRing(ctx, mn)
	if err != nil {
		return nil, fmt.Errorf("join the ring: %w", err)
	}
	// Volumes attached between the first read and the join fenced only the
	// nodes then in the ring: read the epochs again.
	if err := n.raiseEpochs(ctx, ms); err != nil {
		return nil, err
	}
	rctx, cancel := context.WithCancel(context.Background())
	n.stopReport, n.reported = cancel, make(chan struct{})
	go n.reportUsage(rctx, mn)
	n.epochsDone = make(chan struct{})
	go n.watchEpochs(rctx, ms)
	n.gc = startCollector(ctx, st, ms, log, n.publishUsage, nc.UsageInterval)
	n.dead = startDeadWatch(ctx, ms, id.NodeID, nc.DeadTimeout, log)
	n.maint = startMaintainer(ctx, ms, nc.OpenMaintenance, id.NodeID, tc.Client, nc.Maintenance, nc.MaintenanceDelay, nc.LeaseTTL, nc.RebuildRate, log)
	log.Info("node ready", "addr", n.addr, "listen", n.srv.Addr().String(), "socket", sock, "capacity",
		units.FormatSize(int64(mn.Capacity)), "zone", nc.Zone, "host", nc.Host, "ring_version", r.Version(),
		"ring_nodes", r.Len())
	return n, nil
}

// listenLocal serves the node's requests on its unix socket too (the same
// handler, so the same epochs, fences and incarnation) and returns the
// socket's path, or "" when there is none.
func (n *Node) listenLocal(nc Config) (string, error) {
	path := nc.Socket
	switch path {
	case "none":
		return "", nil
	case "":
		path = filepath.Join(nc.DataDir, socketName)
	}
	path, err := filepath.Abs(path)
	if err != nil {
		return "", err
	}
	if len(path) > maxSocketPath {
		if nc.Socket == "" {
			n.log.Warn("no unix socket: the data dir's path is too long for one; clients on this host use QUIC (give a shorter --socket)",
				"path", path, "max", maxSocketPath)
			return "", nil
		}
		return "", fmt.Errorf("%w: --socket %s: longer than %d bytes, the most a unix socket address holds", ErrConfig, path, maxSocketPath)
	}
	srv, err := netquic.Listen(path, nil, n.cs, &netquic.Options{Transport: netquic.TransportUnix, Logger: n.log})
	if err != nil {
		return "", fmt.Errorf("unix socket: %w (pick another --socket, or --socket none)", err)
	}
	n.local = srv
	return path, nil
}

// raiseEpochs raises every volume's fence to the epoch in etcd.
func (n *Node) raiseEpochs(ctx context.Context, ms *meta.Client) error {
	eps, err := ms.Epochs(ctx)
	if err != nil {
		return fmt.Errorf("read volume epochs: %w", err)
	}
	for vol, e := range eps {
		n.cs.RaiseEpoch(vol, e)
	}
	return nil
}

// watchEpochs raises every volume's fence whenever a holder takes a new
// epoch in etcd, so the node refuses the previous holder even if it never
// got the new holder's fence (the client could not reach it).
func (n *Node) watchEpochs(ctx context.Context, ms *meta.Client) {
	defer close(n.epochsDone)
	for eps := range ms.WatchEpochs(ctx) {
		for vol, e := range eps {
			n.cs.RaiseEpoch(vol, e)
		}
	}
}

// nodeTLS loads the node's TLS configuration from --tls-dir, or from
// DATA/tls, issuing its certificate there with the CA of --cluster-dir on
// first start.
func nodeTLS(nc Config, nodeID string, hosts []string) (*netquic.TLSConfigs, error) {
	dir := nc.TLSDir
	if dir == "" {
		dir = filepath.Join(nc.DataDir, tlsSubdir)
		if _, err := os.Stat(filepath.Join(dir, netquic.NodeKeyFile)); errors.Is(err, os.ErrNotExist) {
			if _, err := os.Stat(filepath.Join(nc.ClusterDir, netquic.CAKeyFile)); err != nil {
				return nil, fmt.Errorf("--cluster-dir %s: no CA key (%v): pass the directory given to 'torusctl init --cluster-dir', "+
					"or --tls-dir with a node certificate", nc.ClusterDir, err)
			}
			var hs []string
			for _, h := range hosts {
				if h != "" && !contains(hs, h) {
					hs = append(hs, h)
				}
			}
			if err := netquic.IssueCert(nc.ClusterDir, nodeID, hs, dir); err != nil {
				return nil, fmt.Errorf("issue the node certificate: %w", err)
			}
		}
	}
	tc, err := netquic.LoadTLS(dir)
	if err != nil {
		return nil, fmt.Errorf("load node TLS from %s: %w", dir, err)
	}
	return tc, nil
}

func contains(ss []string, s string) bool {
	for _, x := range ss {
		if x == s {
			return true
		}
	}
	return false
}

// register registers n, retrying while a previous lease on its id lives
// (a node restarted after kill -9: its old lease expires within the TTL).
func register(ctx context.Context, ms *meta.Client, n meta.Node, ttl time.Duration, log *slog.Logger) (*meta.Registration, error) {
	deadline := time.Now().Add(ttl + 2*time.Second)
	d := 200 * time.Millisecond
	for {
		reg, err := ms.RegisterNode(ctx, n, ttl)
		if err == nil {
			return reg, nil
		}
		if !errors.Is(err, meta.ErrExists) || time.Now().After(deadline) {
			return nil, fmt.Errorf("register node: %w", err)
		}
		log.Info("waiting for the previous lease of this node to expire", "err", err, "retry_in", d)
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("register node: %w", ctx.Err())
		case <-time.After(d):
		}
		d = min(2*d, 2*time.Second)
	}
}

// Stop shuts the node down (see the invariants at the top of the file).
func (n *Node) Stop(ctx context.Context) error {
	var errs []error
	if n.stopReport != nil {
		n.stopReport()
		<-n.reported
		<-n.epochsDone
	}
	n.maint.close()
	if n.gc != nil {
		n.gc.close()
	}
	n.dead.close()
	if n.srv != nil {
		if err := n.srv.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close server: %w", err))
		}
	}
	if n.local != nil {
		if err := n.local.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close unix socket: %w", err))
		}
	}
	if n.store != nil {
		if err := n.store.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close store: %w", err))
		}
	}
	if n.reg != nil {
		rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		if err := n.reg.Close(rctx); err != nil {
			errs = append(errs, fmt.Errorf("unregister: %w", err))
		}
		cancel()
	}
	err := errors.Join(errs...)
	if err != nil {
		n.log.Error("node stopped with errors", "err", err)
	} else {
		n.log.Info("node stopped")
	}
	return err
}

// usageEvery is how often a node publishes its usage in its registration.
const usageEvery = 5 * time.Second

// isNearFull reports whether st's used slots are at or above the node's
// near-full ratio of its slots.
func (n *Node) isNearFull(st store.StoreStats) bool {
	return st.Slots > 0 && n.nearFull > 0 && float64(st.UsedSlots) >= n.nearFull*float64(st.Slots)
}

// reportUsage keeps the registration's Used, NoSpace, Full and NearFull
// current (checked every usageEvery, written when they change), so torusctl
// shows a nearly full and a full node, and shows it recovered once space is
// freed. It logs a warning when the node crosses its near-full ratio.
func (n *Node) reportUsage(ctx context.Context, mn meta.Node) {
	defer close(n.reported)
	t := time.NewTicker(usageEvery)
	defer t.Stop()
	var lastRefusal time.Time
	published, near := false, false
	for {
		st := n.store.Stats()
		ns := n.cs.Stats().NoSpace
		if ns > mn.NoSpace {
			lastRefusal = time.Now()
		}
		next := mn
		next.Used, next.NoSpace = uint64(st.UsedSlots*st.ChunkSize), ns
		next.Full = st.UsedSlots >= st.Slots || time.Since(lastRefusal) < 2*usageEvery
		next.NearFull = n.isNearFull(st)
		if next.NearFull != near {
			near = next.NearFull
			capacity := units.FormatSize(st.Slots * st.ChunkSize)
			if near {
				n.log.Warn("node is nearly full: free space (delete snapshots or volumes) or add nodes before it refuses writes",
					"used", units.FormatSize(int64(next.Used)), "capacity", capacity, "near_full", n.nearFull)
			} else {
				n.log.Info("node is below its near-full ratio again", "used", units.FormatSize(int64(next.Used)), "capacity", capacity,
					"near_full", n.nearFull)
			}
		}
		if !published || next != mn {
			uctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			err := n.reg.Update(uctx, next)
			cancel()
			if err == nil {
				if next.Full != mn.Full {
					n.log.Warn("node space state", "full", next.Full, "used", units.FormatSize(int64(next.Used)), "no_space_writes", ns)
				}
				mn, published = next, true
			} else if ctx.Err() == nil {
				n.log.Debug("usage not published", "err", err)
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}
