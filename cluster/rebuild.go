package cluster

// Degraded writes and rebuild of a replicated volume.
//
// A replica node that fails (its connection breaks, a call times out, it
// answers with an I/O error, it restarted and may have lost unflushed
// writes) does not fail the volume: the write completes on the remaining
// replicas, but only after a "missed mark" (volume, node, chunk) is recorded
// in etcd (meta.MarkMissed). A rebuild loop copies each marked chunk from a
// good replica to the node once it answers again and then clears the mark.
//
// Invariants:
//   - A write-like part whose calls to some owners failed with a node failure
//     completes without error only if at least one owner took it AND every
//     failed owner has a mark for the chunk, recorded in etcd before the part
//     completes (c.marks holds exactly the marks known to be in etcd). If
//     etcd cannot be written the part fails: nothing is acknowledged that the
//     metadata does not back.
//   - A read never goes to an owner with a mark for the chunk, nor to one
//     for which the chunk is suspect (below): that replica may be stale. A
//     read reply from such an owner (the mark or the restart came while the
//     read was in flight) is not returned: the read moves to another owner.
//   - Restarts: every OK reply carries the node's incarnation, and every
//     reply the client gets (read, write, flush, probe, rebuild copy, scrub)
//     goes through sawIncarnation. The first one with a new incarnation
//     makes every chunk whose last write the node took after its last
//     successful flush (peer.lastSeq > peer.flushed) suspect on it, before
//     the new incarnation is stored, so no reply carrying it is trusted
//     for those chunks; and queues their marks. A chunk stops being suspect
//     only once its mark is in etcd (then the mark keeps reads away): no
//     later reply, flush or rebuild copy ends a restart for the others. A
//     write's completion is counted (peer.took) before its reply's
//     incarnation is looked at, so a write taken by a process that
//     restarted is always among the chunks its restart makes suspect.
//   - A Flush covers, on every node, the writes completed before it; if a
//     node's flush fails, every chunk whose last write the node took after
//     its last successful flush, and every suspect one, is marked before
//     the Flush completes; if it succeeds while chunks of the node are
//     suspect, their marks are recorded before the Flush completes. A
//     flush covers the writes completed before it was sent (seq <= the
//     peer's seq at send time) except those a restart made suspect.
//   - A mark is cleared only after a copy during which no write to the chunk
//     was in flight or completed (chunkTrack.gen and .inflight, kept for
//     marked chunks only; clusterPart.active for writes that started before
//     the mark existed), so a write racing the copy is never overwritten by
//     older bytes on the rebuilt node without a later copy. So that a chunk
//     written without pause is rebuilt too, the copy holds new writes to
//     the chunk back (chunkTrack.gate, honoured whether or not the chunk
//     still has marks) from before it reads the source until the mark is
//     cleared, and starts only once the writes in flight ended, with the
//     target up and at the fence generation it had before they ended.
//   - The healthy data path touches none of this beyond atomic loads
//     (marks.any, and per peer down, inc and suspectN) and, on write
//     completion, an atomic add and store (peer.seq, peer.lastSeq).

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/torus-storage/torus/engine"
	"github.com/torus-storage/torus/internal/alignbuf"
	"github.com/torus-storage/torus/internal/wire"
	"github.com/torus-storage/torus/meta"
	"github.com/torus-storage/torus/netquic"
	"github.com/torus-storage/torus/ring"
	"github.com/torus-storage/torus/store"
)

// errNoSource is returned by copyChunk when no replica holding a good copy
// of the chunk answered.
var errNoSource = errors.New("no good replica reachable")

// DefaultRebuildRate is the default rebuild bandwidth of one volume.
const DefaultRebuildRate = 64 << 20

// markSet is the missed marks of a volume known to be in etcd, and the
// write tracking of marked chunks.
type markSet struct {
	any      atomic.Bool  // len(m) > 0
	held     atomic.Int32 // gates closed by copies (hold)
	mu       sync.Mutex
	m        map[markKey]uint64 // 0: missed; else unflushed at that node incarnation (see addUnflushed)
	perChunk map[int64]int      // marks per chunk
	track    map[int64]*chunkTrack
}

func newMarkSet() markSet {
	return markSet{m: make(map[markKey]uint64), perChunk: make(map[int64]int), track: make(map[int64]*chunkTrack)}
}

type markKey struct {
	node  string
	chunk int64
}

// chunkTrack counts writes to a marked chunk: gen changes when one starts
// or ends, inflight is the number running. gate is non-nil while a rebuild
// copy of the chunk holds new writes back; it is closed when the copy ends.
type chunkTrack struct {
	gen      uint64
	inflight int
	gate     chan struct{}
}

func (s *markSet) has(node string, chunk int64) bool {
	if !s.any.Load() {
		return false
	}
	s.mu.Lock()
	_, ok := s.m[markKey{node, chunk}]
	s.mu.Unlock()
	return ok
}

// hasMissed reports whether node has a missed mark for chunk (not only an
// unflushed one).
func (s *markSet) hasMissed(node string, chunk int64) bool {
	if !s.any.Load() {
		return false
	}
	s.mu.Lock()
	inc, ok := s.m[markKey{node, chunk}]
	s.mu.Unlock()
	return ok && inc == 0
}

// add records missed marks known to be in etcd (an unflushed mark of the
// same chunk becomes a missed one).
func (s *markSet) add(node string, chunks ...int64) {
	s.mu.Lock()
	for _, ch := range chunks {
		k := markKey{node, ch}
		if _, ok := s.m[k]; !ok {
			s.perChunk[ch]++
		}
		s.m[k] = 0
	}
	s.any.Store(len(s.m) > 0)
	s.mu.Unlock()
}

// addUnflushed records unflushed marks known to be in etcd: node, at
// incarnation inc, took writes of chunks that no flush covered and could
// not be reached to flush them. A chunk with a mark already keeps it.
func (s *markSet) addUnflushed(node string, inc uint64, chunks ...int64) {
	s.mu.Lock()
	for _, ch := range chunks {
		k := markKey{node, ch}
		if _, ok := s.m[k]; !ok {
			s.m[k] = inc
			s.perChunk[ch]++
		}
	}
	s.any.Store(len(s.m) > 0)
	s.mu.Unlock()
}

