package meta

// What each storage node holds, per volume: the space records torusctl
// adds up for `volume list`, `volume info` and `snapshot list`.
//
//	PREFIX/v1/usage/NODE  JSON NodeUsage, attached to the node's registration lease
//
// Invariants:
//   - A usage record is written only under the lease its node's registration
//     key lives under, in a transaction that compares that key's lease, so a
//     record exists only while its node is registered and vanishes with it
//     (a node that is down has no record: readers count the nodes that
//     reported rather than under-count silently).
//   - A record describes one listing of the node's store (store.Chunks) read
//     against one VolumeSet: Head and Copies count chunks with a slot on
//     the node, replicas included, so summing over nodes gives the raw bytes
//     on disk, not the volume's data.
//   - Only[s] counts the snapshot copies that serve live snapshot s and no
//     other live snapshot (a copy c serves the snapshots in (p, c], p the
//     next lower copy of the same chunk on that node): the chunks deleting
//     s gives back on that node. Copies serving no live snapshot (garbage
//     the collector has not freed yet) and copies numbered above the
//     volume's SnapSeq in that VolumeSet are in Copies and in no Only.
//   - A record stays below maxUsageRecord bytes: a node with too many
//     volumes and snapshots drops the Only breakdowns and sets Partial.
//   - Registration.PutUsage writes only when the record or the lease
//     changed, so an idle node costs etcd nothing.

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// maxUsageRecord bounds the encoded size of a usage record, far below
// etcd's request limit (1.5 MiB by default).
const maxUsageRecord = 256 << 10

// NodeUsage is what one storage node holds, as of its last listing of its
// store.
type NodeUsage struct {
	// Node is the node's id.
	Node string `json:"node"`
	// ChunkSize is the bytes of every chunk the counts count.
	ChunkSize uint64 `json:"chunk_size"`
	// Volumes maps the id of every volume with a chunk on the node (except
	// deleted ones whose chunks wait for the collector) to its counts.
	Volumes map[uint64]VolumeUsage `json:"volumes,omitempty"`
	// Partial: the record would have been too large, so every Only was
	// left out (Head and Copies are complete).
	Partial bool `json:"partial,omitempty"`
}

// VolumeUsage is one volume's chunks on one node.
type VolumeUsage struct {
	// Head is the number of the volume's live chunks (snapshot 0).
	Head uint64 `json:"head"`
	// Copies is the number of its snapshot copies.
	Copies uint64 `json:"copies,omitempty"`
	// Only maps a live snapshot number to the copies held only by that
	// snapshot (see the invariants); snapshots with none are absent.
	Only map[uint64]uint64 `json:"only,omitempty"`
}

// usageKey is the key of node id's usage record.
func (s *Client) usageKey(id string) string { return s.kUsage + id }

// encodeUsage encodes u, without the Only breakdowns (and Partial set)
// when it would exceed maxUsageRecord.
func encodeUsage(u NodeUsage) (_ []byte, partial bool, err error) {
	b, err := json.Marshal(u)
	if err != nil || len(b) <= maxUsageRecord {
		return b, false, err
	}
	small := NodeUsage{Node: u.Node, ChunkSize: u.ChunkSize, Volumes: make(map[uint64]VolumeUsage, len(u.Volumes)), Partial: true}
	for id, v := range u.Volumes {
		small.Volumes[id] = VolumeUsage{Head: v.Head, Copies: v.Copies}
	}
	b, err = json.Marshal(small)
	return b, true, err
}

// PutUsage publishes u as the registered node's usage record, under the
// registration's current lease (so it goes when the node goes). It writes
// nothing when neither u nor the lease changed since the last write. It
// returns whether the record had to drop its Only breakdowns (Partial).
func (r *Registration) PutUsage(ctx context.Context, u NodeUsage) (partial bool, err error) {
	id := strings.TrimPrefix(r.key, r.s.kNodes)
	if u.Node != id {
		return false, fmt.Errorf("meta: usage of node %s: registered as %s: %w", u.Node, id, ErrInvalid)
	}
	b, partial, err := encodeUsage(u)
	if err != nil {
		return false, fmt.Errorf("meta: encode usage of node %s: %w", id, err)
	}
	r.mu.Lock()
	lease := r.lease
	same := lease == r.usageLease && string(b) == r.usage
	r.mu.Unlock()
	if same || lease == 0 {
		return partial, nil
	}
	resp, err := r.s.txn(ctx,
		[]clientv3.Cmp{clientv3.Compare(clientv3.LeaseValue(r.key), "=", lease)},
		[]clientv3.Op{clientv3.OpPut(r.s.usageKey(id), string(b), clientv3.WithLease(lease))}, nil)
	if err != nil {
		return partial, fmt.Errorf("meta: publish usage of node %s: %w", id, err)
	}
	if !resp.Succeeded {
		return partial, fmt.Errorf("meta: publish usage of node %s: its registration changed lease: %w", id, ErrConflict)
	}
	r.mu.Lock()
	r.usage, r.usageLease = string(b), lease
	r.mu.Unlock()
	return partial, nil
}

// Usage returns the usage record of every node that published one and is
// registered, by node id.
func (s *Client) Usage(ctx context.Context) (map[string]NodeUsage, error) {
	resp, err := s.cli.Get(ctx, s.kUsage, clientv3.WithPrefix())
	if err != nil {
		return nil, fmt.Errorf("meta: read usage records: %w", err)
	}
	out := make(map[string]NodeUsage, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		var u NodeUsage
		if err := json.Unmarshal(kv.Value, &u); err != nil {
			return nil, fmt.Errorf("meta: decode usage record %s: %w", kv.Key, err)
		}
		out[strings.TrimPrefix(string(kv.Key), s.kUsage)] = u
	}
	return out, nil
}
