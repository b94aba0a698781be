// Package engine is the Volume seam: what a frontend (the NBD server, the ublk
// server) needs of a block device, whatever serves it (package store for a
// local volume, package cluster for a replicated one).
//
// A Volume is the block device that frontends (the NBD server, the ublk server)
// serve. It is asynchronous: a frontend fills a Request and calls Submit; the
// volume calls the request's Completer exactly once when the request is done.
// Requests are owned by the frontend and reused from one I/O to the next, so
// the data path allocates nothing per I/O.
//
// Invariants every Volume keeps:
//   - Complete is called exactly once per Submit, possibly before Submit returns
//     and possibly on another goroutine. Completers must not block.
//   - A write (or discard or write-zeroes) that completed before a Flush was
//     submitted is durable when that Flush completes without error; a write with
//     FlagFUA is durable when it completes.
//   - A read never returns data whose checksum does not verify: it fails with
//     ErrChecksum instead.
//   - Offset and Length are multiples of BlockSize and lie inside [0, Size);
//     anything else fails with ErrRange and changes nothing.
package engine

import (
	"errors"
	"syscall"
)

// BlockSize is the block size of every volume: the unit of addressing,
// alignment, checksums and direct I/O, in bytes.
const BlockSize = 4096

// Op is the kind of a Request.
type Op uint8

// Request kinds.
const (
	OpRead Op = iota + 1
	OpWrite
	OpFlush
	OpDiscard
	OpWriteZeroes
)

// String returns the lower-case name of the operation.
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
	}
	return "op?"
}

// Flags modify a Request.
type Flags uint8

// Request flags.
const (
	// FlagFUA makes a write, discard or write-zeroes durable before it completes.
	FlagFUA Flags = 1 << iota
	// FlagNoUnmap asks write-zeroes to keep the space allocated (NBD_CMD_FLAG_NO_HOLE).
	FlagNoUnmap
	// FlagCopy marks a store write or write-zeroes (store.ChunkOp) of a whole
	// chunk copied from another replica: the chunk takes exactly
	// store.ChunkOp.Ver as its version, and the op fails with ErrNewer if the
	// chunk's version is newer. Volumes ignore it in a Request.
	FlagCopy
)

// Completer is told when a Request is done. err is nil on success.
type Completer interface {
	Complete(r *Request, err error)
}

// Request is one I/O against a Volume. The submitter owns it; the volume may use
// it only between Submit and the call to Done.Complete.
type Request struct {
	Op    Op
	Flags Flags
	// Offset is the byte offset in the volume.
	Offset int64
	// Length is the byte count; for OpRead and OpWrite it equals len(Buf).
	Length int64
	// Buf is the destination of a read or the source of a write. Frontends pass
	// memory outside the Go heap, aligned to 4096 bytes (see internal/alignbuf),
	// so a store may hand it straight to the kernel.
	Buf []byte
	// Done is called exactly once when the request completes.
	Done Completer
	// Tag is the submitter's cookie; volumes leave it alone.
	Tag uint64
}

// Volume is a block device served by a frontend.
type Volume interface {
	// Size is the volume size in bytes, a multiple of BlockSize.
	Size() int64
	// BlockSize is the logical block size in bytes (4096).
	BlockSize() int
	// Submit starts r. It may block briefly for back-pressure but never waits
	// for the I/O itself.
	Submit(r *Request)
	// Close waits for in-flight requests, makes completed writes durable and
	// releases the volume.
	Close() error
}

// Errors reported through Completer. Frontends map them to protocol errors
// with Errno.
var (
	ErrRange    = errors.New("engine: request outside the volume or not block aligned")
	ErrChecksum = errors.New("engine: checksum mismatch")
	ErrNoSpace  = errors.New("engine: out of space")
	ErrClosed   = errors.New("engine: volume closed")
	ErrReadOnly = errors.New("engine: volume is read-only")
	// ErrFenced is reported for a write a storage node refused because a
	// newer writer attached the volume (its attach epoch is higher), and
	// for every later request to a replicated volume that learnt so.
	ErrFenced = errors.New("engine: writer fenced: the volume was attached again by a newer holder; stop writing and re-attach")
	// ErrNewer is the error of a copy (FlagCopy) refused because the chunk
	// holds a newer version than the copy's.
	ErrNewer = errors.New("engine: the replica holds a newer version of the chunk than the copy")
)

// Errno maps an error reported by a Volume to the errno a block frontend
// returns: EINVAL for ErrRange, ENOSPC for ErrNoSpace, EROFS for ErrReadOnly,
// ESHUTDOWN for ErrClosed, and EIO for everything else.
func Errno(err error) syscall.Errno {
	switch {
	case err == nil:
		return 0
	case errors.Is(err, ErrRange):
		return syscall.EINVAL
	case errors.Is(err, ErrNoSpace):
		return syscall.ENOSPC
	case errors.Is(err, ErrReadOnly):
		return syscall.EROFS
	case errors.Is(err, ErrClosed):
		return syscall.ESHUTDOWN
	}
	var e syscall.Errno
	if errors.As(err, &e) && (e == syscall.ENOSPC || e == syscall.EINVAL) {
		return e
	}
	return syscall.EIO
}