// unflushed returns node's unflushed marks: incarnation → chunks.
func (s *markSet) unflushed(node string) map[uint64][]int64 {
	if !s.any.Load() {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	var out map[uint64][]int64
	for k, inc := range s.m {
		if k.node == node && inc != 0 {
			if out == nil {
				out = make(map[uint64][]int64)
			}
			out[inc] = append(out[inc], k.chunk)
		}
	}
	return out
}

// clearUnflushed drops node's unflushed marks at incarnation inc of chunks
// (already deleted in etcd); a mark that became a missed one stays.
func (s *markSet) clearUnflushed(node string, inc uint64, chunks []int64) {
	s.mu.Lock()
	for _, ch := range chunks {
		if s.m[markKey{node, ch}] == inc {
			s.clearLocked(node, ch)
		}
	}
	s.mu.Unlock()
}

func (s *markSet) count() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.m)
}

// trackStart notes a write to chunk starting; it reports whether the chunk
// is tracked (has a mark), in which case trackEnd must follow. While a
// rebuild copy holds the chunk, the write does not start: trackStart
// returns the gate to wait on, and the caller tries again once it closes.
func (s *markSet) trackStart(chunk int64) (bool, <-chan struct{}) {
	if !s.any.Load() && s.held.Load() == 0 {
		return false, nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	t := s.track[chunk]
	if t != nil && t.gate != nil {
		return false, t.gate // also if the marks went meanwhile (settleUnflushed)
	}
	if s.perChunk[chunk] == 0 {
		return false, nil
	}
	if t == nil {
		t = new(chunkTrack)
		s.track[chunk] = t
	}
	t.gen++
	t.inflight++
	return true, nil
}

// hold closes chunk's gate to new writes for a rebuild copy to node; it
// returns nil if another copy holds it or node has no mark for it (any
// more).
func (s *markSet) hold(node string, chunk int64) *chunkTrack {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.m[markKey{node, chunk}]; !ok {
		return nil
	}
	t := s.track[chunk]
	if t == nil {
		t = new(chunkTrack)
		s.track[chunk] = t
	}
	if t.gate != nil {
		return nil
	}
	t.gate = make(chan struct{})
	s.held.Add(1)
	return t
}

// release opens the gate of chunk that hold returned as t: the writes
// waiting on it start.
func (s *markSet) release(chunk int64, t *chunkTrack) {
	s.mu.Lock()
	close(t.gate)
	t.gate = nil
	s.held.Add(-1)
	if s.perChunk[chunk] == 0 && t.inflight == 0 && s.track[chunk] == t {
		delete(s.track, chunk) // its marks were cleared while it was held
	}
	s.mu.Unlock()
}

func (s *markSet) trackEnd(chunk int64) {
	s.mu.Lock()
	if t := s.track[chunk]; t != nil {
		t.gen++
		t.inflight--
	}
	s.mu.Unlock()
}

// snapshot returns the generation of chunk and whether writes are in flight.
func (s *markSet) snapshot(chunk int64) (uint64, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	t := s.track[chunk]
	if t == nil {
		t = new(chunkTrack)
		s.track[chunk] = t
	}
	return t.gen, t.inflight > 0
}

// clear drops a mark (already deleted in etcd) and the chunk's tracking when
// no mark of the chunk is left.
func (s *markSet) clear(node string, chunk int64) {
	s.mu.Lock()
	s.clearLocked(node, chunk)
	s.mu.Unlock()
}

func (s *markSet) clearLocked(node string, chunk int64) {
	k := markKey{node, chunk}
	if _, ok := s.m[k]; ok {
		delete(s.m, k)
		if s.perChunk[chunk]--; s.perChunk[chunk] <= 0 {
			delete(s.perChunk, chunk)
		}
	}
	if s.perChunk[chunk] == 0 {
		if t := s.track[chunk]; t != nil && t.inflight == 0 && t.gate == nil {
			delete(s.track, chunk)
		}
	}
	s.any.Store(len(s.m) > 0)
}

// byNode returns the marks grouped by node, chunks sorted.
func (s *markSet) byNode() map[string][]int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make(map[string][]int64)
	for k := range s.m {
		out[k.node] = append(out[k.node], k.chunk)
	}
	for _, v := range out {
		sort.Slice(v, func(i, j int) bool { return v[i] < v[j] })
	}
	return out
}

// markJob asks the marker to record marks, then to finish part p (if any)
// with the result. With peer set, the chunks are what a restart of peer may
// have cost it: once their marks are recorded they are no longer suspect.
type markJob struct {
	node   string
	chunks []int64
	p      *clusterPart
	peer   *peer
	atRisk bool // mark what peer may lack after a failed flush (recordAtRisk) instead of chunks
	behind bool // a replica found behind (markBehind): drop it from c.behindPending once done
}

// errMarks is wrapped by the error of marks etcd did not take.
var errMarks = errors.New("the chunks it lacks cannot be recorded as missed (etcd)")

// nodeFailure reports whether a call error means the replica failed (the
// write may continue on the others, the node gets a mark) rather than the
// request being wrong for every replica.
func nodeFailure(err error) bool {
	switch {
	case err == nil:
		return false
	case errors.Is(err, engine.ErrRange), errors.Is(err, engine.ErrFenced), errors.Is(err, engine.ErrNoSpace),
		errors.Is(err, wire.ErrBadRequest), errors.Is(err, engine.ErrReadOnly), errors.Is(err, errMarks):
		return false
	}
	return true
}

// took notes that peer p completed a write of chunk.
func (p *peer) took(chunk int64) {
	p.lastSeq.at(chunk).Store(p.seq.Add(1))
}

// flushedUpTo records that a flush covering every write with seq <= q
// succeeded on p.
func (p *peer) flushedUpTo(q uint64) {
	for {
		old := p.flushed.Load()
		if q <= old || p.flushed.CompareAndSwap(old, q) {
			return
		}
	}
}

