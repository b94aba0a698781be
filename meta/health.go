package meta

// Volume health as the cluster's records show it (torusctl status and
// volume info): the volumes whose chunks are not all placed under the
// current ring yet, and how many live good copies the chunks of a volume
// have. Both only read; what they report can change as soon as they return.
//
// A copy of chunk C of volume V is good when its node is registered (live),
// owns C under a ring V's data lives under (the ring of placed/V, or one of
// moves/V: see moves.go) and has no missed mark for C.

import (
	"context"
	"fmt"

	"github.com/torus-storage/torus/ring"
)

// MovingVolume is a volume whose chunks are not all placed under the
// current ring: nodes removed from the ring still hold copies of it.
type MovingVolume struct {
	Volume string `json:"volume"`
	ID     uint64 `json:"id"`
	// PlacedRing is the ring version up to which the volume's moves are
	// recorded (0: none); Moves counts the earlier rings whose owners
	// still hold copies being moved.
	PlacedRing uint64 `json:"placed_ring"`
	Moves      int    `json:"moves"`
}

// Moving lists, in the order of vols, the volumes whose placement lags
// ring version cur (a ring change whose move nobody recorded yet) or that
// have a move in progress. The list is empty, not nil, when none is.
func (s *Client) Moving(ctx context.Context, vols []Volume, cur uint64) ([]MovingVolume, error) {
	out := []MovingVolume{}
	for _, v := range vols {
		ver, ok, err := s.Placed(ctx, v.ID)
		if err != nil {
			return nil, fmt.Errorf("meta: moving volumes: %w", err)
		}
		rings, err := s.Moves(ctx, v.ID)
		if err != nil {
			return nil, fmt.Errorf("meta: moving volumes: %w", err)
		}
		if !ok {
			ver = cur // no record: placed under whatever ring is current
		}
		if ver != cur || len(rings) > 0 {
			out = append(out, MovingVolume{Volume: v.Name, ID: v.ID, PlacedRing: ver, Moves: len(rings)})
		}
	}
	return out, nil
}

// LiveCopies returns the fewest live good copies (see above) any chunk of
// volume v has, and how many of its chunks have at most one.
func (s *Client) LiveCopies(ctx context.Context, v Volume) (fewest int, atMostOne uint64, err error) {
	fewest, atMostOne, err = s.liveCopies(ctx, v)
	if err != nil {
		return 0, 0, fmt.Errorf("meta: live copies of volume %s: %w", v.Name, err)
	}
	return fewest, atMostOne, nil
}

func (s *Client) liveCopies(ctx context.Context, v Volume) (int, uint64, error) {
	cfg, err := s.Config(ctx)
	if err != nil {
		return 0, 0, err
	}
	cur, _, err := s.Ring(ctx)
	if err != nil {
		return 0, 0, err
	}
	rings, err := s.Moves(ctx, v.ID)
	if err != nil {
		return 0, 0, err
	}
	placed := cur
	if ver, ok, err := s.Placed(ctx, v.ID); err != nil {
		return 0, 0, err
	} else if ok && ver != cur.Version() {
		if r, ok, err := s.RingAt(ctx, ver); err != nil {
			return 0, 0, err
		} else if ok {
			placed = r
		}
	}
	rings = append(rings, placed)
	missed, err := s.Missed(ctx, v.ID)
	if err != nil {
		return 0, 0, err
	}
	marked := make(map[string]map[uint64]bool, len(missed))
	for n, chunks := range missed {
		marked[n] = make(map[uint64]bool, len(chunks))
		for _, ch := range chunks {
			marked[n][ch] = true
		}
	}
	nodes, err := s.Nodes(ctx)
	if err != nil {
		return 0, 0, err
	}
	live := make(map[string]bool, len(nodes))
	for _, n := range nodes {
		live[n.ID] = true
	}
	nchunks := (v.Size + cfg.ChunkSize - 1) / cfg.ChunkSize
	fewest, one := -1, uint64(0)
	var owners []string
	for ch := range nchunks {
		key := ring.ChunkKey(v.ID, ch, 0)
		seen := map[string]bool{}
		for _, r := range rings {
			owners = r.Owners(key, v.Replication, owners[:0])
			for _, o := range owners {
				if live[o] && !marked[o][ch] {
					seen[o] = true
				}
			}
		}
		if fewest < 0 || len(seen) < fewest {
			fewest = len(seen)
		}
		if len(seen) <= 1 {
			one++
		}
	}
	return max(fewest, 0), one, nil
}
