// Package blockdev makes an engine.Volume a block device of the kernel, the
// device side of torusblk attach|recover|detach|list: ublk (/dev/ublkbN),
// or the kernel NBD client (/dev/nbdN) where ublk is missing. For every
// device it attaches it keeps a state file in a run directory
// (DefaultRunDir), from which Recover serves a ublk device again after its
// server died, List shows the devices and Detach stops them.
//
// Invariants:
//   - A device's state file is written, atomically (a temporary file
//     renamed over it), before the device is reported ready (Device.Serve's
//     ready), so every device a caller was told about can be listed,
//     detached and recovered.
//   - The state file is removed only once the device is gone and its volume
//     closed (Device.Serve), or by Detach once it removed a dead server's
//     device. A server killed with -9 leaves it behind: Recover reads it.
//   - A volume is closed only after its device is gone (Device.Serve,
//     Device.Close): the kernel has no request in flight to a closed volume.
//   - Recover takes over only a ublk device (the kernel NBD client drops its
//     device with its connections), and only once the process recorded as
//     serving it is gone.
//   - A device grows only after its volume did (Growable.Resized comes
//     after the volume takes requests up to its new Size), so the kernel
//     never sends a request past the volume's end; the growth loop ends
//     before the device is removed.
package blockdev

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/torus-storage/torus/engine"
	"github.com/torus-storage/torus/internal/units"
	"github.com/torus-storage/torus/meta"
	"github.com/torus-storage/torus/nbd"
	"github.com/torus-storage/torus/ublk"
)

// DefaultRunDir is where the state files are kept: one JSON file per
// attached device, named after it (ublkb0.json).
const DefaultRunDir = "/run/torus"

// Mode is how a volume becomes a block device.
type Mode string

// Modes.
const (
	// ModeAuto is ModeUblk when the kernel has ublk, else ModeNBD
	// (ResolveMode).
	ModeAuto Mode = "auto"
	// ModeUblk serves the device with ublk (package ublk).
	ModeUblk Mode = "ublk"
	// ModeNBD serves the device through the kernel NBD client (package nbd).
	ModeNBD Mode = "nbd"
)

// ResolveMode returns the mode to attach with: ModeAuto becomes ModeUblk
// when /dev/ublk-control is present, else ModeNBD (logged, with why). It
// fails if the kernel does not support the mode.
func ResolveMode(m Mode, log *slog.Logger) (Mode, error) {
	if m == ModeAuto {
		if uerr := ublk.Available(); uerr == nil {
			m = ModeUblk
			log.Info("mode auto: using ublk", "why", "/dev/ublk-control is present")
		} else {
			m = ModeNBD
			log.Info("mode auto: using kernel NBD", "why", uerr.Error())
		}
	}
	switch m {
	case ModeUblk:
		if err := ublk.Available(); err != nil {
			return "", err
		}
	case ModeNBD:
		if err := nbd.KernelAvailable(); err != nil {
			return "", err
		}
	default:
		return "", fmt.Errorf("blockdev: unknown mode %q: want ublk, nbd or auto", m)
	}
	return m, nil
}

// Source is the volume behind a device as its state file records it, for
// the attaching program to open again (Recover): a local store, or a
// cluster volume and how to reach its cluster. blockdev only keeps it.
type Source struct {
	// Store is the store (a file or a block device) of a local volume.
	Store string `json:"store,omitempty"`
	// Volume is the name of a cluster volume; Etcd, Prefix and TLSDir
	// reach its cluster.
	Volume string `json:"volume,omitempty"`
	Etcd   string `json:"etcd,omitempty"`
	Prefix string `json:"prefix,omitempty"`
	TLSDir string `json:"tls_dir,omitempty"`
	// TTL is the cluster volume's attach lease, as a time.Duration's text.
	TTL string `json:"lease_ttl,omitempty"`
	// ReplicaTimeout is the cluster volume's replica timeout, as a
	// time.Duration's text.
	ReplicaTimeout string `json:"replica_timeout,omitempty"`
	// Holder is who holds the attach lock (torusblk --holder), kept by
	// recover.
	Holder string `json:"holder,omitempty"`
	// Epoch is the attach epoch the device was served under: recover
	// resumes the device only if no other client attached the volume
	// since (cluster.AttachOptions.After).
	Epoch uint64 `json:"epoch,omitempty"`
}

