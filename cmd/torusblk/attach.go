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
	"github.com/torus-storage/torus/internal/cli"
	"github.com/torus-storage/torus/internal/units"
	"github.com/torus-storage/torus/nbd"
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

// attachCmd is torusblk attach: make a volume a local block device.
type attachCmd struct {
	log                   *slog.Logger
	fs                    *pflag.FlagSet
	src                   volumeSource
	ef                    serviceFlags
	mode, runDir, ioSched string
	queues, depth, conns  int
}

func attachCommand(log *slog.Logger) *cli.Command {
	c := &attachCmd{log: log}
	return &cli.Command{
		Name:    "attach",
		Summary: "make a volume a local block device",
		Usage: `--store DIR --size SIZE [--mode ublk|nbd|auto]
NAME --etcd URL --tls-dir DIR [--mode ublk|nbd|auto]`,
		Help: "The first form attaches a local volume, the second a volume of a Torus cluster.\n" +
			"Prints the device path once it is ready and serves it until detached or signalled.",
		Flags: c.flags,
		Run:   c.run,
	}
}

func (c *attachCmd) flags(fs *pflag.FlagSet) {
	c.fs = fs
	c.src.register(fs)
	c.ef.register(fs)
	fs.StringVar(&c.mode, "mode", "auto", "ublk, nbd (kernel NBD client) or auto (ublk when /dev/ublk-control exists, else nbd)")
	fs.IntVar(&c.queues, "queues", 0, "ublk queues (default: 1 for a local store, whose one queue thread runs every store shard; one per CPU for a cluster volume)")
	fs.IntVar(&c.depth, "depth", 128, "ublk queue depth")
	fs.IntVar(&c.conns, "connections", 4, "kernel NBD connections")
	fs.StringVar(&c.runDir, "run-dir", defaultRunDir, "where attach state is kept for list, detach and recover")
	fs.StringVar(&c.ioSched, "io-scheduler", "none", "the device's block-layer I/O scheduler: none (Torus orders its own I/O, as for loop and NVMe devices), a name listed in /sys/block/DEV/queue/scheduler, or kernel to keep the kernel's choice")
}

