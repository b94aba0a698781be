package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"time"

	"github.com/torus-storage/torus/internal/testcluster"
)

// allTargets are the targets in the order they run and are printed.
var allTargets = []string{"torus", "nbdkit", "qemu-nbd", "raw", "cluster"}

// nbdPeers are the NBD servers Torus is compared with.
var nbdPeers = []string{"nbdkit", "qemu-nbd"}

// readyTimeout bounds how long a server may take to open its socket.
const readyTimeout = 30 * time.Second

// binaries returns the programs a target needs on PATH (torusblk is handled
// separately because it may be built).
func binaries(target string) []string {
	switch target {
	case "nbdkit":
		return []string{"nbdkit"}
	case "qemu-nbd":
		return []string{"qemu-nbd"}
	}
	return nil
}

// checkBinaries fails with a clear message if fio or a selected peer is missing.
func checkBinaries(targets []string) error {
	need := []string{"fio"}
	for _, t := range targets {
		need = append(need, binaries(t)...)
	}
	for _, b := range need {
		if _, err := exec.LookPath(b); err != nil {
			return fmt.Errorf("%s %w (apt-get install -y nbdkit qemu-utils fio libnbd-bin): %v", b, errMissing, err)
		}
	}
	return nil
}

// server is a running target: how fio reaches it and how to stop it.
type server struct {
	io    ioTarget
	proc  *testcluster.Proc   // nil for raw
	extra []*testcluster.Proc // more processes behind proc (the cluster's nodes), stopped after it
	cmd   []string
}

// stop kills the server's process group, if any.
func (s *server) stop() {
	if s.proc != nil {
		stopProc(s.proc)
	}
	for _, p := range s.extra {
		stopProc(p)
	}
}

// startTarget prepares the backing data of target under dir and starts its
// server. The caller stops the server and removes dir.
func startTarget(ctx context.Context, target, dir string, size int64, torusblk string) (*server, error) {
	sock := filepath.Join(dir, target+".sock")
	file := filepath.Join(dir, target+".img")
	switch target {
	case "raw":
		// fio lays the file out itself during the prefill.
		return &server{io: rawIO(file), cmd: []string{"fio", "--ioengine=io_uring", "--direct=1", "--filename=" + file}}, nil
	case "torus":
		store := filepath.Join(dir, "store")
		if err := os.MkdirAll(store, 0o755); err != nil {
			return nil, fmt.Errorf("torus: %w", err)
		}
		args := []string{"serve", "--store", store, "--size", strconv.FormatInt(size, 10), "--listen", "unix:" + sock}
		return startServer(ctx, dir, sock, torusblk, args...)
	case "cluster":
		return startCluster(ctx, dir, sock, size, torusblk)
	case "nbdkit":
		if err := makeFile(file, size); err != nil {
			return nil, err
		}
		// cache=none: nbdkit evicts what it read or wrote from the page cache
		// (it is not O_DIRECT). fadvise=random turns read-ahead off.
		return startServer(ctx, dir, sock, "nbdkit", "--unix", sock, "--foreground", "--exit-with-parent",
			"file", "file="+file, "cache=none", "fadvise=random")
	case "qemu-nbd":
		if err := makeFile(file, size); err != nil {
			return nil, err
		}
		// --cache=none is O_DIRECT; --persistent keeps it alive between the
		// fio runs; --shared lets a run connect while the probe lingers.
		return startServer(ctx, dir, sock, "qemu-nbd", "--cache=none", "--aio=io_uring", "--format=raw",
			"--persistent", "--shared=4", "--socket", sock, file)
	}
	return nil, fmt.Errorf("unknown target %q", target)
}

func startServer(ctx context.Context, dir, sock, bin string, args ...string) (*server, error) {
	p, err := startProc(filepath.Join(dir, filepath.Base(bin)+".log"), bin, args...)
	if err != nil {
		return nil, err
	}
	if err := p.AwaitSocket(ctx, sock, readyTimeout); err != nil {
		stopProc(p)
		return nil, fmt.Errorf("%w (%s)", err, tail(p))
	}
	return &server{io: nbdIO(sock), proc: p, cmd: append([]string{bin}, args...)}, nil
}

// makeFile creates a sparse file of size bytes; the prefill writes it.
func makeFile(path string, size int64) error {
	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("create %s: %w", path, err)
	}
	if err := f.Truncate(size); err != nil {
		f.Close()
		return fmt.Errorf("truncate %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("close %s: %w", path, err)
	}
	return nil
}