// String names the volume: "cluster:NAME", or the local store's path.
func (s Source) String() string {
	if s.Volume != "" {
		return "cluster:" + s.Volume
	}
	return s.Store
}

// State is what the state file of an attached device records; its JSON
// form is the file's.
type State struct {
	// Device is the device's path.
	Device string `json:"device"`
	// Mode is ModeUblk or ModeNBD.
	Mode Mode `json:"mode"`
	// ID is the ublk device id or the nbd index.
	ID int `json:"id"`
	// Source is the volume behind the device.
	Source
	// Size is the volume's size in bytes.
	Size int64 `json:"size"`
	// PID is the process that serves the device, and Start its start time
	// (clock ticks after boot, /proc/PID/stat): a process with a reused
	// PID is not the server.
	PID   int    `json:"pid"`
	Start uint64 `json:"start,omitempty"`
	// Queues and Depth are the ublk queues and depth asked for (0: the
	// defaults).
	Queues int `json:"queues,omitempty"`
	Depth  int `json:"depth,omitempty"`
}

// ServerAlive reports whether the process recorded as serving the device
// still runs.
func (s *State) ServerAlive() bool {
	return alive(s.PID) && (s.Start == 0 || procStart(s.PID) == s.Start)
}

// alive reports whether process pid runs: it exists and is not a zombie
// (a server killed after its parent died waits as one until init reaps
// it).
func alive(pid int) bool {
	if pid <= 0 || syscall.Kill(pid, 0) != nil {
		return false
	}
	f := procStat(pid)
	return f == nil || f[0] != "Z" // no /proc: Kill's answer stands
}

// procStat returns the fields of /proc/PID/stat after the command name
// (the first is the state, field 3), or nil.
func procStat(pid int) []string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return nil
	}
	// pid (comm) S ...: comm may hold spaces and parentheses.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return nil
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 20 {
		return nil
	}
	return f
}

// procStart returns the start time of process pid (field 22 of
// /proc/PID/stat), or 0.
func procStart(pid int) uint64 {
	f := procStat(pid)
	if f == nil {
		return 0
	}
	n, _ := strconv.ParseUint(f[19], 10, 64)
	return n
}

func stateFile(runDir, device string) string {
	return filepath.Join(runDir, filepath.Base(device)+".json")
}

// save writes s to its state file in runDir, atomically.
func (s *State) save(runDir string) error {
	if err := os.MkdirAll(runDir, 0o755); err != nil {
		return fmt.Errorf("keeping attach state: %w", err)
	}
	if s.PID == os.Getpid() {
		s.Start = procStart(s.PID)
	}
	b, _ := json.MarshalIndent(s, "", "  ")
	tmp := stateFile(runDir, s.Device) + ".tmp"
	if err := os.WriteFile(tmp, append(b, '\n'), 0o644); err != nil {
		return fmt.Errorf("keeping attach state: %w", err)
	}
	if err := os.Rename(tmp, stateFile(runDir, s.Device)); err != nil {
		return fmt.Errorf("keeping attach state: %w", err)
	}
	return nil
}

// load reads the state file of device in runDir.
func load(runDir, device string) (*State, error) {
	b, err := os.ReadFile(stateFile(runDir, device))
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("%s was not attached by torusblk (no %s; see torusblk list)", device, stateFile(runDir, device))
	}
	if err != nil {
		return nil, fmt.Errorf("reading the attach state of %s: %w", device, err)
	}
	s := new(State)
	if err := json.Unmarshal(b, s); err != nil {
		return nil, fmt.Errorf("%s: %w", stateFile(runDir, device), err)
	}
	return s, nil
}

