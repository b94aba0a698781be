package main

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/torus-storage/torus/internal/testcluster"
)

// report is everything one run measured; --json writes it, and the
// results file (results.go) keeps its summary.
type report struct {
	LoadAvgEnd string    `json:"loadavg_end"`
	Machine    machine   `json:"machine"`
	Size       int64     `json:"size_bytes"`
	Runtime    string    `json:"runtime"`
	Started    time.Time `json:"started"`
	Targets    []string  `json:"targets"`
	Jobs       []job     `json:"jobs"`
	// Results is the per-field median over the rounds: target -> job -> result.
	Results map[string]map[string]result `json:"results"`
	Rounds  []round                      `json:"rounds"`
}

// round is one pass over every target.
type round struct {
	Order     []string                              `json:"order"`
	Commands  map[string][]string                   `json:"commands"`
	Results   map[string]map[string]result          `json:"results"` // target -> job -> result
	Prefill   map[string]result                     `json:"prefill"`
	FioOutput map[string]map[string]json.RawMessage `json:"fio_output"` // target -> job -> fio JSON
}

// benchmark runs the selected jobs on the selected targets and prints the
// report. It fails only when a target cannot be run.
func benchmark(ctx context.Context, cfg config) error {
	if err := checkBinaries(cfg.targets); err != nil {
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
	needBlk := contains(cfg.targets, "torus") || contains(cfg.targets, "cluster")
	if needBlk && torusblk == "" {
		slog.Info("building torusblk")
		if torusblk, err = testcluster.Build(ctx, work, "torusblk"); err != nil {
			return err
		}
	}
	if needBlk {
		if _, err := os.Stat(torusblk); err != nil {
			return fmt.Errorf("torusblk: %w", err)
		}
	}

	m := describeMachine(work)
	m.Tools = toolVersions(cfg.targets)
	fmt.Println(m)
	if l1, err := strconv.ParseFloat(strings.Fields(m.LoadAvg + " ?")[0], 64); err == nil && l1 > float64(m.CPUs)/2 {
		slog.Warn("the machine is busy; numbers will be noisy", "loadavg", m.LoadAvg, "nproc", m.CPUs)
	}
	if m.FSType == "tmpfs" {
		slog.Warn("the work dir is on tmpfs; numbers measure memory, not storage", "dir", work)
	}
	fmt.Printf("size=%d MiB runtime=%v per job, numjobs=1, rounds=%d (median shown), targets=%s\n\n",
		cfg.size>>20, cfg.runtime, cfg.rounds, strings.Join(cfg.targets, ","))

	rep := report{
		Machine: m, Size: cfg.size, Runtime: cfg.runtime.String(), Started: time.Now().UTC(),
		Targets: cfg.targets, Jobs: cfg.jobs,
	}
	for i := 0; i < cfg.rounds; i++ {
		// Rotate the order so no target always runs first (or last) on a
		// machine whose load drifts.
		rd := round{
			Commands:  map[string][]string{},
			Results:   map[string]map[string]result{},
			Prefill:   map[string]result{},
			FioOutput: map[string]map[string]json.RawMessage{},
		}
		for k := range cfg.targets {
			rd.Order = append(rd.Order, cfg.targets[(i+k)%len(cfg.targets)])
		}
		slog.Info("round", "n", i+1, "of", cfg.rounds, "order", strings.Join(rd.Order, ","))
		for _, t := range rd.Order {
			if err := runTarget(ctx, cfg, t, work, torusblk, &rd); err != nil {
				return fmt.Errorf("target %s: %w", t, err)
			}
		}
		rep.Rounds = append(rep.Rounds, rd)
	}
	rep.Results = medians(rep.Rounds)
	rep.LoadAvgEnd = loadAvg()
	printTable(os.Stdout, &rep)
	fmt.Printf("\nloadavg at start %s, at end %s (nproc=%d; fio and the server share these CPUs)\n", m.LoadAvg, rep.LoadAvgEnd, m.CPUs)
	printVerdict(os.Stdout, &rep)
	printCluster(os.Stdout, &rep)
	if cfg.jsonOut != "" {
		b, err := json.MarshalIndent(&rep, "", "  ")
		if err != nil {
			return fmt.Errorf("encode json: %w", err)
		}
		if err := os.WriteFile(cfg.jsonOut, b, 0o644); err != nil {
			return fmt.Errorf("write %s: %w", cfg.jsonOut, err)
		}
		fmt.Printf("\nraw results written to %s\n", cfg.jsonOut)
	}
	if cfg.results != "" {
		commit := ""
		if root, err := testcluster.ModuleRoot(); err == nil {
			commit = gitCommit(root)
		}
		path, err := writeResults(cfg.results, newRunResults(cfg, &rep, commit), rep.Started)
		if err != nil {
			return err
		}
		fmt.Printf("\nresults file written to %s (chart: go run ./bench chart %s)\n", path, path)
	}
	return nil
}

// runTarget starts one target, prefills it, runs the jobs and tears it down.
func runTarget(ctx context.Context, cfg config, target, work, torusblk string, rep *round) error {
	dir := filepath.Join(work, target)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("mkdir: %w", err)
	}
	if !cfg.keep {
		defer os.RemoveAll(dir)
	}
	srv, err := startTarget(ctx, target, dir, cfg.size, torusblk)
	if err != nil {
		return err
	}
	defer srv.stop()
	rep.Commands[target] = srv.cmd
	slog.Info("target ready", "target", target, "cmd", strings.Join(srv.cmd, " "))

	start := time.Now()
	res, _, err := runFio(ctx, dir, prefillJob, srv.io, cfg.size, cfg.runtime, false)
	if err != nil {
		return fmt.Errorf("prefill: %w", err)
	}
	rep.Prefill[target] = res
	slog.Info("prefilled", "target", target, "took", time.Since(start).Round(time.Millisecond), "MiB/s", int(res.BWBytes/(1<<20)))

	rep.Results[target] = map[string]result{}
	rep.FioOutput[target] = map[string]json.RawMessage{}
	for _, j := range cfg.jobs {
		res, raw, err := runFio(ctx, dir, j, srv.io, cfg.size, cfg.runtime, true)
		if err != nil {
			return err
		}
		rep.Results[target][j.Name] = res
		rep.FioOutput[target][j.Name] = raw
		slog.Info("job done", "target", target, "job", j.Name, "iops", int(res.IOPS),
			"p50_us", res.P50us, "p99_us", res.P99us)
	}
	if srv.proc != nil && srv.proc.Exited() {
		return fmt.Errorf("server exited during the run: %v (%s)", srv.proc.Err(), tail(srv.proc))
	}
	return nil
}

