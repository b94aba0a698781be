//go:build vm

// The node service on real kernels, in the VM (scripts/vm/csi-vm.sh builds
// the binaries and sets TORUS_VM_BIN): csi-sanity with every spec, against
// torus-csi and torusd dev as real processes, with real devices (ublk where
// the kernel has it, else the kernel NBD client); volumes that follow their
// pods between two plugins standing for two hosts; a plugin killed during
// fio; data through a snapshot and a clone, xfs, and expansion. Each test
// fails, never skips, when something it needs is missing.

package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/json"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/kubernetes-csi/csi-test/v5/pkg/sanity"
	. "github.com/onsi/ginkgo/v2"
	. "github.com/onsi/gomega"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/torus-storage/torus/internal/blockdev"
	"github.com/torus-storage/torus/ublk"
)

// vmEnv is the dev cluster and the binaries of a test.
type vmEnv struct {
	bin, etcd, tls, dir string
	mode                string // the attach mode auto picks on this kernel
}

func (e *vmEnv) tool(name string) string { return filepath.Join(e.bin, name) }

// setupVM checks the tools, loads xfs and starts torusd dev.
func setupVM(t *testing.T) *vmEnv {
	t.Helper()
	os.Setenv("PATH", os.Getenv("PATH")+":/usr/sbin:/sbin")
	e := &vmEnv{bin: os.Getenv("TORUS_VM_BIN"), dir: t.TempDir(), mode: "nbd"}
	if e.bin == "" {
		t.Fatal("TORUS_VM_BIN is not set: run this test with scripts/vm/csi-vm.sh, which builds the binaries")
	}
	if os.Getenv("TORUS_VM") == "" {
		t.Fatal("not in the VM (TORUS_VM unset): these tests attach real devices; run scripts/vm/csi-vm.sh")
	}
	if os.Geteuid() != 0 {
		t.Fatal("needs root (block devices, mount)")
	}
	for _, tool := range []string{"fio", "mkfs.ext4", "mkfs.xfs", "resize2fs", "xfs_growfs", "blkid", "mount", "umount"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s is missing: %v", tool, err)
		}
	}
	for _, b := range []string{"torusd", "torusctl", "torusblk", "torus-csi"} {
		if _, err := os.Stat(e.tool(b)); err != nil {
			t.Fatalf("%s: %v (scripts/vm/csi-vm.sh builds it)", b, err)
		}
	}
	if ublk.Available() == nil {
		e.mode = "ublk"
	}
	if out, err := exec.Command("modprobe", "-d", os.Getenv("TORUS_VM_MODDIR"), "-S", os.Getenv("TORUS_VM_KVER"), "xfs").CombinedOutput(); err != nil {
		t.Fatalf("modprobe xfs: %v: %s", err, out)
	}
	exec.Command("ip", "link", "set", "lo", "up").Run()

	out, err := os.Create(filepath.Join(e.dir, "dev.out"))
	if err != nil {
		t.Fatal(err)
	}
	logPath := filepath.Join(e.dir, "dev.log")
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	disk := os.Getenv("TORUS_VM_DISK")
	if disk == "" {
		disk = "/mnt/disk"
	}
	dev := exec.Command(e.tool("torusd"), "dev", "--nodes", "3", "--data-dir", filepath.Join(disk, "csidev-"+t.Name()), "--size", "2GiB")
	dev.Stdout, dev.Stderr = out, logf
	if err := dev.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		dev.Process.Signal(syscall.SIGTERM)
		dev.Wait()
	})
	deadline := time.Now().Add(90 * time.Second)
	for e.etcd == "" || e.tls == "" {
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(logPath)
			t.Fatalf("torusd dev did not print its etcd and tls lines in 90s:\n%s", b)
		}
		time.Sleep(100 * time.Millisecond)
		b, _ := os.ReadFile(out.Name())
		for l := range strings.SplitSeq(string(b), "\n") {
			if v, ok := strings.CutPrefix(l, "etcd: "); ok {
				e.etcd = v
			}
			if v, ok := strings.CutPrefix(l, "tls: "); ok {
				e.tls = v
			}
		}
	}
	t.Logf("kernel %s: attach mode %s", os.Getenv("TORUS_VM_KVER"), e.mode)
	return e
}

