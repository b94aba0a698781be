package node

// Maintenance of volumes no client holds: missed chunks rebuilt, ring
// changes turned into moves and the chunks moved, so the cluster repairs
// itself with no client attached.
//
// Invariants:
//   - Each volume is maintained by one live node at a time: the node that
//     ranks first for the volume among the registered nodes (rendezvous
//     hashing, so the work spreads over the nodes and moves only for the
//     volumes of a node that joins or leaves), and only under the volume's
//     attach lock taken as a maintenance lock (meta.AttachMaintenance),
//     whose epoch fences any earlier holder. A node that dies mid-job loses
//     its lease within its TTL; the next-ranked node then takes the job.
//   - The job is the client's own machinery (Config.OpenMaintenance: torusd
//     passes package cluster's Open) under the maintenance epoch: it records pending ring changes, loads the marks
//     and runs the rebuild and move loops, and ends when no mark and no move
//     is left.
//   - A volume is taken only after it was seen free (work, no holder) for
//     the maintenance delay: a client whose lease lapsed while etcd was out
//     of its reach takes its lock back first, with its own epoch.
//   - A client attaching takes the maintenance lock over (meta.Attach): the
//     job sees its lease lost and stops; the client's epoch fences the
//     job's writes on the nodes, and its marks and moves in etcd are where
//     the client continues from.

import (
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"hash/fnv"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/torus-storage/torus/engine"
	"github.com/torus-storage/torus/meta"
)

// MaintenanceOptions are what a maintenance job opens its volume with.
type MaintenanceOptions struct {
	// TLS is the node's client configuration.
	TLS *tls.Config
	// Epoch is the attach epoch of the job's maintenance lock.
	Epoch uint64
	// LocalNode is this node's id: requests to it take its unix socket.
	LocalNode string
	// Logger receives the job's events.
	Logger *slog.Logger
	// RebuildRate bounds the bytes per second the job copies.
	RebuildRate int64
	// Holder names the job in the volume's progress records.
	Holder string
}

// A MaintenanceJob is the volume a maintenance job opened: the replicated
// volume's own machinery, which rebuilds marked chunks and moves chunks to
// their owners in the background until it is closed.
type MaintenanceJob interface {
	// Pending reports whether a mark or a move is left, and the chunk
	// copies rebuilt and moved so far.
	Pending() (pending bool, rebuilt uint64, moved int64)
	// Close stops the job's work and closes the volume.
	Close() error
}

// OpenMaintenance opens volume vol through ms (guarded by the job's lock)
// for a maintenance job. torusd passes the replicated volume's Open (package
// cluster), so a node does not depend on the client's package.
type OpenMaintenance func(ctx context.Context, ms *meta.Client, vol meta.Volume, opt MaintenanceOptions) (MaintenanceJob, error)

// maintainer runs the maintenance jobs of the volumes this node ranks first
// for.
type maintainer struct {
	ms       *meta.Client
	open     OpenMaintenance
	self     string
	tls      *tls.Config
	log      *slog.Logger
	interval time.Duration
	delay    time.Duration
	ttl      time.Duration
	rate     int64

	mu      sync.Mutex
	running map[uint64]bool
	free    map[uint64]time.Time // volumes with work and no holder: since when seen so

	jobs, finished, preempted atomic.Uint64 // started, ended with nothing left, taken over by a client

	stop context.CancelFunc
	wg   sync.WaitGroup
}

// startMaintainer checks every interval which volumes need work and starts
// a job for each that this node ranks first for. nil when interval is 0.
func startMaintainer(ctx context.Context, ms *meta.Client, open OpenMaintenance, self string, clientTLS *tls.Config, interval, delay, ttl time.Duration, rate int64, log *slog.Logger) *maintainer {
	if interval <= 0 {
		return nil
	}
	ctx, stop := context.WithCancel(context.WithoutCancel(ctx))
	m := &maintainer{ms: ms, open: open, self: self, tls: clientTLS, log: log.With("component", "maintenance"), interval: interval,
		delay: delay, ttl: ttl, rate: rate, running: make(map[uint64]bool), free: make(map[uint64]time.Time), stop: stop}
	m.wg.Go(func() {
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			m.pass(ctx)
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
		}
	})
	return m
}

// close stops every job (each closes its volume and releases its lock).
func (m *maintainer) close() {
	if m == nil {
		return
	}
	m.stop()
	m.wg.Wait()
}

