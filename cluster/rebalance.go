package cluster

// Rebalance of a replicated volume when the ring changes (a node added,
// removed or re-weighted).
//
// When the ring changes from r0 to r1, every owner of a chunk under r1 that
// was not an owner under r0 lacks the chunk: it gets a missed mark, exactly
// like a replica that missed writes, and the rebuild loop (rebuild.go)
// copies the chunk to it. Until every mark is cleared the move is in
// progress:
//
// Every ring change is on record in etcd the moment it is made (meta's ring
// history, written with the ring), so the client needs no luck to see it:
// at open it takes the ring the volume's placement was last recorded at
// (meta.Placed) and records every later ring, one version at a time, before
// it serves I/O; while open it does the same for each ring it is told of.
//
// Invariants:
//   - The previous rings are recorded in etcd (meta.SetMoves), then the
//     marks of the new owners (meta.MarkMissed), then the new placement
//     version (meta.SetPlaced), before the client switches to r1, so a
//     client attaching after a crash knows where the uncopied chunks are,
//     and no read ever goes to a new owner before its copy is done.
//   - While moving, writes go to the owners under r1 and to the owners
//     under the previous rings (so those stay good copy sources). An owner
//     under a previous ring that misses a write gets a mark like any other:
//     it is no copy source for that chunk any more. A write succeeds only
//     if some owner without a mark for the chunk took it, so an
//     acknowledged write is always on a complete copy of its chunk. Reads
//     and copies come from any owner under r1 or a previous ring that has
//     no mark for the chunk.
//   - When no owner under r1 has a mark left, the move ends: chunks are
//     discarded from nodes that own them only under a previous ring, their
//     marks are dropped, the moves record is cleared and writes go to the
//     r1 owners only. The end is decided under c.mu, so it never races the
//     start of the next move.
//   - Marks of nodes that are in no ring any more are dropped (that node is
//     gone; the chunk's new owners are marked instead).

import (
	"context"
	"fmt"
	"time"

	"github.com/torus-storage/torus/internal/wire"
	"github.com/torus-storage/torus/meta"
	"github.com/torus-storage/torus/netquic"
	"github.com/torus-storage/torus/ring"
)

// placedRing returns the ring the volume's placement is recorded at: from
// the ring history at meta.Placed, an empty ring when the volume was made
// before any ring, or cur for a volume that has no placement record.
func (c *Volume) placedRing(ctx context.Context, cur *ring.Ring) (*ring.Ring, error) {
	ver, ok, err := c.ms.Placed(ctx, c.vol.ID)
	if err != nil {
		return nil, err
	}
	if !ok || ver == cur.Version() {
		return cur, nil
	}
	r, ok, err := c.ms.RingAt(ctx, ver)
	switch {
	case err != nil:
		return nil, err
	case ok:
		return r, nil
	case ver == 0:
		return ring.New(nil, ring.Options{}) // created before the first ring
	}
	return nil, fmt.Errorf("the volume's placement is recorded at ring version %d, which the ring history no longer holds", ver)
}

// advanceLocked records, one version at a time, every ring from c.ring's
// version up to target's (the ring history in etcd; target itself if the
// history lacks it) and switches to each: the move in etcd, then the
// placement version. Called with c.mu held.
func (c *Volume) advanceLocked(ctx context.Context, target *ring.Ring) error {
	rings, err := c.ms.RingHistory(ctx, c.ring.Version(), target.Version())
	if err != nil {
		return err
	}
	if len(rings) == 0 || rings[len(rings)-1].Version() != target.Version() {
		rings = append(rings, target)
	}
	for _, next := range rings {
		if next.Version() <= c.ring.Version() {
			continue
		}
		if err := c.startMoveLocked(ctx, next); err != nil {
			return err
		}
		if err := c.ms.SetPlaced(ctx, c.vol.ID, next.Version()); err != nil {
			return err
		}
		c.ring = next
		if err := c.rebuildLocked(); err != nil {
			c.log.Warn("cluster: ring update", "volume", c.vol.Name, "err", err)
		}
	}
	return nil
}

