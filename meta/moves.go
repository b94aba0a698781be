package meta

// Moves records: while an attached client moves a volume's chunks to their
// owners under a new ring (rebalance), the rings the data still lives under
// are kept in moves/VOL, so that a client attaching after a crash still
// knows where to read chunks that were not copied yet.
//
// Invariants:
//   - moves/VOL exists only while the volume record exists (checked in the
//     writing transaction) and is deleted with it (DeleteVolume).
//   - The value is the list of previous rings, oldest first, each as a
//     4-byte little-endian length and the ring's binary encoding.

import (
	"context"
	"encoding/binary"
	"fmt"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/torus-storage/torus/ring"
)

func (s *Store) movesKey(vol uint64) string { return fmt.Sprintf("%s%020d", s.kMoves, vol) }

// SetMoves records the previous rings that volume vol's chunks may still
// live under; an empty list deletes the record (the move is finished).
func (s *Store) SetMoves(ctx context.Context, vol uint64, prev []*ring.Ring) error {
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
func (s *Store) Moves(ctx context.Context, vol uint64) ([]*ring.Ring, error) {
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
