package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/torus-storage/torus/internal/testcluster"
	"github.com/torus-storage/torus/meta"
)

// Tests run the real binary against a real embedded etcd shared by the
// whole package; each test uses its own --prefix, so they are independent.
var (
	binPath  string
	endpoint string
)

func TestMain(m *testing.M) {
	os.Exit(testcluster.Main(m, testcluster.MainOptions{Build: map[string]*string{"torusctl": &binPath}, Etcd: &endpoint}))
}

// result is one run of the binary.
type result struct {
	code           int
	stdout, stderr string
}

// ctl runs torusctl with --etcd and --prefix set for the test.
func ctl(t *testing.T, args ...string) result {
	t.Helper()
	full := append([]string{"--etcd", endpoint, "--prefix", prefix(t)}, args...)
	return runBin(t, full...)
}

func runBin(t *testing.T, args ...string) result {
	t.Helper()
	cmd := exec.Command(binPath, args...)
	cmd.Env = append(os.Environ(), "TORUS_ETCD=")
	var so, se bytes.Buffer
	cmd.Stdout, cmd.Stderr = &so, &se
	err := cmd.Run()
	r := result{stdout: so.String(), stderr: se.String()}
	if err != nil {
		ee, ok := err.(*exec.ExitError)
		if !ok {
			t.Fatalf("run torusctl %q: %v", args, err)
		}
		r.code = ee.ExitCode()
	}
	return r
}

func prefix(t *testing.T) string { return "/" + t.Name() + "/" }

// must runs ctl and fails the test unless it exits 0.
func must(t *testing.T, args ...string) string {
	t.Helper()
	r := ctl(t, args...)
	if r.code != 0 {
		t.Fatalf("torusctl %q: exit %d\nstdout: %s\nstderr: %s", args, r.code, r.stdout, r.stderr)
	}
	return r.stdout
}

// fails runs ctl and fails the test unless it exits code with want in stderr.
func fails(t *testing.T, code int, want string, args ...string) {
	t.Helper()
	r := ctl(t, args...)
	if r.code != code || !strings.Contains(r.stderr, want) {
		t.Fatalf("torusctl %q: exit %d, stderr %q; want exit %d with %q", args, r.code, r.stderr, code, want)
	}
}

// initCluster runs init with replication repl and returns the CA dir.
func initCluster(t *testing.T, repl int) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "ca")
	must(t, "init", "--cluster-dir", dir, "--replication", fmt.Sprint(repl))
	return dir
}

// registerNodes registers n live nodes named idPrefix0, idPrefix1... under
// the test's prefix until the test ends.
func registerNodes(t *testing.T, idPrefix string, n int) {
	t.Helper()
	ctx := context.Background()
	s, err := meta.Open(ctx, []string{endpoint}, prefix(t), meta.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	for i := range n {
		node := meta.Node{ID: fmt.Sprintf("%s%d", idPrefix, i), Addr: fmt.Sprintf("127.0.0.1:%d", 7000+i),
			Capacity: 1 << 40, Zone: "z1", Host: fmt.Sprintf("h%d", i)}
		reg, err := s.RegisterNode(ctx, node, 10*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { reg.Close(ctx) })
	}
}

func TestInit(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ca")
	out := must(t, "--output", "json", "init", "--cluster-dir", dir, "--chunk-size", "2MiB", "--replication", "2")
	var res initResult
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		t.Fatalf("init --output json: %v\n%s", err, out)
	}
	if len(res.ClusterID) != 32 || res.ChunkSize != 2<<20 || res.Replication != 2 {
		t.Fatalf("init result %+v", res)
	}
	st, err := os.Stat(filepath.Join(dir, "ca.key"))
	if err != nil {
		t.Fatal(err)
	}
	if m := st.Mode().Perm(); m != 0o600 {
		t.Fatalf("ca.key mode %o, want 600", m)
	}
	if _, err := os.Stat(filepath.Join(dir, "ca.crt")); err != nil {
		t.Fatal(err)
	}
	key, _ := os.ReadFile(filepath.Join(dir, "ca.key"))

	// A second init is refused, whether the CA dir is the same or new, and
	// the CA is left alone.
	fails(t, 1, "already holds a cluster", "init", "--cluster-dir", dir)
	other := filepath.Join(t.TempDir(), "ca2")
	fails(t, 1, "already holds a cluster", "init", "--cluster-dir", other)
	if _, err := os.Stat(other); !os.IsNotExist(err) {
		t.Fatalf("refused init created %s: %v", other, err)
	}
	if key2, _ := os.ReadFile(filepath.Join(dir, "ca.key")); !bytes.Equal(key, key2) {
		t.Fatal("refused init changed ca.key")
	}

	out = must(t, "status", "--output", "json")
	var st2 statusResult
	if err := json.Unmarshal([]byte(out), &st2); err != nil {
		t.Fatalf("status --output json: %v\n%s", err, out)
	}
	if st2.ClusterID != res.ClusterID || st2.ChunkSize != 2<<20 || st2.Replication != 2 || st2.Volumes != 0 {
		t.Fatalf("status %+v after init %+v", st2, res)
	}
	if out := must(t, "status"); !strings.Contains(out, res.ClusterID) || !strings.Contains(out, "2 MiB") {
		t.Fatalf("status table:\n%s", out)
	}
}

