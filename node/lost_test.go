package node

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/torus-storage/torus/meta"
	"github.com/torus-storage/torus/store"
)

// The lost-chunks record survives appends and reads back per volume,
// sorted and without repeats; the boot id tells a process crash (nothing to
// mark) from a machine restart.
func TestLostChunksAndBoot(t *testing.T) {
	dir := t.TempDir()
	if !machineRestarted(dir) {
		t.Fatal("no recorded boot: must assume the machine restarted")
	}
	if err := recordBoot(dir); err != nil {
		t.Fatal(err)
	}
	if machineRestarted(dir) {
		t.Fatal("same boot id: the machine did not restart")
	}
	if err := os.WriteFile(filepath.Join(dir, bootFile), []byte("another boot\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if !machineRestarted(dir) {
		t.Fatal("another boot id: the machine restarted")
	}

	if err := saveLost(dir, []store.ChunkID{{Volume: 7, Index: 3}, {Volume: 7, Index: 1}, {Volume: 9, Index: 0}}); err != nil {
		t.Fatal(err)
	}
	if err := saveLost(dir, []store.ChunkID{{Volume: 7, Index: 3}, {Volume: 7, Index: 2, Snap: 1}}); err != nil {
		t.Fatal(err)
	}
	got, err := loadLost(dir)
	if err != nil {
		t.Fatal(err)
	}
	// A snapshot copy (7/2 snap 1) is lost through its head's mark.
	if len(got) != 2 || !slices.Equal(got[7], []uint64{1, 2, 3}) || !slices.Equal(got[9], []uint64{0}) {
		t.Fatalf("lost chunks %v", got)
	}
}

// markLost marks a lost chunk on this node only where another owner has a
// copy without a mark: never for a volume with one replica, never where the
// other copy is marked too (this one then holds every flushed write).
func TestMarkLost(t *testing.T) {
	ms := testMeta(t)
	ctx := context.Background()
	for _, id := range []string{"a", "b"} {
		if _, err := ms.JoinRing(ctx, meta.Node{ID: id, Capacity: 1 << 30, Host: id}); err != nil {
			t.Fatal(err)
		}
	}
	r2, err := ms.CreateVolume(ctx, "r2", 8<<20, 2)
	if err != nil {
		t.Fatal(err)
	}
	r1, err := ms.CreateVolume(ctx, "r1", 8<<20, 1)
	if err != nil {
		t.Fatal(err)
	}
	// Chunk 3 of r2: b missed it already.
	if err := ms.MarkMissed(ctx, r2.ID, "b", 3); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	if err := saveLost(dir, []store.ChunkID{{Volume: r2.ID, Index: 1}, {Volume: r2.ID, Index: 3}, {Volume: r1.ID, Index: 1}, {Volume: 999, Index: 0}}); err != nil {
		t.Fatal(err)
	}
	if err := markLost(ctx, ms, dir, "a", slog.New(slog.DiscardHandler)); err != nil {
		t.Fatal(err)
	}
	m2, err := ms.Missed(ctx, r2.ID)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(m2["a"], []uint64{1}) {
		t.Fatalf("marks of a on r2: %v, want [1] (chunk 3's other copy is marked)", m2["a"])
	}
	if m1, err := ms.Missed(ctx, r1.ID); err != nil || len(m1) != 0 {
		t.Fatalf("marks on the R=1 volume: %v %v", m1, err)
	}
	if _, err := os.Stat(filepath.Join(dir, lostFile)); !os.IsNotExist(err) {
		t.Fatalf("%s left after the marks were recorded: %v", lostFile, err)
	}
}

// The incarnation survives a restart of the process (same boot id, or a
// clean store), changes when an unclean shutdown went with the machine,
// and is drawn again once dropped (a new store).
func TestIncarnation(t *testing.T) {
	dir := t.TempDir()
	log := slog.New(slog.DiscardHandler)
	first, err := incarnation(dir)
	if err != nil || first == 0 {
		t.Fatalf("first incarnation %#x, %v", first, err)
	}
	if inc, err := incarnation(dir); err != nil || inc != first {
		t.Fatalf("restart: incarnation %#x, %v; want %#x kept", inc, err, first)
	}
	if err := recordBoot(dir); err != nil {
		t.Fatal(err)
	}
	lost := []store.ChunkID{{Volume: 1, Index: 4}}
	if err := onRecover(dir, log)(lost); err != nil {
		t.Fatal(err)
	}
	if inc, err := incarnation(dir); err != nil || inc != first {
		t.Fatalf("unclean stop, same boot: incarnation %#x, %v; want %#x kept", inc, err, first)
	}
	if err := os.WriteFile(filepath.Join(dir, bootFile), []byte("another boot\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := onRecover(dir, log)(lost); err != nil {
		t.Fatal(err)
	}
	second, err := incarnation(dir)
	if err != nil || second == first {
		t.Fatalf("unclean stop with the machine: incarnation %#x, %v; want a new one", second, err)
	}
	if got, err := loadLost(dir); err != nil || !slices.Equal(got[1], []uint64{4}) {
		t.Fatalf("lost chunks %v, %v", got, err)
	}
	if err := dropIncarnation(dir); err != nil {
		t.Fatal(err)
	}
	if inc, err := incarnation(dir); err != nil || inc == second || inc == 0 {
		t.Fatalf("after a drop: incarnation %#x, %v; want a new one", inc, err)
	}
}
