package main

// The "cluster" target: a replicated volume of a 3-node
// dev cluster (`torusd dev`: embedded etcd and three storage nodes in one
// process, talking QUIC over loopback), R=3, served over NBD by
// `torusblk serve NAME` exactly as the single-node "torus" target is served
// from its local store. Every write goes to all three nodes and completes
// when all three have it; reads go to one node.

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/torus-storage/torus/internal/testcluster"
)

// Targets of the replicated volume against the single-node one (informational).
const (
	wantClusterReadQD1  = 0.75 // cluster QD1 randread IOPS / single-node
	wantClusterWriteQD1 = 0.35 // cluster QD1 randwrite IOPS / single-node
)

// startCluster starts the dev cluster under dir, creates a volume of size
// bytes with R=3 and serves it on sock with torusblk.
func startCluster(ctx context.Context, dir, sock string, size int64, torusblk string) (*server, error) {
	dc, err := startDev(ctx, dir, size)
	if err != nil {
		return nil, err
	}
	if err := dc.ctl(ctx, "volume", "create", "bench", "--size", fmt.Sprint(size), "--replication", "3"); err != nil {
		stopProc(dc.proc)
		return nil, err
	}
	args := []string{"serve", "bench", "--etcd", dc.etcd, "--tls-dir", dc.tls, "--listen", "unix:" + sock}
	srv, err := startServer(ctx, dir, sock, torusblk, args...)
	if err != nil {
		stopProc(dc.proc)
		return nil, err
	}
	srv.extra = append(srv.extra, dc.proc)
	srv.cmd = append(append([]string{"torusd"}, dc.args...), append([]string{"&&", "torusblk"}, args...)...)
	return srv, nil
}

// devCluster is a running `torusd dev` (embedded etcd and three storage
// nodes in one process) and the torusctl that manages it.
type devCluster struct {
	proc      *testcluster.Proc
	args      []string // torusd's arguments
	etcd, tls string   // what it printed: the etcd URL and the client TLS dir
	torusctl  string
}

// startDev builds torusd and torusctl into dir and starts a 3-node dev
// cluster under dir whose nodes hold an R=3 volume of size bytes. The
// caller stops dc.proc.
func startDev(ctx context.Context, dir string, size int64) (*devCluster, error) {
	torusd, err := testcluster.Build(ctx, dir, "torusd")
	if err != nil {
		return nil, err
	}
	torusctl, err := testcluster.Build(ctx, dir, "torusctl")
	if err != nil {
		return nil, err
	}
	// Each node holds a copy of every chunk (R=3 on 3 nodes), plus room.
	nodeMiB := size*5/4>>20 + 16
	devArgs := []string{"dev", "--nodes", "3", "--data-dir", filepath.Join(dir, "dev"), "--etcd-listen", "127.0.0.1:0",
		"--size", fmt.Sprintf("%dMiB", nodeMiB), "--replication", "3"}
	// torusd dev prints "etcd: URL" and "tls: DIR" on stdout, which goes to
	// the log with its stderr.
	dev, err := startProc(filepath.Join(dir, "torusd.log"), torusd, devArgs...)
	if err != nil {
		return nil, err
	}
	deadline := time.Now().Add(readyTimeout)
	var printed [2]string
	for i, what := range []string{"etcd", "tls"} {
		m, err := dev.AwaitLog(`(?m)^`+what+`: (\S+)\n`, time.Until(deadline))
		if err != nil {
			stopProc(dev)
			return nil, fmt.Errorf("torusd dev not ready: %w (%s)", err, tail(dev))
		}
		printed[i] = m[1]
	}
	return &devCluster{proc: dev, args: devArgs, etcd: printed[0], tls: printed[1], torusctl: torusctl}, nil
}

// ctl runs torusctl against the dev cluster.
func (dc *devCluster) ctl(ctx context.Context, args ...string) error {
	cmd := exec.CommandContext(ctx, dc.torusctl, append([]string{"--etcd", dc.etcd}, args...)...)
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("torusctl %s: %w: %s", strings.Join(args, " "), err, b)
	}
	return nil
}

// printCluster prints the replicated volume against the single-node one and
// its targets (informational).
func printCluster(w *os.File, rep *report) {
	cr, ok1 := rep.Results["cluster"]
	tr, ok2 := rep.Results["torus"]
	if !ok1 || !ok2 {
		return
	}
	fmt.Fprintln(w, "\nreplicated volume (3 nodes, R=3, QUIC on loopback; the local node over its unix socket) vs single-node torus:")
	for _, j := range rep.Jobs {
		c, t := cr[j.Name], tr[j.Name]
		if t.IOPS == 0 {
			continue
		}
		line := fmt.Sprintf("  %-18s %s vs %s IOPS = %.0f%%", j.Name, fmtIOPS(c.IOPS), fmtIOPS(t.IOPS), 100*c.IOPS/t.IOPS)
		if j.IODepth == 1 {
			line += fmt.Sprintf("; p50 %s vs %s µs", fmtUs(c.P50us), fmtUs(t.P50us))
			want := 0.0
			switch {
			case strings.HasPrefix(j.Name, "randread"):
				want = wantClusterReadQD1
			case strings.HasPrefix(j.Name, "randwrite"):
				want = wantClusterWriteQD1
			}
			if want > 0 {
				v := "MISS"
				if c.IOPS >= want*t.IOPS {
					v = "PASS"
				}
				line += fmt.Sprintf("  [%s: target >= %.0f%%]", v, 100*want)
			}
		}
		fmt.Fprintln(w, line)
	}
}
