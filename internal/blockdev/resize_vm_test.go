//go:build vm

// Online resize on real kernels: a cluster volume (torusd dev) attached
// with torusblk, ext4 mounted on it, grown with torusctl volume resize and
// resize2fs while mounted, fio verify=crc32c before and after. Where the
// kernel cannot grow the device live (ublk without UBLK_F_UPDATE_SIZE), the
// test checks that torusctl and torusblk say so and what to do, then does
// it (detach, attach, resize2fs) and verifies the data. Run it in the VM
// with scripts/vm/resize-vm.sh, which builds the binaries and sets
// TORUS_VM_BIN; it fails, never skips, when something it needs is missing.

package blockdev

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/torus-storage/torus/ublk"
)

const (
	rzOld = 64 << 20  // the volume's size at attach
	rzNew = 192 << 20 // after the resize
)

// rzEnv is the dev cluster and the binaries of the test.
type rzEnv struct {
	bin, etcd, tls, disk string
}

func (e *rzEnv) tool(name string) string { return filepath.Join(e.bin, name) }

// run runs a command and returns its combined output, failing the test on
// an error.
func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

func TestVMResize(t *testing.T) {
	os.Setenv("PATH", os.Getenv("PATH")+":/usr/sbin:/sbin")
	e := &rzEnv{bin: os.Getenv("TORUS_VM_BIN"), disk: os.Getenv("TORUS_VM_DISK")}
	if e.bin == "" {
		t.Fatal("TORUS_VM_BIN is not set: run this test with scripts/vm/resize-vm.sh, which builds torusd, torusctl and torusblk")
	}
	if e.disk == "" {
		e.disk = "/mnt/disk"
	}
	if os.Geteuid() != 0 {
		t.Fatal("needs root (block devices, mount)")
	}
	for _, tool := range []string{"fio", "mkfs.ext4", "resize2fs", "e2fsck", "mount", "umount"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s is missing: %v", tool, err)
		}
	}
	for _, b := range []string{"torusd", "torusctl", "torusblk"} {
		if _, err := os.Stat(e.tool(b)); err != nil {
			t.Fatalf("%s: %v (scripts/vm/resize-vm.sh builds it)", b, err)
		}
	}
	exec.Command("ip", "link", "set", "lo", "up").Run()

	// torusd dev: etcd, the CA and three nodes in one process.
	devOut, err := os.Create(filepath.Join(t.TempDir(), "dev.out"))
	if err != nil {
		t.Fatal(err)
	}
	devLog := filepath.Join(t.TempDir(), "dev.log")
	logf, err := os.Create(devLog)
	if err != nil {
		t.Fatal(err)
	}
	dev := exec.Command(e.tool("torusd"), "dev", "--nodes", "3", "--data-dir", filepath.Join(e.disk, "rzdev"), "--size", "1GiB")
	dev.Stdout, dev.Stderr = devOut, logf
	if err := dev.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		dev.Process.Signal(syscall.SIGTERM)
		dev.Wait()
	})
	deadline := time.Now().Add(60 * time.Second)
	for e.etcd == "" || e.tls == "" {
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(devLog)
			t.Fatalf("torusd dev did not print its etcd and tls lines in 60s:\n%s", b)
		}
		time.Sleep(100 * time.Millisecond)
		b, _ := os.ReadFile(devOut.Name())
		for _, l := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(l, "etcd: "); ok {
				e.etcd = v
			}
			if v, ok := strings.CutPrefix(l, "tls: "); ok {
				e.tls = v
			}
		}
	}

	modes := []string{"nbd"}
	if ublk.Available() == nil {
		modes = []string{"ublk", "nbd"}
	}
	t.Logf("kernel %s: modes %v", os.Getenv("TORUS_VM_KVER"), modes)
	for _, mode := range modes {
		t.Run(mode, func(t *testing.T) { testVMResize(t, e, mode) })
	}
}

// attached is a running torusblk attach. A goroutine reaps it as soon as
// it exits (exited): torusblk detach waits for the process to be gone, and
// an unreaped child would stay a zombie.
type attached struct {
	cmd    *exec.Cmd
	exited chan error
	dev    string
	log    string
}

