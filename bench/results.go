package main

// Results files keep one benchmark run each under bench/results, so that
// runs can be compared and charted later (bench/README.md documents the
// format).
//
// Invariants:
//   - A results file is written only after every selected target ran every
//     selected job; a run that fails writes none.
//   - A file that loadResults accepts names every job and target of its
//     results in its Jobs and Targets lists, holds at most one result per
//     job and target, names its Subject and Peers among its Targets, and has
//     no negative or non-finite figure.
//   - Writing never overwrites an existing file.

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"time"
)

// resultsFormat is the version of the results file format.
const resultsFormat = 1

// runResults is one run of a benchmark as kept in a results file.
type runResults struct {
	// Format is resultsFormat.
	Format int `json:"format"`
	// Bench is "host" (go run ./bench) or "vm" (scripts/vm/bench-vm.sh).
	Bench string `json:"bench"`
	// Date is when the run started: RFC 3339 in UTC when the program wrote
	// the file, a plain YYYY-MM-DD when a printed table was transcribed.
	Date string `json:"date"`
	// Commit is the abbreviated commit the run measured ("-dirty" when the
	// work tree had changes), empty when unknown.
	Commit string `json:"commit,omitempty"`
	// Command is the command line of the run.
	Command string `json:"command,omitempty"`
	// Partial is true when only some figures of the run were recorded.
	Partial bool `json:"partial,omitempty"`
	// Machine describes where the run happened.
	Machine runMachine `json:"machine"`
	// SizeMiB is the volume (and file) size in MiB.
	SizeMiB int64 `json:"size_mib,omitempty"`
	// Runtime is the runtime of each measured job.
	Runtime string `json:"runtime,omitempty"`
	// Rounds is how many passes the figures are the median of.
	Rounds int `json:"rounds,omitempty"`
	// Subject is the Torus target the ratios are about: "torus" on the
	// host, "ublk" in the VM.
	Subject string `json:"subject"`
	// Peers are the targets the subject is compared with: the best of them
	// per job is the denominator of "subject / best peer".
	Peers []string `json:"peers"`
	// Targets are the targets of the run, in the order they are shown.
	Targets []string `json:"targets"`
	// Jobs are the jobs of the run, in the order they are shown.
	Jobs []string `json:"jobs"`
	// Results holds at most one entry per job and target.
	Results []runResult `json:"results"`
	// Notes says anything else a reader of the figures needs to know.
	Notes string `json:"notes,omitempty"`
}

// runMachine describes the machine of a run. Facts that were not recorded
// are left empty.
type runMachine struct {
	// Description is a one-line summary, for the chart's title.
	Description string `json:"description,omitempty"`
	// CPUs is the number of CPUs (nproc).
	CPUs int `json:"nproc,omitempty"`
	// CPUModel is the CPU's model name.
	CPUModel string `json:"cpu_model,omitempty"`
	// MemGiB is the memory size in GiB.
	MemGiB float64 `json:"mem_gib,omitempty"`
	// Kernel is the kernel release.
	Kernel string `json:"kernel,omitempty"`
	// FS is the filesystem the data was on and its device.
	FS string `json:"fs,omitempty"`
	// Tools are the versions of fio and the peers.
	Tools string `json:"tools,omitempty"`
	// LoadAvgStart and LoadAvgEnd are the load averages (1, 5 and 15
	// minutes, or a single figure) at the start and the end of the run.
	LoadAvgStart string `json:"loadavg_start,omitempty"`
	LoadAvgEnd   string `json:"loadavg_end,omitempty"`
}

// runResult is the outcome of one job on one target. A figure that was not
// recorded is nil.
type runResult struct {
	// Job and Target name the job and the target.
	Job    string `json:"job"`
	Target string `json:"target"`
	// IOPS is the median IOPS over the rounds (for 1 MiB jobs, MiB/s).
	IOPS *float64 `json:"iops,omitempty"`
	// P50us and P99us are the median 50th and 99th percentiles of fio's
	// completion latency, in µs.
	P50us *float64 `json:"p50_us,omitempty"`
	P99us *float64 `json:"p99_us,omitempty"`
	// RoundIOPS are the IOPS of each round, where they were recorded.
	RoundIOPS []float64 `json:"round_iops,omitempty"`
}

// lookup returns the result of job on target, if the file has one.
func (r *runResults) lookup(jobName, target string) (runResult, bool) {
	for _, x := range r.Results {
		if x.Job == jobName && x.Target == target {
			return x, true
		}
	}
	return runResult{}, false
}

