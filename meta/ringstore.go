package meta

// Invariants of the ring key and its watchers:
//   - The ring key holds ring.Ring's canonical binary encoding and changes
//     only through CASRing (compare on mod revision), whose transaction also
//     writes the same encoding to rings/VERSION: the ring history that
//     clients read placement changes from (moves.go). A ring change is thus
//     on record for every volume, attached or not, the moment it exists.
//   - A WatchRing channel delivers updates in strictly increasing revision
//     order and never delivers a revision twice; after a compaction or a
//     watch error it re-reads the key, so the latest ring is always
//     delivered even when intermediate ones were compacted away.

import (
	"context"
	"fmt"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/torus-storage/torus/ring"
)

// Ring returns the current placement ring and its mod revision, the value to
// pass to CASRing. Before any ring was written it returns an empty ring and
// revision 0.
func (s *Client) Ring(ctx context.Context) (*ring.Ring, int64, error) {
	resp, err := s.cli.Get(ctx, s.kRing)
	if err != nil {
		return nil, 0, fmt.Errorf("meta: read ring: %w", err)
	}
	if len(resp.Kvs) == 0 {
		r, err := ring.New(nil, ring.Options{})
		return r, 0, err
	}
	r, err := decodeRing(resp.Kvs[0].Value)
	if err != nil {
		return nil, 0, err
	}
	return r, resp.Kvs[0].ModRevision, nil
}

func decodeRing(b []byte) (*ring.Ring, error) {
	r := new(ring.Ring)
	if err := r.UnmarshalBinary(b); err != nil {
		return nil, fmt.Errorf("meta: decode ring: %w", err)
	}
	return r, nil
}

// CASRing replaces the ring if it is still at revision old (0: no ring yet)
// and returns ErrConflict if someone else changed it first: re-read, rebuild
// and retry. Build next with (*ring.Ring).Next so its Version grows.
func (s *Client) CASRing(ctx context.Context, old int64, next *ring.Ring) error {
	b, err := next.MarshalBinary()
	if err != nil {
		return fmt.Errorf("meta: encode ring: %w", err)
	}
	resp, err := s.txn(ctx,
		[]clientv3.Cmp{clientv3.Compare(clientv3.ModRevision(s.kRing), "=", old)},
		[]clientv3.Op{clientv3.OpPut(s.kRing, string(b)), clientv3.OpPut(s.ringsKey(next.Version()), string(b))}, nil)
	if err != nil {
		return fmt.Errorf("meta: write ring version %d: %w", next.Version(), err)
	}
	if !resp.Succeeded {
		return fmt.Errorf("meta: write ring version %d: ring changed since revision %d: %w",
			next.Version(), old, ErrConflict)
	}
	return nil
}

// RingUpdate is one ring delivered by WatchRing.
type RingUpdate struct {
	Ring *ring.Ring
	// Rev is the mod revision of the ring key (the CASRing argument).
	Rev int64
}

// WatchRing delivers the current ring (if any) and then every change, in
// revision order, until ctx is done, when the channel is closed. It never
// gives up: after a compaction, a watch error or a lost leader it re-reads
// the ring and watches again, so the latest ring is delivered even when
// intermediate ones were compacted away. A deleted ring key is skipped.
func (s *Client) WatchRing(ctx context.Context) <-chan RingUpdate {
	out := make(chan RingUpdate, 1)
	go func() {
		defer close(out)
		s.watchRing(ctx, out, 0)
	}()
	return out
}

// watchRing runs the watch loop. If from > 0, the first watch starts at
// revision from without reading the key first (tests use it to start
// behind a compaction).
func (s *Client) watchRing(ctx context.Context, out chan<- RingUpdate, from int64) {
	var last int64 // revision last delivered
	send := func(u RingUpdate) bool {
		if u.Rev <= last {
			return true
		}
		select {
		case out <- u:
			last = u.Rev
			return true
		case <-ctx.Done():
			return false
		}
	}
	d := 50 * time.Millisecond
	for ctx.Err() == nil {
		if from == 0 {
			resp, err := s.cli.Get(ctx, s.kRing)
			if err != nil {
				s.log.Warn("ring watch: read failed, retrying", "err", err)
				backoff(ctx, &d, 2*time.Second)
				continue
			}
			from = resp.Header.Revision + 1
			if len(resp.Kvs) == 1 {
				kv := resp.Kvs[0]
				if r, err := decodeRing(kv.Value); err != nil {
					s.log.Error("ring watch: skipping undecodable ring", "rev", kv.ModRevision, "err", err)
				} else if !send(RingUpdate{r, kv.ModRevision}) {
					return
				}
			}
		}
		wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
		wch := s.cli.Watch(wctx, s.kRing, clientv3.WithRev(from))
		ok := s.drainWatch(ctx, wch, send, &d)
		cancel()
		if !ok {
			return
		}
		from = 0 // re-read, then watch again
		if ctx.Err() == nil {
			backoff(ctx, &d, 2*time.Second)
		}
	}
}

// drainWatch delivers the events of wch until it fails, is compacted or
// closes; it returns false if delivery stopped because ctx is done.
func (s *Client) drainWatch(ctx context.Context, wch clientv3.WatchChan, send func(RingUpdate) bool, d *time.Duration) bool {
	for wr := range wch {
		if wr.CompactRevision != 0 {
			s.log.Info("ring watch: compacted, re-reading", "compact_rev", wr.CompactRevision)
			return true
		}
		if err := wr.Err(); err != nil {
			s.log.Warn("ring watch: restarting", "err", err)
			return true
		}
		for _, ev := range wr.Events {
			if ev.Type != mvccpb.PUT {
				continue
			}
			r, err := decodeRing(ev.Kv.Value)
			if err != nil {
				s.log.Error("ring watch: skipping undecodable ring", "rev", ev.Kv.ModRevision, "err", err)
				continue
			}
			if !send(RingUpdate{r, ev.Kv.ModRevision}) {
				return false
			}
		}
		*d = 50 * time.Millisecond
	}
	return ctx.Err() == nil
}
