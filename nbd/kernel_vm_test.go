//go:build vm

package nbd

// Tests against the kernel's NBD client. They need root, the nbd module and
// a directory for the volume store on a file system with O_DIRECT (the VM's
// /mnt/disk), so they are behind the vm build tag: nbd/vmtest.sh builds
// them on the host and runs them in a VM (scripts/vm/run.sh). Where kernel NBD
// is missing they fail with the reason.

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/torus-storage/torus/engine"
	"github.com/torus-storage/torus/store"
)

// vmStoreDir is where volume stores live: $TORUS_NBD_STORE_DIR or /mnt/disk.
func vmStoreDir(t *testing.T) string {
	t.Helper()
	dir := os.Getenv("TORUS_NBD_STORE_DIR")
	if dir == "" {
		dir = "/mnt/disk"
	}
	probe := filepath.Join(dir, ".torus-probe")
	if err := os.WriteFile(probe, nil, 0o600); err != nil {
		t.Fatalf("volume stores need a writable directory with O_DIRECT (the VM's /mnt/disk, or TORUS_NBD_STORE_DIR): %v", err)
	}
	os.Remove(probe)
	return dir
}

func requireKernelNBD(t *testing.T) {
	t.Helper()
	if err := KernelAvailable(); err != nil {
		t.Fatalf("%v (these tests run in a VM: nbd/vmtest.sh)", err)
	}
}

func openVMVolume(t *testing.T, path string, size int64) *store.Local {
	t.Helper()
	vol, err := store.OpenLocal(path, size, store.LocalOptions{Logger: testLogger(t)})
	if err != nil {
		t.Fatalf("opening the volume store %s: %v", path, err)
	}
	return vol
}

func newVMVolume(t *testing.T, size int64) (*store.Local, string) {
	t.Helper()
	path := filepath.Join(vmStoreDir(t), strings.ReplaceAll(t.Name(), "/", "_")+".store")
	os.Remove(path)
	t.Cleanup(func() { os.Remove(path) })
	return openVMVolume(t, path, size), path
}

func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelInfo}))
}

type tWriter struct{ t *testing.T }

func (w tWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(b), "\n"))
	return len(b), nil
}

func attachVM(t *testing.T, vol engine.Volume, opt AttachOptions) *KernelDevice {
	t.Helper()
	requireKernelNBD(t)
	if opt.Logger == nil {
		opt.Logger = testLogger(t)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	t0 := time.Now()
	d, err := AttachKernel(ctx, vol, opt)
	if err != nil {
		t.Fatalf("AttachKernel: %v", err)
	}
	t.Logf("attached %s in %v", d.Path(), time.Since(t0).Round(time.Millisecond))
	if sz, err := sysfsSize(d.Index()); err != nil || sz != vol.Size() {
		t.Fatalf("%s shows %d bytes (%v), want %d", d.Path(), sz, err, vol.Size())
	}
	return d
}

// hwQueues is the number of blk-mq hardware queues of nbdN: one per
// connection.
func hwQueues(t *testing.T, index int) int {
	t.Helper()
	ents, err := os.ReadDir(fmt.Sprintf("/sys/block/nbd%d/mq", index))
	if err != nil {
		t.Fatalf("reading the queues of nbd%d: %v", index, err)
	}
	return len(ents)
}

// detachVM closes d and checks the device is left disconnected with size 0.
func detachVM(t *testing.T, d *KernelDevice) {
	t.Helper()
	if err := d.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := d.Wait(); err != nil {
		t.Fatalf("Wait after Close: %v", err)
	}
	checkDisconnected(t, d.Index())
}

func checkDisconnected(t *testing.T, index int) {
	t.Helper()
	if sz, err := sysfsSize(index); err != nil || sz != 0 {
		t.Fatalf("nbd%d shows %d bytes after detach (%v), want 0", index, sz, err)
	}
	if _, err := os.Stat(fmt.Sprintf("/sys/block/nbd%d/pid", index)); err == nil {
		t.Fatalf("nbd%d still has a pid file after detach", index)
	}
	st, err := ListKernel()
	if err != nil {
		t.Fatalf("ListKernel: %v", err)
	}
	for _, s := range st {
		if s.Index == index && s.Connected {
			t.Fatalf("nbd%d still listed as connected after detach", index)
		}
	}
}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	t0 := time.Now()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	t.Logf("%s %s: %v", name, strings.Join(args, " "), time.Since(t0).Round(time.Millisecond))
	return string(out)
}

