package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"time"
)

// proc is a child process running in its own process group, with stdout and
// stderr going to a log file.
type proc struct {
	name string
	cmd  *exec.Cmd
	log  string
	done chan struct{} // closed when the process has been reaped
	err  error         // the exit status; valid once done is closed
}

// startProc starts name with args in a new process group, logging its output
// to logPath.
func startProc(ctx context.Context, logPath, name string, args ...string) (*proc, error) {
	f, err := os.Create(logPath)
	if err != nil {
		return nil, fmt.Errorf("start %s: create log: %w", name, err)
	}
	cmd := exec.Command(name, args...)
	cmd.Stdout = f
	cmd.Stderr = f
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		f.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &proc{name: name, cmd: cmd, log: logPath, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		f.Close()
		close(p.done)
	}()
	return p, nil
}

// wait waits for the process to exit; if ctx ends first it kills the group.
func (p *proc) wait(ctx context.Context) error {
	select {
	case <-p.done:
		return p.err
	case <-ctx.Done():
		p.stop()
		return fmt.Errorf("%s: %w", p.name, ctx.Err())
	}
}

// exited reports whether the process has exited.
func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// stop sends SIGTERM to the process group, then SIGKILL if it is still there
// after a grace period, and waits until the leader is reaped. Stopping an
// exited process only sweeps up what is left of its group.
func (p *proc) stop() {
	pgid := p.cmd.Process.Pid
	_ = syscall.Kill(-pgid, syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(5 * time.Second):
	}
	// Kill stragglers in the group (and the leader if it ignored SIGTERM).
	_ = syscall.Kill(-pgid, syscall.SIGKILL)
	<-p.done
}

// tail returns the last lines of the process's log, for error messages.
func (p *proc) tail() string {
	b, err := os.ReadFile(p.log)
	if err != nil {
		return "no log: " + err.Error()
	}
	s := strings.TrimSpace(string(b))
	lines := strings.Split(s, "\n")
	if len(lines) > 8 {
		lines = lines[len(lines)-8:]
	}
	return "log " + p.log + ": " + strings.Join(lines, " | ")
}

// waitSocket polls until a unix socket accepts a connection, the process
// exits, or the timeout passes.
func waitSocket(ctx context.Context, p *proc, sock string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		c, err := net.DialTimeout("unix", sock, time.Second)
		if err == nil {
			c.Close()
			return nil
		}
		if p.exited() {
			return fmt.Errorf("%s exited before %s was ready: %v (%s)", p.name, sock, p.err, p.tail())
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: socket %s not ready after %v: %w (%s)", p.name, sock, timeout, err, p.tail())
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s: waiting for %s: %w", p.name, sock, ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// errMissing marks a peer binary that is not installed.
var errMissing = errors.New("not installed")
