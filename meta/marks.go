package meta

// Invariants of missed marks and progress records:
//   - missed/VOL/NODE/CHUNK exists iff node NODE may lack the latest data of
//     chunk CHUNK of volume VOL: a write completed without that replica. A
//     writer creates the mark before it completes such a write (MarkMissed),
//     and a rebuild deletes it only after the node holds a copy of the chunk
//     taken from a good replica (ClearMissed). The caller keeps the second
//     half: no degraded write to that chunk may be in progress between the
//     copy and the clear (the attached client is the only writer, fenced by
//     its epoch, so it orders them itself).
//   - Marks and progress are created only while the volume record exists
//     (checked in the writing transaction) and are deleted with it
//     (DeleteVolume), so no mark outlives its volume.
//   - A volume is degraded while it has at least one mark.
//   - VOL and CHUNK are 20 zero-padded digits, so etcd's key order is numeric
//     order and a prefix range lists one volume or one node of a volume.
//   - A mark's value says why: an RFC 3339 time for a node that missed
//     writes (MarkMissed), or "unflushed INC" for a node that took writes no
//     flush covered and could not be flushed, seen last at incarnation INC
//     (MarkUnflushed). An unflushed mark never replaces a missed one; a
//     missed mark replaces an unflushed one; ClearUnflushed deletes a mark
//     only while it still is unflushed at INC (the node came back without
//     a restart, so it lost nothing).

