package cluster

// Chunk versions of a replicated volume: how replicas that fell behind are
// found even where no mark says so (a disk restored from an older image, a
// mark that was never recorded).
//
// Every write, discard and write-zeroes carries a store.Version: this
// client's attach epoch and a sequence it gives the changes of each chunk. A
// node's store keeps, per chunk, the newest version it applied (store.Store,
// store.ChunkOp.Ver) and answers it with every read. A rebuild copy carries
// its source's version and the target takes exactly that one, or refuses the
// copy if it holds a newer one.
//
// Invariants:
//   - Versions of one chunk given by this client grow: vers[ch].next only
//     grows, and the attach epoch is above every earlier holder's. A node
//     keeps the newest version it applied, so a replica whose version is
//     older than that of a change another replica took lacks that change:
//     it is behind. Versions say nothing about changes a replica missed
//     before a newer one it took: missed marks cover those.
//   - vers[ch].acked is the newest sequence of a change of ch acknowledged
//     to the caller. Acknowledged means an owner without a mark took it with
//     its version (completeCopyTook), and so did every other owner that was
//     sent it with its version, or got a mark; so each owner without a mark
//     answers a version at least that new, unless it lost its version (zero:
//     an unclean shutdown of the node, a chunk with no slot): zero proves
//     nothing either way and is never judged. A store keeps a freed chunk's
//     version in memory, so a late write that takes a new slot does not
//     bring it back.
//   - A read reply with a nonzero version older than (epoch, acked) as of
//     the read's start is never returned: the replica is behind, it gets a
//     missed mark (the rebuild copies a good replica over it) and the read
//     goes to the next owner. The chunk's last unmarked owner is not
//     marked (the read fails): a chunk with every copy marked could not be
//     read, written or rebuilt.
//   - An owner that may lack earlier changes of the chunk (a missed mark,
//     suspect after a restart) takes writes without their version, so its
//     version never claims it is as new as a complete copy (lacksEarlier).
//   - A rebuild copies from the source with the newest version (sources
//     with an older nonzero version are behind and are marked), and a
//     target never takes a copy older than what it holds (StatusNewer):
//     both are kept and the target keeps its mark (copyRefused).
//   - Scrub: the copies with the newest version are the candidates for the
//     good copy; every copy with an older nonzero version is bad, and
//     copies with no version are judged by their bytes (scrub.go).
//
// Cost on the data path: two atomic adds per chunk-sized part of a write
// and one load per read part; 16 bytes of RAM per chunk of the volume.

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"

	"github.com/torus-storage/torus/engine"
	"github.com/torus-storage/torus/internal/wire"
	"github.com/torus-storage/torus/netquic"
	"github.com/torus-storage/torus/store"
)

// chunkVer is this client's version state of one chunk.
type chunkVer struct {
	next  atomic.Uint64 // the last sequence given to a change
	acked atomic.Uint64 // the newest sequence acknowledged
}

// errBehind is the error of a reply from a replica found behind.
var errBehind = errors.New("cluster: replica is behind: its version of the chunk is older than a change acknowledged before")

// nextVer gives the next version of chunk ch to a change.
func (c *Volume) nextVer(ch int64) uint64 { return c.vers.at(ch).next.Add(1) }

// ackVer records that the change of chunk ch with sequence seq was
// acknowledged.
func (c *Volume) ackVer(ch int64, seq uint64) {
	a := &c.vers.at(ch).acked
	for {
		cur := a.Load()
		if cur >= seq || a.CompareAndSwap(cur, seq) {
			return
		}
	}
}

// ackedVer is the version of the newest acknowledged change of chunk ch,
// zero if this client acknowledged none.
func (c *Volume) ackedVer(ch int64) store.Version {
	if s := c.vers.at(ch).acked.Load(); s != 0 {
		return store.Version{Epoch: c.epoch.Load(), Seq: s}
	}
	return store.Version{}
}

// lacksEarlier reports whether owner i of write-like part p lacks earlier
// changes of the chunk (a missed mark): such an owner takes the change
// without its version, so that its version never claims it is as new as a
// complete copy, and it does not count as a complete copy for the write
// (completeCopyTook). A copy (which sets the version exactly) brings its
// version up again. Unflushed marks (the node holds what it took unless it
// restarted) and suspect chunks (marked missed before any reply counts) are
// left alone.
func (p *clusterPart) lacksEarlier(i int) bool {
	return p.c.marks.hasMissed(p.ownerID(i), p.chunk)
}

// replyVer is the chunk version of an OK read reply.
func replyVer(resp *[wire.HeaderSize]byte) store.Version {
	e, s := wire.Version(resp)
	return store.Version{Epoch: e, Seq: s}
}

// behind reports whether a replica answering version got is behind want
// (neither zero).
func behind(got, want store.Version) bool {
	return !got.IsZero() && !want.IsZero() && got.Less(want)
}

