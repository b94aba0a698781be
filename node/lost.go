package node

// After an unclean shutdown of the machine (power loss, kernel crash) the
// store may have lost writes no fdatasync covered, in the chunks its
// activity log listed. A client attached at the time notices the restart by
// the node's incarnation, but the next holder of a volume, or a holder that
// never saw the node before, cannot: so the node itself records those
// chunks as missed on itself, in etcd, before it serves anything. A process
// that died on a machine that kept running (kill -9, a crash of torusd: the
// kernel's boot id is the one recorded at the last start) lost nothing the
// kernel had taken, so nothing is marked then.
//
// The node's incarnation, in every OK reply, tells an attached client the
// same thing: a client that sees it change marks, as lost, every write the
// node took that no flush covered. So it changes exactly when writes may
// have been lost, and a restart of the process alone keeps it: marking the
// only complete copy of a chunk for a loss that did not happen would leave
// no copy anyone trusts.
//
// Invariants:
//   - The list of chunks reaches DATA/lost-chunks (written, then fsync'd)
//     before the store clears the activity log that names them
//     (store.StoreOptions.OnRecover): a crash at any point finds them again.
//   - The node answers no request until every listed chunk of a volume that
//     exists is marked missed on it in etcd; then the file goes. Chunks of
//     volumes that no longer exist are dropped.
//   - DATA/incarnation is replaced by a new random one, durably, before the
//     store clears an activity log after the machine restarted, and removed
//     before a new store is created; the node answers with the incarnation
//     the file holds, drawing one when there is none.

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/torus-storage/torus/meta"
	"github.com/torus-storage/torus/ring"
	"github.com/torus-storage/torus/store"
)

// lostFile holds the chunks an unclean shutdown may have cost, until they are
// marked in etcd; bootFile the kernel boot id of the last start; incFile the
// node's incarnation (8 bytes, little-endian).
const (
	lostFile = "lost-chunks"
	bootFile = "boot-id"
	incFile  = "incarnation"
)

// bootIDPath is where Linux tells the boot id (a new one per boot).
const bootIDPath = "/proc/sys/kernel/random/boot_id"

// machineRestarted reports whether the machine rebooted since the last start
// of the node in dir (or the fault hook simulated a power loss); without a
// record of the last start it assumes so.
func machineRestarted(dir string) bool {
	if store.PowerLossSimulated() {
		return true
	}
	last, err := os.ReadFile(filepath.Join(dir, bootFile))
	if err != nil {
		return true
	}
	cur, err := os.ReadFile(bootIDPath)
	return err != nil || !bytes.Equal(bytes.TrimSpace(last), bytes.TrimSpace(cur))
}

// recordBoot writes the current boot id to dir, durably.
func recordBoot(dir string) error {
	cur, err := os.ReadFile(bootIDPath)
	if err != nil {
		return fmt.Errorf("read the boot id: %w", err)
	}
	if err := writeDurable(dir, bootFile, cur); err != nil {
		return fmt.Errorf("record the boot id: %w", err)
	}
	return nil
}

// onRecover is the store's OnRecover: it keeps the chunks an unclean
// shutdown may have cost, if the machine went down with the process.
func onRecover(dir string, log *slog.Logger) func([]store.ChunkID) error {
	return func(lost []store.ChunkID) error {
		if !machineRestarted(dir) {
			log.Info("the process stopped uncleanly but the machine did not (same boot id): the kernel holds every write it took; nothing to mark",
				"chunks_in_activity_log", len(lost))
			return nil
		}
		if err := saveLost(dir, lost); err != nil {
			return err
		}
		_, err := newIncarnation(dir)
		return err
	}
}

// incarnation returns the node's incarnation recorded in dir, drawing and
// recording a new one if there is none.
func incarnation(dir string) (uint64, error) {
	b, err := os.ReadFile(filepath.Join(dir, incFile))
	if err == nil && len(b) == 8 {
		if inc := binary.LittleEndian.Uint64(b); inc != 0 {
			return inc, nil
		}
	}
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return 0, fmt.Errorf("read the node incarnation: %w", err)
	}
	return newIncarnation(dir)
}

// newIncarnation draws a new incarnation and records it in dir, durably.
func newIncarnation(dir string) (uint64, error) {
	inc := rand.Uint64() | 1
	if err := writeDurable(dir, incFile, binary.LittleEndian.AppendUint64(nil, inc)); err != nil {
		return 0, fmt.Errorf("record a new node incarnation: %w", err)
	}
	return inc, nil
}

