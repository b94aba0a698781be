//go:build vm

// End-to-end tests against a real ublk_drv. They need root, /dev/ublk-control
// and a writable O_DIRECT file system in $TORUS_UBLK_DIR (default /mnt/disk),
// and fail with a clear message otherwise. Run them in the VM with
// ublk/vmtest.sh (build tag vm keeps them out of the host's `go test ./...`).

package ublk

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/torus-storage/torus/engine"
	"github.com/torus-storage/torus/store"
)

const childEnv = "TORUS_UBLK_CHILD"

func TestMain(m *testing.M) {
	os.Setenv("PATH", os.Getenv("PATH")+":/usr/sbin:/sbin")
	if mode := os.Getenv(childEnv); mode != "" {
		os.Exit(childMain(mode))
	}
	os.Exit(m.Run())
}

// childMain serves a device until SIGTERM: mode "create" makes a new one,
// "recover" takes over TORUS_UBLK_DEV. It prints "DEV <id>" once serving.
func childMain(mode string) int {
	path := os.Getenv("TORUS_UBLK_STORE")
	size, _ := strconv.ParseInt(os.Getenv("TORUS_UBLK_SIZE"), 10, 64)
	vol, err := store.OpenLocal(path, size, store.LocalOptions{})
	if err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		return 1
	}
	term := make(chan os.Signal, 1)
	signal.Notify(term, syscall.SIGTERM)
	var dev *Device
	opt := Options{Recovery: true, Depth: 64}
	if mode == "recover" {
		id, _ := strconv.Atoi(os.Getenv("TORUS_UBLK_DEV"))
		dev, err = Recover(context.Background(), id, vol, opt)
	} else {
		dev, err = Create(context.Background(), vol, opt)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		return 1
	}
	fmt.Printf("DEV %d\n", dev.ID())
	<-term
	rc := 0
	if err := dev.Close(); err != nil {
		fmt.Fprintln(os.Stderr, "child: close:", err)
		rc = 1
	}
	if err := vol.Close(); err != nil {
		fmt.Fprintln(os.Stderr, "child: volume close:", err)
		rc = 1
	}
	return rc
}

func requireVM(t *testing.T) string {
	t.Helper()
	if err := Available(); err != nil {
		t.Fatalf("%v (run ublk/vmtest.sh: the tests need a kernel with ublk_drv)", err)
	}
	dir := os.Getenv("TORUS_UBLK_DIR")
	if dir == "" {
		dir = "/mnt/disk"
	}
	probe := filepath.Join(dir, ".ublk-probe")
	if err := os.WriteFile(probe, []byte("x"), 0o600); err != nil {
		t.Fatalf("store directory %s not writable (run in the VM with --disk): %v", dir, err)
	}
	os.Remove(probe)
	return dir
}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

func openVolume(t *testing.T, dir, name string, size int64) *store.Local {
	t.Helper()
	path := filepath.Join(dir, name)
	os.Remove(path)
	vol, err := store.OpenLocal(path, size, store.LocalOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.Remove(path) })
	return vol
}

func checkNoDevices(t *testing.T) {
	t.Helper()
	for _, pat := range []string{"/dev/ublkb*", "/dev/ublkc*"} {
		m, _ := filepath.Glob(pat)
		if len(m) != 0 {
			t.Errorf("left behind: %v", m)
		}
	}
}

func fioVerify(t *testing.T, dev string, extra ...string) {
	t.Helper()
	args := append([]string{"--name=verify", "--filename=" + dev, "--direct=1", "--ioengine=libaio",
		"--iodepth=32", "--rw=randwrite", "--bs=4k", "--size=16M", "--verify=crc32c",
		"--verify_fatal=1", "--do_verify=1"}, extra...)
	run(t, "fio", args...)
}

