package cluster

// Scrub of a replicated volume: background verification of every replica of
// every chunk.
//
// Scrub reads each chunk whole from every owner that is up and has no missed
// mark, and judges the copies:
//   - A copy whose node answers engine.ErrChecksum (its CRC caught corruption
//     on disk) is bad.
//   - Among the copies that read fine, one whose chunk version (the read
//     reply's) is nonzero and older than another copy's is behind and bad:
//     it lacks a change the newer one took (version.go).
//   - The other copies are grouped by their bytes. The good group is the
//     largest of those holding a copy with the newest version (any group
//     when no copy has a version); a tie goes to the group holding the owner
//     first in ring order (the primary). Every copy outside the good group
//     is a mismatch and bad. So with two replicas, one failing its checksum,
//     the other one wins; a stale majority never outvotes the newest copy;
//     with two copies of one version that differ, the primary wins.
//   - A copy that cannot be read for another reason (node down, timeout, I/O
//     error) is not judged: the degraded-write machinery owns failed nodes.
//
// A bad copy is repaired by the existing rebuild machinery: Scrub records a
// missed mark for (node, chunk) with c.recordMarks, which keeps reads away
// from it at once and makes the rebuild loop copy a good replica over it.
//
// Invariants:
//   - Copies are compared only if no write to the chunk ran during the reads:
//     c.chunkBusy is false before and after, every reader's peer.lastSeq of
//     the chunk (bumped when the node completes a write of it) is unchanged,
//     no owner gained a mark, and the placement (clusterState) is the same
//     snapshot. Otherwise the chunk is tried again a few times, then skipped
//     (ScrubResult.Skipped). A write that starts after the last check and
//     before the mark is recorded only makes the rebuild copy the same new
//     bytes: copyChunk's own race checks cover it.
//   - Scrub never writes to a node: the only thing it changes is marks, so
//     a wrong verdict costs a needless copy from an unmarked replica, never
//     data.
//   - The bytes Scrub reads (over all replicas) stay under
//     Options.RebuildRate per second.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/torus-storage/torus/engine"
	"github.com/torus-storage/torus/internal/alignbuf"
	"github.com/torus-storage/torus/internal/wire"
	"github.com/torus-storage/torus/meta"
	"github.com/torus-storage/torus/netquic"
	"github.com/torus-storage/torus/store"
)

// ScrubResult counts what one Scrub found. Copies are (node, chunk) pairs.
type ScrubResult struct {
	// Chunks is the number of chunks whose copies were read and judged.
	Chunks uint64
	// Skipped counts chunks left out because writes to them kept racing the
	// reads.
	Skipped uint64
	// Checksum counts copies whose node reported a checksum error.
	Checksum uint64
	// Mismatches counts copies that read fine but differ from the good copy.
	Mismatches uint64
	// Behind counts copies whose version is older than another copy's.
	Behind uint64
	// Unreadable counts copies not judged: the node was down or the read
	// failed for another reason than a checksum error.
	Unreadable uint64
	// Lost counts chunks with no good copy at all (every readable copy failed
	// its checksum): nothing to repair them from.
	Lost uint64
	// Marked counts bad copies handed to the rebuild loop (a missed mark
	// recorded), Repaired those of them rebuilt before Scrub returned.
	Marked, Repaired uint64
	// Bytes is the data read from the nodes.
	Bytes uint64
}

// Bad is the number of bad copies found (checksum errors and mismatches).
func (r ScrubResult) Bad() uint64 { return r.Checksum + r.Mismatches + r.Behind }

// Scrub attempts, how long Scrub waits for a racing write, how often it
// records progress, and how long it waits for the rebuild without progress.
const (
	scrubAttempts      = 4
	scrubRetryDelay    = 20 * time.Millisecond
	scrubProgressEvery = 16
	scrubRepairIdle    = 30 * time.Second
)

// scrubCopy is one owner's copy of the chunk being scrubbed.
type scrubCopy struct {
	p   *peer
	id  string
	seq uint64 // p.lastSeq[chunk] before the read
	ver store.Version
	buf []byte
	err error
}