import (
	"context"
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// markBatch bounds the puts of one MarkMissed transaction, below etcd's
// default limit of 128 operations per transaction.
const markBatch = 100

// Progress kinds.
const (
	ProgressRebuild   = "rebuild"
	ProgressRebalance = "rebalance"
	ProgressScrub     = "scrub"
	ProgressFlatten   = "flatten"
)

// Progress is how far a background job over one volume has come: a rebuild
// (copying missed chunks back), a rebalance (moving chunks to their owners
// under a new ring) or a scrub (verifying replicas).
type Progress struct {
	// Kind is ProgressRebuild, ProgressRebalance or ProgressScrub.
	Kind string `json:"kind"`
	// Done and Total count chunks.
	Done  uint64 `json:"done"`
	Total uint64 `json:"total"`
	// RingVersion is the ring the job works toward (rebalance) or under.
	RingVersion uint64 `json:"ring_version"`
	// Updated is when the record was last written; SetProgress fills it in
	// if zero.
	Updated time.Time `json:"updated"`
	// Started is when the job began counting Done (zero if unknown): the
	// rate is Done over Updated - Started.
	Started time.Time `json:"started,omitzero"`
	// Holder names who runs the job (the volume's attach lock holder).
	Holder string `json:"holder,omitempty"`
	// Repaired counts chunks copied over a bad or stale replica; Mismatches
	// counts replicas found to differ (scrub).
	Repaired   uint64 `json:"repaired"`
	Mismatches uint64 `json:"mismatches"`
}

// Finished reports whether the job has covered every chunk.
func (p Progress) Finished() bool { return p.Done >= p.Total }

// Percent is how much of the job is done, from 0 to 100: Done of Total
// (Done beyond Total counts as Total), 100 when Total is 0.
func (p Progress) Percent() float64 {
	if p.Total == 0 {
		return 100
	}
	return 100 * float64(min(p.Done, p.Total)) / float64(p.Total)
}

// Rate returns the chunks per second the job went at (0 if unknown).
func (p Progress) Rate() float64 {
	d := p.Updated.Sub(p.Started)
	if p.Started.IsZero() || d <= 0 {
		return 0
	}
	return float64(p.Done) / d.Seconds()
}

// ETA returns how long the rest takes at Rate (0 if finished or unknown).
func (p Progress) ETA() time.Duration {
	r := p.Rate()
	if r <= 0 || p.Finished() {
		return 0
	}
	return time.Duration(float64(p.Total-p.Done) / r * float64(time.Second))
}

func (s *Client) missedVolPrefix(vol uint64) string { return fmt.Sprintf("%s%020d/", s.kMissed, vol) }
func (s *Client) missedNodePrefix(vol uint64, node string) string {
	return s.missedVolPrefix(vol) + node + "/"
}
func (s *Client) missedKey(vol uint64, node string, chunk uint64) string {
	return fmt.Sprintf("%s%020d", s.missedNodePrefix(vol, node), chunk)
}
func (s *Client) progressKey(vol uint64) string { return fmt.Sprintf("%s%020d", s.kProgress, vol) }

// MarkMissed records that node missed writes to chunks of volume vol. It is
// idempotent (marking a marked chunk changes nothing that matters) and
// atomic for up to 100 chunks; more are written in several transactions, in
// order, and a failure leaves a prefix of them marked, which the caller
// retries. It fails with ErrNotFound if the volume does not exist.
//
// A writer must call it, and see it succeed, before it completes a write
// that did not reach node: the mark is what makes the missing copy repaired
// later. Writers remember which chunks they marked and skip etcd for later
// writes to them.
func (s *Client) MarkMissed(ctx context.Context, vol uint64, node string, chunks ...uint64) error {
	if err := validName("node id", node); err != nil {
		return err
	}
	now := time.Now().UTC().Format(time.RFC3339Nano)
	for len(chunks) > 0 {
		n := min(len(chunks), markBatch)
		ops := make([]clientv3.Op, n)
		for i, c := range chunks[:n] {
			ops[i] = clientv3.OpPut(s.missedKey(vol, node, c), now)
		}
		tr, err := s.txn(ctx,
			[]clientv3.Cmp{clientv3.Compare(clientv3.CreateRevision(s.volKey(vol)), ">", 0)}, ops, nil)
		if err != nil {
			return fmt.Errorf("meta: mark %d chunks of volume %d missed on node %s: %w", len(chunks), vol, node, err)
		}
		if !tr.Succeeded {
			return fmt.Errorf("meta: mark chunks of volume %d missed on node %s: volume %d: %w", vol, node, vol, ErrNotFound)
		}
		chunks = chunks[n:]
	}
	return nil
}

// unflushedValue is the value of an unflushed mark at incarnation inc.
func unflushedValue(inc uint64) string { return "unflushed " + strconv.FormatUint(inc, 10) }

// nestedBatch bounds the nested transactions of one MarkUnflushed or
// ClearUnflushed transaction (each counts against etcd's operation limit).
const nestedBatch = 50

// MarkUnflushed records that node, last seen at incarnation inc, took writes
// of chunks of volume vol that no flush covered and could not be flushed:
// it may lack them if it lost power. A chunk that has a mark keeps it. It
// fails with ErrNotFound if the volume does not exist.
func (s *Client) MarkUnflushed(ctx context.Context, vol uint64, node string, inc uint64, chunks ...uint64) error {
	val := unflushedValue(inc)
	err := s.perMark(ctx, vol, node, chunks, true, func(k string) clientv3.Op {
		return clientv3.OpTxn([]clientv3.Cmp{clientv3.Compare(clientv3.CreateRevision(k), "=", 0)},
			[]clientv3.Op{clientv3.OpPut(k, val)}, nil)
	})
	if err != nil {
		return fmt.Errorf("meta: mark %d chunks of volume %d unflushed on node %s: %w", len(chunks), vol, node, err)
	}
	return nil
}

// ClearUnflushed deletes the marks of chunks of volume vol on node that are
// still unflushed at incarnation inc: the node answered again at inc (it did
// not restart), so it holds every write it took. Other marks stay.
func (s *Client) ClearUnflushed(ctx context.Context, vol uint64, node string, inc uint64, chunks ...uint64) error {
	val := unflushedValue(inc)
	err := s.perMark(ctx, vol, node, chunks, false, func(k string) clientv3.Op {
		return clientv3.OpTxn([]clientv3.Cmp{clientv3.Compare(clientv3.Value(k), "=", val)},
			[]clientv3.Op{clientv3.OpDelete(k)}, nil)
	})
	if err != nil {
		return fmt.Errorf("meta: clear %d unflushed chunks of volume %d on node %s: %w", len(chunks), vol, node, err)
	}
	return nil
}

// perMark runs op(key) for the mark key of every chunk on node, in
// transactions of nestedBatch; with volExists each also checks that the
// volume exists (ErrNotFound if not).
func (s *Client) perMark(ctx context.Context, vol uint64, node string, chunks []uint64, volExists bool, op func(key string) clientv3.Op) error {
	if err := validName("node id", node); err != nil {
		return err
	}
	var cmps []clientv3.Cmp
	if volExists {
		cmps = []clientv3.Cmp{clientv3.Compare(clientv3.CreateRevision(s.volKey(vol)), ">", 0)}
	}
	for len(chunks) > 0 {
		n := min(len(chunks), nestedBatch)
		ops := make([]clientv3.Op, n)
		for i, c := range chunks[:n] {
			ops[i] = op(s.missedKey(vol, node, c))
		}
		tr, err := s.txn(ctx, cmps, ops, nil)
		if err != nil {
			return err
		}
		if !tr.Succeeded {
			return fmt.Errorf("volume %d: %w", vol, ErrNotFound)
		}
		chunks = chunks[n:]
	}
	return nil
}

// UnflushedMarks returns the unflushed marks of volume vol: node →
// chunk → incarnation (see MarkUnflushed). Missed marks are not in it.
func (s *Client) UnflushedMarks(ctx context.Context, vol uint64) (map[string]map[uint64]uint64, error) {
	pfx := s.missedVolPrefix(vol)
	resp, err := s.cli.Get(ctx, pfx, clientv3.WithPrefix())
	if err != nil {
		return nil, fmt.Errorf("meta: read unflushed chunks of volume %d: %w", vol, err)
	}
	out := make(map[string]map[uint64]uint64)
	for _, kv := range resp.Kvs {
		v, ok := strings.CutPrefix(string(kv.Value), "unflushed ")
		if !ok {
			continue
		}
		inc, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			return nil, fmt.Errorf("meta: unflushed mark %q: %w", kv.Key, ErrInvalid)
		}
		node, chunk, err := parseMarkTail(strings.TrimPrefix(string(kv.Key), pfx))
		if err != nil {
			return nil, fmt.Errorf("meta: read unflushed chunks of volume %d: key %q: %w", vol, kv.Key, err)
		}
		if out[node] == nil {
			out[node] = make(map[uint64]uint64)
		}
		out[node][chunk] = inc
	}
	return out, nil
}

