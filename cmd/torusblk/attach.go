package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/spf13/pflag"

	"github.com/torus-storage/torus/engine"
	"github.com/torus-storage/torus/internal/units"
	"github.com/torus-storage/torus/meta"
	"github.com/torus-storage/torus/nbd"
	"github.com/torus-storage/torus/store"
	"github.com/torus-storage/torus/ublk"
)

// defaultRunDir keeps one JSON file per attached device: what `recover`
// needs to serve it again and what `list` and `detach` show.
const defaultRunDir = "/run/torus"

// attachment is the state kept for one attached device.
type attachment struct {
	Device string `json:"device"`
	Mode   string `json:"mode"`            // "ublk" or "nbd"
	ID     int    `json:"id"`              // ublk device id or nbd index
	Store  string `json:"store,omitempty"` // store path (file or block device) of a local volume
	// Cluster volume: its name and how to reach the cluster.
	Volume string `json:"volume,omitempty"`
	Etcd   string `json:"etcd,omitempty"`
	Prefix string `json:"prefix,omitempty"`
	TLSDir string `json:"tls_dir,omitempty"`
	TTL    string `json:"lease_ttl,omitempty"`
	// ReplicaTimeout is --replica-timeout of a cluster volume.
	ReplicaTimeout string `json:"replica_timeout,omitempty"`
	Size           int64  `json:"size"`
	PID            int    `json:"pid"`
	Queues         int    `json:"queues,omitempty"`
	Depth          int    `json:"depth,omitempty"`
}

func stateFile(runDir, device string) string {
	return filepath.Join(runDir, filepath.Base(device)+".json")
}

func (a *attachment) save(runDir string) error {
	if err := os.MkdirAll(runDir, 0o755); err != nil {
		return fmt.Errorf("keeping attach state: %w", err)
	}
	b, _ := json.MarshalIndent(a, "", "  ")
	tmp := stateFile(runDir, a.Device) + ".tmp"
	if err := os.WriteFile(tmp, append(b, '\n'), 0o644); err != nil {
		return fmt.Errorf("keeping attach state: %w", err)
	}
	return os.Rename(tmp, stateFile(runDir, a.Device))
}

func loadAttachment(runDir, device string) (*attachment, error) {
	b, err := os.ReadFile(stateFile(runDir, device))
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("%s was not attached by torusblk (no %s; see torusblk list)", device, stateFile(runDir, device))
	}
	if err != nil {
		return nil, err
	}
	a := new(attachment)
	if err := json.Unmarshal(b, a); err != nil {
		return nil, fmt.Errorf("%s: %w", stateFile(runDir, device), err)
	}
	return a, nil
}

func alive(pid int) bool {
	return pid > 0 && syscall.Kill(pid, 0) == nil
}

