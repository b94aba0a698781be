package meta

import (
	"context"
	"errors"
	"testing"
	"time"
)

// Snapshots of a detached volume: taken at once after a clean detach;
// refused (ErrNotReleased) when the last holder's lease expired without a
// detach, since it may still write; a request left by a command that died
// does not block the next snapshot once its holder is gone; a snapshot
// with clones cannot be deleted.
func TestSnapshotsDetached(t *testing.T) {
	s := initStore(t, startEtcd(t))
	ctx := context.Background()
	if _, err := s.CreateVolume(ctx, "v", 1<<20, 1); err != nil {
		t.Fatal(err)
	}
	take := func(name string) error {
		_, err := s.TakeSnapshots(ctx, "", []SnapshotRequest{{Volume: "v", Name: name}}, time.Second)
		return err
	}
	if err := take("never-attached"); err != nil {
		t.Fatal(err)
	}
	l, err := s.Attach(ctx, "v", "a", 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Release(ctx); err != nil {
		t.Fatal(err)
	}
	if err := take("released"); err != nil {
		t.Fatalf("after a clean detach: %v", err)
	}
	// A holder whose lease ends without a detach (its process died, or
	// etcd lost it): the lock is free, but the holder may still write.
	l, err = s.Attach(ctx, "v", "b", time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.cli.Revoke(ctx, l.lease); err != nil {
		t.Fatal(err)
	}
	if err := take("expired"); !errors.Is(err, ErrNotReleased) {
		t.Fatalf("after an expired lease: %v, want ErrNotReleased", err)
	}
	// A new holder fences the old one; its clean detach allows snapshots
	// again.
	l, err = s.Attach(ctx, "v", "c", 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	// A request whose command died before commit or abort.
	b, err := s.BeginSnapshots(ctx, "", []SnapshotRequest{{Volume: "v", Name: "orphan"}})
	if err != nil || len(b.Attached()) != 1 {
		t.Fatalf("begin with a holder: %v %v", b, err)
	}
	if err := take("meanwhile"); !errors.Is(err, ErrConflict) {
		t.Fatalf("a second snapshot while one is begun: %v", err)
	}
	if err := l.Release(ctx); err != nil {
		t.Fatal(err)
	}
	if err := take("after"); err != nil {
		t.Fatalf("after the orphan's holder left: %v", err)
	}
	v, err := s.Volume(ctx, "v")
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := v.Snapshot("orphan"); ok {
		t.Fatal("the orphan snapshot is committed")
	}
	if _, err := s.CloneVolume(ctx, SnapshotRequest{Volume: "v", Name: "after"}, "c1"); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteSnapshot(ctx, "v", "after"); !errors.Is(err, ErrInUse) {
		t.Fatalf("delete of a snapshot with a clone: %v", err)
	}
	if err := s.DeleteVolume(ctx, "v"); !errors.Is(err, ErrInUse) {
		t.Fatalf("delete of a volume with a clone: %v", err)
	}
	if err := s.DeleteVolume(ctx, "c1"); err != nil {
		t.Fatal(err)
	}
	// A reader keeps the snapshot from being deleted.
	v, _ = s.Volume(ctx, "v")
	sn, _ := v.Snapshot("after")
	u, err := s.UseSnapshot(ctx, v, sn.ID, "reader", 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteSnapshot(ctx, "v", "after"); !errors.Is(err, ErrInUse) {
		t.Fatalf("delete of a snapshot being read: %v", err)
	}
	if err := u.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteSnapshot(ctx, "v", "after"); err != nil {
		t.Fatalf("delete of a snapshot whose clone was deleted and reader left: %v", err)
	}
	if _, err := s.UseSnapshot(ctx, v, sn.ID, "late", 10*time.Second); !errors.Is(err, ErrNotFound) {
		t.Fatalf("reading a deleted snapshot: %v", err)
	}
}