// unflushedChunks lists the chunks p took a write of that no successful
// flush covers yet: what p may lose if it lost power.
func (p *peer) unflushedChunks() []int64 {
	f := p.flushed.Load()
	var out []int64
	p.lastSeq.each(func(i int64, s *atomic.Uint64) {
		if s.Load() > f {
			out = append(out, i)
		}
	})
	return out
}

// atRisk lists, sorted and without duplicates, what p may lack if it lost
// power now: the chunks no successful flush covers and those a restart
// already made suspect.
func (p *peer) atRisk() []int64 {
	out := append(p.unflushedChunks(), p.suspects()...)
	slices.Sort(out)
	return slices.Compact(out)
}

// sawIncarnation records the incarnation inc of an OK reply of p (any
// reply: read, write, flush, probe, rebuild copy, scrub read). A new
// incarnation means the node's process restarted and may have lost every
// write no flush covered: those chunks (p.unflushedChunks) become suspect
// on p, so reads avoid them, before the new incarnation is stored, so no
// reply that carries it is trusted before they are; and a job is queued
// to mark them in etcd (the prober retries if the queue is full or etcd
// refuses). Nothing clears them but their marks being recorded: no later
// reply, flush or rebuild copy makes them good. The common case (the
// incarnation known) is one atomic load.
func (c *Volume) sawIncarnation(p *peer, inc uint64) {
	if inc == 0 || p.inc.Load() == inc {
		return
	}
	p.incMu.Lock()
	old := p.inc.Load()
	if old == inc {
		p.incMu.Unlock()
		return
	}
	// The node recorded what an unclean shutdown may have cost it before
	// it answered: until the prober reads those marks, trust none of it.
	// So too for the first reply ever after Open read the marks (the fence
	// at attach gives the first one before).
	if old != 0 || c.opened.Load() {
		c.needReload(p)
	}
	if old == 0 {
		// The first reply ever: nothing of ours to lose.
		p.inc.Store(inc)
		p.incMu.Unlock()
		return
	}
	chunks := p.unflushedChunks()
	if len(chunks) > 0 && p.suspect == nil {
		p.suspect = make(map[int64]bool, len(chunks))
	}
	for _, ch := range chunks {
		p.suspect[ch] = true
	}
	p.suspectN.Store(int32(len(p.suspect)))
	p.inc.Store(inc)
	p.incMu.Unlock()
	c.log.Warn("cluster: node restarted; marking the chunks whose writes no flush covered for rebuild",
		"volume", c.vol.Name, "node", p.id, "chunks", len(chunks))
	c.restarts.Add(1)
	if len(chunks) > 0 {
		select {
		case c.markq <- &markJob{node: p.id, chunks: chunks, peer: p}:
		default: // the prober records them
		}
	}
}

// inherit gives np, a new peer of old's node at another address, what the
// client knows of the node: its incarnation, write and flush sequences and
// suspect chunks, so that the first reply of a restarted process on the
// new address makes what it may have lost suspect as on the old one.
func (np *peer) inherit(old *peer) {
	np.inc.Store(old.inc.Load())
	np.seq.Store(old.seq.Load())
	np.flushed.Store(old.flushed.Load())
	old.lastSeq.each(func(i int64, s *atomic.Uint64) { np.lastSeq.at(i).Store(s.Load()) })
	if s := old.suspects(); len(s) > 0 {
		np.suspect = make(map[int64]bool, len(s))
		for _, ch := range s {
			np.suspect[ch] = true
		}
		np.suspectN.Store(int32(len(s)))
	}
}

// isSuspect reports whether chunk ch may have been lost by a restart of p
// and its mark is not yet known to be in etcd.
func (p *peer) isSuspect(ch int64) bool {
	if p.reload.Load() {
		return true
	}
	if p.suspectN.Load() == 0 {
		return false
	}
	p.incMu.Lock()
	ok := p.suspect[ch]
	p.incMu.Unlock()
	return ok
}

// suspects lists p's suspect chunks.
func (p *peer) suspects() []int64 {
	if p.suspectN.Load() == 0 {
		return nil
	}
	p.incMu.Lock()
	out := make([]int64, 0, len(p.suspect))
	for ch := range p.suspect {
		out = append(out, ch)
	}
	p.incMu.Unlock()
	slices.Sort(out)
	return out
}

// unsuspect drops chunks from p's suspects once their marks are in etcd.
func (p *peer) unsuspect(chunks []int64) {
	if p.suspectN.Load() == 0 {
		return
	}
	p.incMu.Lock()
	for _, ch := range chunks {
		delete(p.suspect, ch)
	}
	p.suspectN.Store(int32(len(p.suspect)))
	p.incMu.Unlock()
}

// settleRestart records the marks of p's suspect chunks in etcd, after
// which reads skip them as marked.
func (c *Volume) settleRestart(p *peer) error {
	chunks := p.suspects()
	if len(chunks) == 0 {
		return nil
	}
	if err := c.recordMarks(p.id, chunks); err != nil {
		return err
	}
	p.unsuspect(chunks)
	return nil
}

// awaitRestartMarks finishes flush part p of peer pp, which succeeded,
// once the marks of what a restart of pp may have cost it are recorded
// (the marker records jobs in order; this one repeats any a full queue
// dropped). A Flush does not complete while a chunk it should cover may
// be lost without etcd knowing.
func (c *Volume) awaitRestartMarks(p *clusterPart, pp *peer) {
	p.markWait.Store(1)
	p.perr.Store(nil)
	c.markq <- &markJob{node: pp.id, chunks: pp.suspects(), p: p, peer: pp}
}

// isDown reports whether writes skip p for now.
func (p *peer) isDown() bool { return p.down.Load() }

// setDown marks p as failed: writes skip it (with a mark) until the prober
// reaches it again.
func (c *Volume) setDown(p *peer, err error) {
	if !p.down.Swap(true) {
		c.log.Warn("cluster: node failed; writes continue on the other replicas and its chunks are marked for rebuild",
			"volume", c.vol.Name, "node", p.id, "err", err)
		c.degradedEvents.Add(1)
	}
}

