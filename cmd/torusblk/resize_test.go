package main

import (
	"strings"
	"testing"
)

// TestClusterServeResize: torusblk serve of a cluster volume, torusd
// processes, a resize with torusctl: the server sees the new size (its log
// and its device record say so, and torusctl prints that new connections
// get it), a new connection's handshake gives the new size, fio verify
// works past the old end, and what was written before still verifies.
func TestClusterServeResize(t *testing.T) {
	needTool(t, "fio")
	c := startCluster(t, 3)
	c.Ctl("volume", "create", "gr", "--size", "16MiB", "--replication", "2")
	s, sock := c.serve("gr")
	defer s.Stop(t)
	first := []string{"--rw=randwrite", "--iodepth=16", "--size=16M", "--number_ios=600"}
	fioVerify(t, sock, append(first, "--do_verify=1")...)

	out := c.Ctl("volume", "resize", "gr", "--size", "40MiB")
	if !strings.Contains(out, "volume gr is now 40 MiB") || !strings.Contains(out, "gives 40 MiB to new connections") {
		t.Fatalf("torusctl volume resize:\n%s", out)
	}
	if !strings.Contains(s.Log(), "the volume grew: new NBD connections get the new size") {
		t.Fatalf("serve did not log the growth:\n%s", s.Log())
	}
	// fio's nbd engine takes the export size from the handshake: a job
	// from 16 MiB to 40 MiB fails on a connection that still has 16 MiB.
	fioVerify(t, sock, "--rw=randwrite", "--iodepth=16", "--offset=16M", "--size=24M", "--do_verify=1", "--number_ios=800")
	fioVerify(t, sock, append(first, "--verify_only=1")...)
}
