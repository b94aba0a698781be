package procs

import (
	"context"
	"runtime"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// waitFor polls cond for up to d.
func waitFor(d time.Duration, cond func() bool) bool {
	for end := time.Now().Add(d); time.Now().Before(end); time.Sleep(5 * time.Millisecond) {
		if cond() {
			return true
		}
	}
	return cond()
}

func TestKeeper(t *testing.T) {
	oTick, oWin, oPoll, oBusy := keepTick, keepWindow, keepIdlePoll, keepBusy
	t.Cleanup(func() { keepTick, keepWindow, keepIdlePoll, keepBusy = oTick, oWin, oPoll, oBusy })
	keepTick, keepWindow, keepIdlePoll, keepBusy = time.Millisecond, 20, 20*time.Millisecond, 100

	var k Keeper
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { k.Keep(ctx); close(done) }()

	time.Sleep(150 * time.Millisecond)
	if k.Active() {
		t.Fatal("keeper active in an idle process")
	}
	// A thread that blocks briefly over and over: many context switches,
	// like a process serving small requests.
	stop := make(chan struct{})
	loadDone := make(chan struct{})
	go func() {
		defer close(loadDone)
		runtime.LockOSThread()
		ts := unix.NsecToTimespec(20_000)
		for {
			select {
			case <-stop:
				return
			default:
			}
			_ = unix.Nanosleep(&ts, nil)
		}
	}()
	if !waitFor(3*time.Second, k.Active) {
		t.Fatal("keeper did not become active under load")
	}
	close(stop)
	<-loadDone
	if !waitFor(3*time.Second, func() bool { return !k.Active() }) {
		t.Fatal("keeper stayed active after the load stopped")
	}
	cancel()
	select {
	case <-done:
	case <-time.After(3 * time.Second):
		t.Fatal("Keep did not return after its context ended")
	}
}
