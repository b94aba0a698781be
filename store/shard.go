package store

// A shard is one goroutine locked to its OS thread that owns one io_uring
// and all chunks that hash to it.
//
// Invariants:
//   - Only the shard goroutine touches ring, chunks, ops, freeIdx, backlog,
//     hdrBufs and the slotMeta of its chunks; submitters touch only queue
//     (under mu) and sleeping.
//   - Every op in flight holds one index of ops; userdata of its SQEs is
//     udOp|index. A header write's userdata is udHdr|slot, a wake poll's is
//     udWake. At most maxOps ops are in flight per shard, so at most maxOps
//     header writes with waiting ops are in flight, plus at most cleanMax
//     cleaning writes (dirty headers written without a waiting op, counted in
//     cleaning), and hdrBufs never runs dry.
//   - A dirty slot is hot (listed in the shard's log on disk). The log write
//     that evicts a slot is issued only when the slot is idle (no write-class
//     op), clean and has no header write in flight, and it is linked behind
//     an fdatasync, so the slot's last header and data are durable before the
//     log stops listing it.
//   - sleeping is 1 only while the shard is about to block or blocked in
//     SubmitAndWait with its eventfd poll armed; a submitter that pushes and
//     sees 1 writes the eventfd.
//   - "The shard goroutine" above means the shard's current owner thread: its
//     own goroutine (run), or a ShardDriver's locked thread (see driver.go).
//     Ownership moves only while the shard is quiet (no op, header, log or
//     cleaning write in flight): the old owner stops, and the new one starts
//     after a channel receive or go statement, so every hand-over is a
//     happens-before edge. driver is written only during a hand-over and read
//     only by the owner.
//   - A slot freed by a discard goes back to the free stack, and leaves the
//     in-memory log, only after its punch, its free header and then an
//     fdatasync have completed (freeStep, syncFree): until the free is
//     durable the slot stays listed on disk and stays its chunk's, so a power
//     loss can neither show one chunk's data in another nor leave two slots
//     naming one chunk. The discard completes after that fdatasync.
//   - A discard or write-zeroes never fails because the store refuses to
//     punch (EOPNOTSUPP, EINVAL): the cleared bits make its blocks zeros.
//     A free needs the chunk's data cleared, by a punch or else a zeroed
//     range; if neither is possible the slot stays its chunk's.
//   - A linked chain (the fdatasync before an evicting log write) is taken
//     with sqes, all entries before any is prepared, so no submission can
//     fall between them and cut the link.
//   - snaps holds, per (volume, index), exactly the Snap numbers > 0 that
//     chunks maps for it: both change together, on the shard's thread. All
//     chunks of one (volume, index) are on one shard (Store.shardOfIndex), so
//     an AsOf read resolves, and a ListSnaps read lists, at one instant in
//     the order of the shard's ops.
//   - Every SQE's user_data carries the shard id in bits 40..47 (udShard), so
//     shards and a frontend can share one ring (a frontend's own user_data
//     keeps bits 56..63 zero).

import (
	"encoding/binary"
	"fmt"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"github.com/torus-storage/torus/engine"
	"github.com/torus-storage/torus/internal/alignbuf"
	"github.com/torus-storage/torus/internal/crc32c"
	"github.com/torus-storage/torus/iouring"
)

const (
	maxOps       = 256
	cleanMax     = 32 // dirty headers written at once to make room in the log
	uringEntries = 512

	udOp   = 1 << 56
	udHdr  = 2 << 56
	udWake = 3 << 56
	udAL   = 4 << 56
	udALFs = 5 << 56
	udFree = 6 << 56
	udMask = 0xff << 56

	udShardShift = 40
	udIdxMask    = 1<<udShardShift - 1
)

type shard struct {
	s  *Store
	id int

	mu       sync.Mutex
	queue    []*ChunkOp
	closed   bool
	yield    bool          // a driver waits for the own goroutine to stop
	runDone  chan struct{} // closed when the current owner lets go
	sleeping atomic.Int32
	efd      int
	one      [8]byte

	ud     uint64       // shard id in user_data (udShard)
	driver *ShardDriver // the driving thread, nil when run owns the shard

	// Shard goroutine only.
	uring  *iouring.Uring
	fd     int32 // the store fd, or 0 when registered as fixed file 0
	fixed  uint8 // iouring.SQEFixedFile when fd is a fixed-file index
	local  []*ChunkOp
	chunks map[ChunkID]int32
	// snaps lists, for each (volume, index) with snapshot copies, their
	// Snap numbers in ascending order (every key of chunks with Snap > 0).
	snaps map[headKey][]uint64
	// freed keeps the version of chunks whose slot was freed, for a write
	// of the chunk that arrives late (older than the discard that freed
	// it) and takes a new slot: the new slot starts from this version, not
	// from zero, so its version does not go back. Cleared when it grows past
	// freedMax; lost at a restart (a late request is fenced by then).
	freed    map[ChunkID]Version
	ops      [maxOps]*ChunkOp
	freeIdx  []int32
	backlog  *ChunkOp
	backTail *ChunkOp
	draining bool
	hdrArena []byte
	hdrBufs  [][]byte
	cqes     [128]iouring.CQE
	chain    [2]*iouring.SQE // a linked pair being prepared (sqes)
	efdBuf   []byte
	inflight int
	cleaning int // header writes without waiting ops in flight

	// Activity log (see store_format.go): alHot is what the shard's log
	// blocks list (-1 = empty entry), alMax entries per block.
	alHot      [alShardMax]int32
	alHand     int
	alBuf      []byte // alPerShard blocks
	alSeq      uint64
	alLen      int    // bytes of the log write in flight
	alFsEpoch  uint64 // syncNext taken by the fdatasync linked before it
	alInflight bool
	alQueued   []int32
	alFlying   []int32
	alCurOps   *ChunkOp // waiting for the log write in flight (via waitNext)
	alNextOps  *ChunkOp // waiting for the next log write (via waitNext)

	// Frees waiting for an fdatasync (syncFree), chained via waitNext.
	frCur      *ChunkOp // covered by the fdatasync in flight
	frNext     *ChunkOp // waiting for the next one
	frEpoch    uint64   // syncNext taken by the one in flight
	frInflight bool
}