// fioVerify writes random blocks of mixed sizes at QD32 and reads them back
// with crc32c checks.
func fioVerify(t *testing.T, dev, size string) {
	t.Helper()
	run(t, "fio", "--name=verify", "--filename="+dev, "--ioengine=libaio", "--direct=1",
		"--iodepth=32", "--rw=randwrite", "--bsrange=4k-128k", "--size="+size,
		"--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_backlog=0",
		"--randrepeat=0", "--output-format=terse")
}

func TestKernelNetlinkFioVerify(t *testing.T) {
	vol, _ := newVMVolume(t, 256<<20)
	defer vol.Close()
	d := attachVM(t, vol, AttachOptions{Index: -1, Conns: 4})
	if !d.netlink {
		t.Fatal("attached through ioctls although the kernel has the nbd netlink family")
	}
	// One hardware queue per connection, capped by blk-mq at the CPU count.
	if q, want := hwQueues(t, d.Index()), min(4, runtime.NumCPU()); q != want {
		t.Fatalf("nbd%d has %d hardware queues, want %d (one per connection, at most one per CPU)", d.Index(), q, want)
	}
	st, err := ListKernel()
	if err != nil {
		t.Fatalf("ListKernel: %v", err)
	}
	found := false
	for _, s := range st {
		found = found || (s.Index == d.Index() && s.Connected)
	}
	if !found {
		t.Fatalf("ListKernel %v does not show nbd%d connected", st, d.Index())
	}
	// A configured device refuses a second attach, through either interface,
	// and the failed attach leaves it working.
	for _, ioctl := range []bool{false, true} {
		d2, err := AttachKernel(context.Background(), vol, AttachOptions{Index: d.Index(), ForceIoctl: ioctl, Logger: testLogger(t)})
		if err == nil {
			d2.Close()
			t.Fatalf("second attach (ioctl %v) to busy nbd%d succeeded", ioctl, d.Index())
		}
		t.Logf("second attach (ioctl %v): %v", ioctl, err)
	}
	fioVerify(t, d.Path(), "64M")
	detachVM(t, d)
}

func TestKernelIoctlFioVerify(t *testing.T) {
	vol, _ := newVMVolume(t, 128<<20)
	defer vol.Close()
	d := attachVM(t, vol, AttachOptions{Index: -1, ForceIoctl: true})
	if d.netlink {
		t.Fatal("ForceIoctl attached through netlink")
	}
	if q := hwQueues(t, d.Index()); q != 1 {
		t.Fatalf("nbd%d has %d hardware queues, want 1", d.Index(), q)
	}
	fioVerify(t, d.Path(), "32M")
	detachVM(t, d)
}

// TestDisconnectKernel detaches from outside (as torusblk detach does): Wait
// returns and Close afterwards is clean.
func TestDisconnectKernel(t *testing.T) {
	for _, tc := range []struct {
		name        string
		attachIoctl bool
		detach      func(index int) error
	}{
		{"netlink", false, DisconnectKernel},
		{"ioctl-attached", true, DisconnectKernel},
		// The kernels we test all have netlink: exercise the fallback
		// directly, on both kinds of devices.
		{"ioctl-detach", true, func(i int) error { return disconnectIoctl(i, ioctlClearGrace) }},
		{"ioctl-detach-netlink-device", false, func(i int) error { return disconnectIoctl(i, ioctlClearGrace) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			vol, _ := newVMVolume(t, 64<<20)
			defer vol.Close()
			d := attachVM(t, vol, AttachOptions{Index: -1, Conns: 2, ForceIoctl: tc.attachIoctl})
			// Some I/O in the page cache, so the disconnect has something to cut.
			run(t, "dd", "if=/dev/urandom", "of="+d.Path(), "bs=64k", "count=16", "status=none")
			if err := tc.detach(d.Index()); err != nil {
				t.Fatalf("disconnect: %v", err)
			}
			waited := make(chan error, 1)
			go func() { waited <- d.Wait() }()
			select {
			case err := <-waited:
				if err != nil {
					t.Fatalf("Wait after DisconnectKernel: %v", err)
				}
			case <-time.After(30 * time.Second):
				t.Fatal("Wait did not return after DisconnectKernel")
			}
			detachVM(t, d)
		})
	}
}

