// Package wire is the chunk protocol between a cluster.Volume (the client)
// and a node.Server, carried in netquic frames.
//
// A netquic frame already has an op (request) or status (response) byte, a
// request id and a payload length; this package defines the op and status
// values and the 48-byte caller header. Layout of the header, little endian:
//
//	[0:8]    volume id
//	[8:16]   chunk index (offset in the volume / chunk size)
//	[16:24]  fence epoch (reads, writes, discards, write-zeroes, fence): the
//	         attach epoch in the high 32 bits, the client's fence generation
//	         for this node in the low 32 (FenceEpoch); in a stale-epoch
//	         response, the node's current fence epoch of the volume;
//	         in an OK response to a read, write, flush, discard,
//	         write-zeroes or fence, the node's incarnation (odd; new whenever
//	         the node may have lost writes no flush covered: a power loss, a
//	         new store), so a client notices such a restart
//	[24:26]  offset inside the chunk, in 4 KiB blocks
//	[26:28]  length, in 4 KiB blocks (at most 512: chunks are at most 2 MiB)
//	[28]     flags: bit 0 FUA, bit 1 NoUnmap, bit 2 Copy, bit 3 AsOf, bit 4
//	         IfAbsent, bit 5 IfHead; other bits zero. In an OK response to a read, bit 0
//	         (ReplyAbsent) says the node has no slot for the chunk read
//	         (it read zeros)
//	[29:32]  snapshot (24 bits). In a request, the chunk addressed is
//	         (volume, index, snapshot): 0 is the head (the volume as it is
//	         now), s > 0 the copy of the head taken before the first change
//	         made under snapshot number s; a read with FlagAsOf reads the
//	         volume as of snapshot s instead. In an OK response to a read
//	         with FlagAsOf, the snapshot number of the chunk it read (0: the
//	         head).
//	[32:48]  chunk version: attach epoch u64 (32), sequence u64 (40). In a
//	         write, discard or write-zeroes, the version of that change (the
//	         writer's attach epoch and its per-chunk sequence); with FlagCopy
//	         (a rebuild copy) the exact version of the source copy. In an OK
//	         response to a read, and in a StatusNewer response, the node's
//	         version of the chunk. All zeros: no version (none known).
//
// Payload: a write request carries exactly length bytes; a read response
// carries exactly length bytes when its status is OK; every other frame has
// an empty payload.
//
// Invariants (kept by Decode): a decoded Header has Off and Len that are
// multiples of BlockSize, Len > 0 for ops that address data, no unknown flag
// bit, and Off+Len within MaxChunk. Decode never panics, whatever the bytes
// (FuzzDecode).
package wire

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// HeaderSize is the size of the caller header in a netquic frame.
const HeaderSize = 48

// BlockSize is the unit of offsets and lengths on the wire.
const BlockSize = 4096

// MaxChunk is the largest chunk size the protocol can address (2 MiB).
const MaxChunk = 2 << 20

// Op is a request's operation (the netquic frame's code).
type Op uint8

// Operations.
const (
	OpRead        Op = 1
	OpWrite       Op = 2
	OpFlush       Op = 3
	OpDiscard     Op = 4
	OpWriteZeroes Op = 5
	// OpFence raises the node's epoch of Header.Volume to Header.Epoch; it
	// fails with StatusStaleEpoch if the node already knows a higher one.
	OpFence Op = 6
	// OpHello asks the node who it is: the OK reply's payload is its node
	// ID. A client checks it before trusting an address it did not get
	// from the node's certificate (the node's unix socket).
	OpHello Op = 7
	// OpClone copies the head of chunk (Volume, Index) to the chunk
	// (Volume, Index, Snap), Snap > 0, unless that one exists; an absent
	// head gives a copy that reads as zeros. The copy is durable (as FUA)
	// when the reply is OK. It is fenced like a write; Off and Len are
	// zero.
	OpClone Op = 8
	// OpSnaps lists the snapshot copies of chunk (Volume, Index): the OK
	// reply's payload holds their snapshot numbers, ascending, as
	// little-endian uint64s (at most MaxSnapsListed). Off and Len are zero.
	OpSnaps Op = 9
)

// MaxSnapsListed is the most snapshot copies of one chunk an OpSnaps reply
// lists (one 4 KiB block of numbers).
const MaxSnapsListed = BlockSize / 8

// String names the op.
func (o Op) String() string {
	switch o {
	case OpRead:
		return "read"
	case OpWrite:
		return "write"
	case OpFlush:
		return "flush"
	case OpDiscard:
		return "discard"
	case OpWriteZeroes:
		return "write-zeroes"
	case OpFence:
		return "fence"
	case OpHello:
		return "hello"
	case OpClone:
		return "clone"
	case OpSnaps:
		return "snaps"
	}
	return fmt.Sprintf("op(%d)", uint8(o))
}