func newShard(s *Store, id int) (*shard, error) {
	efd, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("shard %d: eventfd: %w", id, err)
	}
	sh := &shard{s: s, id: id, efd: efd, runDone: make(chan struct{}), ud: uint64(id) << udShardShift,
		queue: make([]*ChunkOp, 0, maxOps), local: make([]*ChunkOp, 0, maxOps),
		chunks: make(map[ChunkID]int32), snaps: make(map[headKey][]uint64), freed: make(map[ChunkID]Version)}
	sh.one[0] = 1
	const nh = maxOps + cleanMax
	arena, err := alignbuf.Alloc((nh + 1 + alPerShard) * engine.BlockSize)
	if err != nil {
		unix.Close(efd)
		return nil, err
	}
	sh.hdrArena = arena
	for i := 0; i < nh; i++ {
		sh.hdrBufs = append(sh.hdrBufs, arena[i*engine.BlockSize:(i+1)*engine.BlockSize:(i+1)*engine.BlockSize])
	}
	sh.efdBuf = arena[nh*engine.BlockSize : nh*engine.BlockSize+8]
	sh.alBuf = arena[(nh+1)*engine.BlockSize : (nh+1+alPerShard)*engine.BlockSize]
	for i := range sh.alHot {
		sh.alHot[i] = -1
	}
	sh.alQueued = make([]int32, 0, maxOps)
	sh.alFlying = make([]int32, 0, maxOps)
	for i := maxOps - 1; i >= 0; i-- {
		sh.freeIdx = append(sh.freeIdx, int32(i))
	}
	// Build the chunk map of this shard from the slots loaded at open.
	for i := range s.slots {
		m := &s.slots[i]
		if m.used && s.shardOfIndex(m.id) == id {
			sh.chunks[m.id] = int32(i)
			sh.addSnap(m.id)
		}
	}
	ready := make(chan error, 1)
	go sh.run(ready, sh.runDone)
	if err := <-ready; err != nil {
		<-sh.runDone
		unix.Close(efd)
		alignbuf.Free(arena)
		return nil, err
	}
	return sh, nil
}

// newRing makes a ring with the best flags the kernel accepts.
func newRing() (*iouring.Uring, error) {
	r, err := iouring.NewThreadUring(uringEntries)
	if err != nil {
		return nil, fmt.Errorf("io_uring setup: %w", err)
	}
	return r, nil
}

// push queues op for the shard's owner thread.
func (sh *shard) push(op *ChunkOp) {
	sh.mu.Lock()
	if sh.closed && op.Op != opDeliver {
		sh.mu.Unlock()
		op.sh = nil
		op.Done.CompleteChunk(op, engine.ErrClosed)
		return
	}
	op.sh = sh
	sh.queue = append(sh.queue, op)
	sh.mu.Unlock()
	sh.wake()
}

// wake makes a sleeping owner look at the queue.
func (sh *shard) wake() {
	if sh.sleeping.Load() == 1 && sh.sleeping.CompareAndSwap(1, 0) {
		unix.Write(sh.efd, sh.one[:])
	}
}

// wakeNow wakes the owner whether or not it sleeps.
func (sh *shard) wakeNow() { unix.Write(sh.efd, sh.one[:]) }

// stop lets the shard finish every queued op and exit. A driven shard is
// finished by the own goroutine that its driver's Release restarts.
func (sh *shard) stop() {
	sh.mu.Lock()
	sh.closed = true
	sh.mu.Unlock()
	unix.Write(sh.efd, sh.one[:])
	for {
		sh.mu.Lock()
		ch := sh.runDone
		sh.mu.Unlock()
		<-ch
		sh.mu.Lock()
		again := sh.runDone != ch
		sh.mu.Unlock()
		if !again {
			break
		}
	}
	unix.Close(sh.efd)
	alignbuf.Free(sh.hdrArena)
}

// useUring makes r the shard's ring; the caller is the new owner thread.
func (sh *shard) useUring(r *iouring.Uring, fixed bool) {
	sh.uring = r
	sh.fd, sh.fixed = sh.s.fd, 0
	if fixed {
		sh.fd, sh.fixed = 0, iouring.SQEFixedFile
	}
}

// quiet reports whether nothing of the shard is in flight on its ring but
// the eventfd poll.
func (sh *shard) quiet() bool {
	return sh.inflight == 0 && sh.backlog == nil && sh.cleaning == 0 && !sh.alInflight
}

