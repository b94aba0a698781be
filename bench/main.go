// Command bench measures a Torus volume served by torusblk over NBD against
// its peers on the same backing storage, in one run, with fio.
//
// Targets:
//   - torus:    torusblk serve --store DIR --size SIZE --listen unix:SOCK
//   - nbdkit:   nbdkit --unix SOCK --foreground file FILE cache=none fadvise=random
//   - qemu-nbd: qemu-nbd --cache=none --aio=io_uring --format=raw --persistent
//     --shared=4 --socket SOCK FILE
//   - raw:      fio --ioengine=io_uring --direct=1 on a plain file (the physical limit)
//
// The NBD targets are driven by fio's nbd engine (libnbd) over a unix socket.
// Every target gets its own file or store under --dir, is prefilled with one
// unmeasured sequential write, then runs the selected jobs one fio process at a
// time. The program prints the machine, a table of IOPS and p50/p99 completion
// latency per job and target, the ratios of Torus to its peers and PASS/MISS
// against the performance targets, and writes the run to a results file
// (bench/results/DATE-host-COMMIT.json unless --results or --no-results say
// otherwise). A miss is informational; the program exits non-zero only when
// a target cannot be run.
//
// "bench chart [-o FILE] [RESULTS...]" draws results files as an SVG chart
// (chart.go) instead of running anything. "bench qos" measures how closely
// a cluster volume is held to each kind of QoS limit (qos.go); "bench
// snapshot" what a snapshot costs (snapshot.go).
//
// Invariants:
//   - Every process the program starts runs in its own process group and is
//     killed (the whole group) before the program returns, on success, error or
//     interrupt.
//   - Targets run one after another, never concurrently, and each target's
//     backing data is removed before the next target starts.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/torus-storage/torus/internal/testcluster"
)

// config is the parsed command line.
type config struct {
	torusblk string
	dir      string
	size     int64
	runtime  time.Duration
	targets  []string
	jobs     []job
	jsonOut  string
	keep     bool
	rounds   int
	// results is the directory the results file goes to; "" when
	// --no-results.
	results string
	// args is the command line, recorded in the results file.
	args []string
}

func main() {
	os.Exit(run())
}

func run() int {
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	slog.SetDefault(logger)

	if len(os.Args) > 1 && os.Args[1] == "chart" {
		return runChart(os.Args[2:])
	}
	if len(os.Args) > 1 && os.Args[1] == "qos" {
		return runQoS(os.Args[2:])
	}
	if len(os.Args) > 1 && os.Args[1] == "snapshot" {
		return runSnapshot(os.Args[2:])
	}
	cfg, err := parseFlags(os.Args[1:])
	if err != nil {
		fmt.Fprintf(os.Stderr, "bench: %v\n", err)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	if err := benchmark(ctx, cfg); err != nil {
		fmt.Fprintf(os.Stderr, "bench: %v\n", err)
		return 1
	}
	return 0
}

func parseFlags(args []string) (config, error) {
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	var (
		cfg       config
		size      string
		targets   string
		jobs      string
		noResults bool
	)
	fs.StringVar(&cfg.torusblk, "torusblk", "", "path to the torusblk binary (default: build ./cmd/torusblk into the work dir)")
	fs.StringVar(&cfg.dir, "dir", "", "directory for the backing files and stores (default: a temp dir on the repo's filesystem; not tmpfs)")
	fs.StringVar(&size, "size", "1GiB", "size of the volume and of each file (e.g. 1GiB, 512MiB, bytes)")
	fs.DurationVar(&cfg.runtime, "runtime", 10*time.Second, "runtime of each measured fio job")
	fs.StringVar(&targets, "targets", strings.Join(allTargets, ","), "comma-separated targets to run: "+strings.Join(allTargets, ","))
	fs.StringVar(&jobs, "jobs", jobNames(allJobs), "comma-separated jobs to run: "+jobNames(allJobs))
	fs.StringVar(&cfg.jsonOut, "json", "", "write the raw fio results and the summary to this file")
	fs.IntVar(&cfg.rounds, "rounds", 1, "passes over all targets (order rotated each pass); the table shows the median")
	fs.BoolVar(&cfg.keep, "keep", false, "keep the work dir (backing files, logs) after the run")
	fs.StringVar(&cfg.results, "results", "", "directory for the results file of the run (default: bench/results in the repository)")
	fs.BoolVar(&noResults, "no-results", false, "write no results file")
	if err := fs.Parse(args); err != nil {
		return config{}, err
	}
	if fs.NArg() != 0 {
		return config{}, fmt.Errorf("unexpected arguments: %q (the subcommands are chart, qos and snapshot)", fs.Args())
	}
	cfg.args = args
	var err error
	if noResults {
		cfg.results = ""
	} else if cfg.results == "" {
		if root, err := testcluster.ModuleRoot(); err == nil {
			cfg.results = filepath.Join(root, "bench", "results")
		} else {
			slog.Warn("no results file will be written; pass --results DIR", "err", err)
		}
	}
	if cfg.size, err = parseSize(size); err != nil {
		return config{}, fmt.Errorf("--size: %w", err)
	}
	if cfg.size < 16<<20 || cfg.size%(1<<20) != 0 {
		return config{}, fmt.Errorf("--size %d: must be a multiple of 1 MiB and at least 16 MiB", cfg.size)
	}
	if cfg.runtime < time.Second {
		return config{}, fmt.Errorf("--runtime %v: must be at least 1s", cfg.runtime)
	}
	if cfg.rounds < 1 {
		return config{}, fmt.Errorf("--rounds %d: must be at least 1", cfg.rounds)
	}
	for _, t := range splitList(targets) {
		if !contains(allTargets, t) {
			return config{}, fmt.Errorf("--targets: unknown target %q (want some of %s)", t, strings.Join(allTargets, ","))
		}
		if !contains(cfg.targets, t) {
			cfg.targets = append(cfg.targets, t)
		}
	}
	if len(cfg.targets) == 0 {
		return config{}, errors.New("--targets: no target selected")
	}
	for _, name := range splitList(jobs) {
		j, ok := findJob(name)
		if !ok {
			return config{}, fmt.Errorf("--jobs: unknown job %q (want some of %s)", name, jobNames(allJobs))
		}
		cfg.jobs = append(cfg.jobs, j)
	}
	if len(cfg.jobs) == 0 {
		return config{}, errors.New("--jobs: no job selected")
	}
	return cfg, nil
}

// parseSize parses a byte count with an optional binary suffix
// (K, KiB, M, MiB, G, GiB; decimal KB/MB/GB are read as binary too).
func parseSize(s string) (int64, error) {
	s = strings.TrimSpace(s)
	i := len(s)
	for i > 0 && (s[i-1] < '0' || s[i-1] > '9') {
		i--
	}
	n, err := strconv.ParseInt(s[:i], 10, 64)
	if err != nil {
		return 0, fmt.Errorf("parse %q: %w", s, err)
	}
	var shift uint
	switch strings.ToUpper(s[i:]) {
	case "", "B":
	case "K", "KB", "KIB":
		shift = 10
	case "M", "MB", "MIB":
		shift = 20
	case "G", "GB", "GIB":
		shift = 30
	case "T", "TB", "TIB":
		shift = 40
	default:
		return 0, fmt.Errorf("parse %q: unknown suffix %q", s, s[i:])
	}
	return n << shift, nil
}

func splitList(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}
