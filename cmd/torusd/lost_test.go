package main

import (
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/torus-storage/torus/engine"
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

	if err := saveLost(dir, []engine.ChunkID{{Volume: 7, Index: 3}, {Volume: 7, Index: 1}, {Volume: 9, Index: 0}}); err != nil {
		t.Fatal(err)
	}
	if err := saveLost(dir, []engine.ChunkID{{Volume: 7, Index: 3}, {Volume: 7, Index: 2, Snap: 1}}); err != nil {
		t.Fatal(err)
	}
	got, err := loadLost(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || !slices.Equal(got[7], []uint64{1, 3}) || !slices.Equal(got[9], []uint64{0}) {
		t.Fatalf("lost chunks %v", got)
	}
}
