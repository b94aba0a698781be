package node

// Publishing what the node's store holds per volume (meta.NodeUsage), for
// torusctl's ALLOCATED, SNAPSHOTS and EXCLUSIVE columns.
//
// Invariants:
//   - Usage is computed from one listing of the store (store.Chunks) and one
//     meta.VolumeSet, with the rule the collector uses for garbage
//     (garbageCopies): a copy c serves the live snapshots in (p, c], p the
//     next lower copy of the same chunk in the listing. A copy is counted in
//     Only[s] exactly when s is the only one; so deleting s frees those
//     copies at the collector's next pass, and no others of that volume.
//   - The collector's goroutine lists and publishes (after each of its
//     passes, and every Config.UsageInterval), one listing at a time, so the
//     store is never listed twice at once for this and stops with the
//     collector, before the store closes.
//   - Chunks of deleted volumes (vs.Deleted) are not reported: they are
//     garbage about to be freed, and no volume shows them.

import (
	"context"
	"slices"
	"time"

	"github.com/torus-storage/torus/meta"
	"github.com/torus-storage/torus/store"
)

// DefaultUsageInterval is how often a node lists its store to publish its
// usage per volume, besides after every garbage-collection pass.
const DefaultUsageInterval = 15 * time.Second

// volumeUsage counts ids (a listing of a store) per volume against vs: the
// head chunks, the snapshot copies and, per live snapshot, the copies held
// by it alone (see the invariants at the top of the file).
func volumeUsage(ids []store.ChunkID, vs meta.VolumeSet) map[uint64]meta.VolumeUsage {
	out := make(map[uint64]meta.VolumeUsage)
	copies := make(map[[2]uint64][]uint64)
	for _, id := range ids {
		if vs.Deleted(id.Volume) {
			continue
		}
		u := out[id.Volume]
		if id.Snap == 0 {
			u.Head++
		} else {
			u.Copies++
			k := [2]uint64{id.Volume, id.Index}
			copies[k] = append(copies[k], id.Snap)
		}
		out[id.Volume] = u
	}
	for k, cs := range copies {
		sn := vs.Snaps[k[0]]
		if len(sn.Live) == 0 {
			continue
		}
		slices.Sort(cs)
		prev := uint64(0)
		for _, c := range cs {
			if c <= sn.Seq {
				// The live snapshots in (prev, c]: Live[i:j].
				i, _ := slices.BinarySearch(sn.Live, prev+1)
				j, _ := slices.BinarySearch(sn.Live, c+1)
				if j-i == 1 {
					u := out[k[0]]
					if u.Only == nil {
						u.Only = make(map[uint64]uint64)
					}
					u.Only[sn.Live[i]]++
					out[k[0]] = u
				}
			}
			prev = c
		}
	}
	return out
}

// publishUsage publishes the usage of ids (a listing of the store) read
// against vs under the node's registration.
func (n *Node) publishUsage(ctx context.Context, ids []store.ChunkID, vs meta.VolumeSet) {
	u := meta.NodeUsage{Node: n.id.NodeID, ChunkSize: uint64(n.store.ChunkSize()), Volumes: volumeUsage(ids, vs)}
	pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	partial, err := n.reg.PutUsage(pctx, u)
	switch {
	case err != nil && ctx.Err() == nil:
		n.log.Debug("usage per volume not published; retried at the next listing", "err", err)
	case partial && !n.usagePartial:
		n.log.Warn("usage per volume published without the bytes held by each snapshot: too many volumes and snapshots for one record",
			"volumes", len(u.Volumes))
	}
	n.usagePartial = partial
}