// Valid reports whether o is a known op.
func (o Op) Valid() bool { return o >= OpRead && o <= OpSnaps }

// Status is a response's status (the netquic frame's code).
type Status uint8

// Statuses.
const (
	StatusOK         Status = 0
	StatusRange      Status = 1 // outside the chunk, not block aligned, or payload length wrong
	StatusNoSpace    Status = 2 // the node's store is full
	StatusChecksum   Status = 3 // a block failed its CRC on the node
	StatusStaleEpoch Status = 4 // the writer's epoch is older than the node's
	StatusIO         Status = 5 // any other error of the node
	StatusBadRequest Status = 6 // unknown op or malformed header
	StatusNewer      Status = 7 // a copy older than the chunk's version was refused
)

// String names the status.
func (s Status) String() string {
	switch s {
	case StatusOK:
		return "ok"
	case StatusRange:
		return "range"
	case StatusNoSpace:
		return "no-space"
	case StatusChecksum:
		return "checksum"
	case StatusStaleEpoch:
		return "stale-epoch"
	case StatusIO:
		return "io"
	case StatusBadRequest:
		return "bad-request"
	case StatusNewer:
		return "newer"
	}
	return fmt.Sprintf("status(%d)", uint8(s))
}

// Header flags.
const (
	FlagFUA     uint8 = 1 << 0
	FlagNoUnmap uint8 = 1 << 1
	// FlagCopy marks a write or write-zeroes of a whole chunk by a rebuild:
	// the node sets the chunk's version to exactly the header's, and
	// refuses (StatusNewer) if it holds a newer one.
	FlagCopy uint8 = 1 << 2
	// FlagAsOf marks a read of the volume as of snapshot Snap (> 0): the
	// node reads the chunk's snapshot copy with the smallest number at or
	// above Snap, else its head. Such a read carries no epoch and is not
	// fenced: what it reads never changes.
	FlagAsOf uint8 = 1 << 3
	// FlagIfAbsent makes a write change nothing (and succeed) if the node
	// holds the chunk already: a clone's copy of its parent's chunk.
	FlagIfAbsent uint8 = 1 << 4
	// FlagIfHead makes an OpClone of a chunk with no head make no copy
	// (and answer with ReplyAbsent): the clone before a discard or
	// write-zeroes, which leave an absent chunk absent.
	FlagIfHead uint8 = 1 << 5
	flagsKnown       = FlagFUA | FlagNoUnmap | FlagCopy | FlagAsOf | FlagIfAbsent | FlagIfHead
)

// ReplyAbsent, in the flags of an OK read response, says that the node
// holds no slot for the chunk it read (a clone reads its parent there); in
// that of an OpClone with FlagIfHead, that it made no copy (no head).
const (
	ReplyAbsent uint8 = 1 << 0
)

// Header is the decoded caller header of a request or response.
type Header struct {
	Volume uint64
	Index  uint64
	Epoch  uint64
	// Off and Len are byte counts, multiples of BlockSize.
	Off, Len uint32
	Flags    uint8
	Snap     uint32 // 24 bits
	// VerEpoch and VerSeq are the chunk version (see the layout above).
	VerEpoch, VerSeq uint64
}

// ErrMalformed is wrapped by every Decode error.
var ErrMalformed = errors.New("wire: malformed chunk header")

// Encode writes h into b. Off and Len must be multiples of BlockSize with
// Off+Len <= MaxChunk, and Snap below 1<<24; Encode does not check (the
// client builds them from a validated request).
func (h *Header) Encode(b *[HeaderSize]byte) {
	binary.LittleEndian.PutUint64(b[0:8], h.Volume)
	binary.LittleEndian.PutUint64(b[8:16], h.Index)
	binary.LittleEndian.PutUint64(b[16:24], h.Epoch)
	binary.LittleEndian.PutUint16(b[24:26], uint16(h.Off/BlockSize))
	binary.LittleEndian.PutUint16(b[26:28], uint16(h.Len/BlockSize))
	b[28] = h.Flags
	b[29] = byte(h.Snap)
	b[30] = byte(h.Snap >> 8)
	b[31] = byte(h.Snap >> 16)
	binary.LittleEndian.PutUint64(b[32:40], h.VerEpoch)
	binary.LittleEndian.PutUint64(b[40:48], h.VerSeq)
}

