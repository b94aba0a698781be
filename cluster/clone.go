package cluster

// Clones in the client: a volume made from another's snapshot (meta.Parent)
// reads the snapshot wherever it holds no chunk of its own, and copies a
// chunk from the snapshot before its first change (copy-up).
//
// Invariants:
//   - A clone's chunk that its owners hold no slot for reads as the parent
//     snapshot's (an OK read reply with wire.ReplyAbsent from an owner the
//     marks do not exclude, then a read of the parent view). So a chunk of
//     a clone must never lose its slot while the clone has a parent:
//     discards become write-zeroes that keep the slot (NoUnmap), and a
//     rebuild copies a present chunk as a present one, an absent one as
//     absent.
//   - Every write, discard and write-zeroes of chunk i goes out only once
//     the clone holds chunk i on its owners (present[i]): the parent's
//     chunk was written whole with FlagIfAbsent (which never replaces a
//     chunk the clone already has), or it was all zeros (then an absent
//     chunk reads the same). Writes to a chunk wait in its copy-up job.
//   - The parent is dropped (meta.FinishFlatten) only by the holder, after
//     it made every chunk present. Its view is closed once no read can use
//     it: a read counts itself in reads before it checks flattened, and
//     the flattener sets flattened before it waits for reads to drain.

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/torus-storage/torus/engine"
	"github.com/torus-storage/torus/internal/wire"
	"github.com/torus-storage/torus/meta"
	"github.com/torus-storage/torus/store"
)

// cloneState is a clone's state in its Volume (zero for other volumes).
type cloneState struct {
	parent    *Volume         // a view of the parent snapshot; nil: not a clone
	present   []atomic.Uint32 // by chunk: 1 once the clone holds the chunk
	flattened atomic.Bool     // the parent is dropped: no fall-through, discards free

	mu   sync.Mutex
	jobs map[int64]*copyUpJob // copy-ups in flight, by chunk

	copyUps    atomic.Uint64 // chunks copied from the parent
	flattening atomic.Bool   // a flatten is asked for and not finished
	reads      atomic.Int64  // reads that may use the parent view now
}

// copyUpJob copies one chunk from the parent snapshot into the clone; the
// write parts that need it wait in waiters.
type copyUpJob struct {
	c       *Volume
	idx     int64
	buf     []byte
	rreq    engine.Request // the read of the parent
	wreq    engine.Request // the write into the clone
	waiters []*clusterPart
	syncs   []chan error // copyUpSync callers
}

// openParent opens the parent view of clone c (vol.Parent set).
func (c *Volume) openParent(ctx context.Context, vol meta.Volume) error {
	p := vol.Parent
	pv, err := c.ms.Volume(ctx, p.Name)
	if err != nil {
		return fmt.Errorf("parent %s of clone %s: %w", p.Name, vol.Name, err)
	}
	if pv.ID != p.Volume {
		return fmt.Errorf("parent %s of clone %s was deleted: %w", p.Name, vol.Name, meta.ErrNotFound)
	}
	for _, s := range pv.Snapshots {
		if s.ID == p.Snap && s.Size > 0 && s.Size <= pv.Size {
			pv.Size = s.Size
		}
	}
	opt := c.opt
	opt.Snapshot, opt.Epoch = p.Snap, 0
	opt.Holder = fmt.Sprintf("clone %s (%s)", vol.Name, c.opt.Holder)
	view, err := Open(ctx, c.ms, pv, opt)
	if err != nil {
		return fmt.Errorf("parent %s@%s of clone %s: %w", p.Name, p.Snapshot, vol.Name, err)
	}
	c.clone.parent = view
	c.clone.present = make([]atomic.Uint32, c.nchunks(c.size.Load()))
	c.clone.jobs = make(map[int64]*copyUpJob)
	c.clone.flattening.Store(p.Flatten)
	return nil
}

// cloneLive reports whether c reads through to a parent.
func (c *Volume) cloneLive() bool { return c.clone.parent != nil && !c.clone.flattened.Load() }

// needCopyUp reports whether a change of chunk idx must wait for its copy
// from the parent.
func (c *Volume) needCopyUp(idx int64) bool {
	if !c.cloneLive() {
		return false
	}
	return idx < int64(len(c.clone.present)) && c.clone.present[idx].Load() == 0
}

