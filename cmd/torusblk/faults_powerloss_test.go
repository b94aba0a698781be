//go:build faults

package main

import (
	"bytes"
	"path/filepath"
	"testing"

	"github.com/torus-storage/torus/internal/nbdtest"
	"github.com/torus-storage/torus/store"
)

// TestFaultPowerLossNewHolder: a client writes without a flush, is killed,
// and one replica then loses power (its unflushed writes are undone by the
// store's power-loss hook). The other replica holds the writes; a new
// holder that prefers the replica that lost them must still read them,
// although it never saw that node before its restart.
func TestFaultPowerLossNewHolder(t *testing.T) {
	c := startCluster(t, 2)
	c.Ctl("volume", "create", "vol", "--size", "16MiB", "--replication", "2")
	victim := c.Nodes[1]
	plog := filepath.Join(t.TempDir(), "powerloss")
	victim.Proc.Stop(t)
	c.StartNode(victim, store.PowerLogEnv+"="+plog)
	c.WaitNodes(2)

	s, sock := c.serve("vol", "--lease-ttl", "2s")
	cl, err := nbdtest.DialClient(sock, "torus")
	if err != nil {
		t.Fatal(err)
	}
	const blocks = 64 // 4 chunks' worth of 64 KiB strides
	offs := make([]uint64, blocks)
	for i := range offs {
		offs[i] = uint64(i) * (256 << 10)
	}
	for gen := uint32(1); gen <= 2; gen++ {
		for _, off := range offs {
			if err := <-cl.Write(off, block(off, gen)); err != nil {
				t.Fatalf("write gen %d at %d: %v", gen, off, err)
			}
		}
		if gen == 1 {
			if err := <-cl.Flush(); err != nil {
				t.Fatal(err)
			}
		}
	}
	// Generation 2 is acknowledged by both replicas, not flushed.
	cl.Close()
	s.Kill()

	victim.Proc.Kill()
	c.StartNode(victim, store.PowerLogEnv+"="+plog, store.PowerLossEnv+"=1")
	victim.Proc.WaitLog(t, "node ready") // back after the power loss
	if !bytes.Contains([]byte(victim.Proc.Log()), []byte("power-loss fault: undid")) {
		t.Fatalf("%s restarted without undoing any write:\n%s", victim.ID, victim.Proc.Log())
	}

	s, sock = c.reattach("vol", "--local-node", victim.ID)
	cl, err = nbdtest.DialClient(sock, "torus")
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 4096)
	stale := 0
	for _, off := range offs {
		if err := <-cl.Read(off, got); err != nil {
			t.Fatalf("read at %d: %v", off, err)
		}
		switch {
		case bytes.Equal(got, block(off, 2)):
		case bytes.Equal(got, block(off, 1)):
			stale++
		default:
			t.Fatalf("block at %d reads neither generation: %x...", off, got[:16])
		}
	}
	cl.Close()
	if stale > 0 {
		t.Fatalf("%d of %d blocks read the generation before the acknowledged one: the new holder read %s's copy, which lost them in the power loss",
			stale, blocks, victim.ID)
	}
	s.Stop(t)
}
