package iouring

import (
	"bytes"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unsafe"

	"github.com/torus-storage/torus/internal/alignbuf"
	"golang.org/x/sys/unix"
)

// onLockedThread runs f on a goroutine locked to its OS thread, as
// SetupSingleIssuer rings require, and waits for it.
func onLockedThread(t *testing.T, f func()) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		f()
	}()
	<-done
}

func testUring(t *testing.T, entries, flags uint32) *Uring {
	t.Helper()
	r, err := New(entries, flags)
	if err != nil {
		t.Fatalf("New(%d, %#x): %v", entries, flags, err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

// nopRoundTrip submits one NOP with userData and checks its completion.
func nopRoundTrip(t *testing.T, r *Uring, userData uint64) {
	t.Helper()
	sqe := r.SQE()
	if sqe == nil {
		t.Fatal("SQE() = nil on an empty ring")
	}
	sqe.PrepNop()
	sqe.UserData = userData
	var cqes [4]CQE
	n, err := r.WaitCQEs(cqes[:], 1)
	if err != nil {
		t.Fatalf("WaitCQEs: %v", err)
	}
	if n != 1 || cqes[0].UserData != userData || cqes[0].Res != 0 {
		t.Fatalf("WaitCQEs = %d, %+v; want 1 NOP with user data %#x and res 0", n, cqes[0], userData)
	}
}

func TestSetupFlags(t *testing.T) {
	cases := []struct {
		name  string
		flags uint32
		nop   bool
	}{
		{"none", 0, true},
		{"cqsize", SetupCQSize, true},
		{"clamp", SetupClamp, true},
		{"submitall", SetupSubmitAll, true},
		{"coop", SetupCoopTaskrun, true},
		{"coop+taskrunflag", SetupCoopTaskrun | SetupTaskrunFlag, true},
		{"sqe128", SetupSQE128, true},
		{"cqe32", SetupCQE32, true},
		{"sqe128+cqe32", SetupSQE128 | SetupCQE32, true},
		{"single", SetupSingleIssuer, true},
		{"single+defer", SetupSingleIssuer | SetupDeferTaskrun, true},
		{"sqe128+cqe32+coop+single+defer", SetupSQE128 | SetupCQE32 | SetupCoopTaskrun | SetupSingleIssuer | SetupDeferTaskrun, true},
		{"sqpoll", SetupSQPoll, true},
		{"iopoll", SetupIOPoll, false},
		{"rdisabled", SetupRDisabled, false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			onLockedThread(t, func() {
				r, err := New(8, c.flags)
				if err != nil {
					t.Errorf("New(8, %#x): %v", c.flags, err)
					return
				}
				defer r.Close()
				if r.Flags() != c.flags {
					t.Errorf("Flags() = %#x, want %#x", r.Flags(), c.flags)
				}
				if r.SQEntries() != 8 {
					t.Errorf("SQEntries() = %d, want 8", r.SQEntries())
				}
				wantCQ := uint32(16)
				if c.flags&SetupCQSize != 0 {
					wantCQ = 32
				}
				if r.CQEntries() != wantCQ {
					t.Errorf("CQEntries() = %d, want %d", r.CQEntries(), wantCQ)
				}
				if r.Features()&FeatSingleMmap == 0 {
					t.Errorf("kernel lacks FEAT_SINGLE_MMAP (features %#x)", r.Features())
				}
				if c.flags&SetupRDisabled != 0 {
					if err := r.Enable(); err != nil {
						t.Errorf("Enable: %v", err)
						return
					}
					nopRoundTrip(t, r, 0xfeed)
				}
				if c.nop {
					for i := range uint64(20) { // wraps the 8-entry SQ and 16-entry CQ
						nopRoundTrip(t, r, 0xabc0+i)
					}
				}
			})
		})
	}
}

func TestSetupRejectsFlags(t *testing.T) {
	// DEFER_TASKRUN without SINGLE_ISSUER is refused by the kernel.
	if r, err := New(8, SetupDeferTaskrun); err == nil {
		r.Close()
		t.Fatal("New(DeferTaskrun without SingleIssuer) succeeded")
	} else if !errors.Is(err, unix.EINVAL) {
		t.Fatalf("New(DeferTaskrun without SingleIssuer) = %v, want EINVAL", err)
	}
	// TASKRUN_FLAG without COOP_TASKRUN/DEFER_TASKRUN is refused too.
	if r, err := New(8, SetupTaskrunFlag); err == nil {
		r.Close()
		t.Fatal("New(TaskrunFlag alone) succeeded")
	} else if !errors.Is(err, unix.EINVAL) {
		t.Fatalf("New(TaskrunFlag alone) = %v, want EINVAL", err)
	}
	if r, err := New(8, setupNoSQArray); err == nil {
		r.Close()
		t.Fatal("New(NO_SQARRAY) succeeded; the package needs the SQ array")
	} else if !errors.Is(err, unix.EINVAL) {
		t.Fatalf("New(NO_SQARRAY) = %v, want EINVAL", err)
	}
}

func TestNopBatch(t *testing.T) {
	r := testUring(t, 32, 0)
	for round := range 3 {
		for i := range 32 {
			sqe := r.SQE()
			if sqe == nil {
				t.Fatalf("round %d: SQE() = nil after %d", round, i)
			}
			sqe.PrepNop()
			sqe.UserData = uint64(round<<8 | i)
		}
		if r.Pending() != 32 || r.SQSpace() != 0 {
			t.Fatalf("Pending=%d SQSpace=%d, want 32 and 0", r.Pending(), r.SQSpace())
		}
		n, err := r.SubmitAndWait(32)
		if err != nil || n != 32 {
			t.Fatalf("SubmitAndWait(32) = %d, %v", n, err)
		}
		if r.Pending() != 0 || r.SQSpace() != 32 {
			t.Fatalf("after submit: Pending=%d SQSpace=%d", r.Pending(), r.SQSpace())
		}
		var cqes [64]CQE
		got := r.PeekCQEs(cqes[:])
		if got != 32 {
			t.Fatalf("PeekCQEs = %d, want 32", got)
		}
		seen := map[uint64]bool{}
		for _, c := range cqes[:got] {
			if c.Res != 0 || c.UserData>>8 != uint64(round) {
				t.Fatalf("bad CQE %+v", c)
			}
			seen[c.UserData] = true
		}
		if len(seen) != 32 {
			t.Fatalf("got %d distinct user data, want 32", len(seen))
		}
		if r.PeekCQEs(cqes[:]) != 0 {
			t.Fatal("PeekCQEs found CQEs after reaping them all")
		}
	}
}

func TestFullSQReturnsNil(t *testing.T) {
	r := testUring(t, 4, 0)
	for i := range 4 {
		if r.SQE() == nil {
			t.Fatalf("SQE() #%d = nil", i)
		}
	}
	if s := r.SQE(); s != nil {
		t.Fatal("SQE() on a full SQ is not nil")
	}
	if r.SQSpace() != 0 || r.Pending() != 4 {
		t.Fatalf("SQSpace=%d Pending=%d, want 0 and 4", r.SQSpace(), r.Pending())
	}
	var cqes [8]CQE
	if n, err := r.WaitCQEs(cqes[:], 4); err != nil || n != 4 {
		t.Fatalf("WaitCQEs = %d, %v", n, err)
	}
	if r.SQE() == nil {
		t.Fatal("SQE() = nil after the SQ drained")
	}
}

func TestSQEReuseZeroed(t *testing.T) {
	for _, flags := range []uint32{0, SetupSQE128} {
		r := testUring(t, 1, flags)
		size := 64
		if flags&SetupSQE128 != 0 {
			size = 128
		}
		sqe := r.SQE()
		raw := unsafe.Slice((*byte)(unsafe.Pointer(sqe)), size)
		for i := range raw {
			raw[i] = 0xa5
		}
		sqe.Opcode = OpNop
		sqe.Flags = 0
		sqe.UserData = 77
		var cqes [2]CQE
		if n, err := r.WaitCQEs(cqes[:], 1); err != nil || n != 1 || cqes[0].UserData != 77 {
			t.Fatalf("flags %#x: WaitCQEs = %d, %v, %+v", flags, n, err, cqes[0])
		}
		again := r.SQE()
		if again != sqe {
			t.Fatalf("flags %#x: 1-entry ring handed out a different slot", flags)
		}
		raw = unsafe.Slice((*byte)(unsafe.Pointer(again)), size)
		for i, b := range raw {
			if b != 0 {
				t.Fatalf("flags %#x: reused SQE byte %d = %#x, want 0", flags, i, b)
			}
		}
	}
}

func TestURingCmdEncoding(t *testing.T) {
	r := testUring(t, 4, SetupSQE128|SetupCQE32)
	sqe := r.SQE()
	sqe.PrepURingCmd(7, 0xdeadbeef)
	cmd := sqe.Cmd()
	for i := range cmd {
		cmd[i] = byte(i + 1)
	}
	sqe.UserData = 0x1234
	raw := unsafe.Slice((*byte)(unsafe.Pointer(sqe)), 128)
	if raw[0] != 46 || OpURingCmd != 46 {
		t.Fatalf("opcode byte = %d, want 46", raw[0])
	}
	if got := int32(binary.LittleEndian.Uint32(raw[4:])); got != 7 {
		t.Fatalf("fd = %d, want 7", got)
	}
	if got := binary.LittleEndian.Uint32(raw[8:]); got != 0xdeadbeef {
		t.Fatalf("cmd_op = %#x, want 0xdeadbeef", got)
	}
	if !bytes.Equal(raw[12:16], []byte{0, 0, 0, 0}) {
		t.Fatalf("__pad1 = %x, want zero", raw[12:16])
	}
	if uintptr(unsafe.Pointer(cmd))-uintptr(unsafe.Pointer(sqe)) != 48 || len(cmd) != 80 {
		t.Fatal("Cmd() is not the 80 bytes at offset 48")
	}
	for i := range 80 {
		if raw[48+i] != byte(i+1) {
			t.Fatalf("SQE byte %d = %d, want %d", 48+i, raw[48+i], i+1)
		}
	}
	if binary.LittleEndian.Uint64(raw[32:]) != 0x1234 {
		t.Fatal("user data not at byte 32")
	}

	// Execute it against a regular file: the file has no uring_cmd, so the
	// CQE carries an error, which still proves the SQE made the round trip.
	f, err := os.CreateTemp(t.TempDir(), "cmd")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sqe.Fd = int32(f.Fd())
	var cqes [1]CQE
	if n, err := r.WaitCQEs(cqes[:], 1); err != nil || n != 1 {
		t.Fatalf("WaitCQEs = %d, %v", n, err)
	}
	c := cqes[0]
	if c.UserData != 0x1234 {
		t.Fatalf("CQE user data %#x", c.UserData)
	}
	switch unix.Errno(-c.Res) {
	case unix.EOPNOTSUPP, unix.ENOTTY, unix.EINVAL:
	default:
		t.Fatalf("URING_CMD on a regular file: res %d, want -EOPNOTSUPP/-ENOTTY/-EINVAL", c.Res)
	}
	if c.Extra != [2]uint64{} {
		t.Fatalf("CQE32 extra = %v, want zero", c.Extra)
	}
}

// tempFile returns an O_DIRECT-capable file of size bytes in a temp dir.
func tempFile(t testing.TB, size int64, flags int) *os.File {
	t.Helper()
	f, err := os.OpenFile(filepath.Join(t.TempDir(), "data"), os.O_RDWR|os.O_CREATE|flags, 0o600)
	if err != nil {
		t.Fatalf("open temp file: %v", err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

func allocBuf(t testing.TB, n int) []byte {
	t.Helper()
	b, err := alignbuf.Alloc(n)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { alignbuf.Free(b) })
	return b
}

func fill(b []byte, seed byte) {
	for i := range b {
		b[i] = seed + byte(i*7)
	}
}

// one submits a single prepared SQE and returns its CQE.
func one(t *testing.T, r *Uring, prep func(*SQE)) CQE {
	t.Helper()
	sqe := r.SQE()
	if sqe == nil {
		t.Fatal("SQE() = nil")
	}
	prep(sqe)
	sqe.UserData = 0x5eed
	var cqes [1]CQE
	n, err := r.WaitCQEs(cqes[:], 1)
	if err != nil || n != 1 {
		t.Fatalf("WaitCQEs = %d, %v", n, err)
	}
	if cqes[0].UserData != 0x5eed {
		t.Fatalf("CQE user data %#x", cqes[0].UserData)
	}
	return cqes[0]
}

func TestReadWrite(t *testing.T) {
	for _, c := range []struct {
		name  string
		flags uint32
	}{
		{"plain", 0},
		{"sqpoll", SetupSQPoll},
		{"sqe128+cqe32", SetupSQE128 | SetupCQE32},
		{"single+defer+coop", SetupSingleIssuer | SetupDeferTaskrun | SetupCoopTaskrun},
	} {
		t.Run(c.name, func(t *testing.T) {
			// The subtest goroutine is the ring's issuer thread.
			runtime.LockOSThread()
			defer runtime.UnlockOSThread()
			testReadWrite(t, c.flags)
		})
	}
}

func testReadWrite(t *testing.T, flags uint32) {
	const bs = 4096
	f := tempFile(t, 1<<20, unix.O_DIRECT)
	fd := int32(f.Fd())
	r, err := New(8, flags)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	wbuf := allocBuf(t, 4*bs)
	rbuf := allocBuf(t, 4*bs)
	check := func(what string, c CQE, want int) {
		t.Helper()
		if c.Res != int32(want) {
			t.Fatalf("%s: res %d, want %d", what, c.Res, want)
		}
	}

	// Plain READ/WRITE.
	fill(wbuf[:bs], 1)
	check("write", one(t, r, func(s *SQE) { s.PrepWrite(fd, wbuf[:bs], 0) }), bs)
	check("read", one(t, r, func(s *SQE) { s.PrepRead(fd, rbuf[:bs], 0) }), bs)
	if !bytes.Equal(wbuf[:bs], rbuf[:bs]) {
		t.Fatal("plain read-back mismatch")
	}

	// RWF_DSYNC write (FUA).
	fill(wbuf[:bs], 2)
	check("dsync write", one(t, r, func(s *SQE) {
		s.PrepWrite(fd, wbuf[:bs], bs)
		s.OpFlags = unix.RWF_DSYNC
	}), bs)
	check("read", one(t, r, func(s *SQE) { s.PrepRead(fd, rbuf[:bs], bs) }), bs)
	if !bytes.Equal(wbuf[:bs], rbuf[:bs]) {
		t.Fatal("dsync read-back mismatch")
	}

	// WRITEV/READV.
	fill(wbuf, 3)
	wiov := make([]unix.Iovec, 2)
	wiov[0].Base, wiov[1].Base = &wbuf[0], &wbuf[bs]
	wiov[0].SetLen(bs)
	wiov[1].SetLen(3 * bs)
	riov := make([]unix.Iovec, 2)
	riov[0].Base, riov[1].Base = &rbuf[0], &rbuf[3*bs]
	riov[0].SetLen(3 * bs)
	riov[1].SetLen(bs)
	clear(rbuf)
	check("writev", one(t, r, func(s *SQE) { s.PrepWritev(fd, wiov, 8*bs) }), 4*bs)
	check("readv", one(t, r, func(s *SQE) { s.PrepReadv(fd, riov, 8*bs) }), 4*bs)
	if !bytes.Equal(wbuf, rbuf) {
		t.Fatal("readv read-back mismatch")
	}

	// Fixed buffers and registered files.
	if err := r.RegisterBuffers([][]byte{wbuf, rbuf}); err != nil {
		t.Fatal(err)
	}
	if err := r.RegisterFiles([]int32{-1, fd}); err != nil {
		t.Fatal(err)
	}
	fill(wbuf, 4)
	clear(rbuf)
	check("write fixed", one(t, r, func(s *SQE) { s.PrepWriteFixed(fd, wbuf[bs:3*bs], 16*bs, 0) }), 2*bs)
	check("read fixed", one(t, r, func(s *SQE) { s.PrepReadFixed(fd, rbuf[:2*bs], 16*bs, 1) }), 2*bs)
	if !bytes.Equal(wbuf[bs:3*bs], rbuf[:2*bs]) {
		t.Fatal("fixed-buffer read-back mismatch")
	}
	fill(wbuf, 5)
	clear(rbuf)
	check("write fixed file+buf", one(t, r, func(s *SQE) {
		s.PrepWriteFixed(1, wbuf[:bs], 20*bs, 0)
		s.Flags |= SQEFixedFile
	}), bs)
	check("read fixed file", one(t, r, func(s *SQE) {
		s.PrepRead(1, rbuf[:bs], 20*bs)
		s.Flags |= SQEFixedFile
	}), bs)
	if !bytes.Equal(wbuf[:bs], rbuf[:bs]) {
		t.Fatal("registered-file read-back mismatch")
	}
	// Empty registered slot 0 fails with EBADF in the CQE.
	if c := one(t, r, func(s *SQE) { s.PrepRead(0, rbuf[:bs], 0); s.Flags |= SQEFixedFile }); c.Res != -int32(unix.EBADF) {
		t.Fatalf("read from empty fixed slot: res %d, want -EBADF", c.Res)
	}
	if err := r.UnregisterFiles(); err != nil {
		t.Fatal(err)
	}
	if err := r.UnregisterBuffers(); err != nil {
		t.Fatal(err)
	}
	if c := one(t, r, func(s *SQE) { s.PrepReadFixed(fd, rbuf[:bs], 0, 1) }); c.Res >= 0 {
		t.Fatalf("read fixed after UnregisterBuffers: res %d, want an error", c.Res)
	}

	// FSYNC datasync and full.
	check("fdatasync", one(t, r, func(s *SQE) { s.PrepFsync(fd, FsyncDatasync) }), 0)
	check("fsync", one(t, r, func(s *SQE) { s.PrepFsync(fd, 0) }), 0)

	// A bad fd surfaces as a CQE error, not a Submit error.
	if c := one(t, r, func(s *SQE) { s.PrepFsync(-1, 0) }); c.Res != -int32(unix.EBADF) {
		t.Fatalf("fsync(-1): res %d, want -EBADF", c.Res)
	}
}

// TestPollEventfdWakesLockedUring is the store's wake-up path: a locked
// SingleIssuer|DeferTaskrun ring blocks in SubmitAndWait on a POLL_ADD of an
// eventfd, and another goroutine writes the eventfd.
func TestPollEventfdWakesLockedUring(t *testing.T) {
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(efd)
	onLockedThread(t, func() {
		r, err := New(8, SetupSingleIssuer|SetupDeferTaskrun|SetupCoopTaskrun)
		if err != nil {
			t.Error(err)
			return
		}
		defer r.Close()
		sqe := r.SQE()
		sqe.PrepPollAdd(int32(efd), unix.POLLIN)
		sqe.UserData = 99
		start := time.Now()
		go func() {
			time.Sleep(50 * time.Millisecond)
			unix.Write(efd, []byte{1, 0, 0, 0, 0, 0, 0, 0})
		}()
		var cqes [1]CQE
		n, err := r.WaitCQEs(cqes[:], 1)
		if err != nil || n != 1 {
			t.Errorf("WaitCQEs = %d, %v", n, err)
			return
		}
		if el := time.Since(start); el < 40*time.Millisecond {
			t.Errorf("woke after %v, before the eventfd write", el)
		}
		if cqes[0].UserData != 99 || cqes[0].Res&unix.POLLIN == 0 {
			t.Errorf("poll CQE %+v, want user data 99 and POLLIN", cqes[0])
		}
	})
}

// TestEINTRRetry interrupts a blocked SubmitAndWait with signals aimed at its
// thread and checks that it retried and kept waiting for the real event.
func TestEINTRRetry(t *testing.T) {
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(efd)
	onLockedThread(t, func() {
		r, err := New(8, 0)
		if err != nil {
			t.Error(err)
			return
		}
		defer r.Close()
		sqe := r.SQE()
		sqe.PrepPollAdd(int32(efd), unix.POLLIN)
		sqe.UserData = 5
		tid := unix.Gettid()
		var wg sync.WaitGroup
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 50 {
				time.Sleep(2 * time.Millisecond)
				unix.Tgkill(unix.Getpid(), tid, unix.SIGURG)
			}
			unix.Write(efd, []byte{1, 0, 0, 0, 0, 0, 0, 0})
		}()
		n, err := r.SubmitAndWait(1)
		wg.Wait()
		if err != nil || n != 1 {
			t.Errorf("SubmitAndWait = %d, %v", n, err)
			return
		}
		var cqes [1]CQE
		if r.PeekCQEs(cqes[:]) != 1 || cqes[0].UserData != 5 {
			t.Errorf("poll CQE %+v", cqes[0])
		}
		if r.eintrRetries == 0 {
			t.Errorf("SubmitAndWait never saw EINTR although its thread got 50 signals")
		}
		t.Logf("EINTR retries: %d", r.eintrRetries)
	})
}

// TestCQOverflowNoLoss overfills the CQ; with FEAT_NODROP the kernel keeps the
// extra completions and SubmitAndWait's GETEVENTS flushes them.
func TestCQOverflowNoLoss(t *testing.T) {
	r := testUring(t, 4, 0) // CQ of 8
	if r.Features()&FeatNoDrop == 0 {
		t.Fatal("kernel lacks FEAT_NODROP")
	}
	for round := range 3 {
		for i := range 4 {
			sqe := r.SQE()
			sqe.PrepNop()
			sqe.UserData = uint64(round*4 + i)
		}
		if _, err := r.Submit(); err != nil {
			t.Fatalf("Submit: %v", err)
		}
	}
	if atomic32 := *r.sqFlags; atomic32&sqCQOverflow == 0 {
		t.Fatalf("SQ flags %#x: IORING_SQ_CQ_OVERFLOW not set after 12 CQEs into 8 slots", atomic32)
	}
	seen := map[uint64]bool{}
	var cqes [16]CQE
	for len(seen) < 12 {
		n, err := r.WaitCQEs(cqes[:], 1)
		if err != nil {
			t.Fatalf("WaitCQEs: %v", err)
		}
		for _, c := range cqes[:n] {
			seen[c.UserData] = true
		}
		if n == 0 {
			t.Fatalf("no progress after %d CQEs", len(seen))
		}
	}
	if r.Overflowed() != 0 {
		t.Fatalf("kernel dropped %d completions", r.Overflowed())
	}
}

func TestCloseIdempotent(t *testing.T) {
	r, err := New(4, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	if err := r.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
}

// TestSeparateMaps runs the ring with the SQ and CQ rings mapped separately,
// as on kernels without FEAT_SINGLE_MMAP.
func TestSeparateMaps(t *testing.T) {
	r, err := newUring(8, Params{Flags: SetupCQE32}, true)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if &r.cqMap[0] == &r.sqMap[0] {
		t.Fatal("SQ and CQ share one mapping")
	}
	for i := range uint64(40) {
		nopRoundTrip(t, r, 1000+i)
	}
	if err := r.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
}

// TestSingleIssuerOtherThread checks the documented threading rule: a
// SingleIssuer ring refuses submissions from a thread other than its creator.
func TestSingleIssuerOtherThread(t *testing.T) {
	created := make(chan *Uring)
	release := make(chan struct{})
	go func() {
		defer close(created)
		// Stay locked (and so keep this thread to ourselves) until the other
		// goroutine has tried, so that it cannot run on the creator's thread.
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		r, err := New(4, SetupSingleIssuer)
		if err != nil {
			t.Errorf("New: %v", err)
		}
		created <- r
		<-release
		if r != nil {
			// The creator still may submit: the refused NOP and this one.
			r.SQE().PrepNop()
			var cqes [4]CQE
			if n, err := r.WaitCQEs(cqes[:], 2); err != nil || n != 2 {
				t.Errorf("creator's WaitCQEs = %d, %v; want 2", n, err)
			}
			r.Close()
		}
	}()
	r := <-created
	if r != nil {
		onLockedThread(t, func() {
			r.SQE().PrepNop()
			if _, err := r.Submit(); !errors.Is(err, unix.EEXIST) {
				t.Errorf("Submit from a non-issuer thread: %v, want EEXIST", err)
			}
		})
	}
	close(release)
	<-created
}

// TestOverflowCounterReported checks that an increase of the kernel's dropped
// completion counter is reported once. The kernel never drops on a NODROP
// kernel in a test, so the counter is bumped by hand.
func TestOverflowCounterReported(t *testing.T) {
	r := testUring(t, 4, 0)
	atomic.AddUint32(r.cqOverflow, 3)
	r.SQE().PrepNop()
	n, err := r.Submit()
	if !errors.Is(err, ErrCQOverflow) || n != 1 {
		t.Fatalf("Submit after 3 drops = %d, %v; want 1 and ErrCQOverflow", n, err)
	}
	if _, err := r.Submit(); err != nil {
		t.Fatalf("second Submit reported again: %v", err)
	}
}

func TestNewThreadUring(t *testing.T) {
	onLockedThread(t, func() {
		r, err := NewThreadUring(64)
		if err != nil {
			t.Fatalf("NewThreadUring: %v", err)
		}
		defer r.Close()
		// The host kernel (6.18) takes every flag: nothing may be dropped.
		want := uint32(SetupCoopTaskrun | SetupSingleIssuer | SetupDeferTaskrun)
		if r.Flags()&want != want {
			t.Fatalf("flags %#x, want %#x set", r.Flags(), want)
		}
		nopRoundTrip(t, r, 42)
	})
}

// takeChain reserves a chain of len(dst) entries the way a caller with a
// possibly full SQ must: submit first when fewer are free.
func takeChain(t *testing.T, r *Uring, dst []*SQE) {
	t.Helper()
	for !r.SQEs(dst) {
		if _, err := r.Submit(); err != nil {
			t.Fatal(err)
		}
	}
}

// SQEs hands out all of its entries or none, and a chain taken with it at
// the edge of a full SQ reaches the kernel whole: when its head fails, the
// linked entry is cancelled. The control shows why it matters: the same
// chain with a submission between its two entries (what taking one entry at
// a time and submitting when the SQ is full does) runs the second entry
// unlinked.
func TestSQEsLinkedChainAtSQEdge(t *testing.T) {
	r := testUring(t, 8, 0)
	var cqes [16]CQE
	fill := func() {
		for r.SQSpace() > 1 {
			e := r.SQE()
			e.PrepNop()
			e.UserData = 100
		}
	}
	results := func() (head, tail int32) {
		t.Helper()
		head, tail = 1, 1
		for head == 1 || tail == 1 {
			n, err := r.WaitCQEs(cqes[:], 1)
			if err != nil {
				t.Fatal(err)
			}
			for _, c := range cqes[:n] {
				switch c.UserData {
				case 1:
					head = c.Res
				case 2:
					tail = c.Res
				}
			}
		}
		return head, tail
	}
	prep := func(head, tail *SQE) {
		// A read from fd -1 fails with EBADF; its linked NOP must not run.
		head.PrepRead(-1, make([]byte, 8), 0)
		head.Flags |= SQEIOLink
		head.UserData = 1
		tail.PrepNop()
		tail.UserData = 2
	}

	fill()
	var two [2]*SQE
	if r.SQEs(two[:]) {
		t.Fatal("SQEs(2) succeeded with one free entry")
	}
	if r.SQSpace() != 1 || two[0] != nil || two[1] != nil {
		t.Fatalf("a refused SQEs handed out entries: SQSpace %d", r.SQSpace())
	}
	takeChain(t, r, two[:])
	if r.Pending() != 2 {
		t.Fatalf("Pending %d after taking a chain of 2 at the edge, want 2", r.Pending())
	}
	prep(two[0], two[1])
	head, tail := results()
	if head != -int32(unix.EBADF) || tail != -int32(unix.ECANCELED) {
		t.Fatalf("chain taken with SQEs: head %d, linked %d; want -EBADF and -ECANCELED", head, tail)
	}

	// Control: one entry at a time, submitting when the SQ is full.
	fill()
	first := r.SQE()
	first.PrepRead(-1, make([]byte, 8), 0)
	first.Flags |= SQEIOLink
	first.UserData = 1
	if r.SQE() != nil {
		t.Fatal("SQ not full")
	}
	if _, err := r.Submit(); err != nil {
		t.Fatal(err)
	}
	second := r.SQE()
	second.PrepNop()
	second.UserData = 2
	head, tail = results()
	if head != -int32(unix.EBADF) || tail != 0 {
		t.Fatalf("control, chain cut by a submission: head %d, second %d; want -EBADF and 0 (ran unlinked)", head, tail)
	}
}