// Missed returns the marks of volume vol: for every node with marks, the
// chunk indexes it missed, in increasing order. An empty map means the
// volume is not degraded (or does not exist).
func (s *Client) Missed(ctx context.Context, vol uint64) (map[string][]uint64, error) {
	pfx := s.missedVolPrefix(vol)
	resp, err := s.cli.Get(ctx, pfx, clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		return nil, fmt.Errorf("meta: read missed chunks of volume %d: %w", vol, err)
	}
	out := make(map[string][]uint64)
	for _, kv := range resp.Kvs {
		node, chunk, err := parseMarkTail(strings.TrimPrefix(string(kv.Key), pfx))
		if err != nil {
			return nil, fmt.Errorf("meta: read missed chunks of volume %d: key %q: %w", vol, kv.Key, err)
		}
		out[node] = append(out[node], chunk)
	}
	return out, nil
}

// parseMarkTail parses "NODE/CHUNK".
func parseMarkTail(tail string) (string, uint64, error) {
	node, c, ok := strings.Cut(tail, "/")
	if !ok || node == "" {
		return "", 0, fmt.Errorf("malformed mark: %w", ErrInvalid)
	}
	chunk, err := strconv.ParseUint(c, 10, 64)
	if err != nil {
		return "", 0, fmt.Errorf("malformed chunk index: %w", err)
	}
	return node, chunk, nil
}

