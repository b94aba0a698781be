package meta

// Snapshots of volumes: records and the barrier that takes them.
//
// A snapshot is a number s of its volume (Volume.SnapSeq counts them out,
// never reused) and a name. It holds every change made under an earlier
// number; the holder of a volume makes each change under the volume's
// SnapSeq as it last saw it (cluster: before its first change of a chunk
// under s, the nodes copy the chunk's head as snapshot copy s).
//
// Invariants:
//   - SnapSeq only grows, and a snapshot's number is the SnapSeq its
//     BeginSnapshots set; attach reads the volume record in the attaching
//     transaction's revision (the record's revision is compared), so a
//     holder never makes a change under a number below a snapshot's that
//     began before it attached.
//   - A snapshot is committed only if, between BeginSnapshots and the commit,
//     nobody attached any volume of the batch (each epoch is unchanged), and
//     each volume held by a client was paused by it: its holder acknowledged
//     (SnapAckKey) that every change it acknowledged was complete and that
//     it makes no new change until the request is gone, and then only under
//     the new number. All volumes of a batch commit in one transaction, so a
//     group snapshot is one instant: no change made after it on one volume
//     was acknowledged before a change it holds on another.
//   - A request the holder gave up on (it paused longer than it waits) is
//     deleted by that holder in a transaction that fails if the request is
//     gone, and the commit compares every acknowledgement, so a commit never
//     counts on a holder that resumed.
//   - A snapshot that is not committed stays Pending; Abort (or a later
//     BeginSnapshots on the volume, once it is older than pendingAbandoned)
//     removes it. Pending snapshots count as live for garbage collection.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// MaxSnapshots is the most snapshots, pending included, a volume keeps.
const MaxSnapshots = 256

// MaxSnapSeq bounds snapshot numbers (the chunk protocol carries 24 bits).
const MaxSnapSeq = 1<<24 - 1

// pauseLimitMeta is how long a holder stays paused for a snapshot that
// does not commit before it cancels it (cluster's pauseLimit).
const pauseLimitMeta = 15 * time.Second

// pendingAbandoned is the age past which a pending snapshot is taken to be
// left by a process that died while taking it.
const pendingAbandoned = 2 * time.Minute

// Snapshot is a snapshot of a volume.
type Snapshot struct {
	// ID is its number: it holds the changes made under smaller ones.
	ID uint64 `json:"id"`
	// Name is unique among the volume's snapshots.
	Name string `json:"name"`
	// Created is when it was begun.
	Created time.Time `json:"created"`
	// Size is the volume's size then (a view of it reads zeros past it).
	Size uint64 `json:"size"`
	// Group names the group snapshot it was taken with (empty: alone).
	Group string `json:"group,omitempty"`
	// Pending: begun, not committed (or abandoned).
	Pending bool `json:"pending,omitempty"`
	// Clones names the volumes cloned from it that still read from it.
	Clones []string `json:"clones,omitempty"`
}

// Snapshot returns the committed snapshot of v called name.
func (v *Volume) Snapshot(name string) (Snapshot, bool) {
	for _, s := range v.Snapshots {
		if s.Name == name && !s.Pending {
			return s, true
		}
	}
	return Snapshot{}, false
}

// SnapshotRequest names a snapshot to take: VOLUME@NAME.
type SnapshotRequest struct {
	Volume, Name string
}

// ParseSnapshotName splits VOLUME@SNAPSHOT.
func ParseSnapshotName(s string) (SnapshotRequest, error) {
	vol, snap, ok := strings.Cut(s, "@")
	if !ok || vol == "" || snap == "" || strings.Contains(snap, "@") {
		return SnapshotRequest{}, fmt.Errorf("meta: %q is not VOLUME@SNAPSHOT: %w", s, ErrInvalid)
	}
	if err := validName("volume name", vol); err != nil {
		return SnapshotRequest{}, err
	}
	if err := validName("snapshot name", snap); err != nil {
		return SnapshotRequest{}, err
	}
	return SnapshotRequest{Volume: vol, Name: snap}, nil
}