// List returns the devices whose state files are in runDir (nil for none,
// or when runDir does not exist). Files that do not parse are left out.
func List(runDir string) ([]State, error) {
	ents, err := os.ReadDir(runDir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("listing attached devices: %w", err)
	}
	var list []State
	for _, e := range ents {
		if !strings.HasSuffix(e.Name(), ".json") {
			continue
		}
		if s, err := load(runDir, strings.TrimSuffix(e.Name(), ".json")); err == nil {
			list = append(list, *s)
		}
	}
	return list, nil
}

// Options configure Attach.
type Options struct {
	// Mode is ModeUblk or ModeNBD (ResolveMode turns ModeAuto into one).
	Mode Mode
	// Queues and Depth configure a ublk device (ublk.Options; 0: the
	// defaults).
	Queues, Depth int
	// Conns is the number of kernel NBD connections.
	Conns int
	// RunDir is where the state file is kept (default DefaultRunDir).
	RunDir string
	// Logger receives progress (default slog.Default()).
	Logger *slog.Logger
}

// Device is a block device of the kernel serving a volume, from Attach or
// Recover until Serve returns (or Close).
type Device struct {
	st          State // st.Size changes under stMu once Serve runs
	stMu        sync.Mutex
	runDir      string
	vol         engine.Volume
	wait, close func() error
	log         *slog.Logger

	// grow makes the device bigger while it serves (nil: it cannot;
	// growWhy says why).
	grow    func(size int64) error
	growWhy string
}

// Growable is a volume that can grow while a device serves it
// (cluster.Attached, whose size follows its record in etcd): Serve grows
// the device after each Resized signal, and reports through ReportDevice
// what the device is and how it follows a growth (meta.Device), for
// torusctl volume resize.
type Growable interface {
	Resized() <-chan struct{}
	ReportDevice(ctx context.Context, d meta.Device) error
}

// epocher is a volume held under an attach epoch (a cluster volume).
type epocher interface{ Epoch() uint64 }

// Attach makes vol a block device of the kernel (opt.Mode); src is what
// the state file records of the volume, for Recover. The device serves
// vol until Serve returns, or Close. If Attach fails, vol is closed.
func Attach(ctx context.Context, vol engine.Volume, src Source, opt Options) (*Device, error) {
	if opt.RunDir == "" {
		opt.RunDir = DefaultRunDir
	}
	if opt.Logger == nil {
		opt.Logger = slog.Default()
	}
	if e, ok := vol.(epocher); ok {
		src.Epoch = e.Epoch()
	}
	d := &Device{
		st:     State{Mode: opt.Mode, PID: os.Getpid(), Source: src, Size: vol.Size()},
		runDir: opt.RunDir,
		vol:    vol,
		log:    opt.Logger,
	}
	switch opt.Mode {
	case ModeUblk:
		dev, err := ublk.Create(ctx, vol, ublk.Options{Queues: opt.Queues, Depth: opt.Depth, Recovery: true, Logger: opt.Logger})
		if err != nil {
			vol.Close()
			return nil, err
		}
		d.st.Device, d.st.ID, d.st.Queues, d.st.Depth = dev.Path(), dev.ID(), opt.Queues, opt.Depth
		d.wait, d.close = dev.Wait, dev.Close
		d.setGrow(dev.Resizable(), dev.SetSize)
	case ModeNBD:
		dev, err := nbd.AttachKernel(ctx, vol, nbd.AttachOptions{Index: -1, Conns: opt.Conns, Logger: opt.Logger})
		if err != nil {
			vol.Close()
			return nil, err
		}
		d.st.Device, d.st.ID = dev.Path(), dev.Index()
		d.wait, d.close = dev.Wait, dev.Close
		d.setGrow(dev.Resizable(), dev.SetSize)
	default:
		vol.Close()
		return nil, fmt.Errorf("blockdev: attach %s: mode %q: want ublk or nbd (ResolveMode)", src, opt.Mode)
	}
	return d, nil
}