// workDir creates the directory holding every target's data. Without --dir it
// is a temp dir, on the repository's filesystem: os.TempDir when that is the
// same filesystem, else a hidden directory under bench/ (the go tool ignores
// it).
func workDir(dir string) (string, error) {
	if dir != "" {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return "", fmt.Errorf("--dir: %w", err)
		}
		if tmp, err := isTmpfs(dir); err != nil {
			return "", err
		} else if tmp {
			slog.Warn("--dir is on tmpfs", "dir", dir)
		}
		w, err := os.MkdirTemp(dir, "torus-bench-")
		if err != nil {
			return "", fmt.Errorf("--dir: %w", err)
		}
		return w, nil
	}
	root, err := testcluster.ModuleRoot()
	if err != nil {
		return "", err
	}
	parent := os.TempDir()
	if tmp, err := isTmpfs(parent); err != nil || tmp || !sameFS(parent, root) {
		parent = filepath.Join(root, "bench")
	}
	w, err := os.MkdirTemp(parent, ".torus-bench-")
	if err != nil {
		return "", fmt.Errorf("work dir: %w", err)
	}
	return w, nil
}

// toolVersions returns the first line of each tool's version output.
func toolVersions(targets []string) string {
	tools := [][]string{{"fio", "--version"}}
	if contains(targets, "nbdkit") {
		tools = append(tools, []string{"nbdkit", "--version"})
	}
	if contains(targets, "qemu-nbd") {
		tools = append(tools, []string{"qemu-nbd", "--version"})
	}
	var out []string
	for _, t := range tools {
		b, err := exec.Command(t[0], t[1:]...).Output()
		if err != nil {
			continue
		}
		line, _, _ := strings.Cut(strings.TrimSpace(string(b)), "\n")
		out = append(out, line)
	}
	return strings.Join(out, "; ")
}

// medians returns, for every target and job, the median of each field over
// the rounds (fields independently; with two rounds, the mean).
func medians(rounds []round) map[string]map[string]result {
	out := map[string]map[string]result{}
	if len(rounds) == 0 {
		return out
	}
	for t, jobs := range rounds[0].Results {
		out[t] = map[string]result{}
		for j := range jobs {
			var rs []result
			for _, rd := range rounds {
				if r, ok := rd.Results[t][j]; ok {
					rs = append(rs, r)
				}
			}
			out[t][j] = result{
				IOPS:    median(rs, func(r result) float64 { return r.IOPS }),
				BWBytes: median(rs, func(r result) float64 { return r.BWBytes }),
				P50us:   median(rs, func(r result) float64 { return r.P50us }),
				P99us:   median(rs, func(r result) float64 { return r.P99us }),
				MeanUs:  median(rs, func(r result) float64 { return r.MeanUs }),
			}
		}
	}
	return out
}

func median(rs []result, field func(result) float64) float64 {
	v := make([]float64, len(rs))
	for i, r := range rs {
		v[i] = field(r)
	}
	sort.Float64s(v)
	n := len(v)
	if n == 0 {
		return 0
	}
	if n%2 == 1 {
		return v[n/2]
	}
	return (v[n/2-1] + v[n/2]) / 2
}
