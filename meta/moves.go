package meta

// Placement records: what a ring change means for a volume's chunks.
//
// Every ring ever written is kept in rings/VERSION, written in the same
// transaction as the ring itself (CASRing), so a placement change is on
// record whoever makes it (a node joining, an operator removing a node, the
// dead-node watch, a weight change) and whether or not a client holds the
// volume. placed/VOL is the ring version up to which the volume's client has
// turned ring changes into moves: a client (at attach, or when it sees a new
// ring) takes every ring in rings/ above placed/VOL in version order and, for
// each, records the move (moves/VOL and missed marks of the new owners) and
// only then advances placed/VOL. While an attached client moves a volume's
// chunks to their owners under a new ring (rebalance), the rings the data
// still lives under are kept in moves/VOL, so that a client attaching after
// a crash still knows where to read chunks that were not copied yet.
//
// Invariants:
//   - The data of a volume lives under the rings of moves/VOL and the ring
//     of version placed/VOL: every ring change above placed/VOL has not
//     moved a byte of it yet.
//   - placed/VOL only grows, and only after the move to that version is
//     recorded (moves/VOL first, then the marks, then placed/VOL), so a
//     crash between the steps leaves placed/VOL behind and the next client
//     records the same move again (both steps are idempotent).
//   - moves/VOL and placed/VOL exist only while the volume record exists
//     (checked in the writing transaction) and are deleted with it
//     (DeleteVolume).
//   - The moves value is the list of previous rings, oldest first, each as a
//     4-byte little-endian length and the ring's binary encoding.

import (
	"context"
	"encoding/binary"
	"fmt"
	"strconv"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/torus-storage/torus/ring"
)

func (s *Client) movesKey(vol uint64) string { return fmt.Sprintf("%s%020d", s.kMoves, vol) }

// SetMoves records the previous rings that volume vol's chunks may still
// live under; an empty list deletes the record (the move is finished).
func (s *Client) SetMoves(ctx context.Context, vol uint64, prev []*ring.Ring) error {
	if len(prev) == 0 {
		if _, err := s.txn(ctx, nil, []clientv3.Op{clientv3.OpDelete(s.movesKey(vol))}, nil); err != nil {
			return fmt.Errorf("meta: clear moves of volume %d: %w", vol, err)
		}
		return nil
	}
	var val []byte
	for _, r := range prev {
		b, err := r.MarshalBinary()
		if err != nil {
			return fmt.Errorf("meta: moves of volume %d: %w", vol, err)
		}
		val = binary.LittleEndian.AppendUint32(val, uint32(len(b)))
		val = append(val, b...)
	}
	tr, err := s.txn(ctx,
		[]clientv3.Cmp{clientv3.Compare(clientv3.CreateRevision(s.volKey(vol)), ">", 0)},
		[]clientv3.Op{clientv3.OpPut(s.movesKey(vol), string(val))}, nil)
	if err != nil {
		return fmt.Errorf("meta: write moves of volume %d: %w", vol, err)
	}
	if !tr.Succeeded {
		return fmt.Errorf("meta: write moves of volume %d: %w", vol, ErrNotFound)
	}
	return nil
}

// Moves returns the previous rings recorded for volume vol (nil if none).
func (s *Client) Moves(ctx context.Context, vol uint64) ([]*ring.Ring, error) {
	resp, err := s.cli.Get(ctx, s.movesKey(vol))
	if err != nil {
		return nil, fmt.Errorf("meta: read moves of volume %d: %w", vol, err)
	}
	if len(resp.Kvs) == 0 {
		return nil, nil
	}
	b := resp.Kvs[0].Value
	var out []*ring.Ring
	for len(b) > 0 {
		if len(b) < 4 || uint64(binary.LittleEndian.Uint32(b)) > uint64(len(b)-4) {
			return nil, fmt.Errorf("meta: moves of volume %d: truncated record: %w", vol, ring.ErrCorrupt)
		}
		n := binary.LittleEndian.Uint32(b)
		r := new(ring.Ring)
		if err := r.UnmarshalBinary(b[4 : 4+n]); err != nil {
			return nil, fmt.Errorf("meta: moves of volume %d: %w", vol, err)
		}
		out = append(out, r)
		b = b[4+n:]
	}
	return out, nil
}

func (s *Client) placedKey(vol uint64) string { return fmt.Sprintf("%s%020d", s.kPlaced, vol) }
func (s *Client) ringsKey(ver uint64) string  { return fmt.Sprintf("%s%020d", s.kRings, ver) }

