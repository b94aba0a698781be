//go:build faults

package store

// Power-loss fault hook (compiled only with -tags faults; other builds have
// powerloss.go, where every hook is a no-op). It lets a test take a node
// down as a power loss would, not only as a crash of the process: the
// writes no fdatasync covered are lost.
//
// Invariants:
//   - The hook is armed only when $TORUS_POWERLOSS_FILE names a file when
//     the store opens; a store opened without it records nothing.
//   - Before the store issues a write or fallocate without RWF_DSYNC, the
//     prior contents of its range are appended to that file (write(2): the
//     fault kills the process, not the machine, so the page cache keeps
//     them). The range is the op's own (the store's range locks, and one
//     header write per slot at a time), so nothing else writes it meanwhile.
//   - An entry is dropped, and the file rewritten without it, once an
//     fdatasync prepared after the write was issued has succeeded, before
//     the store reports that fdatasync to anyone (flush completions).
//     Treating a write still in flight at that fdatasync as durable is one
//     outcome a real power loss can have too.
//   - When the store opens with $TORUS_POWERLOSS=1 (the restart after the
//     fault), the entries left are written back newest first, so every
//     write no fdatasync covered is undone, before recovery runs: the store
//     sees what a disk that lost its cache holds. Without it the file is
//     dropped (the process died, the writes did not).

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"slices"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/torus-storage/torus/internal/alignbuf"
)

// Environment of the hook (builds with -tags faults).
const (
	// PowerLogEnv names the file a store records its undo images in; the
	// hook is armed only if it is set when the store opens.
	PowerLogEnv = "TORUS_POWERLOSS_FILE"
	// PowerLossEnv, set to 1 when a store opens, makes it undo the writes
	// the file records: the restart after a power loss.
	PowerLossEnv = "TORUS_POWERLOSS"
)

// powerLog records the prior contents of every range written since the
// last fdatasync.
type powerLog struct {
	mu      sync.Mutex
	path    string
	f       *os.File
	entries []plEntry
}

// plEntry is one undo image: data was at off before a write issued when
// syncNext was epoch.
type plEntry struct {
	epoch uint64
	off   uint64
	data  []byte
}

// PowerLossSimulated reports whether this start follows a power loss
// simulated by the fault hook ($TORUS_POWERLOSS=1), which a real one would
// have come with a reboot.
func PowerLossSimulated() bool { return os.Getenv(PowerLossEnv) == "1" }

// undoPowerLoss writes back the undo images recorded for the store at path
// if the environment asks for a power loss, and drops the record.
func undoPowerLoss(path string) error {
	lp := os.Getenv(PowerLogEnv)
	if lp == "" {
		return nil
	}
	defer os.Remove(lp)
	if os.Getenv(PowerLossEnv) != "1" {
		return nil
	}
	b, err := os.ReadFile(lp)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("power-loss fault: %w", err)
	}
	var es []plEntry
	for len(b) >= 12 {
		off, n := binary.LittleEndian.Uint64(b), int(binary.LittleEndian.Uint32(b[8:]))
		if len(b) < 12+n {
			break // the process died in the middle of an append
		}
		es = append(es, plEntry{off: off, data: b[12 : 12+n]})
		b = b[12+n:]
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("power-loss fault: %w", err)
	}
	defer f.Close()
	for _, e := range slices.Backward(es) {
		if _, err := f.WriteAt(e.data, int64(e.off)); err != nil {
			return fmt.Errorf("power-loss fault: undo at %d: %w", e.off, err)
		}
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("power-loss fault: %w", err)
	}
	if len(es) > 0 {
		fmt.Fprintf(os.Stderr, "store: power-loss fault: undid %d writes no fdatasync covered in %s\n", len(es), path)
	}
	return nil
}

// armPowerLog starts recording if the environment names a file.
func (s *Store) armPowerLog() error {
	lp := os.Getenv(PowerLogEnv)
	if lp == "" {
		return nil
	}
	f, err := os.OpenFile(lp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return fmt.Errorf("power-loss fault: %w", err)
	}
	s.pl = &powerLog{path: lp, f: f}
	s.log.Warn("store: power-loss fault hook armed (build tag faults): writes no fdatasync covered are recorded to be undone", "path", s.path, "file", lp)
	return nil
}

// plWrite records the contents of [off, off+n) before a write without
// RWF_DSYNC.
func (s *Store) plWrite(off uint64, n int64) {
	pl := s.pl
	if pl == nil {
		return
	}
	buf, err := alignbuf.Alloc(int(n))
	if err != nil {
		panic(fmt.Sprintf("power-loss fault: %v", err))
	}
	defer alignbuf.Free(buf)
	got, err := unix.Pread(int(s.fd), buf, int64(off))
	if err != nil && !errors.Is(err, io.EOF) {
		panic(fmt.Sprintf("power-loss fault: read %d at %d: %v", n, off, err))
	}
	clear(buf[max(got, 0):])
	e := plEntry{epoch: s.syncNext.Load(), off: off, data: slices.Clone(buf)}
	pl.mu.Lock()
	defer pl.mu.Unlock()
	pl.entries = append(pl.entries, e)
	if err := pl.append(pl.f, e); err != nil {
		panic(fmt.Sprintf("power-loss fault: %v", err))
	}
}

func (pl *powerLog) append(f *os.File, e plEntry) error {
	var h [12]byte
	binary.LittleEndian.PutUint64(h[:], e.off)
	binary.LittleEndian.PutUint32(h[8:], uint32(len(e.data)))
	_, err := f.Write(append(h[:], e.data...))
	return err
}

// plSynced drops the entries an fdatasync that took epoch covered
// (math.MaxUint64: all, after the last one at Close).
func (s *Store) plSynced(epoch uint64) {
	pl := s.pl
	if pl == nil {
		return
	}
	pl.mu.Lock()
	defer pl.mu.Unlock()
	if epoch == math.MaxUint64 {
		pl.f.Close()
		os.Remove(pl.path)
		s.pl = nil
		return
	}
	n := len(pl.entries)
	pl.entries = slices.DeleteFunc(pl.entries, func(e plEntry) bool { return e.epoch < epoch })
	if len(pl.entries) == n {
		return
	}
	tmp := pl.path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err == nil {
		for _, e := range pl.entries {
			if err = pl.append(f, e); err != nil {
				break
			}
		}
	}
	if err == nil {
		err = os.Rename(tmp, pl.path)
	}
	if err != nil {
		panic(fmt.Sprintf("power-loss fault: rewrite %s: %v", pl.path, err))
	}
	pl.f.Close()
	pl.f = f
}