// marker records marks in etcd for the data path, in order.
func (c *Volume) marker() {
	for {
		var j *markJob
		select {
		case <-c.ctx.Done():
			// Fail what is left so no request hangs.
			for {
				select {
				case j = <-c.markq:
					if j.p != nil {
						j.p.finish(fmt.Errorf("cluster: volume %s closing: %w", c.vol.Name, engine.ErrClosed))
					}
				default:
					return
				}
			}
		case j = <-c.markq:
		}
		var err error
		if j.atRisk {
			err = c.recordAtRisk(j.peer)
		} else if err = c.recordMarks(j.node, j.chunks); err == nil && j.peer != nil {
			j.peer.unsuspect(j.chunks)
		}
		if j.behind {
			c.behindPending.Delete(markKey{j.node, j.chunks[0]})
		}
		if j.p != nil {
			j.p.markDone(err)
		}
	}
}

// recordMarks writes marks to etcd (unless known) and adds them to c.marks.
func (c *Volume) recordMarks(node string, chunks []int64) error {
	var need []uint64
	for _, ch := range chunks {
		if !c.marks.hasMissed(node, ch) {
			need = append(need, uint64(ch))
		}
	}
	if len(need) == 0 {
		return nil
	}
	if c.fenced.Load() {
		return fmt.Errorf("cluster: volume %s: node %s lacks chunks and the marks are not recorded: %w", c.vol.Name, node, engine.ErrFenced)
	}
	ctx, cancel := context.WithTimeout(c.ctx, c.opt.Timeout)
	err := c.fenceIf(c.ms.MarkMissed(ctx, c.vol.ID, node, need...))
	cancel()
	if err != nil {
		c.log.Error("cluster: cannot record missed chunks in etcd; the write (or flush) that needs them fails", "volume", c.vol.Name, "node", node, "err", err)
		return fmt.Errorf("cluster: volume %s: node %s: %w: %w", c.vol.Name, node, errMarks, err)
	}
	c.marks.add(node, chunks...)
	c.kickRebuild()
	return nil
}

// markDone ends one mark job of a part that waited for its marks; the
// last one finishes the part, with the first error if any.
func (p *clusterPart) markDone(err error) {
	if err != nil {
		p.callErr(err)
	}
	if p.markWait.Add(-1) > 0 {
		return
	}
	var e error
	if pe := p.perr.Load(); pe != nil {
		e = *pe
	}
	p.finish(e)
}

// degradedFinish is the end of a write-like part some of whose owners
// failed: it queues marks for them (the part finishes when recorded), or
// finishes at once when all marks are known.
func (p *clusterPart) degradedFinish() {
	c := p.c
	var jobs []*markJob
	for i := 0; i < p.n; i++ {
		if !p.missed[i] {
			continue
		}
		node := p.ownerID(i)
		if c.marks.hasMissed(node, p.chunk) {
			continue
		}
		jobs = append(jobs, &markJob{node: node, chunks: []int64{p.chunk}, p: p})
	}
	if len(jobs) == 0 {
		p.finish(nil)
		return
	}
	p.markWait.Store(int32(len(jobs)))
	for _, j := range jobs {
		c.markq <- j
	}
}

// ownerID names owner i of p (a nil peer is a ring node with no address).
func (p *clusterPart) ownerID(i int) string {
	if p.owners[i] != nil {
		return p.owners[i].id
	}
	return p.ownerIDs[i]
}

// flushFailed handles a failed (or restarted-node) flush of peer pp by part
// p: marks every chunk pp took a write of that no flush covered, then
// finishes p.
func (c *Volume) flushFailed(p *clusterPart, pp *peer, cause error) {
	chunks := pp.atRisk()
	c.log.Warn("cluster: flush of a node failed or the node restarted; marking what it took for rebuild",
		"volume", c.vol.Name, "node", pp.id, "chunks", len(chunks), "cause", cause)
	c.setDown(pp, cause)
	p.markWait.Store(1)
	p.perr.Store(nil)
	c.markq <- &markJob{node: pp.id, p: p, peer: pp, atRisk: true}
}

// recordAtRisk marks what p may lack after a flush of it failed: its suspect
// chunks (a restart was seen) as missed, and the chunks it took that no
// flush covered as unflushed at its incarnation, which are dropped if it
// answers again at that incarnation (it did not restart, so it holds every
// write it took).
func (c *Volume) recordAtRisk(p *peer) error {
	sus := p.suspects()
	if err := c.recordMarks(p.id, sus); err != nil {
		return err
	}
	p.unsuspect(sus)
	unf := p.unflushedChunks()
	inc := p.inc.Load()
	if inc == 0 {
		return c.recordMarks(p.id, unf)
	}
	var need []uint64
	for _, ch := range unf {
		if !c.marks.has(p.id, ch) {
			need = append(need, uint64(ch))
		}
	}
	if len(need) == 0 {
		return nil
	}
	if c.fenced.Load() {
		return fmt.Errorf("cluster: volume %s: node %s may lack chunks and the marks are not recorded: %w", c.vol.Name, p.id, engine.ErrFenced)
	}
	ctx, cancel := context.WithTimeout(c.ctx, c.opt.Timeout)
	err := c.fenceIf(c.ms.MarkUnflushed(ctx, c.vol.ID, p.id, inc, need...))
	cancel()
	if err != nil {
		c.log.Error("cluster: cannot record unflushed chunks in etcd; the flush that needs them fails", "volume", c.vol.Name, "node", p.id, "err", err)
		return fmt.Errorf("cluster: volume %s: node %s: %w: %w", c.vol.Name, p.id, errMarks, err)
	}
	c.marks.addUnflushed(p.id, inc, unf...)
	c.kickRebuild()
	return nil
}