// startMoveLocked records a move from c.ring to next: the previous rings in
// etcd, then missed marks for every new owner of every chunk. Called with
// c.mu held, before c.ring becomes next. Recording the same move twice (a
// client that died between the steps) changes nothing.
func (c *Volume) startMoveLocked(ctx context.Context, next *ring.Ring) error {
	old := c.ring
	if old == nil || old.Len() == 0 {
		return nil
	}
	prev := append([]*ring.Ring(nil), c.prev...)
	if len(prev) == 0 || prev[len(prev)-1].Version() != old.Version() {
		prev = append(prev, old)
	}
	if err := c.ms.SetMoves(ctx, c.vol.ID, prev); err != nil {
		return err
	}
	c.movePending.Store(true)
	nchunks := c.nchunks(c.size.Load())
	need := make(map[string][]int64)
	var a, b []string
	for idx := int64(0); idx < nchunks; idx++ {
		key := chunkKey(c.vol.ID, idx)
		a = old.Owners(key, c.repl, a[:0])
		b = next.Owners(key, c.repl, b[:0])
	owner:
		for _, n := range b {
			for _, o := range a {
				if o == n {
					continue owner
				}
			}
			need[n] = append(need[n], idx)
		}
	}
	total := 0
	for node, chunks := range need {
		u := make([]uint64, len(chunks))
		for i, ch := range chunks {
			u[i] = uint64(ch)
		}
		if err := c.ms.MarkMissed(ctx, c.vol.ID, node, u...); err != nil {
			return err
		}
		c.marks.add(node, chunks...)
		total += len(chunks)
	}
	// Marks of nodes in no ring any more can never be repaired: drop them.
	inRing := func(id string) bool {
		for _, r := range append(prev, next) {
			for i := 0; i < r.Len(); i++ {
				if r.Node(i).ID == id {
					return true
				}
			}
		}
		return false
	}
	if err := c.dropOutOfRingMarks(ctx, inRing); err != nil {
		return err
	}
	c.prev = prev
	predicted := next.Moved(old, c.repl, nil)
	c.moveTotal.Store(int64(total))
	c.log.Info("cluster: rebalance started", "volume", c.vol.Name, "from", old.Version(), "to", next.Version(),
		"chunk_copies", total, "of", nchunks*int64(c.repl), "moved_fraction", fmt.Sprintf("%.3f", float64(total)/float64(nchunks*int64(c.repl))),
		"ring_predicts", fmt.Sprintf("%.3f", predicted))
	_ = c.ms.SetProgress(ctx, c.vol.ID, meta.Progress{Kind: meta.ProgressRebalance, Total: uint64(total), RingVersion: next.Version(),
		Started: time.Now().UTC(), Holder: c.opt.Holder})
	c.kickRebuild()
	return nil
}

// owns reports whether node id owns chunk ch under the current ring.
func (c *Volume) owns(st *clusterState, id string, ch int64) bool {
	var ids [maxReplicas]int
	for _, i := range st.r.OwnerIndices(chunkKey(c.vol.ID, ch), c.repl, ids[:0]) {
		if st.r.Node(i).ID == id {
			return true
		}
	}
	return false
}

// moveDone reports whether no owner under the current ring of st has a
// mark left (marks of owners under previous rings only do not count: those
// copies are leaving).
func (c *Volume) moveDone(st *clusterState) bool {
	if !c.marks.any.Load() {
		return true
	}
	for node, chunks := range c.marks.byNode() {
		for _, ch := range chunks {
			if c.owns(st, node, ch) {
				return false
			}
		}
	}
	return true
}

// addPrevOwners appends to write part p the owners of key under previous
// rings that are not owners already.
func (c *Volume) addPrevOwners(st *clusterState, p *clusterPart, key uint64) {
	var ids [maxReplicas]int
	for ri, pr := range st.prev {
	next:
		for _, k := range pr.OwnerIndices(key, c.repl, ids[:0]) {
			id := pr.Node(k).ID
			for i := 0; i < p.n; i++ {
				if p.ownerIDs[i] == id {
					continue next
				}
			}
			if p.n == maxReplicas {
				return
			}
			p.owners[p.n] = st.prevPeers[ri][k]
			p.ownerIDs[p.n] = id
			p.n++
		}
	}
}

// addPrevReaders appends to read part p (k owners so far) the owners of key
// under previous rings without a mark for chunk idx; it returns the count.
func (c *Volume) addPrevReaders(st *clusterState, p *clusterPart, key uint64, idx int64, k int) int {
	var ids [maxReplicas]int
	for ri, pr := range st.prev {
	next:
		for _, i := range pr.OwnerIndices(key, c.repl, ids[:0]) {
			pp := st.prevPeers[ri][i]
			if pp == nil || c.marks.has(pp.id, idx) || pp.isSuspect(idx) {
				continue
			}
			for j := 0; j < k; j++ {
				if p.owners[j] == pp {
					continue next
				}
			}
			if k == maxReplicas {
				return k
			}
			p.owners[k] = pp
			k++
		}
	}
	return k
}