// TestInitChunkSize: init refuses chunk sizes storage nodes cannot serve
// with a usage error naming the allowed ones, before it creates a CA or
// writes to etcd.
func TestInitChunkSize(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ca")
	for _, cs := range []string{"4KiB", "32KiB", "96KiB", "3MiB", "4MiB", "1GiB"} {
		fails(t, 2, "must be a power of two from 64KiB to 2MiB", "init", "--cluster-dir", dir, "--chunk-size", cs)
		if _, err := os.Stat(dir); !os.IsNotExist(err) {
			t.Fatalf("init with --chunk-size %s created %s: %v", cs, dir, err)
		}
	}
	fails(t, 1, "not initialised", "status")
	must(t, "init", "--cluster-dir", dir, "--chunk-size", "64KiB")
}

func TestInitRefusesExistingCA(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ca")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "ca.key"), []byte("old"), 0o600); err != nil {
		t.Fatal(err)
	}
	fails(t, 1, "refusing to overwrite", "init", "--cluster-dir", dir)
	if b, _ := os.ReadFile(filepath.Join(dir, "ca.key")); string(b) != "old" {
		t.Fatal("ca.key overwritten")
	}
	fails(t, 1, "run init first", "status") // etcd untouched
}

func TestVolumeLifecycle(t *testing.T) {
	initCluster(t, 1)
	registerNodes(t, "n", 1)

	must(t, "volume", "create", "vol0", "--size", "1GiB")
	fails(t, 1, "already exists", "volume", "create", "vol0", "--size", "2GiB")
	must(t, "volume", "create", "vol1", "--size", "4MiB")

	out := must(t, "volume", "list")
	if !strings.Contains(out, "vol0") || !strings.Contains(out, "vol1") || !strings.Contains(out, "1 GiB") {
		t.Fatalf("volume list:\n%s", out)
	}
	var vols []meta.Volume
	if err := json.Unmarshal([]byte(must(t, "volume", "list", "--output", "json")), &vols); err != nil {
		t.Fatal(err)
	}
	if len(vols) != 2 || vols[0].Name != "vol0" || vols[0].Size != 1<<30 || vols[1].Size != 4<<20 {
		t.Fatalf("volume list json: %+v", vols)
	}

	var info volumeResult
	if err := json.Unmarshal([]byte(must(t, "--output", "json", "volume", "info", "vol0")), &info); err != nil {
		t.Fatal(err)
	}
	if info.Name != "vol0" || info.Size != 1<<30 || info.Replication != 1 || info.Epoch != 0 {
		t.Fatalf("volume info: %+v", info)
	}
	if out := must(t, "volume", "info", "vol0"); !strings.Contains(out, "epoch:") {
		t.Fatalf("volume info table:\n%s", out)
	}

	must(t, "volume", "resize", "vol0", "--size", "2GiB")
	fails(t, 1, "only grow", "volume", "resize", "vol0", "--size", "1GiB")
	if err := json.Unmarshal([]byte(must(t, "--output", "json", "volume", "info", "vol0")), &info); err != nil {
		t.Fatal(err)
	}
	if info.Size != 2<<30 {
		t.Fatalf("size after resize and refused shrink: %d", info.Size)
	}

	must(t, "volume", "delete", "vol0")
	fails(t, 1, "not found", "volume", "info", "vol0")
	fails(t, 1, "not found", "volume", "delete", "vol0")
	if out := must(t, "volume", "list"); strings.Contains(out, "vol0") {
		t.Fatalf("vol0 listed after delete:\n%s", out)
	}
}