// settleUnflushed drops p's unflushed marks recorded at the incarnation p
// answers with now: it did not restart since, so it lost nothing. It runs
// on the prober's goroutine, as reloadMarks does, so no reload brings back
// a mark it cleared.
func (c *Volume) settleUnflushed(p *peer) {
	inc := p.inc.Load()
	if inc == 0 || p.isDown() {
		return
	}
	chunks := c.marks.unflushed(p.id)[inc]
	if len(chunks) == 0 {
		return
	}
	u := make([]uint64, len(chunks))
	for i, ch := range chunks {
		u[i] = uint64(ch)
	}
	ctx, cancel := context.WithTimeout(c.ctx, c.opt.Timeout)
	err := c.fenceIf(c.ms.ClearUnflushed(ctx, c.vol.ID, p.id, inc, u...))
	cancel()
	if err != nil {
		c.log.Warn("cluster: cannot drop the unflushed marks of a node that answers again (retrying)", "volume", c.vol.Name, "node", p.id, "err", err)
		return
	}
	c.marks.clearUnflushed(p.id, inc, chunks)
	c.log.Info("cluster: node answers at the same incarnation; the writes its failed flush covered are on it", "volume", c.vol.Name, "node", p.id, "chunks", len(chunks))
}

func chunkKey(vol uint64, ch int64) uint64 { return ring.ChunkKey(vol, uint64(ch), 0) }

// kickRebuild wakes the rebuild loop.
func (c *Volume) kickRebuild() {
	select {
	case c.rebuildKick <- struct{}{}:
	default:
	}
}

// Stats are counters of a Volume.
type Stats struct {
	// Missed is the number of (node, chunk) marks: chunk copies to rebuild.
	Missed int
	// Rebuilt counts chunk copies made by the rebuild loop.
	Rebuilt uint64
	// RebuiltBytes counts the bytes those copies moved.
	RebuiltBytes uint64
	// Failovers counts reads that moved to another replica after an error.
	Failovers uint64
	// NodeFailures counts nodes that went down while the volume was open.
	NodeFailures uint64
	// NodeRestarts counts node restarts noticed (a reply with a new
	// incarnation); each marks what the node may have lost.
	NodeRestarts uint64
	// Behind counts replicas reads and rebuilds found behind by their
	// chunk version (each is marked for rebuild).
	Behind uint64
	// CopiesRefused counts rebuild copies a target refused because it held
	// a newer version of the chunk than the source.
	CopiesRefused uint64
	// Moving is true while a rebalance moves chunks to new owners;
	// MoveCopies is the chunk copies of the last one started; Rebalances
	// counts finished ones.
	Moving     bool
	MoveCopies int64
	Rebalances uint64
	// SnapshotPauses counts the pauses of writes for snapshots;
	// SnapshotCopies the chunk heads copied before their first change
	// under a new snapshot (copy-on-write).
	SnapshotPauses, SnapshotCopies uint64
	// CloneCopies counts the chunks a clone copied from its parent;
	// Flattening is true while a flatten is asked for and not done.
	CloneCopies uint64
	Flattening  bool
}

// Stats returns the volume's counters.
func (c *Volume) Stats() Stats {
	return Stats{
		Missed: c.marks.count(), Rebuilt: c.rebuilt.Load(), RebuiltBytes: c.rebuiltBytes.Load(),
		Failovers: c.failovers.Load(), NodeFailures: c.degradedEvents.Load(), NodeRestarts: c.restarts.Load(), Behind: c.behindFound.Load(), CopiesRefused: c.copiesRefused.Load(),
		Moving: c.movePending.Load(), MoveCopies: c.moveTotal.Load(), Rebalances: c.moves.Load(),
		SnapshotPauses: c.snap.pauses.Load(), SnapshotCopies: c.snap.copies.Load(),
		CloneCopies: c.clone.copyUps.Load(), Flattening: c.clone.flattening.Load(),
	}
}

// loadMarks reads the volume's marks from etcd (at open).
func (c *Volume) loadMarks(ctx context.Context) error {
	m, unf, err := c.readMarks(ctx)
	if err != nil {
		return err
	}
	if n := c.addMarks(m, unf, ""); n > 0 {
		c.log.Warn("cluster: volume is degraded; rebuilding", "volume", c.vol.Name, "missed", n)
	}
	return nil
}

// readMarks reads the volume's marks from etcd: missed (node → chunks) and
// the unflushed ones among them (node → chunk → incarnation).
func (c *Volume) readMarks(ctx context.Context) (map[string][]uint64, map[string]map[uint64]uint64, error) {
	m, err := c.ms.Missed(ctx, c.vol.ID)
	if err != nil {
		return nil, nil, err
	}
	unf, err := c.ms.UnflushedMarks(ctx, c.vol.ID)
	if err != nil {
		return nil, nil, err
	}
	return m, unf, nil
}

// addMarks adds the marks readMarks returned to c.marks, those of node only
// if node is not empty, and returns how many it added.
func (c *Volume) addMarks(m map[string][]uint64, unf map[string]map[uint64]uint64, node string) int {
	n := 0
	for id, chunks := range m {
		if node != "" && id != node {
			continue
		}
		var cs []int64
		for _, ch := range chunks {
			if inc, ok := unf[id][ch]; ok {
				c.marks.addUnflushed(id, inc, int64(ch))
			} else {
				cs = append(cs, int64(ch))
			}
		}
		c.marks.add(id, cs...)
		n += len(chunks)
	}
	return n
}

// needReload makes every chunk of p suspect until the prober has read p's
// marks again (replicated volumes only: a node marks itself only where
// another copy exists). Called with p.incMu held, or before p is shared.
func (c *Volume) needReload(p *peer) {
	if c.repl < 2 {
		return
	}
	p.reloadGen++
	p.reload.Store(true)
	select {
	case c.probeKick <- struct{}{}:
	default:
	}
}

// reloadMarks reads p's marks from etcd again (those p recorded for itself
// after an unclean shutdown among them) and then trusts p's replies again,
// unless p restarted meanwhile or never answered yet.
func (c *Volume) reloadMarks(p *peer) error {
	p.incMu.Lock()
	gen := p.reloadGen
	p.incMu.Unlock()
	ctx, cancel := context.WithTimeout(c.ctx, c.opt.Timeout)
	defer cancel()
	// Read without clearMu (a slow etcd must not hold back the clearing of
	// marks, and the writes a rebuild's clearing holds); read again under
	// it only if marks were cleared meanwhile.
	c.clearMu.Lock()
	before := c.clears
	c.clearMu.Unlock()
	m, unf, err := c.readMarks(ctx)
	if err != nil {
		return err
	}
	c.clearMu.Lock()
	defer c.clearMu.Unlock()
	if c.clears != before {
		if m, unf, err = c.readMarks(ctx); err != nil {
			return err
		}
	}
	n := c.addMarks(m, unf, p.id)
	p.incMu.Lock()
	if p.reloadGen == gen && p.inc.Load() != 0 {
		p.reload.Store(false)
	}
	p.incMu.Unlock()
	if n > 0 {
		c.log.Warn("cluster: node has chunks marked missed; rebuilding them", "volume", c.vol.Name, "node", p.id, "chunks", n)
		c.kickRebuild()
	}
	return nil
}

