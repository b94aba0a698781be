package meta

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"sync"
	"testing"
	"time"
)

func TestMissedMarks(t *testing.T) {
	ep := startEtcd(t)
	ctx := context.Background()
	s := initStore(t, ep)
	a, _ := s.CreateVolume(ctx, "a", 1<<30, 3)
	b, _ := s.CreateVolume(ctx, "b", 1<<30, 3)

	if err := s.MarkMissed(ctx, 999, "n1", 1); !errors.Is(err, ErrNotFound) {
		t.Fatalf("MarkMissed on a missing volume: %v, want ErrNotFound", err)
	}
	if err := s.MarkMissed(ctx, a.ID, "bad/id", 1); !errors.Is(err, ErrInvalid) {
		t.Fatalf("MarkMissed with node id bad/id: %v, want ErrInvalid", err)
	}
	if err := s.MarkMissed(ctx, a.ID, "n1", 7, 3, 1<<40); err != nil {
		t.Fatal(err)
	}
	// Idempotent: marking again changes nothing.
	if err := s.MarkMissed(ctx, a.ID, "n1", 3); err != nil {
		t.Fatal(err)
	}
	// More than one transaction's worth.
	many := make([]uint64, 250)
	for i := range many {
		many[i] = uint64(1000 + i)
	}
	if err := s.MarkMissed(ctx, a.ID, "n2", many...); err != nil {
		t.Fatal(err)
	}
	if err := s.MarkMissed(ctx, b.ID, "n2", 0); err != nil {
		t.Fatal(err)
	}
	got, err := s.Missed(ctx, a.ID)
	if err != nil {
		t.Fatal(err)
	}
	if want := []uint64{3, 7, 1 << 40}; !reflect.DeepEqual(got["n1"], want) {
		t.Fatalf("Missed(a)[n1] = %v, want %v (numeric order)", got["n1"], want)
	}
	if !reflect.DeepEqual(got["n2"], many) || len(got) != 2 {
		t.Fatalf("Missed(a) = %d nodes, n2 has %d marks; want 2 nodes, 250", len(got), len(got["n2"]))
	}
	counts, err := s.MissedCounts(ctx)
	if err != nil {
		t.Fatal(err)
	}
	want := map[uint64]map[string]int{a.ID: {"n1": 3, "n2": 250}, b.ID: {"n2": 1}}
	if !reflect.DeepEqual(counts, want) {
		t.Fatalf("MissedCounts = %v, want %v", counts, want)
	}

	// Clearing: one mark, then an absent one (no error).
	if err := s.ClearMissed(ctx, a.ID, "n1", 7); err != nil {
		t.Fatal(err)
	}
	if err := s.ClearMissed(ctx, a.ID, "n1", 7); err != nil {
		t.Fatalf("ClearMissed of an absent mark: %v", err)
	}
	if got, _ := s.Missed(ctx, a.ID); !reflect.DeepEqual(got["n1"], []uint64{3, 1 << 40}) {
		t.Fatalf("Missed(a)[n1] after clearing 7 = %v", got["n1"])
	}
	for _, c := range []uint64{3, 1 << 40} {
		if err := s.ClearMissed(ctx, a.ID, "n1", c); err != nil {
			t.Fatal(err)
		}
	}
	if got, _ := s.Missed(ctx, a.ID); len(got) != 1 || got["n1"] != nil {
		t.Fatalf("Missed(a) after clearing n1 = %d nodes, n1 %v; want only n2", len(got), got["n1"])
	}
	// A node id that is a prefix of another does not mix with it.
	if err := s.MarkMissed(ctx, b.ID, "n", 5); err != nil {
		t.Fatal(err)
	}
	if got, _ := s.Missed(ctx, b.ID); !reflect.DeepEqual(got, map[string][]uint64{"n": {5}, "n2": {0}}) {
		t.Fatalf("Missed(b) = %v", got)
	}

	// Deleting a volume deletes its marks; others stay.
	if err := s.DeleteVolume(ctx, "a"); err != nil {
		t.Fatal(err)
	}
	counts, err = s.MissedCounts(ctx)
	if err != nil || !reflect.DeepEqual(counts, map[uint64]map[string]int{b.ID: {"n": 1, "n2": 1}}) {
		t.Fatalf("MissedCounts after deleting a = %v, %v", counts, err)
	}
}

