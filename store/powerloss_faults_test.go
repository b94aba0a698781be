//go:build faults

package store

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"github.com/torus-storage/torus/engine"
	"github.com/torus-storage/torus/internal/voltest"
)

// TestStorePowerLossHook: with the hook armed, a restart as after a power
// loss keeps every write an fdatasync covered (a flush, a FUA write) and
// undoes the others, and the store recovers to a consistent state; a
// restart without it (the process died, the machine did not) keeps them all.
func TestStorePowerLossHook(t *testing.T) {
	for _, lose := range []bool{true, false} {
		dir := t.TempDir()
		path := filepath.Join(dir, "v.store")
		t.Setenv(PowerLogEnv, filepath.Join(dir, "powerloss"))
		t.Setenv(PowerLossEnv, "")
		opt := LocalOptions{Shards: 2}
		const size = 8 << 20
		l := openTest(t, path, size, opt)
		a, b, c, z := voltest.Buf(t, 2*engine.BlockSize), voltest.Buf(t, engine.BlockSize), voltest.Buf(t, engine.BlockSize), voltest.Buf(t, engine.BlockSize)
		voltest.Fill(a, 1)
		voltest.Fill(b, 2)
		voltest.Fill(c, 3)
		got := voltest.Buf(t, 2*engine.BlockSize)
		// Chunk 0 blocks 0-1: a, flushed. Chunk 1 block 0: c with FUA.
		// Then, unflushed: b over block 0 of chunk 0, c to a new chunk 2
		// (a new slot: its header write is undone too).
		if err := voltest.Do(l, engine.OpWrite, 0, 0, 2*engine.BlockSize, a); err != nil {
			t.Fatal(err)
		}
		if err := voltest.Do(l, engine.OpFlush, 0, 0, 0, nil); err != nil {
			t.Fatal(err)
		}
		if err := voltest.Do(l, engine.OpWrite, engine.FlagFUA, 1<<20, engine.BlockSize, c); err != nil {
			t.Fatal(err)
		}
		if err := voltest.Do(l, engine.OpWrite, 0, 0, engine.BlockSize, b); err != nil {
			t.Fatal(err)
		}
		if err := voltest.Do(l, engine.OpWrite, 0, 2<<20, engine.BlockSize, c); err != nil {
			t.Fatal(err)
		}
		l.Store().simulateCrash()

		if lose {
			t.Setenv(PowerLossEnv, "1")
		}
		l = openTest(t, path, size, opt)
		want0 := a[:engine.BlockSize]
		want2 := z
		if !lose {
			want0, want2 = b, c
		}
		for _, chk := range []struct {
			name string
			off  int64
			want []byte
		}{
			{"flushed block overwritten without a flush", 0, want0},
			{"flushed block", engine.BlockSize, a[engine.BlockSize:]},
			{"FUA write", 1 << 20, c},
			{"unflushed write to a new chunk", 2 << 20, want2},
		} {
			if err := voltest.Do(l, engine.OpRead, 0, chk.off, engine.BlockSize, got[:engine.BlockSize]); err != nil {
				t.Fatalf("power loss %v: read %s: %v", lose, chk.name, err)
			}
			if !bytes.Equal(got[:engine.BlockSize], chk.want) {
				t.Errorf("power loss %v: %s: wrong data after the restart", lose, chk.name)
			}
		}
		if err := l.Close(); err != nil {
			t.Fatal(err)
		}
		if _, err := os.Stat(filepath.Join(dir, "powerloss")); !os.IsNotExist(err) {
			t.Errorf("power loss %v: the undo record is left after a clean close: %v", lose, err)
		}
	}
}
