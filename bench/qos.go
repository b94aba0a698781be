package main

// "bench qos": how closely a volume is held to its QoS limits. One 3-node
// dev cluster, one R=3 volume served by torusblk over NBD, prefilled once;
// then for each kind of limit (read IOPS, write IOPS, read bandwidth, write
// bandwidth) fio runs the same job twice: unlimited (the volume's capacity
// for that job, so the limit is known to bind) and with only that limit set
// by `torusctl volume set-qos` while the volume stays attached. The report
// gives fio's figure against the limit and whether it is within ±5%, and
// the throttled requests and mean wait from the volume's metrics. Like the
// rest of the benchmark it never fails on a miss.
//
// Invariants:
//   - A limit is measured only once the server's metrics show it in force
//     (and the unlimited run only once they show every limit lifted).
//   - Every process is stopped, and the work dir removed (unless --keep),
//     before the command returns.

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/torus-storage/torus/internal/metrics/metricstest"
	"github.com/torus-storage/torus/internal/testcluster"
	"github.com/torus-storage/torus/internal/units"
)

// qosTolerance is how far from its limit a limited job may land and count
// as held to it.
const qosTolerance = 0.05

// qosCase is one kind of limit and the fio job that measures it.
type qosCase struct {
	Kind   string  `json:"kind"` // read-iops, write-iops, read-bps, write-bps
	Job    job     `json:"job"`
	Limit  float64 `json:"limit"` // IOPS, or bytes per second for a -bps kind
	metric string  // the gauge of the limit in force
}

// bytes reports whether the limit is in bytes per second.
func (c qosCase) bytes() bool { return strings.HasSuffix(c.Kind, "-bps") }

// figure is what fio measured of c's job in its unit.
func (c qosCase) figure(r result) float64 {
	if c.bytes() {
		return r.BWBytes
	}
	return r.IOPS
}

// format prints v in c's unit.
func (c qosCase) format(v float64) string {
	if c.bytes() {
		return fmt.Sprintf("%.2f MiB/s", v/(1<<20))
	}
	return fmt.Sprintf("%.1f IOPS", v)
}

// qosResult is one case's measurement.
type qosResult struct {
	qosCase
	Unlimited result `json:"unlimited"`
	Limited   result `json:"limited"`
	// Achieved is the limited run's figure over the limit.
	Achieved float64 `json:"achieved_of_limit"`
	Within   bool    `json:"within_tolerance"`
	// Throttled and ThrottledSeconds are the volume's throttle counters
	// over the limited run (its direction).
	Throttled        float64 `json:"throttled_requests"`
	ThrottledSeconds float64 `json:"throttled_seconds"`
}

// qosReport is the results file of a QoS run (bench/results/qos/).
type qosReport struct {
	Bench      string      `json:"bench"` // "qos"
	Date       string      `json:"date"`
	Commit     string      `json:"commit"`
	Args       []string    `json:"args"`
	Machine    machine     `json:"machine"`
	LoadAvgEnd string      `json:"loadavg_end"`
	Size       int64       `json:"size_bytes"`
	Runtime    string      `json:"runtime"`
	Burst      string      `json:"burst"`
	Tolerance  float64     `json:"tolerance"`
	Results    []qosResult `json:"results"`
}

// qosConfig is the parsed command line of bench qos.
type qosConfig struct {
	torusblk, dir, results string
	size                   int64
	runtime, burst         time.Duration
	keep                   bool
	cases                  []qosCase
	args                   []string
}

