package node

import (
	"slices"
	"testing"

	"github.com/torus-storage/torus/meta"
	"github.com/torus-storage/torus/store"
)

// A copy serves the snapshots between the next lower copy and itself: it
// is garbage when none of them is live; copies above the volume's newest
// number, and of volumes not created yet, are kept.
func TestGarbageCopies(t *testing.T) {
	vs := meta.VolumeSet{IDs: map[uint64]bool{1: true, 2: true}, Next: 3, Snaps: map[uint64]meta.VolumeSnaps{
		1: {Seq: 9, Live: []uint64{2, 6}},
		2: {Seq: 4},
	}}
	var ids []store.ChunkID
	for _, s := range []uint64{1, 3, 5, 7, 8, 10} {
		ids = append(ids, store.ChunkID{Volume: 1, Index: 0, Snap: s})
	}
	ids = append(ids, store.ChunkID{Volume: 1, Index: 1, Snap: 9}, store.ChunkID{Volume: 1, Index: 1},
		store.ChunkID{Volume: 2, Index: 0, Snap: 4}, store.ChunkID{Volume: 5, Index: 0, Snap: 1})
	var got []uint64
	for _, id := range garbageCopies(ids, vs) {
		got = append(got, id.Volume*100+id.Index*10+id.Snap)
	}
	slices.Sort(got)
	// Volume 1 chunk 0: 1 serves (0,1] (none live), 3 serves (1,3] (2), 5
	// (3,5] none, 7 (5,7] (6), 8 none, 10 above Seq. Chunk 1: 9 serves
	// (0,9] (2, 6). Volume 2: no snapshot left. Volume 5: not created.
	want := []uint64{101, 105, 108, 204}
	if !slices.Equal(got, want) {
		t.Fatalf("garbage %v, want %v", got, want)
	}
}