// sources lists the peers that may hold a good copy of chunk ch: owners
// under the current and previous rings without a mark for it.
func (c *Volume) sources(st *clusterState, ch int64) []*peer {
	var ids [maxReplicas]int
	key := chunkKey(c.vol.ID, ch)
	var out []*peer
	add := func(p *peer) {
		if p == nil || c.marks.has(p.id, ch) || p.isSuspect(ch) {
			return
		}
		for _, q := range out {
			if q == p {
				return
			}
		}
		out = append(out, p)
	}
	for _, i := range st.r.OwnerIndices(key, c.repl, ids[:0]) {
		add(st.peers[i])
	}
	for ri, pr := range st.prev {
		for _, i := range pr.OwnerIndices(key, c.repl, ids[:0]) {
			add(st.prevPeers[ri][i])
		}
	}
	return out
}

// finishMove ends a move once no owner under the current ring has a mark
// left, in an order that is safe to stop at any step:
//  1. the previous rings are dropped from the placement in memory (under
//     c.mu, so it never races the start of the next move);
//  2. it waits until no read or write sent under the old placement is in
//     flight;
//  3. the moves record in etcd is set to what the placement still needs
//     (nil, or the rings of a move started meanwhile): from then on no
//     holder reads from or copies the old copies;
//  4. the chunks nodes hold only under the dropped rings are discarded (a
//     stop before this leaves garbage, never a missing copy);
//  5. the marks of nodes that own a chunk under no ring of the placement
//     any more are dropped.
func (c *Volume) finishMove() {
	st := c.state.Load()
	// resume: an earlier end stopped after step 1 (an etcd error); steps
	// 3 and 5 are left, and nothing was placed under the dropped rings
	// since.
	resume := len(st.prev) == 0 && c.movePending.Load() && c.moveDone(st)
	if !resume && (len(st.prev) == 0 || !c.moveDone(st)) {
		return
	}
	if !resume {
		c.mu.Lock()
		if cs := c.state.Load(); cs != st || !c.moveDone(cs) {
			c.mu.Unlock()
			return // the placement changed meanwhile: look again later
		}
		c.prev = nil
		if err := c.rebuildLocked(); err != nil {
			c.log.Warn("cluster: rebalance end", "volume", c.vol.Name, "err", err)
		}
		c.mu.Unlock()
		// Reads and writes sent under the old placement may still reach
		// the old owners: let them finish before those copies go.
		for c.placedUnder(st) {
			select {
			case <-c.ctx.Done():
				return
			case <-time.After(time.Millisecond):
			}
		}
		if h := c.testMoveSwitched.Load(); h != nil && (*h)() {
			return // a test stops the holder here
		}
	}
	ctx, cancel := context.WithTimeout(c.ctx, 10*time.Second)
	defer cancel()
	c.mu.Lock()
	prev := c.prev // rings of a move started meanwhile, if any
	err := c.fenceIf(c.ms.SetMoves(ctx, c.vol.ID, prev))
	if err == nil && len(prev) == 0 {
		c.movePending.Store(false)
	}
	c.mu.Unlock()
	if err != nil {
		c.log.Warn("cluster: rebalance done but the moves record stays (retrying)", "volume", c.vol.Name, "err", err)
		return
	}
	discarded := 0
	if !resume {
		// Snapshot views re-read the placement every second: give them
		// time to leave the old owners before their copies go.
		select {
		case <-c.ctx.Done():
			return
		case <-time.After(viewGrace):
		}
		discarded = c.discardOld(st)
	}
	if err := c.dropLeavingMarks(ctx); err != nil {
		c.log.Warn("cluster: rebalance done but the marks of leaving copies stay (retrying)", "volume", c.vol.Name, "err", err)
	}
	if resume {
		return
	}
	total := uint64(c.moveTotal.Load())
	_ = c.fenceIf(c.ms.SetProgress(ctx, c.vol.ID, meta.Progress{Kind: meta.ProgressRebalance, Done: total, Total: total, RingVersion: st.r.Version(),
		Holder: c.opt.Holder}))
	if n, err := c.ms.PruneRings(ctx); err != nil {
		c.log.Warn("cluster: pruning the ring history", "err", err)
	} else if n > 0 {
		c.log.Debug("cluster: ring history pruned", "rings", n)
	}
	c.moves.Add(1)
	c.log.Info("cluster: rebalance finished", "volume", c.vol.Name, "ring", st.r.Version(), "chunk_copies", total, "old_copies_discarded", discarded)
}

