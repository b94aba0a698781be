package meta

// What storage nodes read to decide which volumes need maintenance while no
// client holds them: missed marks to rebuild, a move in progress, ring
// changes not yet recorded for the volume.

import (
	"context"
	"encoding/json"
	"fmt"
	"strconv"
	"strings"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// VolumeWork is what a volume needs from maintenance.
type VolumeWork struct {
	Volume Volume
	// Missed counts the volume's missed marks (chunk copies to rebuild).
	Missed int
	// Moving is true while a moves record exists (a rebalance in progress).
	Moving bool
	// Behind is true when the ring changed since the volume's placement
	// was last recorded (its chunks must move).
	Behind bool
	// Holder is the attach lock's holder ("" when free); Maintenance tells
	// whether it is a storage node's maintenance lock.
	Holder      string
	Maintenance bool
}

// Needed reports whether the volume has work: marks, a move, a ring
// change to record, or a flatten asked for.
func (w VolumeWork) Needed() bool {
	return w.Missed > 0 || w.Moving || w.Behind || w.Volume.Parent != nil && w.Volume.Parent.Flatten
}

// Work reads, at one etcd revision, every volume with what it needs from
// maintenance and who holds its attach lock.
func (s *Client) Work(ctx context.Context) (map[uint64]VolumeWork, error) {
	resp, err := s.cli.Txn(ctx).Then(
		clientv3.OpGet(s.kVolumes+"0", clientv3.WithRange(s.kVolumes+":")),
		clientv3.OpGet(s.kMissed, clientv3.WithPrefix(), clientv3.WithKeysOnly()),
		clientv3.OpGet(s.kMoves, clientv3.WithPrefix(), clientv3.WithKeysOnly()),
		clientv3.OpGet(s.kPlaced, clientv3.WithPrefix()),
		clientv3.OpGet(s.kAttach, clientv3.WithPrefix()),
		clientv3.OpGet(s.kRing),
		clientv3.OpGet(s.ringsKey(0), clientv3.WithCountOnly()),
	).Commit()
	if err != nil {
		return nil, fmt.Errorf("meta: read maintenance work: %w", err)
	}
	out := make(map[uint64]VolumeWork)
	for _, kv := range resp.Responses[0].GetResponseRange().Kvs {
		var v Volume
		if err := json.Unmarshal(kv.Value, &v); err != nil {
			return nil, fmt.Errorf("meta: read maintenance work: volume %s: %w", kv.Key, err)
		}
		out[v.ID] = VolumeWork{Volume: v}
	}
	idOf := func(key, pfx string) (uint64, bool) {
		id, _, _ := strings.Cut(strings.TrimPrefix(key, pfx), "/")
		n, err := strconv.ParseUint(id, 10, 64)
		return n, err == nil
	}
	for _, kv := range resp.Responses[1].GetResponseRange().Kvs {
		if id, ok := idOf(string(kv.Key), s.kMissed); ok {
			if w, ok := out[id]; ok {
				w.Missed++
				out[id] = w
			}
		}
	}
	for _, kv := range resp.Responses[2].GetResponseRange().Kvs {
		if id, ok := idOf(string(kv.Key), s.kMoves); ok {
			if w, ok := out[id]; ok {
				w.Moving = true
				out[id] = w
			}
		}
	}
	var ringVer uint64
	if kvs := resp.Responses[5].GetResponseRange().Kvs; len(kvs) == 1 {
		r, err := decodeRing(kvs[0].Value)
		if err != nil {
			return nil, err
		}
		ringVer = r.Version()
	}
	// A volume placed at version 0 with no ring 0 kept was created before
	// any ring: it has no data under an older ring, nothing to move.
	noRing0 := resp.Responses[6].GetResponseRange().Count == 0
	for _, kv := range resp.Responses[3].GetResponseRange().Kvs {
		id, ok := idOf(string(kv.Key), s.kPlaced)
		ver, err := strconv.ParseUint(string(kv.Value), 10, 64)
		if ver == 0 && noRing0 {
			continue
		}
		if w, found := out[id]; ok && found && err == nil && ver < ringVer {
			w.Behind = true
			out[id] = w
		}
	}
	for _, kv := range resp.Responses[4].GetResponseRange().Kvs {
		id, ok := idOf(string(kv.Key), s.kAttach)
		var rec attachRecord
		if w, found := out[id]; ok && found && json.Unmarshal(kv.Value, &rec) == nil {
			w.Holder, w.Maintenance = rec.Holder, rec.Maintenance
			out[id] = w
		}
	}
	return out, nil
}