// plugin is a running torus-csi process.
type plugin struct {
	e          *vmEnv
	id, runDir string
	sock, log  string
	cmd        *exec.Cmd
	exited     chan error
	conn       *grpc.ClientConn
	node       csi.NodeClient
	ctl        csi.ControllerClient
	identity   csi.IdentityClient
	stopped    bool
	leaseTTL   string
}

// startPlugin starts torus-csi --mode all as node id, with run dir runDir
// (a host's), and waits until it answers Probe.
func (e *vmEnv) startPlugin(t *testing.T, id, runDir string) *plugin {
	t.Helper()
	p := &plugin{e: e, id: id, runDir: runDir, sock: filepath.Join(e.dir, id+".sock"), log: filepath.Join(e.dir, id+".log"), leaseTTL: "5s"}
	p.start(t)
	t.Cleanup(func() { p.stop(t) })
	return p
}

func (p *plugin) start(t *testing.T) {
	t.Helper()
	logf, err := os.OpenFile(p.log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	p.cmd = exec.Command(p.e.tool("torus-csi"), "--mode", "all", "--endpoint", "unix://"+p.sock, "--etcd", p.e.etcd,
		"--tls-dir", p.e.tls, "--run-dir", p.runDir, "--node-id", p.id, "--torusblk", p.e.tool("torusblk"), "--lease-ttl", p.leaseTTL)
	p.cmd.Stdout, p.cmd.Stderr = logf, logf
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p.exited = make(chan error, 1)
	go func() { p.exited <- p.cmd.Wait() }()
	p.stopped = false
	conn, err := grpc.NewClient("unix://"+p.sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	p.conn, p.node, p.ctl, p.identity = conn, csi.NewNodeClient(conn), csi.NewControllerClient(conn), csi.NewIdentityClient(conn)
	deadline := time.Now().Add(60 * time.Second)
	for {
		c, err := net.Dial("unix", p.sock)
		if err == nil {
			c.Close()
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			_, err = p.identity.Probe(ctx, &csi.ProbeRequest{})
			cancel()
			if err == nil {
				return
			}
		}
		select {
		case err := <-p.exited:
			t.Fatalf("torus-csi exited: %v\n%s", err, p.logText())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("torus-csi did not answer in 60s: %v\n%s", err, p.logText())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// kill kills the plugin with SIGKILL (its device servers live on).
func (p *plugin) kill(t *testing.T) {
	t.Helper()
	p.cmd.Process.Kill()
	<-p.exited
	p.conn.Close()
	p.stopped = true
}

// stop ends the plugin and removes every device left in its run dir.
func (p *plugin) stop(t *testing.T) {
	if !p.stopped {
		p.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.exited:
		case <-time.After(30 * time.Second):
			p.cmd.Process.Kill()
			<-p.exited
		}
		p.conn.Close()
		p.stopped = true
	}
	sts, _ := blockdev.List(p.runDir)
	for _, st := range sts {
		if !st.ServerAlive() {
			// An unmount would wait forever on the I/O such a device queues.
			t.Logf("cleanup: stopping %s, whose server is dead: %v", st.Device, blockdev.Stop(st.Device, p.runDir))
		}
		for _, m := range mountsOfQuiet(st.Device) {
			t.Logf("cleanup: umount -l %s", m)
			exec.Command("umount", "-l", m).Run()
		}
		t.Logf("cleanup: detaching %s (server alive %v)", st.Device, st.ServerAlive())
		if err := blockdev.Detach(st.Device, p.runDir, 60*time.Second, nil); err != nil {
			t.Logf("cleanup: detaching %s: %v", st.Device, err)
		}
	}
}

func mountsOfQuiet(dev string) []string { m, _ := mountsOf(dev); return m }

func (p *plugin) logText() string { b, _ := os.ReadFile(p.log); return string(b) }

// servers returns the pids of the device servers in the plugin's run dir.
func (p *plugin) servers(t *testing.T) map[string]int {
	t.Helper()
	sts, err := blockdev.List(p.runDir)
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]int{}
	for _, st := range sts {
		m[st.Source.Volume] = st.PID
	}
	return m
}

func mountCap(fs string) *csi.VolumeCapability {
	return &csi.VolumeCapability{
		AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{FsType: fs}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
	}
}

func ctxT() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), 3*time.Minute)
}

