package main

// "bench snapshot": what a snapshot costs. One 3-node dev cluster, one R=3
// volume served by torusblk over NBD and prefilled; then, in one run:
// randwrite 4k QD32 with no snapshot (the baseline), the latency of
// snapshot create while the volume is attached (the barrier through the
// serving client) and while it is detached (etcd only), randwrite right
// after a snapshot (every chunk's first write copies it on its nodes) and
// again once every chunk is copied (the steady state, against the
// baseline). Like the rest of the benchmark it never fails on a figure.
//
// Invariants:
//   - Every process is stopped, and the work dir removed (unless --keep),
//     before the command returns.

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"syscall"
	"time"

	"github.com/torus-storage/torus/internal/testcluster"
	"github.com/torus-storage/torus/internal/units"
	"github.com/torus-storage/torus/meta"
)

// snapConfig is the parsed command line of bench snapshot.
type snapConfig struct {
	torusblk, dir string
	size          int64
	runtime       time.Duration
	reps          int
	keep          bool
}

func parseSnapFlags(args []string) (snapConfig, error) {
	fs := flag.NewFlagSet("bench snapshot", flag.ContinueOnError)
	var cfg snapConfig
	var size string
	fs.StringVar(&cfg.torusblk, "torusblk", "", "path to the torusblk binary (default: build ./cmd/torusblk into the work dir)")
	fs.StringVar(&cfg.dir, "dir", "", "directory for the cluster's data (default: a temp dir on the repo's filesystem; not tmpfs)")
	fs.StringVar(&size, "size", "256MiB", "size of the volume")
	fs.DurationVar(&cfg.runtime, "runtime", 10*time.Second, "runtime of each fio job")
	fs.IntVar(&cfg.reps, "reps", 10, "snapshot creates timed, attached and detached each")
	fs.BoolVar(&cfg.keep, "keep", false, "keep the work dir (data, logs) after the run")
	if err := fs.Parse(args); err != nil {
		return cfg, err
	}
	if fs.NArg() != 0 {
		return cfg, fmt.Errorf("unexpected arguments: %q", fs.Args())
	}
	var err error
	if cfg.size, err = units.ParseSize(size); err != nil {
		return cfg, fmt.Errorf("--size: %w", err)
	}
	if cfg.size < 16<<20 || cfg.size%(1<<20) != 0 {
		return cfg, fmt.Errorf("--size %d: must be a multiple of 1 MiB and at least 16 MiB", cfg.size)
	}
	if cfg.runtime < time.Second || cfg.reps < 1 {
		return cfg, fmt.Errorf("--runtime at least 1s and --reps at least 1")
	}
	return cfg, nil
}

// runSnapshot is the bench snapshot command; it returns the exit status.
func runSnapshot(args []string) int {
	cfg, err := parseSnapFlags(args)
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		fmt.Fprintf(os.Stderr, "bench snapshot: %v\n", err)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := benchSnapshot(ctx, cfg); err != nil {
		fmt.Fprintf(os.Stderr, "bench snapshot: %v\n", err)
		return 1
	}
	return 0
}

