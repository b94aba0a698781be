package meta

import (
	"context"
	"errors"
	"fmt"
	"net"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/torus-storage/torus/internal/devetcd"
	"github.com/torus-storage/torus/internal/tcpproxy"
	"github.com/torus-storage/torus/ring"
)

// startEtcd runs an embedded etcd for one test.
func startEtcd(t *testing.T) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	start := time.Now()
	e, err := devetcd.Start(ctx, t.TempDir(), "", "")
	if err != nil {
		t.Fatalf("embedded etcd: %v", err)
	}
	t.Logf("embedded etcd ready in %v at %s", time.Since(start).Round(time.Millisecond), e.Endpoint())
	t.Cleanup(e.Close)
	return e.Endpoint()
}

func open(t *testing.T, ep, prefix string) *Client {
	t.Helper()
	s, err := Open(context.Background(), []string{ep}, prefix, Options{})
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func initStore(t *testing.T, ep string) *Client {
	t.Helper()
	s := open(t, ep, "")
	if err := s.Init(context.Background(), Config{ChunkSize: 1 << 20, Replication: 3}); err != nil {
		t.Fatalf("Init: %v", err)
	}
	return s
}

// eventually polls f every 50ms until it returns nil or d passes.
func eventually(t *testing.T, d time.Duration, what string, f func() error) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		err := f()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v: %v", what, d, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func TestInitConfig(t *testing.T) {
	ep := startEtcd(t)
	ctx := context.Background()
	s := open(t, ep, "/t1/")
	if _, err := s.Config(ctx); !errors.Is(err, ErrNotInitialized) {
		t.Fatalf("Config before Init: %v, want ErrNotInitialized", err)
	}
	if _, err := s.CreateVolume(ctx, "v", 1<<30, 1); !errors.Is(err, ErrNotInitialized) {
		t.Fatalf("CreateVolume before Init: %v, want ErrNotInitialized", err)
	}
	// Chunk sizes nodes cannot serve are refused, with the allowed range
	// named, and leave etcd untouched.
	for _, cs := range []uint64{0, 3, 4096, 32 << 10, 96 << 10, 3 << 20, 4 << 20, 1 << 40} {
		err := s.Init(ctx, Config{ChunkSize: cs, Replication: 1})
		if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "from 64 KiB to 2 MiB") {
			t.Fatalf("Init with chunk size %d: %v, want ErrInvalid naming the allowed range", cs, err)
		}
	}
	if _, err := s.Config(ctx); !errors.Is(err, ErrNotInitialized) {
		t.Fatalf("Config after refused Inits: %v, want ErrNotInitialized", err)
	}
	for cs := uint64(MinChunkSize); cs <= MaxChunkSize; cs *= 2 {
		if err := CheckChunkSize(cs); err != nil {
			t.Fatalf("chunk size %d refused: %v", cs, err)
		}
	}
	want := Config{ClusterID: "c1", ChunkSize: 1 << 20, Replication: 2, Created: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)}
	if err := s.Init(ctx, want); err != nil {
		t.Fatal(err)
	}
	got, err := s.Config(ctx)
	if err != nil || got != want {
		t.Fatalf("Config = %+v, %v; want %+v", got, err, want)
	}
	err = s.Init(ctx, want)
	if !errors.Is(err, ErrAlreadyInitialized) || !strings.Contains(err.Error(), "cluster c1") {
		t.Fatalf("second Init: %v, want ErrAlreadyInitialized naming cluster c1", err)
	}
	// Another client on the same prefix sees the config; another prefix does not.
	if got, err := open(t, ep, "/t1/").Config(ctx); err != nil || got.ClusterID != "c1" {
		t.Fatalf("reopened Config = %+v, %v", got, err)
	}
	if _, err := open(t, ep, "/t2/").Config(ctx); !errors.Is(err, ErrNotInitialized) {
		t.Fatalf("other prefix Config: %v, want ErrNotInitialized", err)
	}
	if _, err := Open(ctx, []string{ep}, "torus", Options{}); !errors.Is(err, ErrInvalid) {
		t.Fatalf("Open with bad prefix: %v, want ErrInvalid", err)
	}
}

