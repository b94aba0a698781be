package ring

// Binary form of a Ring (all integers little endian):
//
//	magic         [4]byte "TRG1"
//	version       uint64   Options.Version
//	unit          uint64   Options.Unit (resolved)
//	vnodesPerUnit uint32   Options.VNodesPerUnit (resolved)
//	count         uint32   number of nodes
//	count times, in ID order:
//	  id, zone, host   uvarint length + bytes each
//	  capacity         uint64
//	crc           uint32   CRC-32C of everything before it
//
// Only the inputs of New are stored; the vnodes are rebuilt on decoding, so
// the encoding is canonical: equal rings encode to equal bytes.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
)

const codecMagic = "TRG1"

// Smallest encodings: header + crc, and one node (3 one-byte lengths, no
// names, capacity).
const (
	codecHeaderLen  = 4 + 8 + 8 + 4 + 4
	codecMinNodeLen = 3 + 8
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// ErrCorrupt is wrapped by UnmarshalBinary errors about malformed input.
var ErrCorrupt = errors.New("ring: corrupt encoding")

// MarshalBinary encodes the ring's nodes and options (with Version); it
// implements encoding.BinaryMarshaler and never fails.
func (r *Ring) MarshalBinary() ([]byte, error) {
	return r.AppendBinary(nil)
}

// AppendBinary appends the encoding of MarshalBinary to b; it implements
// encoding.BinaryAppender.
func (r *Ring) AppendBinary(b []byte) ([]byte, error) {
	start := len(b)
	b = append(b, codecMagic...)
	b = binary.LittleEndian.AppendUint64(b, r.opt.Version)
	b = binary.LittleEndian.AppendUint64(b, r.opt.Unit)
	b = binary.LittleEndian.AppendUint32(b, r.opt.VNodesPerUnit)
	b = binary.LittleEndian.AppendUint32(b, uint32(len(r.nodes)))
	for _, n := range r.nodes {
		for _, s := range [...]string{n.ID, n.Zone, n.Host} {
			b = binary.AppendUvarint(b, uint64(len(s)))
			b = append(b, s...)
		}
		b = binary.LittleEndian.AppendUint64(b, n.Capacity)
	}
	return binary.LittleEndian.AppendUint32(b, crc32.Checksum(b[start:], castagnoli)), nil
}

// UnmarshalBinary replaces r with the ring encoded in data, rebuilt with New
// (so every validation of New applies). It implements
// encoding.BinaryUnmarshaler; use it only on a Ring nobody else uses yet
// (typically new(Ring)), since Rings are otherwise immutable.
func (r *Ring) UnmarshalBinary(data []byte) error {
	if len(data) < codecHeaderLen+4 {
		return fmt.Errorf("%w: %d bytes, too short", ErrCorrupt, len(data))
	}
	body, sum := data[:len(data)-4], binary.LittleEndian.Uint32(data[len(data)-4:])
	if string(body[:4]) != codecMagic {
		return fmt.Errorf("%w: bad magic %q", ErrCorrupt, body[:4])
	}
	if got := crc32.Checksum(body, castagnoli); got != sum {
		return fmt.Errorf("%w: checksum %#x, want %#x", ErrCorrupt, got, sum)
	}
	var opt Options
	opt.Version = binary.LittleEndian.Uint64(body[4:])
	opt.Unit = binary.LittleEndian.Uint64(body[12:])
	opt.VNodesPerUnit = binary.LittleEndian.Uint32(body[20:])
	count := binary.LittleEndian.Uint32(body[24:])
	p := body[codecHeaderLen:]
	if uint64(count) > MaxNodes || uint64(count)*codecMinNodeLen > uint64(len(p)) {
		return fmt.Errorf("%w: %d nodes in %d bytes", ErrCorrupt, count, len(p))
	}
	nodes := make([]Node, count)
	for i := range nodes {
		var s [3]string
		for j := range s {
			l, k := binary.Uvarint(p)
			if k <= 0 || l > MaxNameLen || l > uint64(len(p)-k) {
				return fmt.Errorf("%w: node %d: bad name length", ErrCorrupt, i)
			}
			s[j] = string(p[k : k+int(l)])
			p = p[k+int(l):]
		}
		if len(p) < 8 {
			return fmt.Errorf("%w: node %d: truncated", ErrCorrupt, i)
		}
		nodes[i] = Node{ID: s[0], Zone: s[1], Host: s[2], Capacity: binary.LittleEndian.Uint64(p)}
		p = p[8:]
	}
	if len(p) != 0 {
		return fmt.Errorf("%w: %d trailing bytes", ErrCorrupt, len(p))
	}
	nr, err := New(nodes, opt)
	if err != nil {
		return fmt.Errorf("ring: decode: %w", err)
	}
	*r = *nr
	return nil
}
