package testcluster

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func sh(script string) Spec { return Spec{Name: "sh", Bin: "/bin/sh", Args: []string{"-c", script}} }

// TestProcTerminate: a clean exit on SIGTERM is nil, a process that ignores
// it is killed after the grace period, and one that had failed says so.
func TestProcTerminate(t *testing.T) {
	p := StartT(t, sh(`trap 'exit 0' TERM; echo up >&2; while :; do sleep 0.05; done`))
	p.WaitLog(t, `up`)
	if err := p.Terminate(5 * time.Second); err != nil {
		t.Fatalf("clean exit on SIGTERM: %v", err)
	}
	p = StartT(t, sh(`trap '' TERM; echo up >&2; while :; do sleep 0.05; done`))
	p.WaitLog(t, `up`)
	if err := p.Terminate(200 * time.Millisecond); err == nil || !strings.Contains(err.Error(), "did not exit") {
		t.Fatalf("SIGTERM ignored: %v, want killed after the grace period", err)
	}
	p = StartT(t, sh(`exit 3`))
	<-p.Done()
	if err := p.Terminate(time.Second); err == nil || p.ExitCode() != 3 {
		t.Fatalf("terminating a process that exited with 3: %v, code %d", err, p.ExitCode())
	}
}

// TestProcGroup: Terminate of a process in its own group also ends the
// children it left behind.
func TestProcGroup(t *testing.T) {
	pidFile := filepath.Join(t.TempDir(), "child")
	spec := sh(`sleep 60 & echo $! > ` + pidFile + `; wait`)
	spec.Group = true
	p := StartT(t, spec)
	var pid string
	for deadline := time.Now().Add(10 * time.Second); pid == ""; time.Sleep(20 * time.Millisecond) {
		b, _ := os.ReadFile(pidFile)
		pid = strings.TrimSpace(string(b))
		if time.Now().After(deadline) {
			t.Fatal("no child started")
		}
	}
	p.Terminate(5 * time.Second)
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if _, err := os.Stat("/proc/" + pid); err != nil {
			break
		}
		if b, _ := os.ReadFile("/proc/" + pid + "/stat"); strings.Contains(string(b), ") Z ") {
			break // a zombie waiting for init: ended
		}
		if time.Now().After(deadline) {
			t.Fatalf("child %s of the group still runs after Terminate", pid)
		}
	}
}

// TestProcOutput: stdout apart from the log, a log file, AwaitLog's
// submatch and its early end when the process exits, and AwaitSocket's.
func TestProcOutput(t *testing.T) {
	spec := sh(`echo one; echo two; echo 'ready addr=x:1' >&2`)
	spec.SeparateStdout = true
	p := StartT(t, spec)
	if got := p.WaitLog(t, `ready addr=(\S+)`); got != "x:1" {
		t.Fatalf("submatch %q", got)
	}
	if lines := p.WaitStdout(t, 2); len(lines) != 2 || lines[1] != "two" || strings.Contains(p.Log(), "one") {
		t.Fatalf("stdout %q, log %q", lines, p.Log())
	}
	if code := p.WaitExit(t); code != 0 {
		t.Fatalf("exit %d", code)
	}
	if _, err := p.AwaitLog(`never`, 10*time.Second); !errors.Is(err, ErrExited) {
		t.Fatalf("AwaitLog on an exited process: %v, want ErrExited", err)
	}
	if err := p.AwaitSocket(context.Background(), filepath.Join(t.TempDir(), "s"), 10*time.Second); !errors.Is(err, ErrExited) {
		t.Fatalf("AwaitSocket on an exited process: %v, want ErrExited", err)
	}

	spec = sh(`echo to-file; echo err >&2`)
	spec.LogFile = filepath.Join(t.TempDir(), "log")
	p = StartT(t, spec)
	p.WaitExit(t)
	if got := p.Log(); got != "to-file\nerr\n" || p.LogFile() != spec.LogFile {
		t.Fatalf("log file holds %q", got)
	}
}

// TestProcKillThenStop: Stop leaves a process the test killed alone.
func TestProcKillThenStop(t *testing.T) {
	p := StartT(t, sh(`while :; do sleep 0.05; done`))
	p.Kill()
	p.Stop(t)
	if !p.Exited() || p.ExitCode() != -1 {
		t.Fatalf("exited %v, code %d", p.Exited(), p.ExitCode())
	}
}
