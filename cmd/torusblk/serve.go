package main

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"runtime/pprof"
	"sync"

	"github.com/spf13/pflag"

	"github.com/torus-storage/torus/engine"
	"github.com/torus-storage/torus/internal/blockdev"
	"github.com/torus-storage/torus/internal/cli"
	"github.com/torus-storage/torus/internal/procs"
	"github.com/torus-storage/torus/internal/units"
	"github.com/torus-storage/torus/meta"
	"github.com/torus-storage/torus/nbd"
)

// storeFile is the name of the store file inside --store DIR.
const storeFile = "volume.store"

// serveCmd is torusblk serve: export a volume over NBD.
type serveCmd struct {
	log              *slog.Logger
	src              volumeSource
	ef               serviceFlags
	listen, name     string
	shards, maxProcs int
	noUring          bool
	readOnly         bool
	cpuProfile       string
}

func serveCommand(log *slog.Logger) *cli.Command {
	c := &serveCmd{log: log}
	return &cli.Command{
		Name:    "serve",
		Summary: "export a volume over NBD",
		Usage: `--store DIR --size SIZE --listen unix:PATH|tcp:HOST:PORT
NAME --etcd URL --tls-dir DIR --listen unix:PATH|tcp:HOST:PORT
NAME@SNAPSHOT --read-only --etcd URL --tls-dir DIR --listen unix:PATH|tcp:HOST:PORT`,
		Help: "The first form serves a local volume, the second a volume of a Torus cluster (under its attach lock), " +
			"the third a snapshot of one, read-only (no lock: the volume may be attached elsewhere meanwhile).",
		Flags: c.flags,
		Run:   c.run,
	}
}

func (c *serveCmd) flags(fs *pflag.FlagSet) {
	c.src.register(fs)
	c.ef.register(fs)
	fs.StringVar(&c.listen, "listen", "", "where to serve NBD: `ADDR`, unix:PATH or tcp:HOST:PORT")
	fs.StringVar(&c.name, "name", "torus", "NBD export name")
	fs.IntVar(&c.shards, "shards", 0, "store io_uring shards, each one ring on one OS thread (default: one per CPU)")
	fs.IntVar(&c.maxProcs, "gomaxprocs", procs.Auto, "GOMAXPROCS: 0 = CPUs + shards (so goroutines never wait for shards blocked in io_uring), -1 = Go's default")
	fs.BoolVar(&c.readOnly, "read-only", false, "export read-only (the NBD read-only flag; writes fail with EPERM); required for a snapshot")
	fs.BoolVar(&c.noUring, "no-uring-conns", false, "serve each NBD connection with reader and writer goroutines instead of one io_uring thread that runs the store shards (for comparison)")
	// The flag's name before "ring" came to mean placement only.
	fs.BoolVar(&c.noUring, "no-ring-conns", false, "")
	_ = fs.MarkDeprecated("no-ring-conns", "use --no-uring-conns")
	fs.StringVar(&c.cpuProfile, "cpuprofile", "", "write a Go CPU profile of the whole run to this file (for performance work)")
}