// run is the shard's own goroutine. It serves until the store closes or a
// driver asks for the shard (yield), then closes done.
func (sh *shard) run(ready chan<- error, done chan struct{}) {
	defer close(done)
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	r, err := newRing()
	if err != nil {
		ready <- fmt.Errorf("shard %d: %w", sh.id, err)
		return
	}
	defer r.Close()
	err = r.RegisterFiles([]int32{sh.s.fd})
	if err != nil {
		sh.s.log.Warn("store: io_uring file registration failed; using plain fds", "shard", sh.id, "err", err)
	}
	sh.useUring(r, err == nil)
	defer func() { sh.uring = nil }()
	sh.armWake()
	ready <- nil

	for {
		sh.mu.Lock()
		yield := sh.yield
		if !yield {
			sh.local, sh.queue = sh.queue, sh.local[:0]
		}
		closed := sh.closed
		sh.mu.Unlock()
		for i, op := range sh.local {
			sh.local[i] = nil
			sh.accept(op)
		}
		sh.local = sh.local[:0]
		// Once closed, push refuses new ops, so the shard is done when
		// nothing is in flight and every dirty header is written. A
		// driver takes the shard once it is quiet; ops still queued stay
		// for it.
		if yield && sh.quiet() {
			sh.sleeping.Store(0)
			return
		}
		if closed && !yield && sh.inflight == 0 && sh.backlog == nil && !sh.cleanAll() {
			return
		}
		n := sh.uring.PeekCQEs(sh.cqes[:])
		if n == 0 {
			sh.sleeping.Store(1)
			sh.mu.Lock()
			q := len(sh.queue)
			if sh.yield {
				q = 0
			}
			sh.mu.Unlock()
			if q > 0 {
				sh.sleeping.Store(0)
				sh.submit()
				continue
			}
			if _, err := sh.uring.SubmitAndWait(1); err != nil {
				sh.s.log.Error("store: io_uring wait failed", "shard", sh.id, "err", err)
			}
			sh.sleeping.Store(0)
			n = sh.uring.PeekCQEs(sh.cqes[:])
		}
		for i := 0; i < n; i++ {
			c := &sh.cqes[i]
			sh.complete(c.UserData, c.Res)
		}
		sh.submit()
	}
}

func (sh *shard) submit() {
	if sh.uring.Pending() == 0 {
		return
	}
	if _, err := sh.uring.Submit(); err != nil {
		sh.s.log.Error("store: io_uring submit failed", "shard", sh.id, "err", err)
	}
}

// sqe returns a free SQE, submitting the full SQ to make room.
func (sh *shard) sqe() *iouring.SQE {
	for {
		if e := sh.uring.SQE(); e != nil {
			return e
		}
		if _, err := sh.uring.Submit(); err != nil {
			sh.s.log.Error("store: io_uring submit failed", "shard", sh.id, "err", err)
		}
	}
}

// sqes fills dst with consecutive free SQEs, submitting first if fewer
// are free, so that a linked chain prepared in them reaches the kernel in one
// submission (see iouring.Uring.SQEs). len(dst) must not exceed the SQ size.
func (sh *shard) sqes(dst []*iouring.SQE) {
	for !sh.uring.SQEs(dst) {
		if _, err := sh.uring.Submit(); err != nil {
			sh.s.log.Error("store: io_uring submit failed", "shard", sh.id, "err", err)
		}
	}
}

func (sh *shard) armWake() {
	e := sh.sqe()
	e.PrepPollAdd(int32(sh.efd), unix.POLLIN)
	e.UserData = udWake | sh.ud
}

// accept gives op an index or parks it in the backlog; a delivery (see
// driver.go) completes its request right away.
func (sh *shard) accept(op *ChunkOp) {
	if op.Op == opDeliver {
		op.Done.CompleteChunk(op, nil)
		return
	}
	n := len(sh.freeIdx)
	if n == 0 || sh.backlog != nil {
		op.next = nil
		if sh.backTail == nil {
			sh.backlog = op
		} else {
			sh.backTail.next = op
		}
		sh.backTail = op
		return
	}
	sh.start(op)
}

func (sh *shard) start(op *ChunkOp) {
	n := len(sh.freeIdx)
	op.idx = sh.freeIdx[n-1]
	sh.freeIdx = sh.freeIdx[:n-1]
	sh.ops[op.idx] = op
	sh.inflight++
	op.err = nil
	op.freeing, op.zeroing = false, false
	op.pending = 0
	op.slot = -1
	op.next, op.waitNext = nil, nil
	op.alWriter = false
	sh.dispatch(op)
}

// dispatch maps op to its slot and runs or blocks it.
func (sh *shard) dispatch(op *ChunkOp) {
	s := sh.s
	if op.Op == engine.OpFlush {
		e := sh.sqe()
		op.epoch = sh.prepSync(e)
		e.UserData = udOp | sh.ud | uint64(op.idx)
		op.pending = 1
		return
	}
	id := op.Chunk
	if op.Op == engine.OpRead {
		if op.ListSnaps {
			sh.listSnaps(op)
			return
		}
		if op.AsOf {
			id.Snap = sh.resolve(id)
			op.From = id.Snap
		}
	}
	slot, ok := sh.chunks[id]
	op.Found = ok
	if ok && op.IfAbsent && op.Op == engine.OpWrite {
		sh.finish(op)
		return
	}
	if !ok {
		switch op.Op {
		case engine.OpRead:
			clear(op.Buf)
			op.Ver = Version{}
			sh.finish(op)
			return
		case engine.OpWrite:
			slot = s.allocSlot(op.Chunk)
			if slot < 0 {
				op.err = fmt.Errorf("store %s: write chunk %v: %d slots in use: %w", s.path, op.Chunk, len(s.slots), engine.ErrNoSpace)
				sh.finish(op)
				return
			}
			sh.chunks[op.Chunk] = slot
			sh.addSnap(op.Chunk)
			if v, ok := sh.freed[op.Chunk]; ok {
				s.slots[slot].ver = v
				delete(sh.freed, op.Chunk)
			}
		default: // discard or write-zeroes of a chunk that holds nothing
			sh.finish(op)
			return
		}
	}
	op.slot = slot
	op.lockOff, op.lockLen = op.Off, op.Length
	m := &s.slots[slot]
	if m.blocked == nil && !conflicts(m.active, op) {
		op.next = m.active
		m.active = op
		sh.run1(op, m)
		return
	}
	op.next = nil
	if m.blockedTail == nil {
		m.blocked = op
	} else {
		m.blockedTail.next = op
	}
	m.blockedTail = op
}