func TestVMDevice(t *testing.T) {
	dir := requireVM(t)
	const size = 256 << 20
	vol := openVolume(t, dir, "ublk-device.store", size)
	defer vol.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	dev, err := Create(ctx, vol, Options{Queues: 2, Depth: 64})
	if err != nil {
		t.Fatal(err)
	}
	closed := false
	defer func() {
		if !closed {
			dev.Close()
		}
	}()
	t.Logf("%s flags %#x", dev.Path(), dev.Flags())
	if got := strings.TrimSpace(run(t, "blockdev", "--getsize64", dev.Path())); got != strconv.Itoa(size) {
		t.Fatalf("size %s, want %d", got, size)
	}
	if got := strings.TrimSpace(run(t, "blockdev", "--getss", dev.Path())); got != "4096" {
		t.Fatalf("logical block size %s, want 4096", got)
	}

	t.Run("fio-verify", func(t *testing.T) { fioVerify(t, dev.Path()) })

	t.Run("ext4", func(t *testing.T) {
		run(t, "mkfs.ext4", "-q", "-F", dev.Path())
		mnt := t.TempDir()
		run(t, "mount", dev.Path(), mnt)
		want := map[string][]byte{}
		rng := rand.New(rand.NewPCG(1, 2))
		for i := 0; i < 8; i++ {
			b := make([]byte, 1<<20+i*4099)
			for j := range b {
				b[j] = byte(rng.Uint32())
			}
			name := fmt.Sprintf("f%d", i)
			if err := os.WriteFile(filepath.Join(mnt, name), b, 0o600); err != nil {
				run(t, "umount", mnt)
				t.Fatal(err)
			}
			want[name] = b
		}
		run(t, "sync")
		run(t, "umount", mnt)
		run(t, "e2fsck", "-fn", dev.Path())
		run(t, "mount", dev.Path(), mnt)
		defer run(t, "umount", mnt)
		for name, b := range want {
			got, err := os.ReadFile(filepath.Join(mnt, name))
			if err != nil || !bytes.Equal(got, b) {
				t.Fatalf("%s differs after remount (err %v)", name, err)
			}
		}
	})

	t.Run("discard", func(t *testing.T) {
		before := vol.Store().Stats().UsedSlots
		run(t, "blkdiscard", dev.Path())
		after := vol.Store().Stats().UsedSlots
		t.Logf("used slots %d -> %d", before, after)
		if before == 0 || after >= before {
			t.Fatalf("blkdiscard did not free store space: used slots %d -> %d", before, after)
		}
	})

	if err := dev.Close(); err != nil {
		t.Fatal(err)
	}
	closed = true
	if err := dev.Wait(); err != nil {
		t.Errorf("Wait after Close: %v", err)
	}
	checkNoDevices(t)
}

// TestVMStopByOther stops the device behind the server's back (as `ublk del`
// would): Wait returns and Close still cleans up.
func TestVMStopByOther(t *testing.T) {
	dir := requireVM(t)
	vol := openVolume(t, dir, "ublk-stop.store", 64<<20)
	defer vol.Close()
	dev, err := Create(context.Background(), vol, Options{Queues: 1, Depth: 16})
	if err != nil {
		t.Fatal(err)
	}
	c, err := openCtrl()
	if err != nil {
		t.Fatal(err)
	}
	if err := c.stopDev(uint32(dev.ID())); err != nil {
		t.Fatal(err)
	}
	c.close()
	done := make(chan error, 1)
	go func() { done <- dev.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Wait: %v", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("Wait did not return after STOP_DEV")
	}
	if err := dev.Close(); err != nil {
		t.Fatal(err)
	}
	checkNoDevices(t)
}

type child struct {
	cmd *exec.Cmd
	id  int
}

func startChild(t *testing.T, mode, path string, size int64, id int) *child {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"="+mode, "TORUS_UBLK_STORE="+path,
		"TORUS_UBLK_SIZE="+strconv.FormatInt(size, 10), "TORUS_UBLK_DEV="+strconv.Itoa(id))
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(out).ReadString('\n')
	var got int
	if _, serr := fmt.Sscanf(line, "DEV %d", &got); err != nil || serr != nil {
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatalf("%s child did not report a device (%q, %v)", mode, line, err)
	}
	return &child{cmd: cmd, id: got}
}

