package nbd

import (
	"context"
	"encoding/json"
	"errors"
	"os/exec"
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
