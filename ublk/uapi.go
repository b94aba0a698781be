package ublk

// The kernel ABI of ublk_drv (include/uapi/linux/ublk_cmd.h), transcribed by
// hand: struct layouts are checked at compile time and in uapi_test.go.
//
// Invariants:
//   - Every struct here has exactly the size and field offsets of its C
//     counterpart on 64-bit little-endian Linux.
//   - Control opcodes are built with ioctlOp (the _IOWR/_IOR encoding) from
//     the legacy command numbers; legacyOp returns the bare number.

import "unsafe"

// Control command numbers (UBLK_CMD_*, the legacy encoding and the ioctl nr).
const (
	cmdGetQueueAffinity  = 0x01
	cmdGetDevInfo        = 0x02
	cmdAddDev            = 0x04
	cmdDelDev            = 0x05
	cmdStartDev          = 0x06
	cmdStopDev           = 0x07
	cmdSetParams         = 0x08
	cmdGetParams         = 0x09
	cmdStartUserRecovery = 0x10
	cmdEndUserRecovery   = 0x11
	cmdGetDevInfo2       = 0x12
	cmdGetFeatures       = 0x13 // ioctl-encoded only
	cmdUpdateSize        = 0x15 // ioctl-encoded only (UBLK_U_CMD_UPDATE_SIZE, 6.16+)
)

// I/O command numbers (UBLK_IO_*).
const (
	ioFetchReq          = 0x20
	ioCommitAndFetchReq = 0x21
)

// ioctl direction bits.
const (
	iocWrite = 1
	iocRead  = 2
)

// ioctlOp is _IOC(dir, 'u', nr, size).
func ioctlOp(dir, nr, size uint32) uint32 {
	return dir<<30 | size<<16 | uint32('u')<<8 | nr
}

// ctrlOp returns the opcode of control command nr in the ioctl encoding
// (_IOWR or _IOR as the header defines it) or, with legacy, the bare number.
func ctrlOp(nr uint32, legacy bool) uint32 {
	if legacy {
		return nr
	}
	dir := uint32(iocRead | iocWrite)
	switch nr {
	case cmdGetQueueAffinity, cmdGetDevInfo, cmdGetParams, cmdGetDevInfo2, cmdGetFeatures:
		dir = iocRead
	}
	return ioctlOp(dir, nr, uint32(unsafe.Sizeof(ctrlCmd{})))
}

// ioOp returns the opcode of I/O command nr (_IOWR with struct ublksrv_io_cmd)
// or, with legacy, the bare number.
func ioOp(nr uint32, legacy bool) uint32 {
	if legacy {
		return nr
	}
	return ioctlOp(iocRead|iocWrite, nr, uint32(unsafe.Sizeof(ioCmd{})))
}

// Feature flags (UBLK_F_*), as GET_FEATURES reports them and ADD_DEV takes them.
const (
	FeatureSupportZeroCopy     uint64 = 1 << 0
	FeatureURingCmdCompInTask  uint64 = 1 << 1
	FeatureNeedGetData         uint64 = 1 << 2
	FeatureUserRecovery        uint64 = 1 << 3
	FeatureUserRecoveryReissue uint64 = 1 << 4
	FeatureUnprivilegedDev     uint64 = 1 << 5
	FeatureCmdIoctlEncode      uint64 = 1 << 6
	FeatureUserCopy            uint64 = 1 << 7
	FeatureZoned               uint64 = 1 << 8
	FeatureUserRecoveryFailIO  uint64 = 1 << 9
	FeatureUpdateSize          uint64 = 1 << 10
	FeatureAutoBufReg          uint64 = 1 << 11
	FeatureQuiesce             uint64 = 1 << 12
	FeaturePerIODaemon         uint64 = 1 << 13
)

// Device states (UBLK_S_DEV_*).
const (
	stateDead     = 0
	stateLive     = 1
	stateQuiesced = 2
	stateFailIO   = 3
)

// I/O operations in ioDesc.opFlags bits 0-7 (UBLK_IO_OP_*).
const (
	opRead        = 0
	opWrite       = 1
	opFlush       = 2
	opDiscard     = 3
	opWriteSame   = 4
	opWriteZeroes = 5
)

// I/O flags in ioDesc.opFlags (UBLK_IO_F_*).
const (
	ioFlagFUA     = 1 << 13
	ioFlagNoUnmap = 1 << 15
)

// Result of a FETCH/COMMIT_AND_FETCH CQE.
const (
	ioResOK          = 0
	ioResNeedGetData = 1
	// ioResAbort is -ENODEV: the device is going away, do not fetch again.
	ioResAbort = -19
)

// maxQueueDepth is UBLK_MAX_QUEUE_DEPTH; the descriptor area of every queue
// is sized for it, whatever the configured depth.
const maxQueueDepth = 4096

