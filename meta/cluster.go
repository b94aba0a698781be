package meta

// Invariants of the cluster-wide operations in this file:
//   - The config key changes after Init only through SetReplication, by
//     compare-and-swap on its mod revision; ClusterID, ChunkSize and Created
//     never change.
//   - JoinRing changes the ring only through CASRing, building the next ring
//     with ring.Next (so its Version grows by one), and writes nothing when
//     the ring already holds the node as given: a restarting node does not
//     bump the ring version. RemoveNode likewise, and only when the ring
//     holds the node.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/torus-storage/torus/ring"
)

// SetReplication changes the cluster's default replication (the number of
// copies of a chunk of volumes created afterwards) to r. It refuses r < 1
// with ErrInvalid; checking that the ring has enough nodes is the caller's
// business. Volumes already created keep their own replication.
func (s *Client) SetReplication(ctx context.Context, r int) error {
	if r < 1 {
		return fmt.Errorf("meta: set replication %d: must be at least 1: %w", r, ErrInvalid)
	}
	for range maxTries {
		resp, err := s.cli.Get(ctx, s.kConfig)
		if err != nil {
			return fmt.Errorf("meta: set replication: read config: %w", err)
		}
		if len(resp.Kvs) == 0 {
			return fmt.Errorf("meta: prefix %s: %w: run init first", s.prefix, ErrNotInitialized)
		}
		var cfg Config
		if err := json.Unmarshal(resp.Kvs[0].Value, &cfg); err != nil {
			return fmt.Errorf("meta: set replication: decode config: %w", err)
		}
		if cfg.Replication == r {
			return nil
		}
		cfg.Replication = r
		js, err := json.Marshal(cfg)
		if err != nil {
			return fmt.Errorf("meta: set replication: %w", err)
		}
		tr, err := s.txn(ctx,
			[]clientv3.Cmp{clientv3.Compare(clientv3.ModRevision(s.kConfig), "=", resp.Kvs[0].ModRevision)},
			[]clientv3.Op{clientv3.OpPut(s.kConfig, string(js))}, nil)
		if err != nil {
			return fmt.Errorf("meta: set replication %d: %w", r, err)
		}
		if tr.Succeeded {
			return nil
		}
		// The config changed under us: re-read and retry.
	}
	return fmt.Errorf("meta: set replication %d: contended %d times: %w", r, maxTries, ErrConflict)
}

// Epochs returns the last attach epoch of every volume that was ever
// attached, by volume id. A storage node raises its fences to these at
// start-up, before it serves, so a writer fenced while the node was down
// stays fenced, and again on every change (WatchEpochs).
func (s *Client) Epochs(ctx context.Context) (map[uint64]uint64, error) {
	eps, _, err := s.epochs(ctx)
	return eps, err
}

// WatchEpochs delivers the attach epochs of every volume (as Epochs) now
// and again after every change, until ctx is done, when the channel is
// closed. A slow reader gets only the latest map. It never gives up: after
// a compaction, a watch error or an unreachable etcd it re-reads and
// watches again. A storage node raises its fences from it, so a node that
// missed a new holder's fence (partitioned from the client, not from etcd)
// refuses the previous holder's writes all the same.
func (s *Client) WatchEpochs(ctx context.Context) <-chan map[uint64]uint64 {
	out := make(chan map[uint64]uint64, 1)
	go func() {
		defer close(out)
		s.watchRead(ctx, "epoch watch", s.kEpochs, func(ctx context.Context) (int64, error) {
			eps, rev, err := s.epochs(ctx)
			if err != nil {
				return 0, err
			}
			select { // replace a map the reader has not taken yet
			case <-out:
			default:
			}
			out <- eps
			return rev, nil
		})
	}()
	return out
}

