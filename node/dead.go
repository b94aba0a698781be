package node

// Removal of dead nodes from the ring: a node of the ring
// that stays unregistered (its lease expired: the process is gone) longer
// than --dead-timeout is taken out of the ring, so the attached clients'
// rebalance copies its chunks to their new owners and the volumes get back
// to full replication without an operator.
//
// Invariants:
//   - Every node runs a watcher; they may race to remove the same node. The
//     removal is meta.RemoveNode (compare-and-swap on the ring), and a node
//     already gone (ErrNotFound) counts as done, so a race is harmless.
//   - A node's absence is timed from when this watcher first saw it missing,
//     never from an older timestamp: after a restart of the whole cluster,
//     or of this node, every other node gets the full timeout to come back.
//   - A watcher never removes its own node, never removes a node while etcd
//     cannot be read (an unreadable registry is not an empty one), and never
//     shrinks the ring below the cluster's replication: with fewer nodes the
//     chunks could not be re-replicated anyway, and the ring would lose the
//     only record of where the surviving copies are.

import (
	"context"
	"errors"
	"log/slog"
	"sync/atomic"
	"time"

	"github.com/torus-storage/torus/meta"
)

// DefaultDeadTimeout is how long a ring node may stay unregistered before
// it is removed from the ring.
const DefaultDeadTimeout = 10 * time.Minute

// deadWatch removes nodes gone longer than its timeout from the ring.
type deadWatch struct {
	ms      *meta.Client
	self    string
	timeout time.Duration
	log     *slog.Logger
	removed atomic.Uint64 // nodes this watcher removed (torus_dead_nodes_removed_total)
	missing map[string]*absence
	stop    context.CancelFunc
	done    chan struct{}
}

// absence is a ring node this watcher saw unregistered.
type absence struct {
	since time.Time // when this watcher first saw it missing
	kept  bool      // its removal was refused (replication) and logged
}

// startDeadWatch runs a watcher for node self until close. timeout <= 0
// returns nil: dead nodes are never removed.
func startDeadWatch(ctx context.Context, ms *meta.Client, self string, timeout time.Duration, log *slog.Logger) *deadWatch {
	if timeout <= 0 {
		return nil
	}
	ctx, stop := context.WithCancel(context.WithoutCancel(ctx))
	d := &deadWatch{ms: ms, self: self, timeout: timeout, log: log, missing: make(map[string]*absence),
		stop: stop, done: make(chan struct{})}
	go func() {
		defer close(d.done)
		t := time.NewTicker(min(max(timeout/10, 100*time.Millisecond), 30*time.Second))
		defer t.Stop()
		for {
			d.check(ctx, time.Now())
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
		}
	}()
	return d
}

// check compares the ring with the registry once.
func (d *deadWatch) check(ctx context.Context, now time.Time) {
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	r, _, err := d.ms.Ring(cctx)
	if err != nil {
		return // etcd unreachable: decide nothing
	}
	nodes, err := d.ms.Nodes(cctx)
	if err != nil {
		return
	}
	cfg, err := d.ms.Config(cctx)
	if err != nil {
		return
	}
	live := make(map[string]bool, len(nodes))
	for _, n := range nodes {
		live[n.ID] = true
	}
	inRing := make(map[string]bool, r.Len())
	size := r.Len()
	for _, rn := range r.Nodes() {
		id := rn.ID
		inRing[id] = true
		if live[id] || id == d.self {
			delete(d.missing, id)
			continue
		}
		a, ok := d.missing[id]
		if !ok {
			d.missing[id] = &absence{since: now}
			d.log.Warn("node of the ring is not registered; it is removed from the ring unless it is back in time",
				"dead_node", id, "dead_timeout", d.timeout)
			continue
		}
		since := a.since
		if now.Sub(since) < d.timeout {
			continue
		}
		if size-1 < cfg.Replication {
			if a.kept {
				continue
			}
			a.kept = true
			d.log.Error("node is dead but removing it would leave fewer nodes than the replication; start a node to replace it",
				"dead_node", id, "gone_for", now.Sub(since).Round(time.Second), "ring_nodes", size, "replication", cfg.Replication)
			continue
		}
		nr, err := d.ms.RemoveNode(cctx, id)
		switch {
		case err == nil:
			d.removed.Add(1)
			size = nr.Len()
			delete(d.missing, id)
			d.log.Error("DEAD NODE REMOVED FROM THE RING: unregistered longer than --dead-timeout; its chunks are re-replicated to the remaining nodes",
				"dead_node", id, "gone_for", now.Sub(since).Round(time.Second), "dead_timeout", d.timeout,
				"ring_version", nr.Version(), "ring_nodes", nr.Len())
		case errors.Is(err, meta.ErrNotFound):
			delete(d.missing, id) // another node removed it first
			size--
		default:
			d.log.Warn("cannot remove a dead node from the ring; retrying", "dead_node", id, "err", err)
		}
	}
	for id := range d.missing {
		if !inRing[id] {
			delete(d.missing, id)
		}
	}
}

// close stops the watcher and waits for it.
func (d *deadWatch) close() {
	if d == nil {
		return
	}
	d.stop()
	<-d.done
}

// total is the number of nodes this watcher removed.
func (d *deadWatch) total() uint64 {
	if d == nil {
		return 0
	}
	return d.removed.Load()
}