// conflicts reports whether op overlaps a writing op of list, or is itself
// writing and overlaps any op of list.
func conflicts(list, op *ChunkOp) bool {
	for a := list; a != nil; a = a.next {
		if (a.Op != engine.OpRead || op.Op != engine.OpRead) && a.lockOff < op.lockOff+op.lockLen && op.lockOff < a.lockOff+a.lockLen {
			return true
		}
	}
	return false
}

// run1 runs op, which holds its range of slot m: a read right away, a
// write-class op once its slot is in the activity log on disk.
func (sh *shard) run1(op *ChunkOp, m *slotMeta) {
	if op.Op != engine.OpRead {
		op.alWriter = true
		m.alWriters++
		switch m.alState {
		case alFlying:
			op.waitNext = sh.alCurOps
			sh.alCurOps = op
			return
		case alCold:
			m.alState = alQueued
			sh.alQueued = append(sh.alQueued, op.slot)
			fallthrough
		case alQueued:
			op.waitNext = sh.alNextOps
			sh.alNextOps = op
			sh.writeAL()
			return
		}
	}
	sh.issue(op, m)
}

// writeAL writes the shard's activity-log blocks adding the queued slots,
// unless a log write is in flight (then the next one will). A slot is evicted
// to make room only when it is idle (no write-class op), clean and has no
// header write in flight; an fdatasync linked before the log write makes its
// header and completed writes durable first. Dirty idle slots the clock hand
// passes get their header written (cleaned) so that a later call can evict
// them.
func (sh *shard) writeAL() {
	if sh.alInflight || len(sh.alQueued) == 0 {
		return
	}
	s := sh.s
	evicted := false
	n := 0
	lo, hi := alPerShard, -1
	for _, slot := range sh.alQueued {
		pos := -1
		for i := 0; i < alShardMax; i++ {
			p := sh.alHand + i
			if p >= alShardMax {
				p -= alShardMax
			}
			old := sh.alHot[p]
			if old < 0 {
				pos = p
				break
			}
			om := &s.slots[old]
			if om.alState != alHot || om.alWriters != 0 {
				continue
			}
			if om.dirty || om.hdrInflight {
				if !om.hdrInflight && sh.cleaning < cleanMax {
					sh.clean(old, om)
				}
				continue
			}
			om.alState, om.alPos1 = alCold, 0
			evicted = true
			pos = p
			break
		}
		if pos < 0 {
			break // no room yet: retried when a write or cleaning finishes
		}
		sh.alHand = pos + 1
		if sh.alHand == alShardMax {
			sh.alHand = 0
		}
		sh.alHot[pos] = slot
		lo, hi = min(lo, pos/alMax), max(hi, pos/alMax)
		m := &s.slots[slot]
		m.alState, m.alPos1 = alFlying, int32(pos+1)
		sh.alFlying = append(sh.alFlying, slot)
		n++
	}
	if n == 0 {
		return
	}
	sh.alQueued = append(sh.alQueued[:0], sh.alQueued[n:]...)
	// Ops of slots now flying wait for this write; the others for a later one.
	var keep *ChunkOp
	for op := sh.alNextOps; op != nil; {
		next := op.waitNext
		if s.slots[op.slot].alState == alFlying {
			op.waitNext = sh.alCurOps
			sh.alCurOps = op
		} else {
			op.waitNext = keep
			keep = op
		}
		op = next
	}
	sh.alNextOps = keep
	sh.alSeq++
	// Only the blocks that changed are written. Each block verifies on its
	// own, so a write torn between blocks leaves each listing either its old
	// or its new slots: safe, as evicted slots are durable and added slots
	// have no write issued yet.
	for k := lo; k <= hi; k++ {
		encodeAL(sh.alBuf[k*engine.BlockSize:(k+1)*engine.BlockSize], sh.alSeq, sh.alHot[k*alMax:(k+1)*alMax], s.tab)
	}
	var e *iouring.SQE
	if evicted {
		// The fdatasync and the log write are one linked chain: both
		// entries are taken before either can be submitted.
		sh.sqes(sh.chain[:])
		f := sh.chain[0]
		sh.alFsEpoch = sh.prepSync(f)
		f.Flags |= iouring.SQEIOLink
		f.UserData = udALFs | sh.ud
		e = sh.chain[1]
		sh.chain = [2]*iouring.SQE{}
	} else {
		e = sh.sqe()
	}
	sh.alLen = (hi - lo + 1) * engine.BlockSize
	e.PrepWrite(sh.fd, sh.alBuf[lo*engine.BlockSize:(hi+1)*engine.BlockSize], uint64(alOff+((sh.id%alShards)*alPerShard+lo)*engine.BlockSize))
	e.OpFlags = unix.RWF_DSYNC
	e.UserData = udAL | sh.ud
	e.Flags |= sh.fixed
	sh.alInflight = true
}