func TestCreateNeedsLiveNodes(t *testing.T) {
	initCluster(t, 3)
	fails(t, 1, "volume needs 3 replicas but no node is live", "volume", "create", "v", "--size", "1GiB")
	registerNodes(t, "n", 1)
	fails(t, 1, "volume needs 3 replicas but only 1 node is live: start more torusd nodes or pass --replication 1",
		"volume", "create", "v", "--size", "1GiB")
	must(t, "volume", "create", "v", "--size", "1GiB", "--replication", "1")
	fails(t, 1, "volume needs 2 replicas but only 1 node is live", "volume", "create", "w", "--size", "1GiB", "--replication", "2")

	registerNodes(t, "m", 2)
	must(t, "volume", "create", "w", "--size", "1GiB")

	var nodes []meta.Node
	if err := json.Unmarshal([]byte(must(t, "node", "list", "--output", "json")), &nodes); err != nil {
		t.Fatal(err)
	}
	if len(nodes) != 3 {
		t.Fatalf("node list: %+v", nodes)
	}
	out := must(t, "node", "list")
	if !strings.Contains(out, "ADDRESS") || !strings.Contains(out, "127.0.0.1:7000") || !strings.Contains(out, "1 TiB") {
		t.Fatalf("node list table:\n%s", out)
	}
	var rr ringResult
	if err := json.Unmarshal([]byte(must(t, "ring", "show", "--output", "json")), &rr); err != nil {
		t.Fatal(err)
	}
	if rr.Replication != 3 || rr.Version != 0 {
		t.Fatalf("ring show: %+v", rr)
	}
}

func TestUnreachable(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := "http://" + l.Addr().String()
	l.Close()
	start := time.Now()
	r := runBin(t, "--etcd", addr, "volume", "list")
	el := time.Since(start)
	want := "etcd at " + addr + " is unreachable: start etcd or pass --etcd"
	if r.code != 1 || !strings.Contains(r.stderr, want) {
		t.Fatalf("exit %d, stderr %q; want exit 1 with %q", r.code, r.stderr, want)
	}
	if el > 6*time.Second {
		t.Fatalf("unreachable etcd reported after %v", el)
	}
}

func TestUsageErrors(t *testing.T) {
	for _, args := range [][]string{
		{},
		{"bogus"},
		{"volume"},
		{"volume", "create", "v"},
		{"volume", "create", "v", "--size", "1000"},
		{"volume", "create", "--size", "1GiB"},
		{"volume", "info"},
		{"volume", "list", "--output", "yaml"},
		{"init"},
		{"init", "--cluster-dir", "x", "--chunk-size", "3000"},
		{"status", "--nope"},
	} {
		r := runBin(t, args...)
		if r.code != 2 || !strings.Contains(r.stderr, "Usage:\n  torusctl [global flags] ") || r.stdout != "" {
			t.Errorf("torusctl %q: exit %d, stderr %q; want exit 2 with a message and the usage", args, r.code, r.stderr)
		}
	}
	if r := runBin(t, "volume", "create", "--help"); r.code != 0 || !strings.Contains(r.stdout, "--size") {
		t.Errorf("volume create --help: exit %d, stdout %q", r.code, r.stdout)
	}
}

