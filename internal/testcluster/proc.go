package testcluster

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// DefaultStopTimeout is how long Stop waits for a process to exit after
// SIGTERM unless its Spec says otherwise.
const DefaultStopTimeout = 30 * time.Second

// waitTimeout bounds WaitLog, WaitStdout and WaitExit.
const waitTimeout = 30 * time.Second

// ErrExited says that a process exited while it was being waited for.
var ErrExited = errors.New("process exited")

// Spec says how to start a process.
type Spec struct {
	// Name names the process in messages; the binary's base name if empty.
	Name string
	// Bin is the program; Args its arguments.
	Bin  string
	Args []string
	// Env is added to this process's environment (as it is at Start, so
	// t.Setenv before Start reaches the child).
	Env []string
	// SeparateStdout keeps stdout apart from the log (see Proc.Stdout);
	// otherwise stdout and stderr both go to the log.
	SeparateStdout bool
	// LogFile, if set, is created and receives the log instead of memory.
	LogFile string
	// Group starts the process in a process group of its own, which
	// Terminate and Kill signal as a whole.
	Group bool
	// StopTimeout is how long Stop and a cancelled Wait give the process to
	// exit after SIGTERM; DefaultStopTimeout if zero.
	StopTimeout time.Duration
	// LogOnFailure makes StartT's cleanup write the process's log to the
	// test's output when the test failed.
	LogOnFailure bool
}

// Proc is a child process whose output is kept for assertions and failure
// messages.
type Proc struct {
	spec   Spec
	cmd    *exec.Cmd
	log    *syncBuffer // nil with spec.LogFile
	stdout *syncBuffer // nil unless spec.SeparateStdout
	done   chan struct{}
	err    error // the exit status; valid once done is closed
	killed atomic.Bool
}

// syncBuffer is a bytes.Buffer safe for the process's writer and the test.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// Start starts the process of spec.
func Start(spec Spec) (*Proc, error) {
	if spec.Name == "" {
		spec.Name = filepath.Base(spec.Bin)
	}
	if spec.StopTimeout == 0 {
		spec.StopTimeout = DefaultStopTimeout
	}
	p := &Proc{spec: spec, cmd: exec.Command(spec.Bin, spec.Args...), done: make(chan struct{})}
	p.cmd.Env = append(os.Environ(), spec.Env...)
	var f *os.File
	if spec.LogFile != "" {
		var err error
		if f, err = os.Create(spec.LogFile); err != nil {
			return nil, fmt.Errorf("start %s: create log: %w", spec.Name, err)
		}
		p.cmd.Stdout, p.cmd.Stderr = f, f
	} else {
		p.log = new(syncBuffer)
		p.cmd.Stdout, p.cmd.Stderr = p.log, p.log
	}
	if spec.SeparateStdout {
		p.stdout = new(syncBuffer)
		p.cmd.Stdout = p.stdout
	}
	if spec.Group {
		p.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	}
	if err := p.cmd.Start(); err != nil {
		if f != nil {
			f.Close()
		}
		return nil, fmt.Errorf("start %s: %w", spec.Name, err)
	}
	go func() {
		p.err = p.cmd.Wait()
		if f != nil {
			f.Close()
		}
		close(p.done)
	}()
	return p, nil
}

// StartT starts the process of spec for test t, failing the test if it
// cannot; the process is killed when the test ends.
func StartT(t testing.TB, spec Spec) *Proc {
	t.Helper()
	p, err := Start(spec)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		p.Kill()
		if p.spec.LogOnFailure && t.Failed() {
			t.Logf("%s %q log:\n%s", p.spec.Name, p.spec.Args, p.Log())
		}
	})
	return p
}

// Name returns the process's name in messages.
func (p *Proc) Name() string { return p.spec.Name }

// Pid returns the process id.
func (p *Proc) Pid() int { return p.cmd.Process.Pid }

// Signal sends sig to the process (not to its group).
func (p *Proc) Signal(sig os.Signal) error {
	if err := p.cmd.Process.Signal(sig); err != nil {
		return fmt.Errorf("signal %s to %s: %w", sig, p.spec.Name, err)
	}
	return nil
}

// signalAll sends sig to the process, or to its group.
func (p *Proc) signalAll(sig syscall.Signal) {
	if p.spec.Group {
		_ = syscall.Kill(-p.cmd.Process.Pid, sig)
		return
	}
	if !p.Exited() {
		_ = p.cmd.Process.Signal(sig)
	}
}

// Done is closed once the process has exited and been reaped.
func (p *Proc) Done() <-chan struct{} { return p.done }

// Exited reports whether the process has exited.
func (p *Proc) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// Err returns the process's exit status: nil for a clean exit, and nil
// while it runs.
func (p *Proc) Err() error {
	if !p.Exited() {
		return nil
	}
	return p.err
}

// ExitCode returns the process's exit code, or -1 while it runs or if a
// signal ended it.
func (p *Proc) ExitCode() int {
	if !p.Exited() {
		return -1
	}
	return p.cmd.ProcessState.ExitCode()
}

// Log returns what the process logged: stderr, and stdout unless the Spec
// keeps it apart.
func (p *Proc) Log() string {
	if p.log != nil {
		return p.log.String()
	}
	b, err := os.ReadFile(p.spec.LogFile)
	if err != nil {
		return "no log: " + err.Error()
	}
	return string(b)
}

// LogFile returns the file the log goes to, or "" if it is kept in memory.
func (p *Proc) LogFile() string { return p.spec.LogFile }

