package store

// On-disk format of the node store. docs/STORE.md describes it in prose.
//
// Layout (all integers little endian):
//
//	[0, 4096)                      superblock
//	[4096, hdrOff)                 activity log: alBlocks blocks, alPerShard per shard
//	[hdrOff, hdrOff+slots*4096)    one 4 KiB header per slot, hdrOff = 4096*(1+alBlocks)
//	[dataOff, dataOff+slots*chunk) one chunk of data per slot, dataOff aligned to the chunk size
//
// Invariants:
//   - The superblock and every non-zero slot header end with the CRC32C
//     (Castagnoli) of the bytes before it; an all-zero header is a free slot
//     that was never written.
//   - A used header names exactly one ChunkID; no two used headers name the
//     same ChunkID, also after a power loss (a slot's free is durable before
//     its chunk can get another slot).
//   - A slot freed by a discard is reused, and leaves the activity log, only
//     once its punch and free header are durable; recovery zeroes the data
//     of a free slot the log lists. So a chunk never inherits another
//     chunk's data through a reused slot.
//   - A block whose bit is clear in the header's written bitmap reads as zeros
//     whatever the data region holds; a block whose bit is set reads as the
//     data region.
//   - The written bitmap on disk is never behind an acknowledged write: a
//     write that sets a bit completes only after a header image carrying the
//     bit has been written (with RWF_DSYNC if the write is FUA), and a FUA
//     write relies on a bit set earlier only once that bit is durable.
//   - A block's CRC32C in the header matches its data, except in slots listed
//     in the on-disk activity log: there the header may lag the data (dirty
//     header: the CRCs live only in RAM) and recovery recomputes them. A slot
//     leaves the log only after its header is current and an fdatasync has
//     completed: header write, then fdatasync, then the log write dropping it.
//   - A used slot's header naming its chunk is durable before any write to
//     the chunk completes (the first header write of a slot has RWF_DSYNC),
//     so after a power loss every chunk that may have lost writes is named
//     by a used header of a slot the activity log lists (OnRecover).
//   - changes grows by one per change of the slot (write, discard, free,
//     reuse); it never goes back on disk (a dirty header carries a later
//     count when it is written; recovery adds one when it fixes a slot).
//   - A used slot's chunk version (ver) is the newest Version of the changes
//     applied to it (a copy sets it exactly, and is refused with
//     engine.ErrNewer when older); it is zero (unknown) when none was given,
//     when the slot was taken anew, and after an unclean shutdown for every
//     slot the log lists (whose header may be behind or ahead of its data).
//     So once a store is open, a nonzero version is that of the last change
//     the slot's data holds (a power loss also loses unflushed data of slots
//     the log lists: OnRecover names them, and torusd marks them missed).
//   - Every slot that has a data, punch or header write in flight, or had one
//     since the last fdatasync, or whose header is dirty, is listed in a valid
//     activity-log block of its shard (written with RWF_DSYNC before the
//     first such write is issued). An activity-log block is all zeros or
//     carries a CRC32C that verifies.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"

	"github.com/torus-storage/torus/engine"
	"github.com/torus-storage/torus/meta"
)

const (
	storeMagic = "TORUSSTO"
	slotMagic  = "TORUSSLT"
	// storeFormatVersion 2: activity log of 4 blocks per shard (version 1
	// had one), so the header and data regions moved.
	storeFormatVersion = 2

	// DefaultChunkSize is the chunk (slot) size used when none is given.
	DefaultChunkSize = 1 << 20
	// MaxChunkSize is the largest chunk size (meta.MaxChunkSize, the one
	// definition): what the fixed 4 KiB slot header can describe (a CRC per
	// block plus the written bitmap).
	MaxChunkSize = meta.MaxChunkSize
	// MinChunkSize is the smallest chunk size (meta.MinChunkSize).
	MinChunkSize = meta.MinChunkSize

	maxBlocksPerChunk = MaxChunkSize / engine.BlockSize

	alMagic    = "TORUSAL1"
	alOff      = engine.BlockSize
	alShards   = 64 // the most shards a store runs with
	alPerShard = 4  // activity-log blocks per shard
	alBlocks   = alShards * alPerShard
	alSeq      = 8
	alCount    = 16
	alSlots    = 32
	alMax      = 1000 // slots listed per activity-log block (fits in 4 KiB)
	// alShardMax is the number of slots one shard's log lists: 4000, i.e.
	// a 4 GiB working set of 1 MiB chunks per shard.
	alShardMax   = alMax * alPerShard
	maxClusterID = 64

	sbFlagClean = 1 << 0

	// superblock field offsets
	sbVersion   = 8
	sbFlags     = 12
	sbUUID      = 16
	sbBlockSize = 32
	sbChunkSize = 36
	sbSlots     = 40
	sbHdrOff    = 48
	sbDataOff   = 56
	sbVolSize   = 64
	sbClusterN  = 72
	sbClusterID = 128
	sbCRC       = engine.BlockSize - 4

	// slot header field offsets
	shState   = 8
	shVolume  = 16
	shIndex   = 24
	shSnap    = 32
	shChanges = 40
	shBlocks  = 48
	shBitmap  = 64
	shCRCs    = 128
	// The chunk version follows the largest CRC table (512 blocks);
	// stores written before it have zeros there (no version known).
	shVerEpoch = shCRCs + 4*maxBlocksPerChunk
	shVerSeq   = shVerEpoch + 8
	shCRC      = engine.BlockSize - 4

	slotFree = 0
	slotUsed = 1
)