// iops returns the IOPS of job on target, if recorded.
func (r *runResults) iops(jobName, target string) (float64, bool) {
	x, ok := r.lookup(jobName, target)
	if !ok || x.IOPS == nil {
		return 0, false
	}
	return *x.IOPS, true
}

// peerRatio returns Subject's IOPS over the best peer's on job, and that
// peer, if both were recorded.
func (r *runResults) peerRatio(jobName string) (float64, string, bool) {
	s, ok := r.iops(jobName, r.Subject)
	if !ok {
		return 0, "", false
	}
	best, bestIOPS := "", 0.0
	for _, p := range r.Peers {
		if v, ok := r.iops(jobName, p); ok && v > bestIOPS {
			best, bestIOPS = p, v
		}
	}
	if best == "" {
		return 0, "", false
	}
	return s / bestIOPS, best, true
}

// title returns a one-line name of the run: date, commit, bench and, in
// the VM, the kernel.
func (r *runResults) title() string {
	s := r.Date
	if r.Commit != "" {
		s += " at " + r.Commit
	}
	s += " (" + r.Bench
	if r.Bench == "vm" && r.Machine.Kernel != "" {
		s += ", " + r.Machine.Kernel
	}
	return s + ")"
}

// loadResults reads and checks a results file.
func loadResults(path string) (*runResults, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read results: %w", err)
	}
	r, err := parseResults(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return r, nil
}

// parseResults decodes a results file and checks its invariants.
func parseResults(b []byte) (*runResults, error) {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var r runResults
	if err := dec.Decode(&r); err != nil {
		return nil, fmt.Errorf("parse results: %w", err)
	}
	if dec.More() {
		return nil, errors.New("parse results: data after the JSON object")
	}
	if r.Format != resultsFormat {
		return nil, fmt.Errorf("results format %d, want %d", r.Format, resultsFormat)
	}
	if r.Bench != "host" && r.Bench != "vm" {
		return nil, fmt.Errorf("bench %q: want host or vm", r.Bench)
	}
	if r.Date == "" {
		return nil, errors.New("no date")
	}
	if err := uniqueNames("targets", r.Targets); err != nil {
		return nil, err
	}
	if err := uniqueNames("jobs", r.Jobs); err != nil {
		return nil, err
	}
	if !contains(r.Targets, r.Subject) {
		return nil, fmt.Errorf("subject %q is not among the targets %v", r.Subject, r.Targets)
	}
	for _, p := range r.Peers {
		if !contains(r.Targets, p) || p == r.Subject {
			return nil, fmt.Errorf("peer %q: not a target other than the subject", p)
		}
	}
	seen := map[[2]string]bool{}
	for _, x := range r.Results {
		if !contains(r.Jobs, x.Job) || !contains(r.Targets, x.Target) {
			return nil, fmt.Errorf("result for job %q on target %q: not a listed job and target", x.Job, x.Target)
		}
		k := [2]string{x.Job, x.Target}
		if seen[k] {
			return nil, fmt.Errorf("two results for job %q on target %q", x.Job, x.Target)
		}
		seen[k] = true
		figs := append([]float64(nil), x.RoundIOPS...)
		for _, p := range []*float64{x.IOPS, x.P50us, x.P99us} {
			if p != nil {
				figs = append(figs, *p)
			}
		}
		for _, v := range figs {
			if v < 0 || math.IsNaN(v) || math.IsInf(v, 0) {
				return nil, fmt.Errorf("result for job %q on target %q: bad figure %v", x.Job, x.Target, v)
			}
		}
	}
	if len(r.Results) == 0 {
		return nil, errors.New("no results")
	}
	return &r, nil
}

// uniqueNames checks that list is not empty and has no empty or repeated
// name.
func uniqueNames(what string, list []string) error {
	if len(list) == 0 {
		return fmt.Errorf("no %s", what)
	}
	seen := map[string]bool{}
	for _, s := range list {
		if s == "" || seen[s] {
			return fmt.Errorf("%s %v: empty or repeated name", what, list)
		}
		seen[s] = true
	}
	return nil
}