// attachVol runs torusblk attach name --mode mode and waits for its device.
func (e *rzEnv) attachVol(t *testing.T, name, mode string) *attached {
	t.Helper()
	dir := t.TempDir()
	a := &attached{log: filepath.Join(dir, "attach.log"), exited: make(chan error, 1)}
	logf, err := os.Create(a.log)
	if err != nil {
		t.Fatal(err)
	}
	outf, err := os.Create(filepath.Join(dir, "attach.out"))
	if err != nil {
		t.Fatal(err)
	}
	a.cmd = exec.Command(e.tool("torusblk"), "attach", name, "--etcd", e.etcd, "--tls-dir", e.tls, "--mode", mode, "--lease-ttl", "5s")
	a.cmd.Stdout, a.cmd.Stderr = outf, logf
	if err := a.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { a.exited <- a.cmd.Wait() }()
	deadline := time.Now().Add(90 * time.Second)
	for a.dev == "" && time.Now().Before(deadline) {
		select {
		case err := <-a.exited:
			t.Fatalf("torusblk attach %s --mode %s exited (%v):\n%s", name, mode, err, a.logText())
		case <-time.After(100 * time.Millisecond):
		}
		b, _ := os.ReadFile(outf.Name())
		if l, _, ok := strings.Cut(string(b), "\n"); ok {
			a.dev = l
		}
	}
	if a.dev == "" {
		a.cmd.Process.Kill()
		<-a.exited
		t.Fatalf("torusblk attach %s --mode %s printed no device in 90s:\n%s", name, mode, a.logText())
	}
	return a
}

func (a *attached) logText() string {
	b, _ := os.ReadFile(a.log)
	return string(b)
}

// detach runs torusblk detach and waits for the attach process to exit 0.
func (e *rzEnv) detach(t *testing.T, a *attached) {
	t.Helper()
	start := time.Now()
	out, err := exec.Command(e.tool("torusblk"), "detach", "--timeout", "300s", a.dev).CombinedOutput()
	if err != nil {
		a.cmd.Process.Signal(syscall.SIGQUIT) // its goroutines go to the log
		<-a.exited
		t.Fatalf("torusblk detach %s: %v\n%s\nattach log:\n%s", a.dev, err, out, a.logText())
	}
	if err := <-a.exited; err != nil {
		t.Fatalf("torusblk attach exited with %v:\n%s", err, a.logText())
	}
	t.Logf("detach of %s took %v", a.dev, time.Since(start).Round(time.Millisecond))
}

// sysfsSize is the device's size in bytes as the kernel shows it.
func sysfsSize(t *testing.T, dev string) int64 {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("/sys/block", filepath.Base(dev), "size"))
	if err != nil {
		t.Fatal(err)
	}
	n, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	return n * 512
}

// fsSize is the size of the file system mounted at dir.
func fsSize(t *testing.T, dir string) int64 {
	t.Helper()
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		t.Fatal(err)
	}
	return int64(st.Blocks) * st.Bsize
}

// fioFile runs fio verify=crc32c on file with extra arguments.
func fioFile(t *testing.T, file string, extra ...string) {
	t.Helper()
	args := append([]string{"--name=rz", "--filename=" + file, "--direct=1", "--ioengine=libaio", "--iodepth=8",
		"--bs=64k", "--rw=randwrite", "--verify=crc32c", "--verify_fatal=1", "--verify_state_save=0", "--randseed=7"}, extra...)
	out, err := exec.Command("fio", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("fio %v: %v\n%s", extra, err, out)
	}
	if !strings.Contains(string(out), "err= 0") {
		t.Fatalf("fio %v reported errors:\n%s", extra, out)
	}
}