// Parameter types (UBLK_PARAM_TYPE_*).
const (
	paramTypeBasic   = 1 << 0
	paramTypeDiscard = 1 << 1
	paramTypeDevt    = 1 << 2
)

// Basic parameter attributes (UBLK_ATTR_*).
const (
	attrReadOnly      = 1 << 0
	attrRotational    = 1 << 1
	attrVolatileCache = 1 << 2
	attrFUA           = 1 << 3
)

// ctrlCmd is struct ublksrv_ctrl_cmd (32 bytes), the payload of a control
// URING_CMD at SQE byte 48.
type ctrlCmd struct {
	devID      uint32
	queueID    uint16
	len        uint16
	addr       uint64
	data       uint64
	devPathLen uint16
	pad        uint16
	reserved   uint32
}

// devInfo is struct ublksrv_ctrl_dev_info (64 bytes).
type devInfo struct {
	nrHWQueues    uint16
	queueDepth    uint16
	state         uint16
	pad0          uint16
	maxIOBufBytes uint32
	devID         uint32
	ublksrvPID    int32
	pad1          uint32
	flags         uint64
	ublksrvFlags  uint64
	ownerUID      uint32
	ownerGID      uint32
	reserved1     uint64
	reserved2     uint64
}

// ioDesc is struct ublksrv_io_desc (24 bytes), one per tag in the read-only
// descriptor area the driver shares with the queue.
type ioDesc struct {
	opFlags     uint32
	nrSectors   uint32
	startSector uint64
	addr        uint64
}

// op returns the UBLK_IO_OP_* of the descriptor.
func (d *ioDesc) op() uint8 { return uint8(d.opFlags) }

// ioCmd is struct ublksrv_io_cmd (16 bytes), the payload of FETCH_REQ and
// COMMIT_AND_FETCH_REQ.
type ioCmd struct {
	qID    uint16
	tag    uint16
	result int32
	addr   uint64
}

// paramBasic is struct ublk_param_basic (32 bytes).
type paramBasic struct {
	attrs            uint32
	logicalBSShift   uint8
	physicalBSShift  uint8
	ioOptShift       uint8
	ioMinShift       uint8
	maxSectors       uint32
	chunkSectors     uint32
	devSectors       uint64
	virtBoundaryMask uint64
}

// paramDiscard is struct ublk_param_discard (20 bytes).
type paramDiscard struct {
	discardAlignment      uint32
	discardGranularity    uint32
	maxDiscardSectors     uint32
	maxWriteZeroesSectors uint32
	maxDiscardSegments    uint16
	reserved0             uint16
}

// paramDevt is struct ublk_param_devt (16 bytes, read-only).
type paramDevt struct {
	charMajor, charMinor, diskMajor, diskMinor uint32
}

// params is the head of struct ublk_params: len, types, basic, discard and
// devt. Later members (zoned, dma, segment, ...) are left out; the kernel
// takes len as the size userspace knows and clamps it to its own.
type params struct {
	len     uint32
	types   uint32
	basic   paramBasic
	discard paramDiscard
	devt    paramDevt
}

// Compile-time size checks against the C structs.
var (
	_ [32 - unsafe.Sizeof(ctrlCmd{})]byte
	_ [unsafe.Sizeof(ctrlCmd{}) - 32]byte
	_ [64 - unsafe.Sizeof(devInfo{})]byte
	_ [unsafe.Sizeof(devInfo{}) - 64]byte
	_ [24 - unsafe.Sizeof(ioDesc{})]byte
	_ [unsafe.Sizeof(ioDesc{}) - 24]byte
	_ [16 - unsafe.Sizeof(ioCmd{})]byte
	_ [unsafe.Sizeof(ioCmd{}) - 16]byte
	_ [32 - unsafe.Sizeof(paramBasic{})]byte
	_ [unsafe.Sizeof(paramBasic{}) - 32]byte
	_ [20 - unsafe.Sizeof(paramDiscard{})]byte
	_ [unsafe.Sizeof(paramDiscard{}) - 20]byte
)

// paramsLen is the part of params the kernel reads (76 bytes: the C layout
// up to the end of devt, without Go's tail padding).
const paramsLen = uint32(unsafe.Offsetof(params{}.devt) + unsafe.Sizeof(paramDevt{}))

// descOffset is the mmap offset of queue qid's descriptor area on
// /dev/ublkcN: qid * round_up(UBLK_MAX_QUEUE_DEPTH * 24, page size).
func descOffset(qid, pageSize int) int64 {
	return int64(qid) * int64(roundUp(maxQueueDepth*int(unsafe.Sizeof(ioDesc{})), pageSize))
}

// descLen is the length of a queue's descriptor mapping for depth tags.
func descLen(depth, pageSize int) int {
	return roundUp(depth*int(unsafe.Sizeof(ioDesc{})), pageSize)
}

func roundUp(n, to int) int { return (n + to - 1) / to * to }
