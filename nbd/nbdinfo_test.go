package nbd

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

// TestNbdinfo checks interoperability with libnbd's nbdinfo. The project's
// test setup installs it (apt package libnbd-bin); a missing binary fails.
func TestNbdinfo(t *testing.T) {
	bin, err := exec.LookPath("nbdinfo")
	if err != nil {
		t.Fatalf("nbdinfo not found (install libnbd-bin): %v", err)
	}
	v := newMemVolume(testVolSize)
	path := startServer(t, oneExport(v), Options{})
	uri := "nbd+unix:///?socket=" + path
	run := func(args ...string) ([]byte, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		return exec.CommandContext(ctx, bin, append(args, uri)...).CombinedOutput()
	}
	out, err := run("--json")
	if err != nil {
		t.Fatalf("nbdinfo --json: %v\n%s", err, out)
	}
	var info struct {
		Exports []struct {
			Name      string `json:"export-name"`
			Size      int64  `json:"export-size"`
			ReadOnly  bool   `json:"is_read_only"`
			CanFlush  bool   `json:"can_flush"`
			CanFUA    bool   `json:"can_fua"`
			CanTrim   bool   `json:"can_trim"`
			CanZero   bool   `json:"can_zero"`
			MultiConn bool   `json:"can_multi_conn"`
			MinBlock  int    `json:"block_size_minimum"`
			PrefBlock int    `json:"block_size_preferred"`
			MaxBlock  int    `json:"block_size_maximum"`
		} `json:"exports"`
	}
	if err := json.Unmarshal(out, &info); err != nil {
		t.Fatalf("parsing nbdinfo --json: %v\n%s", err, out)
	}
	if len(info.Exports) != 1 {
		t.Fatalf("nbdinfo exports: %s", out)
	}
	e := info.Exports[0]
	if e.Size != testVolSize || e.ReadOnly || !e.CanFlush || !e.CanFUA || !e.CanTrim || !e.CanZero || !e.MultiConn ||
		e.MinBlock != 4096 || e.PrefBlock != 4096 || e.MaxBlock != defaultMaxPayload {
		t.Errorf("nbdinfo --json: %+v\n%s", e, out)
	}
	for _, can := range []string{"flush", "fua", "trim", "zero", "multi-conn"} {
		out, err := run("--can", can)
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			t.Errorf("nbdinfo --can %s: exit %d\n%s", can, ee.ExitCode(), out)
		} else if err != nil {
			t.Errorf("nbdinfo --can %s: %v", can, err)
		}
	}
	// A capability we do not offer must be reported false (exit 2).
	out, err = run("--can", "cache")
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 2 {
		t.Errorf("nbdinfo --can cache: %v\n%s", err, out)
	}
}

// TestNbdcopy round-trips random data through the server with libnbd's
// nbdcopy, which uses several connections (multi-conn) and many requests in
// flight on each. nbdcopy ships in libnbd-bin alongside nbdinfo.
func TestNbdcopy(t *testing.T) {
	bin, err := exec.LookPath("nbdcopy")
	if err != nil {
		t.Fatalf("nbdcopy not found (install libnbd-bin): %v", err)
	}
	const size = 16 << 20
	v := newMemVolume(size)
	path := startServer(t, oneExport(v), Options{})
	uri := "nbd+unix:///?socket=" + path
	dir := t.TempDir()
	src, dst := filepath.Join(dir, "src"), filepath.Join(dir, "dst")
	data := make([]byte, size)
	rng := rand.New(rand.NewPCG(3, 4))
	for i := 0; i < len(data); i += 8 {
		binary.LittleEndian.PutUint64(data[i:], rng.Uint64())
	}
	clear(data[4<<20 : 6<<20]) // a zero run, which nbdcopy may send as write-zeroes
	if err := os.WriteFile(src, data, 0o600); err != nil {
		t.Fatal(err)
	}
	run := func(args ...string) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		if out, err := exec.CommandContext(ctx, bin, args...).CombinedOutput(); err != nil {
			t.Fatalf("nbdcopy %v: %v\n%s", args, err, out)
		}
	}
	run("--connections=4", "--requests=64", "--flush", src, uri)
	v.mu.Lock()
	same := bytes.Equal(v.data, data)
	flushes := v.flushes
	v.mu.Unlock()
	if !same {
		t.Fatal("volume differs from the source after nbdcopy upload")
	}
	if flushes == 0 {
		t.Error("nbdcopy --flush sent no NBD_CMD_FLUSH")
	}
	run("--connections=4", "--requests=64", uri, dst)
	got, err := os.ReadFile(dst)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatal("downloaded data differs")
	}
}