// prepSync prepares e as an fdatasync of the store and returns the epoch it
// took from syncNext (see store.go): every write completed before now is
// durable once Store.synced reaches it.
func (sh *shard) prepSync(e *iouring.SQE) uint64 {
	ep := sh.s.syncNext.Add(1)
	if h := sh.s.syncHook; h != nil {
		h(ep)
	}
	e.PrepFsync(sh.fd, iouring.FsyncDatasync)
	e.Flags |= sh.fixed
	return ep
}

// freedMax bounds shard.freed.
const freedMax = 4096

// clean writes the dirty header of an idle slot.
func (sh *shard) clean(slot int32, m *slotMeta) {
	sh.cleaning++
	sh.writeHeader(slot, m, nil, false)
}

// cleanAll writes the dirty headers of the shard's log (at close) and reports
// whether any is left to write or in flight. A header that failed is not
// retried: it is counted in Store.dirtyLeft and the log keeps the slot.
func (sh *shard) cleanAll() bool {
	busy := sh.cleaning > 0
	if sh.s.skipClean.Load() {
		return busy
	}
	for _, slot := range sh.alHot {
		if slot < 0 {
			continue
		}
		m := &sh.s.slots[slot]
		if !m.dirty || m.hdrFail {
			continue
		}
		busy = true
		if !m.hdrInflight && sh.cleaning < cleanMax {
			sh.clean(slot, m)
		}
	}
	if !busy {
		for _, slot := range sh.alHot {
			if slot >= 0 && sh.s.slots[slot].dirty {
				sh.s.dirtyLeft.Add(1)
			}
		}
	}
	return busy
}

// alDone handles the completion of the activity-log write.
func (sh *shard) alDone(res int32) {
	s := sh.s
	var err error
	if res != int32(sh.alLen) {
		err = sh.ioErr("write activity log block", int64(sh.id), res)
	}
	for _, slot := range sh.alFlying {
		m := &s.slots[slot]
		if err == nil {
			m.alState = alHot
		} else {
			sh.alHot[m.alPos1-1] = -1
			m.alState, m.alPos1 = alCold, 0
		}
	}
	sh.alFlying = sh.alFlying[:0]
	ops := sh.alCurOps
	sh.alCurOps = nil
	sh.alInflight = false
	sh.writeAL()
	for op := ops; op != nil; {
		next := op.waitNext
		op.waitNext = nil
		if err != nil {
			op.err = err
			sh.finish(op)
		} else {
			sh.issue(op, &s.slots[op.slot])
		}
		op = next
	}
}

// issue issues the I/O of op, which holds its range of slot m.
func (sh *shard) issue(op *ChunkOp, m *slotMeta) {
	s := sh.s
	base := uint64(s.dataOff(op.slot))
	fua := op.Flags&engine.FlagFUA != 0
	if op.Op != engine.OpRead && op.Flags&engine.FlagCopy != 0 && !op.Ver.IsZero() && op.Ver.Less(m.ver) {
		op.err = fmt.Errorf("store %s: copy of chunk %v at version %v, the chunk is at %v: %w", s.path, op.Chunk, op.Ver, m.ver, engine.ErrNewer)
		op.Ver = m.ver
		sh.finish(op)
		return
	}
	switch op.Op {
	case engine.OpRead:
		op.Ver = m.ver
		e := sh.sqe()
		if i, ok := sh.fixedBuf(op.Buf); ok {
			e.PrepReadFixed(sh.fd, op.Buf, base+uint64(op.Off), i)
		} else {
			e.PrepRead(sh.fd, op.Buf, base+uint64(op.Off))
		}
		e.UserData = udOp | sh.ud | uint64(op.idx)
		e.Flags |= sh.fixed
		op.pending = 1
	case engine.OpWrite:
		// The slot is hot (in the log on disk). If every block's written
		// bit is already on disk (set bits in RAM are: the op that set one
		// held the block until its header was written) the header may lag:
		// one data write, header dirty. A FUA write also needs those bits
		// durable, or it writes the header with RWF_DSYNC.
		b0, nb := int(op.Off/engine.BlockSize), int(op.Length/engine.BlockSize)
		fast := !m.hdrFail && m.allSet(b0, nb) &&
			(!fua || m.hdrEpoch == 0 || s.synced.Load() > m.hdrEpoch)
		for i := 0; i < nb; i++ {
			m.crcs[b0+i] = crc32c.Checksum(op.Buf[i*engine.BlockSize : (i+1)*engine.BlockSize])
			m.set(b0 + i)
		}
		m.changes++
		m.setVer(op)
		if !fua {
			s.plWrite(base+uint64(op.Off), op.Length)
		}
		e := sh.sqe()
		if i, ok := sh.fixedBuf(op.Buf); ok {
			e.PrepWriteFixed(sh.fd, op.Buf, base+uint64(op.Off), i)
		} else {
			e.PrepWrite(sh.fd, op.Buf, base+uint64(op.Off))
		}
		if fua {
			e.OpFlags = unix.RWF_DSYNC
		}
		e.UserData = udOp | sh.ud | uint64(op.idx)
		e.Flags |= sh.fixed
		if fast {
			m.dirty = true
			op.pending = 1
			return
		}
		op.pending = 2
		sh.joinHeader(op, m, fua)
	case engine.OpDiscard, engine.OpWriteZeroes:
		b0 := int(op.Off / engine.BlockSize)
		for i := 0; i < int(op.Length/engine.BlockSize); i++ {
			m.unset(b0 + i)
		}
		m.changes++
		m.setVer(op)
		keep := op.Op == engine.OpWriteZeroes && op.Flags&engine.FlagNoUnmap != 0
		op.pending = 1
		if !keep && m.empty() && m.active == op && op.next == nil {
			// Nothing left in the chunk: free the slot. The whole chunk is
			// punched first; freeStep goes on from there. Hold the whole
			// chunk so that later ops wait for the free and are then
			// dispatched without this slot.
			op.freeing = true
			op.lockOff, op.lockLen = 0, s.chunk
			if s.noPunch.Load() {
				op.zeroing = true
				sh.fallocate(op, base, s.chunk, unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE)
			} else {
				sh.fallocate(op, base, s.chunk, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE)
			}
			return
		}
		// The cleared bits alone make the blocks read as zeros; the punch
		// only gives the space back, so it is skipped where it is refused.
		if !keep && !s.noPunch.Load() {
			sh.fallocate(op, base+uint64(op.Off), op.Length, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE)
			op.pending = 2
		}
		sh.joinHeader(op, m, fua)
	}
}