func TestSchemaVersion(t *testing.T) {
	ep := startEtcd(t)
	ctx := context.Background()
	s := initStore(t, ep)
	if _, err := s.CreateVolume(ctx, "v", 1<<30, 1); err != nil {
		t.Fatal(err)
	}
	// A newer torus migrates the schema to 2.0 while we are open.
	if _, err := s.cli.Put(ctx, DefaultPrefix+"schema", "2.0"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateVolume(ctx, "w", 1<<30, 1); !errors.Is(err, ErrSchemaVersion) {
		t.Fatalf("write after schema change: %v, want ErrSchemaVersion", err)
	}
	_, err := Open(ctx, []string{ep}, "", Options{})
	if !errors.Is(err, ErrSchemaVersion) || !strings.Contains(err.Error(), `"2.0"`) {
		t.Fatalf("Open on schema 2.0: %v, want ErrSchemaVersion naming 2.0", err)
	}
	t.Logf("error: %v", err)
	// A minor version change is accepted by Open.
	if _, err := s.cli.Put(ctx, DefaultPrefix+"schema", "1.7"); err != nil {
		t.Fatal(err)
	}
	s2 := open(t, ep, "")
	if _, err := s2.CreateVolume(ctx, "w", 1<<30, 1); err != nil {
		t.Fatalf("write on schema 1.7: %v", err)
	}
}

func TestNodeRegistration(t *testing.T) {
	ep := startEtcd(t)
	ctx := context.Background()
	s := initStore(t, ep)
	n1 := Node{ID: "n1", Addr: "10.0.0.1:7000", Capacity: 1 << 40, Zone: "z1", Host: "h1"}
	r1, err := s.RegisterNode(ctx, n1, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.RegisterNode(ctx, n1, time.Second); !errors.Is(err, ErrExists) {
		t.Fatalf("duplicate registration: %v, want ErrExists", err)
	}
	// A second process registers n2, then dies without revoking.
	s2 := open(t, ep, "")
	if _, err := s2.RegisterNode(ctx, Node{ID: "n2", Addr: "10.0.0.2:7000", Capacity: 1 << 40}, time.Second); err != nil {
		t.Fatal(err)
	}
	nodes, err := s.Nodes(ctx)
	if err != nil || len(nodes) != 2 || nodes[0].ID != "n1" || nodes[1].ID != "n2" || nodes[0].Addr != n1.Addr || nodes[0].Started.IsZero() {
		t.Fatalf("Nodes = %+v, %v", nodes, err)
	}
	s2.Close()
	died := time.Now()
	eventually(t, 5*time.Second, "n2 expires", func() error {
		nodes, err := s.Nodes(ctx)
		if err != nil {
			return err
		}
		if len(nodes) != 1 || nodes[0].ID != "n1" {
			return fmt.Errorf("nodes %+v", nodes)
		}
		return nil
	})
	t.Logf("n2 expired %v after its process died", time.Since(died).Round(time.Millisecond))
	// n1 outlived several TTLs: its keepalive works.

	// The lease is lost behind n1's back: it registers again.
	old := r1.Lease()
	if _, err := s.cli.Revoke(ctx, old); err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, "n1 re-registers", func() error {
		nodes, err := s.Nodes(ctx)
		if err != nil {
			return err
		}
		if len(nodes) != 1 || r1.Lease() == old {
			return fmt.Errorf("nodes %+v, lease %x (old %x)", nodes, r1.Lease(), old)
		}
		return nil
	})
	if err := r1.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if nodes, err := s.Nodes(ctx); err != nil || len(nodes) != 0 {
		t.Fatalf("Nodes after Close = %+v, %v; want none", nodes, err)
	}
	if err := r1.Close(ctx); err != nil {
		t.Fatalf("second Close: %v", err)
	}
}

func mkRing(t *testing.T, prev *ring.Ring, ids ...string) *ring.Ring {
	t.Helper()
	var ns []ring.Node
	for _, id := range ids {
		ns = append(ns, ring.Node{ID: id, Capacity: 1 << 30})
	}
	r, err := prev.Next(ns)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func TestRingCAS(t *testing.T) {
	ep := startEtcd(t)
	ctx := context.Background()
	s := initStore(t, ep)
	s2 := open(t, ep, "")
	r0, rev, err := s.Ring(ctx)
	if err != nil || rev != 0 || r0.Len() != 0 {
		t.Fatalf("initial Ring = %v nodes, rev %d, %v", r0.Len(), rev, err)
	}
	for round := range 10 {
		cur, rev, err := s.Ring(ctx)
		if err != nil {
			t.Fatal(err)
		}
		var wg sync.WaitGroup
		errs := make([]error, 2)
		for i, st := range []*Client{s, s2} {
			next := mkRing(t, cur, "a", fmt.Sprintf("w%d-%d", i, round))
			wg.Go(func() { errs[i] = st.CASRing(ctx, rev, next) })
		}
		wg.Wait()
		won := 0
		for _, err := range errs {
			switch {
			case err == nil:
				won++
			case !errors.Is(err, ErrConflict):
				t.Fatalf("round %d: CASRing: %v", round, err)
			}
		}
		if won != 1 {
			t.Fatalf("round %d: %d writers won (%v), want exactly 1", round, won, errs)
		}
		got, grev, err := s.Ring(ctx)
		if err != nil || grev <= rev || got.Version() != cur.Version()+1 || got.Len() != 2 {
			t.Fatalf("round %d: ring v%d rev %d (was %d), %v", round, got.Version(), grev, rev, err)
		}
	}
}

func TestWatchRing(t *testing.T) {
	ep := startEtcd(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	s := initStore(t, ep)
	w := s.WatchRing(ctx)
	cur, rev, _ := s.Ring(ctx)
	const n = 30
	wrote := make(chan struct{})
	go func() {
		defer close(wrote)
		for i := range n {
			next := mkRing(t, cur, "a", fmt.Sprintf("n%d", i))
			if err := s.CASRing(ctx, rev, next); err != nil {
				t.Error(err)
				return
			}
			var err error
			if cur, rev, err = s.Ring(ctx); err != nil {
				t.Error(err)
				return
			}
		}
	}()
	var last int64
	for i := range n {
		select {
		case u := <-w:
			if u.Ring.Version() != uint64(i+1) || u.Rev <= last || u.Ring.Index(fmt.Sprintf("n%d", i)) < 0 {
				t.Fatalf("update %d: version %d rev %d (last %d)", i, u.Ring.Version(), u.Rev, last)
			}
			last = u.Rev
		case <-time.After(5 * time.Second):
			t.Fatalf("update %d not delivered", i)
		}
	}
	<-wrote
	cancel()
	for range w { // closed once ctx is done
	}
}

func TestWatchRingCompacted(t *testing.T) {
	ep := startEtcd(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	s := initStore(t, ep)
	cur, rev, _ := s.Ring(ctx)
	var first int64
	for i := range 5 {
		if err := s.CASRing(ctx, rev, mkRing(t, cur, fmt.Sprintf("n%d", i))); err != nil {
			t.Fatal(err)
		}
		cur, rev, _ = s.Ring(ctx)
		if i == 0 {
			first = rev
		}
	}
	if _, err := s.cli.Compact(ctx, rev); err != nil {
		t.Fatal(err)
	}
	// A watcher that had delivered the first ring and is behind the
	// compaction must re-read and deliver the latest ring.
	out := make(chan RingUpdate)
	go s.watchRing(ctx, out, first+1)
	select {
	case u := <-out:
		if u.Rev != rev || u.Ring.Version() != 5 {
			t.Fatalf("after compaction got v%d rev %d, want v5 rev %d", u.Ring.Version(), u.Rev, rev)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no update after compaction")
	}
	// And it keeps watching.
	if err := s.CASRing(ctx, rev, mkRing(t, cur, "x")); err != nil {
		t.Fatal(err)
	}
	select {
	case u := <-out:
		if u.Ring.Version() != 6 {
			t.Fatalf("got v%d, want v6", u.Ring.Version())
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no update after the compacted one")
	}
}

func TestVolumes(t *testing.T) {
	ep := startEtcd(t)
	ctx := context.Background()
	s := initStore(t, ep)
	a, err := s.CreateVolume(ctx, "a", 1<<30, 0)
	if err != nil || a.Replication != 3 || a.ID == 0 || a.State != VolumeReady {
		t.Fatalf("CreateVolume a = %+v, %v", a, err)
	}
	b, err := s.CreateVolume(ctx, "b", 2<<30, 2)
	if err != nil || b.ID <= a.ID {
		t.Fatalf("CreateVolume b = %+v, %v", b, err)
	}
	_, err = s.CreateVolume(ctx, "a", 1<<30, 1)
	if !errors.Is(err, ErrExists) || !strings.Contains(err.Error(), "volume a already exists") {
		t.Fatalf("duplicate: %v", err)
	}
	if _, err := s.CreateVolume(ctx, "x/y", 1, 1); !errors.Is(err, ErrInvalid) {
		t.Fatalf("name with '/': %v", err)
	}
	vols, err := s.Volumes(ctx)
	if err != nil || len(vols) != 2 || !reflect.DeepEqual(vols[0], a) || !reflect.DeepEqual(vols[1], b) {
		t.Fatalf("Volumes = %+v, %v", vols, err)
	}
	if v, err := s.Volume(ctx, "b"); err != nil || !reflect.DeepEqual(v, b) {
		t.Fatalf("Volume b = %+v, %v", v, err)
	}
	if _, err := s.Volume(ctx, "zz"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Volume zz: %v", err)
	}
	if v, err := s.ResizeVolume(ctx, "a", 4<<30); err != nil || v.Size != 4<<30 {
		t.Fatalf("grow: %+v, %v", v, err)
	}
	_, err = s.ResizeVolume(ctx, "a", 1<<30)
	if !errors.Is(err, ErrShrink) || !strings.Contains(err.Error(), "size below the current size") {
		t.Fatalf("shrink: %v", err)
	}
	if v, _ := s.Volume(ctx, "a"); v.Size != 4<<30 {
		t.Fatalf("size after refused shrink: %d", v.Size)
	}
	l, err := s.Attach(ctx, "a", "client-1", 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	err = s.DeleteVolume(ctx, "a")
	if !errors.Is(err, ErrAttached) || !strings.Contains(err.Error(), "client-1") {
		t.Fatalf("delete attached: %v", err)
	}
	if err := l.Release(ctx); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteVolume(ctx, "a"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Volume(ctx, "a"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Volume after delete: %v", err)
	}
	if err := s.DeleteVolume(ctx, "a"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("second delete: %v", err)
	}
	// A new volume of the same name gets a new id.
	a2, err := s.CreateVolume(ctx, "a", 1<<30, 1)
	if err != nil || a2.ID <= b.ID {
		t.Fatalf("recreate a = %+v, %v", a2, err)
	}
	if vols, _ := s.Volumes(ctx); len(vols) != 2 {
		t.Fatalf("Volumes after recreate = %+v", vols)
	}
}

func TestAttach(t *testing.T) {
	ep := startEtcd(t)
	ctx := context.Background()
	s := initStore(t, ep)
	if _, err := s.CreateVolume(ctx, "v", 1<<30, 1); err != nil {
		t.Fatal(err)
	}
	if e, err := s.Epoch(ctx, "v"); err != nil || e != 0 {
		t.Fatalf("Epoch before attach = %d, %v", e, err)
	}
	var last uint64
	for i := range 3 {
		l, err := s.Attach(ctx, "v", "c1", 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if l.Epoch() <= last {
			t.Fatalf("attach %d: epoch %d not above %d", i, l.Epoch(), last)
		}
		last = l.Epoch()
		_, err = s.Attach(ctx, "v", "c2", 5*time.Second)
		if !errors.Is(err, ErrAttached) || !strings.Contains(err.Error(), `"c1"`) {
			t.Fatalf("second attach: %v, want ErrAttached naming c1", err)
		}
		if e, err := s.Epoch(ctx, "v"); err != nil || e != last {
			t.Fatalf("Epoch = %d, %v; want %d", e, err, last)
		}
		if err := l.Release(ctx); err != nil {
			t.Fatal(err)
		}
		select {
		case <-l.Lost():
		case <-time.After(time.Second):
			t.Fatal("Lost not closed after Release")
		}
	}

	// The holder's process dies: its lease expires and frees the lock.
	s2 := open(t, ep, "")
	l2, err := s2.Attach(ctx, "v", "c2", time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if l2.Epoch() <= last {
		t.Fatalf("epoch %d not above %d", l2.Epoch(), last)
	}
	last = l2.Epoch()
	s2.Close()
	died := time.Now()
	var l3 *AttachLease
	eventually(t, 5*time.Second, "attach after holder died", func() error {
		l3, err = s.Attach(ctx, "v", "c3", 5*time.Second)
		return err
	})
	t.Logf("lock free %v after the holder died", time.Since(died).Round(time.Millisecond))
	if l3.Epoch() <= last {
		t.Fatalf("epoch %d not above %d", l3.Epoch(), last)
	}

	// The lease is revoked behind the holder's back: Lost fires.
	if _, err := s.cli.Revoke(ctx, l3.lease); err != nil {
		t.Fatal(err)
	}
	select {
	case <-l3.Lost():
	case <-time.After(3 * time.Second):
		t.Fatal("Lost not closed after the lease was revoked")
	}
	l4, err := s.Attach(ctx, "v", "c4", 5*time.Second)
	if err != nil || l4.Epoch() <= l3.Epoch() {
		t.Fatalf("attach after revoke: %v", err)
	}
	if err := l3.Release(ctx); err != nil {
		t.Fatalf("Release of a lost lease: %v", err)
	}
	if _, err := s.Attach(ctx, "v", "c5", 5*time.Second); !errors.Is(err, ErrAttached) {
		t.Fatalf("Release of a lost lease freed the new holder's lock: %v", err)
	}
}

func TestConcurrentAttach(t *testing.T) {
	ep := startEtcd(t)
	ctx := context.Background()
	s := initStore(t, ep)
	s2 := open(t, ep, "")
	if _, err := s.CreateVolume(ctx, "v", 1<<30, 1); err != nil {
		t.Fatal(err)
	}
	for round := range 5 {
		var wg sync.WaitGroup
		ls := make([]*AttachLease, 2)
		errs := make([]error, 2)
		for i, st := range []*Client{s, s2} {
			wg.Go(func() { ls[i], errs[i] = st.Attach(ctx, "v", fmt.Sprint("c", i), 5*time.Second) })
		}
		wg.Wait()
		won := 0
		for i, err := range errs {
			if err == nil {
				won++
				ls[i].Release(ctx)
			} else if !errors.Is(err, ErrAttached) {
				t.Fatalf("round %d: %v", round, err)
			}
		}
		if won != 1 {
			t.Fatalf("round %d: %d attaches won, want 1", round, won)
		}
	}
}

func TestUnreachable(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	u := "http://" + l.Addr().String()
	l.Close() // nothing listens there now
	start := time.Now()
	_, err = Open(context.Background(), []string{u}, "", Options{DialTimeout: 500 * time.Millisecond})
	took := time.Since(start)
	if !errors.Is(err, ErrUnreachable) || !strings.Contains(err.Error(), "etcd at "+u+" is unreachable: start etcd or pass --etcd") {
		t.Fatalf("Open: %v, want ErrUnreachable", err)
	}
	if took > 2*time.Second {
		t.Fatalf("Open took %v with a 500ms dial timeout", took)
	}
	t.Logf("%v after %v", err, took.Round(time.Millisecond))
}

// TestOutage cuts a client off etcd while the ring changes and the history
// is compacted: the watcher resumes behind the compaction, must re-read and
// deliver the latest ring; the node registration survives.
func TestOutage(t *testing.T) {
	ep := startEtcd(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	direct := initStore(t, ep)
	px := tcpproxy.Start(t, ep)
	s := open(t, px.URL(), "")
	r, err := s.RegisterNode(ctx, Node{ID: "n1", Addr: "a:1", Capacity: 1}, 3*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	w := s.WatchRing(ctx)
	cur, rev, _ := direct.Ring(ctx)
	if err := direct.CASRing(ctx, rev, mkRing(t, cur, "a")); err != nil {
		t.Fatal(err)
	}
	if u := <-w; u.Ring.Version() != 1 {
		t.Fatalf("got v%d", u.Ring.Version())
	}

	t0 := time.Now()
	px.Cut()
	for i := range 5 {
		cur, rev, _ = direct.Ring(ctx)
		if err := direct.CASRing(ctx, rev, mkRing(t, cur, "a", fmt.Sprint("n", i))); err != nil {
			t.Fatal(err)
		}
	}
	cur, rev, _ = direct.Ring(ctx)
	if _, err := direct.cli.Compact(ctx, rev); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond)
	px.Heal()

	// Versions 2-5 were compacted away while the watcher was cut off.
	select {
	case u := <-w:
		t.Logf("ring delivered %v after the cut", time.Since(t0).Round(time.Millisecond))
		if u.Ring.Version() != 6 || u.Rev != rev {
			t.Fatalf("after the outage got v%d rev %d, want v6 rev %d", u.Ring.Version(), u.Rev, rev)
		}
	case <-time.After(8 * time.Second):
		t.Fatal("watcher delivered nothing after the outage")
	}
	nodes, err := direct.Nodes(ctx)
	if err != nil || len(nodes) != 1 {
		t.Fatalf("nodes after outage %+v, %v", nodes, err)
	}
	cctx, ccancel := context.WithTimeout(ctx, 5*time.Second)
	defer ccancel()
	if err := r.Close(cctx); err != nil {
		t.Fatal(err)
	}
}

// BenchmarkOps measures metadata round trips against an embedded etcd
// (fsync included): these are control-path costs, not per-I/O ones.
func BenchmarkOps(b *testing.B) {
	ctx := context.Background()
	e, err := devetcd.Start(ctx, b.TempDir(), "", "")
	if err != nil {
		b.Fatal(err)
	}
	defer e.Close()
	s, err := Open(ctx, []string{e.Endpoint()}, "", Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	if err := s.Init(ctx, Config{ChunkSize: 1 << 20, Replication: 1}); err != nil {
		b.Fatal(err)
	}
	if _, err := s.CreateVolume(ctx, "v", 1<<30, 1); err != nil {
		b.Fatal(err)
	}
	var ns []ring.Node
	for i := range 32 {
		ns = append(ns, ring.Node{ID: fmt.Sprint("node", i), Zone: fmt.Sprint("z", i%3), Capacity: 1 << 40})
	}
	r0, _ := ring.New(nil, ring.Options{})
	r1, _ := r0.Next(ns)
	if err := s.CASRing(ctx, 0, r1); err != nil {
		b.Fatal(err)
	}
	b.Run("Volume", func(b *testing.B) {
		for b.Loop() {
			if _, err := s.Volume(ctx, "v"); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("Ring32", func(b *testing.B) {
		for b.Loop() {
			if _, _, err := s.Ring(ctx); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("CASRing32", func(b *testing.B) {
		cur, rev, _ := s.Ring(ctx)
		for b.Loop() {
			next, _ := cur.Next(ns)
			if err := s.CASRing(ctx, rev, next); err != nil {
				b.Fatal(err)
			}
			rev++ // the CAS is the only write
			cur = next
		}
	})
	b.Run("AttachRelease", func(b *testing.B) {
		for b.Loop() {
			l, err := s.Attach(ctx, "v", "bench", 5*time.Second)
			if err != nil {
				b.Fatal(err)
			}
			if err := l.Release(ctx); err != nil {
				b.Fatal(err)
			}
		}
	})
}