func cmdAttach(ctx context.Context, args []string, stdout, stderr io.Writer, log *slog.Logger) error {
	fs := pflag.NewFlagSet("attach", pflag.ContinueOnError)
	fs.SetOutput(stderr)
	var vf volumeFlags
	vf.register(fs)
	var cf clusterFlags
	cf.register(fs)
	var ef extraFlags
	ef.register(fs)
	mode := fs.String("mode", "auto", "ublk, nbd (kernel NBD client) or auto (ublk when /dev/ublk-control exists, else nbd)")
	queues := fs.Int("queues", 0, "ublk queues (default: 1 for a local store, whose one queue thread runs every store shard; one per CPU for a cluster volume)")
	depth := fs.Int("depth", 128, "ublk queue depth")
	conns := fs.Int("connections", 4, "kernel NBD connections")
	runDir := fs.String("run-dir", defaultRunDir, "where attach state is kept for list, detach and recover")
	ioSched := fs.String("io-scheduler", "none", "the device's block-layer I/O scheduler: none (Torus orders its own I/O, as for loop and NVMe devices), a name listed in /sys/block/DEV/queue/scheduler, or kernel to keep the kernel's choice")
	fs.Usage = func() {
		fmt.Fprintf(stderr, "Usage: torusblk attach --store DIR --size SIZE [--mode ublk|nbd|auto]   (a local volume)\n       torusblk attach NAME --etcd URL --tls-dir DIR [--mode ublk|nbd|auto]   (a cluster volume)\n\nPrints the device path once it is ready and serves it until detached or signalled.\n\n%s", fs.FlagUsages())
	}
	if help, err := parseFlags(fs, args); help || err != nil {
		return err
	}
	if fs.NArg() > 1 {
		return fmt.Errorf("%w: unexpected argument %q: attach takes one cluster volume NAME, or --store and --size for a local volume", errUsage, fs.Arg(1))
	}
	cluster := fs.NArg() == 1
	if err := ef.check(!cluster); err != nil {
		return err
	}
	var path string
	var size int64
	if cluster {
		if vf.store != "" || vf.size != "" {
			return fmt.Errorf("%w: --store and --size are for a local volume; cluster volume %s lives in the cluster (its size is in etcd)", errUsage, fs.Arg(0))
		}
	} else {
		var err error
		if path, size, err = vf.parse(); err != nil {
			return err
		}
	}
	if !validSchedName(*ioSched) {
		return fmt.Errorf("%w: --io-scheduler %q: want none, kernel or a scheduler name such as mq-deadline", errUsage, *ioSched)
	}
	if os.Geteuid() != 0 {
		return errors.New("attaching a block device needs root (run with sudo)")
	}
	switch *mode {
	case "auto":
		if uerr := ublk.Available(); uerr == nil {
			*mode = "ublk"
			log.Info("mode auto: using ublk", "why", "/dev/ublk-control is present")
		} else {
			*mode = "nbd"
			log.Info("mode auto: using kernel NBD", "why", uerr.Error())
		}
	case "ublk", "nbd":
	default:
		return fmt.Errorf("%w: --mode %q: want ublk, nbd or auto", errUsage, *mode)
	}
	switch *mode {
	case "ublk":
		if err := ublk.Available(); err != nil {
			return err
		}
	case "nbd":
		if err := nbd.KernelAvailable(); err != nil {
			return err
		}
	}

	a := &attachment{Mode: *mode, Store: path, Size: size, PID: os.Getpid()}
	if cluster {
		a.Volume, a.Etcd, a.Prefix, a.TLSDir, a.TTL = fs.Arg(0), cf.etcd, cf.prefix, cf.tlsDir, cf.ttl.String()
		a.ReplicaTimeout = cf.timeout.String()
	}
	vol, err := a.open(ctx, cf.localNode, 0, log)
	if err != nil {
		return err
	}
	if cv, ok := vol.(*clusterVolume); ok {
		xv, err := withExtras(cv, ef, log)
		if err != nil {
			cv.Close()
			return err
		}
		vol = xv
	}
	a.Size = vol.Size()
	var wait func() error
	var closeDev func() error
	switch *mode {
	case "ublk":
		dev, err := ublk.Create(ctx, vol, ublk.Options{Queues: *queues, Depth: *depth, Recovery: true, Logger: log})
		if err != nil {
			vol.Close()
			return err
		}
		a.Device, a.ID, a.Queues, a.Depth = dev.Path(), dev.ID(), *queues, *depth
		wait, closeDev = dev.Wait, dev.Close
	case "nbd":
		dev, err := nbd.AttachKernel(ctx, vol, nbd.AttachOptions{Index: -1, Conns: *conns, Logger: log})
		if err != nil {
			vol.Close()
			return err
		}
		a.Device, a.ID = dev.Path(), dev.Index()
		wait, closeDev = dev.Wait, dev.Close
	}
	if err := setIOScheduler(a.Device, *ioSched); err != nil {
		if fs.Changed("io-scheduler") {
			closeDev()
			vol.Close()
			return err
		}
		log.Warn("keeping the kernel's I/O scheduler", "device", a.Device, "err", err)
	}
	return serveDevice(ctx, a, *runDir, vol, wait, closeDev, stdout, log)
}

