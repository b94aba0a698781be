package netquic

// Frame format invariants (kept by this file):
//   - Every frame is a fixed FrameHeaderSize header followed by exactly
//     Length payload bytes; Length never exceeds the receiver's MaxPayload,
//     checked before any payload byte is read or any buffer is sized.
//   - Byte 0 is magic and version together (frameMagic); byte 3 is reserved
//     and zero. A frame that breaks either rule, or is cut short, ends the
//     stream it arrived on; it never panics and never reaches a handler.
//   - A response carries the id of its request and travels on the stream
//     the request came in on.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// Frame layout, little endian:
//
//	[0]      magic/version (0xA2; 0xA1 had a 32-byte caller header)
//	[1]      kind: 1 request, 2 response
//	[2]      code: the caller's op (request) or status (response)
//	[3]      reserved, zero
//	[4:12]   request id
//	[12:16]  payload length
//	[16:64]  caller-defined fixed header (chunk id, offset, epoch, ...)
//	[64:]    payload
const (
	// FrameHeaderSize is the size of the fixed frame header.
	FrameHeaderSize = 64
	// UserHeaderSize is the size of the caller-defined part of the header.
	UserHeaderSize = 48

	frameMagic = 0xA2

	kindRequest  = 1
	kindResponse = 2
)

// DefaultMaxPayload is the largest payload accepted unless configured
// otherwise: 2 MiB of data (a whole chunk of the largest size a cluster
// allows, as a rebuild copies it) plus room for a caller's trailer.
// Request buffers are not sized by it (see largeBuf); a connection served
// on a ring keeps a receive buffer of twice it.
const DefaultMaxPayload = 2<<20 + 4096

// Message is one request or response as the caller sees it.
type Message struct {
	// Code is the operation of a request or the status of a response; the
	// transport does not interpret it.
	Code uint8
	// Header is a fixed caller-defined header (chunk id, offset, length,
	// epoch, ...), carried verbatim.
	Header [UserHeaderSize]byte
	// Payload is the data. For a response passed to Client.Call, the caller
	// provides the buffer (its capacity is the most it accepts) and Call
	// sets its length.
	Payload []byte
}

// ErrMalformed is wrapped by every error about a frame that breaks the
// format; the stream that carried it is closed.
var ErrMalformed = errors.New("netquic: malformed frame")

// frameHeader is a decoded frame header.
type frameHeader struct {
	kind   uint8
	code   uint8
	id     uint64
	length uint32
	user   [UserHeaderSize]byte
}

// putHeader encodes h into b[:FrameHeaderSize].
func putHeader(b []byte, h *frameHeader) {
	_ = b[FrameHeaderSize-1]
	b[0] = frameMagic
	b[1] = h.kind
	b[2] = h.code
	b[3] = 0
	binary.LittleEndian.PutUint64(b[4:12], h.id)
	binary.LittleEndian.PutUint32(b[12:16], h.length)
	copy(b[16:FrameHeaderSize], h.user[:])
}

// parseHeader decodes b[:FrameHeaderSize], rejecting a bad magic, an unknown
// kind other than want, a nonzero reserved byte or a length over max.
func parseHeader(b []byte, want uint8, max uint32, h *frameHeader) error {
	if len(b) < FrameHeaderSize {
		return fmt.Errorf("%w: header of %d bytes", ErrMalformed, len(b))
	}
	if b[0] != frameMagic {
		return fmt.Errorf("%w: bad magic/version %#x", ErrMalformed, b[0])
	}
	if b[1] != want {
		return fmt.Errorf("%w: kind %d, want %d", ErrMalformed, b[1], want)
	}
	if b[3] != 0 {
		return fmt.Errorf("%w: reserved byte %#x", ErrMalformed, b[3])
	}
	h.kind = b[1]
	h.code = b[2]
	h.id = binary.LittleEndian.Uint64(b[4:12])
	h.length = binary.LittleEndian.Uint32(b[12:16])
	if h.length > max {
		return fmt.Errorf("%w: payload length %d over limit %d", ErrMalformed, h.length, max)
	}
	copy(h.user[:], b[16:FrameHeaderSize])
	return nil
}

// readHeader reads and decodes one header from r into h, using buf (at
// least FrameHeaderSize bytes) as scratch. A stream that ends cleanly between
// frames yields io.EOF; one that ends inside a header yields ErrMalformed.
func readHeader(r io.Reader, buf []byte, want uint8, max uint32, h *frameHeader) error {
	n, err := io.ReadFull(r, buf[:FrameHeaderSize])
	if err != nil {
		if err == io.EOF && n == 0 {
			return io.EOF
		}
		if err == io.ErrUnexpectedEOF {
			return fmt.Errorf("%w: truncated header (%d bytes)", ErrMalformed, n)
		}
		return err
	}
	return parseHeader(buf, want, max, h)
}

// readPayload reads exactly len(p) payload bytes; a stream that ends early
// yields ErrMalformed.
func readPayload(r io.Reader, p []byte) error {
	n, err := io.ReadFull(r, p)
	if err == io.EOF || err == io.ErrUnexpectedEOF {
		return fmt.Errorf("%w: truncated payload (%d of %d bytes)", ErrMalformed, n, len(p))
	}
	return err
}