// TestHelp: --help, -h and help print the usage to stdout and exit 0.
func TestHelp(t *testing.T) {
	for _, args := range [][]string{{"--help"}, {"-h"}, {"help"}, {"--etcd", "http://x:1", "--help"}} {
		r := runBin(t, args...)
		if r.code != 0 || r.stderr != "" || !strings.Contains(r.stdout, "torusctl [global flags] volume create NAME --size SIZE") ||
			!strings.Contains(r.stdout, "--etcd URL[,URL]") {
			t.Errorf("torusctl %q: exit %d, stderr %q, stdout:\n%s", args, r.code, r.stderr, r.stdout)
		}
	}
	for _, args := range [][]string{{"help", "node", "remove"}, {"node", "remove", "-h"}} {
		if r := runBin(t, args...); r.code != 0 || r.stderr != "" || !strings.Contains(r.stdout, "--force") {
			t.Errorf("torusctl %q: exit %d, stderr %q, stdout:\n%s", args, r.code, r.stderr, r.stdout)
		}
	}
}

// TestOutputFlag: --output takes text and json, and table as before.
func TestOutputFlag(t *testing.T) {
	initCluster(t, 1)
	for _, f := range []string{"text", "table"} {
		if out := must(t, "volume", "list", "--output", f); !strings.HasPrefix(out, "NAME") {
			t.Errorf("volume list --output %s:\n%s", f, out)
		}
	}
	if out := must(t, "--output", "json", "volume", "list"); strings.TrimSpace(out) != "null" && !strings.HasPrefix(out, "[") {
		t.Errorf("volume list --output json:\n%s", out)
	}
}

func TestEtcdFromEnv(t *testing.T) {
	initCluster(t, 1)
	cmd := exec.Command(binPath, "--prefix", prefix(t), "status")
	cmd.Env = append(os.Environ(), "TORUS_ETCD="+endpoint)
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "cluster id:") {
		t.Fatalf("status with TORUS_ETCD: %v\n%s", err, out)
	}
}