// Decode reads b into h and checks it for op: known flags, and for the ops
// that address data (read, write, discard, write-zeroes) a non-empty range
// that fits in MaxChunk. It never panics.
func Decode(op Op, b *[HeaderSize]byte, h *Header) error {
	h.Volume = binary.LittleEndian.Uint64(b[0:8])
	h.Index = binary.LittleEndian.Uint64(b[8:16])
	h.Epoch = binary.LittleEndian.Uint64(b[16:24])
	offB := uint32(binary.LittleEndian.Uint16(b[24:26]))
	lenB := uint32(binary.LittleEndian.Uint16(b[26:28]))
	h.Off, h.Len = offB*BlockSize, lenB*BlockSize
	h.Flags = b[28]
	h.Snap = uint32(b[29]) | uint32(b[30])<<8 | uint32(b[31])<<16
	h.VerEpoch = binary.LittleEndian.Uint64(b[32:40])
	h.VerSeq = binary.LittleEndian.Uint64(b[40:48])
	if !op.Valid() {
		return fmt.Errorf("%w: unknown op %d", ErrMalformed, uint8(op))
	}
	if h.Flags&^flagsKnown != 0 {
		return fmt.Errorf("%w: unknown flags %#x", ErrMalformed, h.Flags)
	}
	if h.Flags&FlagCopy != 0 && op != OpWrite && op != OpWriteZeroes {
		return fmt.Errorf("%w: copy flag on a %v", ErrMalformed, op)
	}
	if h.Flags&FlagAsOf != 0 && (op != OpRead || h.Snap == 0) {
		return fmt.Errorf("%w: as-of flag on a %v of snapshot %d", ErrMalformed, op, h.Snap)
	}
	if h.Flags&FlagIfAbsent != 0 && op != OpWrite {
		return fmt.Errorf("%w: if-absent flag on a %v", ErrMalformed, op)
	}
	if h.Flags&FlagIfHead != 0 && op != OpClone {
		return fmt.Errorf("%w: if-head flag on a %v", ErrMalformed, op)
	}
	if op == OpClone && h.Snap == 0 {
		return fmt.Errorf("%w: clone to snapshot 0", ErrMalformed)
	}
	if (op == OpWrite || op == OpWriteZeroes) && h.Snap != 0 && h.Flags&FlagCopy == 0 {
		return fmt.Errorf("%w: %v of snapshot copy %d without the copy flag (snapshot copies change only by a copy)", ErrMalformed, op, h.Snap)
	}
	switch op {
	case OpRead, OpWrite, OpDiscard, OpWriteZeroes:
		if lenB == 0 {
			return fmt.Errorf("%w: %v of zero length", ErrMalformed, op)
		}
		if offB+lenB > MaxChunk/BlockSize {
			return fmt.Errorf("%w: %v of %d blocks at block %d crosses the largest chunk", ErrMalformed, op, lenB, offB)
		}
	}
	return nil
}

// CheckPayload checks that a request of op with header h carries an n-byte
// payload as the protocol requires: exactly h.Len bytes for a write, none
// for every other op.
func CheckPayload(op Op, h *Header, n int) error {
	want := 0
	if op == OpWrite {
		want = int(h.Len)
	}
	if n != want {
		return fmt.Errorf("%w: %v with a %d-byte payload, want %d", ErrMalformed, op, n, want)
	}
	return nil
}

// FenceEpoch is the fence epoch requests carry: attach epoch attach (below
// 1<<32) above generation gen. Fence epochs of a later attach are above
// every fence epoch of an earlier one.
func FenceEpoch(attach uint64, gen uint32) uint64 { return attach<<32 | uint64(gen) }

// AttachEpoch is the attach epoch part of fence epoch e.
func AttachEpoch(e uint64) uint64 { return e >> 32 }

// SetEpoch overwrites the epoch field of an encoded header.
func SetEpoch(b *[HeaderSize]byte, e uint64) { binary.LittleEndian.PutUint64(b[16:24], e) }

// Version returns the chunk version carried by an encoded header.
func Version(b *[HeaderSize]byte) (epoch, seq uint64) {
	return binary.LittleEndian.Uint64(b[32:40]), binary.LittleEndian.Uint64(b[40:48])
}

// SetVersion overwrites the chunk version of an encoded header.
func SetVersion(b *[HeaderSize]byte, epoch, seq uint64) {
	binary.LittleEndian.PutUint64(b[32:40], epoch)
	binary.LittleEndian.PutUint64(b[40:48], seq)
}

// ReplySnap returns the snapshot field of an encoded header (the chunk an
// as-of read read).
func ReplySnap(b *[HeaderSize]byte) uint32 {
	return uint32(b[29]) | uint32(b[30])<<8 | uint32(b[31])<<16
}

// ReplyFlags returns the flags of an encoded response header.
func ReplyFlags(b *[HeaderSize]byte) uint8 { return b[28] }

// SetReplyFlags overwrites the flags of an encoded header.
func SetReplyFlags(b *[HeaderSize]byte, f uint8) { b[28] = f }

// SetReplySnap overwrites the snapshot field of an encoded header.
func SetReplySnap(b *[HeaderSize]byte, s uint32) {
	b[29], b[30], b[31] = byte(s), byte(s>>8), byte(s>>16)
}

// Incarnation returns the node incarnation carried by an OK response header
// (0 if the node sent none).
func Incarnation(b *[HeaderSize]byte) uint64 { return binary.LittleEndian.Uint64(b[16:24]) }