// TestKernelFilesystem: ext4 on the device survives umount, fsck, remount,
// and a detach, volume close, reopen and reattach at the same index.
func TestKernelFilesystem(t *testing.T) {
	vol, path := newVMVolume(t, 256<<20)
	d := attachVM(t, vol, AttachOptions{Index: -1})
	run(t, "mkfs.ext4", "-q", "-F", d.Path())
	mnt := t.TempDir()
	run(t, "mount", "-t", "ext4", d.Path(), mnt)
	mounted := true
	defer func() {
		if mounted {
			exec.Command("umount", mnt).Run()
		}
	}()
	rng := rand.New(rand.NewPCG(1, 2))
	files := map[string][]byte{}
	if err := os.Mkdir(filepath.Join(mnt, "dir"), 0o755); err != nil {
		t.Fatal(err)
	}
	for i := range 40 {
		b := make([]byte, rng.IntN(2<<20)+1)
		for j := range b {
			b[j] = byte(rng.Uint32())
		}
		name := fmt.Sprintf("dir/f%02d", i)
		if err := os.WriteFile(filepath.Join(mnt, name), b, 0o644); err != nil {
			t.Fatal(err)
		}
		files[name] = b
	}
	// Delete a few so the file system discards their blocks.
	for i := 0; i < 40; i += 7 {
		name := fmt.Sprintf("dir/f%02d", i)
		if err := os.Remove(filepath.Join(mnt, name)); err != nil {
			t.Fatal(err)
		}
		delete(files, name)
	}
	syscall.Sync()
	run(t, "fstrim", "-v", mnt)
	compare := func(stage string) {
		t.Helper()
		for name, want := range files {
			got, err := os.ReadFile(filepath.Join(mnt, name))
			if err != nil || !bytes.Equal(got, want) {
				t.Fatalf("%s: %s differs (%d bytes, want %d, %v)", stage, name, len(got), len(want), err)
			}
		}
	}
	run(t, "umount", mnt)
	mounted = false
	run(t, "e2fsck", "-fn", d.Path())
	run(t, "mount", "-t", "ext4", d.Path(), mnt)
	mounted = true
	compare("after remount")
	run(t, "umount", mnt)
	mounted = false
	index := d.Index()
	detachVM(t, d)
	if err := vol.Close(); err != nil {
		t.Fatalf("closing the volume: %v", err)
	}

	vol = openVMVolume(t, path, 256<<20)
	defer vol.Close()
	d = attachVM(t, vol, AttachOptions{Index: index, Conns: 2})
	if d.Index() != index {
		t.Fatalf("reattached as nbd%d, asked for nbd%d", d.Index(), index)
	}
	run(t, "e2fsck", "-fn", d.Path())
	run(t, "mount", "-t", "ext4", "-o", "ro", d.Path(), mnt)
	mounted = true
	compare("after reattach")
	run(t, "umount", mnt)
	mounted = false
	detachVM(t, d)
}

