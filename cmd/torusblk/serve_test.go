package main

// End-to-end tests of `torusblk serve` with real NBD clients: fio (nbd
// engine, crc32c verification), nbdinfo, qemu-img and qemu-io. The clients
// come from Debian packages that scripts/deps.sh installs; a missing client
// fails the test, it is never skipped.

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/torus-storage/torus/internal/nbdtest"
	"github.com/torus-storage/torus/internal/testcluster"
)

// torusblkBin is the torusblk binary under test, built by TestMain.
var torusblkBin string

func TestMain(m *testing.M) {
	os.Exit(testcluster.Main(m, testcluster.MainOptions{Build: map[string]*string{"torusblk": &torusblkBin}}))
}

// needTool fails the test when a client the tests rely on is not installed.
func needTool(t *testing.T, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		t.Fatalf("%s is not installed: run scripts/deps.sh test (as root) — it installs fio, libnbd-bin, qemu-utils and nbdkit", name)
	}
	return p
}

// server is a torusblk serve process on a local store.
type server struct {
	*testcluster.Proc
	store string
	sock  string
}

// startServer runs torusblk serve on store with a unix socket and waits
// until it accepts connections.
func startServer(t *testing.T, store, size string) *server {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	p := testcluster.StartT(t, testcluster.Spec{Name: "torusblk serve", Bin: torusblkBin,
		Args: []string{"serve", "--store", store, "--size", size, "--listen", "unix:" + sock}})
	if err := p.AwaitSocket(context.Background(), sock, 10*time.Second); err != nil {
		t.Fatalf("%v\n%s", err, p.Log())
	}
	return &server{Proc: p, store: store, sock: sock}
}

func (s *server) uri() string { return "nbd+unix:///torus?socket=" + s.sock }

func runTool(t *testing.T, timeout time.Duration, name string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, needTool(t, name), args...).CombinedOutput()
	return string(out), err
}

func TestServeFioVerify(t *testing.T) {
	s := startServer(t, t.TempDir(), "256MiB")
	for _, qd := range []int{1, 32} {
		t.Run(fmt.Sprintf("QD%d", qd), func(t *testing.T) {
			out, err := runTool(t, 5*time.Minute, "fio", "--name=verify", "--ioengine=nbd", "--uri="+s.uri(),
				"--rw=randwrite", "--bs=4k", fmt.Sprintf("--iodepth=%d", qd), "--size=64M",
				fmt.Sprintf("--offset=%dM", 64*qd/32), "--verify=crc32c", "--verify_fatal=1",
				"--do_verify=1", "--verify_state_save=0", "--number_ios=4000", "--output-format=terse", "--terse-version=3")
			if err != nil {
				t.Fatalf("fio verify at QD%d: %v\n%s\nserver log:\n%s", qd, err, out, s.Log())
			}
			// terse v3: field 5 is the error code, 7 read KiB, 48 write KiB.
			f := strings.Split(strings.TrimSpace(out[strings.LastIndex(out, "3;fio"):]), ";")
			if len(f) < 50 || f[4] != "0" || f[6] == "0" || f[47] == "0" {
				t.Fatalf("fio did not both write and verify without error: %s", out)
			}
		})
	}
	s.Stop(t)
}

func TestServeNbdinfo(t *testing.T) {
	s := startServer(t, t.TempDir(), "64MiB")
	out, err := runTool(t, time.Minute, "nbdinfo", "--json", s.uri())
	if err != nil {
		t.Fatalf("nbdinfo: %v\n%s", err, out)
	}
	for _, want := range []string{`"export-size": 67108864`, `"block_size_minimum": 4096`} {
		if !strings.Contains(out, want) {
			t.Errorf("nbdinfo --json lacks %s:\n%s", want, out)
		}
	}
	for _, can := range []string{"flush", "fua", "trim", "zero", "multi-conn"} {
		if out, err := runTool(t, time.Minute, "nbdinfo", "--can", can, s.uri()); err != nil {
			t.Errorf("nbdinfo --can %s: %v %s", can, err, out)
		}
	}
	s.Stop(t)
}

