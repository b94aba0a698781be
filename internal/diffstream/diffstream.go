// Package diffstream is the file format of torusblk export-diff and
// import-diff: the extents of a volume that differ between two snapshots
// (or all of one), each data or zeros, with checksums.
//
// Layout, little endian:
//
//	header:  magic "TORUSDF1" (8), volume size u64 (8), block size u32 (4),
//	         from-name length u16 (2), to-name length u16 (2), from name,
//	         to name, CRC32C of everything before it u32 (4)
//	record:  kind u8 (1: data, 2: zeros, 3: end), offset u64, length u64,
//	         then for data length bytes, then CRC32C u32 of the record's
//	         kind, offset, length and data
//	end:     kind 3, offset 0, length = the number of records before it,
//	         CRC32C
//
// Invariants (kept by Reader): every extent lies inside the volume size,
// offsets and lengths are multiples of the block size, extents ascend
// without overlap, data extents are at most MaxExtent bytes, every CRC
// matches, and the stream ends with an end record counting the records
// before it, after which nothing follows. A Reader never panics and never
// allocates more than MaxExtent for a record, whatever the bytes (FuzzReader).
package diffstream

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

func checksum(b []byte) uint32         { return crc32.Checksum(b, castagnoli) }
func update(c uint32, b []byte) uint32 { return crc32.Update(c, castagnoli, b) }

// Magic starts every stream.
const Magic = "TORUSDF1"

// MaxExtent is the largest data extent (a writer splits longer ones).
const MaxExtent = 4 << 20

// MaxName bounds the snapshot names in the header.
const MaxName = 1024

// Record kinds.
const (
	KindData  = 1
	KindZeros = 2
	KindEnd   = 3
)

// ErrFormat is wrapped by every error about the stream's bytes.
var ErrFormat = errors.New("diffstream: malformed diff")

// Header describes a diff.
type Header struct {
	// Size is the volume's size as of To.
	Size uint64
	// BlockSize is the unit of offsets and lengths (4096).
	BlockSize uint32
	// From is the older snapshot's name ("": none, the diff has every
	// block); To the newer one's.
	From, To string
}

// Writer writes a diff.
type Writer struct {
	w       *bufio.Writer
	h       Header
	records uint64
	next    uint64 // the lowest offset the next extent may start at
	buf     [17]byte
}

// NewWriter writes h to w and returns a Writer for the extents.
func NewWriter(w io.Writer, h Header) (*Writer, error) {
	if len(h.From) > MaxName || len(h.To) > MaxName || h.BlockSize == 0 {
		return nil, fmt.Errorf("diffstream: header %+v: names up to %d bytes and a block size", h, MaxName)
	}
	b := make([]byte, 0, 24+len(h.From)+len(h.To)+4)
	b = append(b, Magic...)
	b = binary.LittleEndian.AppendUint64(b, h.Size)
	b = binary.LittleEndian.AppendUint32(b, h.BlockSize)
	b = binary.LittleEndian.AppendUint16(b, uint16(len(h.From)))
	b = binary.LittleEndian.AppendUint16(b, uint16(len(h.To)))
	b = append(b, h.From...)
	b = append(b, h.To...)
	b = binary.LittleEndian.AppendUint32(b, checksum(b))
	bw := bufio.NewWriterSize(w, 1<<20)
	if _, err := bw.Write(b); err != nil {
		return nil, fmt.Errorf("diffstream: write header: %w", err)
	}
	return &Writer{w: bw, h: h}, nil
}

// Data writes a data extent at off (data: its bytes, a multiple of the
// block size, split in MaxExtent pieces).
func (w *Writer) Data(off uint64, data []byte) error {
	for len(data) > 0 {
		n := min(len(data), MaxExtent)
		if err := w.record(KindData, off, uint64(n), data[:n]); err != nil {
			return err
		}
		off += uint64(n)
		data = data[n:]
	}
	return nil
}

// Zeros writes an extent of length zero bytes at off.
func (w *Writer) Zeros(off, length uint64) error { return w.record(KindZeros, off, length, nil) }

func (w *Writer) record(kind byte, off, length uint64, data []byte) error {
	bs := uint64(w.h.BlockSize)
	if off < w.next || off%bs != 0 || length == 0 || length%bs != 0 || off+length > w.h.Size || off+length < off {
		return fmt.Errorf("diffstream: extent [%d, +%d) out of order, unaligned or past the volume's %d bytes", off, length, w.h.Size)
	}
	w.next = off + length
	w.records++
	return w.put(kind, off, length, data)
}

func (w *Writer) put(kind byte, off, length uint64, data []byte) error {
	w.buf[0] = kind
	binary.LittleEndian.PutUint64(w.buf[1:], off)
	binary.LittleEndian.PutUint64(w.buf[9:], length)
	crc := update(checksum(w.buf[:]), data)
	w.w.Write(w.buf[:])
	w.w.Write(data)
	var c [4]byte
	binary.LittleEndian.PutUint32(c[:], crc)
	if _, err := w.w.Write(c[:]); err != nil {
		return fmt.Errorf("diffstream: write: %w", err)
	}
	return nil
}

// Close writes the end record and flushes (it does not close the
// underlying writer).
func (w *Writer) Close() error {
	if err := w.put(KindEnd, 0, w.records, nil); err != nil {
		return err
	}
	if err := w.w.Flush(); err != nil {
		return fmt.Errorf("diffstream: write: %w", err)
	}
	return nil
}