// copyUpThen sends p (a write-class part of chunk idx) once the clone
// holds the chunk.
func (c *Volume) copyUpThen(p *clusterPart, idx int64) {
	cs := &c.clone
	cs.mu.Lock()
	if j := cs.jobs[idx]; j != nil {
		j.waiters = append(j.waiters, p)
		cs.mu.Unlock()
		return
	}
	if cs.present[idx].Load() != 0 {
		cs.mu.Unlock()
		c.sendChange(p, idx)
		return
	}
	j := &copyUpJob{c: c, idx: idx, waiters: []*clusterPart{p}}
	cs.jobs[idx] = j
	cs.mu.Unlock()
	j.start()
}

// copyUpSync copies chunk idx from the parent unless the clone holds it,
// and waits.
func (c *Volume) copyUpSync(ctx context.Context, idx int64) error {
	cs := &c.clone
	cs.mu.Lock()
	if cs.present[idx].Load() != 0 {
		cs.mu.Unlock()
		return nil
	}
	j := cs.jobs[idx]
	start := j == nil
	if start {
		j = &copyUpJob{c: c, idx: idx}
		cs.jobs[idx] = j
	}
	ch := make(chan error, 1)
	j.syncs = append(j.syncs, ch)
	cs.mu.Unlock()
	if start {
		j.start()
	}
	select {
	case err := <-ch:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// sendChange sends a write-class part of chunk idx the clone holds: after
// the copy of its head for a snapshot if one is due.
func (c *Volume) sendChange(p *clusterPart, idx int64) {
	if c.needClone(idx) {
		c.cloneThen(p, idx)
		return
	}
	c.sendPart(p, idx)
}

// start reads the parent's chunk.
func (j *copyUpJob) start() {
	c := j.c
	pv := c.clone.parent
	off := j.idx * c.chunk
	n := min(c.chunk, c.size.Load()-off)
	if off >= pv.Size() {
		j.end(nil) // past the parent's end: zeros, like an absent chunk
		return
	}
	j.buf = make([]byte, n)
	j.rreq = engine.Request{Op: engine.OpRead, Offset: off, Length: min(n, pv.Size()-off), Done: readDone{j}}
	j.rreq.Buf = j.buf[:j.rreq.Length]
	pv.Submit(&j.rreq)
}

type readDone struct{ j *copyUpJob }

// Complete: the parent's chunk is read; write it (not on this goroutine: it
// may wait for a part).
func (d readDone) Complete(_ *engine.Request, err error) {
	j := d.j
	if err != nil {
		j.end(fmt.Errorf("read the parent snapshot: %w", err))
		return
	}
	if allZero(j.buf) {
		j.end(nil) // an absent chunk of the clone reads the same
		return
	}
	go j.write()
}

// write writes the parent's chunk into the clone, whole, unless the clone
// holds the chunk already (FlagIfAbsent). It carries no version: it
// changes nothing the clone reads (absent, the chunk read the same), and
// the writes waiting for it took their sequence numbers already, so a
// newer one here would be acknowledged without a node taking it.
func (j *copyUpJob) write() {
	c := j.c
	q := <-c.cloneParts
	j.wreq = engine.Request{Done: writeDone{j}}
	q.startReq(&j.wreq, q)
	q.remaining.Store(1)
	q.vseq, q.vwant = 0, store.Version{}
	h := wire.Header{Volume: c.vol.ID, Index: uint64(j.idx), Len: uint32(len(j.buf)), Flags: wire.FlagIfAbsent}
	q.op = wire.OpWrite
	q.msg.Code = uint8(wire.OpWrite)
	h.Encode(&q.msg.Header)
	q.msg.Payload, q.buf = j.buf, nil
	q.chunk = j.idx
	c.sendPart(q, j.idx)
}

type writeDone struct{ j *copyUpJob }

func (d writeDone) Complete(_ *engine.Request, err error) {
	if err != nil {
		err = fmt.Errorf("write the parent's chunk into the clone: %w", err)
	} else {
		d.j.c.clone.copyUps.Add(1)
	}
	d.j.end(err)
}

// end finishes the job: the chunk is present (err nil) and its waiters go
// on, or they fail with err.
func (j *copyUpJob) end(err error) {
	c := j.c
	cs := &c.clone
	cs.mu.Lock()
	delete(cs.jobs, j.idx)
	if err == nil {
		cs.present[j.idx].Store(1)
	} else {
		err = fmt.Errorf("cluster: clone %s chunk %d: %w", c.vol.Name, j.idx, err)
	}
	w, syncs := j.waiters, j.syncs
	cs.mu.Unlock()
	for _, ch := range syncs {
		ch <- err
	}
	go func() {
		for _, p := range w {
			switch {
			case err != nil:
				p.finish(err)
			default:
				c.sendChange(p, p.chunk)
			}
		}
	}()
}

// readParent completes read part p, whose reply said the clone holds no
// slot for its chunk, with the parent's data.
func (c *Volume) readParent(p *clusterPart) {
	var h wire.Header
	_ = wire.Decode(wire.OpRead, &p.msg.Header, &h)
	off := p.chunk*c.chunk + int64(h.Off)
	pv := c.clone.parent
	if off >= pv.Size() {
		clear(p.buf)
		p.finish(nil)
		c.clone.reads.Add(-1)
		return
	}
	n := min(int64(len(p.buf)), pv.Size()-off)
	clear(p.buf[n:])
	p.preq = engine.Request{Op: engine.OpRead, Offset: off, Length: n, Buf: p.buf[:n], Done: parentReadDone{p}}
	pv.Submit(&p.preq)
}

type parentReadDone struct{ p *clusterPart }

func (d parentReadDone) Complete(_ *engine.Request, err error) {
	if err != nil {
		err = fmt.Errorf("cluster: clone %s: read of its parent: %w", d.p.c.vol.Name, err)
	}
	c := d.p.c
	d.p.finish(err)
	c.clone.reads.Add(-1)
}

// flattener copies every chunk the clone still reads from its parent once
// a flatten is asked for (meta.FlattenVolume), then drops the parent
// (meta.FinishFlatten). It runs in the holder: the attached client, or a
// storage node's maintenance job.
func (c *Volume) flattener() {
	t := time.NewTicker(2 * time.Second)
	defer t.Stop()
	for {
		ctx, cancel := context.WithTimeout(c.ctx, 10*time.Second)
		v, err := c.ms.Volume(ctx, c.vol.Name)
		cancel()
		if err == nil && v.ID == c.vol.ID {
			if v.Parent == nil {
				c.clone.flattened.Store(true)
				c.clone.flattening.Store(false)
				return
			}
			if v.Parent.Flatten {
				c.clone.flattening.Store(true)
				if err := c.flatten(); err == nil {
					return
				} else if c.ctx.Err() == nil {
					c.log.Warn("cluster: flatten stopped; trying again", "volume", c.vol.Name, "err", err)
				}
			}
		}
		select {
		case <-c.ctx.Done():
			return
		case <-t.C:
		}
	}
}

// flatten copies every chunk from the parent and drops it.
func (c *Volume) flatten() error {
	start := time.Now()
	n := int64(len(c.clone.present))
	progress := func(done int64) {
		ctx, cancel := context.WithTimeout(c.ctx, 5*time.Second)
		defer cancel()
		if err := c.fenceIf(c.ms.SetProgress(ctx, c.vol.ID, meta.Progress{Kind: meta.ProgressFlatten, Done: uint64(done),
			Total: uint64(n), Started: start, Holder: c.opt.Holder})); err != nil {
			c.log.Warn("cluster: flatten progress not recorded", "volume", c.vol.Name, "err", err)
		}
	}
	last := time.Now()
	for idx := range n {
		if c.fenced.Load() {
			return engine.ErrFenced
		}
		if err := c.copyUpSync(c.ctx, idx); err != nil {
			return err
		}
		if time.Since(last) > time.Second {
			progress(idx + 1)
			last = time.Now()
		}
	}
	progress(n)
	ctx, cancel := context.WithTimeout(c.ctx, 10*time.Second)
	defer cancel()
	if err := c.fenceIf(c.ms.FinishFlatten(ctx, c.vol.Name)); err != nil {
		return fmt.Errorf("drop the parent: %w", err)
	}
	c.clone.flattened.Store(true)
	c.clone.flattening.Store(false)
	for c.clone.reads.Load() != 0 {
		time.Sleep(time.Millisecond)
	}
	if err := c.clone.parent.Close(); err != nil {
		c.log.Warn("cluster: closing the parent view of a flattened clone", "volume", c.vol.Name, "err", err)
	}
	c.log.Info("cluster: clone flattened: it holds all its chunks and reads its parent no more", "volume", c.vol.Name,
		"copied", c.clone.copyUps.Load(), "took", time.Since(start).Round(time.Millisecond))
	return nil
}