func parseQoSFlags(args []string) (qosConfig, error) {
	fs := flag.NewFlagSet("bench qos", flag.ContinueOnError)
	var (
		cfg        qosConfig
		size       string
		noResults  bool
		rIOPS      = fs.Uint64("read-iops", 2000, "read IOPS limit (fio randread 4k QD32)")
		wIOPS      = fs.Uint64("write-iops", 1000, "write IOPS limit (fio randwrite 4k QD32)")
		rBPS, wBPS string
	)
	fs.StringVar(&rBPS, "read-bps", "40MiB", "read bandwidth limit per second (fio randread 64k QD16)")
	fs.StringVar(&wBPS, "write-bps", "10MiB", "write bandwidth limit per second (fio randwrite 64k QD16)")
	fs.StringVar(&cfg.torusblk, "torusblk", "", "path to the torusblk binary (default: build ./cmd/torusblk into the work dir)")
	fs.StringVar(&cfg.dir, "dir", "", "directory for the cluster's data (default: a temp dir on the repo's filesystem; not tmpfs)")
	fs.StringVar(&size, "size", "256MiB", "size of the volume")
	fs.DurationVar(&cfg.runtime, "runtime", 10*time.Second, "runtime of each measured fio job")
	fs.DurationVar(&cfg.burst, "burst", 0, "QoS burst of the limited runs (0: requests paced at the limit)")
	fs.BoolVar(&cfg.keep, "keep", false, "keep the work dir (data, logs) after the run")
	fs.StringVar(&cfg.results, "results", "", "directory for the results file (default: bench/results/qos in the repository)")
	fs.BoolVar(&noResults, "no-results", false, "write no results file")
	if err := fs.Parse(args); err != nil {
		return cfg, err
	}
	if fs.NArg() != 0 {
		return cfg, fmt.Errorf("unexpected arguments: %q", fs.Args())
	}
	cfg.args = args
	var err error
	if cfg.size, err = units.ParseSize(size); err != nil {
		return cfg, fmt.Errorf("--size: %w", err)
	}
	if cfg.size < 16<<20 || cfg.size%(1<<20) != 0 {
		return cfg, fmt.Errorf("--size %d: must be a multiple of 1 MiB and at least 16 MiB", cfg.size)
	}
	if cfg.runtime < time.Second {
		return cfg, fmt.Errorf("--runtime %v: must be at least 1s", cfg.runtime)
	}
	if cfg.burst < 0 || cfg.burst%time.Millisecond != 0 {
		return cfg, fmt.Errorf("--burst %v: whole milliseconds, not negative", cfg.burst)
	}
	rb, err := units.ParseSize(rBPS)
	if err != nil {
		return cfg, fmt.Errorf("--read-bps: %w", err)
	}
	wb, err := units.ParseSize(wBPS)
	if err != nil {
		return cfg, fmt.Errorf("--write-bps: %w", err)
	}
	for _, v := range []struct {
		name string
		v    uint64
	}{{"--read-iops", *rIOPS}, {"--write-iops", *wIOPS}, {"--read-bps", uint64(rb)}, {"--write-bps", uint64(wb)}} {
		if v.v == 0 {
			return cfg, fmt.Errorf("%s 0: a limit to measure must not be 0", v.name)
		}
	}
	cfg.cases = []qosCase{
		{Kind: "read-iops", Job: job{Name: "randread-4k-qd32", RW: "randread", BS: "4k", IODepth: 32}, Limit: float64(*rIOPS),
			metric: "torus_volume_qos_read_iops_limit"},
		{Kind: "write-iops", Job: job{Name: "randwrite-4k-qd32", RW: "randwrite", BS: "4k", IODepth: 32}, Limit: float64(*wIOPS),
			metric: "torus_volume_qos_write_iops_limit"},
		{Kind: "read-bps", Job: job{Name: "randread-64k-qd16", RW: "randread", BS: "64k", IODepth: 16}, Limit: float64(rb),
			metric: "torus_volume_qos_read_bytes_per_second_limit"},
		{Kind: "write-bps", Job: job{Name: "randwrite-64k-qd16", RW: "randwrite", BS: "64k", IODepth: 16}, Limit: float64(wb),
			metric: "torus_volume_qos_write_bytes_per_second_limit"},
	}
	if noResults {
		cfg.results = ""
	} else if cfg.results == "" {
		if root, err := testcluster.ModuleRoot(); err == nil {
			cfg.results = filepath.Join(root, "bench", "results", "qos")
		} else {
			slog.Warn("no results file will be written; pass --results DIR", "err", err)
		}
	}
	return cfg, nil
}