// prober brings down peers back: every second it sends each a flush with a
// short deadline; an answer clears down (and shows a restart by its
// incarnation). It also records the marks of restarts whose mark job could
// not be queued or failed.
func (c *Volume) prober() {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-c.ctx.Done():
			return
		case <-t.C:
		case <-c.probeKick:
		}
		st := c.state.Load()
		for _, p := range st.all {
			if p.reload.Load() {
				if err := c.reloadMarks(p); err != nil {
					c.log.Warn("cluster: cannot read the marks of a node that restarted; it serves no reads until then",
						"volume", c.vol.Name, "node", p.id, "err", err)
				}
			}
			if err := c.settleRestart(p); err != nil {
				c.log.Warn("cluster: marks of a restarted node not recorded yet; its chunks stay unread until they are",
					"volume", c.vol.Name, "node", p.id, "err", err)
			}
			if !p.isDown() {
				c.settleUnflushed(p)
				continue
			}
			ctx, cancel := context.WithTimeout(c.ctx, min(c.opt.Timeout, clearTimeout))
			resp := netquic.Message{}
			err := p.cli.Call(ctx, &netquic.Message{Code: uint8(wire.OpFlush)}, &resp)
			cancel()
			if err == nil && wire.Status(resp.Code) == wire.StatusOK {
				c.sawIncarnation(p, wire.Incarnation(&resp.Header))
				// A request sent before it failed may still be on its
				// way: fence it with a new generation before anything is
				// sent to it again.
				if ferr := c.refence(p); ferr != nil {
					c.log.Warn("cluster: node answers again but cannot be fenced; it stays out of the write path",
						"volume", c.vol.Name, "node", p.id, "err", ferr)
					continue
				}
				p.down.Store(false)
				c.log.Info("cluster: node answers again; rebuilding what it missed", "volume", c.vol.Name, "node", p.id)
				c.kickRebuild()
			}
		}
	}
}

// rebuildLoop copies marked chunks to their nodes once they answer.
func (c *Volume) rebuildLoop() {
	buf, err := alignbuf.Alloc(int(c.chunk))
	if err != nil {
		c.log.Error("cluster: rebuild disabled: no buffer", "err", err)
		return
	}
	defer alignbuf.Free(buf)
	t := time.NewTicker(2 * time.Second)
	defer t.Stop()
	for {
		select {
		case <-c.ctx.Done():
			return
		case <-c.rebuildKick:
		case <-t.C:
		}
		if c.fenced.Load() {
			continue // copies and the end of a move would write
		}
		if !c.marks.any.Load() {
			c.finishMove()
			continue
		}
		c.rebuildPass(buf)
		c.finishMove()
		if c.leavingMarks() {
			// A mark recorded after the end of the move that made its
			// copy leave (a flush that failed on a removed node, say):
			// nothing rebuilds it, so it goes.
			ctx, cancel := context.WithTimeout(c.ctx, c.opt.Timeout)
			if err := c.dropLeavingMarks(ctx); err != nil {
				c.log.Warn("cluster: cannot drop the marks of copies that left (retrying)", "volume", c.vol.Name, "err", err)
			}
			cancel()
		}
	}
}

// leavingMarks reports whether a mark names a node that owns its chunk
// under no ring of the current placement.
func (c *Volume) leavingMarks() bool {
	st := c.state.Load()
	for node, chunks := range c.marks.byNode() {
		for _, ch := range chunks {
			if !c.ownsAnywhere(st, node, ch) {
				return true
			}
		}
	}
	return false
}

// rebuildPass tries every mark once.
func (c *Volume) rebuildPass(buf []byte) {
	byNode := c.marks.byNode()
	total := 0
	for _, chs := range byNode {
		total += len(chs)
	}
	done := 0
	start := time.Now()
	var moved int64
	for node, chunks := range byNode {
		st := c.state.Load()
		var target *peer
		for _, p := range st.all {
			if p.id == node {
				target = p
			}
		}
		if target == nil {
			c.askRefresh() // registered since the last read of the nodes?
			continue
		}
		if target.isDown() {
			continue
		}
		for _, ch := range chunks {
			if c.ctx.Err() != nil {
				return
			}
			if !c.owns(st, node, ch) {
				continue // a copy under a previous ring only: leaving (finishMove)
			}
			cp, err := c.copyChunk(buf, target, ch)
			if err != nil {
				c.log.Warn("cluster: rebuild of a chunk failed; will retry", "volume", c.vol.Name, "node", node, "chunk", ch, "err", err)
				if errors.Is(err, errNoSource) {
					continue // this chunk has no good copy reachable now; the others may
				}
				break // the target failed
			}
			if cp.n < 0 {
				continue // writes in flight did not end: next pass
			}
			moved += cp.n
			c.rebuilt.Add(1)
			c.rebuiltBytes.Add(uint64(cp.n))
			// Clear at once, with the chunk's writes still held back
			// (a write that missed the node after the copy would need
			// its mark kept), then let them go.
			n, err := c.clearCopied(target, []copied{cp})
			c.marks.release(cp.ch, cp.held)
			done += n
			if err != nil {
				c.log.Warn("cluster: rebuilt a chunk but cannot clear its mark in etcd; will copy again", "volume", c.vol.Name, "node", node, "chunk", ch, "err", err)
				break
			}
			// Rate limit: keep under RebuildRate bytes/s.
			if want := time.Duration(float64(moved) / float64(c.opt.RebuildRate) * float64(time.Second)); want > time.Since(start) {
				select {
				case <-c.ctx.Done():
					return
				case <-time.After(want - time.Since(start)):
				}
			}
			if c.rebuilt.Load()%64 == 0 {
				c.saveProgress(done, total, start)
			}
		}
	}
	if done > 0 {
		c.saveProgress(done, total, start)
		c.log.Info("cluster: rebuild pass", "volume", c.vol.Name, "copied", done, "of", total, "left", c.marks.count())
	}
}

