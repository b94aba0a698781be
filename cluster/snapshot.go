package cluster

// Snapshots in the client: changes under the volume's snapshot number, the
// pause a snapshot asks for, copy-on-write of chunk heads, and read-only
// views of a snapshot.
//
// Invariants:
//   - Every write, discard and write-zeroes of chunk i is sent only after
//     every owner it goes to took an OpClone of i to the snapshot number
//     seq the change is made under (cloned[i] == seq), or, if an owner did
//     not, after its mark is recorded like a missed write's. So each
//     snapshot copy s of a chunk is the head before any change made under
//     s or later, on every owner that holds a complete copy.
//   - seq changes only while writes are paused with none in flight (pause):
//     a write submitted before the pause completes under the old number,
//     one submitted during it waits and runs under the new one. A clone job
//     counts as in flight through the writes that wait for it.
//   - The pause lasts from the request (meta.SnapRequest for this epoch)
//     until the request is gone (committed or aborted), or until the
//     client gave up waiting and deleted the request itself (then the
//     snapshot cannot commit); never longer than pauseLimit plus the etcd
//     calls. Acknowledged writes are never held: only new ones wait.
//   - Before it acknowledges a pause, the client flushes every node it
//     wrote: a snapshot's data is durable on every replica when it commits
//     (and each later copy of a head is written FUA), so a node's power
//     loss never costs a snapshot data.
//   - A view (Options.Snapshot) never writes, never fences, and records
//     nothing in etcd: it reads as of the snapshot from owners the volume's
//     marks do not exclude, re-reading marks and placement every second
//     (a mark recorded by the holder reaches it within that second).

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/torus-storage/torus/engine"
	"github.com/torus-storage/torus/internal/wire"
	"github.com/torus-storage/torus/meta"
	"github.com/torus-storage/torus/netquic"
	"github.com/torus-storage/torus/store"
)

// viewGrace is how long a finished move waits before it discards the old
// owners' copies: more than twice the interval at which snapshot views
// re-read the placement (viewRefresher).
const viewGrace = 3 * time.Second

// viewUseTTL is the lease of a view's registration as a reader of its
// snapshot (meta.UseSnapshot): past it without etcd the view stops reading.
const viewUseTTL = 10 * time.Second

// pauseLimit is the longest a client holds new writes for a snapshot that
// does not commit.
const pauseLimit = 15 * time.Second

// snapState is a Volume's snapshot state.
type snapState struct {
	seq    atomic.Uint64
	cloned []atomic.Uint32 // by chunk: the snapshot number its head was copied under

	cowMu sync.Mutex
	cow   map[int64]*cloneJob // clones in flight, by chunk

	inflight atomic.Int64 // write-class requests submitted and not completed
	paused   atomic.Bool  // new write-class requests wait in held
	pauseMu  sync.Mutex
	held     []*engine.Request
	drained  chan struct{}

	pauses atomic.Uint64 // snapshot pauses taken
	copies atomic.Uint64 // chunk heads copied (clone jobs that succeeded)

	use *meta.SnapshotUse // a view's registration as a reader of its snapshot
}

// cloneJob copies one chunk's head to a snapshot copy; the write parts that
// need it wait in waiters.
type cloneJob struct {
	c       *Volume
	idx     int64
	seq     uint64
	req     engine.Request
	waiters []*clusterPart
	// ifHead: started for a discard or write-zeroes (FlagIfHead): nodes
	// without a head make no copy; heads counts those that made one.
	ifHead bool
	heads  atomic.Int32
}

func (c *Volume) initSnap(vol meta.Volume) {
	c.snap.seq.Store(vol.SnapSeq)
	c.snap.cloned = make([]atomic.Uint32, c.nchunks(c.size.Load()))
	c.snap.cow = make(map[int64]*cloneJob)
	c.snap.drained = make(chan struct{}, 1)
}

// SnapSeq returns the snapshot number changes are made under now.
func (c *Volume) SnapSeq() uint64 { return c.snap.seq.Load() }

// needClone reports whether a change of chunk idx must wait for a copy of
// its head under the current snapshot number.
func (c *Volume) needClone(idx int64) bool {
	seq := c.snap.seq.Load()
	if seq == 0 {
		return false
	}
	return idx >= int64(len(c.snap.cloned)) || c.snap.cloned[idx].Load() != uint32(seq)
}