// Placed returns the ring version up to which the placement changes of
// volume vol are recorded; ok is false for a volume without a record (made
// before rings were kept).
func (s *Client) Placed(ctx context.Context, vol uint64) (ver uint64, ok bool, err error) {
	resp, err := s.cli.Get(ctx, s.placedKey(vol))
	if err != nil {
		return 0, false, fmt.Errorf("meta: read placement of volume %d: %w", vol, err)
	}
	if len(resp.Kvs) == 0 {
		return 0, false, nil
	}
	ver, err = strconv.ParseUint(string(resp.Kvs[0].Value), 10, 64)
	if err != nil {
		return 0, false, fmt.Errorf("meta: placement of volume %d: corrupt version %q: %w", vol, resp.Kvs[0].Value, ErrInvalid)
	}
	return ver, true, nil
}

// SetPlaced records that the placement changes of volume vol are recorded
// up to ring version ver (moves and marks written). It never lowers the
// record: a lower ver is a no-op. It fails with ErrNotFound if the volume
// does not exist.
func (s *Client) SetPlaced(ctx context.Context, vol, ver uint64) error {
	k := s.placedKey(vol)
	for range maxTries {
		cur, ok, err := s.Placed(ctx, vol)
		if err != nil {
			return err
		}
		if ok && cur >= ver {
			return nil
		}
		cmp := clientv3.Compare(clientv3.CreateRevision(k), "=", 0)
		if ok {
			cmp = clientv3.Compare(clientv3.Value(k), "=", strconv.FormatUint(cur, 10))
		}
		tr, err := s.txn(ctx,
			[]clientv3.Cmp{clientv3.Compare(clientv3.CreateRevision(s.volKey(vol)), ">", 0), cmp},
			[]clientv3.Op{clientv3.OpPut(k, strconv.FormatUint(ver, 10))},
			[]clientv3.Op{clientv3.OpGet(s.volKey(vol), clientv3.WithCountOnly())})
		if err != nil {
			return fmt.Errorf("meta: record placement of volume %d at ring %d: %w", vol, ver, err)
		}
		if tr.Succeeded {
			return nil
		}
		if tr.Responses[0].GetResponseRange().Count == 0 {
			return fmt.Errorf("meta: record placement of volume %d: %w", vol, ErrNotFound)
		}
	}
	return fmt.Errorf("meta: record placement of volume %d: contended %d times: %w", vol, maxTries, ErrConflict)
}

// RingHistory returns the rings written with a version in (after, upTo], in
// version order (see CASRing).
func (s *Client) RingHistory(ctx context.Context, after, upTo uint64) ([]*ring.Ring, error) {
	if upTo <= after {
		return nil, nil
	}
	resp, err := s.cli.Get(ctx, s.ringsKey(after+1), clientv3.WithRange(s.ringsKey(upTo)+"\x00"))
	if err != nil {
		return nil, fmt.Errorf("meta: read rings %d..%d: %w", after+1, upTo, err)
	}
	out := make([]*ring.Ring, 0, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		r, err := decodeRing(kv.Value)
		if err != nil {
			return nil, fmt.Errorf("meta: ring history %s: %w", kv.Key, err)
		}
		out = append(out, r)
	}
	return out, nil
}

// RingAt returns the ring of version ver from the history; ok is false if
// none was kept (never written, or pruned).
func (s *Client) RingAt(ctx context.Context, ver uint64) (r *ring.Ring, ok bool, err error) {
	resp, err := s.cli.Get(ctx, s.ringsKey(ver))
	if err != nil {
		return nil, false, fmt.Errorf("meta: read ring %d: %w", ver, err)
	}
	if len(resp.Kvs) == 0 {
		return nil, false, nil
	}
	r, err = decodeRing(resp.Kvs[0].Value)
	if err != nil {
		return nil, false, err
	}
	return r, true, nil
}

// PruneRings deletes the ring history no volume needs any more: the rings
// below the lowest placed/VOL of all volumes (and below the current ring).
// It returns how many it deleted.
func (s *Client) PruneRings(ctx context.Context) (int, error) {
	cur, _, err := s.Ring(ctx)
	if err != nil {
		return 0, err
	}
	low := cur.Version()
	resp, err := s.cli.Get(ctx, s.kPlaced, clientv3.WithPrefix())
	if err != nil {
		return 0, fmt.Errorf("meta: prune rings: %w", err)
	}
	for _, kv := range resp.Kvs {
		v, err := strconv.ParseUint(string(kv.Value), 10, 64)
		if err != nil {
			return 0, fmt.Errorf("meta: prune rings: corrupt placement %s: %w", kv.Key, ErrInvalid)
		}
		low = min(low, v)
	}
	if low == 0 {
		return 0, nil
	}
	// A volume created meanwhile records the current ring, which stays.
	dr, err := s.cli.Delete(ctx, s.ringsKey(0), clientv3.WithRange(s.ringsKey(low)))
	if err != nil {
		return 0, fmt.Errorf("meta: prune rings below %d: %w", low, err)
	}
	return int(dr.Deleted), nil
}