func (c *Volume) saveProgress(done, total int, start time.Time) {
	left := c.marks.count()
	ctx, cancel := context.WithTimeout(c.ctx, 2*time.Second)
	defer cancel()
	kind := meta.ProgressRebuild
	if len(c.state.Load().prev) > 0 {
		kind = meta.ProgressRebalance
	}
	_ = c.fenceIf(c.ms.SetProgress(ctx, c.vol.ID, meta.Progress{Kind: kind, Done: uint64(done), Total: uint64(done + left), Repaired: c.rebuilt.Load(),
		Started: start.UTC(), Holder: c.opt.Holder}))
	_ = total
}

// chunkBusy reports whether a write to chunk ch is in flight. It catches
// writes that started before the chunk had a mark (those are not tracked).
func (c *Volume) chunkBusy(ch int64) bool {
	for i := range c.all {
		if c.all[i].active.Load() == ch {
			return true
		}
	}
	return false
}

// copied is a chunk copied to a node whose mark is still to be cleared:
// n bytes, at write generation gen, sent under the target's fence
// generation tgen. held is the chunk's gate, closed to new writes until the
// mark is cleared (release).
type copied struct {
	ch   int64
	gen  uint64
	tgen uint32
	n    int64
	held *chunkTrack
}

// gateHold bounds how long a copy keeps a chunk's new writes waiting
// (waiting for the writes in flight, reading, writing); the clear of the mark
// after it is bounded by clearTimeout.
const (
	gateHold     = 3 * time.Second
	clearTimeout = 2 * time.Second
	// snapCopyTimeout bounds the copy of a chunk's snapshot copies before
	// the hold.
	snapCopyTimeout = 5 * time.Minute
)

// copyChunk copies chunk ch from a good replica to target. It holds new
// writes to the chunk back and waits for those in flight, so that a chunk
// written without pause is rebuilt too; on success the gate stays closed
// until the caller has cleared the mark (clearCopied, then release). n is
// -1, and the mark stays for the next pass, when there is nothing to do now:
// another copy holds the chunk, the mark went meanwhile, the writes in
// flight did not end in time, target went down or was fenced again while
// the copy waited, the cluster is closing, or target refused a copy of the
// chunk (it holds a newer version) and the chunk was not written since.
func (c *Volume) copyChunk(buf []byte, target *peer, ch int64) (cp copied, err error) {
	if c.refusedIdle(target, ch) {
		return copied{n: -1}, nil
	}
	// Snapshot copies first, before the chunk's writes are held back (they
	// never change; see copySnaps). A failure here is left to the pass
	// inside the hold.
	var pre *peer
	var done map[uint64]bool
	if srcs := c.sources(c.state.Load(), ch); len(srcs) > 0 && c.marks.has(target.id, ch) {
		pctx, cancel := context.WithTimeout(c.ctx, snapCopyTimeout)
		pre = srcs[0]
		done, _ = c.copySnaps(pctx, pre, target, ch, target.gen.Load(), nil)
		cancel()
	}
	held := c.marks.hold(target.id, ch)
	if held == nil {
		return copied{n: -1}, nil
	}
	defer func() {
		if err != nil || cp.n < 0 {
			c.marks.release(ch, held)
		}
	}()
	deadline := time.Now().Add(gateHold)
	tgen := target.gen.Load()
	gen, busy := c.marks.snapshot(ch)
	for ; busy || c.chunkBusy(ch); gen, busy = c.marks.snapshot(ch) {
		if time.Now().After(deadline) || c.ctx.Err() != nil {
			return copied{n: -1}, nil
		}
		time.Sleep(100 * time.Microsecond)
	}
	// A write that was in flight may have failed on target: it is down
	// until the prober fences it with a new generation, and a copy sent
	// under the old one would be refused (or outrun by that write).
	if target.isDown() || target.gen.Load() != tgen {
		return copied{n: -1}, nil
	}
	ctx, cancel := context.WithDeadline(c.ctx, deadline)
	defer cancel()
	st := c.state.Load()
	length := c.chunk
	if end, size := (ch+1)*c.chunk, c.size.Load(); end > size {
		length = size - ch*c.chunk
	}
	data := buf[:length]
	var srcErr error
	var srcVer store.Version
	got, srcAbsent := false, false
	var from *peer
	srcs := c.newestSources(ctx, st, target, ch, data[:engine.BlockSize])
	for _, src := range srcs {
		h := wire.Header{Volume: c.vol.ID, Index: uint64(ch), Len: uint32(length), Epoch: c.wireEpoch(src)}
		req := netquic.Message{Code: uint8(wire.OpRead)}
		h.Encode(&req.Header)
		resp := netquic.Message{Payload: data}
		cctx, ccancel := context.WithTimeout(ctx, c.opt.Timeout)
		err := c.copyCallErr(src, src.cli.Call(cctx, &req, &resp), &resp)
		ccancel()
		if err == nil && len(resp.Payload) != len(data) {
			err = wire.ErrBadRequest
		}
		if err == nil {
			// A source that restarted may have lost this chunk too.
			c.sawIncarnation(src, wire.Incarnation(&resp.Header))
			if src.isSuspect(ch) || c.marks.has(src.id, ch) {
				err = errMaybeStale
			} else if srcVer = replyVer(&resp.Header); behind(srcVer, c.ackedVer(ch)) {
				c.markBehind(src, ch, srcVer, c.ackedVer(ch))
				err = behindErr(src, srcVer, c.ackedVer(ch))
			}
		}
		if err != nil {
			srcErr = fmt.Errorf("read from %s: %w", src.id, err)
			if ctx.Err() != nil {
				break
			}
			continue
		}
		got, from = true, src
		srcAbsent = wire.ReplyFlags(&resp.Header)&wire.ReplyAbsent != 0
		break
	}
	if !got {
		if srcErr == nil {
			return copied{}, errNoSource
		}
		return copied{}, fmt.Errorf("%w: %w", errNoSource, srcErr)
	}
	// Snapshot copies first, from the same source: until the head is
	// copied and the mark cleared, the target is read by no one.
	if from != pre {
		done = nil
	}
	if _, err := c.copySnaps(ctx, from, target, ch, tgen, done); err != nil {
		// Not the target's failure: this chunk waits for the next pass,
		// the node's other chunks go on.
		c.log.Warn("cluster: rebuild: snapshot copies of a chunk not copied; trying it again at the next pass",
			"volume", c.vol.Name, "node", target.id, "chunk", ch, "from", from.id, "err", err)
		c.fenceIf(err)
		return copied{n: -1}, nil
	}
	zero := allZero(data)
	// The target takes the source's version exactly, or refuses a copy
	// older than what it holds.
	h := wire.Header{Volume: c.vol.ID, Index: uint64(ch), Len: uint32(length), Epoch: wire.FenceEpoch(c.epoch.Load(), tgen),
		Flags: wire.FlagFUA | wire.FlagCopy, VerEpoch: srcVer.Epoch, VerSeq: srcVer.Seq}
	req := netquic.Message{Code: uint8(wire.OpWrite), Payload: data}
	if zero && (srcAbsent || !c.cloneLive()) {
		// Keep the copy thin: write-zeroes may free the slot. Not for a
		// clone's chunk the source holds: absent, it would read the parent.
		req = netquic.Message{Code: uint8(wire.OpWriteZeroes)}
	}
	h.Encode(&req.Header)
	resp := netquic.Message{}
	cctx, ccancel := context.WithTimeout(ctx, c.opt.Timeout)
	err = c.copyCallErr(target, target.cli.Call(cctx, &req, &resp), &resp)
	ccancel()
	if errors.Is(err, engine.ErrNewer) {
		return copied{}, c.copyRefused(from, target, ch, srcVer, replyVer(&resp.Header), err)
	}
	if err != nil {
		if nodeFailure(err) {
			// The copy may still land later: keep the node out of the
			// write path until the prober fences it with a new generation.
			c.setDown(target, err)
		}
		return copied{}, c.fenceIf(fmt.Errorf("write to %s: %w", target.id, err))
	}
	// The copy is FUA, durable on the node, but a restart it reveals may
	// have cost the node other chunks: those are marked as by any reply.
	c.sawIncarnation(target, wire.Incarnation(&resp.Header))
	return copied{ch: ch, gen: gen, tgen: tgen, n: length, held: held}, nil
}