// newRunResults converts a finished run of this program into a results file.
func newRunResults(cfg config, rep *report, commit string) *runResults {
	m := rep.Machine
	fs := m.FSType
	if m.FSSource != "" {
		fs += " (" + m.FSSource + ", mounted at " + m.Mount + ")"
	}
	r := &runResults{
		Format:  resultsFormat,
		Bench:   "host",
		Date:    rep.Started.UTC().Format(time.RFC3339),
		Commit:  commit,
		Command: strings.TrimSpace("go run ./bench " + strings.Join(cfg.args, " ")),
		Machine: runMachine{
			Description: fmt.Sprintf("%d CPUs (%s), %.1f GiB, Linux %s, %s", m.CPUs, m.CPUModel,
				float64(m.MemBytes)/(1<<30), m.Kernel, fs),
			CPUs:         m.CPUs,
			CPUModel:     m.CPUModel,
			MemGiB:       math.Round(float64(m.MemBytes)/(1<<30)*10) / 10,
			Kernel:       m.Kernel,
			FS:           fs,
			Tools:        m.Tools,
			LoadAvgStart: m.LoadAvg,
			LoadAvgEnd:   rep.LoadAvgEnd,
		},
		SizeMiB: rep.Size >> 20,
		Runtime: rep.Runtime,
		Rounds:  len(rep.Rounds),
		Subject: "torus",
		Targets: rep.Targets,
	}
	for _, p := range nbdPeers {
		if contains(rep.Targets, p) {
			r.Peers = append(r.Peers, p)
		}
	}
	if !contains(rep.Targets, "torus") {
		// The ratios are about the single-node volume; without it the
		// first target stands in.
		r.Subject, r.Peers = rep.Targets[0], nil
	}
	if cfg.torusblk != "" {
		r.Notes = "torusblk was " + cfg.torusblk + ", which may not be built from the commit above"
	}
	for _, j := range rep.Jobs {
		r.Jobs = append(r.Jobs, j.Name)
	}
	for _, j := range rep.Jobs {
		for _, t := range rep.Targets {
			res, ok := rep.Results[t][j.Name]
			if !ok {
				continue
			}
			x := runResult{Job: j.Name, Target: t, IOPS: ptr(res.IOPS), P50us: ptr(res.P50us), P99us: ptr(res.P99us)}
			if len(rep.Rounds) > 1 {
				for _, rd := range rep.Rounds {
					x.RoundIOPS = append(x.RoundIOPS, rd.Results[t][j.Name].IOPS)
				}
			}
			r.Results = append(r.Results, x)
		}
	}
	return r
}

func ptr(v float64) *float64 { return &v }

// writeResults writes r into dir as DATE-host-COMMIT.json (the date with
// its time, so names sort in the order the runs started) and returns the
// path. It never overwrites a file.
func writeResults(dir string, r *runResults, started time.Time) (string, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("results dir: %w", err)
	}
	commit := r.Commit
	if commit == "" {
		commit = "unknown"
	}
	name := started.UTC().Format("2006-01-02T150405Z") + "-" + r.Bench + "-" + commit + ".json"
	path := filepath.Join(dir, name)
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return "", fmt.Errorf("encode results: %w", err)
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return "", fmt.Errorf("write results: %w", err)
	}
	if _, err := f.Write(append(b, '\n')); err != nil {
		f.Close()
		return "", fmt.Errorf("write results %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return "", fmt.Errorf("write results %s: %w", path, err)
	}
	return path, nil
}

// gitCommit returns the abbreviated commit of the work tree at root, with
// "-dirty" when tracked files have changes, or "" when git cannot tell.
func gitCommit(root string) string {
	out, err := exec.Command("git", "-C", root, "rev-parse", "--short=7", "HEAD").Output()
	if err != nil {
		return ""
	}
	commit := strings.TrimSpace(string(out))
	st, err := exec.Command("git", "-C", root, "status", "--porcelain", "--untracked-files=no").Output()
	if err == nil && len(bytes.TrimSpace(st)) > 0 {
		commit += "-dirty"
	}
	return commit
}

// newestResults returns the newest results file in dir of the given bench
// that is not partial: names sort in the order the runs started.
func newestResults(dir, bench string) (string, error) {
	paths, err := filepath.Glob(filepath.Join(dir, "*.json"))
	if err != nil {
		return "", fmt.Errorf("list results: %w", err)
	}
	sort.Strings(paths)
	for i := len(paths) - 1; i >= 0; i-- {
		r, err := loadResults(paths[i])
		if err != nil {
			return "", err
		}
		if r.Bench == bench && !r.Partial {
			return paths[i], nil
		}
	}
	return "", fmt.Errorf("no complete %s results file in %s", bench, dir)
}