// runQoS is the bench qos command; it returns the exit status.
func runQoS(args []string) int {
	cfg, err := parseQoSFlags(args)
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		fmt.Fprintf(os.Stderr, "bench qos: %v\n", err)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := benchQoS(ctx, cfg); err != nil {
		fmt.Fprintf(os.Stderr, "bench qos: %v\n", err)
		return 1
	}
	return 0
}

// benchQoS runs every case of cfg on one served cluster volume and prints
// the report.
func benchQoS(ctx context.Context, cfg qosConfig) error {
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

	dc, err := startDev(ctx, work, cfg.size)
	if err != nil {
		return err
	}
	defer stopProc(dc.proc)
	if err := dc.ctl(ctx, "volume", "create", "qos", "--size", fmt.Sprint(cfg.size), "--replication", "3"); err != nil {
		return err
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return fmt.Errorf("metrics port: %w", err)
	}
	maddr := l.Addr().String()
	l.Close()
	sock := filepath.Join(work, "qos.sock")
	srv, err := startServer(ctx, work, sock, torusblk, "serve", "qos", "--etcd", dc.etcd, "--tls-dir", dc.tls,
		"--listen", "unix:"+sock, "--metrics", maddr)
	if err != nil {
		return err
	}
	defer srv.stop()
	mt := qosMetrics{url: "http://" + maddr + "/metrics"}

	slog.Info("prefill", "size", cfg.size)
	if _, _, err := runFio(ctx, work, prefillJob, srv.io, cfg.size, 0, false); err != nil {
		return fmt.Errorf("prefill: %w", err)
	}
	fmt.Printf("3-node dev cluster, R=3 volume of %d MiB over NBD (torusblk serve), fio libnbd, %v per job, burst %v\n\n",
		cfg.size>>20, cfg.runtime, cfg.burst)
	rep := qosReport{Bench: "qos", Date: time.Now().UTC().Format(time.RFC3339), Args: cfg.args, Machine: m,
		Size: cfg.size, Runtime: cfg.runtime.String(), Burst: cfg.burst.String(), Tolerance: qosTolerance}
	for _, c := range cfg.cases {
		r, err := qosRun(ctx, cfg, work, dc, srv, &mt, c)
		if err != nil {
			return fmt.Errorf("%s: %w", c.Kind, err)
		}
		rep.Results = append(rep.Results, r)
	}
	rep.LoadAvgEnd = loadAvg()
	printQoS(os.Stdout, &rep)
	fmt.Printf("\nloadavg at start %s, at end %s (nproc=%d)\n", m.LoadAvg, rep.LoadAvgEnd, m.CPUs)
	if cfg.results != "" {
		if root, err := testcluster.ModuleRoot(); err == nil {
			rep.Commit = gitCommit(root)
		}
		path, err := writeQoSResults(cfg.results, &rep)
		if err != nil {
			return err
		}
		fmt.Printf("\nresults file written to %s\n", path)
	}
	return nil
}

// qosRun measures one case: unlimited, then with its limit.
func qosRun(ctx context.Context, cfg qosConfig, work string, dc *devCluster, srv *server, mt *qosMetrics, c qosCase) (qosResult, error) {
	r := qosResult{qosCase: c}
	set := func(limit float64) error {
		args := []string{"volume", "set-qos", "qos", "--read-iops", "0", "--write-iops", "0", "--read-bps", "0",
			"--write-bps", "0", "--burst", cfg.burst.String()}
		args = append(args, "--"+c.Kind, strconv.FormatFloat(limit, 'f', 0, 64))
		if err := dc.ctl(ctx, args...); err != nil {
			return err
		}
		return mt.await(ctx, c.metric, limit)
	}
	if err := set(0); err != nil {
		return r, err
	}
	slog.Info("unlimited", "job", c.Job.Name)
	var err error
	unl := c.Job
	unl.Name += "-unlimited"
	if r.Unlimited, _, err = runFio(ctx, work, unl, srv.io, cfg.size, cfg.runtime, true); err != nil {
		return r, err
	}
	if err := set(c.Limit); err != nil {
		return r, err
	}
	dir := "read"
	if c.Job.write() {
		dir = "write"
	}
	before, err := mt.throttled(dir)
	if err != nil {
		return r, err
	}
	slog.Info("limited", "job", c.Job.Name, "limit", c.format(c.Limit))
	if r.Limited, _, err = runFio(ctx, work, c.Job, srv.io, cfg.size, cfg.runtime, true); err != nil {
		return r, err
	}
	after, err := mt.throttled(dir)
	if err != nil {
		return r, err
	}
	r.Throttled, r.ThrottledSeconds = after[0]-before[0], after[1]-before[1]
	r.Achieved = c.figure(r.Limited) / c.Limit
	r.Within = math.Abs(r.Achieved-1) <= qosTolerance
	return r, nil
}