// copyCallErr is the error of a rebuild call to p: err, or the reply's
// status. A stale epoch at this client's own attach epoch is a request older
// than p's last fence generation (p went down and came back meanwhile): a
// node failure, not a fence of the volume.
func (c *Volume) copyCallErr(p *peer, err error, resp *netquic.Message) error {
	if err != nil {
		return err
	}
	s := wire.Status(resp.Code)
	if s == wire.StatusOK {
		return nil
	}
	if s == wire.StatusStaleEpoch {
		var rh wire.Header
		_ = wire.Decode(wire.OpFence, &resp.Header, &rh)
		if wire.AttachEpoch(rh.Epoch) <= c.epoch.Load() {
			return fmt.Errorf("node %s: request older than its last fence: %w", p.id, errNodeDown)
		}
	}
	return wire.ErrOf(s)
}

// clearCopied clears the marks of target for the chunks copied to it, in one
// etcd transaction per 100, keeping only those no write touched since their
// copy started. It holds the mark set's lock throughout, so no write can
// start on one of these chunks between the check and the clear (a write
// starting after the clear is untracked and, should target miss it, marks
// the chunk again). It returns the marks cleared.
func (c *Volume) clearCopied(target *peer, cps []copied) (int, error) {
	c.clearMu.Lock()
	defer c.clearMu.Unlock()
	c.clears++
	s := &c.marks
	s.mu.Lock()
	defer s.mu.Unlock()
	var ok []uint64
	for _, cp := range cps {
		if t := s.track[cp.ch]; t != nil && (t.gen != cp.gen || t.inflight > 0) {
			continue
		}
		if c.chunkBusy(cp.ch) || target.gen.Load() != cp.tgen || target.isDown() {
			continue
		}
		ok = append(ok, uint64(cp.ch))
	}
	if len(ok) == 0 {
		return 0, nil
	}
	// Writes to these chunks wait for this: keep it short when etcd is.
	ctx, cancel := context.WithTimeout(c.ctx, min(c.opt.Timeout, clearTimeout))
	defer cancel()
	if err := c.ms.ClearMissed(ctx, c.vol.ID, target.id, ok...); err != nil {
		return 0, c.fenceIf(err)
	}
	for _, ch := range ok {
		s.clearLocked(target.id, int64(ch))
	}
	return len(ok), nil
}

// refence raises p's fence generation and fences p with it, so that every
// request sent to p before (a write that timed out and may still arrive) is
// refused from now on. A node that knows a newer attach fences the volume.
func (c *Volume) refence(p *peer) error {
	p.gen.Add(1)
	h := wire.Header{Volume: c.vol.ID, Epoch: c.wireEpoch(p)}
	req := netquic.Message{Code: uint8(wire.OpFence)}
	h.Encode(&req.Header)
	resp := netquic.Message{}
	ctx, cancel := context.WithTimeout(c.ctx, c.opt.Timeout)
	defer cancel()
	if err := p.cli.Call(ctx, &req, &resp); err != nil {
		return err
	}
	if s := wire.Status(resp.Code); s != wire.StatusOK {
		var rh wire.Header
		_ = wire.Decode(wire.OpFence, &resp.Header, &rh)
		err := fmt.Errorf("node %s: fence epoch refused (node knows attach epoch %d): %w", p.id, wire.AttachEpoch(rh.Epoch), wire.ErrOf(s))
		if s == wire.StatusStaleEpoch && wire.AttachEpoch(rh.Epoch) > c.epoch.Load() {
			c.Fence(err)
		}
		return err
	}
	return nil
}