func benchSnapshot(ctx context.Context, cfg snapConfig) error {
	if err := checkBinaries(nil); err != nil {
		return err
	}
	work, err := workDir(cfg.dir)
	if err != nil {
		return err
	}
	if cfg.keep {
		defer fmt.Fprintf(os.Stderr, "work dir kept: %s\n", work)
	} else {
		defer os.RemoveAll(work)
	}
	torusblk := cfg.torusblk
	if torusblk == "" {
		slog.Info("building torusblk")
		if torusblk, err = testcluster.Build(ctx, work, "torusblk"); err != nil {
			return err
		}
	}
	m := describeMachine(work)
	m.Tools = toolVersions(nil)
	fmt.Println(m)
	// Room for the volume and one copy of each chunk per node.
	dc, err := startDev(ctx, work, 2*cfg.size)
	if err != nil {
		return err
	}
	defer stopProc(dc.proc)
	ms, err := meta.Open(ctx, []string{dc.etcd}, "", meta.Options{})
	if err != nil {
		return err
	}
	defer ms.Close()
	if err := dc.ctl(ctx, "volume", "create", "snap", "--size", fmt.Sprint(cfg.size), "--replication", "3"); err != nil {
		return err
	}
	sock := filepath.Join(work, "snap.sock")
	serve := func() (*server, error) {
		return startServer(ctx, work, sock, torusblk, "serve", "snap", "--etcd", dc.etcd, "--tls-dir", dc.tls, "--listen", "unix:"+sock)
	}
	srv, err := serve()
	if err != nil {
		return err
	}
	defer func() { srv.stop() }()
	slog.Info("prefill", "size", cfg.size)
	if _, _, err := runFio(ctx, work, prefillJob, srv.io, cfg.size, 0, false); err != nil {
		return fmt.Errorf("prefill: %w", err)
	}
	n := 0
	snap := func() (time.Duration, error) {
		n++
		start := time.Now()
		_, err := ms.TakeSnapshots(ctx, "", []meta.SnapshotRequest{{Volume: "snap", Name: fmt.Sprintf("s%d", n)}}, 10*time.Second)
		return time.Since(start), err
	}
	// Snapshots of a volume with no change since the last one copy nothing:
	// the timings measure the barrier alone.
	times := func(what string) ([]time.Duration, error) {
		var d []time.Duration
		for range cfg.reps {
			t, err := snap()
			if err != nil {
				return nil, fmt.Errorf("snapshot %s: %w", what, err)
			}
			d = append(d, t)
		}
		slices.Sort(d)
		return d, nil
	}
	w := job{Name: "randwrite-4k-qd32", RW: "randwrite", BS: "4k", IODepth: 32}
	run := func(name string) (result, error) {
		j := w
		j.Name += "-" + name
		slog.Info("fio", "job", j.Name)
		r, _, err := runFio(ctx, work, j, srv.io, cfg.size, cfg.runtime, true)
		return r, err
	}
	base, err := run("baseline")
	if err != nil {
		return err
	}
	attached, err := times("attached")
	if err != nil {
		return err
	}
	cow, err := run("after-snapshot")
	if err != nil {
		return err
	}
	steady, err := run("steady")
	if err != nil {
		return err
	}
	srv.stop()
	detached, err := times("detached")
	if err != nil {
		return err
	}
	if srv, err = serve(); err != nil {
		return err
	}
	med := func(d []time.Duration) time.Duration { return d[len(d)/2] }
	fmt.Printf("3-node dev cluster, R=3 volume of %d MiB over NBD (torusblk serve), fio libnbd, %v per job\n\n", cfg.size>>20, cfg.runtime)
	fmt.Printf("snapshot create (%d each, etcd and barrier, no torusctl process): attached median %v (min %v, max %v); detached median %v (min %v, max %v)\n",
		cfg.reps, med(attached).Round(10*time.Microsecond), attached[0].Round(10*time.Microsecond), attached[len(attached)-1].Round(10*time.Microsecond),
		med(detached).Round(10*time.Microsecond), detached[0].Round(10*time.Microsecond), detached[len(detached)-1].Round(10*time.Microsecond))
	fmt.Printf("%-34s %10s %10s %10s %12s\n", "randwrite 4k QD32", "IOPS", "p50 µs", "p99 µs", "of baseline")
	for _, r := range []struct {
		name string
		r    result
	}{{"no snapshot", base}, {"right after a snapshot (copies)", cow}, {"steady (every chunk copied)", steady}} {
		fmt.Printf("%-34s %10.0f %10.0f %10.0f %11.1f%%\n", r.name, r.r.IOPS, r.r.P50us, r.r.P99us, 100*r.r.IOPS/base.IOPS)
	}
	fmt.Printf("\nloadavg at start %s, at end %s (nproc=%d)\n", m.LoadAvg, loadAvg(), m.CPUs)
	return nil
}
