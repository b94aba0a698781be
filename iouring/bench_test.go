package iouring

import (
	"runtime"
	"testing"

	"golang.org/x/sys/unix"
)

// BenchmarkNop measures one NOP through the ring, submitted and reaped in
// batches of 32. One op is one NOP.
func BenchmarkNop(b *testing.B) {
	for _, flags := range []struct {
		name  string
		flags uint32
	}{
		{"plain", 0},
		{"coop+single", SetupCoopTaskrun | SetupSingleIssuer},
		{"single+defer", SetupSingleIssuer | SetupDeferTaskrun},
	} {
		b.Run(flags.name, func(b *testing.B) {
			// SingleIssuer rings belong to one OS thread.
			runtime.LockOSThread()
			defer runtime.UnlockOSThread()
			r, err := New(64, flags.flags)
			if err != nil {
				b.Fatal(err)
			}
			defer r.Close()
			const batch = 32
			var cqes [batch]CQE
			b.ReportAllocs()
			b.ResetTimer()
			for done := 0; done < b.N; {
				n := min(batch, b.N-done)
				for i := range n {
					sqe := r.SQE()
					sqe.PrepNop()
					sqe.UserData = uint64(i)
				}
				if _, err := r.SubmitAndWait(uint32(n)); err != nil {
					b.Fatal(err)
				}
				if got := r.PeekCQEs(cqes[:]); got != n {
					b.Fatalf("reaped %d of %d", got, n)
				}
				done += n
			}
		})
	}
}

// BenchmarkReadFile4K measures random O_DIRECT 4 KiB reads from a temp file at
// queue depth 32: every completion is replaced by a new read. One op is one
// read. "plain" uses READ, "fixed" READ_FIXED on a registered file and buffer.
func BenchmarkReadFile4K(b *testing.B) {
	const (
		bs     = 4096
		qd     = 32
		blocks = 4096 // 16 MiB file
	)
	for _, fixed := range []bool{false, true} {
		name := "plain"
		if fixed {
			name = "fixed"
		}
		b.Run(name, func(b *testing.B) {
			f := tempFile(b, blocks*bs, unix.O_DIRECT)
			buf := allocBuf(b, qd*bs)
			fill(buf, 9)
			fd := int32(f.Fd())
			for off := 0; off < blocks*bs; off += len(buf) {
				if _, err := unix.Pwrite(int(fd), buf, int64(off)); err != nil {
					b.Fatal(err)
				}
			}
			r, err := New(qd, 0)
			if err != nil {
				b.Fatal(err)
			}
			defer r.Close()
			var sqeFlags uint8
			if fixed {
				if err := r.RegisterBuffers([][]byte{buf}); err != nil {
					b.Fatal(err)
				}
				if err := r.RegisterFiles([]int32{fd}); err != nil {
					b.Fatal(err)
				}
				fd, sqeFlags = 0, SQEFixedFile
			}
			rng := uint64(0x9e3779b97f4a7c15)
			queue := func(slot uint64) {
				rng ^= rng << 13
				rng ^= rng >> 7
				rng ^= rng << 17
				off := (rng % blocks) * bs
				sqe := r.SQE()
				dst := buf[slot*bs : (slot+1)*bs]
				if fixed {
					sqe.PrepReadFixed(fd, dst, off, 0)
				} else {
					sqe.PrepRead(fd, dst, off)
				}
				sqe.Flags = sqeFlags
				sqe.UserData = slot
			}
			var cqes [qd]CQE
			b.ReportAllocs()
			b.ResetTimer()
			issued, inflight := 0, 0
			for s := uint64(0); s < qd && issued < b.N; s++ {
				queue(s)
				issued++
				inflight++
			}
			for inflight > 0 {
				n, err := r.WaitCQEs(cqes[:], 1)
				if err != nil {
					b.Fatal(err)
				}
				for _, c := range cqes[:n] {
					if c.Res != bs {
						b.Fatalf("read res %d", c.Res)
					}
					inflight--
					if issued < b.N {
						queue(c.UserData)
						issued++
						inflight++
					}
				}
			}
		})
	}
}
