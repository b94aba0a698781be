package main

// GOMAXPROCS for the serving commands.
//
// Every store shard is a goroutine locked to its OS thread that spends most
// of its life blocked in io_uring_enter. A goroutine blocked in a system call
// keeps its P (in syscall state) until sysmon retakes it, which takes from
// 20 µs up to 10 ms when sysmon has backed off. With the default GOMAXPROCS
// (one P per CPU) and one shard per CPU, all Ps can sit in syscalls while the
// NBD reader and writer goroutines are runnable: each hand-off then waits for
// sysmon. Giving the runtime one extra P per shard lets those goroutines run
// at once; the shards' Ps are idle in the kernel, so this adds no CPU
// contention beyond what the kernel scheduler already arbitrates.
//
// Invariant: setProcs runs once, before the store starts its shards, and
// only raises GOMAXPROCS in the automatic mode.

import (
	"fmt"
	"log/slog"
	"os"
	"runtime"
)

// procsAuto asks setProcs for NumCPU plus one P per shard.
const procsAuto = 0

// setProcs applies --gomaxprocs. n > 0 sets GOMAXPROCS to n; n < 0 leaves
// the runtime's default; n == procsAuto sets it to NumCPU + shards (shards 0
// meaning one per CPU, the store's default) unless the GOMAXPROCS
// environment variable is set, which then wins. It returns the value in
// effect.
func setProcs(n, shards int, log *slog.Logger) (int, error) {
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
	cpus := runtime.NumCPU()
	if shards < 0 {
		return 0, fmt.Errorf("%w: --shards %d: must not be negative", errUsage, shards)
	}
	if shards == 0 {
		shards = cpus
	}
	p := cpus + shards
	runtime.GOMAXPROCS(p)
	log.Debug("gomaxprocs", "procs", p, "cpus", cpus, "shards", shards)
	return p, nil
}
