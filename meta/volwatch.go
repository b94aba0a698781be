package meta

// Invariants of VolumeSet and WatchVolumes:
//   - A VolumeSet is read in one transaction, so IDs and Next belong to the
//     same revision: an id below Next that is not in IDs was deleted (ids
//     are never reused), and an id at or above Next was not created yet.
//   - WatchVolumes delivers sets in increasing revision order; after a
//     compaction or a watch error it re-reads, so the latest set is always
//     delivered even when intermediate changes were compacted away.

import (
	"context"
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// VolumeSet is the set of volume ids at one etcd revision.
type VolumeSet struct {
	// IDs holds the id of every volume that exists.
	IDs map[uint64]bool
	// Next is the id the next created volume gets; every id below it was
	// allocated once.
	Next uint64
	// Snaps holds, for each volume with snapshot numbers given out, the
	// newest (SnapSeq) and those of its snapshots (pending ones included).
	Snaps map[uint64]VolumeSnaps
	// Rev is the etcd revision of the read.
	Rev int64
}

// VolumeSnaps are a volume's snapshot numbers in a VolumeSet.
type VolumeSnaps struct {
	// Seq is the newest number given out (Volume.SnapSeq).
	Seq uint64
	// Live are the numbers of its snapshots, ascending.
	Live []uint64
}

// Deleted reports whether volume id existed once and is deleted: its
// chunks are garbage. A chunk of an id not allocated yet is not.
func (v VolumeSet) Deleted(id uint64) bool { return id < v.Next && !v.IDs[id] }

// VolumeSet reads the ids of all volumes and the id counter at one
// revision.
func (s *Client) VolumeSet(ctx context.Context) (VolumeSet, error) {
	resp, err := s.cli.Txn(ctx).Then(
		clientv3.OpGet(s.kVolumes+"0", clientv3.WithRange(s.kVolumes+":")),
		clientv3.OpGet(s.kNextID),
	).Commit()
	if err != nil {
		return VolumeSet{}, fmt.Errorf("meta: list volume ids: %w", err)
	}
	vs := VolumeSet{IDs: make(map[uint64]bool), Next: 1, Rev: resp.Header.Revision, Snaps: make(map[uint64]VolumeSnaps)}
	for _, kv := range resp.Responses[0].GetResponseRange().Kvs {
		id, err := strconv.ParseUint(strings.TrimPrefix(string(kv.Key), s.kVolumes), 10, 64)
		if err != nil {
			return VolumeSet{}, fmt.Errorf("meta: list volume ids: malformed key %q: %w", kv.Key, err)
		}
		vs.IDs[id] = true
		var v Volume
		if err := json.Unmarshal(kv.Value, &v); err != nil {
			return VolumeSet{}, fmt.Errorf("meta: list volume ids: decode volume %d: %w", id, err)
		}
		if v.SnapSeq > 0 {
			vs.Snaps[id] = VolumeSnaps{Seq: v.SnapSeq, Live: v.LiveSnaps()}
		}
	}
	if kvs := resp.Responses[1].GetResponseRange().Kvs; len(kvs) == 1 {
		if vs.Next, err = strconv.ParseUint(string(kvs[0].Value), 10, 64); err != nil {
			return VolumeSet{}, fmt.Errorf("meta: list volume ids: corrupt id counter %q: %w", kvs[0].Value, err)
		}
	}
	return vs, nil
}

// WatchVolumes delivers the current VolumeSet and then a new one after
// every change to the volumes (create, delete, resize), until ctx is done,
// when the channel is closed. A slow reader gets only the latest set:
// changes are coalesced. It never gives up: after a compaction, a watch
// error or an unreachable etcd it re-reads and watches again.
func (s *Client) WatchVolumes(ctx context.Context) <-chan VolumeSet {
	out := make(chan VolumeSet, 1)
	go func() {
		defer close(out)
		s.watchRead(ctx, "volume watch", s.kVolumes, func(ctx context.Context) (int64, error) {
			vs, err := s.VolumeSet(ctx)
			if err != nil {
				return 0, err
			}
			offer(out, vs)
			return vs.Rev, nil
		})
	}()
	return out
}

// watchRead calls read now and again after every change under prefix,
// until ctx is done. read delivers what it read and returns the revision it
// read at. After a compaction, a watch error or an unreachable etcd it
// reads and watches again (backing off while etcd does not answer).
func (s *Client) watchRead(ctx context.Context, what, prefix string, read func(context.Context) (int64, error)) {
	d := 50 * time.Millisecond
	for ctx.Err() == nil {
		rev, err := read(ctx)
		if err != nil {
			if ctx.Err() == nil {
				s.log.Warn(what+": read failed, retrying", "err", err)
			}
			backoff(ctx, &d, 2*time.Second)
			continue
		}
		wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
		wch := s.cli.Watch(wctx, prefix, clientv3.WithPrefix(), clientv3.WithRev(rev+1))
		changed := false
		for wr := range wch {
			if wr.CompactRevision != 0 || wr.Err() != nil {
				s.log.Info(what+": restarting", "compact_rev", wr.CompactRevision, "err", wr.Err())
				break
			}
			if len(wr.Events) > 0 {
				changed = true
				break
			}
		}
		cancel()
		if !changed && ctx.Err() == nil {
			backoff(ctx, &d, 2*time.Second)
		} else {
			d = 50 * time.Millisecond
		}
	}
}

// offer puts vs in out (capacity 1), replacing a set the reader has not
// taken yet. It has the only sender, so the second send cannot block.
func offer(out chan VolumeSet, vs VolumeSet) {
	select {
	case out <- vs:
		return
	default:
	}
	select {
	case <-out:
	default:
	}
	out <- vs
}
