package meta

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/torus-storage/torus/ring"
)

// waitLost fails the test unless l's Lost fires within 5 s.
func waitLost(t *testing.T, l *AttachLease) {
	t.Helper()
	select {
	case <-l.Lost():
	case <-time.After(5 * time.Second):
		t.Fatal("Lost not closed after the lease ended")
	}
}

// TestReattach: a holder whose lease ended takes the lock back with the
// same epoch while nobody else attached (also when etcd still has its old
// lease), and never once someone else did, even after that one detached.
func TestReattach(t *testing.T) {
	ep := startEtcd(t)
	ctx := context.Background()
	s := initStore(t, ep)
	s2 := open(t, ep, "")
	if _, err := s.CreateVolume(ctx, "v", 1<<30, 1); err != nil {
		t.Fatal(err)
	}
	l1, err := s.Attach(ctx, "v", "c1", 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	epoch := l1.Epoch()

	// The lease ends (as after an etcd outage longer than the TTL).
	if _, err := s.cli.Revoke(ctx, l1.lease); err != nil {
		t.Fatal(err)
	}
	waitLost(t, l1)
	l2, err := l1.Reattach(ctx, 5*time.Second)
	if err != nil {
		t.Fatalf("Reattach with nobody attached in between: %v", err)
	}
	if l2.Epoch() != epoch {
		t.Fatalf("Reattach epoch %d, want the same %d", l2.Epoch(), epoch)
	}
	if e, err := s.Epoch(ctx, "v"); err != nil || e != epoch {
		t.Fatalf("epoch in etcd after Reattach = %d, %v; want %d", e, err, epoch)
	}
	if _, err := s2.Attach(ctx, "v", "c2", 5*time.Second); !errors.Is(err, ErrAttached) || !strings.Contains(err.Error(), `"c1"`) {
		t.Fatalf("attach while reattached: %v, want ErrAttached naming c1", err)
	}

	// Only the keepalive ends: etcd still holds the lock under the old
	// lease, which Reattach revokes and replaces.
	l2.stop()
	waitLost(t, l2)
	l3, err := l2.Reattach(ctx, 5*time.Second)
	if err != nil || l3.Epoch() != epoch {
		t.Fatalf("Reattach over its own live lease: %v (epoch %d, want %d)", err, l3.Epoch(), epoch)
	}
	if _, err := s2.Attach(ctx, "v", "c2", 5*time.Second); !errors.Is(err, ErrAttached) {
		t.Fatalf("attach while reattached: %v, want ErrAttached", err)
	}

	// Someone else attaches while the lease is lost, and detaches again.
	if _, err := s.cli.Revoke(ctx, l3.lease); err != nil {
		t.Fatal(err)
	}
	waitLost(t, l3)
	l4, err := s2.Attach(ctx, "v", "c2", 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	_, err = l3.Reattach(ctx, 5*time.Second)
	if !errors.Is(err, ErrNotHolder) || !strings.Contains(err.Error(), `"c2"`) {
		t.Fatalf("Reattach while c2 holds it: %v, want ErrNotHolder naming c2", err)
	}
	if err := l4.Release(ctx); err != nil {
		t.Fatal(err)
	}
	_, err = l3.Reattach(ctx, 5*time.Second)
	want := fmt.Sprintf("epoch is now %d", l4.Epoch())
	if !errors.Is(err, ErrNotHolder) || !strings.Contains(err.Error(), want) {
		t.Fatalf("Reattach after c2 came and went: %v, want ErrNotHolder saying %q", err, want)
	}
	l5, err := s2.Attach(ctx, "v", "c3", 5*time.Second)
	if err != nil || l5.Epoch() != l4.Epoch()+1 {
		t.Fatalf("attach after the refused Reattach: %v (epoch %d, want %d)", err, l5.Epoch(), l4.Epoch()+1)
	}
	l5.Release(ctx)

	// A volume deleted meanwhile is not taken back either.
	if err := s.DeleteVolume(ctx, "v"); err != nil {
		t.Fatal(err)
	}
	if _, err := l3.Reattach(ctx, 5*time.Second); !errors.Is(err, ErrNotHolder) || !errors.Is(err, ErrNotFound) {
		t.Fatalf("Reattach of a deleted volume: %v, want ErrNotHolder and ErrNotFound", err)
	}
}

// TestGuarded: the writes of a client guarded by an attach lease succeed
// while it holds the lock, fail with ErrLeaseLost while the lease is lost
// and nobody attached, follow a Reattach, and fail with ErrNotHolder and
// change nothing once another holder attached.
func TestGuarded(t *testing.T) {
	ep := startEtcd(t)
	ctx := context.Background()
	s := initStore(t, ep)
	s2 := open(t, ep, "")
	v, err := s.CreateVolume(ctx, "v", 1<<30, 1)
	if err != nil {
		t.Fatal(err)
	}
	l1, err := s.Attach(ctx, "v", "c1", 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	g := s.Guarded(l1)
	if err := g.MarkMissed(ctx, v.ID, "n1", 1, 2); err != nil {
		t.Fatalf("guarded MarkMissed while holding the lock: %v", err)
	}
	if err := g.ClearMissed(ctx, v.ID, "n1", 2); err != nil {
		t.Fatalf("guarded ClearMissed while holding the lock: %v", err)
	}
	// The guard does not hide the callers' own conditions.
	if err := g.MarkMissed(ctx, v.ID+1, "n1", 1); !errors.Is(err, ErrNotFound) {
		t.Fatalf("guarded MarkMissed of a missing volume: %v, want ErrNotFound", err)
	}

	if _, err := s.cli.Revoke(ctx, l1.lease); err != nil {
		t.Fatal(err)
	}
	waitLost(t, l1)
	if err := g.MarkMissed(ctx, v.ID, "n1", 3); !errors.Is(err, ErrLeaseLost) {
		t.Fatalf("guarded MarkMissed with the lease lost: %v, want ErrLeaseLost", err)
	}
	l2, err := l1.Reattach(ctx, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if err := g.MarkMissed(ctx, v.ID, "n1", 3); err != nil {
		t.Fatalf("guarded MarkMissed after Reattach: %v", err)
	}

	// Another holder attaches: every guarded write is refused.
	if _, err := s.cli.Revoke(ctx, l2.lease); err != nil {
		t.Fatal(err)
	}
	waitLost(t, l2)
	l3, err := s2.Attach(ctx, "v", "c2", 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	r, err := ring.New([]ring.Node{{ID: "n1", Capacity: 1}}, ring.Options{})
	if err != nil {
		t.Fatal(err)
	}
	for what, err := range map[string]error{
		"MarkMissed":  g.MarkMissed(ctx, v.ID, "n2", 7),
		"ClearMissed": g.ClearMissed(ctx, v.ID, "n1", 1),
		"SetProgress": g.SetProgress(ctx, v.ID, Progress{Kind: ProgressRebuild, Total: 9}),
		"SetMoves":    g.SetMoves(ctx, v.ID, []*ring.Ring{r}),
	} {
		if !errors.Is(err, ErrNotHolder) || !strings.Contains(err.Error(), `"c2"`) {
			t.Fatalf("guarded %s after c2 attached: %v, want ErrNotHolder naming c2", what, err)
		}
	}
	m, err := s.Missed(ctx, v.ID)
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(m) != "map[n1:[1 3]]" {
		t.Fatalf("marks after refused writes: %v, want map[n1:[1 3]]", m)
	}
	if p, err := s.Progress(ctx); err != nil || len(p) != 0 {
		t.Fatalf("progress after a refused write: %v, %v", p, err)
	}
	if mv, err := s.Moves(ctx, v.ID); err != nil || mv != nil {
		t.Fatalf("moves after a refused write: %v, %v", mv, err)
	}
	// The new holder's guarded writes go through.
	if err := s2.Guarded(l3).MarkMissed(ctx, v.ID, "n2", 7); err != nil {
		t.Fatalf("the new holder's guarded MarkMissed: %v", err)
	}
	// After it detached, the old guard still refuses (the epoch moved on).
	if err := l3.Release(ctx); err != nil {
		t.Fatal(err)
	}
	if err := g.MarkMissed(ctx, v.ID, "n2", 8); !errors.Is(err, ErrNotHolder) {
		t.Fatalf("guarded MarkMissed after c2 detached: %v, want ErrNotHolder", err)
	}
}

// TestAttachAfter: a holder resuming a device of epoch E (AttachAfter) gets
// the volume while no other client attached it since, storage nodes'
// maintenance locks in between included, and never once another client
// did, even after that client released it.
func TestAttachAfter(t *testing.T) {
	ep := startEtcd(t)
	ctx := context.Background()
	s := initStore(t, ep)
	if _, err := s.CreateVolume(ctx, "v", 1<<30, 1); err != nil {
		t.Fatal(err)
	}
	l1, err := s.Attach(ctx, "v", "c1", 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	e1 := l1.Epoch()
	l1.Release(ctx) // as if its lease expired with its server dead
	m, err := s.AttachMaintenance(ctx, "v", "node1", 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	m.Release(ctx)
	l2, err := s.AttachAfter(ctx, "v", "c1 again", 5*time.Second, e1)
	if err != nil {
		t.Fatalf("AttachAfter(%d) after only a maintenance lock: %v", e1, err)
	}
	if l2.Epoch() <= m.Epoch() {
		t.Fatalf("epoch %d after maintenance epoch %d", l2.Epoch(), m.Epoch())
	}
	e2 := l2.Epoch()
	l2.Release(ctx)

	l3, err := s.Attach(ctx, "v", "c2", 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	l3.Release(ctx)
	_, err = s.AttachAfter(ctx, "v", "c1 late", 5*time.Second, e2)
	if !errors.Is(err, ErrNotHolder) || !strings.Contains(err.Error(), "c2") && !strings.Contains(err.Error(), "detached") {
		t.Fatalf("AttachAfter(%d) after another client attached: %v, want ErrNotHolder", e2, err)
	}
	t.Logf("refused: %v", err)
	if _, err := s.AttachAfter(ctx, "v", "c", 5*time.Second, 0); !errors.Is(err, ErrInvalid) {
		t.Fatalf("AttachAfter(0): %v", err)
	}
}