func TestServeQemuImgRoundTrip(t *testing.T) {
	s := startServer(t, t.TempDir(), "64MiB")
	dir := t.TempDir()
	src := filepath.Join(dir, "src.raw")
	data := make([]byte, 64<<20)
	r := rand.New(rand.NewPCG(1, 2))
	for i := 0; i < len(data); i += 8 {
		if (i>>20)%3 == 1 { // leave some MiBs zero so holes and zero detection are exercised
			continue
		}
		binary.LittleEndian.PutUint64(data[i:], r.Uint64())
	}
	if err := os.WriteFile(src, data, 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := runTool(t, 2*time.Minute, "qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, s.uri()); err != nil {
		t.Fatalf("qemu-img convert into the volume: %v\n%s", err, out)
	}
	dst := filepath.Join(dir, "dst.raw")
	if out, err := runTool(t, 2*time.Minute, "qemu-img", "convert", "-f", "raw", "-O", "raw", s.uri(), dst); err != nil {
		t.Fatalf("qemu-img convert out of the volume: %v\n%s", err, out)
	}
	got, err := os.ReadFile(dst)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatalf("round trip through the volume changed the bytes (len %d vs %d)", len(got), len(data))
	}
	if out, err := runTool(t, 2*time.Minute, "qemu-img", "compare", "-f", "raw", "-F", "raw", src, s.uri()); err != nil {
		t.Fatalf("qemu-img compare: %v\n%s", err, out)
	}
	s.Stop(t)
}

func TestServeQemuIO(t *testing.T) {
	s := startServer(t, t.TempDir(), "64MiB")
	out, err := runTool(t, time.Minute, "qemu-io", "-f", "raw",
		"-c", "write -P 0xab 4096 1M",
		"-c", "write -P 0xcd -f 8M 64k", // FUA write
		"-c", "flush",
		"-c", "read -P 0xab 4096 1M",
		"-c", "read -P 0xcd 8M 64k",
		"-c", "read -P 0 0 4096",
		"-c", "discard 4096 64k",
		"-c", "read -P 0 4096 64k",
		"-c", "write -z 16M 1M",
		"-c", "read -P 0 16M 1M",
		s.uri())
	if err != nil || strings.Contains(out, "Pattern verification failed") || strings.Contains(out, "error") {
		t.Fatalf("qemu-io: %v\n%s", err, out)
	}
	s.Stop(t)
	// The data survives a restart.
	s = startServer(t, s.store, "64MiB")
	out, err = runTool(t, time.Minute, "qemu-io", "-f", "raw", "-r",
		"-c", "read -P 0xab 69632 983040", "-c", "read -P 0xcd 8M 64k", s.uri())
	if err != nil || strings.Contains(out, "Pattern verification failed") {
		t.Fatalf("qemu-io after restart: %v\n%s", err, out)
	}
	s.Stop(t)
}

func TestServeCorruptionIsIOError(t *testing.T) {
	store := t.TempDir()
	s := startServer(t, store, "64MiB")
	if out, err := runTool(t, time.Minute, "qemu-io", "-f", "raw", "-c", "write -P 0x5a 1M 64k", "-c", "flush", s.uri()); err != nil {
		t.Fatalf("qemu-io write: %v\n%s", err, out)
	}
	s.Stop(t)

	// Flip one byte inside the written data, wherever the store keeps it.
	path := filepath.Join(store, storeFile)
	img, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	pat := bytes.Repeat([]byte{0x5a}, 4096)
	at := bytes.Index(img, pat)
	if at < 0 {
		t.Fatalf("written pattern not found in %s", path)
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte{0x5b}, int64(at+100)); err != nil {
		t.Fatal(err)
	}
	f.Close()

	s = startServer(t, store, "64MiB")
	out, err := runTool(t, time.Minute, "qemu-io", "-f", "raw", "-r", "-c", "read -P 0x5a 1M 64k", s.uri())
	if err == nil && !strings.Contains(out, "Input/output error") {
		t.Fatalf("reading a corrupted block succeeded; want an I/O error:\n%s", out)
	}
	if !strings.Contains(out, "Input/output error") {
		t.Fatalf("want Input/output error, got: %v\n%s", err, out)
	}
	// Blocks beside the corrupted one still read.
	if out, err := runTool(t, time.Minute, "qemu-io", "-f", "raw", "-r", "-c", "read -P 0 0 1M", s.uri()); err != nil {
		t.Fatalf("reading intact data after corruption: %v\n%s", err, out)
	}
	s.Stop(t)
}

