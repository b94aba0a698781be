//go:build faults

package main

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/torus-storage/torus/meta"
)

// TestFaultEtcdOutageLease: after an etcd outage longer than the attach
// lease, the holder takes its lock back (a new epoch), so a second attach is
// still refused, the data verifies, and it exits cleanly on SIGTERM (the
// release reaches etcd).
func TestFaultEtcdOutageLease(t *testing.T) {
	needTool(t, "fio")
	c := startCluster(t, 3)
	c.ctl("volume", "create", "vol", "--size", "32MiB", "--replication", "3")
	s, sock := c.serve("vol", "--lease-ttl", "2s")
	fioWriteVerify(t, sock, "0", "4M")
	endpoint := c.etcd.Endpoint()
	c.etcd.Close()
	fioWriteVerify(t, sock, "4M", "4M")
	time.Sleep(10 * time.Second) // five lease TTLs without etcd
	// A peer port StartEmbedded picks: never the endpoint's.
	e, err := meta.StartEmbedded(context.Background(), filepath.Join(c.workDir, "etcd"), endpoint, "")
	if err != nil {
		t.Fatal(err)
	}
	// The restarted server takes the place of the stopped one (whose
	// cleanup's second Close does nothing).
	c.etcd = e
	t.Cleanup(e.Close)
	c.waitNodes(3)
	time.Sleep(6 * time.Second) // three lease TTLs with etcd back
	if p, _ := c.tryServe("vol"); p != nil {
		t.Fatalf("a second serve attached vol while the first still serves it\n%s", s.log)
	}
	fioVerifyOnly(t, sock, "0", "8M")
	s.stop(t)
}