// Recover serves device again, a ublk device whose server died, from its
// state file in runDir: open opens the volume the file records, and the
// device takes it up where the dead server left it (ublk user recovery).
func Recover(ctx context.Context, device, runDir string, open func(context.Context, State) (engine.Volume, error), log *slog.Logger) (*Device, error) {
	if log == nil {
		log = slog.Default()
	}
	st, err := load(runDir, device)
	if err != nil {
		return nil, err
	}
	if st.Mode != ModeUblk {
		return nil, fmt.Errorf("%s is attached over %s; only ublk devices can be recovered (detach and attach again)", st.Device, st.Mode)
	}
	if st.ServerAlive() && st.PID != os.Getpid() {
		return nil, fmt.Errorf("%s is still served by process %d; recover is for a device whose server died", st.Device, st.PID)
	}
	vol, err := open(ctx, *st)
	if err != nil {
		return nil, err
	}
	if e, ok := vol.(epocher); ok {
		st.Source.Epoch = e.Epoch()
	}
	dev, err := ublk.Recover(ctx, st.ID, vol, ublk.Options{Queues: st.Queues, Depth: st.Depth, Recovery: true, Logger: log})
	if err != nil {
		vol.Close()
		return nil, err
	}
	st.PID = os.Getpid()
	if sz, err := sysfsBytes(st.Device); err == nil {
		st.Size = sz // the volume may have grown since; ublk.Recover grows the device where it can
	}
	log.Info("recovered", "device", st.Device)
	d := &Device{st: *st, runDir: runDir, vol: vol, wait: dev.Wait, close: dev.Close, log: log}
	d.setGrow(dev.Resizable(), dev.SetSize)
	return d, nil
}

// setGrow records how the device grows: with grow when resizable is nil,
// else not at all, for the reason resizable gives.
func (d *Device) setGrow(resizable error, grow func(int64) error) {
	if resizable != nil {
		d.growWhy = resizable.Error()
		return
	}
	d.grow = grow
}

// Path returns the device's path: /dev/ublkbN or /dev/nbdN.
func (d *Device) Path() string { return d.st.Device }

// State returns what the device's state file records (written by Serve).
func (d *Device) State() State {
	d.stMu.Lock()
	defer d.stMu.Unlock()
	return d.st
}

// Close removes the device, then closes the volume, for a device that is
// not served (Serve does both itself).
func (d *Device) Close() error {
	err := d.close()
	if cerr := d.vol.Close(); cerr != nil {
		err = errors.Join(err, fmt.Errorf("closing the volume: %w", cerr))
	}
	return err
}

// Serve writes the device's state file, calls ready with the device's path
// and serves the device until it goes away or ctx is done; then it removes
// the device, closes the volume and removes the state file.
func (d *Device) Serve(ctx context.Context, ready func(path string)) error {
	st, log := &d.st, d.log
	if err := st.save(d.runDir); err != nil {
		d.close()
		d.vol.Close()
		return err
	}
	ready(st.Device)
	log.Info("attached", "device", st.Device, "mode", st.Mode, "volume", st.Source.String(), "size", units.FormatSize(st.Size))

	gctx, stopGrowth := context.WithCancel(context.Background())
	var gwg sync.WaitGroup
	if g, ok := d.vol.(Growable); ok {
		gwg.Go(func() { d.followGrowth(gctx, g) })
	}
	done := make(chan error, 1)
	go func() { done <- d.wait() }()
	var werr error
	select {
	case <-ctx.Done():
		log.Info("detaching", "device", st.Device)
		stopGrowth()
		gwg.Wait()
		werr = d.close()
		<-done
	case werr = <-done:
		stopGrowth()
		gwg.Wait()
		d.close()
	}
	stopGrowth()
	cerr := d.vol.Close()
	// Another server may have been given the same device id since the
	// device went: its state file is not ours to remove.
	if cur, err := load(d.runDir, st.Device); err == nil && cur.PID == st.PID && cur.Source == st.Source {
		os.Remove(stateFile(d.runDir, st.Device))
	}
	if werr != nil {
		return fmt.Errorf("%s: %w", st.Device, werr)
	}
	if cerr != nil {
		return fmt.Errorf("closing the volume: %w", cerr)
	}
	log.Info("detached", "device", st.Device)
	return nil
}

