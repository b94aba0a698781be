package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// job is one measured fio workload.
type job struct {
	Name    string `json:"name"`
	RW      string `json:"rw"` // fio rw=: randread, randwrite, read, write
	BS      string `json:"bs"`
	IODepth int    `json:"iodepth"`
}

// write reports whether the job measures writes (fio's "write" section).
func (j job) write() bool { return strings.Contains(j.RW, "write") }

// allJobs are the jobs of the benchmark in the order they run. Reads run first
// so they read the prefilled data; writes overwrite it afterwards.
var allJobs = []job{
	{Name: "randread-4k-qd1", RW: "randread", BS: "4k", IODepth: 1},
	{Name: "randread-4k-qd32", RW: "randread", BS: "4k", IODepth: 32},
	{Name: "seqread-1m-qd8", RW: "read", BS: "1m", IODepth: 8},
	{Name: "randwrite-4k-qd1", RW: "randwrite", BS: "4k", IODepth: 1},
	{Name: "randwrite-4k-qd32", RW: "randwrite", BS: "4k", IODepth: 32},
	{Name: "seqwrite-1m-qd8", RW: "write", BS: "1m", IODepth: 8},
}

// prefillJob lays the data out before the measured jobs; it writes the whole
// volume once and is not reported.
var prefillJob = job{Name: "prefill", RW: "write", BS: "1m", IODepth: 8}

func jobNames(js []job) string {
	names := make([]string, len(js))
	for i, j := range js {
		names[i] = j.Name
	}
	return strings.Join(names, ",")
}

func findJob(name string) (job, bool) {
	for _, j := range allJobs {
		if j.Name == name {
			return j, true
		}
	}
	return job{}, false
}

// ioTarget tells fio how to reach a target: the engine and its options.
type ioTarget struct {
	engineArgs []string
}

// nbdIO reaches an NBD server on a unix socket through fio's libnbd engine.
func nbdIO(sock string) ioTarget {
	return ioTarget{engineArgs: []string{"--ioengine=nbd", "--uri=nbd+unix:///?socket=" + sock}}
}

// rawIO reaches a plain file with io_uring and O_DIRECT.
func rawIO(file string) ioTarget {
	return ioTarget{engineArgs: []string{"--ioengine=io_uring", "--direct=1", "--filename=" + file}}
}

// result is the summary of one fio job.
type result struct {
	IOPS    float64 `json:"iops"`
	BWBytes float64 `json:"bw_bytes"`
	P50us   float64 `json:"p50_us"`
	P99us   float64 `json:"p99_us"`
	MeanUs  float64 `json:"mean_us"`
}

// fioOutput is the part of fio's JSON output the benchmark reads.
type fioOutput struct {
	Jobs []struct {
		JobName string  `json:"jobname"`
		Error   int     `json:"error"`
		Read    fioStat `json:"read"`
		Write   fioStat `json:"write"`
	} `json:"jobs"`
}

type fioStat struct {
	IOPS    float64 `json:"iops"`
	BWBytes float64 `json:"bw_bytes"`
	TotalIO int64   `json:"total_ios"`
	Clat    struct {
		Mean       float64            `json:"mean"`
		Percentile map[string]float64 `json:"percentile"`
	} `json:"clat_ns"`
}

// fioArgs builds the fio command line of a job. A measured job is time based;
// the prefill writes the whole size once.
func fioArgs(j job, t ioTarget, size int64, runtime time.Duration, measured bool, out string) []string {
	args := []string{
		"--name=" + j.Name,
		"--rw=" + j.RW,
		"--bs=" + j.BS,
		"--iodepth=" + strconv.Itoa(j.IODepth),
		"--numjobs=1",
		"--size=" + strconv.FormatInt(size, 10),
		"--output-format=json",
		"--output=" + out,
	}
	if measured {
		secs := int64(runtime.Round(time.Second) / time.Second)
		args = append(args, "--time_based", "--runtime="+strconv.FormatInt(secs, 10)+"s")
	}
	return append(args, t.engineArgs...)
}

// runFio runs one job and returns its summary and fio's raw JSON output.
func runFio(ctx context.Context, workDir string, j job, t ioTarget, size int64, runtime time.Duration, measured bool) (result, json.RawMessage, error) {
	out := filepath.Join(workDir, "fio-"+j.Name+".json")
	args := fioArgs(j, t, size, runtime, measured, out)
	// fio prints notices ("connected to NBD server") on stdout, so the JSON
	// goes to its own file.
	p, err := startProc(filepath.Join(workDir, "fio-"+j.Name+".log"), "fio", args...)
	if err != nil {
		return result{}, nil, err
	}
	werr := p.Wait(ctx)
	raw, rerr := os.ReadFile(out)
	if ctx.Err() != nil {
		return result{}, nil, fmt.Errorf("fio %s: interrupted: %w", j.Name, ctx.Err())
	}
	if werr != nil {
		return result{}, nil, fmt.Errorf("fio %s: %w (%s)", j.Name, werr, tail(p))
	}
	if rerr != nil {
		return result{}, nil, fmt.Errorf("fio %s: read output: %w", j.Name, rerr)
	}
	res, err := parseFio(raw, j.write())
	if err != nil {
		return result{}, nil, fmt.Errorf("fio %s: %w", j.Name, err)
	}
	return res, json.RawMessage(raw), nil
}

// parseFio extracts the summary of the single job in fio's JSON output.
func parseFio(raw []byte, write bool) (result, error) {
	var o fioOutput
	if err := json.Unmarshal(raw, &o); err != nil {
		return result{}, fmt.Errorf("parse fio json: %w", err)
	}
	if len(o.Jobs) != 1 {
		return result{}, fmt.Errorf("fio json: %d jobs, want 1", len(o.Jobs))
	}
	jb := o.Jobs[0]
	if jb.Error != 0 {
		return result{}, fmt.Errorf("fio job %s: error %d", jb.JobName, jb.Error)
	}
	st := jb.Read
	if write {
		st = jb.Write
	}
	if st.TotalIO == 0 {
		return result{}, fmt.Errorf("fio job %s: no I/O completed", jb.JobName)
	}
	p50, ok50 := st.Clat.Percentile["50.000000"]
	p99, ok99 := st.Clat.Percentile["99.000000"]
	if !ok50 || !ok99 {
		return result{}, fmt.Errorf("fio job %s: clat percentiles 50/99 missing", jb.JobName)
	}
	return result{
		IOPS:    st.IOPS,
		BWBytes: st.BWBytes,
		P50us:   p50 / 1e3,
		P99us:   p99 / 1e3,
		MeanUs:  st.Clat.Mean / 1e3,
	}, nil
}
