package blockdev

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/torus-storage/torus/engine"
)

func TestValidScheduler(t *testing.T) {
	for _, name := range []string{"none", "kernel", "mq-deadline", "bfq", "kyber", "a_b-9"} {
		if !ValidScheduler(name) {
			t.Errorf("ValidScheduler(%q) = false, want true", name)
		}
	}
	for _, name := range []string{"", "None", "mq deadline", "../x", "none\n", "[none]", strings.Repeat("a", 33)} {
		if ValidScheduler(name) {
			t.Errorf("ValidScheduler(%q) = true, want false", name)
		}
	}
	if err := setIOScheduler("/dev/ublkb0", "../x"); err == nil || !strings.Contains(err.Error(), "not a scheduler name") {
		t.Errorf("setIOScheduler of a malformed name: %v", err)
	}
}

// TestStateFile: a state file keeps the layout torusblk has always written
// (recover reads files of a server started before an upgrade), List reads
// it back, and an empty or missing run dir lists nothing (JSON null).
func TestStateFile(t *testing.T) {
	dir := t.TempDir()
	if l, err := List(filepath.Join(dir, "missing")); err != nil || l != nil {
		t.Fatalf("List of a missing dir = %v, %v; want nil, nil", l, err)
	}
	cl := State{Device: "/dev/ublkb3", Mode: ModeUblk, ID: 3, Size: 1 << 30, PID: 42, Queues: 2, Depth: 64,
		Source: Source{Volume: "v", Etcd: "http://e:2379", Prefix: "/p", TLSDir: "/tls", TTL: "10s", ReplicaTimeout: "5s"}}
	lo := State{Device: "/dev/nbd1", Mode: ModeNBD, ID: 1, Size: 1 << 20, PID: 43, Source: Source{Store: "/s/volume.store"}}
	for _, s := range []State{cl, lo} {
		if err := s.save(dir); err != nil {
			t.Fatal(err)
		}
	}
	b, err := os.ReadFile(filepath.Join(dir, "ublkb3.json"))
	if err != nil {
		t.Fatal(err)
	}
	var raw map[string]any
	if err := json.Unmarshal(b, &raw); err != nil {
		t.Fatal(err)
	}
	want := map[string]any{"device": "/dev/ublkb3", "mode": "ublk", "id": 3.0, "volume": "v", "etcd": "http://e:2379",
		"prefix": "/p", "tls_dir": "/tls", "lease_ttl": "10s", "replica_timeout": "5s", "size": float64(1 << 30),
		"pid": 42.0, "queues": 2.0, "depth": 64.0}
	if !reflect.DeepEqual(raw, want) {
		t.Fatalf("state file:\n%s\nwant the fields %v", b, want)
	}
	if err := os.WriteFile(filepath.Join(dir, "junk.json"), []byte("{"), 0o644); err != nil {
		t.Fatal(err)
	}
	l, err := List(dir)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(l, []State{lo, cl}) {
		t.Fatalf("List = %+v, want %+v", l, []State{lo, cl})
	}
	if cl.Source.String() != "cluster:v" || lo.Source.String() != "/s/volume.store" {
		t.Fatalf("Source.String: %q, %q", cl.Source.String(), lo.Source.String())
	}
}

// TestRecoverRefuses: Recover names what is wrong, before it opens the
// volume, for a device with no state file, one attached over NBD and one
// whose server still runs.
func TestRecoverRefuses(t *testing.T) {
	dir := t.TempDir()
	live := exec.Command("sleep", "60")
	if err := live.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { live.Process.Kill(); live.Wait() }()
	for _, s := range []State{
		{Device: "/dev/nbd0", Mode: ModeNBD, PID: 1 << 30},
		{Device: "/dev/ublkb1", Mode: ModeUblk, ID: 1, PID: live.Process.Pid},
	} {
		if err := s.save(dir); err != nil {
			t.Fatal(err)
		}
	}
	open := func(context.Context, State) (engine.Volume, error) {
		t.Fatal("Recover opened the volume")
		return nil, nil
	}
	for dev, want := range map[string]string{
		"/dev/ublkb9": "/dev/ublkb9 was not attached by torusblk",
		"/dev/nbd0":   "/dev/nbd0 is attached over nbd; only ublk devices can be recovered",
		"/dev/ublkb1": "/dev/ublkb1 is still served by process",
	} {
		if _, err := Recover(context.Background(), dev, dir, open, nil); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Recover %s: %v, want %q", dev, err, want)
		}
	}
	if err := Detach("/dev/ublkb9", dir, 0, nil); err == nil || !strings.Contains(err.Error(), "was not attached by torusblk") {
		t.Errorf("Detach of an unknown device: %v", err)
	}
}

// TestServerAlive: a state names a live server by PID and start time; a
// process that reuses the PID, a zombie and a gone process are not it.
func TestServerAlive(t *testing.T) {
	me := State{Device: "/dev/ublkb9", PID: os.Getpid()}
	if err := me.save(t.TempDir()); err != nil {
		t.Fatal(err)
	}
	if me.Start == 0 || !me.ServerAlive() {
		t.Fatalf("this process, start %d: alive %v", me.Start, me.ServerAlive())
	}
	reused := me
	reused.Start++ // the PID now belongs to a process started later
	if reused.ServerAlive() {
		t.Fatal("a process whose start time differs counts as the server")
	}
	cmd := exec.Command("sleep", "60")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	child := State{PID: cmd.Process.Pid}
	if !child.ServerAlive() {
		t.Fatal("a running child is not alive")
	}
	cmd.Process.Kill()
	for i := 0; child.ServerAlive(); i++ { // a zombie until reaped
		if i > 100 {
			t.Fatal("a killed, unreaped child still counts as alive")
		}
		time.Sleep(10 * time.Millisecond)
	}
	cmd.Wait()
	if child.ServerAlive() {
		t.Fatal("a reaped child counts as alive")
	}
}
