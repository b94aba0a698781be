package main

// torusblk attach, recover, detach and list: flags and printing around
// internal/blockdev, which attaches the devices and keeps their state files.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strconv"
	"text/tabwriter"
	"time"

	"github.com/spf13/pflag"

	"github.com/torus-storage/torus/engine"
	"github.com/torus-storage/torus/internal/blockdev"
	"github.com/torus-storage/torus/internal/cli"
	"github.com/torus-storage/torus/internal/units"
)

// attachCmd is torusblk attach: make a volume a local block device.
type attachCmd struct {
	log                   *slog.Logger
	fs                    *pflag.FlagSet
	src                   volumeSource
	ef                    serviceFlags
	mode, runDir, ioSched string
	queues, depth, conns  int
	wait                  time.Duration
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
	fs.StringVar(&c.runDir, "run-dir", blockdev.DefaultRunDir, "where attach state is kept for list, detach and recover")
	fs.DurationVar(&c.wait, "wait", 0, "cluster volume: how long to wait for another holder's attach lock to expire (a host that died without detaching); 0 fails at once while the volume is attached elsewhere")
	fs.StringVar(&c.ioSched, "io-scheduler", "none", "the device's block-layer I/O scheduler: none (Torus orders its own I/O, as for loop and NVMe devices), a name listed in /sys/block/DEV/queue/scheduler, or kernel to keep the kernel's choice")
}

func (c *attachCmd) run(ctx context.Context, args []string, o cli.IO) error {
	log := c.log
	if err := c.src.parse("attach", args); err != nil {
		return err
	}
	if c.src.snapshot != "" {
		return cli.Usagef("%s is a snapshot: attach takes a volume; export a snapshot read-only with torusblk serve %s@%s --read-only", c.src, c.src.name, c.src.snapshot)
	}
	if err := c.ef.check(!c.src.isCluster()); err != nil {
		return err
	}
	if !blockdev.ValidScheduler(c.ioSched) {
		return cli.Usagef("--io-scheduler %q: want none, kernel or a scheduler name such as mq-deadline", c.ioSched)
	}
	if os.Geteuid() != 0 {
		return errors.New("attaching a block device needs root (run with sudo)")
	}
	switch blockdev.Mode(c.mode) {
	case blockdev.ModeAuto, blockdev.ModeUblk, blockdev.ModeNBD:
	default:
		return cli.Usagef("--mode %q: want ublk, nbd or auto", c.mode)
	}
	mode, err := blockdev.ResolveMode(blockdev.Mode(c.mode), log)
	if err != nil {
		return err
	}

	if c.wait < 0 || (c.wait > 0 && !c.src.isCluster()) {
		return cli.Usagef("--wait %v: a positive duration, for a cluster volume", c.wait)
	}
	vol, err := c.src.open(ctx, 0, c.wait, c.ef, log)
	if err != nil {
		return err
	}
	dev, err := blockdev.Attach(ctx, vol, c.src.record(), blockdev.Options{
		Mode: mode, Queues: c.queues, Depth: c.depth, Conns: c.conns, RunDir: c.runDir, Logger: log,
	})
	if err != nil {
		return err
	}
	if err := dev.SetIOScheduler(c.ioSched); err != nil {
		if c.fs.Changed("io-scheduler") {
			dev.Close()
			return fmt.Errorf("--io-scheduler: %w", err)
		}
		log.Warn("keeping the kernel's I/O scheduler", "device", dev.Path(), "err", err)
	}
	return dev.Serve(ctx, printPath(o.Stdout))
}

// printPath returns the ready function of blockdev.Device.Serve: it prints
// the device's path, which scripts wait for.
func printPath(stdout io.Writer) func(string) {
	return func(path string) { fmt.Fprintln(stdout, path) }
}

func recoverCommand(log *slog.Logger) *cli.Command {
	var runDir string
	var wait time.Duration
	return &cli.Command{
		Name:    "recover",
		Summary: "serve a ublk device again after the process that attached it died",
		Usage:   "/dev/ublkbN",
		Flags: func(fs *pflag.FlagSet) {
			fs.StringVar(&runDir, "run-dir", blockdev.DefaultRunDir, "where attach state is kept")
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
	open := func(ctx context.Context, st blockdev.State) (engine.Volume, error) {
		return sourceOf(st).open(ctx, 0, wait, serviceFlags{}, log)
	}
	dev, err := blockdev.Recover(ctx, device, runDir, open, log)
	if err != nil {
		return err
	}
	return dev.Serve(ctx, printPath(stdout))
}

func detachCommand(log *slog.Logger) *cli.Command {
	var runDir string
	var timeout time.Duration
	return &cli.Command{
		Name:    "detach",
		Summary: "stop serving an attached device and remove it",
		Usage:   "DEVICE",
		Flags: func(fs *pflag.FlagSet) {
			fs.StringVar(&runDir, "run-dir", blockdev.DefaultRunDir, "where attach state is kept")
			fs.DurationVar(&timeout, "timeout", 60*time.Second, "how long to wait for the device to go")
		},
		Run: func(_ context.Context, args []string, _ cli.IO) error {
			if len(args) != 1 {
				return cli.Usagef("detach takes one device, e.g. torusblk detach /dev/ublkb0")
			}
			return blockdev.Detach(args[0], runDir, timeout, log)
		},
	}
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
			fs.StringVar(&runDir, "run-dir", blockdev.DefaultRunDir, "where attach state is kept")
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

// listAttachments prints the devices attached with state in runDir.
func listAttachments(runDir string, out cli.Output, stdout io.Writer) error {
	list, err := blockdev.List(runDir)
	if err != nil {
		return err
	}
	if out == cli.JSON {
		return cli.WriteJSON(stdout, list)
	}
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "DEVICE\tMODE\tSIZE\tVOLUME\tPID\tSTATE")
	for _, a := range list {
		state := "serving"
		if !a.ServerAlive() {
			state = "server dead: torusblk recover " + a.Device
			if a.Mode != blockdev.ModeUblk {
				state = "server dead: torusblk detach " + a.Device
			}
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", a.Device, a.Mode, units.FormatSize(a.Size), a.Source.String(), strconv.Itoa(a.PID), state)
	}
	return tw.Flush()
}
