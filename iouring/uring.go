package iouring

// Invariants of Uring (single owner goroutine, see the package doc):
//
//   - khead(SQ) <= sqeHead <= sqeTail <= khead(SQ) + sqEntries (mod 2^32).
//     [khead, sqeHead) is published to the kernel (ktail == sqeHead) but not
//     yet consumed; [sqeHead, sqeTail) was handed out by SQE but not yet
//     published. Only flush moves ktail(SQ), with a release store.
//   - The SQ index array is the identity (array[i] = i), written once in New.
//   - SQE zeroes the whole slot (64 or 128 bytes) before handing it out, and
//     hands out slot i only when the kernel has consumed its previous use.
//   - Handing out entries (SQE, SQEs) never publishes or submits; SQEs hands
//     out all of its entries or none, so a linked chain taken with it is
//     published in one flush.
//   - khead(CQ) is advanced only by PeekCQEs, with a release store after the
//     CQEs were copied out; ktail(CQ) is read with an acquire load.
//   - overflowSeen is the CQ overflow counter value last reported.

import (
	"errors"
	"fmt"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// ErrCQOverflow is wrapped by the error Submit and SubmitAndWait return when
// the kernel had to drop completions because the CQ was full.
var ErrCQOverflow = errors.New("iouring: completion queue overflowed, completions lost")

// CQE is one completion. Extra holds the second 16 bytes of a 32-byte CQE on
// SetupCQE32 rings and is zero otherwise.
type CQE struct {
	// UserData is the SQE's UserData.
	UserData uint64
	// Res is the result: a byte count or other value, or a negative errno.
	Res int32
	// Flags is a set of CQEF* flags.
	Flags uint32
	// Extra is the big-CQE payload (SetupCQE32 only).
	Extra [2]uint64
}

// cqe16 is the kernel's 16-byte struct io_uring_cqe.
type cqe16 struct {
	userData uint64
	res      int32
	flags    uint32
}

// sqringOffsets is struct io_sqring_offsets.
type sqringOffsets struct {
	head, tail, ringMask, ringEntries, flags, dropped, array, resv1 uint32
	userAddr                                                        uint64
}

// cqringOffsets is struct io_cqring_offsets.
type cqringOffsets struct {
	head, tail, ringMask, ringEntries, overflow, cqes, flags, resv1 uint32
	userAddr                                                        uint64
}

// params is struct io_uring_params (120 bytes).
type params struct {
	sqEntries, cqEntries, flags, sqThreadCPU, sqThreadIdle, features, wqFd uint32
	resv                                                                   [3]uint32
	sqOff                                                                  sqringOffsets
	cqOff                                                                  cqringOffsets
}

var _ [120 - unsafe.Sizeof(params{})]byte
var _ [unsafe.Sizeof(params{}) - 120]byte

// Params are the full setup parameters for NewWithParams.
type Params struct {
	// Flags is a set of Setup* flags.
	Flags uint32
	// CQEntries is the CQ size; it is used (and SetupCQSize set) when non-zero.
	CQEntries uint32
	// SQThreadCPU is the CPU of the SQPOLL thread (with SetupSQAff).
	SQThreadCPU uint32
	// SQThreadIdleMs is how long the SQPOLL thread spins before sleeping.
	SQThreadIdleMs uint32
}

// Uring is one io_uring instance. See the package doc for the threading rules.
type Uring struct {
	fd       int
	flags    uint32
	features uint32

	sqEntries uint32
	sqMask    uint32
	sqHead    *uint32 // kernel-owned
	sqTail    *uint32 // ours
	sqFlags   *uint32
	sqes      unsafe.Pointer
	sqeShift  uint   // log2 of the SQE size: 6 or 7
	sqeHead   uint32 // first SQE not yet published to the kernel
	sqeTail   uint32 // next SQE to hand out

	cqEntries  uint32
	cqMask     uint32
	cqHead     *uint32 // ours
	cqTail     *uint32 // kernel-owned
	cqOverflow *uint32
	cqes       unsafe.Pointer
	cqe32      bool

	overflowSeen uint32
	eintrRetries uint64 // how often enter was retried after EINTR (for tests)

	sqMap, cqMap, sqeMap []byte
}

// NewThreadUring sets up a ring for one goroutine locked to its OS thread
// (the store shards, the NBD and node unix connections, ublk queues): it
// asks for COOP_TASKRUN | SINGLE_ISSUER | DEFER_TASKRUN and, on a kernel
// that refuses, for fewer of them, down to no flags; the error is the last
// refusal's.
func NewThreadUring(entries uint32) (*Uring, error) {
	var err error
	for _, flags := range []uint32{
		SetupCoopTaskrun | SetupSingleIssuer | SetupDeferTaskrun,
		SetupCoopTaskrun | SetupSingleIssuer,
		SetupCoopTaskrun,
		0,
	} {
		var r *Uring
		if r, err = New(entries, flags); err == nil {
			return r, nil
		}
	}
	return nil, err
}

// New sets up a ring with at least entries SQ entries (rounded up to a power
// of two by the kernel) and the given Setup* flags. With SetupCQSize the CQ
// gets 4 × entries slots; otherwise the kernel's default of 2 × entries.
//
// A flag the kernel does not accept makes New fail with an error wrapping the
// errno (usually unix.EINVAL); flags are never silently dropped. With
// SetupSingleIssuer the calling goroutine must be locked to its OS thread and
// every later call on the ring must come from it (see the package doc).
func New(entries uint32, flags uint32) (*Uring, error) {
	p := Params{Flags: flags}
	if flags&SetupCQSize != 0 {
		p.CQEntries = 4 * entries
	}
	return NewWithParams(entries, p)
}

// NewWithParams is New with explicit CQ size and SQPOLL parameters.
func NewWithParams(entries uint32, cfg Params) (*Uring, error) {
	return newUring(entries, cfg, false)
}

// newUring is NewWithParams; separateMaps maps the SQ and CQ rings separately
// even on FeatSingleMmap kernels (for tests of the pre-5.4 path).
func newUring(entries uint32, cfg Params, separateMaps bool) (*Uring, error) {
	flags := cfg.Flags
	if bad := flags & (setupAttachWQ | setupNoMmap | setupRegisteredFDOnly | setupNoSQArray); bad != 0 {
		return nil, fmt.Errorf("iouring: setup flags %#x not supported by this package: %w", bad, unix.EINVAL)
	}
	if cfg.CQEntries != 0 {
		flags |= SetupCQSize
	}
	p := params{
		flags:        flags,
		cqEntries:    cfg.CQEntries,
		sqThreadCPU:  cfg.SQThreadCPU,
		sqThreadIdle: cfg.SQThreadIdleMs,
	}
	fd, _, errno := unix.Syscall6(unix.SYS_IO_URING_SETUP, uintptr(entries), uintptr(unsafe.Pointer(&p)), 0, 0, 0, 0)
	if errno != 0 {
		return nil, fmt.Errorf("iouring: io_uring_setup(entries=%d, flags=%#x): %w", entries, flags, errno)
	}
	r := &Uring{fd: int(fd), flags: flags, features: p.features}
	if err := r.mapRings(&p, separateMaps); err != nil {
		r.Close()
		return nil, err
	}
	return r, nil
}

func (r *Uring) mapRings(p *params, separateMaps bool) error {
	sqeSize := uintptr(64)
	r.sqeShift = 6
	if r.flags&SetupSQE128 != 0 {
		sqeSize, r.sqeShift = 128, 7
	}
	cqeSize := uintptr(16)
	if r.flags&SetupCQE32 != 0 {
		cqeSize, r.cqe32 = 32, true
	}
	sqSize := uintptr(p.sqOff.array) + uintptr(p.sqEntries)*4
	cqSize := uintptr(p.cqOff.cqes) + uintptr(p.cqEntries)*cqeSize
	single := p.features&FeatSingleMmap != 0 && !separateMaps
	if single {
		sqSize = max(sqSize, cqSize)
		cqSize = sqSize
	}
	var err error
	r.sqMap, err = unix.Mmap(r.fd, int64(offSQRing), int(sqSize), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE)
	if err != nil {
		return fmt.Errorf("iouring: mmap SQ ring (%d bytes): %w", sqSize, err)
	}
	if single {
		r.cqMap = r.sqMap
	} else {
		r.cqMap, err = unix.Mmap(r.fd, int64(offCQRing), int(cqSize), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE)
		if err != nil {
			return fmt.Errorf("iouring: mmap CQ ring (%d bytes): %w", cqSize, err)
		}
	}
	sqesSize := uintptr(p.sqEntries) * sqeSize
	r.sqeMap, err = unix.Mmap(r.fd, int64(offSQEs), int(sqesSize), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE)
	if err != nil {
		return fmt.Errorf("iouring: mmap SQEs (%d bytes): %w", sqesSize, err)
	}

	sq := unsafe.Pointer(&r.sqMap[0])
	u32 := func(base unsafe.Pointer, off uint32) *uint32 { return (*uint32)(unsafe.Add(base, off)) }
	r.sqHead = u32(sq, p.sqOff.head)
	r.sqTail = u32(sq, p.sqOff.tail)
	r.sqMask = *u32(sq, p.sqOff.ringMask)
	r.sqEntries = *u32(sq, p.sqOff.ringEntries)
	r.sqFlags = u32(sq, p.sqOff.flags)
	array := unsafe.Slice(u32(sq, p.sqOff.array), r.sqEntries)
	for i := range array {
		array[i] = uint32(i)
	}
	r.sqes = unsafe.Pointer(&r.sqeMap[0])
	r.sqeHead = atomic.LoadUint32(r.sqHead)
	r.sqeTail = r.sqeHead

	cq := unsafe.Pointer(&r.cqMap[0])
	r.cqHead = u32(cq, p.cqOff.head)
	r.cqTail = u32(cq, p.cqOff.tail)
	r.cqMask = *u32(cq, p.cqOff.ringMask)
	r.cqEntries = *u32(cq, p.cqOff.ringEntries)
	r.cqOverflow = u32(cq, p.cqOff.overflow)
	r.cqes = unsafe.Add(cq, p.cqOff.cqes)
	r.overflowSeen = atomic.LoadUint32(r.cqOverflow)
	return nil
}

// Close unmaps the rings and closes the ring fd. Close does not wait for
// in-flight requests: the kernel cancels them asynchronously, so reap every
// CQE before Close if their buffers are to be freed or reused right after.
// Close is idempotent and may be called from any thread.
func (r *Uring) Close() error {
	var errs []error
	if r.sqeMap != nil {
		errs = append(errs, unix.Munmap(r.sqeMap))
		r.sqeMap = nil
	}
	if r.cqMap != nil && (r.sqMap == nil || &r.cqMap[0] != &r.sqMap[0]) {
		errs = append(errs, unix.Munmap(r.cqMap))
	}
	r.cqMap = nil
	if r.sqMap != nil {
		errs = append(errs, unix.Munmap(r.sqMap))
		r.sqMap = nil
	}
	if r.fd >= 0 {
		errs = append(errs, unix.Close(r.fd))
		r.fd = -1
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("iouring: close: %w", err)
	}
	return nil
}

// Fd returns the ring's file descriptor.
func (r *Uring) Fd() int { return r.fd }

// Flags returns the Setup* flags the ring was set up with.
func (r *Uring) Flags() uint32 { return r.flags }

// Features returns the Feat* bits the kernel reported at setup.
func (r *Uring) Features() uint32 { return r.features }

// SQEntries returns the number of SQ slots.
func (r *Uring) SQEntries() uint32 { return r.sqEntries }

// CQEntries returns the number of CQ slots.
func (r *Uring) CQEntries() uint32 { return r.cqEntries }

// SQE returns the next free submission entry, fully zeroed (64 bytes, or 128
// on SetupSQE128 rings), or nil when the SQ is full. The entry belongs to the
// caller until the next Submit/SubmitAndWait/WaitCQEs.
func (r *Uring) SQE() *SQE {
	head := atomic.LoadUint32(r.sqHead)
	if r.sqeTail-head >= r.sqEntries {
		return nil
	}
	p := unsafe.Add(r.sqes, uintptr(r.sqeTail&r.sqMask)<<r.sqeShift)
	if r.sqeShift == 7 {
		*(*[128]byte)(p) = [128]byte{}
	} else {
		*(*SQE)(p) = SQE{}
	}
	r.sqeTail++
	return (*SQE)(p)
}

// SQEs hands out len(dst) consecutive submission entries, each zeroed as by
// SQE, all or none: it returns false, and hands out nothing, when fewer than
// len(dst) are free (submit, then try again). Entries are published to the
// kernel only by Submit, SubmitAndWait and WaitCQEs, and always all of those
// handed out so far, so entries taken together reach the kernel in one
// batch, in order: a chain linked with SQEIOLink among them is never cut by
// the end of a submission (the kernel runs a linked entry that ends a batch
// as if unlinked). It does not allocate.
func (r *Uring) SQEs(dst []*SQE) bool {
	if uint32(len(dst)) > r.SQSpace() {
		return false
	}
	for i := range dst {
		dst[i] = r.SQE()
	}
	return true
}

// SQSpace returns the number of free SQ slots.
func (r *Uring) SQSpace() uint32 {
	return r.sqEntries - (r.sqeTail - atomic.LoadUint32(r.sqHead))
}

// Pending returns the number of SQEs obtained from SQE that the kernel has not
// consumed yet.
func (r *Uring) Pending() uint32 {
	return r.sqeTail - atomic.LoadUint32(r.sqHead)
}

// Overflowed returns the kernel's count of completions dropped because the CQ
// was full (zero unless something went badly wrong on FeatNoDrop kernels).
func (r *Uring) Overflowed() uint32 { return atomic.LoadUint32(r.cqOverflow) }

// flush publishes the SQEs handed out so far. It returns how many it
// published now and how many the kernel has not consumed yet.
func (r *Uring) flush() (published, unconsumed uint32) {
	if r.sqeHead != r.sqeTail {
		published = r.sqeTail - r.sqeHead
		atomic.StoreUint32(r.sqTail, r.sqeTail) // release: SQE contents before tail
		r.sqeHead = r.sqeTail
	}
	return published, r.sqeTail - atomic.LoadUint32(r.sqHead)
}

// cqReady returns the number of CQEs available to PeekCQEs.
func (r *Uring) cqReady() uint32 {
	return atomic.LoadUint32(r.cqTail) - atomic.LoadUint32(r.cqHead)
}

// enter calls io_uring_enter once.
func (r *Uring) enter(toSubmit, minComplete, flags uint32) (int, unix.Errno) {
	n, _, errno := unix.Syscall6(unix.SYS_IO_URING_ENTER, uintptr(r.fd), uintptr(toSubmit), uintptr(minComplete), uintptr(flags), 0, 0)
	return int(n), errno
}

// enterFlags returns the flags for io_uring_enter and whether entering is
// needed at all when nothing is to be submitted or waited for.
func (r *Uring) enterFlags(wait bool) (uint32, bool) {
	var flags uint32
	need := false
	sqf := atomic.LoadUint32(r.sqFlags)
	if wait || r.flags&(SetupDeferTaskrun|SetupIOPoll) != 0 || sqf&(sqCQOverflow|sqTaskrun) != 0 {
		flags |= enterGetEvents
		need = wait || sqf&(sqCQOverflow|sqTaskrun) != 0 || r.flags&SetupDeferTaskrun != 0
	}
	if r.flags&SetupSQPoll != 0 && sqf&sqNeedWakeup != 0 {
		flags |= enterSQWakeup
		need = true
	}
	return flags, need
}

// Submit hands all pending SQEs to the kernel with one io_uring_enter,
// retrying EINTR, and returns the number submitted. Without pending SQEs it
// makes no syscall unless the kernel asked for one (CQ overflow backlog,
// pending task work, DeferTaskrun, a sleeping SQPOLL thread).
func (r *Uring) Submit() (int, error) {
	return r.SubmitAndWait(0)
}

// SubmitAndWait submits all pending SQEs and waits until at least waitNr CQEs
// (capped at CQEntries) are available to PeekCQEs. It retries EINTR and keeps
// waiting when a signal interrupted the wait. It returns the number of SQEs
// submitted. An increase of the kernel's CQ overflow counter is reported as an
// error wrapping ErrCQOverflow (after submission succeeded).
func (r *Uring) SubmitAndWait(waitNr uint32) (int, error) {
	waitNr = min(waitNr, r.cqEntries)
	sqpoll := r.flags&SetupSQPoll != 0
	total := 0
	for {
		published, toSubmit := r.flush()
		if sqpoll {
			// The SQPOLL thread consumes the SQ; enter only to wake it or to wait.
			total += int(published)
			toSubmit = 0
		}
		flags, need := r.enterFlags(waitNr > 0 && r.cqReady() < waitNr)
		if toSubmit == 0 && !need {
			break
		}
		n, errno := r.enter(toSubmit, waitNr, flags)
		if errno == unix.EINTR {
			r.eintrRetries++
			continue
		}
		if errno != 0 {
			return total, fmt.Errorf("iouring: io_uring_enter(submit=%d, wait=%d, flags=%#x): %w", toSubmit, waitNr, flags, errno)
		}
		if !sqpoll {
			total += n
		}
		waited := waitNr == 0 || r.cqReady() >= waitNr
		if waited && (sqpoll || r.Pending() == 0 || n == 0) {
			break
		}
		// A partial submission (an SQE failed to prepare) or a wait cut short
		// by a signal: go again.
	}
	if ov := atomic.LoadUint32(r.cqOverflow); ov != r.overflowSeen {
		lost := ov - r.overflowSeen
		r.overflowSeen = ov
		return total, fmt.Errorf("iouring: %d completions dropped: %w", lost, ErrCQOverflow)
	}
	return total, nil
}

// PeekCQEs copies up to len(dst) available CQEs into dst, advances the CQ head
// past them and returns how many it copied. It makes no syscall; on
// SetupDeferTaskrun rings completions appear only after an enter (Submit,
// SubmitAndWait, WaitCQEs).
func (r *Uring) PeekCQEs(dst []CQE) int {
	head := atomic.LoadUint32(r.cqHead)
	ready := atomic.LoadUint32(r.cqTail) - head // acquire: CQE contents after tail
	n := min(uint32(len(dst)), ready)
	for i := uint32(0); i < n; i++ {
		idx := uintptr((head + i) & r.cqMask)
		if r.cqe32 {
			dst[i] = *(*CQE)(unsafe.Add(r.cqes, idx<<5))
		} else {
			c := (*cqe16)(unsafe.Add(r.cqes, idx<<4))
			dst[i] = CQE{UserData: c.userData, Res: c.res, Flags: c.flags}
		}
	}
	if n > 0 {
		atomic.StoreUint32(r.cqHead, head+n) // release: slots free for the kernel
	}
	return int(n)
}

// WaitCQEs submits pending SQEs, waits until at least waitNr CQEs are
// available (SubmitAndWait(waitNr)) and then copies up to len(dst) of them into dst
// (PeekCQEs). It returns the number copied; CQEs are copied even when an error
// (such as ErrCQOverflow) is returned.
func (r *Uring) WaitCQEs(dst []CQE, waitNr uint32) (int, error) {
	var err error
	if r.Pending() != 0 || r.cqReady() < waitNr || r.flags&SetupDeferTaskrun != 0 ||
		atomic.LoadUint32(r.sqFlags)&(sqCQOverflow|sqTaskrun) != 0 {
		_, err = r.SubmitAndWait(waitNr)
	}
	return r.PeekCQEs(dst), err
}

// register calls io_uring_register, retrying EINTR.
func (r *Uring) register(op uintptr, arg unsafe.Pointer, n int) error {
	for {
		_, _, errno := unix.Syscall6(unix.SYS_IO_URING_REGISTER, uintptr(r.fd), op, uintptr(arg), uintptr(n), 0, 0)
		if errno == unix.EINTR {
			continue
		}
		if errno != 0 {
			return errno
		}
		return nil
	}
}

// RegisterFiles registers fds as the ring's fixed files. An SQE then refers
// to fds[i] by setting Fd = i and Flags |= SQEFixedFile. An entry of -1
// leaves the slot empty.
func (r *Uring) RegisterFiles(fds []int32) error {
	if len(fds) == 0 {
		return fmt.Errorf("iouring: register files: empty set: %w", unix.EINVAL)
	}
	if err := r.register(registerFiles, unsafe.Pointer(&fds[0]), len(fds)); err != nil {
		return fmt.Errorf("iouring: register %d files: %w", len(fds), err)
	}
	return nil
}

// UnregisterFiles drops the fixed files.
func (r *Uring) UnregisterFiles() error {
	if err := r.register(unregisterFiles, nil, 0); err != nil {
		return fmt.Errorf("iouring: unregister files: %w", err)
	}
	return nil
}

// RegisterBuffers pins bufs as the ring's fixed buffers for PrepReadFixed and
// PrepWriteFixed; bufs[i] gets index i. The memory must stay mapped until
// UnregisterBuffers or Close (use alignbuf memory, not the Go heap).
func (r *Uring) RegisterBuffers(bufs [][]byte) error {
	if len(bufs) == 0 {
		return fmt.Errorf("iouring: register buffers: empty set: %w", unix.EINVAL)
	}
	iov := make([]unix.Iovec, len(bufs))
	for i, b := range bufs {
		if len(b) == 0 {
			return fmt.Errorf("iouring: register buffers: buffer %d is empty: %w", i, unix.EINVAL)
		}
		iov[i].Base = &b[0]
		iov[i].SetLen(len(b))
	}
	if err := r.register(registerBuffers, unsafe.Pointer(&iov[0]), len(iov)); err != nil {
		return fmt.Errorf("iouring: register %d buffers: %w", len(bufs), err)
	}
	return nil
}

// UnregisterBuffers drops the fixed buffers.
func (r *Uring) UnregisterBuffers() error {
	if err := r.register(unregisterBuffers, nil, 0); err != nil {
		return fmt.Errorf("iouring: unregister buffers: %w", err)
	}
	return nil
}

// Enable starts a ring set up with SetupRDisabled. With SetupSingleIssuer the
// enabling thread becomes the issuer.
func (r *Uring) Enable() error {
	if err := r.register(registerEnableRings, nil, 0); err != nil {
		return fmt.Errorf("iouring: enable ring: %w", err)
	}
	return nil
}