// createVolume creates a volume through p's controller.
func (p *plugin) createVolume(t *testing.T, name string, size int64, src *csi.VolumeContentSource) {
	t.Helper()
	ctx, cancel := ctxT()
	defer cancel()
	if _, err := p.ctl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: name, CapacityRange: &csi.CapacityRange{RequiredBytes: size},
		VolumeCapabilities: []*csi.VolumeCapability{mountCap("")}, VolumeContentSource: src}); err != nil {
		t.Fatalf("CreateVolume %s: %v", name, err)
	}
}

// stage stages and publishes vol with c at paths under the test's dir;
// it returns the target path.
func (p *plugin) stagePublish(t *testing.T, vol string, c *csi.VolumeCapability) string {
	t.Helper()
	if err := p.stage(vol, c); err != nil {
		t.Fatalf("%s: NodeStageVolume %s: %v\n%s", p.id, vol, err, p.logText())
	}
	ctx, cancel := ctxT()
	defer cancel()
	target := p.target(vol)
	if _, err := p.node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: vol, StagingTargetPath: p.staging(vol),
		TargetPath: target, VolumeCapability: c}); err != nil {
		t.Fatalf("%s: NodePublishVolume %s: %v", p.id, vol, err)
	}
	return target
}

func (p *plugin) staging(vol string) string { return filepath.Join(p.e.dir, p.id, "staging", vol) }
func (p *plugin) target(vol string) string  { return filepath.Join(p.e.dir, p.id, "pods", vol, "mount") }

func (p *plugin) stage(vol string, c *csi.VolumeCapability) error {
	ctx, cancel := ctxT()
	defer cancel()
	os.MkdirAll(p.staging(vol), 0o750)
	_, err := p.node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: vol, StagingTargetPath: p.staging(vol), VolumeCapability: c})
	return err
}

// unpublishUnstage undoes stagePublish.
func (p *plugin) unpublishUnstage(t *testing.T, vol string) {
	t.Helper()
	ctx, cancel := ctxT()
	defer cancel()
	if _, err := p.node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: vol, TargetPath: p.target(vol)}); err != nil {
		t.Fatalf("%s: NodeUnpublishVolume %s: %v", p.id, vol, err)
	}
	if _, err := p.node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: vol, StagingTargetPath: p.staging(vol)}); err != nil {
		t.Fatalf("%s: NodeUnstageVolume %s: %v", p.id, vol, err)
	}
	if _, ok := p.servers(t)[vol]; ok {
		t.Fatalf("%s: %s still has a device after NodeUnstageVolume", p.id, vol)
	}
}

// writeData writes a file of random bytes at dir/name, synced, and
// returns its digest.
func writeData(t *testing.T, dir, name string, n int) [32]byte {
	t.Helper()
	b := make([]byte, n)
	rand.Read(b)
	f, err := os.Create(filepath.Join(dir, name))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.Write(b); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	f.Close()
	return sha256.Sum256(b)
}

func readDigest(t *testing.T, path string) [32]byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(b)
}

// runSanity runs csi-sanity against p for each access type.
func runSanity(t *testing.T, p *plugin, accessTypes []string) {
	for _, at := range accessTypes {
		cfg := sanity.NewTestConfig()
		cfg.Address = "unix:" + p.sock
		cfg.TestVolumeSize = 64 << 20
		cfg.TestVolumeExpandSize = 128 << 20
		cfg.TestVolumeAccessType = at
		cfg.TargetPath = filepath.Join(p.e.dir, "sanity-"+at, "target")
		cfg.StagingPath = filepath.Join(p.e.dir, "sanity-"+at, "staging")
		if err := os.MkdirAll(filepath.Join(p.e.dir, "sanity-"+at), 0o755); err != nil {
			t.Fatal(err)
		}
		Describe("access type "+at, func() { sanity.GinkgoTest(&cfg) })
	}
	checkSkips(t, func() {
		RegisterFailHandler(Fail)
		suite, reporter := GinkgoConfiguration()
		RunSpecs(t, "torus-csi sanity in the VM", suite, reporter)
	})
}