// SnapRequest is the value of a volume's snapshot request key: its holder
// pauses changes, takes Seq as its snapshot number and acknowledges.
type SnapRequest struct {
	Seq   uint64 `json:"seq"`
	Group string `json:"group,omitempty"`
	// Epoch is the holder's attach epoch the request is for.
	Epoch uint64 `json:"epoch"`
}

// SnapAck is the value a holder acknowledges a SnapRequest with.
func SnapAck(seq, epoch uint64) string { return fmt.Sprintf("paused %d %d", seq, epoch) }

// SnapRequestKey is the key of volume id's snapshot request.
func (s *Client) SnapRequestKey(id uint64) string { return fmt.Sprintf("%s%020d", s.kSnapReq, id) }

// SnapAckKey is the key a holder acknowledges volume id's request in.
func (s *Client) SnapAckKey(id uint64) string { return fmt.Sprintf("%s%020d", s.kSnapAck, id) }

// SnapshotBatch is a snapshot of one or more volumes being taken
// (BeginSnapshots): Wait for the holders, then Commit, or Abort.
type SnapshotBatch struct {
	s     *Client
	group string
	vols  []batchVol
	rev   int64 // revision of the begin transaction
}

type batchVol struct {
	req    SnapshotRequest
	id     uint64
	seq    uint64
	epoch  string // value of the epoch key at begin ("" if none)
	holder string // a client holds it: its ack is needed
	reqVal string // value of the request key (held volumes)
}

// Attached reports the volumes of the batch a client held at begin (their
// holders must acknowledge), as "VOLUME (holder)".
func (b *SnapshotBatch) Attached() []string {
	var l []string
	for _, v := range b.vols {
		if v.holder != "" {
			l = append(l, fmt.Sprintf("%s (%s)", v.req.Volume, v.holder))
		}
	}
	return l
}