// ErrCorrupt reports a store whose metadata does not verify.
var ErrCorrupt = errors.New("store: store metadata corrupt")

// ErrNotStore reports a file or device without the store magic.
var ErrNotStore = errors.New("store: not a torus store")

// ErrInUse is wrapped by OpenStore's error when another open file holds the
// store (another process, or I/O a killed one left in flight) for too long.
var ErrInUse = errors.New("store: in use")

// superblock is the decoded first 4 KiB of a store.
type superblock struct {
	version   uint32
	flags     uint32
	uuid      [16]byte
	blockSize uint32
	chunkSize uint32
	slots     uint64
	hdrOff    uint64
	dataOff   uint64
	volSize   uint64
	clusterID []byte
}

// layout computes the region offsets for slots chunks of chunkSize bytes.
func layout(slots, chunkSize uint64) (hdrOff, dataOff, total uint64) {
	hdrOff = alOff + alBlocks*engine.BlockSize
	dataOff = hdrOff + slots*engine.BlockSize
	dataOff = (dataOff + chunkSize - 1) / chunkSize * chunkSize
	return hdrOff, dataOff, dataOff + slots*chunkSize
}

func (sb *superblock) encode(b []byte, tab *crc32.Table) {
	clear(b[:engine.BlockSize])
	copy(b, storeMagic)
	le := binary.LittleEndian
	le.PutUint32(b[sbVersion:], sb.version)
	le.PutUint32(b[sbFlags:], sb.flags)
	copy(b[sbUUID:sbUUID+16], sb.uuid[:])
	le.PutUint32(b[sbBlockSize:], sb.blockSize)
	le.PutUint32(b[sbChunkSize:], sb.chunkSize)
	le.PutUint64(b[sbSlots:], sb.slots)
	le.PutUint64(b[sbHdrOff:], sb.hdrOff)
	le.PutUint64(b[sbDataOff:], sb.dataOff)
	le.PutUint64(b[sbVolSize:], sb.volSize)
	le.PutUint16(b[sbClusterN:], uint16(len(sb.clusterID)))
	copy(b[sbClusterID:sbClusterID+maxClusterID], sb.clusterID)
	le.PutUint32(b[sbCRC:], crc32.Checksum(b[:sbCRC], tab))
}

// decodeSuperblock parses and checks a superblock. Errors say which check
// failed so that an operator can tell "not a store" from "damaged store".
func decodeSuperblock(b []byte, tab *crc32.Table) (*superblock, error) {
	if len(b) < engine.BlockSize {
		return nil, fmt.Errorf("superblock too short (%d bytes): %w", len(b), ErrCorrupt)
	}
	if string(b[:8]) != storeMagic {
		return nil, fmt.Errorf("bad magic %q, want %q: %w", b[:8], storeMagic, ErrNotStore)
	}
	le := binary.LittleEndian
	if got, want := le.Uint32(b[sbCRC:]), crc32.Checksum(b[:sbCRC], tab); got != want {
		return nil, fmt.Errorf("superblock checksum %08x, computed %08x: %w", got, want, ErrCorrupt)
	}
	sb := &superblock{
		version:   le.Uint32(b[sbVersion:]),
		flags:     le.Uint32(b[sbFlags:]),
		blockSize: le.Uint32(b[sbBlockSize:]),
		chunkSize: le.Uint32(b[sbChunkSize:]),
		slots:     le.Uint64(b[sbSlots:]),
		hdrOff:    le.Uint64(b[sbHdrOff:]),
		dataOff:   le.Uint64(b[sbDataOff:]),
		volSize:   le.Uint64(b[sbVolSize:]),
	}
	copy(sb.uuid[:], b[sbUUID:])
	if sb.version != storeFormatVersion {
		return nil, fmt.Errorf("store format version %d, this build reads only version %d (pre-release formats are not converted: make a new store)",
			sb.version, storeFormatVersion)
	}
	n := int(le.Uint16(b[sbClusterN:]))
	if n > maxClusterID {
		return nil, fmt.Errorf("cluster id length %d: %w", n, ErrCorrupt)
	}
	sb.clusterID = append([]byte(nil), b[sbClusterID:sbClusterID+n]...)
	if sb.blockSize != engine.BlockSize {
		return nil, fmt.Errorf("block size %d, this build supports %d: %w", sb.blockSize, engine.BlockSize, ErrCorrupt)
	}
	if err := checkChunkSize(int64(sb.chunkSize)); err != nil {
		return nil, fmt.Errorf("%v: %w", err, ErrCorrupt)
	}
	h, d, _ := layout(sb.slots, uint64(sb.chunkSize))
	if sb.slots == 0 || sb.hdrOff != h || sb.dataOff != d {
		return nil, fmt.Errorf("region offsets %d/%d for %d slots, want %d/%d: %w", sb.hdrOff, sb.dataOff, sb.slots, h, d, ErrCorrupt)
	}
	return sb, nil
}