// TestMarkMissedConcurrent: writers marking the same and different chunks
// at once all succeed and every mark is there.
func TestMarkMissedConcurrent(t *testing.T) {
	ep := startEtcd(t)
	ctx := context.Background()
	s := initStore(t, ep)
	v, _ := s.CreateVolume(ctx, "v", 1<<30, 3)
	var wg sync.WaitGroup
	errs := make([]error, 8)
	for i := range errs {
		wg.Go(func() { errs[i] = s.MarkMissed(ctx, v.ID, fmt.Sprintf("n%d", i%2), uint64(i), 100) })
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("MarkMissed %d: %v", i, err)
		}
	}
	got, err := s.Missed(ctx, v.ID)
	want := map[string][]uint64{"n0": {0, 2, 4, 6, 100}, "n1": {1, 3, 5, 7, 100}}
	if err != nil || !reflect.DeepEqual(got, want) {
		t.Fatalf("Missed = %v, %v; want %v", got, err, want)
	}
}

func TestProgress(t *testing.T) {
	ep := startEtcd(t)
	ctx := context.Background()
	s := initStore(t, ep)
	v, _ := s.CreateVolume(ctx, "v", 1<<30, 3)
	w, _ := s.CreateVolume(ctx, "w", 1<<30, 3)
	if m, err := s.Progress(ctx); err != nil || len(m) != 0 {
		t.Fatalf("Progress before any = %v, %v", m, err)
	}
	if err := s.SetProgress(ctx, v.ID, Progress{Kind: "defrag"}); !errors.Is(err, ErrInvalid) {
		t.Fatalf("SetProgress kind defrag: %v, want ErrInvalid", err)
	}
	if err := s.SetProgress(ctx, 999, Progress{Kind: ProgressRebuild}); !errors.Is(err, ErrNotFound) {
		t.Fatalf("SetProgress of a missing volume: %v, want ErrNotFound", err)
	}
	at := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	p := Progress{Kind: ProgressRebalance, Done: 10, Total: 40, RingVersion: 7, Updated: at}
	if err := s.SetProgress(ctx, v.ID, p); err != nil {
		t.Fatal(err)
	}
	if err := s.SetProgress(ctx, w.ID, Progress{Kind: ProgressScrub, Done: 5, Total: 5, Mismatches: 2, Repaired: 2}); err != nil {
		t.Fatal(err)
	}
	p.Done = 20 // replaces the record
	if err := s.SetProgress(ctx, v.ID, p); err != nil {
		t.Fatal(err)
	}
	m, err := s.Progress(ctx)
	if err != nil || len(m) != 2 || m[v.ID] != p || m[v.ID].Finished() {
		t.Fatalf("Progress = %+v, %v; want v at %+v", m, err, p)
	}
	if g := m[w.ID]; g.Kind != ProgressScrub || g.Mismatches != 2 || g.Updated.IsZero() || !g.Finished() {
		t.Fatalf("Progress[w] = %+v: want a finished scrub with 2 mismatches and a time", g)
	}
	if err := s.DeleteVolume(ctx, "v"); err != nil {
		t.Fatal(err)
	}
	if m, err := s.Progress(ctx); err != nil || len(m) != 1 {
		t.Fatalf("Progress after deleting v = %+v, %v; want only w", m, err)
	}
}

func TestRemoveNode(t *testing.T) {
	ep := startEtcd(t)
	ctx := context.Background()
	s := initStore(t, ep)
	if _, err := s.RemoveNode(ctx, "n1"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("RemoveNode on an empty ring: %v, want ErrNotFound", err)
	}
	for i := range 5 {
		if _, err := s.JoinRing(ctx, Node{ID: fmt.Sprintf("n%d", i), Capacity: 1 << 30, Host: fmt.Sprint(i)}); err != nil {
			t.Fatal(err)
		}
	}
	before, _, _ := s.Ring(ctx)
	r, err := s.RemoveNode(ctx, "n2")
	if err != nil {
		t.Fatal(err)
	}
	if r.Len() != 4 || r.Version() != before.Version()+1 {
		t.Fatalf("after RemoveNode(n2): %d nodes, v%d; want 4, v%d", r.Len(), r.Version(), before.Version()+1)
	}
	cur, _, _ := s.Ring(ctx)
	for _, n := range cur.Nodes() {
		if n.ID == "n2" {
			t.Fatalf("ring still holds n2: %+v", cur.Nodes())
		}
	}
	if cur.Version() != r.Version() {
		t.Fatalf("stored ring v%d, returned v%d", cur.Version(), r.Version())
	}
	if _, err := s.RemoveNode(ctx, "n2"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("RemoveNode(n2) again: %v, want ErrNotFound", err)
	}
	// Concurrent removals of distinct nodes all land (CAS retries).
	var wg sync.WaitGroup
	errs := make([]error, 3)
	for i, id := range []string{"n0", "n3", "n4"} {
		wg.Go(func() { _, errs[i] = s.RemoveNode(ctx, id) })
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("concurrent RemoveNode %d: %v", i, err)
		}
	}
	cur, _, _ = s.Ring(ctx)
	if cur.Len() != 1 || cur.Nodes()[0].ID != "n1" || cur.Version() != r.Version()+3 {
		t.Fatalf("after concurrent removals: %+v v%d; want only n1 at v%d", cur.Nodes(), cur.Version(), r.Version()+3)
	}
}

