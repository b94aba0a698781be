package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"runtime/pprof"

	"github.com/spf13/pflag"

	"github.com/torus-storage/torus/engine"
	"github.com/torus-storage/torus/internal/procs"
	"github.com/torus-storage/torus/internal/units"
	"github.com/torus-storage/torus/nbd"
	"github.com/torus-storage/torus/store"
)

// storeFile is the name of the store file inside --store DIR.
const storeFile = "volume.store"

func cmdServe(ctx context.Context, args []string, stdout, stderr io.Writer, log *slog.Logger) error {
	fs := pflag.NewFlagSet("serve", pflag.ContinueOnError)
	fs.SetOutput(stderr)
	var vf volumeFlags
	vf.register(fs)
	var cf clusterFlags
	cf.register(fs)
	var ef extraFlags
	ef.register(fs)
	listen := fs.String("listen", "", "where to serve NBD: unix:PATH or tcp:HOST:PORT")
	name := fs.String("name", "torus", "NBD export name")
	shards := fs.Int("shards", 0, "store io_uring shards, each one ring on one OS thread (default: one per CPU)")
	maxProcs := fs.Int("gomaxprocs", procs.Auto, "GOMAXPROCS: 0 = CPUs + shards (so goroutines never wait for shards blocked in io_uring), -1 = Go's default")
	noRing := fs.Bool("no-ring-conns", false, "serve each NBD connection with reader and writer goroutines instead of one io_uring thread that runs the store shards (for comparison)")
	cpuProfile := fs.String("cpuprofile", "", "write a Go CPU profile of the whole run to this file (for performance work)")
	fs.Usage = func() {
		fmt.Fprintf(stderr, "Usage: torusblk serve --store DIR --size SIZE --listen unix:PATH|tcp:HOST:PORT   (a local volume)\n       torusblk serve NAME --etcd URL --tls-dir DIR --listen unix:PATH|tcp:HOST:PORT   (a cluster volume)\n\n%s", fs.FlagUsages())
	}
	if help, err := parseFlags(fs, args); help || err != nil {
		return err
	}
	if fs.NArg() > 1 {
		return fmt.Errorf("%w: unexpected argument %q: serve takes one cluster volume NAME, or --store and --size for a local volume", errUsage, fs.Arg(1))
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
		if *listen == "" {
			return fmt.Errorf("%w: --listen is required (example: torusblk serve %s --etcd http://10.0.0.1:2379 --tls-dir /etc/torus/client --listen unix:/run/torus/%s.sock)", errUsage, fs.Arg(0), fs.Arg(0))
		}
	} else {
		if vf.store == "" || vf.size == "" || *listen == "" {
			return fmt.Errorf("%w: --store, --size and --listen are required (example: torusblk serve --store /var/lib/torus/vol0 --size 10GiB --listen unix:/run/torus/vol0.sock), or give a cluster volume NAME", errUsage)
		}
		var err error
		if path, size, err = vf.parse(); err != nil {
			return err
		}
	}
	if *shards < 0 {
		return fmt.Errorf("%w: --shards %d: must not be negative", errUsage, *shards)
	}
	if _, err := procs.Set(*maxProcs, *shards, log); err != nil {
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
	// A local volume: listen before opening the store so a busy port costs
	// nothing. A cluster volume: attach first, so that no client connects to
	// a server that then fails to take the attach lock.
	var l net.Listener
	listenNBD := func() (err error) {
		l, err = nbd.Listen(*listen)
		return err
	}
	if !cluster {
		if err := listenNBD(); err != nil {
			return err
		}
		defer l.Close()
	}

	var vol engine.Volume
	desc, source := "torus local volume", path
	if cluster {
		cv, err := openCluster(ctx, fs.Arg(0), cf, log)
		if err != nil {
			return err
		}
		xv, err := withExtras(cv, ef, log)
		if err != nil {
			cv.Close()
			return err
		}
		vol, desc, source, size = xv, "torus cluster volume "+fs.Arg(0), fs.Arg(0), cv.Size()
		if err := listenNBD(); err != nil {
			xv.Close()
			return err
		}
		defer l.Close()
	} else {
		lv, err := store.OpenLocal(path, size, store.LocalOptions{Logger: log, Shards: *shards})
		if err != nil {
			return err
		}
		vol = lv
	}
	srv, err := nbd.NewServer([]nbd.Export{{Name: *name, Description: desc, Volume: vol}}, nbd.Options{Logger: log, NoRing: *noRing})
	if err != nil {
		vol.Close()
		return err
	}
	log.Info("serving", "listen", *listen, "volume", source, "size", units.FormatSize(size), "export", *name)
	serr := srv.Serve(ctx, l)
	cerr := vol.Close()
	if serr != nil && ctx.Err() == nil {
		return fmt.Errorf("serving %s: %w", *listen, serr)
	}
	if cerr != nil {
		return fmt.Errorf("closing the store: %w", cerr)
	}
	log.Info("stopped", "volume", source)
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