func checkChunkSize(cs int64) error {
	if cs <= 0 {
		return fmt.Errorf("chunk size %d: %w", cs, meta.ErrInvalid)
	}
	return meta.CheckChunkSize(uint64(cs))
}

// slotMeta is the in-memory copy of a slot header. The shard owning the
// slot's chunk is the only one to touch it while the slot is used.
type slotMeta struct {
	id   ChunkID
	used bool
	// changes grows by one at every change of the slot (its change count).
	changes uint64
	// ver is the chunk version: the newest version of a change applied
	// (Version), zero when none is known.
	ver Version
	// written has bit b set when block b holds data (else it reads as zeros).
	written [maxBlocksPerChunk / 64]uint64
	// crcs is this slot's window of Store.crcs: one CRC32C per block.
	crcs []uint32

	// Runtime state of the owning shard (not on disk).
	active      *ChunkOp // ops holding a range of this slot
	blocked     *ChunkOp // FIFO of ops waiting for a range
	blockedTail *ChunkOp
	hdrInflight bool
	hdrBuf      []byte
	hdrCur      *ChunkOp // waiters of the header write in flight
	hdrNext     *ChunkOp // waiters of the next header write
	hdrNextFUA  bool
	hdrCurFUA   bool // the header write in flight has RWF_DSYNC
	// fresh: the slot was taken for its chunk and no header naming the
	// chunk is durable yet; its next header write has RWF_DSYNC.
	fresh bool
	// dirty: the in-memory CRCs are newer than the last header image issued
	// (only while the slot is in the activity log).
	dirty bool
	// hdrFail: the last header write failed, so the bitmap on disk may lag;
	// every write writes the header until one succeeds.
	hdrFail bool
	// hdrEpoch is Store.syncNext when the last header write completed, 0 if
	// it was written with RWF_DSYNC (or at open): the header is durable once
	// Store.synced exceeds it.
	hdrEpoch  uint64
	alState   uint8 // alCold, alQueued, alFlying or alHot
	alPos1    int32 // 1 + index in the shard's activity-log table, 0 if none
	alWriters int32 // write-class ops between AL gate and completion
}

// Activity-log states of a slot within its shard.
const (
	alCold   = iota // not in the log: writes must wait for a log write
	alQueued        // will be in the next log write
	alFlying        // in the log write in flight
	alHot           // in the log on disk: writes may go
)

// encodeAL writes an activity-log block listing slots (negative entries are
// skipped).
func encodeAL(b []byte, seq uint64, slots []int32, tab *crc32.Table) {
	clear(b[:engine.BlockSize])
	le := binary.LittleEndian
	copy(b, alMagic)
	le.PutUint64(b[alSeq:], seq)
	n := 0
	for _, s := range slots {
		if s >= 0 {
			le.PutUint32(b[alSlots+4*n:], uint32(s))
			n++
		}
	}
	le.PutUint32(b[alCount:], uint32(n))
	le.PutUint32(b[engine.BlockSize-4:], crc32.Checksum(b[:engine.BlockSize-4], tab))
}