func (c *attachCmd) run(ctx context.Context, args []string, o cli.IO) error {
	log := c.log
	if err := c.src.parse("attach", args); err != nil {
		return err
	}
	if err := c.ef.check(!c.src.isCluster()); err != nil {
		return err
	}
	if !validSchedName(c.ioSched) {
		return cli.Usagef("--io-scheduler %q: want none, kernel or a scheduler name such as mq-deadline", c.ioSched)
	}
	if os.Geteuid() != 0 {
		return errors.New("attaching a block device needs root (run with sudo)")
	}
	switch c.mode {
	case "auto":
		if uerr := ublk.Available(); uerr == nil {
			c.mode = "ublk"
			log.Info("mode auto: using ublk", "why", "/dev/ublk-control is present")
		} else {
			c.mode = "nbd"
			log.Info("mode auto: using kernel NBD", "why", uerr.Error())
		}
	case "ublk", "nbd":
	default:
		return cli.Usagef("--mode %q: want ublk, nbd or auto", c.mode)
	}
	switch c.mode {
	case "ublk":
		if err := ublk.Available(); err != nil {
			return err
		}
	case "nbd":
		if err := nbd.KernelAvailable(); err != nil {
			return err
		}
	}

	a := &attachment{Mode: c.mode, PID: os.Getpid()}
	c.src.record(a)
	vol, err := c.src.open(ctx, 0, 0, c.ef, log)
	if err != nil {
		return err
	}
	a.Size = vol.Size()
	var wait func() error
	var closeDev func() error
	switch c.mode {
	case "ublk":
		dev, err := ublk.Create(ctx, vol, ublk.Options{Queues: c.queues, Depth: c.depth, Recovery: true, Logger: log})
		if err != nil {
			vol.Close()
			return err
		}
		a.Device, a.ID, a.Queues, a.Depth = dev.Path(), dev.ID(), c.queues, c.depth
		wait, closeDev = dev.Wait, dev.Close
	case "nbd":
		dev, err := nbd.AttachKernel(ctx, vol, nbd.AttachOptions{Index: -1, Conns: c.conns, Logger: log})
		if err != nil {
			vol.Close()
			return err
		}
		a.Device, a.ID = dev.Path(), dev.Index()
		wait, closeDev = dev.Wait, dev.Close
	}
	if err := setIOScheduler(a.Device, c.ioSched); err != nil {
		if c.fs.Changed("io-scheduler") {
			closeDev()
			vol.Close()
			return err
		}
		log.Warn("keeping the kernel's I/O scheduler", "device", a.Device, "err", err)
	}
	return serveDevice(ctx, a, c.runDir, vol, wait, closeDev, o.Stdout, log)
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
	log.Info("attached", "device", a.Device, "mode", a.Mode, "volume", a.source().String(), "size", units.FormatSize(a.Size))

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

func recoverCommand(log *slog.Logger) *cli.Command {
	var runDir string
	var wait time.Duration
	return &cli.Command{
		Name:    "recover",
		Summary: "serve a ublk device again after the process that attached it died",
		Usage:   "/dev/ublkbN",
		Flags: func(fs *pflag.FlagSet) {
			fs.StringVar(&runDir, "run-dir", defaultRunDir, "where attach state is kept")
			fs.DurationVar(&wait, "wait", 30*time.Second, "cluster volume: how long to wait for the dead server's attach lock to expire")
		},
		Run: func(ctx context.Context, args []string, o cli.IO) error {
			if len(args) != 1 {
				return cli.Usagef("recover takes one device, e.g. torusblk recover /dev/ublkb0")
			}
			return recoverDevice(ctx, args[0], runDir, wait, o.Stdout, log)
		},
	}
}

// recoverDevice serves device again, from the state attach kept in runDir.
func recoverDevice(ctx context.Context, device, runDir string, wait time.Duration, stdout io.Writer, log *slog.Logger) error {
	a, err := loadAttachment(runDir, device)
	if err != nil {
		return err
	}
	if a.Mode != "ublk" {
		return fmt.Errorf("%s is attached over %s; only ublk devices can be recovered (detach and attach again)", a.Device, a.Mode)
	}
	if alive(a.PID) && a.PID != os.Getpid() {
		return fmt.Errorf("%s is still served by process %d; recover is for a device whose server died", a.Device, a.PID)
	}
	vol, err := a.source().open(ctx, 0, wait, serviceFlags{}, log)
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
	return serveDevice(ctx, a, runDir, vol, dev.Wait, dev.Close, stdout, log)
}

func detachCommand(log *slog.Logger) *cli.Command {
	var runDir string
	var timeout time.Duration
	return &cli.Command{
		Name:    "detach",
		Summary: "stop serving an attached device and remove it",
		Usage:   "DEVICE",
		Flags: func(fs *pflag.FlagSet) {
			fs.StringVar(&runDir, "run-dir", defaultRunDir, "where attach state is kept")
			fs.DurationVar(&timeout, "timeout", 60*time.Second, "how long to wait for the device to go")
		},
		Run: func(_ context.Context, args []string, _ cli.IO) error {
			if len(args) != 1 {
				return cli.Usagef("detach takes one device, e.g. torusblk detach /dev/ublkb0")
			}
			return detach(args[0], runDir, timeout, log)
		},
	}
}

// detach stops the process that serves device, or removes the device of a
// dead one.
func detach(device, runDir string, timeout time.Duration, log *slog.Logger) error {
	a, err := loadAttachment(runDir, device)
	if err != nil {
		return err
	}
	if alive(a.PID) {
		// The attaching process owns the device: ask it to stop, which
		// drains I/O, removes the device and closes the store cleanly.
		if err := syscall.Kill(a.PID, syscall.SIGTERM); err != nil {
			return fmt.Errorf("signalling process %d that serves %s: %w", a.PID, a.Device, err)
		}
		deadline := time.Now().Add(timeout)
		for alive(a.PID) {
			if time.Now().After(deadline) {
				return fmt.Errorf("%s: process %d did not stop within %v (is the device still mounted? umount it first)", a.Device, a.PID, timeout)
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
	os.Remove(stateFile(runDir, a.Device))
	log.Info("removed the device of a dead server", "device", a.Device)
	return nil
}

func listCommand() *cli.Command {
	var runDir string
	var out cli.Output
	var asJSON bool
	return &cli.Command{
		Name:    "list",
		Summary: "the devices torusblk attached",
		Usage:   "[--output text|json]",
		Flags: func(fs *pflag.FlagSet) {
			fs.StringVar(&runDir, "run-dir", defaultRunDir, "where attach state is kept")
			cli.OutputFlag(fs, &out)
			fs.BoolVar(&asJSON, "json", false, "print JSON (the same as --output json)")
		},
		Run: func(_ context.Context, args []string, o cli.IO) error {
			if len(args) > 0 {
				return cli.Usagef("unexpected arguments %q", args)
			}
			if asJSON {
				out = cli.JSON
			}
			return listAttachments(runDir, out, o.Stdout)
		},
	}
}

// listAttachments prints the attachments kept in runDir.
func listAttachments(runDir string, out cli.Output, stdout io.Writer) error {
	ents, err := os.ReadDir(runDir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	var list []*attachment
	for _, e := range ents {
		if !strings.HasSuffix(e.Name(), ".json") {
			continue
		}
		if a, err := loadAttachment(runDir, strings.TrimSuffix(e.Name(), ".json")); err == nil {
			list = append(list, a)
		}
	}
	if out == cli.JSON {
		return cli.WriteJSON(stdout, list)
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
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", a.Device, a.Mode, units.FormatSize(a.Size), a.source().String(), strconv.Itoa(a.PID), state)
	}
	return tw.Flush()
}
