// Package procs tunes the Go scheduler for the I/O servers: Set chooses
// GOMAXPROCS for processes whose store shards block in io_uring_enter, and
// Keeper (keep.go) keeps the runtime's sysmon from sleeping and waking on
// every request of a lightly loaded client.
//
// Every store shard is a goroutine locked to its OS thread that spends most
// of its life blocked in io_uring_enter. A goroutine blocked in a system call
// keeps its P (in syscall state) until sysmon retakes it, which takes from
// 20 µs up to 10 ms when sysmon has backed off. With the default GOMAXPROCS
// (one P per CPU) and one shard per CPU, all Ps can sit in syscalls while the
// NBD, QUIC and node goroutines are runnable: each hand-off then waits for
// sysmon. Giving the runtime one extra P per blocking thread lets those
// goroutines run at once; the shards' Ps are idle in the kernel, so this adds
// no CPU contention beyond what the kernel scheduler already arbitrates.
//
// Invariant: Set runs once, before the stores start their shards, and only
// raises GOMAXPROCS in the automatic mode.
package procs

import (
	"fmt"
	"log/slog"
	"os"
	"runtime"
)

// Auto asks Set for NumCPU plus one P per blocking thread.
const Auto = 0

// Set applies a --gomaxprocs flag value. n > 0 sets GOMAXPROCS to n; n < 0
// leaves the runtime's default; n == Auto sets it to NumCPU + threads, where
// threads is the number of OS threads that block in io_uring_enter (0
// meaning one per CPU, a single store's default), unless the GOMAXPROCS
// environment variable is set, which then wins. It returns the value in
// effect.
func Set(n, threads int, log *slog.Logger) (int, error) {
	switch {
	case n < 0:
		return runtime.GOMAXPROCS(0), nil
	case n > 0:
		runtime.GOMAXPROCS(n)
		log.Debug("gomaxprocs", "procs", n, "source", "flag")
		return n, nil
	}
	if env := os.Getenv("GOMAXPROCS"); env != "" {
		return runtime.GOMAXPROCS(0), nil
	}
	if threads < 0 {
		return 0, fmt.Errorf("gomaxprocs: %d blocking threads: must not be negative", threads)
	}
	cpus := runtime.NumCPU()
	if threads == 0 {
		threads = cpus
	}
	p := cpus + threads
	runtime.GOMAXPROCS(p)
	log.Debug("gomaxprocs", "procs", p, "cpus", cpus, "threads", threads)
	return p, nil
}