// BeginSnapshots begins one snapshot per request, all at one instant when
// there are several (group names them; empty for a single one): it gives
// each volume a new snapshot number, records the snapshots as pending and
// asks each volume's holder to pause, all in one transaction.
func (s *Client) BeginSnapshots(ctx context.Context, group string, reqs []SnapshotRequest) (*SnapshotBatch, error) {
	if len(reqs) == 0 {
		return nil, fmt.Errorf("meta: snapshot: no volume: %w", ErrInvalid)
	}
	if len(reqs) > 1 && group == "" {
		return nil, fmt.Errorf("meta: snapshot of %d volumes without a group name: %w", len(reqs), ErrInvalid)
	}
	if group != "" {
		if err := validName("group name", group); err != nil {
			return nil, err
		}
	}
	for i, r := range reqs {
		if err := validName("snapshot name", r.Name); err != nil {
			return nil, err
		}
		for _, o := range reqs[:i] {
			if o.Volume == r.Volume {
				return nil, fmt.Errorf("meta: snapshot: volume %s named twice: %w", r.Volume, ErrInvalid)
			}
		}
	}
	for range maxTries {
		b := &SnapshotBatch{s: s, group: group}
		var cmps []clientv3.Cmp
		var ops []clientv3.Op
		now := time.Now().UTC()
		for _, r := range reqs {
			v, rev, err := s.volume(ctx, r.Volume)
			if err != nil {
				return nil, fmt.Errorf("meta: snapshot %s@%s: %w", r.Volume, r.Name, err)
			}
			ak, ek, rk := s.attachKey(v.ID), s.epochKey(v.ID), s.SnapRequestKey(v.ID)
			resp, err := s.cli.Txn(ctx).Then(clientv3.OpGet(ak), clientv3.OpGet(ek), clientv3.OpGet(rk),
				clientv3.OpGet(s.releasedKey(v.ID))).Commit()
			if err != nil {
				return nil, fmt.Errorf("meta: snapshot %s@%s: %w", r.Volume, r.Name, err)
			}
			bv := batchVol{req: r, id: v.ID}
			cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(s.volKey(v.ID)), "=", rev))
			if kvs := resp.Responses[1].GetResponseRange().Kvs; len(kvs) == 1 {
				bv.epoch = string(kvs[0].Value)
				cmps = append(cmps, clientv3.Compare(clientv3.Value(ek), "=", bv.epoch))
			} else {
				cmps = append(cmps, clientv3.Compare(clientv3.CreateRevision(ek), "=", 0))
			}
			held := false
			if kvs := resp.Responses[0].GetResponseRange().Kvs; len(kvs) == 1 {
				var a attachRecord
				if err := json.Unmarshal(kvs[0].Value, &a); err != nil {
					return nil, fmt.Errorf("meta: snapshot %s@%s: corrupt attach record: %w", r.Volume, r.Name, err)
				}
				cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(ak), "=", kvs[0].ModRevision))
				if !a.Maintenance {
					// A client holds it: it must pause. A storage node's
					// maintenance job changes no data (it copies), and it
					// fenced every earlier holder when it opened the volume.
					bv.holder = fmt.Sprintf("%s on %s, epoch %d", a.Holder, a.Host, a.Epoch)
				}
				held = true
			} else {
				cmps = append(cmps, clientv3.Compare(clientv3.CreateRevision(ak), "=", 0))
				released := ""
				if kvs := resp.Responses[3].GetResponseRange().Kvs; len(kvs) == 1 {
					released = string(kvs[0].Value)
				}
				if bv.epoch != "" && released != bv.epoch {
					// Its lease expired: it may still be writing, without
					// etcd, under the old snapshot number.
					return nil, fmt.Errorf("meta: snapshot %s@%s: volume %s was last held at epoch %s and its holder's lease expired without a detach: "+
						"it may still be writing (cut off from etcd): %w", r.Volume, r.Name, r.Volume, bv.epoch, ErrNotReleased)
				}
			}
			// A request left by a snapshot whose command died: dropped if
			// it is not for the holder now (that holder cancels its own
			// after pauseLimit).
			if kvs := resp.Responses[2].GetResponseRange().Kvs; len(kvs) == 1 {
				var old SnapRequest
				json.Unmarshal(kvs[0].Value, &old)
				if held && bv.holder != "" && strconv.FormatUint(old.Epoch, 10) == bv.epoch {
					return nil, fmt.Errorf("meta: snapshot %s@%s: another snapshot of the volume is being taken (if its command died, its holder cancels it within %v): try again: %w",
						r.Volume, r.Name, pauseLimitMeta, ErrConflict)
				}
				cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(rk), "=", kvs[0].ModRevision))
				if bv.holder == "" { // else replaced below
					ops = append(ops, clientv3.OpDelete(rk), clientv3.OpDelete(s.SnapAckKey(v.ID)))
				}
			} else {
				cmps = append(cmps, clientv3.Compare(clientv3.CreateRevision(rk), "=", 0))
			}
			// Drop snapshots abandoned by a process that died taking them.
			v.Snapshots = slices.DeleteFunc(v.Snapshots, func(o Snapshot) bool {
				return o.Pending && now.Sub(o.Created) > pendingAbandoned
			})
			for _, o := range v.Snapshots {
				if o.Name == r.Name {
					return nil, fmt.Errorf("meta: snapshot %s@%s: %w", r.Volume, r.Name, ErrExists)
				}
			}
			if len(v.Snapshots) >= MaxSnapshots {
				return nil, fmt.Errorf("meta: snapshot %s@%s: the volume has %d snapshots, the most it keeps: delete one first: %w",
					r.Volume, r.Name, len(v.Snapshots), ErrInvalid)
			}
			if v.SnapSeq >= MaxSnapSeq {
				return nil, fmt.Errorf("meta: snapshot %s@%s: the volume used all %d snapshot numbers: %w", r.Volume, r.Name, MaxSnapSeq, ErrInvalid)
			}
			v.SnapSeq++
			bv.seq = v.SnapSeq
			v.Snapshots = append(v.Snapshots, Snapshot{ID: v.SnapSeq, Name: r.Name, Created: now, Size: v.Size, Group: group, Pending: true})
			js, _ := json.Marshal(v)
			ops = append(ops, clientv3.OpPut(s.volKey(v.ID), string(js)))
			if bv.holder != "" {
				e, _ := strconv.ParseUint(bv.epoch, 10, 64)
				rq, _ := json.Marshal(SnapRequest{Seq: bv.seq, Group: group, Epoch: e})
				bv.reqVal = string(rq)
				ops = append(ops, clientv3.OpPut(rk, bv.reqVal), clientv3.OpDelete(s.SnapAckKey(v.ID)))
			}
			b.vols = append(b.vols, bv)
		}
		tr, err := s.txn(ctx, cmps, ops, nil)
		if err != nil {
			return nil, fmt.Errorf("meta: begin snapshot: %w", err)
		}
		if tr.Succeeded {
			b.rev = tr.Header.Revision
			return b, nil
		}
		// Something changed (an attach, another snapshot): read again. A
		// request left by another snapshot in progress waits for it.
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("meta: begin snapshot: %w", ctx.Err())
		case <-time.After(10 * time.Millisecond):
		}
	}
	return nil, fmt.Errorf("meta: begin snapshot: contended %d times: %w", maxTries, ErrConflict)
}