// discardOld discards the chunks nodes hold only under the previous rings
// of st (a placement no request uses any more, and no moves record names)
// and returns how many copies went.
func (c *Volume) discardOld(st *clusterState) int {
	nchunks := c.nchunks(c.size.Load())
	var ids [maxReplicas]int
	discarded := 0
	for idx := int64(0); idx < nchunks; idx++ {
		if c.ctx.Err() != nil || c.fenced.Load() {
			return discarded
		}
		key := chunkKey(c.vol.ID, idx)
		cur := st.r.Owners(key, c.repl, nil)
		for ri, pr := range st.prev {
		next:
			for _, i := range pr.OwnerIndices(key, c.repl, ids[:0]) {
				p := st.prevPeers[ri][i]
				if p == nil || p.isDown() {
					continue
				}
				for _, id := range cur {
					if id == p.id {
						continue next
					}
				}
				// An owner under the placement now (a move started
				// meanwhile) keeps its copy.
				if c.ownsAnywhere(c.state.Load(), p.id, idx) {
					continue
				}
				length := c.chunk
				if end, size := (idx+1)*c.chunk, c.size.Load(); end > size {
					length = size - idx*c.chunk
				}
				h := wire.Header{Volume: c.vol.ID, Index: uint64(idx), Len: uint32(length), Epoch: c.wireEpoch(p)}
				req := netquic.Message{Code: uint8(wire.OpDiscard)}
				h.Encode(&req.Header)
				resp := netquic.Message{}
				ctx, cancel := context.WithTimeout(c.ctx, c.opt.Timeout)
				if err := p.cli.Call(ctx, &req, &resp); err == nil && wire.Status(resp.Code) == wire.StatusOK {
					discarded++
				}
				cancel()
				// And its snapshot copies (if this fails, they stay until
				// their snapshots are deleted).
				if snaps, err := c.listSnaps(c.ctx, p, idx); err == nil {
					for _, s := range snaps {
						_ = c.discardSnap(c.ctx, p, idx, s, c.wireEpoch(p))
					}
				}
			}
		}
	}
	return discarded
}

// dropOutOfRingMarks drops the marks of nodes for which inRing is false.
func (c *Volume) dropOutOfRingMarks(ctx context.Context, inRing func(string) bool) error {
	c.clearMu.Lock()
	defer c.clearMu.Unlock()
	c.clears++
	for node, chunks := range c.marks.byNode() {
		if inRing(node) {
			continue
		}
		for _, ch := range chunks {
			if err := c.ms.ClearMissed(ctx, c.vol.ID, node, uint64(ch)); err != nil {
				return err
			}
			c.marks.clear(node, ch)
		}
	}
	return nil
}

// dropLeavingMarks drops the marks of nodes that own their chunk under no
// ring of the current placement (the current ring and the rings of a move
// in progress): those copies are leaving or gone, and no read or copy uses
// them. Called without c.mu; takes it.
func (c *Volume) dropLeavingMarks(ctx context.Context) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.clearMu.Lock()
	defer c.clearMu.Unlock()
	c.clears++
	cs := c.state.Load()
	for node, chunks := range c.marks.byNode() {
		var drop []uint64
		for _, ch := range chunks {
			if !c.ownsAnywhere(cs, node, ch) {
				drop = append(drop, uint64(ch))
			}
		}
		if len(drop) == 0 {
			continue
		}
		if err := c.fenceIf(c.ms.ClearMissed(ctx, c.vol.ID, node, drop...)); err != nil {
			return err
		}
		for _, ch := range drop {
			c.marks.clear(node, int64(ch))
		}
	}
	return nil
}

// ownsAnywhere reports whether node id owns chunk ch under the current ring
// of st or a ring of its move in progress.
func (c *Volume) ownsAnywhere(st *clusterState, id string, ch int64) bool {
	if c.owns(st, id, ch) {
		return true
	}
	var ids [maxReplicas]int
	key := chunkKey(c.vol.ID, ch)
	for _, pr := range st.prev {
		for _, i := range pr.OwnerIndices(key, c.repl, ids[:0]) {
			if pr.Node(i).ID == id {
				return true
			}
		}
	}
	return false
}

// placedUnder reports whether a read or write part sent under placement st
// is still in flight.
func (c *Volume) placedUnder(st *clusterState) bool {
	for i := range c.all {
		if c.all[i].placed.Load() == st {
			return true
		}
	}
	return false
}
