package node

// Garbage collection of deleted volumes' chunks and of snapshot copies no
// snapshot is read from.
//
// Invariants:
//   - A chunk is discarded only if its volume id is below the id counter and
//     absent from the volume list of the same etcd revision (meta.VolumeSet):
//     the volume existed and was deleted. Ids are never reused, so a volume
//     created after that read (a higher id) is never touched, and a chunk of
//     an id never allocated is left alone.
//   - A snapshot copy of a volume that exists is discarded only if no
//     snapshot of the same VolumeSet (pending ones included) reads from it
//     and its number is not above the volume's SnapSeq there (see
//     garbageCopies for why a listing is enough).
//   - The collector runs on its own goroutine, one pass at a time, and stops
//     (Node.Stop waits for it) before the store closes. The same goroutine
//     publishes the node's usage per volume (usage.go) after each pass, from
//     a listing taken after the pass's discards.
//   - A pass discards each garbage chunk whole (OpDiscard over the chunk),
//     which frees its slot; a discard that fails or races another op leaves
//     the chunk for the next pass, which the next volume change, or the
//     periodic pass, runs.

import (
	"context"
	"log/slog"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/torus-storage/torus/engine"
	"github.com/torus-storage/torus/meta"
	"github.com/torus-storage/torus/store"
)

// gcInterval is how often the collector runs without a volume change (to
// pick up what a failed or raced discard left behind).
const gcInterval = 10 * time.Minute

// gcParallel bounds the discards a pass has in flight.
const gcParallel = 16

// collector frees the slots of chunks of deleted volumes in one store.
type collector struct {
	st    *store.Store
	log   *slog.Logger
	total atomic.Uint64 // chunks freed since start (torus_gc_chunks_total)
	stop  context.CancelFunc
	done  chan struct{}
	// usage, if set, is given a listing of the store and the VolumeSet
	// after every pass and every usageEvery (usage.go).
	usage      func(ctx context.Context, ids []store.ChunkID, vs meta.VolumeSet)
	usageEvery time.Duration
}

// startCollector runs the collector until stop: a pass at once, after
// every change of the volumes in ms, and every gcInterval. With usage set,
// it also hands usage a listing after every pass and every usageEvery.
func startCollector(ctx context.Context, st *store.Store, ms *meta.Client, log *slog.Logger,
	usage func(context.Context, []store.ChunkID, meta.VolumeSet), usageEvery time.Duration) *collector {
	ctx, stop := context.WithCancel(context.WithoutCancel(ctx))
	c := &collector{st: st, log: log, stop: stop, done: make(chan struct{}), usage: usage, usageEvery: usageEvery}
	go func() {
		defer close(c.done)
		ch := ms.WatchVolumes(ctx)
		t := time.NewTicker(gcInterval)
		defer t.Stop()
		var ut <-chan time.Time
		if usage != nil && usageEvery > 0 {
			tk := time.NewTicker(usageEvery)
			defer tk.Stop()
			ut = tk.C
		}
		var last meta.VolumeSet
		for {
			select {
			case <-ctx.Done():
				return
			case vs, ok := <-ch:
				if !ok {
					return
				}
				last = vs
			case <-t.C:
				if last.IDs == nil {
					continue
				}
				// An old set is still safe: a deleted id stays deleted,
				// and its Next only hides newer deletions.
			case <-ut:
				if last.IDs != nil {
					c.publish(ctx, nil, last)
				}
				continue
			}
			ids, freed := c.pass(ctx, last)
			if freed {
				ids = nil // list again: the listing still has what was freed
			}
			c.publish(ctx, ids, last)
		}
	}()
	return c
}

// publish hands c.usage the listing ids (nil: list the store now) and vs.
func (c *collector) publish(ctx context.Context, ids []store.ChunkID, vs meta.VolumeSet) {
	if c.usage == nil || ctx.Err() != nil {
		return
	}
	if ids == nil {
		var err error
		if ids, err = c.st.Chunks(); err != nil {
			c.log.Warn("usage: cannot list the store's chunks", "err", err)
			return
		}
	}
	c.usage(ctx, ids, vs)
}