func testVMResize(t *testing.T, e *rzEnv, mode string) {
	name := "rz" + mode
	run(t, e.tool("torusctl"), "--etcd", e.etcd, "volume", "create", name, "--size", strconv.Itoa(rzOld>>20)+"MiB", "--replication", "2")
	a := e.attachVol(t, name, mode)
	mnt := filepath.Join(t.TempDir(), "mnt")
	if err := os.MkdirAll(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	run(t, "mkfs.ext4", "-q", "-F", a.dev)
	run(t, "mount", a.dev, mnt)
	mounted := true
	defer func() {
		if mounted {
			exec.Command("umount", mnt).Run()
		}
	}()
	before := fsSize(t, mnt)
	fileA := filepath.Join(mnt, "a")
	fioFile(t, fileA, "--size=32M", "--do_verify=1") // before the resize

	live := mode == "nbd"
	if mode == "ublk" {
		f, err := ublk.Features()
		if err != nil {
			t.Fatalf("ublk GET_FEATURES: %v", err)
		}
		live = f&ublk.FeatureUpdateSize != 0
	}
	t.Logf("%s on %s: expect live growth %v", a.dev, os.Getenv("TORUS_VM_KVER"), live)
	out := run(t, e.tool("torusctl"), "--etcd", e.etcd, "volume", "resize", name, "--size", strconv.Itoa(rzNew>>20)+"MiB")
	t.Logf("torusctl volume resize:\n%s", out)
	if live {
		if !strings.Contains(out, fmt.Sprintf("device %s on ", a.dev)) || !strings.Contains(out, "grew to 192 MiB") {
			t.Fatalf("torusctl did not report the device grown:\n%s\nattach log:\n%s", out, a.logText())
		}
		if got := sysfsSize(t, a.dev); got != rzNew {
			t.Fatalf("%s shows %d bytes after the resize, want %d", a.dev, got, rzNew)
		}
	} else {
		for _, want := range []string{"cannot grow live", "UBLK_F_UPDATE_SIZE", "torusblk detach " + a.dev, "torusblk attach " + name} {
			if !strings.Contains(out, want) {
				t.Fatalf("torusctl on a device that cannot grow live lacks %q:\n%s", want, out)
			}
		}
		waitLog(t, a, "this device cannot grow while attached")
		if got := sysfsSize(t, a.dev); got != rzOld {
			t.Fatalf("%s shows %d bytes, want the old %d", a.dev, got, rzOld)
		}
		// What torusctl says to do: detach and attach again.
		run(t, "umount", mnt)
		mounted = false
		e.detach(t, a)
		a = e.attachVol(t, name, mode)
		if got := sysfsSize(t, a.dev); got != rzNew {
			t.Fatalf("%s shows %d bytes after re-attach, want %d", a.dev, got, rzNew)
		}
		run(t, "mount", a.dev, mnt)
		mounted = true
	}
	// Grown while mounted.
	t.Logf("resize2fs: %s", run(t, "resize2fs", a.dev))
	after := fsSize(t, mnt)
	if after < before+(rzNew-rzOld)*9/10 {
		t.Fatalf("file system %d bytes after resize2fs, was %d: it did not grow", after, before)
	}
	fioFile(t, fileA, "--size=32M", "--verify_only=1")                  // what was written before
	fioFile(t, filepath.Join(mnt, "b"), "--size=100M", "--do_verify=1") // more than the old file system holds
	run(t, "umount", mnt)
	mounted = false
	t.Logf("e2fsck: %s", run(t, "e2fsck", "-fn", a.dev))
	e.detach(t, a)
	t.Logf("attach log, resize lines:\n%s", grepLines(a.logText(), "grew", "resized", "cannot grow", "detach"))
}

// grepLines returns the lines of s that contain any of words.
func grepLines(s string, words ...string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		for _, w := range words {
			if strings.Contains(l, w) {
				out = append(out, l)
				break
			}
		}
	}
	return strings.Join(out, "\n")
}

// waitLog waits until the attach log contains want.
func waitLog(t *testing.T, a *attached, want string) {
	t.Helper()
	for range 100 {
		if l := grepLines(a.logText(), want); l != "" {
			t.Logf("attach log: %s", l)
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("the attach log does not say %q:\n%s", want, a.logText())
}