func (s *Client) epochs(ctx context.Context) (map[uint64]uint64, int64, error) {
	resp, err := s.cli.Get(ctx, s.kEpochs, clientv3.WithPrefix())
	if err != nil {
		return nil, 0, fmt.Errorf("meta: read epochs: %w", err)
	}
	out := make(map[uint64]uint64, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		id, err := strconv.ParseUint(strings.TrimPrefix(string(kv.Key), s.kEpochs), 10, 64)
		if err != nil {
			return nil, 0, fmt.Errorf("meta: read epochs: corrupt key %q: %w", kv.Key, err)
		}
		e, err := strconv.ParseUint(string(kv.Value), 10, 64)
		if err != nil {
			return nil, 0, fmt.Errorf("meta: read epochs: corrupt epoch %q of volume %d: %w", kv.Value, id, err)
		}
		out[id] = e
	}
	return out, resp.Header.Revision, nil
}

// JoinRing makes n a member of the ring: it adds n, or updates its zone,
// host and capacity if the ring holds another version of it, and returns
// the resulting ring. When the ring already holds n as given it writes
// nothing and returns the current ring. It retries on concurrent ring
// changes (compare-and-swap) and fails with ErrConflict only after many.
// The node's address is not part of the ring (see Nodes for it).
func (s *Client) JoinRing(ctx context.Context, n Node) (*ring.Ring, error) {
	if err := validName("node id", n.ID); err != nil {
		return nil, err
	}
	if n.Capacity == 0 {
		return nil, fmt.Errorf("meta: join ring: node %s: capacity 0: %w", n.ID, ErrInvalid)
	}
	want := n.RingNode()
	for range maxTries {
		cur, rev, err := s.Ring(ctx)
		if err != nil {
			return nil, fmt.Errorf("meta: join ring: %w", err)
		}
		nodes := cur.Nodes()
		found := false
		for i, m := range nodes {
			if m.ID != want.ID {
				continue
			}
			if m == want {
				return cur, nil
			}
			nodes[i], found = want, true
		}
		if !found {
			nodes = append(nodes, want)
		}
		next, err := cur.Next(nodes)
		if err != nil {
			return nil, fmt.Errorf("meta: join ring: node %s: %w", n.ID, err)
		}
		err = s.CASRing(ctx, rev, next)
		if err == nil {
			return next, nil
		}
		if !errors.Is(err, ErrConflict) {
			return nil, fmt.Errorf("meta: join ring: node %s: %w", n.ID, err)
		}
	}
	return nil, fmt.Errorf("meta: join ring: node %s: ring contended %d times: %w", n.ID, maxTries, ErrConflict)
}

// RemoveNode takes the node called id out of the ring and returns the
// resulting ring (its Version one above the previous one). It fails with
// ErrNotFound if the ring does not hold id. It retries on concurrent ring
// changes (compare-and-swap) and fails with ErrConflict only after many.
// Whether enough nodes remain for the volumes' replication is the caller's
// business; the node's registration (if it still runs) is left alone.
func (s *Client) RemoveNode(ctx context.Context, id string) (*ring.Ring, error) {
	if err := validName("node id", id); err != nil {
		return nil, err
	}
	for range maxTries {
		cur, rev, err := s.Ring(ctx)
		if err != nil {
			return nil, fmt.Errorf("meta: remove node %s: %w", id, err)
		}
		nodes := cur.Nodes()
		keep := nodes[:0:0]
		for _, m := range nodes {
			if m.ID != id {
				keep = append(keep, m)
			}
		}
		if len(keep) == len(nodes) {
			return nil, fmt.Errorf("meta: remove node %s: not in the ring (version %d): %w", id, cur.Version(), ErrNotFound)
		}
		next, err := cur.Next(keep)
		if err != nil {
			return nil, fmt.Errorf("meta: remove node %s: %w", id, err)
		}
		err = s.CASRing(ctx, rev, next)
		if err == nil {
			return next, nil
		}
		if !errors.Is(err, ErrConflict) {
			return nil, fmt.Errorf("meta: remove node %s: %w", id, err)
		}
	}
	return nil, fmt.Errorf("meta: remove node %s: ring contended %d times: %w", id, maxTries, ErrConflict)
}