// TestKernelFioPerf measures 4K random reads and writes at QD32 on a
// prefilled region and logs IOPS (fio's JSON).
func TestKernelFioPerf(t *testing.T) {
	vol, _ := newVMVolume(t, 256<<20)
	defer vol.Close()
	secs := os.Getenv("TORUS_NBD_PERF_SECONDS")
	if secs == "" {
		secs = "8"
	}
	// TORUS_NBD_PERF_CONNS lists connection counts to measure ("1 4").
	conns := strings.Fields(os.Getenv("TORUS_NBD_PERF_CONNS"))
	if len(conns) == 0 {
		conns = []string{"4"}
	}
	for i, cs := range conns {
		n, err := strconv.Atoi(cs)
		if err != nil {
			t.Fatalf("TORUS_NBD_PERF_CONNS: %v", err)
		}
		d := attachVM(t, vol, AttachOptions{Index: -1, Conns: n})
		if i == 0 {
			run(t, "fio", "--name=fill", "--filename="+d.Path(), "--ioengine=libaio", "--direct=1",
				"--iodepth=8", "--rw=write", "--bs=1M", "--size=128M", "--output-format=terse")
		}
		for _, rw := range []string{"randread", "randwrite"} {
			iops, lat := fioIOPS(t, d.Path(), rw, secs)
			t.Logf("PERF kernel=%s target=nbd conns=%d %s 4k QD32: %.0f IOPS, mean completion latency %.0f us",
				os.Getenv("TORUS_VM_KERNEL"), n, rw, iops, lat)
		}
		detachVM(t, d)
	}
	// An in-memory volume isolates the NBD path (kernel client, sockets, this
	// server) from the store.
	mem := newMemVolume(128 << 20)
	d := attachVM(t, mem, AttachOptions{Index: -1})
	for _, rw := range []string{"randread", "randwrite"} {
		iops, lat := fioIOPS(t, d.Path(), rw, secs)
		t.Logf("PERF kernel=%s target=nbd-memvolume conns=4 %s 4k QD32: %.0f IOPS, mean completion latency %.0f us",
			os.Getenv("TORUS_VM_KERNEL"), rw, iops, lat)
	}
	detachVM(t, d)
	// The same fio on a plain file next to the store: what the VM's disk gives.
	base := filepath.Join(vmStoreDir(t), "baseline.fio")
	defer os.Remove(base)
	run(t, "fio", "--name=basefill", "--filename="+base, "--ioengine=libaio", "--direct=1",
		"--iodepth=8", "--rw=write", "--bs=1M", "--size=128M", "--output-format=terse")
	for _, rw := range []string{"randread", "randwrite"} {
		iops, lat := fioIOPS(t, base, rw, secs)
		t.Logf("PERF kernel=%s target=baseline-file %s 4k QD32: %.0f IOPS, mean completion latency %.0f us",
			os.Getenv("TORUS_VM_KERNEL"), rw, iops, lat)
	}
}

// fioIOPS runs 4K random rw at QD32 on file for secs seconds and returns IOPS
// and the mean completion latency in microseconds.
func fioIOPS(t *testing.T, file, rw, secs string) (float64, float64) {
	t.Helper()
	out := run(t, "fio", "--name="+rw, "--filename="+file, "--ioengine=libaio", "--direct=1",
		"--iodepth=32", "--rw="+rw, "--bs=4k", "--size=128M", "--time_based", "--runtime="+secs,
		"--ramp_time=1", "--randrepeat=0", "--output-format=json")
	var res struct {
		Jobs []struct {
			Read, Write struct {
				IOPS  float64 `json:"iops"`
				ClatN struct {
					Mean float64 `json:"mean"`
				} `json:"clat_ns"`
			}
		} `json:"jobs"`
	}
	if i := strings.IndexByte(out, '{'); i > 0 {
		out = out[i:]
	}
	if err := json.Unmarshal([]byte(out), &res); err != nil || len(res.Jobs) == 0 {
		t.Fatalf("fio %s JSON: %v\n%s", rw, err, out)
	}
	st := res.Jobs[0].Read
	if rw == "randwrite" {
		st = res.Jobs[0].Write
	}
	if st.IOPS <= 0 {
		t.Fatalf("fio %s on %s: no I/O completed", rw, file)
	}
	return st.IOPS, st.ClatN.Mean / 1000
}