// validSchedName reports whether name can be an I/O scheduler's name (or
// "kernel"): lower-case letters, digits, '-' and '_'.
func validSchedName(name string) bool {
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

// setIOScheduler selects the block layer's I/O scheduler of dev (/dev/NAME)
// through /sys/block/NAME/queue/scheduler and checks that it took; name
// "kernel" keeps the kernel's choice. The kernel gives a device with one
// hardware queue mq-deadline, which on a ublk device moves every request
// through a kblockd worker before the server sees it; the store behind the
// device orders and merges nothing the elevator would help with
// (bench/README.md has the figures).
func setIOScheduler(dev, name string) error {
	if name == "kernel" {
		return nil
	}
	p := filepath.Join("/sys/block", filepath.Base(dev), "queue", "scheduler")
	if err := os.WriteFile(p, []byte(name), 0o644); err != nil {
		avail, _ := os.ReadFile(p)
		return fmt.Errorf("--io-scheduler %s on %s: %w (available: %s; or kernel to keep the kernel's choice)", name, dev, err, strings.TrimSpace(string(avail)))
	}
	b, err := os.ReadFile(p)
	if err != nil {
		return fmt.Errorf("--io-scheduler %s on %s: %w", name, dev, err)
	}
	if !strings.Contains(string(b), "["+name+"]") {
		return fmt.Errorf("--io-scheduler %s on %s did not take: %s", name, dev, strings.TrimSpace(string(b)))
	}
	return nil
}

// serveDevice records the attachment, prints the device and serves until the
// device goes away or ctx is cancelled, then detaches and closes the volume.
func serveDevice(ctx context.Context, a *attachment, runDir string, vol engine.Volume, wait, closeDev func() error, stdout io.Writer, log *slog.Logger) error {
	if err := a.save(runDir); err != nil {
		closeDev()
		vol.Close()
		return err
	}
	fmt.Fprintln(stdout, a.Device)
	log.Info("attached", "device", a.Device, "mode", a.Mode, "volume", a.source(), "size", units.FormatSize(a.Size))

	done := make(chan error, 1)
	go func() { done <- wait() }()
	var werr error
	select {
	case <-ctx.Done():
		log.Info("detaching", "device", a.Device)
		werr = closeDev()
		<-done
	case werr = <-done:
		closeDev()
	}
	cerr := vol.Close()
	os.Remove(stateFile(runDir, a.Device))
	if werr != nil {
		return fmt.Errorf("%s: %w", a.Device, werr)
	}
	if cerr != nil {
		return fmt.Errorf("closing the volume: %w", cerr)
	}
	log.Info("detached", "device", a.Device)
	return nil
}

// source names the volume: the store path of a local volume, or
// "cluster:NAME".
func (a *attachment) source() string {
	if a.Volume != "" {
		return "cluster:" + a.Volume
	}
	return a.Store
}

// open opens the attachment's volume. For a cluster volume, wait > 0 keeps
// retrying while the attach lock is still held (by a server that died and
// whose lease has not expired yet).
func (a *attachment) open(ctx context.Context, localNode string, wait time.Duration, log *slog.Logger) (engine.Volume, error) {
	if a.Volume == "" {
		lv, err := store.OpenLocal(a.Store, a.Size, store.LocalOptions{Logger: log})
		if err != nil {
			return nil, err
		}
		return lv, nil
	}
	cf := clusterFlags{etcd: a.Etcd, prefix: a.Prefix, tlsDir: a.TLSDir, localNode: localNode, ttl: 10 * time.Second, timeout: 5 * time.Second}
	if d, err := time.ParseDuration(a.TTL); err == nil {
		cf.ttl = d
	}
	if d, err := time.ParseDuration(a.ReplicaTimeout); err == nil {
		cf.timeout = d
	}
	deadline := time.Now().Add(wait)
	for {
		cv, err := openCluster(ctx, a.Volume, cf, log)
		if err == nil || !errors.Is(err, meta.ErrAttached) || time.Now().After(deadline) {
			if err != nil {
				return nil, err
			}
			return cv, nil
		}
		log.Info("waiting for the old attach lock to expire", "volume", a.Volume, "why", err.Error())
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(500 * time.Millisecond):
		}
	}
}