// Record is one extent read from a diff.
type Record struct {
	Kind        byte
	Offset, Len uint64
	Data        []byte // KindData: the extent's bytes, valid until the next Next
}

// Reader reads a diff.
type Reader struct {
	r       *bufio.Reader
	h       Header
	records uint64
	next    uint64
	done    bool
	buf     []byte
}

// NewReader reads and checks the header of the diff in r.
func NewReader(r io.Reader) (*Reader, error) {
	br := bufio.NewReaderSize(r, 64<<10)
	fixed := make([]byte, 24)
	if _, err := io.ReadFull(br, fixed); err != nil {
		return nil, fmt.Errorf("%w: header: %v", ErrFormat, err)
	}
	if string(fixed[:8]) != Magic {
		return nil, fmt.Errorf("%w: not a Torus diff (magic %q)", ErrFormat, fixed[:8])
	}
	h := Header{Size: binary.LittleEndian.Uint64(fixed[8:]), BlockSize: binary.LittleEndian.Uint32(fixed[16:])}
	fl, tl := int(binary.LittleEndian.Uint16(fixed[20:])), int(binary.LittleEndian.Uint16(fixed[22:]))
	if fl > MaxName || tl > MaxName {
		return nil, fmt.Errorf("%w: snapshot names of %d and %d bytes", ErrFormat, fl, tl)
	}
	if h.BlockSize != 4096 {
		return nil, fmt.Errorf("%w: block size %d, want 4096", ErrFormat, h.BlockSize)
	}
	rest := make([]byte, fl+tl+4)
	if _, err := io.ReadFull(br, rest); err != nil {
		return nil, fmt.Errorf("%w: header: %v", ErrFormat, err)
	}
	crc := update(checksum(fixed), rest[:fl+tl])
	if crc != binary.LittleEndian.Uint32(rest[fl+tl:]) {
		return nil, fmt.Errorf("%w: header checksum mismatch", ErrFormat)
	}
	h.From, h.To = string(rest[:fl]), string(rest[fl:fl+tl])
	return &Reader{r: br, h: h}, nil
}

// Header returns the diff's header.
func (r *Reader) Header() Header { return r.h }

// Next returns the next extent, or io.EOF after the end record (checked:
// its count matches and nothing follows it).
func (r *Reader) Next() (Record, error) {
	if r.done {
		return Record{}, io.EOF
	}
	var hb [17]byte
	if _, err := io.ReadFull(r.r, hb[:]); err != nil {
		return Record{}, fmt.Errorf("%w: record %d: %v (truncated?)", ErrFormat, r.records, err)
	}
	rec := Record{Kind: hb[0], Offset: binary.LittleEndian.Uint64(hb[1:]), Len: binary.LittleEndian.Uint64(hb[9:])}
	bs := uint64(r.h.BlockSize)
	switch rec.Kind {
	case KindEnd:
	case KindData, KindZeros:
		if rec.Offset < r.next || rec.Offset%bs != 0 || rec.Len == 0 || rec.Len%bs != 0 ||
			rec.Offset+rec.Len < rec.Offset || rec.Offset+rec.Len > r.h.Size {
			return Record{}, fmt.Errorf("%w: record %d: extent [%d, +%d) out of order, unaligned or past the volume's %d bytes",
				ErrFormat, r.records, rec.Offset, rec.Len, r.h.Size)
		}
		if rec.Kind == KindData && rec.Len > MaxExtent {
			return Record{}, fmt.Errorf("%w: record %d: data extent of %d bytes (at most %d)", ErrFormat, r.records, rec.Len, MaxExtent)
		}
	default:
		return Record{}, fmt.Errorf("%w: record %d: unknown kind %d", ErrFormat, r.records, rec.Kind)
	}
	crc := checksum(hb[:])
	if rec.Kind == KindData {
		if cap(r.buf) < int(rec.Len) {
			r.buf = make([]byte, rec.Len)
		}
		rec.Data = r.buf[:rec.Len]
		if _, err := io.ReadFull(r.r, rec.Data); err != nil {
			return Record{}, fmt.Errorf("%w: record %d: data: %v (truncated?)", ErrFormat, r.records, err)
		}
		crc = update(crc, rec.Data)
	}
	var cb [4]byte
	if _, err := io.ReadFull(r.r, cb[:]); err != nil {
		return Record{}, fmt.Errorf("%w: record %d: checksum: %v (truncated?)", ErrFormat, r.records, err)
	}
	if binary.LittleEndian.Uint32(cb[:]) != crc {
		return Record{}, fmt.Errorf("%w: record %d (offset %d): checksum mismatch", ErrFormat, r.records, rec.Offset)
	}
	if rec.Kind == KindEnd {
		if rec.Offset != 0 || rec.Len != r.records {
			return Record{}, fmt.Errorf("%w: end record counts %d records, read %d", ErrFormat, rec.Len, r.records)
		}
		if _, err := r.r.ReadByte(); err != io.EOF {
			return Record{}, fmt.Errorf("%w: bytes after the end record", ErrFormat)
		}
		r.done = true
		return Record{}, io.EOF
	}
	r.records++
	r.next = rec.Offset + rec.Len
	return rec, nil
}