// ClearMissed removes the mark of chunk of volume vol on node, once node
// holds a good copy of it. Clearing an absent mark is not an error. See the
// invariants at the top of this file for what the caller must order.
func (s *Client) ClearMissed(ctx context.Context, vol uint64, node string, chunks ...uint64) error {
	if err := validName("node id", node); err != nil {
		return err
	}
	for len(chunks) > 0 {
		n := min(len(chunks), markBatch)
		ops := make([]clientv3.Op, n)
		for i, ch := range chunks[:n] {
			ops[i] = clientv3.OpDelete(s.missedKey(vol, node, ch))
		}
		if _, err := s.txn(ctx, nil, ops, nil); err != nil {
			return fmt.Errorf("meta: clear %d missed chunks of volume %d on node %s: %w", n, vol, node, err)
		}
		chunks = chunks[n:]
	}
	return nil
}

// MissedCounts returns, for every degraded volume, how many chunks each
// node missed.
func (s *Client) MissedCounts(ctx context.Context) (map[uint64]map[string]int, error) {
	resp, err := s.cli.Get(ctx, s.kMissed, clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		return nil, fmt.Errorf("meta: count missed chunks: %w", err)
	}
	out := make(map[uint64]map[string]int)
	for _, kv := range resp.Kvs {
		v, tail, ok := strings.Cut(strings.TrimPrefix(string(kv.Key), s.kMissed), "/")
		vol, err := strconv.ParseUint(v, 10, 64)
		if !ok || err != nil {
			return nil, fmt.Errorf("meta: count missed chunks: malformed key %q: %w", kv.Key, ErrInvalid)
		}
		node, _, err := parseMarkTail(tail)
		if err != nil {
			return nil, fmt.Errorf("meta: count missed chunks: key %q: %w", kv.Key, err)
		}
		if out[vol] == nil {
			out[vol] = make(map[string]int)
		}
		out[vol][node]++
	}
	return out, nil
}

// SetProgress records the progress of a job over volume vol, replacing the
// previous record. It fails with ErrNotFound if the volume does not exist.
func (s *Client) SetProgress(ctx context.Context, vol uint64, p Progress) error {
	switch p.Kind {
	case ProgressRebuild, ProgressRebalance, ProgressScrub, ProgressFlatten:
	default:
		return fmt.Errorf("meta: progress of volume %d: kind %q: want rebuild, rebalance, scrub or flatten: %w", vol, p.Kind, ErrInvalid)
	}
	if p.Updated.IsZero() {
		p.Updated = time.Now().UTC()
	}
	js, err := json.Marshal(p)
	if err != nil {
		return fmt.Errorf("meta: progress of volume %d: %w", vol, err)
	}
	tr, err := s.txn(ctx,
		[]clientv3.Cmp{clientv3.Compare(clientv3.CreateRevision(s.volKey(vol)), ">", 0)},
		[]clientv3.Op{clientv3.OpPut(s.progressKey(vol), string(js))}, nil)
	if err != nil {
		return fmt.Errorf("meta: write progress of volume %d: %w", vol, err)
	}
	if !tr.Succeeded {
		return fmt.Errorf("meta: write progress of volume %d: %w", vol, ErrNotFound)
	}
	return nil
}

// Progress returns the progress records of every volume that has one, by
// volume id. Finished jobs keep their last record until the next job
// replaces it.
func (s *Client) Progress(ctx context.Context) (map[uint64]Progress, error) {
	resp, err := s.cli.Get(ctx, s.kProgress, clientv3.WithPrefix())
	if err != nil {
		return nil, fmt.Errorf("meta: read progress: %w", err)
	}
	out := make(map[uint64]Progress, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		id, err := strconv.ParseUint(strings.TrimPrefix(string(kv.Key), s.kProgress), 10, 64)
		if err != nil {
			return nil, fmt.Errorf("meta: read progress: malformed key %q: %w", kv.Key, err)
		}
		var p Progress
		if err := json.Unmarshal(kv.Value, &p); err != nil {
			return nil, fmt.Errorf("meta: decode progress of volume %d: %w", id, err)
		}
		out[id] = p
	}
	return out, nil
}
