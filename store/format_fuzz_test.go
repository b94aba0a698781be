package store

import (
	"hash/crc32"
	"testing"

	"github.com/torus-storage/torus/engine"
)

// FuzzStoreMetadata feeds arbitrary 4 KiB images to the superblock, slot
// header and activity-log decoders: they must reject or accept, never panic,
// and what they accept must re-encode to an image that decodes the same.
func FuzzStoreMetadata(f *testing.F) {
	tab := crc32.MakeTable(crc32.Castagnoli)
	b := make([]byte, engine.BlockSize)
	sb := &superblock{version: storeFormatVersion, blockSize: engine.BlockSize, chunkSize: DefaultChunkSize, slots: 8}
	sb.hdrOff, sb.dataOff, _ = layout(8, DefaultChunkSize)
	sb.encode(b, tab)
	f.Add(append([]byte(nil), b...))
	m := slotMeta{used: true, id: ChunkID{1, 2, 3}, changes: 7, ver: Version{Epoch: 4, Seq: 9}, crcs: make([]uint32, 256)}
	m.set(3)
	m.encode(b, 256, tab)
	f.Add(append([]byte(nil), b...))
	encodeAL(b, 1, []int32{1, -1, 5}, tab)
	f.Add(append([]byte(nil), b...))
	f.Fuzz(func(t *testing.T, in []byte) {
		img := make([]byte, engine.BlockSize)
		copy(img, in)
		if sb, err := decodeSuperblock(img, tab); err == nil {
			out := make([]byte, engine.BlockSize)
			sb.encode(out, tab)
			if _, err := decodeSuperblock(out, tab); err != nil {
				t.Fatalf("re-encoded superblock does not decode: %v", err)
			}
		}
		var m slotMeta
		m.crcs = make([]uint32, 256)
		if err := m.decode(img, 256, tab); err == nil {
			out := make([]byte, engine.BlockSize)
			m.encode(out, 256, tab)
			var m2 slotMeta
			m2.crcs = make([]uint32, 256)
			if err := m2.decode(out, 256, tab); err != nil || m2.used != m.used || (m.used && m2.id != m.id) {
				t.Fatalf("re-encoded header differs: %v", err)
			}
		}
		decodeAL(img, tab, nil)
	})
}
