//go:build faults

package main

// Fault cases with degraded-mode writes, part of `make test-faults`:
// cluster.Volume completes a write on the remaining
// replicas once one does not answer, after recording in etcd which chunks
// that node missed, and brings the node up to date when it is back.
//
//   - TestFaultNodeKill: kill -9 of a node while fio writes and verifies.
//   - TestFaultNodePartition: a node partitioned away by the netquic fault
//     hook (TORUS_FAULTS_FILE) while fio writes and verifies.
//   - TestFaultTwoNodesLost: with R=3, two nodes killed in turn; the last
//     replica carries the volume.
//
// Each case checks that etcd recorded the chunks the lost node missed (the
// writes really went on without it); after the lost nodes come back, the
// data is verified with reads preferring them (--local-node), so a replica
// that missed writes must not serve stale data.

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/torus-storage/torus/internal/nbdtest"
	"github.com/torus-storage/torus/internal/testcluster"
	"github.com/torus-storage/torus/netquic"
)

// fioBackground runs a fio write+verify job on sock in the background; the
// returned channel gets nil once it verified without error.
func fioBackground(sock string, job []string) <-chan error {
	done := make(chan error, 1)
	go func() {
		args := append([]string{"--name=verify", "--ioengine=nbd", "--uri=nbd+unix:///torus?socket=" + sock,
			"--bs=4k", "--verify=crc32c", "--verify_fatal=1", "--verify_state_save=0",
			"--output-format=terse", "--terse-version=3"}, job...)
		out, err := exec.Command("fio", args...).CombinedOutput()
		if err != nil {
			done <- fmt.Errorf("fio %v: %v\n%s", job, err, out)
			return
		}
		s := string(out)
		i := strings.LastIndex(s, "3;fio")
		if i < 0 {
			done <- fmt.Errorf("fio %v: no terse output\n%s", job, s)
			return
		}
		f := strings.Split(strings.TrimSpace(s[i:]), ";")
		if len(f) < 50 || f[4] != "0" || f[6] == "0" {
			done <- fmt.Errorf("fio %v did not verify without error: %s", job, s)
			return
		}
		done <- nil
	}()
	return done
}

// duringFault runs a fio write+verify job over [off, off+size), its writes
// paced at 8 MB/s so that they last a while, and applies fault once fio has
// been writing for a moment; fio must finish without an error.
func duringFault(t *testing.T, sock, off, size string, fault func()) {
	t.Helper()
	done := fioBackground(sock, fioRegion(off, size, "--do_verify=1", "--rate=,8m"))
	time.Sleep(500 * time.Millisecond) // let fio get going: the fault lands mid-write
	select {
	case err := <-done:
		t.Fatalf("fio finished before the fault was applied (%v): the fault would not land mid-write", err)
	default:
	}
	fault()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("fio through the fault: %v", err)
		}
	case <-time.After(3 * time.Minute):
		t.Fatal("fio did not finish within 3 minutes of the fault")
	}
}

