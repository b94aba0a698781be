package iouring

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// SQE is a 64-byte submission queue entry, laid out exactly as the kernel's
// struct io_uring_sqe. On SetupSQE128 rings each entry is followed by 64 more
// bytes that Cmd exposes (together with Addr3 and Pad2).
//
// The Prep* methods set only the fields of their operation and expect an SQE
// fresh from Uring.SQE (fully zeroed); the caller sets UserData and Flags after.
type SQE struct {
	// Opcode is one of the Op* constants.
	Opcode uint8
	// Flags is a set of SQE* flags.
	Flags uint8
	// IOPrio is the I/O priority (ioprio_set(2) encoding).
	IOPrio uint16
	// Fd is the file descriptor, or the registered-file index with SQEFixedFile.
	Fd int32
	// Off is the file offset; also addr2, and for URING_CMD cmd_op (low 32
	// bits) plus __pad1 (high 32 bits, must be zero).
	Off uint64
	// Addr is the buffer or iovec array address; also splice_off_in.
	Addr uint64
	// Len is the buffer length or iovec count.
	Len uint32
	// OpFlags is the per-opcode flag word: rw_flags (e.g. unix.RWF_DSYNC),
	// fsync_flags, poll32_events, uring_cmd_flags, ...
	OpFlags uint32
	// UserData is returned unchanged in the CQE.
	UserData uint64
	// BufIndex is the registered-buffer index (or buffer group).
	BufIndex uint16
	// Personality is a registered credentials ID; zero for the submitter's.
	Personality uint16
	// SpliceFdIn is splice_fd_in / file_index.
	SpliceFdIn int32
	// Addr3 is the third address; the start of the URING_CMD area.
	Addr3 uint64
	// Pad2 is reserved; part of the URING_CMD area.
	Pad2 uint64
}

// Compile-time layout checks against struct io_uring_sqe.
var (
	_ [64 - unsafe.Sizeof(SQE{})]byte
	_ [unsafe.Sizeof(SQE{}) - 64]byte
	_ [16 - unsafe.Offsetof(SQE{}.Addr)]byte
	_ [unsafe.Offsetof(SQE{}.Addr) - 16]byte
	_ [32 - unsafe.Offsetof(SQE{}.UserData)]byte
	_ [unsafe.Offsetof(SQE{}.UserData) - 32]byte
	_ [48 - unsafe.Offsetof(SQE{}.Addr3)]byte
	_ [unsafe.Offsetof(SQE{}.Addr3) - 48]byte
)

func bufAddr(b []byte) uint64 {
	if len(b) == 0 {
		return 0
	}
	return uint64(uintptr(unsafe.Pointer(&b[0])))
}

func (s *SQE) prepRW(op uint8, fd int32, addr uint64, n uint32, off uint64) {
	s.Opcode = op
	s.Fd = fd
	s.Addr = addr
	s.Len = n
	s.Off = off
}

// PrepNop prepares a no-op; its CQE has Res 0.
func (s *SQE) PrepNop() { s.Opcode = OpNop }

// PrepRead prepares a pread of len(buf) bytes at off. buf must stay valid and
// unmoved until the CQE arrives (use memory outside the Go heap or pin it).
func (s *SQE) PrepRead(fd int32, buf []byte, off uint64) {
	s.prepRW(OpRead, fd, bufAddr(buf), uint32(len(buf)), off)
}

// PrepRecv prepares a recv(2) of up to len(buf) bytes from socket fd
// (flags 0); buf must not be empty.
func (s *SQE) PrepRecv(fd int32, buf []byte) {
	s.prepRW(OpRecv, fd, bufAddr(buf), uint32(len(buf)), 0)
}

// PrepWrite prepares a pwrite of buf at off. Set s.OpFlags = unix.RWF_DSYNC
// afterwards for a FUA write.
func (s *SQE) PrepWrite(fd int32, buf []byte, off uint64) {
	s.prepRW(OpWrite, fd, bufAddr(buf), uint32(len(buf)), off)
}

// PrepReadFixed prepares a read into buf, which must lie inside the buffer
// registered at bufIndex with RegisterBuffers.
func (s *SQE) PrepReadFixed(fd int32, buf []byte, off uint64, bufIndex uint16) {
	s.prepRW(OpReadFixed, fd, bufAddr(buf), uint32(len(buf)), off)
	s.BufIndex = bufIndex
}

// PrepWriteFixed prepares a write from buf, which must lie inside the buffer
// registered at bufIndex with RegisterBuffers.
func (s *SQE) PrepWriteFixed(fd int32, buf []byte, off uint64, bufIndex uint16) {
	s.prepRW(OpWriteFixed, fd, bufAddr(buf), uint32(len(buf)), off)
	s.BufIndex = bufIndex
}

func iovAddr(iov []unix.Iovec) uint64 {
	if len(iov) == 0 {
		return 0
	}
	return uint64(uintptr(unsafe.Pointer(&iov[0])))
}

// PrepReadv prepares a preadv. The iovec array and the buffers it points to
// must stay valid and unmoved until the CQE arrives.
func (s *SQE) PrepReadv(fd int32, iov []unix.Iovec, off uint64) {
	s.prepRW(OpReadv, fd, iovAddr(iov), uint32(len(iov)), off)
}

// PrepWritev prepares a pwritev. The iovec array and the buffers it points to
// must stay valid and unmoved until the CQE arrives.
func (s *SQE) PrepWritev(fd int32, iov []unix.Iovec, off uint64) {
	s.prepRW(OpWritev, fd, iovAddr(iov), uint32(len(iov)), off)
}

// PrepFsync prepares an fsync of fd, or an fdatasync with flags FsyncDatasync.
func (s *SQE) PrepFsync(fd int32, flags uint32) {
	s.Opcode = OpFsync
	s.Fd = fd
	s.OpFlags = flags
}

// PrepPollAdd prepares a one-shot poll of fd for mask (unix.POLLIN, ...);
// the CQE's Res holds the returned events.
func (s *SQE) PrepPollAdd(fd int32, mask uint32) {
	s.Opcode = OpPollAdd
	s.Fd = fd
	s.OpFlags = mask
}

// PrepURingCmd prepares a passthrough command cmdOp to fd's driver (ublk,
// NVMe, ...). cmd_op goes in the low 32 bits of Off and __pad1 (the high 32
// bits) is zero; the command payload goes in Cmd.
func (s *SQE) PrepURingCmd(fd int32, cmdOp uint32) {
	s.Opcode = OpURingCmd
	s.Fd = fd
	s.Off = uint64(cmdOp)
}

// Cmd returns the 80-byte URING_CMD payload area that starts at byte 48 of the
// SQE (over Addr3 and Pad2). It is valid only for SQEs of a SetupSQE128 ring:
// on a 64-byte ring its last 64 bytes belong to the next entry.
func (s *SQE) Cmd() *[80]byte {
	return (*[80]byte)(unsafe.Add(unsafe.Pointer(s), 48))
}