// dropIncarnation removes the incarnation recorded in dir, durably, so the
// next start draws a new one.
func dropIncarnation(dir string) error {
	if err := os.Remove(filepath.Join(dir, incFile)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("drop the node incarnation: %w", err)
	}
	return syncDir(dir)
}

// saveLost appends chunks to DATA/lost-chunks and makes it durable.
func saveLost(dir string, chunks []store.ChunkID) error {
	if len(chunks) == 0 {
		return nil
	}
	b := make([]byte, 0, 16*len(chunks))
	seen := make(map[[2]uint64]bool, len(chunks))
	for _, id := range chunks {
		// A snapshot copy is marked through its head: a mark covers a
		// chunk's copies too, and the rebuild copies them all.
		k := [2]uint64{id.Volume, id.Index}
		if seen[k] {
			continue
		}
		seen[k] = true
		b = binary.LittleEndian.AppendUint64(b, id.Volume)
		b = binary.LittleEndian.AppendUint64(b, id.Index)
	}
	f, err := os.OpenFile(filepath.Join(dir, lostFile), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("record chunks that may have lost writes: %w", err)
	}
	_, err = f.Write(b)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("record chunks that may have lost writes: %w", err)
	}
	return nil
}

// loadLost reads DATA/lost-chunks: volume → chunk indices.
func loadLost(dir string) (map[uint64][]uint64, error) {
	b, err := os.ReadFile(filepath.Join(dir, lostFile))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", lostFile, err)
	}
	out := make(map[uint64][]uint64)
	for ; len(b) >= 16; b = b[16:] {
		vol, idx := binary.LittleEndian.Uint64(b), binary.LittleEndian.Uint64(b[8:])
		out[vol] = append(out[vol], idx)
	}
	for vol, chs := range out {
		slices.Sort(chs)
		out[vol] = slices.Compact(chs)
	}
	return out, nil
}

// markLost records the chunks in DATA/lost-chunks as missed on node id, in
// etcd, retrying until etcd answers or ctx ends, then removes the file.
func markLost(ctx context.Context, ms *meta.Client, dir, id string, log *slog.Logger) error {
	lost, err := loadLost(dir)
	if err != nil || len(lost) == 0 {
		return err
	}
	n := 0
	for _, chs := range lost {
		n += len(chs)
	}
	log.Warn("unclean shutdown before this start: marking the chunks that may have lost writes no flush covered as missed on this node, before serving",
		"chunks", n, "volumes", len(lost))
	for try := 0; ; try++ {
		err = markLostOnce(ctx, ms, id, lost)
		if err == nil {
			break
		}
		if try%10 == 0 {
			log.Warn("cannot record the chunks this node may have lost yet; it serves nothing until it can (the warning repeats while it waits)", "err", err)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("marking chunks lost in an unclean shutdown: %w", err)
		case <-time.After(time.Second):
		}
	}
	if err := os.Remove(filepath.Join(dir, lostFile)); err != nil {
		return fmt.Errorf("remove %s: %w", lostFile, err)
	}
	return nil
}

// markLostOnce marks the lost chunks that have another copy: on an owner
// under the current ring other than this node, without a mark. A chunk
// with no such copy (a volume with one replica, every other copy marked or
// lost in the same power loss) is left as it is: this copy holds every
// write a flush covered, and marking it would leave the chunk with no copy
// anyone reads.
func markLostOnce(ctx context.Context, ms *meta.Client, id string, lost map[uint64][]uint64) error {
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	vols, err := ms.Volumes(cctx)
	if err != nil {
		return err
	}
	r, _, err := ms.Ring(cctx)
	if err != nil {
		return err
	}
	for vol, chs := range lost {
		i := slices.IndexFunc(vols, func(v meta.Volume) bool { return v.ID == vol })
		if i < 0 || vols[i].Replication < 2 || r == nil {
			continue // deleted meanwhile (the collector frees its chunks), or no other copy
		}
		missed, err := ms.Missed(cctx, vol)
		if err != nil {
			return fmt.Errorf("volume %d: %w", vol, err)
		}
		var mark []uint64
		for _, ch := range chs {
			for _, o := range r.Owners(ring.ChunkKey(vol, ch, 0), vols[i].Replication, nil) {
				if o != id && !slices.Contains(missed[o], ch) {
					mark = append(mark, ch)
					break
				}
			}
		}
		for c := range slices.Chunk(mark, 100) {
			if err := ms.MarkMissed(cctx, vol, id, c...); err != nil {
				return fmt.Errorf("volume %d: %w", vol, err)
			}
		}
	}
	return nil
}