// cloneThen sends p (a write-class part of chunk idx) once the chunk's head
// is copied under the current snapshot number: it joins the job in flight
// for idx or starts one.
func (c *Volume) cloneThen(p *clusterPart, idx int64) {
	seq := c.snap.seq.Load()
	c.snap.cowMu.Lock()
	if j := c.snap.cow[idx]; j != nil {
		j.waiters = append(j.waiters, p)
		c.snap.cowMu.Unlock()
		return
	}
	if !c.needClone(idx) {
		c.snap.cowMu.Unlock()
		c.sendPart(p, idx)
		return
	}
	j := &cloneJob{c: c, idx: idx, seq: seq, waiters: []*clusterPart{p}, ifHead: p.op != wire.OpWrite}
	j.req.Done = j
	c.snap.cow[idx] = j
	c.snap.cowMu.Unlock()

	q := <-c.cloneParts
	q.startReq(&j.req, q)
	q.remaining.Store(1)
	h := wire.Header{Volume: c.vol.ID, Index: uint64(idx), Snap: uint32(seq)}
	if j.ifHead {
		h.Flags = wire.FlagIfHead
	}
	q.job = j
	q.vseq, q.vwant = 0, store.Version{}
	q.op = wire.OpClone
	q.msg.Code = uint8(wire.OpClone)
	h.Encode(&q.msg.Header)
	q.msg.Payload, q.buf = nil, nil
	q.chunk = idx
	c.sendPart(q, idx)
}

// Complete ends a clone job: its waiters are sent, or fail with its error.
func (j *cloneJob) Complete(_ *engine.Request, err error) {
	c := j.c
	// No node had a head (ifHead): no copy was made, and none is needed
	// until a write creates the head: the chunk stays to be copied.
	copied := err == nil && !(j.ifHead && j.heads.Load() == 0)
	c.snap.cowMu.Lock()
	delete(c.snap.cow, j.idx)
	if copied && j.idx < int64(len(c.snap.cloned)) {
		c.snap.cloned[j.idx].Store(uint32(j.seq))
	}
	w := j.waiters
	c.snap.cowMu.Unlock()
	if copied {
		c.snap.copies.Add(1)
	} else if err != nil {
		err = fmt.Errorf("cluster: volume %s chunk %d: copy of the head for snapshot %d: %w", c.vol.Name, j.idx, j.seq, err)
	}
	// Not on this goroutine (a node reply's): sending may wait for a
	// rebuild's copy of the chunk.
	go func() {
		for _, p := range w {
			switch {
			case err != nil:
				p.finish(err)
			case !copied && p.op == wire.OpWrite:
				c.cloneThen(p, p.chunk) // a write needs the copy after all
			default:
				c.sendPart(p, p.chunk)
			}
		}
	}()
}

// holdWrite is called by Submit for each write-class request: it counts the
// request in flight, or holds it while a snapshot pauses writes (false).
func (c *Volume) holdWrite(r *engine.Request) bool {
	s := &c.snap
	s.inflight.Add(1)
	if !s.paused.Load() {
		return true
	}
	s.pauseMu.Lock()
	if !s.paused.Load() {
		s.pauseMu.Unlock()
		return true
	}
	s.held = append(s.held, r)
	s.pauseMu.Unlock()
	c.writeDone()
	return false
}

// writeDone is called when a write-class request counted by holdWrite
// completes.
func (c *Volume) writeDone() {
	s := &c.snap
	if s.inflight.Add(-1) == 0 && s.paused.Load() {
		select {
		case s.drained <- struct{}{}:
		default:
		}
	}
}