// markBehind records a missed mark for (p, ch): p answered version got,
// older than want. It does not wait: the mark is recorded by the marker
// (the data path never blocks on etcd for it).
//
// A replica that is the chunk's last owner without a mark is not marked: a
// chunk with every copy marked can be neither read nor written nor rebuilt.
// The read that found it fails instead, and the error is logged.
func (c *Volume) markBehind(p *peer, ch int64, got, want store.Version) {
	k := markKey{p.id, ch}
	if _, queued := c.behindPending.LoadOrStore(k, struct{}{}); queued {
		return
	}
	c.behindFound.Add(1)
	if !c.otherUnmarked(p, ch) {
		c.behindPending.Delete(k)
		c.log.Error("cluster: replica is behind and is the chunk's last unmarked copy; not marking it, reads of it fail",
			"volume", c.vol.Name, "node", p.id, "chunk", ch, "version", got.String(), "want", want.String())
		return
	}
	c.log.Warn("cluster: replica is behind (its version of the chunk is older than a change acknowledged or held elsewhere); marking it for rebuild",
		"volume", c.vol.Name, "node", p.id, "chunk", ch, "version", got.String(), "want", want.String())
	j := &markJob{node: p.id, chunks: []int64{ch}, behind: true}
	select {
	case c.markq <- j:
	default:
		go func() {
			select {
			case c.markq <- j:
			case <-c.ctx.Done():
			}
		}()
	}
}

// otherUnmarked reports whether an owner of chunk ch under the current
// ring other than p has no mark for it.
func (c *Volume) otherUnmarked(p *peer, ch int64) bool {
	st := c.state.Load()
	var ids [maxReplicas]int
	for _, i := range st.r.OwnerIndices(chunkKey(c.vol.ID, ch), c.repl, ids[:0]) {
		if id := st.r.Node(i).ID; id != p.id && !c.marks.has(id, ch) {
			return true
		}
	}
	return false
}

// behindErr is the read error of a reply found behind.
func behindErr(p *peer, got, want store.Version) error {
	return fmt.Errorf("cluster: node %s at version %v, want %v or newer: %w", p.id, got, want, errBehind)
}

// newestSources lists the peers a copy of chunk ch to target may read from
// (c.sources less target, and those down or suspect), newest version first.
// With more than one, it asks each for its version with a one-block read
// into probe: those with a nonzero version older than the newest are
// behind, get a missed mark and are left out; those with no version come
// after the others, and those that did not answer last.
func (c *Volume) newestSources(ctx context.Context, st *clusterState, target *peer, ch int64, probe []byte) []*peer {
	var cands []*peer
	for _, src := range c.sources(st, ch) {
		if src != target && !src.isDown() && !src.isSuspect(ch) {
			cands = append(cands, src)
		}
	}
	if len(cands) < 2 {
		return cands
	}
	vers := make([]store.Version, len(cands))
	answered := make([]bool, len(cands))
	var newest store.Version
	for i, src := range cands {
		h := wire.Header{Volume: c.vol.ID, Index: uint64(ch), Len: engine.BlockSize, Epoch: c.wireEpoch(src)}
		req := netquic.Message{Code: uint8(wire.OpRead)}
		h.Encode(&req.Header)
		resp := netquic.Message{Payload: probe}
		// Short: the probes share the copy's gate hold, and one node that
		// does not answer must not cost the others theirs.
		cctx, cancel := context.WithTimeout(ctx, min(c.opt.Timeout, gateHold/4))
		err := c.copyCallErr(src, src.cli.Call(cctx, &req, &resp), &resp)
		cancel()
		if err != nil {
			continue
		}
		c.sawIncarnation(src, wire.Incarnation(&resp.Header))
		vers[i], answered[i] = replyVer(&resp.Header), true
		if newest.Less(vers[i]) {
			newest = vers[i]
		}
	}
	out := make([]*peer, 0, len(cands))
	for pass := 0; pass < 3; pass++ {
		for i, src := range cands {
			switch {
			case pass == 0 && answered[i] && !vers[i].IsZero() && vers[i] == newest,
				pass == 1 && answered[i] && vers[i].IsZero(),
				pass == 2 && !answered[i]:
				out = append(out, src)
			case pass == 0 && answered[i] && behind(vers[i], newest):
				c.markBehind(src, ch, vers[i], newest)
			}
		}
	}
	return out
}

// refusedIdle reports whether a copy of chunk ch to target was refused and
// the chunk was not written since: a new copy would be refused again.
func (c *Volume) refusedIdle(target *peer, ch int64) bool {
	v, ok := c.refused.Load(markKey{target.id, ch})
	if !ok {
		return false
	}
	if v.(uint64) == c.vers.at(ch).next.Load() {
		return true
	}
	c.refused.Delete(markKey{target.id, ch})
	return false
}

// copyRefused handles a copy of chunk ch from src at version sv that target
// refused: it holds version tv, newer. The target keeps its mark (it lacks
// an earlier change) and is not overwritten. src is not marked: a source
// behind a change this client acknowledged was already found so when it
// was read (copyChunk), and nobody here can tell whether any other change
// was ever acknowledged (a write that failed may have landed on target
// alone). The mark stays until a newer change reaches both copies, or an
// operator decides.
func (c *Volume) copyRefused(src, target *peer, ch int64, sv, tv store.Version, err error) error {
	c.copiesRefused.Add(1)
	c.refused.Store(markKey{target.id, ch}, c.vers.at(ch).next.Load())
	c.log.Warn("cluster: rebuild copy refused: the target holds a newer version of the chunk than the source; both kept",
		"volume", c.vol.Name, "chunk", ch, "target", target.id, "target_version", tv.String(), "source", src.id, "source_version", sv.String())
	return fmt.Errorf("%w: %s holds version %v, newer than the source's %v: %w", errNoSource, target.id, tv, sv, err)
}