// followGrowth reports the device to g, then grows it after each growth of
// the volume, until ctx is done. A device that cannot grow live keeps its
// size: that is logged, with what to do, and reported.
func (d *Device) followGrowth(ctx context.Context, g Growable) {
	d.stMu.Lock()
	dev, mode, cur := d.st.Device, string(d.st.Mode), d.st.Size
	d.stMu.Unlock()
	log := d.log.With("device", dev)
	report := func(size int64, grow, why string) {
		rec := meta.Device{Path: dev, Frontend: mode, Size: uint64(size), Grow: grow, Why: why}
		if err := g.ReportDevice(ctx, rec); err != nil && ctx.Err() == nil {
			log.Warn("the device record is not in etcd (torusctl volume resize cannot tell what the device does)", "err", err)
		}
	}
	if d.grow != nil {
		report(cur, meta.GrowLive, "")
	} else {
		report(cur, meta.GrowReattach, d.growWhy)
	}
	for {
		select {
		case <-ctx.Done():
			return
		case <-g.Resized():
		}
		size := d.vol.Size()
		if size <= cur {
			continue
		}
		if d.grow == nil {
			log.Error("the volume grew but this device cannot grow while attached: it keeps its size until it is detached and attached again",
				"device_size", units.FormatSize(cur), "volume_size", units.FormatSize(size), "why", d.growWhy,
				"do", "torusblk detach "+dev+", then attach the volume again")
			report(cur, meta.GrowReattach, d.growWhy)
			continue
		}
		if err := d.grow(size); err != nil {
			log.Error("the volume grew but growing the device failed: it keeps its size until it is detached and attached again",
				"device_size", units.FormatSize(cur), "volume_size", units.FormatSize(size), "err", err,
				"do", "torusblk detach "+dev+", then attach the volume again")
			report(cur, meta.GrowReattach, err.Error())
			continue
		}
		cur = size
		d.stMu.Lock()
		d.st.Size = size
		st := d.st
		d.stMu.Unlock()
		if err := st.save(d.runDir); err != nil {
			log.Warn("the state file keeps the old size", "err", err)
		}
		log.Info("device grew with its volume", "size", units.FormatSize(size))
		report(cur, meta.GrowLive, "")
	}
}

// Detach stops the process that serves device (SIGTERM, then waits up to
// timeout for it to exit), or, if that process is gone, removes the device
// itself and its state file.
func Detach(device, runDir string, timeout time.Duration, log *slog.Logger) error {
	if log == nil {
		log = slog.Default()
	}
	st, err := load(runDir, device)
	if err != nil {
		return err
	}
	if st.ServerAlive() {
		// The attaching process owns the device: ask it to stop, which
		// drains I/O, removes the device and closes the store cleanly.
		if err := syscall.Kill(st.PID, syscall.SIGTERM); err != nil {
			return fmt.Errorf("signalling process %d that serves %s: %w", st.PID, st.Device, err)
		}
		deadline := time.Now().Add(timeout)
		for st.ServerAlive() {
			if time.Now().After(deadline) {
				return fmt.Errorf("%s: process %d did not stop within %v (is the device still mounted? umount it first)", st.Device, st.PID, timeout)
			}
			time.Sleep(50 * time.Millisecond)
		}
		log.Info("detached", "device", st.Device)
		return nil
	}
	// Nobody serves it any more: remove the device directly.
	switch st.Mode {
	case ModeUblk:
		err = ublk.Delete(st.ID)
	case ModeNBD:
		err = nbd.DisconnectKernel(st.ID)
	}
	if err != nil {
		return fmt.Errorf("removing %s: %w", st.Device, err)
	}
	os.Remove(stateFile(runDir, st.Device))
	log.Info("removed the device of a dead server", "device", st.Device)
	return nil
}

