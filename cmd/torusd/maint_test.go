package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"path/filepath"
	"regexp"
	"strconv"
	"testing"
	"time"

	"github.com/torus-storage/torus/cluster"
	"github.com/torus-storage/torus/engine"
	"github.com/torus-storage/torus/internal/alignbuf"
	"github.com/torus-storage/torus/internal/metrics/metricstest"
	"github.com/torus-storage/torus/internal/testcluster"
	"github.com/torus-storage/torus/meta"
	"github.com/torus-storage/torus/netquic"
)

type reqWaiter chan error

func (w reqWaiter) Complete(_ *engine.Request, err error) { w <- err }

// volIO runs one request on v and waits for it.
func volIO(v engine.Volume, op engine.Op, off int64, buf []byte) error {
	w := make(reqWaiter, 1)
	v.Submit(&engine.Request{Op: op, Offset: off, Length: int64(len(buf)), Buf: buf, Done: w})
	return <-w
}

// clientTLS issues a client certificate of the CA in caDir.
func clientTLS(t *testing.T, caDir string) *tls.Config {
	t.Helper()
	cdir := filepath.Join(t.TempDir(), "client")
	if err := netquic.IssueCert(caDir, "client", []string{"127.0.0.1"}, cdir); err != nil {
		t.Fatal(err)
	}
	tc, err := netquic.LoadTLS(cdir)
	if err != nil {
		t.Fatal(err)
	}
	return tc.Client
}

// TestMaintenance: the cluster repairs volumes no client holds. A volume is
// written while a node is down and detached; once the node is back a node
// rebuilds what it missed. Then a node joins the ring: a node moves the
// detached volume's chunks, and a client attaching in the middle takes the
// volume over within 2 s, reads every byte and finishes the move.
func TestMaintenance(t *testing.T) {
	pfx := prefix(t)
	c := newCluster(t, pfx)
	ctx := context.Background()
	dirs := map[string]string{}
	procs := map[string]*testcluster.Proc{}
	urls := map[string]string{}
	startNode := func(id string) {
		if dirs[id] == "" {
			dirs[id] = filepath.Join(t.TempDir(), id)
		}
		p := start(t, nodeArgs(pfx, dirs[id], c.CADir, "--id", id, "--maintenance-interval", "300ms", "--maintenance-delay", "600ms",
			"--rebuild-rate", "4MiB", "--size", "256MiB", "--metrics", "127.0.0.1:0")...)
		urls[id] = p.WaitLog(t, metricsRe)
		p.WaitLog(t, `msg="node ready"`)
		procs[id] = p
	}
	for _, id := range []string{"m1", "m2", "m3"} {
		startNode(id)
	}
	const size = 32 << 20
	vol, err := c.Meta.CreateVolume(ctx, "maint", size, 2)
	if err != nil {
		t.Fatal(err)
	}
	ctls := clientTLS(t, c.CADir)
	attach := func() (*meta.AttachLease, *cluster.Volume) {
		t.Helper()
		l, err := c.Meta.Attach(ctx, "maint", "test client", 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		cl, err := cluster.Open(ctx, c.Meta, l.Volume(), cluster.Options{TLS: ctls, Epoch: l.Epoch()})
		if err != nil {
			t.Fatal(err)
		}
		return l, cl
	}
	model := make([]byte, size)
	for i := range model {
		model[i] = byte(i*7 + i>>12)
	}
	buf, err := alignbuf.Alloc(size)
	if err != nil {
		t.Fatal(err)
	}
	defer alignbuf.Free(buf)
	verify := func(cl *cluster.Volume) {
		t.Helper()
		clear(buf)
		if err := volIO(cl, engine.OpRead, 0, buf); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(buf, model) {
			t.Fatal("the volume reads back other bytes than were written")
		}
	}

	// Written with m3 down, then detached: marks for m3 stay in etcd.
	l, cl := attach()
	copy(buf, model)
	if err := volIO(cl, engine.OpWrite, 0, buf[:size/2]); err != nil {
		t.Fatal(err)
	}
	procs["m3"].Stop(t)
	for i := range model[size/2:] {
		model[size/2+i] ^= 0x5a
	}
	copy(buf, model)
	if err := volIO(cl, engine.OpWrite, size/2, buf[size/2:]); err != nil {
		t.Fatalf("degraded write: %v", err)
	}
	if err := volIO(cl, engine.OpFlush, 0, nil); err != nil {
		t.Fatal(err)
	}
	if err := cl.Close(); err != nil {
		t.Logf("close with a node down: %v", err)
	}
	l.Release(ctx)
	missed, err := c.Meta.Missed(ctx, vol.ID)
	if err != nil || len(missed["m3"]) == 0 {
		t.Fatalf("marks of m3 after a degraded write: %v %v", missed, err)
	}
	startNode("m3")
	waitWork := func(what string, done func(meta.VolumeWork) bool) {
		t.Helper()
		deadline := time.Now().Add(60 * time.Second)
		for {
			w, err := c.Meta.Work(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if done(w[vol.ID]) {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: still %+v", what, w[vol.ID])
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	waitWork("rebuild with no client", func(w meta.VolumeWork) bool { return !w.Needed() && w.Holder == "" })
	repaired := 0
	for _, p := range procs {
		if regexp.MustCompile(`msg="maintenance: volume repaired".* volume=maint`).MatchString(p.Log()) {
			repaired++
		}
	}
	if repaired == 0 {
		t.Fatal("the marks are gone but no node logged a repair")
	}

	// A node joins; a node starts moving the detached volume's chunks.
	startNode("m4")
	waitWork("maintenance of the move", func(w meta.VolumeWork) bool { return w.Maintenance })
	t0 := time.Now()
	l, cl = attach()
	took := time.Since(t0)
	t.Logf("attach during maintenance took %v", took)
	if took > 2*time.Second {
		t.Fatalf("attach during maintenance took %v, want under 2s", took)
	}
	verify(cl)
	deadline := time.Now().Add(60 * time.Second)
	for st := cl.Stats(); st.Missed > 0 || st.Moving; st = cl.Stats() {
		if time.Now().After(deadline) {
			t.Fatalf("the client did not finish the move: %+v", st)
		}
		time.Sleep(100 * time.Millisecond)
	}
	verify(cl)
	if err := cl.Close(); err != nil {
		t.Fatal(err)
	}
	l.Release(ctx)
	yielded := false
	for _, p := range procs {
		if regexp.MustCompile(`msg="maintenance: yielded the volume".* volume=maint`).MatchString(p.Log()) {
			yielded = true
		}
	}
	if !yielded {
		t.Fatal("no node logged that it yielded the volume to the client")
	}
	sum := func(name string) int {
		n := 0
		for id, u := range urls {
			if _, running := procs[id]; running {
				v, _ := strconv.Atoi(sample(t, metricstest.Scrape(t, u), name, id))
				n += v
			}
		}
		return n
	}
	// m3 restarted: its counters start again, the others' cover both jobs.
	if jobs, fin, yl := sum("torus_maintenance_jobs_total"), sum("torus_maintenance_finished_total"),
		sum("torus_maintenance_yielded_total"); jobs < 2 || fin < 1 || yl < 1 {
		t.Fatalf("maintenance metrics: jobs %d, finished %d, yielded %d; want at least 2, 1, 1", jobs, fin, yl)
	}
}