// fallocate issues fallocate(mode) of [off, off+length) of the store for op.
func (sh *shard) fallocate(op *ChunkOp, off uint64, length int64, mode uint32) {
	sh.s.plWrite(off, length)
	e := sh.sqe()
	e.Opcode = iouring.OpFallocate
	e.Fd = sh.fd
	e.Off = off
	e.Addr = uint64(length)
	e.Len = mode
	e.UserData = udOp | sh.ud | uint64(op.idx)
	e.Flags |= sh.fixed
}

// unsupported reports whether res is how a file or device refuses a
// fallocate mode it does not implement (a block device without discard or
// write-zeroes support, a filesystem without hole punching).
func unsupported(res int32) bool {
	return res == -int32(unix.EOPNOTSUPP) || res == -int32(unix.EINVAL)
}

// punchRefused records that the store refuses PUNCH_HOLE: from now on
// discards only clear written bits, and frees zero the chunk instead.
func (sh *shard) punchRefused(res int32) {
	if sh.s.noPunch.CompareAndSwap(false, true) {
		sh.s.log.Warn("store: the file or device refuses to punch holes (discard); discards now only clear written bits, and a freed slot is zeroed instead",
			"path", sh.s.path, "err", unix.Errno(-res))
	}
}

// freeStep goes on with a free once the punch (or, where punching is
// refused, the zeroing) of the whole chunk completed with res: the header is
// written as free, or, if the data could not be cleared, as used with no
// written block (the slot stays the chunk's, its blocks read as zeros, and
// it is not reclaimed), and partDone then makes the free durable with
// syncFree before the op completes. A free never relies on a punch that
// did not happen: the next owner must not find this chunk's data.
func (sh *shard) freeStep(op *ChunkOp, res int32) {
	m := &sh.s.slots[op.slot]
	if res < 0 && !op.zeroing && unsupported(res) {
		sh.punchRefused(res)
		op.zeroing = true
		sh.fallocate(op, uint64(sh.s.dataOff(op.slot)), sh.s.chunk, unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE)
		return
	}
	if res < 0 {
		op.freeing = false
		if !op.zeroing || !unsupported(res) {
			op.err = sh.ioErr("clear data of freed chunk", op.Off, res)
		}
	} else {
		m.used = false
	}
	// op.pending stays 1: the header write is the next part.
	sh.joinHeader(op, m, op.Flags&engine.FlagFUA != 0 && !op.freeing)
}

// syncFree makes op's free durable: its punch and free header have
// completed, and an fdatasync submitted from now on covers them. Only then
// may the slot leave the activity log and be reused, so that after a power
// loss neither the slot's old chunk nor its next owner can find the other's
// data, and no two slots name one chunk. One fdatasync per shard is in
// flight; frees that complete meanwhile wait for the next.
func (sh *shard) syncFree(op *ChunkOp) {
	op.waitNext = nil
	if sh.frInflight {
		op.waitNext = sh.frNext
		sh.frNext = op
		return
	}
	sh.frCur = op
	sh.issueFreeSync()
}

func (sh *shard) issueFreeSync() {
	e := sh.sqe()
	sh.frEpoch = sh.prepSync(e)
	e.UserData = udFree | sh.ud
	sh.frInflight = true
}

// freeSynced handles the completion of the fdatasync of frees.
func (sh *shard) freeSynced(res int32) {
	var err error
	if res < 0 {
		err = sh.ioErr("fdatasync after freeing slots", 0, res)
	} else {
		sh.s.markSynced(sh.frEpoch)
	}
	ops := sh.frCur
	sh.frCur, sh.frInflight = nil, false
	if sh.frNext != nil {
		sh.frCur, sh.frNext = sh.frNext, nil
		sh.issueFreeSync()
	}
	for op := ops; op != nil; {
		next := op.waitNext
		op.waitNext = nil
		if err != nil && op.err == nil {
			op.err = err
		}
		sh.finish(op)
		op = next
	}
}

// fixedBuf returns the index of the driver's registered buffer holding b,
// if the shard runs on a driver's ring that registered one.
func (sh *shard) fixedBuf(b []byte) (uint16, bool) {
	if sh.driver == nil || len(sh.driver.bufs) == 0 {
		return 0, false
	}
	return sh.driver.fixedIndex(b)
}