// TestServeKill9 kills the server with SIGKILL in the middle of a pipelined,
// verified write workload, restarts it and checks every block: each holds the
// last write acknowledged before the kill or a later one that was in flight,
// and never anything older than what a completed FLUSH covered.
func TestServeKill9(t *testing.T) {
	const (
		blocks = 16384 // 64 MiB of 4 KiB blocks
		qd     = 32
	)
	store := t.TempDir()
	s := startServer(t, store, "64MiB")
	cl, err := nbdtest.DialClient(s.sock, "torus")
	if err != nil {
		t.Fatal(err)
	}

	// content is the deterministic payload of write number seq to block b.
	content := func(b, seq uint32) []byte {
		p := make([]byte, 4096)
		r := rand.New(rand.NewPCG(uint64(b), uint64(seq)))
		for i := 8; i < 4092; i += 4 {
			binary.LittleEndian.PutUint32(p[i:], r.Uint32())
		}
		binary.LittleEndian.PutUint32(p[0:], b)
		binary.LittleEndian.PutUint32(p[4:], seq)
		binary.LittleEndian.PutUint32(p[4092:], crc32.ChecksumIEEE(p[:4092]))
		return p
	}

	type write struct {
		b, seq uint32
		done   <-chan error
	}
	acked := make([]uint32, blocks)   // highest acknowledged seq per block (0: none)
	flushed := make([]uint32, blocks) // highest seq covered by a completed flush
	issued := make([]uint32, blocks)  // highest seq issued
	r := rand.New(rand.NewPCG(7, 7))
	var inflight []write
	var seq uint32
	var flushes int
	killAt := time.Now().Add(2 * time.Second)
	killed := false
	var flushCh <-chan error
	var flushSnap []uint32
	for !killed || len(inflight) > 0 {
		if !killed && time.Now().After(killAt) {
			s.Signal(syscall.SIGKILL)
			killed = true
		}
		for !killed && len(inflight) < qd {
			seq++
			b := uint32(r.IntN(blocks))
			issued[b] = seq
			inflight = append(inflight, write{b, seq, cl.Write(uint64(b)*4096, content(b, seq))})
		}
		if flushCh == nil && !killed && seq%256 == 0 {
			flushSnap = append(flushSnap[:0], acked...)
			flushCh = cl.Flush()
		}
		w := inflight[0]
		inflight = inflight[1:]
		if err := <-w.done; err == nil {
			if w.seq > acked[w.b] {
				acked[w.b] = w.seq
			}
		} else if !killed {
			t.Fatalf("write %d failed before the kill: %v\n%s", w.seq, err, s.Log())
		}
		if flushCh != nil {
			select {
			case err := <-flushCh:
				if err == nil {
					copy(flushed, flushSnap)
					flushes++
				} else if !killed {
					t.Fatalf("flush failed before the kill: %v", err)
				}
				flushCh = nil
			default:
			}
		}
	}
	<-s.Done()
	cl.Close() // its server is dead
	if flushes < 3 {
		t.Fatalf("only %d flushes completed before the kill; the test proves nothing", flushes)
	}

	s = startServer(t, store, "64MiB")
	cl, err = nbdtest.DialClient(s.sock, "torus")
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	buf := make([]byte, 4096)
	var checked, newer int
	for b := uint32(0); b < blocks; b++ {
		if issued[b] == 0 {
			continue
		}
		if err := <-cl.Read(uint64(b)*4096, buf); err != nil {
			t.Fatalf("block %d (last acked seq %d, issued %d): read failed after restart: %v", b, acked[b], issued[b], err)
		}
		got := binary.LittleEndian.Uint32(buf[4:])
		switch {
		case got == 0 && bytes.Equal(buf, make([]byte, 4096)):
			if flushed[b] != 0 || acked[b] != 0 {
				t.Fatalf("block %d reads zeros; write %d was acknowledged (flushed %d)", b, acked[b], flushed[b])
			}
		case !bytes.Equal(buf, content(b, got)):
			t.Fatalf("block %d holds garbage (claims seq %d)", b, got)
		case got < flushed[b]:
			t.Fatalf("block %d lost flushed write %d: holds %d", b, flushed[b], got)
		case got < acked[b]:
			t.Fatalf("block %d lost acknowledged write %d: holds %d", b, acked[b], got)
		case got > issued[b]:
			t.Fatalf("block %d holds seq %d that was never issued to it", b, got)
		}
		if got > acked[b] {
			newer++
		}
		checked++
	}
	t.Logf("%d writes, %d flushes before kill -9; %d blocks verified (%d hold an in-flight write)", seq, flushes, checked, newer)
	s.Stop(t)
}

