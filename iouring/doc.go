// Package iouring is a small io_uring binding built directly on
// golang.org/x/sys/unix: no cgo, no liburing.
//
// A Uring owns one io_uring instance: the mmapped submission queue (SQ), its
// array of SQEs, and the completion queue (CQ). The usual cycle is
//
//	sqe := r.SQE()            // nil when the SQ is full
//	sqe.PrepRead(fd, buf, off)
//	sqe.UserData = tag
//	... more SQEs ...
//	r.Submit()                // or SubmitAndWait / WaitCQEs
//	n := r.PeekCQEs(cqes)     // reap completions in batches, no syscall
//
// Nothing on that path allocates.
//
// # Linked chains
//
// Entries joined with SQEIOLink must reach the kernel in one submission: the
// kernel ends a chain at the end of each batch and runs a linked entry that
// ends one as if it were unlinked. Take a chain's entries together with
// SQEs, which hands out all of them or none (submit first if it refuses),
// never one at a time with a Submit in between when the SQ fills.
//
// # Threading
//
// A Uring is not safe for concurrent use: one goroutine at a time owns it.
//
// A ring set up with SetupSingleIssuer (and SetupDeferTaskrun, which requires
// it) is bound by the kernel to the OS thread that created it. Go moves
// goroutines between threads, so the goroutine that calls New must first call
// runtime.LockOSThread, and every later call on the ring (SQE, Submit,
// SubmitAndWait, WaitCQEs, Register*, ...) must come from that same locked
// goroutine; Close may come from anywhere. A submission from another thread
// fails with EEXIST. With SetupDeferTaskrun completions are posted only when
// the issuer enters the kernel to wait for events, which SubmitAndWait (and
// Submit) do by always passing IORING_ENTER_GETEVENTS on such rings. To wake
// such a thread that is blocked in SubmitAndWait from another goroutine, keep a
// PrepPollAdd on an eventfd in flight and write to the eventfd.
//
// # Ownership of the shared rings
//
// The SQ tail and the CQ head are written only by this package (release
// stores); the SQ head and the CQ tail are written only by the kernel and read
// with acquire loads. An SQE returned by SQE belongs to the caller until it is
// submitted; after that the kernel owns the slot until it has consumed it (the
// kernel's SQ head passes it), at which point SQE may hand the same slot out
// again, fully zeroed. The kernel copies (or, with FeatSubmitStable, stably
// prepares) an SQE at submission, so the caller may reuse its own data
// structures that the SQE merely described once Submit returns — except the
// buffers and iovecs the I/O reads or writes, which must stay valid and
// unmoved until the CQE arrives.
//
// # Completion overflow
//
// If completions arrive while the CQ is full, kernels with FeatNoDrop keep
// them on an overflow list and set IORING_SQ_CQ_OVERFLOW; this package then
// passes IORING_ENTER_GETEVENTS on the next enter so that the kernel flushes
// them into the CQ as the caller reaps. Completions the kernel had to drop
// anyway are counted in the CQ overflow counter, and Submit/SubmitAndWait
// report any increase as an error wrapping ErrCQOverflow.
package iouring
