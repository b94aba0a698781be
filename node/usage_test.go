package node

import (
	"maps"
	"testing"

	"github.com/torus-storage/torus/meta"
	"github.com/torus-storage/torus/store"
)

// Usage per volume from a listing: heads and copies counted, deleted
// volumes left out, and a copy counted for a snapshot only when no other
// live snapshot reads it.
func TestVolumeUsage(t *testing.T) {
	vs := meta.VolumeSet{IDs: map[uint64]bool{1: true, 2: true}, Next: 4, Snaps: map[uint64]meta.VolumeSnaps{
		1: {Seq: 9, Live: []uint64{2, 3, 6}},
		2: {Seq: 4},
	}}
	c := func(vol, idx, snap uint64) store.ChunkID { return store.ChunkID{Volume: vol, Index: idx, Snap: snap} }
	ids := []store.ChunkID{
		c(1, 0, 0), c(1, 1, 0), c(1, 2, 0),
		// Chunk 0: 1 serves (0,1] (none), 2 serves (1,2] {2}, 5 serves
		// (2,5] {3}, 7 serves (5,7] {6}, 10 is above Seq.
		c(1, 0, 1), c(1, 0, 2), c(1, 0, 5), c(1, 0, 7), c(1, 0, 10),
		// Chunk 1: 6 serves (0,6] {2,3,6}: shared.
		c(1, 1, 6),
		// Chunk 2: 3 serves (0,3] {2,3}: shared; 8 serves (3,8] {6}.
		c(1, 2, 3), c(1, 2, 8),
		// Volume 2: no live snapshot; a copy left for the collector.
		c(2, 0, 0), c(2, 0, 4),
		// Volume 3: deleted (below Next, not in IDs). Volume 7: not
		// created yet as of vs, still reported.
		c(3, 0, 0), c(3, 0, 1), c(7, 0, 0),
	}
	got := volumeUsage(ids, vs)
	want := map[uint64]meta.VolumeUsage{
		1: {Head: 3, Copies: 8, Only: map[uint64]uint64{2: 1, 3: 1, 6: 2}},
		2: {Head: 1, Copies: 1},
		7: {Head: 1},
	}
	if len(got) != len(want) {
		t.Fatalf("volumes %v, want %v", got, want)
	}
	for id, w := range want {
		g := got[id]
		if g.Head != w.Head || g.Copies != w.Copies || !maps.Equal(g.Only, w.Only) {
			t.Errorf("volume %d: %+v, want %+v", id, g, w)
		}
	}
}