// Scrub verifies every chunk of the volume on every replica (see the top of
// this file for the rules) and has bad copies repaired by the rebuild loop;
// it waits for those repairs while the rebuild makes progress. It records
// its progress in etcd (meta.ProgressScrub) every few chunks. It returns
// early with ctx's error, or with the first error recording a mark (etcd).
// Run one Scrub at a time per Volume.
func (c *Volume) Scrub(ctx context.Context) (ScrubResult, error) {
	var res ScrubResult
	if c.closed.Load() {
		return res, engine.ErrClosed
	}
	if err := c.Fenced(); err != nil {
		return res, fmt.Errorf("scrub volume %s: %w: %w", c.vol.Name, engine.ErrFenced, err)
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stop := context.AfterFunc(c.ctx, cancel) // Close ends a scrub too
	defer stop()

	bufs := make([][]byte, c.repl)
	for i := range bufs {
		b, err := alignbuf.Alloc(int(c.chunk))
		if err != nil {
			return res, fmt.Errorf("scrub volume %s: %w", c.vol.Name, err)
		}
		defer alignbuf.Free(b)
		bufs[i] = b
	}
	nchunks := c.nchunks(c.size.Load())
	var snaps []uint64 // live snapshots, whose copies are judged too
	if v, err := c.ms.Volume(ctx, c.vol.Name); err == nil && v.ID == c.vol.ID {
		snaps = v.LiveSnaps()
	} else if err != nil {
		return res, fmt.Errorf("scrub volume %s: %w", c.vol.Name, err)
	}
	var marked []markKey
	start := time.Now()
	c.log.Info("cluster: scrub started", "volume", c.vol.Name, "chunks", nchunks)
	for ch := int64(0); ch < nchunks; ch++ {
		if err := ctx.Err(); err != nil {
			return res, fmt.Errorf("scrub volume %s: stopped at chunk %d of %d: %w", c.vol.Name, ch, nchunks, err)
		}
		bad, err := c.scrubChunk(ctx, ch, bufs, snaps, &res)
		if err != nil {
			return res, err
		}
		for _, node := range bad {
			if err := c.recordMarks(node, []int64{ch}); err != nil {
				return res, fmt.Errorf("scrub volume %s: chunk %d on node %s is bad but cannot be marked for repair: %w", c.vol.Name, ch, node, err)
			}
			marked = append(marked, markKey{node, ch})
			res.Marked++
		}
		// Rate limit: keep under RebuildRate bytes/s read.
		if want := time.Duration(float64(res.Bytes) / float64(c.opt.RebuildRate) * float64(time.Second)); want > time.Since(start) {
			select {
			case <-ctx.Done():
			case <-time.After(want - time.Since(start)):
			}
		}
		if (ch+1)%scrubProgressEvery == 0 {
			c.scrubProgress(ctx, uint64(ch+1), uint64(nchunks), &res, start)
		}
	}
	c.waitRepaired(ctx, marked, &res)
	c.scrubProgress(ctx, uint64(nchunks), uint64(nchunks), &res, start)
	c.log.Info("cluster: scrub done", "volume", c.vol.Name, "chunks", res.Chunks, "skipped", res.Skipped,
		"checksum_errors", res.Checksum, "mismatches", res.Mismatches, "unreadable", res.Unreadable,
		"lost", res.Lost, "marked", res.Marked, "repaired", res.Repaired, "took", time.Since(start).Round(time.Millisecond))
	if res.Lost > 0 {
		c.log.Error("cluster: scrub found chunks with no good copy; their data is lost on every replica (restore them from a backup)",
			"volume", c.vol.Name, "chunks", res.Lost)
	}
	return res, nil
}

// scrubChunk reads and judges chunk ch and returns the nodes whose copies
// are bad.
func (c *Volume) scrubChunk(ctx context.Context, ch int64, bufs [][]byte, snaps []uint64, res *ScrubResult) ([]string, error) {
	length := c.chunk
	if end, size := (ch+1)*c.chunk, c.size.Load(); end > size {
		length = size - ch*c.chunk
	}
	var copies [maxReplicas]scrubCopy
	for attempt := 0; attempt < scrubAttempts; attempt++ {
		if attempt > 0 {
			select {
			case <-ctx.Done():
				return nil, ctx.Err()
			case <-time.After(scrubRetryDelay):
			}
		}
		if c.chunkBusy(ch) {
			continue
		}
		st := c.state.Load()
		var ids [maxReplicas]int
		owners := st.r.OwnerIndices(chunkKey(c.vol.ID, ch), c.repl, ids[:0])
		n, unreadable := 0, uint64(0)
		for _, k := range owners {
			p := st.peers[k]
			if p == nil || p.isDown() || c.marks.has(p.id, ch) || p.isSuspect(ch) {
				if p == nil || p.isDown() {
					unreadable++
				}
				continue
			}
			copies[n] = scrubCopy{p: p, id: p.id, seq: p.lastSeq.at(ch).Load(), buf: bufs[n][:length]}
			n++
		}
		c.scrubRead(ctx, ch, copies[:n], 0)
		if c.chunkBusy(ch) || c.state.Load() != st {
			continue
		}
		raced := false
		for i := range copies[:n] {
			cp := &copies[i]
			if cp.p.lastSeq.at(ch).Load() != cp.seq || c.marks.has(cp.id, ch) || cp.p.isSuspect(ch) {
				raced = true
			}
		}
		if raced {
			continue
		}
		for i := range copies[:n] {
			if cp := &copies[i]; cp.err == nil {
				res.Bytes += uint64(length)
			}
		}
		res.Chunks++
		res.Unreadable += unreadable
		bad := c.judge(ch, copies[:n], res)
		if len(bad) == 0 && len(snaps) > 0 {
			// The head is good everywhere: now its snapshot copies.
			if bad = c.scrubSnaps(ctx, ch, copies[:n], snaps, res); c.chunkBusy(ch) || c.state.Load() != st {
				bad = nil // raced a write: judged at the next scrub
			}
		}
		return bad, nil
	}
	res.Skipped++
	return nil, nil
}

// scrubRead reads chunk ch from every copy's node in parallel; as of
// snapshot asOf if it is not 0.
func (c *Volume) scrubRead(ctx context.Context, ch int64, copies []scrubCopy, asOf uint64) {
	var wg sync.WaitGroup
	for i := range copies {
		cp := &copies[i]
		wg.Go(func() {
			h := wire.Header{Volume: c.vol.ID, Index: uint64(ch), Len: uint32(len(cp.buf)), Epoch: c.wireEpoch(cp.p)}
			if asOf != 0 {
				h.Snap, h.Flags = uint32(asOf), wire.FlagAsOf
			}
			req := netquic.Message{Code: uint8(wire.OpRead)}
			h.Encode(&req.Header)
			resp := netquic.Message{Payload: cp.buf}
			cctx, cancel := context.WithTimeout(ctx, c.opt.Timeout)
			err := cp.p.cli.Call(cctx, &req, &resp)
			cancel()
			if err == nil {
				err = wire.ErrOf(wire.Status(resp.Code))
			}
			if err == nil && len(resp.Payload) != len(cp.buf) {
				err = wire.ErrBadRequest
			}
			if err == nil {
				// A restart it reveals makes the chunk suspect (and the
				// copy is then not judged).
				c.sawIncarnation(cp.p, wire.Incarnation(&resp.Header))
				cp.ver = replyVer(&resp.Header)
			}
			cp.err = err
		})
	}
	wg.Wait()
}

// judge applies the rules at the top of the file to the copies of chunk ch
// and returns the nodes whose copies are bad.
func (c *Volume) judge(ch int64, copies []scrubCopy, res *ScrubResult) []string {
	var bad []string
	var good []*scrubCopy
	for i := range copies {
		cp := &copies[i]
		switch {
		case cp.err == nil:
			good = append(good, cp)
		case errors.Is(cp.err, engine.ErrChecksum):
			res.Checksum++
			bad = append(bad, cp.id)
			c.log.Warn("cluster: scrub: copy fails its checksum; repairing it from a good replica", "volume", c.vol.Name, "chunk", ch, "node", cp.id)
		default:
			res.Unreadable++
			c.log.Warn("cluster: scrub: cannot read a copy; not judged", "volume", c.vol.Name, "chunk", ch, "node", cp.id, "err", cp.err)
		}
	}
	if len(good) == 0 {
		if len(bad) > 0 {
			res.Lost++
			c.log.Error("cluster: scrub: no copy of the chunk passes its checksum", "volume", c.vol.Name, "chunk", ch, "bad", bad)
		}
		return nil // nothing to repair from
	}
	// Copies behind the newest version are bad whatever their bytes.
	var newest store.Version
	for _, cp := range good {
		if newest.Less(cp.ver) {
			newest = cp.ver
		}
	}
	kept := good[:0]
	for _, cp := range good {
		if behind(cp.ver, newest) {
			res.Behind++
			bad = append(bad, cp.id)
			c.log.Warn("cluster: scrub: copy is behind the newest version; repairing it", "volume", c.vol.Name, "chunk", ch,
				"node", cp.id, "version", cp.ver.String(), "newest", newest.String())
			continue
		}
		kept = append(kept, cp)
	}
	good = kept
	// Group identical copies; the largest group holding a copy of the
	// newest version wins, ties go to the group of the copy first in ring
	// order (good is in ring order).
	best, bestN := -1, 0
	for i, cp := range good {
		if cp.ver != newest {
			continue
		}
		k := 0
		for _, o := range good {
			if bytes.Equal(cp.buf, o.buf) {
				k++
			}
		}
		if k > bestN {
			best, bestN = i, k
		}
	}
	for _, cp := range good {
		if !bytes.Equal(cp.buf, good[best].buf) {
			res.Mismatches++
			bad = append(bad, cp.id)
			c.log.Warn("cluster: scrub: copy differs from the good replica; repairing it", "volume", c.vol.Name, "chunk", ch,
				"node", cp.id, "good", good[best].id, "agreeing", bestN)
		}
	}
	return bad
}

// waitRepaired waits until the rebuild loop cleared the marks Scrub recorded,
// as long as it makes progress, and counts them in res.Repaired.
func (c *Volume) waitRepaired(ctx context.Context, marked []markKey, res *ScrubResult) {
	left := marked
	last := time.Now()
	for {
		kept := left[:0]
		for _, k := range left {
			if c.marks.has(k.node, k.chunk) {
				kept = append(kept, k)
			} else {
				res.Repaired++
			}
		}
		if len(kept) < len(left) {
			last = time.Now()
		}
		left = kept
		if len(left) == 0 || time.Since(last) > scrubRepairIdle {
			if len(left) > 0 {
				c.log.Warn("cluster: scrub: some bad copies are not repaired yet; the rebuild loop keeps trying", "volume", c.vol.Name, "left", len(left))
			}
			return
		}
		c.kickRebuild()
		select {
		case <-ctx.Done():
			return
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// scrubProgress records the scrub's progress in etcd; a failure is only
// logged (progress is informative).
func (c *Volume) scrubProgress(ctx context.Context, done, total uint64, res *ScrubResult, start time.Time) {
	pctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	err := c.ms.SetProgress(pctx, c.vol.ID, meta.Progress{Kind: meta.ProgressScrub, Done: done, Total: total,
		Repaired: res.Repaired, Mismatches: res.Bad(), Started: start.UTC(), Holder: c.opt.Holder})
	if err != nil && ctx.Err() == nil {
		c.log.Warn("cluster: scrub: cannot record progress in etcd", "volume", c.vol.Name, "err", err)
	}
}

// scrubSnaps judges the snapshot copies of chunk ch on the owners of
// copies (whose heads were just read and found good): the owners list their
// copies, each live snapshot resolves on each owner to a copy (or the head).
// For every distinct way of resolving that involves a copy: an owner that
// resolves to another than the lowest lacks a copy; if none does, the chunk
// is read as of the snapshot on every owner and judged like a head (data
// and version). The bad owners are returned: a mark covers the chunk's
// copies, which the rebuild copies too.
func (c *Volume) scrubSnaps(ctx context.Context, ch int64, copies []scrubCopy, snaps []uint64, res *ScrubResult) []string {
	lists := make([][]uint64, len(copies))
	for i := range copies {
		l, err := c.listSnaps(ctx, copies[i].p, ch)
		if err != nil {
			res.Unreadable++
			return nil
		}
		lists[i] = l
	}
	resolve := func(l []uint64, s uint64) uint64 {
		for _, t := range l {
			if t >= s {
				return t
			}
		}
		return 0
	}
	seen := map[string]bool{}
	for _, s := range snaps {
		key, low := "", uint64(0)
		rs := make([]uint64, len(lists))
		for i, l := range lists {
			rs[i] = resolve(l, s)
			key += fmt.Sprintf("%d,", rs[i])
			if rs[i] != 0 && (low == 0 || rs[i] < low) {
				low = rs[i]
			}
		}
		if low == 0 || seen[key] {
			continue // every owner reads the head, judged already
		}
		seen[key] = true
		// The lowest copy is the right one: an owner that reads a higher
		// copy, or its head, lacks it (a copy is only ever added to an
		// owner that has the chunk's head, and never serves a snapshot
		// below the next lower copy).
		var bad []string
		for i, r := range rs {
			if r != low {
				bad = append(bad, copies[i].id)
			}
		}
		if len(bad) > 0 {
			res.Mismatches += uint64(len(bad))
			c.log.Warn("cluster: scrub: replicas lack a snapshot copy of a chunk; repairing", "volume", c.vol.Name,
				"chunk", ch, "snapshot", s, "copy", low, "bad", bad)
			return bad
		}
		c.scrubRead(ctx, ch, copies, s)
		if bad := c.judge(ch, copies, res); len(bad) > 0 {
			c.log.Warn("cluster: scrub: snapshot copies of a chunk differ between replicas; repairing", "volume", c.vol.Name,
				"chunk", ch, "snapshot", s, "bad", bad)
			return bad
		}
	}
	return nil
}