// Wait waits until the holder of every held volume of b acknowledged its
// request, or ctx ends (the error names those that did not).
func (b *SnapshotBatch) Wait(ctx context.Context) error {
	s := b.s
	missing := func() ([]string, error) {
		var l []string
		for _, v := range b.vols {
			if v.holder == "" {
				continue
			}
			resp, err := s.cli.Get(ctx, s.SnapAckKey(v.id))
			if err != nil {
				return nil, err
			}
			e, _ := strconv.ParseUint(v.epoch, 10, 64)
			if len(resp.Kvs) == 0 || string(resp.Kvs[0].Value) != SnapAck(v.seq, e) {
				l = append(l, fmt.Sprintf("%s (%s)", v.req.Volume, v.holder))
			}
		}
		return l, nil
	}
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	w := s.cli.Watch(wctx, s.kSnapAck, clientv3.WithPrefix(), clientv3.WithRev(b.rev))
	for {
		l, err := missing()
		if err != nil {
			return fmt.Errorf("meta: snapshot: read acknowledgements: %w", err)
		}
		if len(l) == 0 {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("meta: snapshot: no acknowledgement from the holder of %s: %w", strings.Join(l, ", "), ctx.Err())
		case _, ok := <-w:
			if !ok {
				w = s.cli.Watch(wctx, s.kSnapAck, clientv3.WithPrefix())
			}
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// Commit makes b's snapshots permanent, if nothing attached since begin and
// every holder is still paused; then the holders resume. It fails with
// ErrConflict otherwise (call Abort).
func (b *SnapshotBatch) Commit(ctx context.Context) ([]Snapshot, error) {
	s := b.s
	for range maxTries {
		var cmps []clientv3.Cmp
		var ops []clientv3.Op
		var out []Snapshot
		for _, bv := range b.vols {
			v, rev, err := s.volume(ctx, bv.req.Volume)
			if err != nil {
				return nil, fmt.Errorf("meta: commit snapshot %s@%s: %w", bv.req.Volume, bv.req.Name, err)
			}
			if v.ID != bv.id {
				return nil, fmt.Errorf("meta: commit snapshot %s@%s: the volume was deleted: %w", bv.req.Volume, bv.req.Name, ErrConflict)
			}
			i := slices.IndexFunc(v.Snapshots, func(o Snapshot) bool { return o.ID == bv.seq && o.Pending })
			if i < 0 {
				return nil, fmt.Errorf("meta: commit snapshot %s@%s: no longer pending (deleted or aborted): %w", bv.req.Volume, bv.req.Name, ErrConflict)
			}
			v.Snapshots[i].Pending = false
			out = append(out, v.Snapshots[i])
			js, _ := json.Marshal(v)
			cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(s.volKey(v.ID)), "=", rev))
			ek := s.epochKey(v.ID)
			if bv.epoch == "" {
				cmps = append(cmps, clientv3.Compare(clientv3.CreateRevision(ek), "=", 0))
			} else {
				cmps = append(cmps, clientv3.Compare(clientv3.Value(ek), "=", bv.epoch))
			}
			ops = append(ops, clientv3.OpPut(s.volKey(v.ID), string(js)))
			if bv.holder != "" {
				e, _ := strconv.ParseUint(bv.epoch, 10, 64)
				cmps = append(cmps,
					clientv3.Compare(clientv3.Value(s.SnapRequestKey(v.ID)), "=", bv.reqVal),
					clientv3.Compare(clientv3.Value(s.SnapAckKey(v.ID)), "=", SnapAck(bv.seq, e)))
				ops = append(ops, clientv3.OpDelete(s.SnapRequestKey(v.ID)), clientv3.OpDelete(s.SnapAckKey(v.ID)))
			}
		}
		tr, err := s.txn(ctx, cmps, ops, nil)
		if err != nil {
			return nil, fmt.Errorf("meta: commit snapshot: %w", err)
		}
		if tr.Succeeded {
			return out, nil
		}
		// A volume record changed (a resize, say) or the barrier broke:
		// tell them apart by reading the barrier keys once more.
		if err := b.intact(ctx); err != nil {
			return nil, err
		}
	}
	return nil, fmt.Errorf("meta: commit snapshot: contended %d times: %w", maxTries, ErrConflict)
}

// intact checks that nobody attached and every holder is still paused.
func (b *SnapshotBatch) intact(ctx context.Context) error {
	s := b.s
	for _, bv := range b.vols {
		resp, err := s.cli.Txn(ctx).Then(clientv3.OpGet(s.epochKey(bv.id)), clientv3.OpGet(s.SnapRequestKey(bv.id)), clientv3.OpGet(s.SnapAckKey(bv.id))).Commit()
		if err != nil {
			return fmt.Errorf("meta: commit snapshot: %w", err)
		}
		epoch := ""
		if kvs := resp.Responses[0].GetResponseRange().Kvs; len(kvs) == 1 {
			epoch = string(kvs[0].Value)
		}
		if epoch != bv.epoch {
			return fmt.Errorf("meta: snapshot %s@%s: the volume was attached meanwhile (epoch %s, was %s): %w", bv.req.Volume, bv.req.Name, epoch, bv.epoch, ErrConflict)
		}
		if bv.holder == "" {
			continue
		}
		kvs := resp.Responses[1].GetResponseRange().Kvs
		if len(kvs) == 0 || string(kvs[0].Value) != bv.reqVal {
			return fmt.Errorf("meta: snapshot %s@%s: the holder (%s) stopped waiting and resumed: %w", bv.req.Volume, bv.req.Name, bv.holder, ErrConflict)
		}
	}
	return nil
}

// Abort removes b's pending snapshots and requests; the holders resume.
// Their snapshot numbers stay used.
func (b *SnapshotBatch) Abort(ctx context.Context) error {
	s := b.s
	var errs []string
	for _, bv := range b.vols {
		if bv.holder != "" {
			if _, err := s.cli.Txn(ctx).
				If(clientv3.Compare(clientv3.Value(s.SnapRequestKey(bv.id)), "=", bv.reqVal)).
				Then(clientv3.OpDelete(s.SnapRequestKey(bv.id)), clientv3.OpDelete(s.SnapAckKey(bv.id))).Commit(); err != nil {
				errs = append(errs, err.Error())
			}
		}
		if err := s.dropSnapshot(ctx, bv.req.Volume, bv.id, func(o Snapshot) bool { return o.ID == bv.seq && o.Pending }); err != nil {
			errs = append(errs, err.Error())
		}
	}
	if errs != nil {
		return fmt.Errorf("meta: abort snapshot: %s", strings.Join(errs, "; "))
	}
	return nil
}

// DeleteSnapshot deletes the snapshot VOLUME@NAME (committed or pending).
// The nodes give its space back (the chunks only it needed) at their next
// garbage collection.
func (s *Client) DeleteSnapshot(ctx context.Context, volume, name string) error {
	v, err := s.Volume(ctx, volume)
	if err != nil {
		return fmt.Errorf("meta: delete snapshot %s@%s: %w", volume, name, err)
	}
	return s.dropSnapshot(ctx, volume, v.ID, func(o Snapshot) bool { return o.Name == name })
}

// dropSnapshot removes the snapshot of volume (id) that match selects.
func (s *Client) dropSnapshot(ctx context.Context, volume string, id uint64, match func(Snapshot) bool) error {
	for range maxTries {
		v, rev, err := s.volume(ctx, volume)
		if err != nil {
			return fmt.Errorf("meta: delete snapshot of %s: %w", volume, err)
		}
		if v.ID != id {
			return nil // the volume was deleted, and its snapshots with it
		}
		i := slices.IndexFunc(v.Snapshots, match)
		if i < 0 {
			return fmt.Errorf("meta: delete snapshot of %s: %w", volume, ErrNotFound)
		}
		if c := v.Snapshots[i].Clones; len(c) > 0 {
			return fmt.Errorf("meta: delete snapshot %s@%s: clones %s read from it: flatten or delete them first: %w",
				volume, v.Snapshots[i].Name, strings.Join(c, ", "), ErrInUse)
		}
		readers, urev, err := s.snapshotReaders(ctx, v.ID, v.Snapshots[i].ID)
		if err != nil {
			return fmt.Errorf("meta: delete snapshot of %s: %w", volume, err)
		}
		if len(readers) > 0 {
			return fmt.Errorf("meta: delete snapshot %s@%s: being read by %s: stop them first: %w",
				volume, v.Snapshots[i].Name, strings.Join(readers, ", "), ErrInUse)
		}
		ukey := s.snapUseKey(v.ID, v.Snapshots[i].ID)
		v.Snapshots = slices.Delete(v.Snapshots, i, i+1)
		js, _ := json.Marshal(v)
		tr, err := s.txn(ctx,
			[]clientv3.Cmp{clientv3.Compare(clientv3.ModRevision(s.volKey(v.ID)), "=", rev),
				clientv3.Compare(clientv3.ModRevision(ukey), "=", urev)},
			[]clientv3.Op{clientv3.OpPut(s.volKey(v.ID), string(js)), clientv3.OpDelete(ukey)}, nil)
		if err != nil {
			return fmt.Errorf("meta: delete snapshot of %s: %w", volume, err)
		}
		if tr.Succeeded {
			return nil
		}
	}
	return fmt.Errorf("meta: delete snapshot of %s: contended %d times: %w", volume, maxTries, ErrConflict)
}

// GiveUpSnapRequest deletes volume id's snapshot request whose value is
// req (a holder that waited too long for the commit), so that the snapshot
// cannot commit. It reports false if the request was gone already
// (committed or aborted): either way the holder may resume.
func (s *Client) GiveUpSnapRequest(ctx context.Context, id uint64, req string) (bool, error) {
	tr, err := s.cli.Txn(ctx).
		If(clientv3.Compare(clientv3.Value(s.SnapRequestKey(id)), "=", req)).
		Then(clientv3.OpDelete(s.SnapRequestKey(id)), clientv3.OpDelete(s.SnapAckKey(id))).Commit()
	if err != nil {
		return false, fmt.Errorf("meta: give up snapshot request of volume %d: %w", id, err)
	}
	return tr.Succeeded, nil
}

// LiveSnaps returns the numbers of v's snapshots that keep data (committed
// and pending), ascending.
func (v *Volume) LiveSnaps() []uint64 {
	l := make([]uint64, 0, len(v.Snapshots))
	for _, s := range v.Snapshots {
		l = append(l, s.ID)
	}
	slices.Sort(l)
	return l
}

// AckSnapRequest acknowledges volume id's snapshot request req (its raw
// value): the holder paused at seq with epoch. Call it on a client guarded
// by the attach lease (Guarded), so that only the holder can.
func (s *Client) AckSnapRequest(ctx context.Context, id uint64, req string, seq, epoch uint64) error {
	tr, err := s.txn(ctx,
		[]clientv3.Cmp{clientv3.Compare(clientv3.Value(s.SnapRequestKey(id)), "=", req)},
		[]clientv3.Op{clientv3.OpPut(s.SnapAckKey(id), SnapAck(seq, epoch))}, nil)
	if err != nil {
		return fmt.Errorf("meta: acknowledge snapshot request of volume %d: %w", id, err)
	}
	if !tr.Succeeded {
		return fmt.Errorf("meta: acknowledge snapshot request of volume %d: the request is gone: %w", id, ErrConflict)
	}
	return nil
}

// WatchSnapRequest sends the raw value of volume id's snapshot request key
// now and after every change ("" when there is none), until ctx ends.
// After a watch error or compaction it reads the key again, so the latest
// value is always sent.
func (s *Client) WatchSnapRequest(ctx context.Context, id uint64) <-chan string {
	ch := make(chan string, 1)
	key := s.SnapRequestKey(id)
	go func() {
		defer close(ch)
		send := func(v string) bool {
			select {
			case ch <- v:
				return true
			case <-ctx.Done():
				return false
			}
		}
		for ctx.Err() == nil {
			resp, err := s.cli.Get(ctx, key)
			if err != nil {
				select {
				case <-ctx.Done():
					return
				case <-time.After(200 * time.Millisecond):
				}
				continue
			}
			v := ""
			if len(resp.Kvs) == 1 {
				v = string(resp.Kvs[0].Value)
			}
			if !send(v) {
				return
			}
			wctx, cancel := context.WithCancel(ctx)
			for wr := range s.cli.Watch(wctx, key, clientv3.WithRev(resp.Header.Revision+1)) {
				if wr.Err() != nil {
					break
				}
				for _, ev := range wr.Events {
					v := ""
					if ev.Type == clientv3.EventTypePut {
						v = string(ev.Kv.Value)
					}
					if !send(v) {
						cancel()
						return
					}
				}
			}
			cancel()
		}
	}()
	return ch
}

// TakeSnapshots takes one snapshot per request at one instant (group names
// a group snapshot; empty for one volume): BeginSnapshots, Wait up to wait
// for the holders to pause, Commit; on any failure Abort, so the
// snapshots are complete or absent, never partial.
func (s *Client) TakeSnapshots(ctx context.Context, group string, reqs []SnapshotRequest, wait time.Duration) ([]Snapshot, error) {
	b, err := s.BeginSnapshots(ctx, group, reqs)
	if err != nil {
		return nil, err
	}
	wctx, cancel := context.WithTimeout(ctx, wait)
	err = b.Wait(wctx)
	cancel()
	var out []Snapshot
	if err == nil {
		out, err = b.Commit(ctx)
		if err == nil {
			return out, nil
		}
	}
	actx, acancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer acancel()
	if aerr := b.Abort(actx); aerr != nil {
		return nil, fmt.Errorf("%w (and cancelling it: %v)", err, aerr)
	}
	return nil, err
}

// snapUseKey is the key whose mod revision grows with every new reader of
// snapshot snap of volume vol; its readers' keys are under it + "/".
func (s *Client) snapUseKey(vol, snap uint64) string {
	return fmt.Sprintf("%s%020d/%d", s.kSnapUse, vol, snap)
}

// SnapshotUse keeps a snapshot from being deleted while a reader (a view,
// a diff, a rollback) reads it: DeleteSnapshot fails with ErrInUse while it
// lasts. It lives under a lease; Lost is closed when the lease ends
// (etcd unreachable past the TTL, or Close), after which the reader must
// stop reading: the snapshot may be deleted.
type SnapshotUse struct {
	s     *Client
	lease clientv3.LeaseID
	stop  context.CancelFunc
	lost  chan struct{}
}

// UseSnapshot registers holder as a reader of snapshot snap (a number) of
// volume vol under a lease of ttl, and checks afterwards that the snapshot
// exists (committed): ErrNotFound otherwise.
func (s *Client) UseSnapshot(ctx context.Context, vol Volume, snap uint64, holder string, ttl time.Duration) (*SnapshotUse, error) {
	g, err := s.cli.Grant(ctx, ttlSeconds(ttl))
	if err != nil {
		return nil, fmt.Errorf("meta: use snapshot %d of %s: grant lease: %w", snap, vol.Name, err)
	}
	key := s.snapUseKey(vol.ID, snap)
	if _, err := s.cli.Txn(ctx).Then(
		clientv3.OpPut(fmt.Sprintf("%s/%x", key, int64(g.ID)), holder, clientv3.WithLease(g.ID)),
		clientv3.OpPut(key, holder),
	).Commit(); err != nil {
		s.cli.Revoke(context.WithoutCancel(ctx), g.ID)
		return nil, fmt.Errorf("meta: use snapshot %d of %s: %w", snap, vol.Name, err)
	}
	v, err := s.Volume(ctx, vol.Name)
	if err == nil && (v.ID != vol.ID || !slices.ContainsFunc(v.Snapshots, func(o Snapshot) bool { return o.ID == snap && !o.Pending })) {
		err = fmt.Errorf("volume %s has no snapshot %d: %w", vol.Name, snap, ErrNotFound)
	}
	if err != nil {
		s.cli.Revoke(context.WithoutCancel(ctx), g.ID)
		return nil, fmt.Errorf("meta: use snapshot: %w", err)
	}
	kctx, stop := context.WithCancel(clientv3.WithRequireLeader(context.WithoutCancel(ctx)))
	u := &SnapshotUse{s: s, lease: g.ID, stop: stop, lost: make(chan struct{})}
	ch, err := s.cli.KeepAlive(kctx, g.ID)
	go func() {
		defer close(u.lost)
		if err != nil {
			return
		}
		for range ch { // drain
		}
	}()
	return u, nil
}

// Lost is closed when the use ends.
func (u *SnapshotUse) Lost() <-chan struct{} { return u.lost }

// Close ends the use (revokes its lease).
func (u *SnapshotUse) Close(ctx context.Context) error {
	u.stop()
	<-u.lost
	if _, err := u.s.cli.Revoke(ctx, u.lease); err != nil && !errors.Is(err, rpctypes.ErrLeaseNotFound) {
		return fmt.Errorf("meta: end snapshot use: %w", err)
	}
	return nil
}

// snapshotReaders returns the holders reading snapshot snap of volume vol
// and the mod revision of its use key (0: never used).
func (s *Client) snapshotReaders(ctx context.Context, vol, snap uint64) ([]string, int64, error) {
	key := s.snapUseKey(vol, snap)
	resp, err := s.cli.Txn(ctx).Then(clientv3.OpGet(key+"/", clientv3.WithPrefix()), clientv3.OpGet(key)).Commit()
	if err != nil {
		return nil, 0, err
	}
	var l []string
	for _, kv := range resp.Responses[0].GetResponseRange().Kvs {
		l = append(l, string(kv.Value))
	}
	var rev int64
	if kvs := resp.Responses[1].GetResponseRange().Kvs; len(kvs) == 1 {
		rev = kvs[0].ModRevision
	}
	return l, rev, nil
}
