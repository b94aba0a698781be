package main

// The devices of the node service: each is served by a torusblk process of
// its own (attach, or recover after its server died), started in a session
// of its own so that it outlives the plugin, with its state file in the
// run directory (internal/blockdev) from which a restarted plugin adopts it.
//
// Invariants:
//   - The run directory is the only record of what this host serves: a
//     volume is staged here iff a state file there names it (with this
//     cluster's prefix). The plugin keeps no state of its own.
//   - Calls about one volume are serialised (node.locks), and a device
//     being recovered at start holds its volume's lock until it serves.
//   - A device server's output goes to a file, never to a pipe of the
//     plugin: a server writing to a dead plugin's pipe would die with it.

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/torus-storage/torus/internal/blockdev"
	"github.com/torus-storage/torus/meta"
)

// maxLog is the size above which a device server's log file starts
// afresh at the next server's start.
const maxLog = 4 << 20

// readyTimeout bounds how long a device server may take to serve, on top of
// the wait for another holder's lease.
const readyTimeout = 90 * time.Second

// served returns the state of the device that serves volume vol on this
// host, or nil.
func (n *node) served(vol string) (*blockdev.State, error) {
	sts, err := blockdev.List(n.cfg.runDir)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "run dir %s: %v", n.cfg.runDir, err)
	}
	for i := range sts {
		if n.ours(&sts[i]) && sts[i].Source.Volume == vol {
			return &sts[i], nil
		}
	}
	return nil, nil
}

// ours reports whether st is a device of a volume of this cluster.
func (n *node) ours(st *blockdev.State) bool {
	return st.Source.Volume != "" && st.Source.Prefix == n.cfg.cluster.Prefix
}

// logPath is the file a device server of vol writes its log to.
func (n *node) logPath(vol string) string {
	return filepath.Join(n.cfg.runDir, "csi", vol+".log")
}

// spawn starts torusblk with args, in a session of its own, its output
// appended to vol's log file; a goroutine reaps it and reports its exit on
// the returned channel.
func (n *node) spawn(vol string, args ...string) (*exec.Cmd, <-chan error, error) {
	lp := n.logPath(vol)
	if err := os.MkdirAll(filepath.Dir(lp), 0o755); err != nil {
		return nil, nil, err
	}
	flags := os.O_CREATE | os.O_WRONLY | os.O_APPEND
	if fi, err := os.Stat(lp); err == nil && fi.Size() > maxLog {
		flags |= os.O_TRUNC // /run is memory: keep a volume's log small
	}
	f, err := os.OpenFile(lp, flags, 0o644)
	if err != nil {
		return nil, nil, err
	}
	defer f.Close()
	fmt.Fprintf(f, "--- %s torus-csi: torusblk %s\n", time.Now().Format(time.RFC3339), strings.Join(args, " "))
	cmd := exec.Command(n.cfg.torusblk, args...)
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return nil, nil, fmt.Errorf("starting %s: %w", n.cfg.torusblk, err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	return cmd, exited, nil
}

// attach starts a device server for volume vol and waits until it serves.
// While another host holds the volume's attach lock, the server waits up
// to leaseWait for that lease to expire (a host that died): then it takes
// the lock, which fences the old holder. A holder still alive after that
// fails the stage with FAILED_PRECONDITION.
func (n *node) attach(ctx context.Context, vol string) (*blockdev.State, error) {
	c := n.cfg
	args := []string{"attach", "--etcd", c.cluster.Etcd, "--prefix", c.cluster.Prefix, "--tls-dir", c.tlsDir,
		"--run-dir", c.runDir, "--mode", string(n.mode), "--lease-ttl", c.leaseTTL.String(),
		"--wait", n.leaseWait().String(), "--holder", "torus-csi node " + c.nodeID, "--", vol}
	return n.start(ctx, vol, args...)
}

// leaseWait is how long a stage waits for another holder's attach lock: a
// lease of this host's length, and some slack.
func (n *node) leaseWait() time.Duration { return n.cfg.leaseTTL + 5*time.Second }

// recoverDevice starts a server for st's ublk device, whose server died: the
// kernel kept the device and queued its I/O (ublk user recovery), so a
// mounted filesystem sees a pause, not an error.
func (n *node) recoverDevice(ctx context.Context, st *blockdev.State) (*blockdev.State, error) {
	n.log.Warn("the server of a device died; recovering it", "volume", st.Source.Volume, "device", st.Device, "pid", st.PID)
	ttl := n.cfg.leaseTTL
	if d, err := time.ParseDuration(st.Source.TTL); err == nil && d > ttl {
		ttl = d // the dead server's lease, which must expire first
	}
	return n.start(ctx, st.Source.Volume, "recover", "--run-dir", n.cfg.runDir, "--wait", (ttl + n.leaseWait()).String(), st.Device)
}

// start runs torusblk args for volume vol and waits until its state file
// names the new process, i.e. the device serves.
func (n *node) start(ctx context.Context, vol string, args ...string) (*blockdev.State, error) {
	lp := n.logPath(vol)
	var from int64
	if fi, err := os.Stat(lp); err == nil {
		from = fi.Size()
	}
	cmd, exited, err := n.spawn(vol, args...)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "volume %s: %v", vol, err)
	}
	pid := cmd.Process.Pid
	deadline := time.Now().Add(n.leaseWait() + n.cfg.leaseTTL + readyTimeout)
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		if st, err := n.served(vol); err == nil && st != nil && st.PID == pid {
			n.relay(vol, lp, from)
			n.log.Info("device serves", "volume", vol, "device", st.Device, "mode", st.Mode, "pid", pid)
			return st, nil
		}
		select {
		case err := <-exited:
			n.relay(vol, lp, from)
			return nil, serverError(vol, lp, from, err)
		case <-ctx.Done():
			n.log.Warn("the call ended before the device served; stopping its server", "volume", vol, "pid", pid)
			stopServer(cmd, exited)
			return nil, status.FromContextError(ctx.Err()).Err()
		case <-tick.C:
			if time.Now().After(deadline) {
				stopServer(cmd, exited)
				return nil, status.Errorf(codes.DeadlineExceeded, "volume %s: torusblk did not serve a device in time (log: %s)", vol, lp)
			}
		}
	}
}

