package main

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/torus-storage/torus/meta"
	"github.com/torus-storage/torus/ring"
)

// openMeta opens the test's prefix directly, to set up what torusctl reads.
func openMeta(t *testing.T) *meta.Client {
	t.Helper()
	s, err := meta.Open(context.Background(), []string{endpoint}, prefix(t), meta.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func TestNodeRemove(t *testing.T) {
	initCluster(t, 3)
	ctx := context.Background()
	s := openMeta(t)
	for i := range 4 {
		if _, err := s.JoinRing(ctx, meta.Node{ID: fmt.Sprintf("n%d", i), Capacity: 1 << 30, Host: fmt.Sprint(i)}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := s.CreateVolume(ctx, "v3", 1<<30, 3); err != nil {
		t.Fatal(err)
	}
	fails(t, 2, "want ID", "node", "remove")
	fails(t, 1, "node n9 is not in the ring (version 4): see 'torusctl ring show'", "node", "remove", "n9")

	if out := must(t, "status"); !strings.Contains(out, "moving volumes: none") {
		t.Fatalf("status before a removal:\n%s", out)
	}
	out := must(t, "node", "remove", "n3")
	if !strings.Contains(out, "removed node n3 from the ring (version 5, 3 nodes left)") {
		t.Fatalf("node remove n3: %q", out)
	}
	// No holder has recorded the move yet: the volume is moving, although
	// its moves record is empty.
	if out := must(t, "status"); !strings.Contains(out, "moving volumes: 1") ||
		!strings.Contains(out, "v3: placed under ring 4, the ring is at 5") {
		t.Fatalf("status after a removal:\n%s", out)
	}
	// Three nodes left for a volume with R=3: removing one more is refused.
	fails(t, 1, "not enough nodes for R=3 after removing n2; add a node first", "node", "remove", "n2")
	if r, _, _ := s.Ring(ctx); r.Len() != 3 || r.Version() != 5 {
		t.Fatalf("refused removal changed the ring: %d nodes, v%d", r.Len(), r.Version())
	}
	var res removeResult
	if err := json.Unmarshal([]byte(must(t, "node", "remove", "n2", "--force", "--output", "json")), &res); err != nil {
		t.Fatal(err)
	}
	if res != (removeResult{Removed: "n2", RingVersion: 6, Nodes: 2}) {
		t.Fatalf("node remove --force --output json = %+v", res)
	}
	// A live node is named as still running.
	registerNodes(t, "live", 1)
	if _, err := s.JoinRing(ctx, meta.Node{ID: "live0", Capacity: 1 << 30, Host: "h"}); err != nil {
		t.Fatal(err)
	}
	if out := must(t, "node", "remove", "live0", "--force"); !strings.Contains(out, "node live0 still runs") {
		t.Fatalf("node remove of a live node: %q", out)
	}
}

func TestStatusHealth(t *testing.T) {
	initCluster(t, 1)
	ctx := context.Background()
	s := openMeta(t)
	out := must(t, "status")
	if !strings.Contains(out, "degraded volumes: none") || !strings.Contains(out, "background jobs: none") {
		t.Fatalf("status of a healthy cluster:\n%s", out)
	}
	var st statusResult
	if err := json.Unmarshal([]byte(must(t, "status", "--output", "json")), &st); err != nil {
		t.Fatal(err)
	}
	if st.Degraded == nil || st.Jobs == nil || len(st.Degraded)+len(st.Jobs) != 0 {
		t.Fatalf("status json of a healthy cluster: degraded %v, jobs %v; want empty lists", st.Degraded, st.Jobs)
	}

	a, _ := s.CreateVolume(ctx, "a", 1<<30, 1)
	b, _ := s.CreateVolume(ctx, "b", 1<<30, 1)
	if err := s.MarkMissed(ctx, a.ID, "n2", 1, 2, 3); err != nil {
		t.Fatal(err)
	}
	if err := s.MarkMissed(ctx, a.ID, "n1", 9); err != nil {
		t.Fatal(err)
	}
	if err := s.SetProgress(ctx, a.ID, meta.Progress{Kind: meta.ProgressRebuild, Done: 1, Total: 4, RingVersion: 2}); err != nil {
		t.Fatal(err)
	}
	if err := s.SetProgress(ctx, b.ID, meta.Progress{Kind: meta.ProgressScrub, Done: 8, Total: 8, Mismatches: 1, Repaired: 1}); err != nil {
		t.Fatal(err)
	}
	out = must(t, "status")
	for _, want := range []string{
		"degraded volumes: 1\n  a (id 1): n1 missed 1 chunk, n2 missed 3 chunks\n",
		"background jobs: 2\n",
		"  a (id 1): rebuild running, 1/4 chunks (25.0%), ring v2, updated ",
		"  b (id 2): scrub finished, 8/8 chunks (100.0%), ring v0, 1 mismatches, 1 repaired, updated ",
	} {
		if !strings.Contains(out, want) {
			t.Fatalf("status lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "[") {
		t.Fatalf("status to a pipe drew a progress bar:\n%s", out)
	}
	if err := json.Unmarshal([]byte(must(t, "status", "--output", "json")), &st); err != nil {
		t.Fatal(err)
	}
	if len(st.Degraded) != 1 || st.Degraded[0].Volume != "a" || st.Degraded[0].Missed["n2"] != 3 || st.Degraded[0].Missed["n1"] != 1 {
		t.Fatalf("status json degraded = %+v", st.Degraded)
	}
	if len(st.Jobs) != 2 || st.Jobs[0].Volume != "a" || st.Jobs[0].Done != 1 || st.Jobs[0].Total != 4 ||
		st.Jobs[0].Percent != 25 || st.Jobs[0].Kind != "rebuild" || st.Jobs[1].Mismatches != 1 {
		t.Fatalf("status json jobs = %+v", st.Jobs)
	}
	// Once repaired and the volume deleted, nothing is left.
	for _, c := range []uint64{1, 2, 3} {
		s.ClearMissed(ctx, a.ID, "n2", c)
	}
	s.ClearMissed(ctx, a.ID, "n1", 9)
	if out := must(t, "status"); !strings.Contains(out, "degraded volumes: none") {
		t.Fatalf("status after clearing every mark:\n%s", out)
	}
	must(t, "volume", "delete", "a")
	if err := json.Unmarshal([]byte(must(t, "status", "--output", "json")), &st); err != nil {
		t.Fatal(err)
	}
	if len(st.Jobs) != 1 || st.Jobs[0].Volume != "b" {
		t.Fatalf("jobs after deleting a = %+v", st.Jobs)
	}
}

func TestProgressBar(t *testing.T) {
	for _, c := range []struct {
		pct  float64
		want string
	}{
		{0, "[..........]"},
		{-5, "[..........]"},
		{25, "[##>.......]"},
		{50, "[#####.....]"},
		{99.9, "[#########>]"},
		{100, "[##########]"},
		{130, "[##########]"},
	} {
		if got := progressBar(c.pct, 10); got != c.want {
			t.Errorf("progressBar(%v) = %q, want %q", c.pct, got, c.want)
		}
	}
	var b strings.Builder
	printHealth(&b, nil, []jobResult{{Volume: "v", ID: 1, Percent: 50,
		Progress: meta.Progress{Kind: "rebalance", Done: 5, Total: 10, RingVersion: 3, Updated: time.Unix(100, 0)}}},
		true, time.Unix(102, 0))
	want := "  v (id 1): rebalance running, [###############...............] 5/10 chunks (50.0%), ring v3, updated 2s ago\n"
	if !strings.Contains(b.String(), want) {
		t.Fatalf("printHealth with bars:\n%s\nwant line %q", b.String(), want)
	}
}

// TestVolumeInfoCopies: volume info counts the live good copies of each
// chunk and flags chunks down to one; the job line names rate, ETA and
// holder.
func TestVolumeInfoCopies(t *testing.T) {
	initCluster(t, 2)
	ctx := context.Background()
	s := openMeta(t)
	registerNodes(t, "c", 3)
	for i := range 3 {
		if _, err := s.JoinRing(ctx, meta.Node{ID: fmt.Sprintf("c%d", i), Capacity: 1 << 40, Host: fmt.Sprint(i)}); err != nil {
			t.Fatal(err)
		}
	}
	v, err := s.CreateVolume(ctx, "cp", 64<<20, 2)
	if err != nil {
		t.Fatal(err)
	}
	if out := must(t, "volume", "info", "cp"); !regexpFind(`fewest copies:\s+2 of 2\n`, out) {
		t.Fatalf("volume info of a healthy volume:\n%s", out)
	}
	r, _, _ := s.Ring(ctx)
	owners := r.Owners(ring.ChunkKey(v.ID, 5, 0), 2, nil)
	if err := s.MarkMissed(ctx, v.ID, owners[0], 5); err != nil {
		t.Fatal(err)
	}
	out := must(t, "volume", "info", "cp")
	if !regexpFind(`fewest copies:\s+1 of 2 \(AT RISK: 1 chunk on one copy or none`, out) {
		t.Fatalf("volume info with a chunk on one copy:\n%s", out)
	}
	now := time.Now().UTC()
	if err := s.SetProgress(ctx, v.ID, meta.Progress{Kind: meta.ProgressRebuild, Done: 10, Total: 30,
		Started: now.Add(-5 * time.Second), Updated: now, Holder: "maintenance by node c1"}); err != nil {
		t.Fatal(err)
	}
	if out := must(t, "status"); !strings.Contains(out, "2.0 chunks/s, ETA 10s, by maintenance by node c1") {
		t.Fatalf("status job line:\n%s", out)
	}
}