// joinHeader makes op wait for a header write that includes the current
// state of m.
func (sh *shard) joinHeader(op *ChunkOp, m *slotMeta, fua bool) {
	if !m.hdrInflight {
		op.waitNext = nil
		sh.writeHeader(op.slot, m, op, fua)
		return
	}
	op.waitNext = m.hdrNext
	m.hdrNext = op
	m.hdrNextFUA = m.hdrNextFUA || fua
}

func (sh *shard) writeHeader(slot int32, m *slotMeta, waiters *ChunkOp, fua bool) {
	// A slot's first header is durable when its write completes, so that
	// recovery after a power loss still names the chunk (OnRecover) even
	// if its data writes were lost.
	fua = fua || m.fresh
	n := len(sh.hdrBufs)
	buf := sh.hdrBufs[n-1]
	sh.hdrBufs = sh.hdrBufs[:n-1]
	m.encode(buf, sh.s.blocks, sh.s.tab)
	m.dirty = false
	m.hdrBuf = buf
	m.hdrInflight = true
	m.hdrCur = waiters
	m.hdrCurFUA = fua
	if !fua {
		sh.s.plWrite(uint64(sh.s.hdrOff(slot)), engine.BlockSize)
	}
	e := sh.sqe()
	e.PrepWrite(sh.fd, buf, uint64(sh.s.hdrOff(slot)))
	if fua {
		e.OpFlags = unix.RWF_DSYNC
	}
	e.UserData = udHdr | sh.ud | uint64(slot)
	e.Flags |= sh.fixed
}

func (sh *shard) complete(ud uint64, res int32) {
	switch ud & udMask {
	case udWake:
		unix.Read(sh.efd, sh.efdBuf)
		sh.armWake()
	case udAL:
		sh.alDone(res)
	case udFree:
		sh.freeSynced(res)
	case udALFs:
		if res < 0 {
			sh.s.log.Error("store: fdatasync before activity-log write failed", "shard", sh.id, "err", unix.Errno(-res))
		} else {
			sh.s.markSynced(sh.alFsEpoch)
		}
	case udHdr:
		slot := int32(ud & udIdxMask)
		m := &sh.s.slots[slot]
		sh.hdrBufs = append(sh.hdrBufs, m.hdrBuf)
		m.hdrBuf = nil
		waiters := m.hdrCur
		m.hdrCur = nil
		m.hdrInflight = false
		var err error
		if res != engine.BlockSize {
			err = sh.ioErr("write header of slot", int64(slot), res)
			// The bitmap on disk may lag RAM: write it with every write
			// until a header write succeeds; keep the slot in the log.
			m.hdrFail, m.dirty = true, true
		} else {
			m.hdrFail = false
			if m.hdrCurFUA {
				m.fresh = false
			}
			m.hdrEpoch = 0
			if !m.hdrCurFUA {
				m.hdrEpoch = sh.s.syncNext.Load()
			}
		}
		if m.hdrNext != nil {
			next, fua := m.hdrNext, m.hdrNextFUA
			m.hdrNext, m.hdrNextFUA = nil, false
			sh.writeHeader(slot, m, next, fua)
		}
		if waiters == nil {
			sh.cleaning--
			if err != nil {
				sh.s.log.Error("store: writing a dirty slot header failed", "shard", sh.id, "err", err)
			}
			sh.writeAL()
		}
		for op := waiters; op != nil; {
			next := op.waitNext
			op.waitNext = nil
			sh.partDone(op, err)
			op = next
		}
	case udOp:
		op := sh.ops[ud&udIdxMask]
		var err error
		switch op.Op {
		case engine.OpRead:
			if res != int32(op.Length) {
				err = sh.ioErr("read chunk", int64(op.Off), res)
			} else {
				err = sh.verify(op)
			}
		case engine.OpWrite:
			if res != int32(op.Length) {
				err = sh.ioErr("write chunk", int64(op.Off), res)
			}
		case engine.OpFlush:
			if res < 0 {
				err = sh.ioErr("flush", 0, res)
			} else {
				sh.s.markSynced(op.epoch)
			}
		default:
			if op.freeing {
				sh.freeStep(op, res)
				return
			}
			if res < 0 && unsupported(res) {
				sh.punchRefused(res)
			} else if res < 0 {
				err = sh.ioErr(op.Op.String(), int64(op.Off), res)
			}
		}
		sh.partDone(op, err)
	}
}

// markSynced records that an fdatasync that took epoch e from syncNext has
// completed.
func (s *Store) markSynced(e uint64) {
	s.plSynced(e)
	for {
		cur := s.synced.Load()
		if cur >= e || s.synced.CompareAndSwap(cur, e) {
			return
		}
	}
}

func (sh *shard) ioErr(what string, off int64, res int32) error {
	if res < 0 {
		return fmt.Errorf("store %s: %s at %d: %w", sh.s.path, what, off, unix.Errno(-res))
	}
	return fmt.Errorf("store %s: %s at %d: short transfer of %d bytes", sh.s.path, what, off, res)
}

// verify checks every block a read returned against its CRC and zeroes the
// blocks never written.
func (sh *shard) verify(op *ChunkOp) error {
	s := sh.s
	m := &s.slots[op.slot]
	b0 := int(op.Off / engine.BlockSize)
	for i := 0; i < int(op.Length/engine.BlockSize); i++ {
		blk := op.Buf[i*engine.BlockSize : (i+1)*engine.BlockSize]
		if !m.bit(b0 + i) {
			clear(blk)
			continue
		}
		if c := crc32c.Checksum(blk); c != m.crcs[b0+i] {
			return fmt.Errorf("store %s: chunk %v offset %d (slot %d): crc32c %08x, expected %08x: %w",
				s.path, op.Chunk, op.Off+int64(i)*engine.BlockSize, op.slot, c, m.crcs[b0+i], engine.ErrChecksum)
		}
	}
	return nil
}