func TestRingSetReplication(t *testing.T) {
	initCluster(t, 1)
	fails(t, 2, "must be a whole number of at least 1", "ring", "set-replication", "0")
	fails(t, 2, "must be a whole number of at least 1", "ring", "set-replication", "three")
	fails(t, 2, "want N", "ring", "set-replication")
	fails(t, 1, "not enough nodes for R=2: the ring has 0; add nodes first", "ring", "set-replication", "2")

	ctx := context.Background()
	s, err := meta.Open(ctx, []string{endpoint}, prefix(t), meta.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	for i := range 2 {
		if _, err := s.JoinRing(ctx, meta.Node{ID: fmt.Sprintf("n%d", i), Capacity: 1 << 30, Host: fmt.Sprint(i)}); err != nil {
			t.Fatal(err)
		}
	}
	fails(t, 1, "not enough nodes for R=3: the ring has 2; add nodes first", "ring", "set-replication", "3")
	if out := must(t, "ring", "set-replication", "2"); !strings.Contains(out, "replication is now 2 (was 1)") {
		t.Fatalf("ring set-replication 2: %q", out)
	}
	var rr ringResult
	if err := json.Unmarshal([]byte(must(t, "ring", "show", "--output", "json")), &rr); err != nil {
		t.Fatal(err)
	}
	if rr.Replication != 2 || len(rr.Nodes) != 2 {
		t.Fatalf("ring show after set-replication 2: %+v", rr)
	}
	var res map[string]int
	if err := json.Unmarshal([]byte(must(t, "--output", "json", "ring", "set-replication", "1")), &res); err != nil {
		t.Fatal(err)
	}
	if res["replication"] != 1 || res["previous"] != 2 {
		t.Fatalf("ring set-replication --output json: %v", res)
	}
}

// TestVolumeQoS: QoS limits given at create are in volume info (table and
// JSON); set-qos changes only the limits it is given; bad values are usage
// errors that name the flag and change nothing.
func TestVolumeQoS(t *testing.T) {
	initCluster(t, 1)
	registerNodes(t, "n", 1)
	out := must(t, "volume", "create", "q", "--size", "1GiB", "--replication", "1",
		"--read-iops", "1000", "--write-bps", "50MiB", "--burst", "500ms")
	if !strings.Contains(out, "qos read 1000 IOPS; write 50 MiB/s; burst 500ms") {
		t.Fatalf("volume create:\n%s", out)
	}
	info := func() meta.QoS {
		t.Helper()
		var v volumeResult
		if err := json.Unmarshal([]byte(must(t, "--output", "json", "volume", "info", "q")), &v); err != nil {
			t.Fatal(err)
		}
		return v.QoS
	}
	if q := info(); q != (meta.QoS{ReadIOPS: 1000, WriteBPS: 50 << 20, BurstMS: 500}) {
		t.Fatalf("volume info json qos: %+v", q)
	}
	out = must(t, "volume", "set-qos", "q", "--write-iops", "300", "--read-bps", "1.5GiB", "--read-iops", "0")
	if !strings.Contains(out, "volume q qos: read 1.50 GiB/s; write 300 IOPS, 50 MiB/s; burst 500ms") {
		t.Fatalf("volume set-qos:\n%s", out)
	}
	want := meta.QoS{WriteIOPS: 300, ReadBPS: 3 << 29, WriteBPS: 50 << 20, BurstMS: 500}
	if q := info(); q != want {
		t.Fatalf("after set-qos: %+v, want %+v", q, want)
	}
	if out := must(t, "volume", "info", "q"); !strings.Contains(out, "qos:") || !strings.Contains(out, "write 300 IOPS, 50 MiB/s") {
		t.Fatalf("volume info table:\n%s", out)
	}
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"--read-iops", "-5"}, `"-5": must not be negative`},
		{[]string{"--write-iops", "fast"}, `"fast": not a whole number`},
		{[]string{"--read-bps", "-1MiB"}, "read-bps"},
		{[]string{"--write-bps", "lots"}, "not a size"},
		{[]string{"--write-bps", "100"}, "--write-bps 100: below 4096 bytes per second"},
		{[]string{"--burst", "-1s"}, "--burst -1s: must not be negative"},
		{[]string{"--burst", "2m"}, "--burst 2m0s: at most 1m0s"},
		{[]string{"--burst", "1500us"}, "whole milliseconds"},
		{nil, "give at least one limit"},
	} {
		fails(t, 2, c.want, append([]string{"volume", "set-qos", "q"}, c.args...)...)
	}
	fails(t, 2, "must not be negative", "volume", "create", "bad", "--size", "1GiB", "--write-iops", "-1")
	fails(t, 1, "not found", "volume", "set-qos", "nope", "--read-iops", "1")
	if q := info(); q != want {
		t.Fatalf("after refused changes: %+v, want %+v", q, want)
	}
	var v volumeResult
	if err := json.Unmarshal([]byte(must(t, "--output", "json", "volume", "set-qos", "q", "--read-bps", "0", "--write-bps", "0", "--write-iops", "0")), &v); err != nil {
		t.Fatal(err)
	}
	if v.QoS != (meta.QoS{BurstMS: 500}) || !regexp.MustCompile(`(?m)^qos: +unlimited$`).MatchString(must(t, "volume", "info", "q")) {
		t.Fatalf("after lifting every limit: %+v\n%s", v.QoS, must(t, "volume", "info", "q"))
	}
}