// TestVMSanity runs every csi-sanity spec, Node included, against
// torus-csi --mode all on this kernel's devices, with the access types of
// CSI_SANITY_ACCESS (default mount,block).
func TestVMSanity(t *testing.T) {
	e := setupVM(t)
	p := e.startPlugin(t, "sanity-node", filepath.Join(e.dir, "run-sanity"))
	ats := []string{"mount", "block"}
	if v := os.Getenv("CSI_SANITY_ACCESS"); v != "" {
		ats = strings.Split(v, ",")
	}
	start := time.Now()
	runSanity(t, p, ats)
	t.Logf("sanity (%v) took %v", ats, time.Since(start).Round(time.Second))
	if left := p.servers(t); len(left) != 0 {
		t.Errorf("devices left attached after sanity: %v", left)
	}
}

// TestVMFollow: a volume follows its pod between two hosts (two plugins
// with run dirs of their own); a stage while the other host serves fails
// with FAILED_PRECONDITION; a stage after the other host died waits out its
// lease, fences it and says so.
func TestVMFollow(t *testing.T) {
	e := setupVM(t)
	a := e.startPlugin(t, "host-a", filepath.Join(e.dir, "run-a"))
	b := e.startPlugin(t, "host-b", filepath.Join(e.dir, "run-b"))
	const vol = "follow"
	a.createVolume(t, vol, 64<<20, nil)
	c := mountCap("ext4")

	ta := a.stagePublish(t, vol, c)
	sum := writeData(t, ta, "data", 4<<20)

	start := time.Now()
	err := b.stage(vol, c)
	if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "another host") {
		t.Fatalf("stage on host-b while host-a serves: got %v, want FAILED_PRECONDITION naming another host", err)
	}
	t.Logf("stage on host-b while host-a serves: %v after %v", status.Code(err), time.Since(start).Round(time.Millisecond))
	if _, ok := b.servers(t)[vol]; ok {
		t.Fatal("host-b has a device for the volume after its stage failed")
	}

	// The pod moves: unstage on A, stage on B.
	a.unpublishUnstage(t, vol)
	start = time.Now()
	tb := b.stagePublish(t, vol, c)
	t.Logf("stage on host-b after host-a unstaged: %v", time.Since(start).Round(time.Millisecond))
	if got := readDigest(t, filepath.Join(tb, "data")); got != sum {
		t.Fatal("host-b reads other data than host-a wrote")
	}
	sum2 := writeData(t, tb, "data2", 1<<20)

	// Host B dies without unstaging: its plugin and device server are
	// killed (the device stays, as on a host that lost power its I/O
	// would go nowhere). A's stage waits out B's lease and fences it.
	pid := b.servers(t)[vol]
	b.kill(t)
	syscall.Kill(pid, syscall.SIGKILL)
	for pidAlive(pid) {
		time.Sleep(50 * time.Millisecond)
	}
	start = time.Now()
	ta = a.stagePublish(t, vol, c)
	waited := time.Since(start)
	t.Logf("stage on host-a after host-b died: %v", waited.Round(time.Millisecond))
	if got := readDigest(t, filepath.Join(ta, "data")); got != sum {
		t.Fatal("data changed")
	}
	if got := readDigest(t, filepath.Join(ta, "data2")); got != sum2 {
		t.Fatal("host-a does not read what host-b wrote before it died")
	}
	if !strings.Contains(a.logText(), "fenced by the new epoch") {
		t.Errorf("host-a's log does not say it fenced the dead holder:\n%s", a.logText())
	}
	if waited < 2*time.Second {
		t.Errorf("host-a staged %v after host-b died: it cannot have waited out host-b's 5s lease", waited)
	}

	// Host B comes back: its plugin cannot recover the device (host A
	// attached the volume since), so it stops it, and the CO's cleanup of
	// the pod that was there (unpublish, unstage) goes through.
	// With the kernel NBD client, the dead server's device already fails
	// its I/O; the plugin says it cannot be taken over.
	said := "this host's device is stopped"
	if e.mode == "nbd" {
		said = "the server of a kernel NBD device died"
	}
	start = time.Now()
	b.start(t)
	for !strings.Contains(b.logText(), said) {
		if time.Since(start) > 90*time.Second {
			t.Fatalf("host-b's plugin did not give up its device in 90s:\n%s", b.logText())
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Logf("host-b back: its plugin gave its device up after %v", time.Since(start).Round(time.Millisecond))
	b.unpublishUnstage(t, vol)
	if got := readDigest(t, filepath.Join(ta, "data2")); got != sum2 {
		t.Fatal("host-a's data changed while host-b cleaned up")
	}
	a.unpublishUnstage(t, vol)
}

func devOf(t *testing.T, p *plugin, vol string) string {
	sts, _ := blockdev.List(p.runDir)
	for _, st := range sts {
		if st.Source.Volume == vol {
			return st.Device
		}
	}
	return "/nonexistent"
}

// pidAlive reports whether pid runs (a zombie does not).
func pidAlive(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	i := bytes.LastIndexByte(b, ')')
	return i < 0 || i+2 >= len(b) || b[i+2] != 'Z'
}

// TestVMPluginRestart: fio verify=crc32c runs on a mounted volume while the
// plugin is killed and started again (its device server lives on and the
// new plugin adopts it), then, with ublk, while the plugin and the device
// server are both killed, as a container restart does (the new plugin
// recovers the device: I/O pauses, no error).
func TestVMPluginRestart(t *testing.T) {
	e := setupVM(t)
	runDir := filepath.Join(e.dir, "run")
	p := e.startPlugin(t, "host-a", runDir)
	const vol = "restart"
	p.createVolume(t, vol, 256<<20, nil)
	target := p.stagePublish(t, vol, mountCap("ext4"))

	fio := exec.Command("fio", "--name=restart", "--filename="+filepath.Join(target, "fio"), "--size=48M", "--bs=4k",
		"--rw=randwrite", "--direct=1", "--ioengine=libaio", "--iodepth=8", "--verify=crc32c", "--verify_backlog=512",
		"--verify_fatal=1", "--verify_state_save=0", "--time_based", "--runtime=45", "--output-format=json")
	fio.Dir = target
	var fout bytes.Buffer
	fio.Stdout, fio.Stderr = &fout, &fout
	if err := fio.Start(); err != nil {
		t.Fatal(err)
	}
	fdone := make(chan error, 1)
	go func() { fdone <- fio.Wait() }()
	time.Sleep(8 * time.Second)

	srv := p.servers(t)[vol]
	p.kill(t)
	p.start(t)
	if got := p.servers(t)[vol]; got != srv {
		t.Fatalf("after a plugin restart the device's server is %d, was %d", got, srv)
	}
	if !strings.Contains(p.logText(), "adopted a device") {
		t.Errorf("the new plugin did not say it adopted the device:\n%s", p.logText())
	}

	if e.mode == "ublk" {
		time.Sleep(5 * time.Second)
		p.kill(t)
		syscall.Kill(srv, syscall.SIGKILL)
		for pidAlive(srv) {
			time.Sleep(50 * time.Millisecond)
		}
		start := time.Now()
		p.start(t)
		for p.servers(t)[vol] == srv || !pidAlive(p.servers(t)[vol]) {
			if time.Since(start) > 90*time.Second {
				t.Fatalf("the new plugin did not recover the device in 90s:\n%s", p.logText())
			}
			time.Sleep(100 * time.Millisecond)
		}
		t.Logf("plugin and device server killed: recovered by the new plugin in %v", time.Since(start).Round(time.Millisecond))
	} else {
		t.Logf("kernel NBD: a dead device server cannot be recovered (the kernel fails its I/O), so only the plugin is killed here")
	}
	select {
	case err := <-fdone:
		if err != nil {
			t.Fatalf("fio: %v\n%s", err, fout.String())
		}
	case <-time.After(4 * time.Minute):
		fio.Process.Kill()
		t.Fatalf("fio did not finish in 4 min\n%s", fout.String())
	}
	var res struct {
		Jobs []struct {
			Error int `json:"error"`
			Write struct {
				IOBytes int64 `json:"io_bytes"`
			} `json:"write"`
			Read struct {
				IOBytes int64 `json:"io_bytes"`
			} `json:"read"`
		} `json:"jobs"`
	}
	out := fout.Bytes()
	if i := bytes.IndexByte(out, '{'); i >= 0 {
		out = out[i:]
	}
	if err := json.Unmarshal(out, &res); err != nil || len(res.Jobs) != 1 {
		t.Fatalf("fio's JSON: %v\n%s", err, fout.String())
	}
	j := res.Jobs[0]
	if j.Error != 0 || j.Write.IOBytes == 0 || j.Read.IOBytes == 0 {
		t.Fatalf("fio: error %d, %d bytes written, %d verified:\n%s", j.Error, j.Write.IOBytes, j.Read.IOBytes, fout.String())
	}
	t.Logf("fio verify=crc32c across the restarts: %d MiB written, %d MiB verified, no error", j.Write.IOBytes>>20, j.Read.IOBytes>>20)
	ctx, cancel := ctxT()
	defer cancel()
	h, err := p.node.NodeGetVolumeHealth(ctx, &csi.NodeGetVolumeHealthRequest{VolumeId: vol})
	if err != nil || len(h.GetVolumeHealth().GetHealthStatuses()) != 0 {
		t.Errorf("volume health after the restarts: %v %v", h, err)
	}
	p.unpublishUnstage(t, vol)
}

// TestVMSnapshotClone: an xfs volume with data, a snapshot, a clone of it
// staged on the same host holding exactly the snapshot's data; then the
// clone grows: live where the kernel grows the device, else at its next
// stage, as NodeExpandVolume says.
func TestVMSnapshotClone(t *testing.T) {
	e := setupVM(t)
	p := e.startPlugin(t, "host-a", filepath.Join(e.dir, "run"))
	ctx, cancel := ctxT()
	defer cancel()
	p.createVolume(t, "src", 512<<20, nil) // xfs wants 300 MB at least
	c := mountCap("xfs")
	ts := p.stagePublish(t, "src", c)
	sum := writeData(t, ts, "data", 8<<20)
	snap, err := p.ctl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{SourceVolumeId: "src", Name: "s1"})
	if err != nil {
		t.Fatalf("CreateSnapshot: %v", err)
	}
	writeData(t, ts, "data", 8<<20) // the volume changes after the snapshot
	writeData(t, ts, "after", 1<<20)

	p.createVolume(t, "clone", 512<<20, &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{
		Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: snap.GetSnapshot().GetSnapshotId()}}})
	tc := p.stagePublish(t, "clone", c)
	if got := readDigest(t, filepath.Join(tc, "data")); got != sum {
		t.Fatal("the clone does not hold the snapshot's data")
	}
	if _, err := os.Stat(filepath.Join(tc, "after")); err == nil {
		t.Fatal("the clone holds a file written after the snapshot")
	}

	// Expansion.
	const grown = 768 << 20
	if _, err := p.ctl.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: "clone",
		CapacityRange: &csi.CapacityRange{RequiredBytes: grown}}); err != nil {
		t.Fatalf("ControllerExpandVolume: %v", err)
	}
	_, err = p.node.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: "clone", VolumePath: tc,
		CapacityRange: &csi.CapacityRange{RequiredBytes: grown}, VolumeCapability: c})
	live := err == nil
	if err != nil {
		if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "staged again") {
			t.Fatalf("NodeExpandVolume: %v, want success or FAILED_PRECONDITION saying it grows when staged again", err)
		}
		t.Logf("NodeExpandVolume where the device cannot grow live: %v", err)
		p.unpublishUnstage(t, "clone")
		tc = p.stagePublish(t, "clone", c)
	}
	var sf unix.Statfs_t
	if err := unix.Statfs(tc, &sf); err != nil {
		t.Fatal(err)
	}
	if size := int64(sf.Blocks) * sf.Bsize; size < grown*9/10 {
		t.Fatalf("the clone's filesystem is %d bytes after expansion to %d (live %v)", size, grown, live)
	}
	if got := readDigest(t, filepath.Join(tc, "data")); got != sum {
		t.Fatal("the clone's data changed with its expansion")
	}
	t.Logf("expansion to %d bytes: live %v", grown, live)
	p.unpublishUnstage(t, "clone")
	p.unpublishUnstage(t, "src")
	if left := p.servers(t); len(left) != 0 {
		t.Errorf("devices left: %v", left)
	}
}
