package procs

import (
	"context"
	"runtime"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// Why a keeper. A process serving request/response I/O at low queue depth
// (a QD1 client: fio → NBD → the replicated volume → a node and back) spends
// most of each request waiting for the peer with every P idle. When all Ps
// are idle the runtime's sysmon thread goes into a deep sleep, and the next
// goroutine to enter a system call wakes it (a futex wake on the request's
// path); sysmon then polls every 20 µs for a while and sleeps deeply again
// at the next idle moment. Measured on a replicated volume at QD1 read:
// sysmon's sleeps and wake-ups were 29% of the client's CPU samples and
// about two of its five context switches per request.
//
// The keeper is a goroutine that, while the process is busy, sits in a
// 2 ms nanosleep (a system call, so its P counts as running and sysmon
// never finds every P idle) and yields between sleeps (so sysmon sees its
// P make progress and does not retake it, which would reset sysmon to its
// 20 µs polling). sysmon then backs off to its 10 ms period. The keeper's
// own cost is one wake-up per 2 ms while busy. It decides whether the
// process is busy from the process's context-switch count (getrusage):
// every 100 ms while active, every keepIdlePoll while idle, so an idle
// daemon wakes ten times a second.

// Keeper tuning. Package variables only so the test can shorten them.
var (
	keepTick     = 2 * time.Millisecond   // one nanosleep while active
	keepWindow   = 50                     // ticks per activity check (100 ms)
	keepIdlePoll = 100 * time.Millisecond // activity check period while idle
	// keepBusy is the number of context switches of the process in one
	// check period, besides the keeper's own, above which it counts as
	// busy: 4000 a second, a few hundred requests a second.
	keepBusy = int64(400)
)

// Keeper reports what Keep is doing; the zero value is an idle keeper.
type Keeper struct {
	active atomic.Bool
}

// Active reports whether the keeper is holding a P (the process is busy).
func (k *Keeper) Active() bool { return k.active.Load() }

// Keep runs the keeper (see above) until ctx is done. It needs one P of
// its own while active: Set's automatic GOMAXPROCS leaves at least one
// spare when there is a blocking thread per CPU, and callers with no
// blocking threads still get CPUs + CPUs.
func (k *Keeper) Keep(ctx context.Context) {
	ts := unix.NsecToTimespec(int64(keepTick))
	last := switches()
	idle := time.NewTicker(keepIdlePoll)
	defer idle.Stop()
	for {
		// Idle: look at the switch count every keepIdlePoll.
		for {
			select {
			case <-ctx.Done():
				return
			case <-idle.C:
			}
			n := switches()
			busy := n-last >= keepBusy
			last = n
			if busy {
				break
			}
		}
		k.active.Store(true)
		for busy := true; busy; {
			for range keepWindow {
				_ = unix.Nanosleep(&ts, nil) // EINTR only shortens a tick
				runtime.Gosched()
			}
			if ctx.Err() != nil {
				k.active.Store(false)
				return
			}
			// The keeper's own switches: one per tick, plus a few.
			n := switches()
			busy = n-last >= keepBusy+int64(keepWindow)*2
			last = n
		}
		k.active.Store(false)
	}
}

// switches returns the context switches of the whole process so far.
func switches() int64 {
	var ru unix.Rusage
	if unix.Getrusage(unix.RUSAGE_SELF, &ru) != nil {
		return 0
	}
	return ru.Nvcsw + ru.Nivcsw
}