// pause stops new writes, waits for those in flight, and from then on
// makes changes under snapshot number seq (never a lower one).
func (c *Volume) pause(ctx context.Context, seq uint64) error {
	s := &c.snap
	s.pauseMu.Lock()
	s.paused.Store(true)
	s.pauseMu.Unlock()
	for s.inflight.Load() != 0 {
		select {
		case <-ctx.Done():
			c.resume()
			return ctx.Err()
		case <-s.drained:
		case <-time.After(5 * time.Millisecond):
		}
	}
	// What the snapshot holds is made durable on every replica, so that
	// it survives a power loss as any flushed write does.
	if err := c.flushAll(ctx); err != nil {
		c.resume()
		return fmt.Errorf("flush: %w", err)
	}
	if seq > s.seq.Load() {
		s.seq.Store(seq)
	}
	s.pauses.Add(1)
	return nil
}

// flushAll submits a Flush and waits for it.
func (c *Volume) flushAll(ctx context.Context) error {
	w := make(flushWaiter, 1)
	c.Submit(&engine.Request{Op: engine.OpFlush, Done: w})
	select {
	case err := <-w:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

type flushWaiter chan error

func (w flushWaiter) Complete(_ *engine.Request, err error) { w <- err }

// resume lets writes go on; those held meanwhile are submitted in order.
func (c *Volume) resume() {
	s := &c.snap
	s.pauseMu.Lock()
	held := s.held
	s.held = nil
	s.paused.Store(false)
	s.pauseMu.Unlock()
	for _, r := range held {
		c.Submit(r)
	}
}

// snapWatcher answers the volume's snapshot requests for this holder
// (meta.BeginSnapshots): pause, acknowledge, resume when the request is
// gone.
func (c *Volume) snapWatcher() {
	ch := c.ms.WatchSnapRequest(c.ctx, c.vol.ID)
	var cur string // the request this client is paused for
	var limit <-chan time.Time
	for {
		select {
		case <-c.ctx.Done():
			if cur != "" {
				c.resume()
			}
			return
		case v, ok := <-ch:
			if !ok {
				return
			}
			if v == cur {
				continue
			}
			if cur != "" {
				// Committed or aborted (or replaced): go on.
				c.resume()
				cur, limit = "", nil
			}
			if v == "" {
				continue
			}
			var rq meta.SnapRequest
			if err := json.Unmarshal([]byte(v), &rq); err != nil || rq.Epoch != c.epoch.Load() || c.fenced.Load() {
				continue // not for this holder
			}
			if d := c.testSnapDelay.Load(); d != nil {
				time.Sleep(*d)
			}
			if err := c.answerSnap(v, rq); err != nil {
				c.log.Warn("cluster: snapshot request not acknowledged; writes go on", "volume", c.vol.Name, "snapshot", rq.Seq, "err", err)
				continue
			}
			cur = v
			limit = time.After(pauseLimit)
		case <-limit:
			c.giveUpSnap(cur)
			c.resume()
			cur, limit = "", nil
		}
	}
}

// answerSnap pauses writes for request v and acknowledges it.
func (c *Volume) answerSnap(v string, rq meta.SnapRequest) error {
	start := time.Now()
	ctx, cancel := context.WithTimeout(c.ctx, pauseLimit)
	defer cancel()
	if err := c.pause(ctx, rq.Seq); err != nil {
		// Resumed: the request must not commit without this client.
		c.giveUpSnap(v)
		return fmt.Errorf("waiting for writes in flight: %w", err)
	}
	for {
		err := c.ms.AckSnapRequest(ctx, c.vol.ID, v, rq.Seq, c.epoch.Load())
		if err == nil {
			c.log.Info("cluster: paused for a snapshot", "volume", c.vol.Name, "snapshot", rq.Seq, "group", rq.Group, "took", time.Since(start))
			return nil
		}
		if errors.Is(err, meta.ErrConflict) || errors.Is(err, meta.ErrNotHolder) || ctx.Err() != nil {
			// The request is gone, or this client is no longer the
			// holder: the snapshot does not count on it.
			c.giveUpSnap(v)
			c.resume()
			return err
		}
		select {
		case <-ctx.Done():
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// giveUpSnap deletes request v so that it cannot commit without this
// client, trying until etcd answers: writes stay held until it does, or
// until the request is gone anyway.
func (c *Volume) giveUpSnap(v string) {
	for c.ctx.Err() == nil {
		ctx, cancel := context.WithTimeout(c.ctx, 5*time.Second)
		gaveUp, err := c.ms.GiveUpSnapRequest(ctx, c.vol.ID, v)
		cancel()
		if err == nil {
			if gaveUp {
				c.log.Warn("cluster: snapshot did not commit in time; it is cancelled and writes go on", "volume", c.vol.Name)
			}
			return
		}
		c.log.Warn("cluster: cannot cancel a snapshot request; writes wait", "volume", c.vol.Name, "err", err)
		time.Sleep(200 * time.Millisecond)
	}
}

// viewRefresher keeps a snapshot view's marks and placement current.
func (c *Volume) viewRefresher() {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-c.ctx.Done():
			return
		case <-c.snap.use.Lost():
			// The snapshot may be deleted now: read no more.
			c.Fence(fmt.Errorf("cluster: snapshot %d of volume %s: the view's registration as a reader ended (etcd unreachable): %w",
				c.opt.Snapshot, c.vol.Name, errSnapshotGone))
			<-c.ctx.Done()
			return
		case <-t.C:
		case <-c.probeKick:
		}
		for _, p := range c.state.Load().all {
			if p.reload.Load() {
				if err := c.reloadMarks(p); err != nil {
					c.log.Warn("cluster: snapshot view: cannot read the marks of a node that restarted; it serves no reads until then",
						"volume", c.vol.Name, "node", p.id, "err", err)
				}
			}
		}
		ctx, cancel := context.WithTimeout(c.ctx, 5*time.Second)
		err := c.refreshView(ctx)
		cancel()
		if err != nil && c.ctx.Err() == nil {
			c.log.Warn("cluster: snapshot view: re-reading marks and placement", "volume", c.vol.Name, "err", err)
		}
	}
}

// refreshView re-reads the volume's recorded placement and then its marks
// (the holder records a move's rings, then the new owners' marks, then the
// placement: read in the other order, a new owner is never taken without
// its marks), and fences the view for good if its snapshot is gone.
func (c *Volume) refreshView(ctx context.Context) error {
	v, err := c.ms.Volume(ctx, c.vol.Name)
	if err != nil && !errors.Is(err, meta.ErrNotFound) {
		return err
	}
	if err != nil || v.ID != c.vol.ID || !slices.ContainsFunc(v.Snapshots, func(s meta.Snapshot) bool { return s.ID == c.opt.Snapshot && !s.Pending }) {
		c.Fence(fmt.Errorf("cluster: snapshot %d of volume %s was deleted while a view read it: %w", c.opt.Snapshot, c.vol.Name, errSnapshotGone))
		return nil
	}
	r, _, err := c.ms.Ring(ctx)
	if err != nil {
		return err
	}
	prev, err := c.ms.Moves(ctx, c.vol.ID)
	if err != nil {
		return err
	}
	base, err := c.placedRing(ctx, r)
	if err != nil {
		return err
	}
	m, unf, err := c.readMarks(ctx)
	if err != nil {
		return err
	}
	for node, chunks := range c.marks.byNode() {
		in := make(map[uint64]bool, len(m[node]))
		for _, ch := range m[node] {
			in[ch] = true
		}
		for _, ch := range chunks {
			if !in[uint64(ch)] {
				c.marks.clear(node, ch)
			}
		}
	}
	c.addMarks(m, unf, "")
	c.mu.Lock()
	defer c.mu.Unlock()
	if base.Version() == c.ring.Version() && len(prev) == len(c.prev) {
		return nil
	}
	c.ring, c.prev = base, prev
	return c.rebuildLocked()
}

// errSnapshotGone fails the reads of a view whose snapshot was deleted.
var errSnapshotGone = errors.New("snapshot deleted")

// callNode sends one maintenance request (op, h, payload) to p with the
// per-replica timeout and returns its reply, whose payload lands in into;
// the error is the call's or the reply's status (copyCallErr).
func (c *Volume) callNode(ctx context.Context, p *peer, op wire.Op, h wire.Header, payload, into []byte) (netquic.Message, error) {
	req := netquic.Message{Code: uint8(op), Payload: payload}
	h.Encode(&req.Header)
	resp := netquic.Message{Payload: into}
	cctx, cancel := context.WithTimeout(ctx, c.opt.Timeout)
	defer cancel()
	return resp, c.copyCallErr(p, p.cli.Call(cctx, &req, &resp), &resp)
}

// listSnaps returns the snapshot copies p holds of chunk ch.
func (c *Volume) listSnaps(ctx context.Context, p *peer, ch int64) ([]uint64, error) {
	h := wire.Header{Volume: c.vol.ID, Index: uint64(ch)}
	resp, err := c.callNode(ctx, p, wire.OpSnaps, h, nil, make([]byte, wire.MaxSnapsListed*8))
	if err != nil {
		return nil, fmt.Errorf("list snapshot copies on %s: %w", p.id, err)
	}
	var l []uint64
	for i := 0; i+8 <= len(resp.Payload); i += 8 {
		if s := binary.LittleEndian.Uint64(resp.Payload[i:]); s != 0 {
			l = append(l, s)
		}
	}
	return l, nil
}

// discardSnap discards snapshot copy snap of chunk ch on p, sent with fence
// epoch epoch.
func (c *Volume) discardSnap(ctx context.Context, p *peer, ch int64, snap uint64, epoch uint64) error {
	h := wire.Header{Volume: c.vol.ID, Index: uint64(ch), Snap: uint32(snap), Len: uint32(c.chunk), Epoch: epoch}
	if _, err := c.callNode(ctx, p, wire.OpDiscard, h, nil, nil); err != nil {
		return fmt.Errorf("discard snapshot copy %d on %s: %w", snap, p.id, err)
	}
	return nil
}

// copySnaps gives target the snapshot copies of chunk ch from holds (a
// source of the chunk's head), in ascending order, so that a copy in
// progress never resolves a read to a newer one than from would. A copy
// target holds and from does not is left: it serves no snapshot (from
// would hold it, or one between, if a snapshot as of which it is read were
// still there), and the node's garbage collection drops it. tgen is
// target's fence generation of the copy. Copies in done (copied from from
// before) are skipped; it returns done with those it copied added.
//
// A copy never changes once made, so copyChunk copies them in two passes:
// most before it holds the chunk's writes back, and inside its short hold
// only those made meanwhile.
func (c *Volume) copySnaps(ctx context.Context, from, target *peer, ch int64, tgen uint32, done map[uint64]bool) (map[uint64]bool, error) {
	if done == nil {
		done = make(map[uint64]bool)
	}
	src, err := c.listSnaps(ctx, from, ch)
	if err != nil {
		return done, err
	}
	have, err := c.listSnaps(ctx, target, ch)
	if err != nil {
		return done, err
	}
	if len(src) == 0 {
		return done, nil
	}
	data := make([]byte, c.chunk)
	epoch := wire.FenceEpoch(c.epoch.Load(), tgen)
	for _, s := range src {
		if done[s] {
			continue
		}
		h := wire.Header{Volume: c.vol.ID, Index: uint64(ch), Snap: uint32(s), Len: uint32(c.chunk), Epoch: c.wireEpoch(from)}
		resp, err := c.callNode(ctx, from, wire.OpRead, h, nil, data)
		if err == nil && len(resp.Payload) != len(data) {
			err = wire.ErrBadRequest
		}
		if err != nil {
			return done, fmt.Errorf("read snapshot copy %d from %s: %w", s, from.id, err)
		}
		ver := replyVer(&resp.Header)
		// A copy that reads as zeros is kept as one zero block: it must
		// exist (it says the chunk was all zeros as of the snapshot).
		n := len(data)
		if allZero(data) {
			n = engine.BlockSize
		}
		h = wire.Header{Volume: c.vol.ID, Index: uint64(ch), Snap: uint32(s), Len: uint32(n), Epoch: epoch,
			Flags: wire.FlagFUA | wire.FlagCopy, VerEpoch: ver.Epoch, VerSeq: ver.Seq}
		if n < len(data) {
			// Discard first: a copy of one block over a chunk target
			// holds whole would leave the rest.
			if slices.Contains(have, s) {
				if err := c.discardSnap(ctx, target, ch, s, epoch); err != nil {
					return done, err
				}
			}
		}
		if _, err := c.callNode(ctx, target, wire.OpWrite, h, data[:n], nil); err != nil {
			return done, fmt.Errorf("write snapshot copy %d to %s: %w", s, target.id, err)
		}
		done[s] = true
	}
	return done, nil
}

// allZero reports whether b holds only zeros.
func allZero(b []byte) bool {
	for _, x := range b {
		if x != 0 {
			return false
		}
	}
	return true
}

// OpenSnapshot opens a read-only view of snapshot snapshot of the volume
// called volume (see Options.Snapshot); ms stays the caller's. It fails
// with meta.ErrNotFound if either does not exist (a pending snapshot does
// not).
func OpenSnapshot(ctx context.Context, ms *meta.Client, volume, snapshot string, opt Options) (*Volume, error) {
	v, err := ms.Volume(ctx, volume)
	if err != nil {
		return nil, err
	}
	s, ok := v.Snapshot(snapshot)
	if !ok {
		return nil, fmt.Errorf("volume %s has no snapshot %s: %w", volume, snapshot, meta.ErrNotFound)
	}
	opt.Snapshot = s.ID
	if s.Size > 0 && s.Size <= v.Size {
		v.Size = s.Size // the volume grew since: past its end it reads zeros
	}
	return Open(ctx, ms, v, opt)
}

// RollbackResult is what Rollback did.
type RollbackResult struct {
	// Chunks is the number of chunks compared; Changed those rewritten.
	Chunks, Changed int64
}

// Rollback makes the volume called volume read as its snapshot snapshot
// again. The volume must be detached: Rollback holds its attach lock
// throughout (a client's Attach fails meanwhile with meta.ErrAttached). It
// compares each chunk with the snapshot and rewrites only those that
// differ, as any holder's writes (so later snapshots keep what they hold),
// then flushes. The snapshot and every other one stay. A Rollback that
// fails half way leaves each chunk as the snapshot or as before; run it
// again.
func Rollback(ctx context.Context, ms *meta.Client, volume, snapshot string, opt AttachOptions) (RollbackResult, error) {
	var res RollbackResult
	if opt.Holder == "" {
		opt.Holder = "rollback to " + snapshot
	}
	opt.ScrubInterval = 0
	// The lock first: the move a ring change made while the volume was
	// detached is recorded (and may finish) before the view reads.
	a, err := Attach(ctx, ms, volume, opt)
	if err != nil {
		return res, err
	}
	defer a.Close()
	sv, err := OpenSnapshot(ctx, ms, volume, snapshot, opt.Options)
	if err != nil {
		return res, err
	}
	defer sv.Close()
	chunk := a.Volume.chunk
	want := make([]byte, chunk)
	have := make([]byte, chunk)
	for off := int64(0); off < a.Size(); off += chunk {
		if err := ctx.Err(); err != nil {
			return res, err
		}
		n := min(chunk, a.Size()-off)
		clear(want[:n])
		if m := min(n, sv.Size()-off); m > 0 {
			if err := doIO(sv, engine.OpRead, off, want[:m]); err != nil {
				return res, fmt.Errorf("read snapshot %s@%s at %d: %w", volume, snapshot, off, err)
			}
		}
		if err := doIO(a, engine.OpRead, off, have[:n]); err != nil {
			return res, fmt.Errorf("read volume %s at %d: %w", volume, off, err)
		}
		res.Chunks++
		if string(want[:n]) == string(have[:n]) {
			continue
		}
		res.Changed++
		op := engine.OpWrite
		if allZero(want[:n]) {
			op = engine.OpDiscard
		}
		if err := doIO(a, op, off, want[:n]); err != nil {
			return res, fmt.Errorf("write volume %s at %d: %w", volume, off, err)
		}
	}
	if err := doIO(a, engine.OpFlush, 0, nil); err != nil {
		return res, fmt.Errorf("flush volume %s: %w", volume, err)
	}
	return res, nil
}

// doIO runs one request on v and waits for it.
func doIO(v engine.Volume, op engine.Op, off int64, b []byte) error {
	w := make(flushWaiter, 1)
	r := &engine.Request{Op: op, Offset: off, Length: int64(len(b)), Done: w}
	if op == engine.OpRead || op == engine.OpWrite {
		r.Buf = b
	}
	v.Submit(r)
	return <-w
}