func cmdRecover(ctx context.Context, args []string, stdout, stderr io.Writer, log *slog.Logger) error {
	fs := pflag.NewFlagSet("recover", pflag.ContinueOnError)
	fs.SetOutput(stderr)
	runDir := fs.String("run-dir", defaultRunDir, "where attach state is kept")
	wait := fs.Duration("wait", 30*time.Second, "cluster volume: how long to wait for the dead server's attach lock to expire")
	fs.Usage = func() {
		fmt.Fprintf(stderr, "Usage: torusblk recover /dev/ublkbN\n\nServes a ublk device again after the process that attached it died.\n\n%s", fs.FlagUsages())
	}
	if help, err := parseFlags(fs, args); help || err != nil {
		return err
	}
	if fs.NArg() != 1 {
		return fmt.Errorf("%w: recover takes one device, e.g. torusblk recover /dev/ublkb0", errUsage)
	}
	a, err := loadAttachment(*runDir, fs.Arg(0))
	if err != nil {
		return err
	}
	if a.Mode != "ublk" {
		return fmt.Errorf("%s is attached over %s; only ublk devices can be recovered (detach and attach again)", a.Device, a.Mode)
	}
	if alive(a.PID) && a.PID != os.Getpid() {
		return fmt.Errorf("%s is still served by process %d; recover is for a device whose server died", a.Device, a.PID)
	}
	vol, err := a.open(ctx, "", *wait, log)
	if err != nil {
		return err
	}
	dev, err := ublk.Recover(ctx, a.ID, vol, ublk.Options{Queues: a.Queues, Depth: a.Depth, Recovery: true, Logger: log})
	if err != nil {
		vol.Close()
		return err
	}
	a.PID = os.Getpid()
	log.Info("recovered", "device", a.Device)
	return serveDevice(ctx, a, *runDir, vol, dev.Wait, dev.Close, stdout, log)
}

func cmdDetach(ctx context.Context, args []string, stdout, stderr io.Writer, log *slog.Logger) error {
	fs := pflag.NewFlagSet("detach", pflag.ContinueOnError)
	fs.SetOutput(stderr)
	runDir := fs.String("run-dir", defaultRunDir, "where attach state is kept")
	timeout := fs.Duration("timeout", 60*time.Second, "how long to wait for the device to go")
	if help, err := parseFlags(fs, args); help || err != nil {
		return err
	}
	if fs.NArg() != 1 {
		return fmt.Errorf("%w: detach takes one device, e.g. torusblk detach /dev/ublkb0", errUsage)
	}
	a, err := loadAttachment(*runDir, fs.Arg(0))
	if err != nil {
		return err
	}
	if alive(a.PID) {
		// The attaching process owns the device: ask it to stop, which
		// drains I/O, removes the device and closes the store cleanly.
		if err := syscall.Kill(a.PID, syscall.SIGTERM); err != nil {
			return fmt.Errorf("signalling process %d that serves %s: %w", a.PID, a.Device, err)
		}
		deadline := time.Now().Add(*timeout)
		for alive(a.PID) {
			if time.Now().After(deadline) {
				return fmt.Errorf("%s: process %d did not stop within %v (is the device still mounted? umount it first)", a.Device, a.PID, *timeout)
			}
			time.Sleep(50 * time.Millisecond)
		}
		log.Info("detached", "device", a.Device)
		return nil
	}
	// Nobody serves it any more: remove the device directly.
	switch a.Mode {
	case "ublk":
		err = ublk.Delete(a.ID)
	case "nbd":
		err = nbd.DisconnectKernel(a.ID)
	}
	if err != nil {
		return fmt.Errorf("removing %s: %w", a.Device, err)
	}
	os.Remove(stateFile(*runDir, a.Device))
	log.Info("removed the device of a dead server", "device", a.Device)
	return nil
}

func cmdList(ctx context.Context, args []string, stdout, stderr io.Writer, log *slog.Logger) error {
	fs := pflag.NewFlagSet("list", pflag.ContinueOnError)
	fs.SetOutput(stderr)
	runDir := fs.String("run-dir", defaultRunDir, "where attach state is kept")
	asJSON := fs.Bool("json", false, "print JSON")
	if help, err := parseFlags(fs, args); help || err != nil {
		return err
	}
	ents, err := os.ReadDir(*runDir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	var list []*attachment
	for _, e := range ents {
		if !strings.HasSuffix(e.Name(), ".json") {
			continue
		}
		if a, err := loadAttachment(*runDir, strings.TrimSuffix(e.Name(), ".json")); err == nil {
			list = append(list, a)
		}
	}
	if *asJSON {
		b, _ := json.MarshalIndent(list, "", "  ")
		fmt.Fprintln(stdout, string(b))
		return nil
	}
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "DEVICE\tMODE\tSIZE\tVOLUME\tPID\tSTATE")
	for _, a := range list {
		state := "serving"
		if !alive(a.PID) {
			state = "server dead: torusblk recover " + a.Device
			if a.Mode != "ublk" {
				state = "server dead: torusblk detach " + a.Device
			}
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", a.Device, a.Mode, units.FormatSize(a.Size), a.source(), strconv.Itoa(a.PID), state)
	}
	return tw.Flush()
}