func (c *serveCmd) run(ctx context.Context, args []string, _ cli.IO) error {
	log := c.log
	switch {
	case c.listen != "" || len(args) > 1:
	case len(args) == 1:
		return cli.Usagef("--listen is required (example: torusblk serve %s --etcd http://10.0.0.1:2379 --tls-dir /etc/torus/client --listen unix:/run/torus/%s.sock)", args[0], args[0])
	default:
		return cli.Usagef("--store, --size and --listen are required (example: torusblk serve --store /var/lib/torus/vol0 --size 10GiB --listen unix:/run/torus/vol0.sock), or give a cluster volume NAME")
	}
	if err := c.src.parse("serve", args); err != nil {
		return err
	}
	if c.src.snapshot != "" && !c.readOnly {
		return cli.Usagef("%s is a snapshot: snapshots are read-only, add --read-only", c.src)
	}
	if err := c.ef.check(!c.src.isCluster()); err != nil {
		return err
	}
	if c.shards < 0 {
		return cli.Usagef("--shards %d: must not be negative", c.shards)
	}
	if _, err := procs.Set(c.maxProcs, c.shards, log); err != nil {
		return err
	}
	if c.cpuProfile != "" {
		f, err := os.Create(c.cpuProfile)
		if err != nil {
			return fmt.Errorf("--cpuprofile: %w", err)
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return fmt.Errorf("--cpuprofile: %w", err)
		}
		defer pprof.StopCPUProfile()
	}
	// A local volume: listen before opening the store so a busy port costs
	// nothing. A cluster volume: attach first, so that no client connects to
	// a server that then fails to take the attach lock.
	var l net.Listener
	listenNBD := func() (err error) {
		l, err = nbd.Listen(c.listen)
		return err
	}
	if !c.src.isCluster() {
		if err := listenNBD(); err != nil {
			return err
		}
		defer l.Close()
	}

	vol, err := c.src.open(ctx, c.shards, 0, c.ef, log)
	if err != nil {
		return err
	}
	desc, source, size := "torus local volume", c.src.path, int64(c.src.size)
	if c.src.isCluster() {
		desc, source, size = "torus cluster volume "+c.src.name, c.src.name, vol.Size()
		if c.src.snapshot != "" {
			source += "@" + c.src.snapshot
			desc = "torus snapshot " + source
		}
		if err := listenNBD(); err != nil {
			vol.Close()
			return err
		}
		defer l.Close()
	}
	srv, err := nbd.NewServer([]nbd.Export{{Name: c.name, Description: desc, Volume: vol, ReadOnly: c.readOnly}}, nbd.Options{Logger: log, NoUring: c.noUring})
	if err != nil {
		vol.Close()
		return err
	}
	log.Info("serving", "listen", c.listen, "volume", source, "size", units.FormatSize(size), "export", c.name)
	gctx, stopGrowth := context.WithCancel(ctx)
	var gwg sync.WaitGroup
	if g, ok := vol.(blockdev.Growable); ok {
		gwg.Go(func() { exportGrowth(gctx, g, vol, c.listen, log) })
	}
	serr := srv.Serve(ctx, l)
	stopGrowth()
	gwg.Wait()
	cerr := vol.Close()
	if serr != nil && ctx.Err() == nil {
		return fmt.Errorf("serving %s: %w", c.listen, serr)
	}
	if cerr != nil {
		return fmt.Errorf("closing the store: %w", cerr)
	}
	log.Info("stopped", "volume", source)
	return nil
}

// exportGrowth reports the NBD export of vol at listen (meta.GrowReconnect)
// and logs each growth of the volume, until ctx is done: a client learns
// the size in its handshake, so new connections get the new size and
// connected clients keep theirs until they reconnect.
func exportGrowth(ctx context.Context, g blockdev.Growable, vol engine.Volume, listen string, log *slog.Logger) {
	report := func() {
		d := meta.Device{Path: listen, Frontend: "nbd-export", Size: uint64(vol.Size()), Grow: meta.GrowReconnect,
			Why: "an NBD client learns the size when it connects: connected clients keep theirs until they reconnect"}
		if err := g.ReportDevice(ctx, d); err != nil && ctx.Err() == nil {
			log.Warn("the export's record is not in etcd (torusctl volume resize cannot tell what it does)", "err", err)
		}
	}
	report()
	for {
		select {
		case <-ctx.Done():
			return
		case <-g.Resized():
		}
		log.Info("the volume grew: new NBD connections get the new size; connected clients keep theirs until they reconnect",
			"listen", listen, "size", units.FormatSize(vol.Size()))
		report()
	}
}

// storePath turns --store into the store's path: a block device is used as
// is; anything else is a directory, created if absent, holding volume.store.
func storePath(store string) (string, error) {
	if fi, err := os.Stat(store); err == nil && fi.Mode()&os.ModeDevice != 0 {
		return store, nil
	}
	if err := os.MkdirAll(store, 0o750); err != nil {
		return "", fmt.Errorf("--store %s: cannot create the directory: %w", store, err)
	}
	probe, err := os.CreateTemp(store, ".probe-*")
	if err != nil {
		return "", fmt.Errorf("--store %s: directory is not writable: %w", store, err)
	}
	probe.Close()
	os.Remove(probe.Name())
	return filepath.Join(store, storeFile), nil
}