// printQoS prints the table of a QoS run.
func printQoS(w io.Writer, rep *qosReport) {
	fmt.Fprintf(w, "%-10s %-19s %16s %16s %16s %9s %6s %10s %10s\n",
		"limit", "fio job", "unlimited", "limit", "achieved", "of limit", "±5%", "throttled", "mean wait")
	for _, r := range rep.Results {
		v := "MISS"
		if r.Within {
			v = "PASS"
		}
		wait := "-"
		if r.Throttled > 0 {
			wait = fmt.Sprintf("%.1f ms", 1e3*r.ThrottledSeconds/r.Throttled)
		}
		fmt.Fprintf(w, "%-10s %-19s %16s %16s %16s %8.2f%% %6s %10.0f %10s\n", r.Kind, r.Job.Name,
			r.format(r.figure(r.Unlimited)), r.format(r.Limit), r.format(r.figure(r.Limited)), 100*r.Achieved, v,
			r.Throttled, wait)
	}
}

// writeQoSResults writes rep into dir as DATE-qos-COMMIT.json and returns
// the path. It never overwrites a file.
func writeQoSResults(dir string, rep *qosReport) (string, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("results dir: %w", err)
	}
	commit := rep.Commit
	if commit == "" {
		commit = "unknown"
	}
	t, _ := time.Parse(time.RFC3339, rep.Date)
	path := filepath.Join(dir, t.UTC().Format("2006-01-02T150405Z")+"-qos-"+commit+".json")
	b, err := json.MarshalIndent(rep, "", "  ")
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

// qosMetrics reads the served volume's metrics.
type qosMetrics struct{ url string }

// scrape returns the torus_volume_qos_ samples of volume qos.
func (m *qosMetrics) scrape(ctx context.Context) (map[string]float64, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, m.url, nil)
	if err != nil {
		return nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, fmt.Errorf("metrics: %w", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, fmt.Errorf("metrics: %w", err)
	}
	fams, err := metricstest.Parse(string(body))
	if err != nil {
		return nil, fmt.Errorf("metrics: %w", err)
	}
	out := map[string]float64{}
	for name, f := range fams {
		if v, ok := f.Value("volume", "qos"); ok && strings.HasPrefix(name, "torus_volume_qos_") {
			out[name] = v
		}
	}
	return out, nil
}

// await waits until the limit gauge metric shows want (and every other
// limit 0).
func (m *qosMetrics) await(ctx context.Context, metric string, want float64) error {
	deadline := time.Now().Add(30 * time.Second)
	for {
		s, err := m.scrape(ctx)
		if err == nil {
			ok := true
			for name, v := range s {
				if !strings.HasSuffix(name, "_limit") {
					continue
				}
				exp := 0.0
				if name == metric {
					exp = want
				}
				ok = ok && v == exp
			}
			if ok && len(s) > 0 {
				return nil
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s did not become %v within 30s (last scrape: %v, %v)", metric, want, s, err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// throttled returns the throttled requests and seconds of direction dir.
func (m *qosMetrics) throttled(dir string) ([2]float64, error) {
	s, err := m.scrape(context.Background())
	if err != nil {
		return [2]float64{}, err
	}
	return [2]float64{s["torus_volume_qos_throttled_"+dir+"_requests_total"], s["torus_volume_qos_throttled_"+dir+"_seconds_total"]}, nil
}