// Stop makes device, whose server died and which will not be recovered
// (another host holds its volume now), fail its queued and future I/O, so
// that what is mounted on it can be unmounted; Detach removes it after.
// The state file stays, for Detach.
func Stop(device, runDir string) error {
	st, err := load(runDir, device)
	if err != nil {
		return err
	}
	if st.ServerAlive() {
		return fmt.Errorf("%s is still served by process %d", st.Device, st.PID)
	}
	switch st.Mode {
	case ModeUblk:
		err = ublk.Stop(st.ID)
	case ModeNBD:
		err = nbd.DisconnectKernel(st.ID)
	}
	if err != nil {
		return fmt.Errorf("stopping %s: %w", st.Device, err)
	}
	return nil
}

// sysfsBytes returns the size in bytes the kernel shows for block device
// dev (/sys/block/NAME/size, in 512-byte sectors).
func sysfsBytes(dev string) (int64, error) {
	b, err := os.ReadFile(filepath.Join("/sys/block", filepath.Base(dev), "size"))
	if err != nil {
		return 0, fmt.Errorf("size of %s: %w", dev, err)
	}
	n, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("size of %s: %w", dev, err)
	}
	return n * 512, nil
}

// ValidScheduler reports whether name can be an I/O scheduler's name (or
// "kernel", SetIOScheduler's keep-the-kernel's-choice): 1 to 32 lower-case
// letters, digits, '-' and '_'.
func ValidScheduler(name string) bool {
	if name == "" || len(name) > 32 {
		return false
	}
	for _, c := range name {
		if (c < 'a' || c > 'z') && (c < '0' || c > '9') && c != '-' && c != '_' {
			return false
		}
	}
	return true
}

// SetIOScheduler selects the block layer's I/O scheduler of the device
// through /sys/block/NAME/queue/scheduler and checks that it took; name
// "kernel" keeps the kernel's choice. The kernel gives a device with one
// hardware queue mq-deadline, which on a ublk device moves every request
// through a kblockd worker before the server sees it; the store behind the
// device orders and merges nothing the elevator would help with
// (bench/README.md has the figures). A failure leaves the device as it was.
func (d *Device) SetIOScheduler(name string) error {
	return setIOScheduler(d.st.Device, name)
}

func setIOScheduler(dev, name string) error {
	if name == "kernel" {
		return nil
	}
	if !ValidScheduler(name) {
		return fmt.Errorf("I/O scheduler %q on %s: not a scheduler name", name, dev)
	}
	p := filepath.Join("/sys/block", filepath.Base(dev), "queue", "scheduler")
	if err := os.WriteFile(p, []byte(name), 0o644); err != nil {
		avail, _ := os.ReadFile(p)
		return fmt.Errorf("I/O scheduler %s on %s: %w (available: %s; or kernel to keep the kernel's choice)", name, dev, err, strings.TrimSpace(string(avail)))
	}
	b, err := os.ReadFile(p)
	if err != nil {
		return fmt.Errorf("I/O scheduler %s on %s: %w", name, dev, err)
	}
	if !strings.Contains(string(b), "["+name+"]") {
		return fmt.Errorf("I/O scheduler %s on %s did not take: %s", name, dev, strings.TrimSpace(string(b)))
	}
	return nil
}