// pass starts the jobs this node should run.
func (m *maintainer) pass(ctx context.Context) {
	rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	work, err := m.ms.Work(rctx)
	var nodes []meta.Node
	if err == nil {
		nodes, err = m.ms.Nodes(rctx)
	}
	cancel()
	if err != nil {
		if ctx.Err() == nil {
			m.log.Warn("maintenance: cannot read the cluster's state; retrying", "err", err)
		}
		return
	}
	now := time.Now()
	m.mu.Lock()
	for id := range m.free {
		if w, ok := work[id]; !ok || !w.Needed() || w.Holder != "" {
			delete(m.free, id)
		}
	}
	m.mu.Unlock()
	for id, w := range work {
		if !w.Needed() || w.Holder != "" || rank(id, nodes) != m.self {
			continue
		}
		m.mu.Lock()
		since, seen := m.free[id]
		if !seen {
			m.free[id] = now
			since = now
		}
		// A client whose lease lapsed (etcd briefly out of its reach)
		// takes its lock back with the same epoch unless someone else
		// attached: give it the delay before a job would fence it.
		busy := m.running[id] || now.Sub(since) < m.delay
		if !busy {
			m.running[id] = true
			delete(m.free, id)
		}
		m.mu.Unlock()
		if busy {
			continue
		}
		m.wg.Go(func() {
			defer func() {
				m.mu.Lock()
				delete(m.running, id)
				m.mu.Unlock()
			}()
			m.run(ctx, w)
		})
	}
}

// rank returns the node that maintains volume vol: the highest rendezvous
// hash of (vol, node id) among the registered nodes.
func rank(vol uint64, nodes []meta.Node) string {
	best, bestH := "", uint64(0)
	for _, n := range nodes {
		h := fnv.New64a()
		var b [8]byte
		binary.LittleEndian.PutUint64(b[:], vol)
		h.Write(b[:])
		h.Write([]byte(n.ID))
		if v := mix(h.Sum64()); best == "" || v > bestH {
			best, bestH = n.ID, v
		}
	}
	return best
}

// mix is splitmix64's finaliser: FNV's low bits alone spread poorly.
func mix(x uint64) uint64 {
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	return x ^ x>>31
}

// run is one job: the volume opened under a maintenance lock until it has
// no mark and no move left, or a client takes the lock over.
func (m *maintainer) run(ctx context.Context, w meta.VolumeWork) {
	name := w.Volume.Name
	holder := "maintenance by node " + m.self
	actx, cancel := context.WithTimeout(ctx, 10*time.Second)
	lease, err := m.ms.AttachMaintenance(actx, name, holder, m.ttl)
	cancel()
	if err != nil {
		m.log.Debug("maintenance: volume not taken", "volume", name, "err", err)
		return
	}
	defer func() {
		rctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		lease.Release(rctx)
		cancel()
	}()
	m.jobs.Add(1)
	start := time.Now()
	m.log.Info("maintenance: started", "volume", name, "missed", w.Missed, "moving", w.Moving, "ring_behind", w.Behind, "epoch", lease.Epoch())
	octx, cancel := context.WithTimeout(ctx, 60*time.Second)
	c, err := m.open(octx, m.ms.Guarded(lease), lease.Volume(), MaintenanceOptions{
		TLS: m.tls, Epoch: lease.Epoch(), LocalNode: m.self, Logger: m.log, RebuildRate: m.rate, Holder: holder,
	})
	cancel()
	if err != nil {
		select {
		case <-lease.Lost():
		default:
			if !errors.Is(err, engine.ErrFenced) {
				m.log.Warn("maintenance: cannot open the volume; retrying later", "volume", name, "err", err)
				return
			}
		}
		m.preempted.Add(1)
		m.log.Info("maintenance: yielded the volume", "volume", name, "after", time.Since(start).Round(time.Millisecond))
		return
	}
	t := time.NewTicker(250 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			c.Close()
			return
		case <-lease.Lost():
			// A client attached (or etcd lost the lease): its epoch fences
			// what this job still sends; stop at once.
			c.Close()
			m.preempted.Add(1)
			m.log.Info("maintenance: yielded the volume", "volume", name, "after", time.Since(start).Round(time.Millisecond))
			return
		case <-t.C:
		}
		if pending, rebuilt, moved := c.Pending(); !pending {
			err := c.Close()
			m.finished.Add(1)
			m.log.Info("maintenance: volume repaired", "volume", name, "took", time.Since(start).Round(time.Millisecond),
				"rebuilt", rebuilt, "moved", moved, "close_err", err)
			return
		}
	}
}

// stat reads one of m's counters with f (0 without maintenance).
func (m *maintainer) stat(f func(*maintainer) uint64) uint64 {
	if m == nil {
		return 0
	}
	return f(m)
}

// runningJobs is the number of jobs running (0 without maintenance).
func (m *maintainer) runningJobs() uint64 {
	if m == nil {
		return 0
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	return uint64(len(m.running))
}