func TestVMRecovery(t *testing.T) {
	dir := requireVM(t)
	feats, err := Features()
	if err != nil {
		t.Fatal(err)
	}
	if feats&FeatureUserRecovery == 0 {
		t.Fatalf("kernel offers no UBLK_F_USER_RECOVERY (features %#x)", feats)
	}
	const size = 64 << 20
	storePath := filepath.Join(dir, "ublk-recovery.store")
	os.Remove(storePath)
	defer os.Remove(storePath)
	a := startChild(t, "create", storePath, size, -1)
	path := fmt.Sprintf("/dev/ublkb%d", a.id)

	fioArgs := []string{"--name=rec", "--filename=" + path, "--direct=1", "--ioengine=libaio",
		"--iodepth=32", "--rw=randwrite", "--bs=4k", "--size=16M", "--verify=crc32c", "--do_verify=0"}
	fio := exec.Command("fio", fioArgs...)
	var fioOut bytes.Buffer
	fio.Stdout, fio.Stderr = &fioOut, &fioOut
	if err := fio.Start(); err != nil {
		t.Fatal(err)
	}
	fioDone := make(chan error, 1)
	go func() { fioDone <- fio.Wait() }()
	time.Sleep(1500 * time.Millisecond)
	select {
	case err := <-fioDone:
		t.Fatalf("fio ended before the server was killed (err %v): the test would prove nothing\n%s", err, fioOut.String())
	default:
	}
	a.cmd.Process.Signal(syscall.SIGKILL)
	a.cmd.Wait()
	t.Logf("server %d killed while fio writes", a.cmd.Process.Pid)

	b := startChild(t, "recover", storePath, size, a.id)
	defer func() {
		b.cmd.Process.Signal(syscall.SIGTERM)
		if err := b.cmd.Wait(); err != nil {
			t.Errorf("recovered server exit: %v", err)
		}
		checkNoDevices(t)
	}()
	if b.id != a.id {
		t.Fatalf("recovered device %d, want %d", b.id, a.id)
	}
	select {
	case err := <-fioDone:
		if err != nil {
			t.Fatalf("fio across the crash: %v\n%s", err, fioOut.String())
		}
	case <-time.After(5 * time.Minute):
		fio.Process.Kill()
		t.Fatalf("fio did not finish after recovery\n%s", fioOut.String())
	}
	verify := append(fioArgs[:len(fioArgs)-1:len(fioArgs)-1], "--verify_only", "--verify_fatal=1")
	run(t, "fio", verify...)
}

func fioIOPS(t *testing.T, dev, rw string) float64 {
	t.Helper()
	out := run(t, "fio", "--name=perf", "--filename="+dev, "--direct=1", "--ioengine=libaio",
		"--iodepth=32", "--rw="+rw, "--bs=4k", "--size=64M", "--time_based", "--runtime=8",
		"--ramp_time=1", "--output-format=json")
	var res struct {
		Jobs []struct {
			Read, Write struct {
				IOPS float64 `json:"iops"`
			}
		} `json:"jobs"`
	}
	if i := strings.IndexByte(out, '{'); i >= 0 {
		out = out[i:]
	}
	if err := json.Unmarshal([]byte(out), &res); err != nil || len(res.Jobs) == 0 {
		t.Fatalf("fio json: %v\n%s", err, out)
	}
	if rw == "randread" {
		return res.Jobs[0].Read.IOPS
	}
	return res.Jobs[0].Write.IOPS
}

// TestVMPerf compares 4K random I/O at QD32 on ublk (Local volume on
// /mnt/disk) with a loop device (direct I/O) over a file on the same disk.
func TestVMPerf(t *testing.T) {
	dir := requireVM(t)
	const size = 64 << 20
	vol := openVolume(t, dir, "ublk-perf.store", size)
	defer vol.Close()
	dev, err := Create(context.Background(), vol, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	img := filepath.Join(dir, "loop.img")
	run(t, "fallocate", "-l", strconv.Itoa(size), img)
	defer os.Remove(img)
	loop := strings.TrimSpace(run(t, "losetup", "--direct-io=on", "--show", "-f", img))
	defer run(t, "losetup", "-d", loop)
	for _, d := range []string{dev.Path(), loop} {
		// Fill both so reads hit the disk, not holes.
		run(t, "fio", "--name=fill", "--filename="+d, "--direct=1", "--rw=write", "--bs=1M", "--size=64M")
	}
	// The same frontend over a volume that completes at once: what ublk and
	// this server cost without the store behind them.
	null, err := Create(context.Background(), nullVolume(size), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer null.Close()
	for _, rw := range []string{"randread", "randwrite"} {
		u := fioIOPS(t, dev.Path(), rw)
		l := fioIOPS(t, loop, rw)
		n := fioIOPS(t, null.Path(), rw)
		t.Logf("PERF %s 4k QD32: ublk %.0f IOPS, loop %.0f IOPS (ratio %.2f); ublk over a null volume %.0f IOPS",
			rw, u, l, u/l, n)
	}
}

// nullVolume completes every request at once; reads return whatever the
// tag buffer held.
type nullVolume int64

func (n nullVolume) Size() int64              { return int64(n) }
func (n nullVolume) BlockSize() int           { return 4096 }
func (n nullVolume) Close() error             { return nil }
func (n nullVolume) Submit(r *engine.Request) { r.Done.Complete(r, nil) }
