package meta

// QoS limits of a volume: part of its record (Volume.QoS), set at
// creation (WithQoS) and changed with UpdateQoS, a compare-and-swap on the
// record like ResizeVolume. The client holding the volume watches the
// record (WatchQoS) and enforces the limits (internal/qos).
//
// Invariants:
//   - A stored QoS passed Validate: byte rates are 0 or at least
//     MinQoSBytesPerSecond, the burst at most MaxQoSBurst.
//   - UpdateQoS changes only the QoS of the record it read (checked on the
//     record's revision), so a concurrent resize or another UpdateQoS is
//     never lost: the loser reads again and reapplies its change.

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// Bounds of QoS settings.
const (
	// MinQoSBytesPerSecond is the lowest nonzero byte rate: one 4 KiB
	// block per second.
	MinQoSBytesPerSecond = 4096
	// MaxQoSBurst is the longest burst.
	MaxQoSBurst = time.Minute
)

// QoS are a volume's I/O limits, enforced by the client that holds it. A
// zero field is unlimited; the zero QoS limits nothing.
type QoS struct {
	// ReadIOPS and WriteIOPS are requests per second (discard and
	// write-zeroes count as writes).
	ReadIOPS  uint64 `json:"read_iops,omitempty"`
	WriteIOPS uint64 `json:"write_iops,omitempty"`
	// ReadBPS and WriteBPS are bytes per second.
	ReadBPS  uint64 `json:"read_bps,omitempty"`
	WriteBPS uint64 `json:"write_bps,omitempty"`
	// BurstMS is, in milliseconds, how long an idle volume saves credit
	// for: after that long idle it may run rate × burst above each limit
	// before the limit holds it. 0 paces requests at the limits.
	BurstMS uint64 `json:"burst_ms,omitempty"`
}

// Burst returns BurstMS as a duration.
func (q QoS) Burst() time.Duration { return time.Duration(q.BurstMS) * time.Millisecond }

// Unlimited reports whether q limits nothing.
func (q QoS) Unlimited() bool {
	return q.ReadIOPS == 0 && q.WriteIOPS == 0 && q.ReadBPS == 0 && q.WriteBPS == 0
}

// Validate checks q against the bounds above; the error wraps ErrInvalid
// and names the setting.
func (q QoS) Validate() error {
	for _, b := range []struct {
		name string
		v    uint64
	}{{"read bytes per second", q.ReadBPS}, {"write bytes per second", q.WriteBPS}} {
		if b.v != 0 && b.v < MinQoSBytesPerSecond {
			return fmt.Errorf("qos: %s %d: below %d (one 4 KiB block per second); 0 is unlimited: %w",
				b.name, b.v, MinQoSBytesPerSecond, ErrInvalid)
		}
	}
	if q.BurstMS > uint64(MaxQoSBurst/time.Millisecond) {
		return fmt.Errorf("qos: burst %dms: above %v: %w", q.BurstMS, MaxQoSBurst, ErrInvalid)
	}
	return nil
}

// VolumeOption is a setting of CreateVolume.
type VolumeOption func(*Volume)

// WithQoS creates the volume with limits q.
func WithQoS(q QoS) VolumeOption { return func(v *Volume) { v.QoS = q } }

// UpdateQoS applies change to the QoS of the volume called name and stores
// the result, compare-and-swapped on the record, and returns the volume.
// change may run more than once (after a concurrent change to the record).
// A result that fails Validate is refused (ErrInvalid) and nothing is
// stored; an unchanged QoS writes nothing.
func (s *Client) UpdateQoS(ctx context.Context, name string, change func(*QoS)) (Volume, error) {
	for range maxTries {
		v, rev, err := s.volume(ctx, name)
		if err != nil {
			return v, fmt.Errorf("meta: set qos: %w", err)
		}
		q := v.QoS
		change(&q)
		if err := q.Validate(); err != nil {
			return v, fmt.Errorf("meta: set qos of volume %s: %w", name, err)
		}
		if q == v.QoS {
			return v, nil
		}
		v.QoS = q
		js, _ := json.Marshal(v)
		tr, err := s.txn(ctx,
			[]clientv3.Cmp{clientv3.Compare(clientv3.ModRevision(s.volKey(v.ID)), "=", rev)},
			[]clientv3.Op{clientv3.OpPut(s.volKey(v.ID), string(js))}, nil)
		if err != nil {
			return v, fmt.Errorf("meta: set qos of volume %s: %w", name, err)
		}
		if tr.Succeeded {
			return v, nil
		}
	}
	return Volume{}, fmt.Errorf("meta: set qos of volume %s: contended %d times: %w", name, maxTries, ErrConflict)
}

// WatchQoS delivers the QoS of volume id now and after every change to its
// record, until ctx is done, when the channel is closed. A slow reader gets
// only the latest value, and a value may repeat (a change to another field
// of the record). Nothing is delivered while the record is missing. Like
// WatchVolumes it never gives up: after a compaction, a watch error or an
// unreachable etcd it reads and watches again.
func (s *Client) WatchQoS(ctx context.Context, id uint64) <-chan QoS {
	out := make(chan QoS, 1)
	key := s.volKey(id)
	go func() {
		defer close(out)
		s.watchRead(ctx, "qos watch", key, func(ctx context.Context) (int64, error) {
			resp, err := s.cli.Get(ctx, key)
			if err != nil {
				return 0, fmt.Errorf("meta: read volume %d: %w", id, err)
			}
			if len(resp.Kvs) == 1 {
				var v Volume
				if err := json.Unmarshal(resp.Kvs[0].Value, &v); err != nil {
					return 0, fmt.Errorf("meta: decode volume %d: %w", id, err)
				}
				offerLatest(out, v.QoS)
			}
			return resp.Header.Revision, nil
		})
	}()
	return out
}

// offerLatest puts v in out (capacity 1), replacing a value the reader has
// not taken yet. It must be out's only sender.
func offerLatest[T any](out chan T, v T) {
	select {
	case out <- v:
		return
	default:
	}
	select {
	case <-out:
	default:
	}
	out <- v
}
