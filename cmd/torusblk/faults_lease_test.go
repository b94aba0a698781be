//go:build faults

package main

import (
	"bytes"
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/torus-storage/torus/internal/nbdtest"
	"github.com/torus-storage/torus/internal/tcpproxy"
	"github.com/torus-storage/torus/internal/testcluster"
)

// TestFaultEtcdOutageLease: after an etcd outage longer than the attach
// lease, the holder takes its lock back (with the same epoch: nobody else
// attached), so a second attach is still refused, the data verifies, and it
// exits cleanly on SIGTERM (the release reaches etcd).
func TestFaultEtcdOutageLease(t *testing.T) {
	needTool(t, "fio")
	c := startCluster(t, 3)
	c.Ctl("volume", "create", "vol", "--size", "32MiB", "--replication", "3")
	s, sock := c.serve("vol", "--lease-ttl", "2s")
	fioWriteVerify(t, sock, "0", "4M")
	epoch, err := c.Meta.Epoch(context.Background(), "vol")
	if err != nil {
		t.Fatal(err)
	}
	c.StopEtcd()
	fioWriteVerify(t, sock, "4M", "4M")
	time.Sleep(10 * time.Second) // five lease TTLs without etcd
	if err := c.RestartEtcd(context.Background()); err != nil {
		t.Fatal(err)
	}
	c.WaitNodes(3)
	time.Sleep(6 * time.Second) // three lease TTLs with etcd back
	if p, _ := c.tryServe("vol"); p != nil {
		t.Fatalf("a second serve attached vol while the first still serves it\n%s", s.Log())
	}
	if !strings.Contains(s.Log(), "attach lock taken back") {
		t.Fatalf("the holder did not log taking its lock back\n%s", s.Log())
	}
	if e, err := c.Meta.Epoch(context.Background(), "vol"); err != nil || e != epoch {
		t.Fatalf("epoch after the lock was taken back: %d, %v; want the same %d", e, err, epoch)
	}
	fioVerifyOnly(t, sock, "0", "8M")
	fioWriteVerify(t, sock, "8M", "4M")
	s.Stop(t)
}

// TestFaultLeaseLostOtherHolder: client A is cut off from etcd (a proxy
// between it and etcd drops every connection) past its attach lease; B
// attaches, writes, flushes and detaches; then A reaches etcd again. A must
// not take the volume back: every write and read of A fails with EIO from
// then on, A logs the epoch that replaced its own, the epoch in etcd stays
// B's, and B's data is what a later holder reads.
func TestFaultLeaseLostOtherHolder(t *testing.T) {
	c := startCluster(t, 3)
	c.Ctl("volume", "create", "vol", "--size", "16MiB", "--replication", "3")
	px := tcpproxy.Start(t, c.Endpoint)
	a, asock := c.serve("vol", "--etcd", px.URL(), "--lease-ttl", "2s")
	ac, err := nbdtest.DialClient(asock, "torus")
	if err != nil {
		t.Fatalf("%v\n%s", err, a.Log())
	}
	defer ac.Close()
	pat := func(b byte) []byte { return bytes.Repeat([]byte{b}, 4096) }
	if err := <-ac.Write(0, pat('A')); err != nil {
		t.Fatalf("A's first write: %v\n%s", err, a.Log())
	}
	if err := <-ac.Flush(); err != nil {
		t.Fatalf("A's first flush: %v\n%s", err, a.Log())
	}
	ctx := context.Background()
	epochA, err := c.Meta.Epoch(ctx, "vol")
	if err != nil {
		t.Fatal(err)
	}

	// A loses etcd; B attaches once A's lease has expired.
	px.Cut()
	var b *testcluster.Proc
	var bsock string
	deadline := time.Now().Add(30 * time.Second)
	for {
		if b, bsock = c.tryServe("vol"); b != nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("B could not attach within 30s of cutting A off etcd\n%s", a.Log())
		}
		time.Sleep(300 * time.Millisecond)
	}
	epochB, err := c.Meta.Epoch(ctx, "vol")
	if err != nil || epochB <= epochA {
		t.Fatalf("epoch after B attached: %d, %v; want above A's %d", epochB, err, epochA)
	}
	bc, err := nbdtest.DialClient(bsock, "torus")
	if err != nil {
		t.Fatal(err)
	}
	for _, off := range []uint64{0, 8192} {
		if err := <-bc.Write(off, pat('B')); err != nil {
			t.Fatalf("B's write at %d: %v\n%s", off, err, b.Log())
		}
	}
	if err := <-bc.Flush(); err != nil {
		t.Fatalf("B's flush: %v\n%s", err, b.Log())
	}
	bc.Close()
	b.Stop(t) // B detaches: the lock is free again

	// A reaches etcd again and its lock keeper acts: wait for its verdict.
	px.Heal()
	healed := time.Now()
	deadline = time.Now().Add(60 * time.Second)
	for !strings.Contains(a.Log(), "attach lock taken") &&
		!strings.Contains(a.Log(), "fenced for good") {
		if a.Exited() {
			t.Fatalf("A exited\n%s", a.Log())
		}
		if time.Now().After(deadline) {
			t.Fatalf("A's lock keeper did nothing within 60s of etcd coming back\n%s", a.Log())
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Logf("A's lock keeper decided %v after etcd came back", time.Since(healed).Round(time.Millisecond))
	for _, l := range strings.Split(a.Log(), "\n") {
		if strings.Contains(l, "fenced for good") {
			t.Log(l)
		}
	}
	if err := <-ac.Write(0, pat('C')); err == nil {
		t.Fatalf("A wrote block 0 after B had held the volume\n%s", a.Log())
	} else if !strings.Contains(err.Error(), "nbd error 5") { // EIO
		t.Fatalf("A's write after B held the volume: %v, want EIO\n%s", err, a.Log())
	}
	if err := <-ac.Write(8192, pat('C')); err == nil {
		t.Fatalf("A wrote block 2 after B had held the volume\n%s", a.Log())
	}
	if err := <-ac.Read(0, make([]byte, 4096)); err == nil {
		t.Fatalf("A read after B had held the volume: its cache predates B's writes\n%s", a.Log())
	}
	if want := fmt.Sprintf("epoch is now %d", epochB); !strings.Contains(a.Log(), want) {
		t.Fatalf("A's log does not say why it is fenced (%q)\n%s", want, a.Log())
	}
	if e, err := c.Meta.Epoch(ctx, "vol"); err != nil || e != epochB {
		t.Fatalf("epoch after A came back: %d, %v; want B's %d", e, err, epochB)
	}

	// A holds nothing: a new holder attaches at once and reads B's data.
	d, dsock := c.tryServe("vol")
	if d == nil {
		t.Fatalf("A took the lock back after B held it\n%s", a.Log())
	}
	dc, err := nbdtest.DialClient(dsock, "torus")
	if err != nil {
		t.Fatal(err)
	}
	defer dc.Close()
	for _, off := range []uint64{0, 8192} {
		got := make([]byte, 4096)
		if err := <-dc.Read(off, got); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, pat('B')) {
			t.Fatalf("block at %d holds %q..., want B's data", off, got[:8])
		}
	}
	dc.Close()
	d.Stop(t)
	a.Stop(t)
}