func (sh *shard) partDone(op *ChunkOp, err error) {
	if err != nil && op.err == nil {
		op.err = err
	}
	op.pending--
	if op.pending == 0 {
		if op.freeing && op.err == nil {
			sh.syncFree(op)
			return
		}
		sh.finish(op)
	}
}

// finish releases op's range and index and reports it.
func (sh *shard) finish(op *ChunkOp) {
	if op.alWriter {
		op.alWriter = false
		m := &sh.s.slots[op.slot]
		m.alWriters--
		if m.alWriters == 0 && len(sh.alQueued) > 0 {
			sh.writeAL()
		}
	}
	if op.slot >= 0 {
		sh.unlock(op)
	}
	sh.ops[op.idx] = nil
	sh.freeIdx = append(sh.freeIdx, op.idx)
	sh.inflight--
	err := op.err
	op.err = nil
	op.Done.CompleteChunk(op, err)
	if sh.draining {
		return // an outer finish is draining the backlog
	}
	sh.draining = true
	for sh.backlog != nil && len(sh.freeIdx) > 0 {
		b := sh.backlog
		sh.backlog = b.next
		if sh.backlog == nil {
			sh.backTail = nil
		}
		sh.start(b)
	}
	sh.draining = false
}

// unlock drops op's range of its slot and starts blocked ops that no longer
// conflict, in order. After a slot is freed, its blocked ops are dispatched
// again from scratch: the chunk no longer has a slot.
func (sh *shard) unlock(op *ChunkOp) {
	s := sh.s
	m := &s.slots[op.slot]
	if m.active == op {
		m.active = op.next
	} else {
		for a := m.active; a != nil; a = a.next {
			if a.next == op {
				a.next = op.next
				break
			}
		}
	}
	op.next = nil
	if op.freeing {
		if op.err != nil {
			// The free is not known durable: keep the slot (its blocks
			// read as zeros) rather than risk two slots for one chunk, and
			// rewrite its header, which may say free, at the next write.
			m.used = true
			m.hdrFail, m.dirty = true, true
		} else {
			delete(sh.chunks, m.id)
			sh.dropSnap(m.id)
			if !m.ver.IsZero() {
				if len(sh.freed) >= freedMax {
					clear(sh.freed)
				}
				sh.freed[m.id] = m.ver
			}
			if m.alPos1 > 0 {
				// Leaving the in-memory log only; the on-disk block may
				// list the slot until the next log write, which is
				// harmless, and the log write that drops it needs no
				// fdatasync: the free already is durable.
				sh.alHot[m.alPos1-1] = -1
			}
			m.alState, m.alPos1 = alCold, 0
			blocked := m.blocked
			m.blocked, m.blockedTail = nil, nil
			s.releaseSlot(op.slot)
			for b := blocked; b != nil; {
				next := b.next
				b.next = nil
				b.slot = -1
				sh.dispatch(b)
				b = next
			}
			return
		}
	}
	for m.blocked != nil && !conflicts(m.active, m.blocked) {
		b := m.blocked
		m.blocked = b.next
		if m.blocked == nil {
			m.blockedTail = nil
		}
		b.next = m.active
		m.active = b
		sh.run1(b, m)
	}
}

// headKey names a chunk regardless of snapshot.
type headKey struct{ volume, index uint64 }

// addSnap records that id, if a snapshot copy, has a slot.
func (sh *shard) addSnap(id ChunkID) {
	if id.Snap == 0 {
		return
	}
	k := headKey{id.Volume, id.Index}
	l := sh.snaps[k]
	i, found := slices.BinarySearch(l, id.Snap)
	if !found {
		sh.snaps[k] = slices.Insert(l, i, id.Snap)
	}
}

// dropSnap records that id, if a snapshot copy, has no slot any more.
func (sh *shard) dropSnap(id ChunkID) {
	if id.Snap == 0 {
		return
	}
	k := headKey{id.Volume, id.Index}
	l := sh.snaps[k]
	if i, found := slices.BinarySearch(l, id.Snap); found {
		l = slices.Delete(l, i, i+1)
		if len(l) == 0 {
			delete(sh.snaps, k)
		} else {
			sh.snaps[k] = l
		}
	}
}

// resolve returns the Snap of the chunk that holds id as of snapshot id.Snap:
// the smallest snapshot copy at or above it, else 0 (the head).
func (sh *shard) resolve(id ChunkID) uint64 {
	l := sh.snaps[headKey{id.Volume, id.Index}]
	if i, _ := slices.BinarySearch(l, id.Snap); i < len(l) {
		return l[i]
	}
	return 0
}

// listSnaps completes a ListSnaps read (ChunkOp.ListSnaps).
func (sh *shard) listSnaps(op *ChunkOp) {
	clear(op.Buf)
	l := sh.snaps[headKey{op.Chunk.Volume, op.Chunk.Index}]
	for i, t := range l {
		if (i+1)*8 > len(op.Buf) {
			break
		}
		binary.LittleEndian.PutUint64(op.Buf[i*8:], t)
	}
	op.Ver = Version{}
	sh.finish(op)
}