// requireMissed fails the test unless etcd records chunks of volume name
// that node id missed: the proof that the writes went on without it.
func (c *testCluster) requireMissed(t *testing.T, name, id string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	v, err := c.Meta.Volume(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	missed, err := c.Meta.Missed(ctx, v.ID)
	if err != nil {
		t.Fatal(err)
	}
	if len(missed[id]) == 0 {
		t.Fatalf("no missed chunks recorded for %s after writes without it (marks: %v)", id, missed)
	}
	t.Logf("%s missed %d chunks of %s", id, len(missed[id]), name)
}

// verifyFrom re-verifies regions with reads preferring node id.
func (c *testCluster) verifyFrom(t *testing.T, id string, regions ...[2]string) {
	t.Helper()
	s, sock := c.serve("vol", "--local-node", id)
	for _, r := range regions {
		fioVerifyOnly(t, sock, r[0], r[1])
	}
	s.Stop(t)
}

// TestFaultNodeKill: kill -9 of a node mid-write.
func TestFaultNodeKill(t *testing.T) {
	needTool(t, "fio")
	c := startCluster(t, 3)
	c.Ctl("volume", "create", "vol", "--size", "64MiB", "--replication", "3")
	s, sock := c.serve("vol")
	fioWriteVerify(t, sock, "0", "8M")
	victim := c.Nodes[2]
	duringFault(t, sock, "8M", "16M", func() { victim.Proc.Kill() })
	fioVerifyOnly(t, sock, "0", "8M")
	fioWriteVerify(t, sock, "24M", "8M")
	c.requireMissed(t, "vol", victim.ID)
	s.Stop(t)
	c.StartNode(victim)
	c.WaitNodes(3)
	c.verifyFrom(t, victim.ID, [2]string{"0", "8M"}, [2]string{"8M", "16M"}, [2]string{"24M", "8M"})
}

// TestFaultNodePartition: a node partitioned away with the netquic hook.
func TestFaultNodePartition(t *testing.T) {
	needTool(t, "fio")
	c := startCluster(t, 3)
	c.Ctl("volume", "create", "vol", "--size", "64MiB", "--replication", "3")
	victim := c.Nodes[2]
	file := c.armPartition(victim, 3)

	s, sock := c.serve("vol")
	fioWriteVerify(t, sock, "0", "8M")
	duringFault(t, sock, "8M", "16M", func() { partition(t, file, true) })
	fioVerifyOnly(t, sock, "0", "8M")
	c.requireMissed(t, "vol", victim.ID)
	partition(t, file, false)
	fioWriteVerify(t, sock, "24M", "8M")
	s.Stop(t)
	if !strings.Contains(victim.Proc.Log(), "drop=true") {
		t.Fatalf("%s never dropped a datagram: the partition did not happen\n%s", victim.ID, victim.Proc.Log())
	}
	c.verifyFrom(t, victim.ID, [2]string{"0", "8M"}, [2]string{"8M", "16M"}, [2]string{"24M", "8M"})
}

// armPartition restarts node nd with the netquic fault hook armed (its
// environment is taken when it starts) and returns the hook's file; the
// cluster has n nodes.
func (c *testCluster) armPartition(nd *testcluster.Node, n int) string {
	t := c.t
	t.Helper()
	nd.Proc.Stop(t)
	file := filepath.Join(t.TempDir(), "faults")
	if err := os.WriteFile(file, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	c.StartNode(nd, netquic.FaultsEnv+"="+file)
	c.WaitNodes(n)
	return file
}

// partition cuts the node whose hook file is file off the network, or
// heals it.
func partition(t *testing.T, file string, on bool) {
	t.Helper()
	var b []byte
	if on {
		b = []byte("drop")
	}
	if err := os.WriteFile(file, b, 0o644); err != nil {
		t.Error(err)
	}
}

// TestFaultRestartOnlyCompleteCopy: R=2. node2 is partitioned while fio
// writes, so its chunks are marked; then node1, the only complete copy of
// them, is killed -9 with writes no flush covered and started again on the
// same machine. A process restart loses nothing the kernel took: node1
// stays trusted, and once node2 is back the volume repairs to no marks with
// no client I/O but a read to wake it. (Marking node1 for what a restart
// "may have lost" left both copies marked: no copy anyone trusts, reads
// failing and rebuilds finding no source, for good.)
func TestFaultRestartOnlyCompleteCopy(t *testing.T) {
	needTool(t, "fio")
	c := startCluster(t, 2)
	c.Ctl("volume", "create", "vol", "--size", "16MiB", "--replication", "2")
	first, second := c.Nodes[0], c.Nodes[1]
	file := c.armPartition(second, 2)

	s, sock := c.serve("vol")
	fioWriteVerify(t, sock, "0", "4M")
	partition(t, file, true)
	fioWriteVerify(t, sock, "0", "4M")
	c.requireMissed(t, "vol", second.ID)

	first.Proc.Kill()
	c.StartNode(first)
	first.Proc.WaitLog(t, "node ready")
	partition(t, file, false)

	cl, err := nbdtest.DialClient(sock, "torus")
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	buf := make([]byte, 4096)
	deadline := time.Now().Add(30 * time.Second)
	for {
		err := <-cl.Read(0, buf)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("reads still fail 30 s after both nodes are back: %v\n%s", err, s.Log())
		}
		time.Sleep(200 * time.Millisecond)
	}
	c.waitNoMarks(t, "vol", time.Minute, s)
	fioVerifyOnly(t, sock, "0", "4M")
	cl.Close()
	s.Stop(t)
	for _, nd := range c.Nodes {
		c.verifyFrom(t, nd.ID, [2]string{"0", "4M"})
	}
}

// waitNoMarks waits until etcd records no missed chunk of volume name; on
// timeout it fails with the marks and the log of s.
func (c *testCluster) waitNoMarks(t *testing.T, name string, limit time.Duration, s *testcluster.Proc) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), limit)
	defer cancel()
	v, err := c.Meta.Volume(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	for {
		missed, err := c.Meta.Missed(ctx, v.ID)
		if err == nil && len(missed) == 0 {
			return
		}
		if ctx.Err() != nil {
			t.Fatalf("volume %s still has missed marks %v %v after %v:\n%s", name, missed, err, limit, s.Log())
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// TestFaultTwoNodesLost: R=3, two nodes killed in turn.
func TestFaultTwoNodesLost(t *testing.T) {
	needTool(t, "fio")
	c := startCluster(t, 3)
	c.Ctl("volume", "create", "vol", "--size", "64MiB", "--replication", "3")
	s, sock := c.serve("vol")
	fioWriteVerify(t, sock, "0", "8M")
	duringFault(t, sock, "8M", "8M", func() { c.Nodes[1].Proc.Kill() })
	duringFault(t, sock, "16M", "8M", func() { c.Nodes[2].Proc.Kill() })
	fioVerifyOnly(t, sock, "0", "24M")
	c.requireMissed(t, "vol", c.Nodes[1].ID)
	c.requireMissed(t, "vol", c.Nodes[2].ID)
	s.Stop(t)
	c.StartNode(c.Nodes[1])
	c.StartNode(c.Nodes[2])
	c.WaitNodes(3)
	for _, nd := range c.Nodes[1:] {
		c.verifyFrom(t, nd.ID, [2]string{"0", "24M"})
	}
}