func TestServeErrors(t *testing.T) {
	dir := t.TempDir()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	notDir := filepath.Join(dir, "file")
	os.WriteFile(notDir, nil, 0o600)

	cases := []struct {
		name string
		args []string
		want string
		code int
	}{
		{"no flags", []string{"serve"}, "--store, --size and --listen are required", 2},
		{"bad size", []string{"serve", "--store", dir, "--size", "lots", "--listen", "unix:" + dir + "/s"}, "not a size", 2},
		{"zero size", []string{"serve", "--store", dir, "--size", "0", "--listen", "unix:" + dir + "/s"}, "positive multiple of 4 KiB", 2},
		{"unaligned size", []string{"serve", "--store", dir, "--size", "1000", "--listen", "unix:" + dir + "/s"}, "multiple of 4 KiB", 2},
		{"store under a file", []string{"serve", "--store", notDir + "/x", "--size", "1GiB", "--listen", "unix:" + dir + "/s"}, "cannot create the directory", 1},
		{"port in use", []string{"serve", "--store", dir, "--size", "1GiB", "--listen", "tcp:" + l.Addr().String()}, "in use", 1},
		{"bad listen", []string{"serve", "--store", dir, "--size", "1GiB", "--listen", "http://x"}, "unix:PATH or tcp:HOST:PORT", 1},
		{"unknown command", []string{"frobnicate"}, "unknown command", 2},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			code := runWithTimeout(t, c.args, &stdout, &stderr)
			if code != c.code || !strings.Contains(stderr.String(), c.want) {
				t.Fatalf("torusblk %v: exit %d, stderr %q; want exit %d mentioning %q", c.args, code, stderr.String(), c.code, c.want)
			}
		})
	}

	// A store made for one size refuses another.
	store := t.TempDir()
	s := startServer(t, store, "64MiB")
	s.Stop(t)
	var stdout, stderr bytes.Buffer
	code := runWithTimeout(t, []string{"serve", "--store", store, "--size", "128MiB", "--listen", "unix:" + filepath.Join(dir, "s2")}, &stdout, &stderr)
	if code != 1 || !strings.Contains(stderr.String(), "64 MiB") {
		t.Fatalf("reopening a 64 MiB store with --size 128MiB: exit %d, %q; want an error naming 64 MiB", code, stderr.String())
	}
}

func runWithTimeout(t *testing.T, args []string, stdout, stderr *bytes.Buffer) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, torusblkBin, args...)
	cmd.Stdout, cmd.Stderr = stdout, stderr
	err := cmd.Run()
	if ctx.Err() != nil {
		t.Fatalf("torusblk %v did not exit within 30s", args)
	}
	if ee, ok := err.(*exec.ExitError); ok {
		return ee.ExitCode()
	}
	if err != nil {
		t.Fatal(err)
	}
	return 0
}
