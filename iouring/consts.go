package iouring

// Setup flags, passed to New and stored in io_uring_params.flags.
const (
	// SetupIOPoll busy-polls for completions (O_DIRECT on polled block devices only).
	SetupIOPoll uint32 = 1 << 0
	// SetupSQPoll starts a kernel thread that polls the SQ, so submission needs no syscall.
	SetupSQPoll uint32 = 1 << 1
	// SetupSQAff pins the SQPOLL thread to Params.SQThreadCPU (CPU 0 through New).
	SetupSQAff uint32 = 1 << 2
	// SetupCQSize makes the kernel use an explicit CQ size (New uses 4 × entries).
	SetupCQSize uint32 = 1 << 3
	// SetupClamp clamps too large SQ/CQ sizes instead of failing.
	SetupClamp uint32 = 1 << 4
	// SetupRDisabled starts the ring disabled; Enable turns it on.
	SetupRDisabled uint32 = 1 << 6
	// SetupSubmitAll keeps submitting a batch after an SQE fails to prepare.
	SetupSubmitAll uint32 = 1 << 7
	// SetupCoopTaskrun avoids IPIs: completion work runs when the task next enters the kernel.
	SetupCoopTaskrun uint32 = 1 << 8
	// SetupTaskrunFlag makes the kernel set IORING_SQ_TASKRUN when completion work is waiting.
	SetupTaskrunFlag uint32 = 1 << 9
	// SetupSQE128 makes every SQE 128 bytes (needed for large URING_CMD payloads).
	SetupSQE128 uint32 = 1 << 10
	// SetupCQE32 makes every CQE 32 bytes (CQE.Extra carries the second half).
	SetupCQE32 uint32 = 1 << 11
	// SetupSingleIssuer promises that only one thread submits; see the package doc.
	SetupSingleIssuer uint32 = 1 << 12
	// SetupDeferTaskrun defers completion work until the issuer waits for events;
	// requires SetupSingleIssuer. See the package doc for the threading rule.
	SetupDeferTaskrun uint32 = 1 << 13

	// Flags New refuses: the package relies on kernel-allocated rings, the ring fd
	// and the SQ index array (so that it runs on 6.1), and has no wq_fd to attach.
	setupAttachWQ         uint32 = 1 << 5
	setupNoMmap           uint32 = 1 << 14
	setupRegisteredFDOnly uint32 = 1 << 15
	setupNoSQArray        uint32 = 1 << 16
)

// SQE flags (SQE.Flags).
const (
	// SQEFixedFile means SQE.Fd is an index into the files registered with RegisterFiles.
	SQEFixedFile uint8 = 1 << 0
	// SQEIODrain starts the SQE only after all earlier SQEs have completed.
	SQEIODrain uint8 = 1 << 1
	// SQEIOLink links the next SQE to this one: it starts only after this one succeeds.
	SQEIOLink uint8 = 1 << 2
	// SQEIOHardlink is like SQEIOLink but the chain continues even if this SQE fails.
	SQEIOHardlink uint8 = 1 << 3
	// SQEAsync always punts the SQE to the async worker pool.
	SQEAsync uint8 = 1 << 4
	// SQEBufferSelect picks a buffer from a provided-buffer group.
	SQEBufferSelect uint8 = 1 << 5
	// SQECQESkipSuccess posts no CQE when the SQE succeeds.
	SQECQESkipSuccess uint8 = 1 << 6
)

// Opcodes (SQE.Opcode), numbered as the kernel's enum io_uring_op.
const (
	OpNop uint8 = iota
	OpReadv
	OpWritev
	OpFsync
	OpReadFixed
	OpWriteFixed
	OpPollAdd
	OpPollRemove
	OpSyncFileRange
	OpSendmsg
	OpRecvmsg
	OpTimeout
	OpTimeoutRemove
	OpAccept
	OpAsyncCancel
	OpLinkTimeout
	OpConnect
	OpFallocate
	OpOpenat
	OpClose
	OpFilesUpdate
	OpStatx
	OpRead
	OpWrite
	OpFadvise
	OpMadvise
	OpSend
	OpRecv
	OpOpenat2
	OpEpollCtl
	OpSplice
	OpProvideBuffers
	OpRemoveBuffers
	OpTee
	OpShutdown
	OpRenameat
	OpUnlinkat
	OpMkdirat
	OpSymlinkat
	OpLinkat
	OpMsgRing
	OpFsetxattr
	OpSetxattr
	OpFgetxattr
	OpGetxattr
	OpSocket
	OpURingCmd
	OpSendZC
	OpSendmsgZC
	OpReadMultishot
	OpWaitid
	OpFutexWait
	OpFutexWake
	OpFutexWaitv
)

// FsyncDatasync makes OpFsync behave like fdatasync(2) (IORING_FSYNC_DATASYNC).
const FsyncDatasync uint32 = 1

// URingCmdFixed in SQE.OpFlags of a URING_CMD uses the registered buffer SQE.BufIndex.
const URingCmdFixed uint32 = 1 << 0

// CQE flags (CQE.Flags).
const (
	// CQEFBuffer means the upper 16 bits of CQE.Flags hold a selected buffer ID.
	CQEFBuffer uint32 = 1 << 0
	// CQEFMore means the SQE will post more CQEs (multishot).
	CQEFMore uint32 = 1 << 1
	// CQEFSockNonempty means a socket receive left more data.
	CQEFSockNonempty uint32 = 1 << 2
	// CQEFNotif marks a zero-copy send notification.
	CQEFNotif uint32 = 1 << 3
)

// Feature bits reported by the kernel in io_uring_params.features (Uring.Features).
const (
	FeatSingleMmap     uint32 = 1 << 0
	FeatNoDrop         uint32 = 1 << 1
	FeatSubmitStable   uint32 = 1 << 2
	FeatRWCurPos       uint32 = 1 << 3
	FeatCurPersonality uint32 = 1 << 4
	FeatFastPoll       uint32 = 1 << 5
	FeatPoll32Bits     uint32 = 1 << 6
	FeatSQPollNonfixed uint32 = 1 << 7
	FeatExtArg         uint32 = 1 << 8
	FeatNativeWorkers  uint32 = 1 << 9
	FeatRsrcTags       uint32 = 1 << 10
	FeatCQESkip        uint32 = 1 << 11
	FeatLinkedFile     uint32 = 1 << 12
	FeatRegRegRing     uint32 = 1 << 13
)

// Kernel ABI numbers used only inside the package.
const (
	offSQRing uint64 = 0
	offCQRing uint64 = 0x8000000
	offSQEs   uint64 = 0x10000000

	sqNeedWakeup uint32 = 1 << 0
	sqCQOverflow uint32 = 1 << 1
	sqTaskrun    uint32 = 1 << 2

	enterGetEvents uint32 = 1 << 0
	enterSQWakeup  uint32 = 1 << 1

	registerBuffers     = 0
	unregisterBuffers   = 1
	registerFiles       = 2
	unregisterFiles     = 3
	registerEnableRings = 12
)