// decodeAL returns the slots an activity-log block lists; ok is false when
// the block is neither all zeros nor valid (a torn log write).
func decodeAL(b []byte, tab *crc32.Table, dst []uint32) (_ []uint32, ok bool) {
	le := binary.LittleEndian
	if string(b[:8]) != alMagic {
		for _, c := range b[:engine.BlockSize] {
			if c != 0 {
				return dst, false
			}
		}
		return dst, true
	}
	if le.Uint32(b[engine.BlockSize-4:]) != crc32.Checksum(b[:engine.BlockSize-4], tab) {
		return dst, false
	}
	n := int(le.Uint32(b[alCount:]))
	if n > alMax {
		return dst, false
	}
	for i := 0; i < n; i++ {
		dst = append(dst, le.Uint32(b[alSlots+4*i:]))
	}
	return dst, true
}

// setVer applies the version of write-class op to m: exactly, for a copy;
// else the newer of the two.
func (m *slotMeta) setVer(op *ChunkOp) {
	if op.Flags&engine.FlagCopy != 0 || m.ver.Less(op.Ver) {
		m.ver = op.Ver
	}
}

func (m *slotMeta) bit(b int) bool { return m.written[b>>6]&(1<<(b&63)) != 0 }
func (m *slotMeta) set(b int)      { m.written[b>>6] |= 1 << (b & 63) }
func (m *slotMeta) unset(b int)    { m.written[b>>6] &^= 1 << (b & 63) }

// allSet reports whether blocks [b0, b0+n) all have their written bit set.
func (m *slotMeta) allSet(b0, n int) bool {
	for b := b0; b < b0+n; b++ {
		if !m.bit(b) {
			return false
		}
	}
	return true
}

func (m *slotMeta) empty() bool {
	for _, w := range m.written {
		if w != 0 {
			return false
		}
	}
	return true
}

// encode writes the header image of m into b (4 KiB).
func (m *slotMeta) encode(b []byte, blocks int, tab *crc32.Table) {
	clear(b[:engine.BlockSize])
	le := binary.LittleEndian
	copy(b, slotMagic)
	if m.used {
		le.PutUint32(b[shState:], slotUsed)
		le.PutUint64(b[shVolume:], m.id.Volume)
		le.PutUint64(b[shIndex:], m.id.Index)
		le.PutUint64(b[shSnap:], m.id.Snap)
		for i, w := range m.written {
			le.PutUint64(b[shBitmap+8*i:], w)
		}
		for i := 0; i < blocks; i++ {
			le.PutUint32(b[shCRCs+4*i:], m.crcs[i])
		}
		le.PutUint64(b[shVerEpoch:], m.ver.Epoch)
		le.PutUint64(b[shVerSeq:], m.ver.Seq)
	}
	le.PutUint64(b[shChanges:], m.changes)
	le.PutUint32(b[shBlocks:], uint32(blocks))
	le.PutUint32(b[shCRC:], crc32.Checksum(b[:shCRC], tab))
}

// decode loads a header image into m. An all-zero image is a never-written
// free slot.
func (m *slotMeta) decode(b []byte, blocks int, tab *crc32.Table) error {
	le := binary.LittleEndian
	if string(b[:8]) != slotMagic {
		for _, c := range b[:engine.BlockSize] {
			if c != 0 {
				return fmt.Errorf("bad slot header magic %q: %w", b[:8], ErrCorrupt)
			}
		}
		m.used = false
		return nil
	}
	if got, want := le.Uint32(b[shCRC:]), crc32.Checksum(b[:shCRC], tab); got != want {
		return fmt.Errorf("slot header checksum %08x, computed %08x: %w", got, want, ErrCorrupt)
	}
	if n := le.Uint32(b[shBlocks:]); int(n) != blocks {
		return fmt.Errorf("slot header has %d blocks, store chunks have %d: %w", n, blocks, ErrCorrupt)
	}
	m.changes = le.Uint64(b[shChanges:])
	switch le.Uint32(b[shState:]) {
	case slotFree:
		m.used = false
		return nil
	case slotUsed:
	default:
		return fmt.Errorf("slot state %d: %w", le.Uint32(b[shState:]), ErrCorrupt)
	}
	m.used = true
	m.id = ChunkID{Volume: le.Uint64(b[shVolume:]), Index: le.Uint64(b[shIndex:]), Snap: le.Uint64(b[shSnap:])}
	for i := range m.written {
		m.written[i] = le.Uint64(b[shBitmap+8*i:])
	}
	for i := 0; i < blocks; i++ {
		m.crcs[i] = le.Uint32(b[shCRCs+4*i:])
	}
	m.ver = Version{Epoch: le.Uint64(b[shVerEpoch:]), Seq: le.Uint64(b[shVerSeq:])}
	return nil
}