// close stops the collector and waits for its pass in flight.
func (c *collector) close() {
	c.stop()
	<-c.done
}

// pass discards every chunk of a volume that vs reports deleted, and every
// snapshot copy no snapshot of vs is read from (garbageCopies). It returns
// the listing it acted on (nil if it could not list) and whether it tried
// to discard anything (the listing is then out of date).
func (c *collector) pass(ctx context.Context, vs meta.VolumeSet) ([]store.ChunkID, bool) {
	ids, err := c.st.Chunks()
	if err != nil {
		c.log.Warn("gc: cannot list the store's chunks", "err", err)
		return nil, false
	}
	var garbage []store.ChunkID
	vols := make(map[uint64]int)
	for _, id := range ids {
		if vs.Deleted(id.Volume) {
			garbage = append(garbage, id)
			vols[id.Volume]++
		}
	}
	copies := garbageCopies(ids, vs)
	garbage = append(garbage, copies...)
	if len(garbage) == 0 {
		return ids, false
	}
	start := time.Now()
	var freed, failed atomic.Uint64
	sem := make(chan struct{}, gcParallel)
	var wg sync.WaitGroup
	for _, id := range garbage {
		if ctx.Err() != nil {
			break
		}
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			w := make(gcWaiter, 1)
			c.st.Submit(&store.ChunkOp{Op: engine.OpDiscard, Chunk: id, Off: 0, Length: c.st.ChunkSize(), Done: w})
			if err := <-w; err != nil {
				failed.Add(1)
				c.log.Warn("gc: discard failed; retried at the next pass", "volume", id.Volume, "chunk", id.Index, "err", err)
				return
			}
			freed.Add(1)
			c.total.Add(1)
		})
	}
	wg.Wait()
	c.log.Info("gc: freed chunks of deleted volumes and snapshots", "chunks", freed.Load(), "failed", failed.Load(),
		"volumes", len(vols), "snapshot_copies", len(copies), "took", time.Since(start).Round(time.Millisecond))
	return ids, true
}

// garbageCopies returns the snapshot copies of ids (a store's chunks, in
// Store.Chunks order) that no snapshot of vs is read from. A read as of
// snapshot s resolves to the smallest copy >= s, so copy c, whose next
// lower copy in the store is p (0 if none), serves exactly the snapshots in
// (p, c]: it is garbage if none of them is live. Copies numbered above the
// volume's Seq (taken after vs was read) are kept.
//
// Why acting on a listing is safe: only this collector, and a move's end
// (which drops every copy of a chunk the node no longer owns), discard
// copies; every other change adds copies (a clone, a rebuild's copy), and
// an added copy only narrows what an existing one serves. So a copy the
// listing shows serving no live snapshot serves none when discarded.
// Snapshots taken later have numbers above every existing copy.
func garbageCopies(ids []store.ChunkID, vs meta.VolumeSet) []store.ChunkID {
	byHead := make(map[[2]uint64][]uint64)
	for _, id := range ids {
		if id.Snap == 0 || vs.Deleted(id.Volume) || !vs.IDs[id.Volume] {
			continue
		}
		k := [2]uint64{id.Volume, id.Index}
		byHead[k] = append(byHead[k], id.Snap)
	}
	var out []store.ChunkID
	for k, copies := range byHead {
		slices.Sort(copies)
		sn := vs.Snaps[k[0]]
		prev := uint64(0)
		for _, c := range copies {
			if c <= sn.Seq {
				i, _ := slices.BinarySearch(sn.Live, prev+1)
				if i >= len(sn.Live) || sn.Live[i] > c {
					out = append(out, store.ChunkID{Volume: k[0], Index: k[1], Snap: c})
				}
			}
			prev = c
		}
	}
	return out
}

// gcWaiter completes a ChunkOp into a channel.
type gcWaiter chan error

func (w gcWaiter) CompleteChunk(_ *store.ChunkOp, err error) { w <- err }