func TestWatchVolumes(t *testing.T) {
	ep := startEtcd(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	s := initStore(t, ep)
	ch := s.WatchVolumes(ctx)
	recv := func(what string, ok func(VolumeSet) bool) VolumeSet {
		t.Helper()
		deadline := time.After(10 * time.Second)
		for {
			select {
			case vs := <-ch:
				if ok(vs) {
					return vs
				}
			case <-deadline:
				t.Fatalf("WatchVolumes: no set with %s", what)
			}
		}
	}
	vs := recv("no volume", func(vs VolumeSet) bool { return len(vs.IDs) == 0 })
	if vs.Next != 1 || vs.Deleted(1) {
		t.Fatalf("initial set %+v: want Next 1, nothing deleted", vs)
	}
	a, _ := s.CreateVolume(context.Background(), "a", 1<<30, 1)
	b, _ := s.CreateVolume(context.Background(), "b", 1<<30, 1)
	vs = recv("a and b", func(vs VolumeSet) bool { return vs.IDs[a.ID] && vs.IDs[b.ID] })
	if vs.Deleted(a.ID) || vs.Deleted(b.ID+1) {
		t.Fatalf("set %+v: a live and an unallocated id must not count as deleted", vs)
	}
	if err := s.DeleteVolume(context.Background(), "a"); err != nil {
		t.Fatal(err)
	}
	vs = recv("a deleted", func(vs VolumeSet) bool { return !vs.IDs[a.ID] })
	if !vs.Deleted(a.ID) || vs.Deleted(b.ID) || vs.Next != b.ID+1 {
		t.Fatalf("set after deleting a: %+v", vs)
	}
	cancel()
	for range ch { // closes once ctx is done
	}
}

// TestUnflushedMarks: an unflushed mark never replaces a missed one, a
// missed mark replaces an unflushed one, and ClearUnflushed deletes only
// marks still unflushed at the given incarnation.
func TestUnflushedMarks(t *testing.T) {
	s := initStore(t, startEtcd(t))
	ctx := context.Background()
	v, err := s.CreateVolume(ctx, "u", 1<<30, 2)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.MarkMissed(ctx, v.ID, "n1", 1); err != nil {
		t.Fatal(err)
	}
	if err := s.MarkUnflushed(ctx, v.ID, "n1", 77, 1, 2, 3); err != nil {
		t.Fatal(err)
	}
	if err := s.MarkMissed(ctx, v.ID, "n1", 3); err != nil {
		t.Fatal(err)
	}
	u, err := s.UnflushedMarks(ctx, v.ID)
	if err != nil || len(u["n1"]) != 1 || u["n1"][2] != 77 {
		t.Fatalf("UnflushedMarks = %v, %v; want only chunk 2 at 77", u, err)
	}
	if err := s.ClearUnflushed(ctx, v.ID, "n1", 76, 1, 2, 3); err != nil {
		t.Fatal(err)
	}
	if m, _ := s.Missed(ctx, v.ID); len(m["n1"]) != 3 {
		t.Fatalf("ClearUnflushed at another incarnation removed marks: %v", m)
	}
	if err := s.ClearUnflushed(ctx, v.ID, "n1", 77, 1, 2, 3); err != nil {
		t.Fatal(err)
	}
	if m, _ := s.Missed(ctx, v.ID); len(m["n1"]) != 2 || m["n1"][0] != 1 || m["n1"][1] != 3 {
		t.Fatalf("after ClearUnflushed at 77: %v, want the missed marks 1 and 3 only", m)
	}
	if err := s.MarkUnflushed(ctx, v.ID+100, "n1", 77, 1); !errors.Is(err, ErrNotFound) {
		t.Fatalf("MarkUnflushed of a missing volume: %v", err)
	}
}
