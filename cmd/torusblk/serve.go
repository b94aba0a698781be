package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"runtime/pprof"

	"github.com/spf13/pflag"

	"github.com/torus-storage/torus/engine"
	"github.com/torus-storage/torus/internal/units"
	"github.com/torus-storage/torus/nbd"
)

// storeFile is the name of the store file inside --store DIR.
const storeFile = "volume.store"

func cmdServe(ctx context.Context, args []string, stdout, stderr io.Writer, log *slog.Logger) error {
	fs := pflag.NewFlagSet("serve", pflag.ContinueOnError)
	fs.SetOutput(stderr)
	var vf volumeFlags
	vf.register(fs)
	listen := fs.String("listen", "", "where to serve NBD: unix:PATH or tcp:HOST:PORT")
	name := fs.String("name", "torus", "NBD export name")
	shards := fs.Int("shards", 0, "store io_uring shards, each one ring on one OS thread (default: one per CPU)")
	procs := fs.Int("gomaxprocs", procsAuto, "GOMAXPROCS: 0 = CPUs + shards (so goroutines never wait for shards blocked in io_uring), -1 = Go's default")
	cpuProfile := fs.String("cpuprofile", "", "write a Go CPU profile of the whole run to this file (for performance work)")
	fs.Usage = func() {
		fmt.Fprintf(stderr, "Usage: torusblk serve --store DIR --size SIZE --listen unix:PATH|tcp:HOST:PORT\n\n%s", fs.FlagUsages())
	}
	if help, err := parseFlags(fs, args); help || err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("%w: unexpected argument %q (a cluster volume name needs the cluster milestone; use --store)", errUsage, fs.Arg(0))
	}
	if vf.store == "" || vf.size == "" || *listen == "" {
		return fmt.Errorf("%w: --store, --size and --listen are required (example: torusblk serve --store /var/lib/torus/vol0 --size 10GiB --listen unix:/run/torus/vol0.sock)", errUsage)
	}
	path, size, err := vf.parse()
	if err != nil {
		return err
	}
	if _, err := setProcs(*procs, *shards, log); err != nil {
		return err
	}
	if *cpuProfile != "" {
		f, err := os.Create(*cpuProfile)
		if err != nil {
			return fmt.Errorf("--cpuprofile: %w", err)
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return fmt.Errorf("--cpuprofile: %w", err)
		}
		defer pprof.StopCPUProfile()
	}
	// Listen before opening the store so a busy port costs nothing.
	l, err := nbd.Listen(*listen)
	if err != nil {
		return err
	}
	defer l.Close()

	vol, err := engine.OpenLocal(path, size, engine.LocalOptions{Logger: log, Shards: *shards})
	if err != nil {
		return err
	}
	srv, err := nbd.NewServer([]nbd.Export{{Name: *name, Description: "torus local volume", Volume: vol}}, nbd.Options{Logger: log})
	if err != nil {
		vol.Close()
		return err
	}
	log.Info("serving", "listen", *listen, "store", path, "size", units.FormatSize(size), "export", *name)
	serr := srv.Serve(ctx, l)
	cerr := vol.Close()
	if serr != nil && ctx.Err() == nil {
		return fmt.Errorf("serving %s: %w", *listen, serr)
	}
	if cerr != nil {
		return fmt.Errorf("closing the store: %w", cerr)
	}
	log.Info("stopped", "store", path)
	return nil
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