// stopServer ends a server that has not served yet, and waits for it to
// exit (it removes its device), so that the next call on the volume does
// not find it half gone.
func stopServer(cmd *exec.Cmd, exited <-chan error) {
	cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-exited:
	case <-time.After(30 * time.Second):
		cmd.Process.Kill()
		<-exited
	}
}

// relay copies what a device server logged since offset from (its start
// up to serving: waits for leases, fencing) into the plugin's log.
func (n *node) relay(vol, lp string, from int64) {
	b := logSince(lp, from)
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		if l := strings.TrimSpace(sc.Text()); l != "" && !strings.HasPrefix(l, "--- ") {
			n.log.Info("torusblk", "volume", vol, "line", l)
		}
	}
}

// logSince returns the end of file lp from offset from (at most 64 KiB).
func logSince(lp string, from int64) []byte {
	f, err := os.Open(lp)
	if err != nil {
		return nil
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil || from > fi.Size() {
		from = 0 // truncated since
	}
	if fi != nil && fi.Size()-from > 64<<10 {
		from = fi.Size() - 64<<10
	}
	b, _ := io.ReadAll(io.NewSectionReader(f, from, 1<<20))
	return b
}

// serverError is the status of a device server that exited before it
// served: its last line says why. A volume attached elsewhere is
// FAILED_PRECONDITION, a missing one NOT_FOUND.
func serverError(vol, lp string, from int64, exit error) error {
	var last string
	for l := range strings.SplitSeq(string(logSince(lp, from)), "\n") {
		if l = strings.TrimSpace(l); l != "" {
			last = l
		}
	}
	if last == "" {
		last = fmt.Sprint(exit)
	}
	switch {
	case strings.Contains(last, meta.ErrNotHolder.Error()):
		return status.Errorf(codes.FailedPrecondition, "volume %s was attached by another client since this host's device served it (this host is fenced): %s", vol, last)
	case strings.Contains(last, meta.ErrAttached.Error()):
		return status.Errorf(codes.FailedPrecondition, "volume %s is served by another host, which still renews its attach lock (one writer at a time): %s", vol, last)
	case strings.Contains(last, "not found"):
		return status.Errorf(codes.NotFound, "volume %s: %s", vol, last)
	}
	return status.Errorf(codes.Internal, "volume %s: torusblk failed (%v): %s (log: %s)", vol, exit, last, lp)
}

// abandonIfTaken stops st's device when its recovery failed because
// another host holds the volume now: this host is fenced, and its device
// fails its I/O instead of queueing it forever, so that the CO can
// unpublish and unstage it (an unmount would wait on queued I/O).
func (n *node) abandonIfTaken(st *blockdev.State, err error) bool {
	if !taken(err) {
		return false
	}
	if serr := blockdev.Stop(st.Device, n.cfg.runDir); serr != nil {
		n.log.Error("stopping a device whose volume another host holds failed", "volume", st.Source.Volume, "device", st.Device, "err", serr)
		return false
	}
	n.log.Warn("another host holds the volume now: this host's device is stopped and fails its I/O (its writes were fenced); unpublish and unstage it",
		"volume", st.Source.Volume, "device", st.Device)
	return true
}

// taken reports whether err says that another client attached the volume
// since this host's device served it.
func taken(err error) bool {
	return err != nil && strings.Contains(err.Error(), meta.ErrNotHolder.Error())
}

// detach stops the server of st's device, which removes the device.
func (n *node) detach(st *blockdev.State) error {
	if err := blockdev.Detach(st.Device, n.cfg.runDir, 60*time.Second, n.log); err != nil {
		return status.Errorf(codes.Internal, "volume %s: detaching %s: %v", st.Source.Volume, st.Device, err)
	}
	os.Remove(n.logPath(st.Source.Volume))
	return nil
}

// adopt takes over the devices a previous plugin left in the run directory:
// a live server goes on as it is; a ublk device whose server died is
// recovered (its volume locked until it serves); a kernel NBD device whose
// server died cannot be, and is reported. It returns once every recovery
// has started.
func (n *node) adopt(ctx context.Context) error {
	sts, err := blockdev.List(n.cfg.runDir)
	if err != nil {
		return fmt.Errorf("run dir %s: %w", n.cfg.runDir, err)
	}
	for i := range sts {
		st := &sts[i]
		if !n.ours(st) {
			continue
		}
		vol := st.Source.Volume
		switch {
		case st.ServerAlive():
			n.log.Info("adopted a device: its server outlived the previous plugin", "volume", vol, "device", st.Device, "pid", st.PID)
		case st.Mode == blockdev.ModeUblk:
			unlock := n.locks.lock(vol)
			n.recovering.Add(1)
			go func() {
				defer n.recovering.Done()
				defer unlock()
				_, rerr := n.recoverDevice(ctx, st)
				if rerr != nil {
					n.log.Error("recovering a device failed: its I/O waits until it is recovered (torusblk recover) or removed (torusblk detach)",
						"volume", vol, "device", st.Device, "err", rerr)
				}
				n.abandonIfTaken(st, rerr)
			}()
		default:
			n.log.Error("the server of a kernel NBD device died: the kernel fails its I/O, and it cannot be taken over; unstage the volume (move or restart its pod) to attach it again",
				"volume", vol, "device", st.Device, "pid", st.PID)
		}
	}
	return nil
}

// keyedMutex serialises calls per key.
type keyedMutex struct {
	mu   sync.Mutex
	held map[string]chan struct{}
}

// lock waits until key is free, takes it and returns its unlock.
func (k *keyedMutex) lock(key string) func() {
	for {
		k.mu.Lock()
		if k.held == nil {
			k.held = make(map[string]chan struct{})
		}
		ch, busy := k.held[key]
		if !busy {
			ch = make(chan struct{})
			k.held[key] = ch
			k.mu.Unlock()
			return func() {
				k.mu.Lock()
				delete(k.held, key)
				k.mu.Unlock()
				close(ch)
			}
		}
		k.mu.Unlock()
		<-ch
	}
}

// errNotStaged is the error of a call on a volume this host does not serve.
var errNotStaged = errors.New("not staged on this node")