// Stdout returns what the process printed on stdout if the Spec keeps it
// apart from the log, else "".
func (p *Proc) Stdout() string {
	if p.stdout == nil {
		return ""
	}
	return p.stdout.String()
}

// Kill kills the process (its group, with Group) with SIGKILL, after a
// SIGCONT in case it was stopped, and waits until it is reaped. A process
// killed so counts as stopped: Stop does nothing after Kill.
func (p *Proc) Kill() {
	if !p.Exited() {
		p.killed.Store(true)
	}
	p.signalAll(syscall.SIGCONT)
	p.signalAll(syscall.SIGKILL)
	<-p.done
}

// Terminate sends SIGTERM (to the group, with Group) and waits up to grace
// for the exit; a process still there then is killed with SIGKILL, and so
// is whatever is left of its group. It returns nil for a clean exit, else
// why not. Terminating a process that had exited reports how it exited.
func (p *Proc) Terminate(grace time.Duration) error {
	if p.Exited() {
		p.signalAll(syscall.SIGKILL) // sweep the group
		if p.err != nil {
			return fmt.Errorf("%s had exited with %w", p.spec.Name, p.err)
		}
		return nil
	}
	p.signalAll(syscall.SIGTERM)
	var err error
	select {
	case <-p.done:
		if p.err != nil {
			err = fmt.Errorf("%s exited with %w after SIGTERM", p.spec.Name, p.err)
		}
	case <-time.After(grace):
		err = fmt.Errorf("%s did not exit within %v of SIGTERM (killed)", p.spec.Name, grace)
	}
	p.signalAll(syscall.SIGKILL)
	<-p.done
	return err
}

// Stop terminates the process (see Terminate, with the Spec's
// StopTimeout) and fails the test unless it exits cleanly. A process the
// test killed (Kill) is left alone.
func (p *Proc) Stop(t testing.TB) {
	t.Helper()
	if p.killed.Load() {
		return
	}
	if err := p.Terminate(p.spec.StopTimeout); err != nil {
		t.Fatalf("%v\n%s", err, p.Log())
	}
}

// Wait waits for the process to exit and returns its exit status; if ctx
// ends first, the process is terminated (with the Spec's StopTimeout) and
// the error says so.
func (p *Proc) Wait(ctx context.Context) error {
	select {
	case <-p.done:
		return p.err
	case <-ctx.Done():
		p.Terminate(p.spec.StopTimeout)
		return fmt.Errorf("%s: %w", p.spec.Name, ctx.Err())
	}
}

// WaitExit waits up to 30 s for the process to exit by itself and returns
// its exit code; it fails the test if the process is still running.
func (p *Proc) WaitExit(t testing.TB) int {
	t.Helper()
	select {
	case <-p.done:
	case <-time.After(waitTimeout):
		t.Fatalf("%s still running\n%s", p.spec.Name, p.Log())
	}
	return p.cmd.ProcessState.ExitCode()
}

// AwaitLog waits up to limit until the log matches the regular expression
// re and returns the match and its submatches. It fails early if the
// process exits without a match (errors.Is ErrExited).
func (p *Proc) AwaitLog(re string, limit time.Duration) ([]string, error) {
	rx, err := regexp.Compile(re)
	if err != nil {
		return nil, fmt.Errorf("await log of %s: %w", p.spec.Name, err)
	}
	deadline := time.Now().Add(limit)
	for {
		if m := rx.FindStringSubmatch(p.Log()); m != nil {
			return m, nil
		}
		select {
		case <-p.done:
			if m := rx.FindStringSubmatch(p.Log()); m != nil {
				return m, nil
			}
			return nil, fmt.Errorf("%s exited (%v) before logging %q: %w", p.spec.Name, p.err, re, ErrExited)
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("%s did not log %q within %v", p.spec.Name, re, limit)
		}
	}
}

// WaitLog waits up to 30 s until the log matches the regular expression re
// and returns its first submatch (the whole match if it has none); it fails
// the test if the process exits first or the time runs out.
func (p *Proc) WaitLog(t testing.TB, re string) string {
	t.Helper()
	m, err := p.AwaitLog(re, waitTimeout)
	if err != nil {
		t.Fatalf("%v\n%s", err, p.Log())
	}
	if len(m) > 1 {
		return m[1]
	}
	return m[0]
}

// WaitStdout waits up to 30 s until the process printed n lines on its
// separate stdout and returns them.
func (p *Proc) WaitStdout(t testing.TB, n int) []string {
	t.Helper()
	deadline := time.Now().Add(waitTimeout)
	for {
		out := p.Stdout()
		if strings.Count(out, "\n") >= n {
			return strings.Split(strings.TrimSpace(out), "\n")
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s printed %q, want %d lines\n%s", p.spec.Name, out, n, p.Log())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// AwaitSocket polls until the unix socket sock accepts a connection, the
// process exits (errors.Is ErrExited), timeout passes or ctx ends.
func (p *Proc) AwaitSocket(ctx context.Context, sock string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		c, err := net.DialTimeout("unix", sock, time.Second)
		if err == nil {
			c.Close()
			return nil
		}
		if p.Exited() {
			return fmt.Errorf("%s exited (%v) before %s was ready: %w", p.spec.Name, p.err, sock, ErrExited)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: socket %s not ready after %v: %w", p.spec.Name, sock, timeout, err)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s: waiting for %s: %w", p.spec.Name, sock, ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}
