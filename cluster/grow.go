package cluster

// Growing a volume while it is open: the attached client learns a larger
// size (Attached watches the volume's record in etcd) and Grow makes the
// new range addressable.
//
// Invariants:
//   - The size only grows, and only under c.mu.
//   - Every per-chunk table (c.vers, each peer's lastSeq) covers every
//     chunk below the size before the size is published: Grow extends the
//     tables, then stores the size. Submit loads the size (an atomic, which
//     orders the loads after it) before it touches any table, so a request
//     that passed the range check with the new size finds the new chunks.
//   - A table grows by adding a segment; entries never move, so an atomic
//     update racing a growth is never lost, and the data path takes no lock
//     (one atomic load of the segment list per lookup).
//   - Peers are made under c.mu with the size current then (rebuildLocked),
//     and Grow extends the tables of every peer in c.peers under c.mu; a
//     replaced peer is only in placements loaded before it was replaced,
//     which no request with a chunk past the old size can have loaded.

import (
	"fmt"
	"sync/atomic"

	"github.com/torus-storage/torus/engine"
)

// chunkTable is a per-chunk array of T that grows without moving what it
// holds: a list of segments, the first sized at Open, one more per growth.
type chunkTable[T any] struct {
	p atomic.Pointer[chunkSegs[T]]
}

// chunkWriteSeqs and verTable are the per-chunk tables: write sequences of a
// peer, versions of the volume's chunks.
type (
	chunkWriteSeqs = chunkTable[atomic.Uint64]
	verTable       = chunkTable[chunkVer]
)

// chunkSegs is an immutable list of segments: segs[k] holds the entries
// from ends[k-1] (0 for k = 0) to ends[k].
type chunkSegs[T any] struct {
	segs [][]T
	ends []int64
}

// newChunkTable returns a table of n entries.
func newChunkTable[T any](n int64) *chunkTable[T] {
	t := new(chunkTable[T])
	t.p.Store(&chunkSegs[T]{segs: [][]T{make([]T, n)}, ends: []int64{n}})
	return t
}

// at returns entry i, which must be below len.
func (t *chunkTable[T]) at(i int64) *T {
	s := t.p.Load()
	start := int64(0)
	for k, end := range s.ends {
		if i < end {
			return &s.segs[k][i-start]
		}
		start = end
	}
	panic(fmt.Sprintf("cluster: chunk %d beyond the table's %d entries", i, start))
}

// len returns the number of entries.
func (t *chunkTable[T]) len() int64 {
	s := t.p.Load()
	return s.ends[len(s.ends)-1]
}

// each calls f for every entry in order.
func (t *chunkTable[T]) each(f func(i int64, v *T)) {
	s := t.p.Load()
	i := int64(0)
	for _, seg := range s.segs {
		for j := range seg {
			f(i, &seg[j])
			i++
		}
	}
}

// grow extends the table to n entries (nothing if it has as many). Callers
// serialise growths (c.mu).
func (t *chunkTable[T]) grow(n int64) {
	s := t.p.Load()
	have := s.ends[len(s.ends)-1]
	if n <= have {
		return
	}
	ns := &chunkSegs[T]{
		segs: append(append([][]T(nil), s.segs...), make([]T, n-have)),
		ends: append(append([]int64(nil), s.ends...), n),
	}
	t.p.Store(ns)
}

// nchunks returns the number of chunks of a volume of size bytes.
func (c *Volume) nchunks(size int64) int64 { return (size + c.chunk - 1) / c.chunk }

// Grow makes the volume size bytes long: requests up to the new end are
// taken once Grow returns (and, concurrently, as soon as they see the new
// Size). The volume's record in etcd must already have that size
// (meta.Client.ResizeVolume); Attached calls Grow when it sees it there.
// A size not above the current one does nothing; size must be a multiple
// of 4 KiB.
func (c *Volume) Grow(size int64) error {
	if size%engine.BlockSize != 0 {
		return fmt.Errorf("grow volume %s to %d bytes: not a multiple of 4 KiB", c.vol.Name, size)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	old := c.size.Load()
	if size <= old {
		return nil
	}
	n := c.nchunks(size)
	c.vers.grow(n)
	for _, p := range c.peers {
		p.lastSeq.grow(n)
	}
	c.size.Store(size)
	c.log.Info("cluster: volume grew", "volume", c.vol.Name, "from", old, "to", size, "chunks", n)
	return nil
}
