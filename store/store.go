package store

// The node store keeps chunks in one file or block device (see
// store_format.go for the on-disk format and docs/STORE.md for the prose).
//
// Concurrency invariants:
//   - Every ChunkID maps to one shard (shardOf); all state of the chunk's slot
//     (slotMeta, including the range locks and header-write queue) is read and
//     written only on that shard's goroutine, which is locked to its OS thread
//     and is the only user of the shard's io_uring.
//   - A slot changes owner only through Store.free (a mutex-protected stack):
//     the freeing shard pushes it after its last touch, once its free is
//     durable (see shard.go), the allocating shard pops it before its first
//     touch.
//   - Ops overlapping in a slot are ordered: an op that writes (write,
//     discard, write-zeroes) never runs concurrently with another op on an
//     overlapping block range, and ops on a slot start in submission order
//     once they conflict. Hence the CRC table always matches the data a read
//     sees, and the later-submitted of two overlapping writes wins both data
//     and CRC.
//   - At most one header write per slot is in flight; header changes made
//     meanwhile are coalesced into the next one, which is issued as soon as the
//     one in flight completes. A write that sets a written bit, a discard and
//     a write-zeroes complete only after a header write that includes their
//     change has completed. A write whose blocks all have their bit set
//     already (so set on disk, see store_format.go) only marks the header
//     dirty: its slot is in the on-disk activity log, which stands in for the
//     CRCs until the header is written (at eviction from the log or Close).
//   - syncNext and synced order header completions against fdatasyncs: an
//     fdatasync takes syncNext.Add(1) when submitted and raises synced to that
//     value when it succeeds; a header write completing stamps syncNext.Load(),
//     so it is durable once synced exceeds its stamp.

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/torus-storage/torus/engine"
	"github.com/torus-storage/torus/internal/alignbuf"
	"github.com/torus-storage/torus/internal/crc32c"
)

// ChunkID names a chunk. Snap 0 is the chunk as the volume sees it now
// (its head); a chunk with Snap s > 0 is a copy of the head taken before the
// first change made under snapshot number s (see docs/ARCHITECTURE.md,
// "Snapshots"). The local volume uses Snap 0 only.
type ChunkID struct {
	Volume uint64
	Index  uint64
	Snap   uint64
}

// ChunkCompleter is told when a ChunkOp is done.
type ChunkCompleter interface {
	CompleteChunk(op *ChunkOp, err error)
}

// ChunkOp is one I/O against one chunk of a Store. The submitter owns it and
// may reuse it once Done has been called.
type ChunkOp struct {
	Op    engine.Op
	Flags engine.Flags
	Chunk ChunkID
	// Ver is, for a write, discard or write-zeroes, the version of the
	// change (zero: none; the chunk keeps the newest it was given), and
	// with engine.FlagCopy the exact version the chunk takes. The store sets
	// it when a read completes, to the chunk's version when the read
	// started, and when a copy is refused with engine.ErrNewer, to the
	// chunk's version.
	Ver Version
	// Off and Length select a block-aligned range inside the chunk; Buf holds
	// Length bytes for engine.OpRead and engine.OpWrite and must be 4 KiB
	// aligned memory (internal/alignbuf). engine.OpFlush ignores Chunk, Off
	// and Length.
	Off    int64
	Length int64
	Buf    []byte
	Done   ChunkCompleter
	// Tag is the submitter's cookie; the store leaves it alone.
	Tag uint64

	// AsOf makes a read return the chunk as of snapshot Chunk.Snap (> 0):
	// the chunk (Volume, Index, t) with the smallest t >= Chunk.Snap, else
	// the head (t = 0). The store sets From to the t it read.
	AsOf bool
	// ListSnaps makes a read fill Buf, instead of data, with the snapshot
	// numbers (t > 0) of the chunks (Volume, Index, t) the store holds, in
	// ascending order, as little-endian uint64s; the rest of Buf is zeroed.
	// Chunk.Snap and Off are ignored; at most len(Buf)/8 are listed.
	ListSnaps bool
	// IfAbsent makes a write change nothing, and succeed, if the chunk
	// already has a slot.
	IfAbsent bool
	// Found is set when a read or write starts: whether the chunk it
	// addressed had a slot.
	Found bool
	// From is set by a read with AsOf (above).
	From uint64

	// Shard-private state.
	slot     int32
	idx      int32
	pending  int8
	freeing  bool
	zeroing  bool   // freeing: the fallocate in flight is ZERO_RANGE, not a punch
	alWriter bool   // counted in its slot's alWriters
	epoch    uint64 // OpFlush: Store.syncNext taken at submission
	lockOff  int64
	lockLen  int64
	err      error
	next     *ChunkOp // shard backlog / slot lock lists
	waitNext *ChunkOp // next in a waiter list: slot header, activity log or free waiters
	sh       *shard   // the shard that reports op (nil: the submitter does)
}

// Version orders the changes of one chunk across its replicas: the attach
// epoch of the writer, then the writer's sequence of changes to the chunk.
// The zero Version means that none is known (never given, or lost by an
// unclean shutdown of the node).
type Version struct {
	Epoch, Seq uint64
}

// IsZero reports whether v is the zero Version (unknown).
func (v Version) IsZero() bool { return v == Version{} }

// Less reports whether v is older than w.
func (v Version) Less(w Version) bool {
	return v.Epoch < w.Epoch || v.Epoch == w.Epoch && v.Seq < w.Seq
}

// String formats v as epoch.seq.
func (v Version) String() string { return fmt.Sprintf("%d.%d", v.Epoch, v.Seq) }

// opDeliver marks a ChunkOp pushed to a driven shard only to complete its
// request on the driver's thread (see driver.go).
const opDeliver engine.Op = 0xff

// StoreOptions configure CreateStore and OpenStore.
type StoreOptions struct {
	// ChunkSize is the chunk size of a new store (default 1 MiB).
	ChunkSize int64
	// Slots is the number of chunks a new store file holds. For a block
	// device 0 means as many as fit.
	Slots int64
	// VolumeSize is recorded in a new store (0 for a cluster store).
	VolumeSize int64
	// ClusterID is recorded in a new store (empty for a local store).
	ClusterID []byte
	// Shards is the number of io_uring shards (default runtime.NumCPU()).
	Shards int
	// ForceBuffered opens without O_DIRECT, as when the filesystem refuses it.
	ForceBuffered bool
	// Logger receives warnings (default slog.Default()).
	Logger *slog.Logger
	// OnRecover, if set, is called by OpenStore when it recovers after an
	// unclean shutdown, with the chunks that may have lost writes no
	// fdatasync covered (those the activity log listed; every chunk if a
	// log block was torn), before the log that names them is cleared. The
	// caller makes the list durable (and their replicas known as missed);
	// an error fails the open and leaves the log as it was.
	OnRecover func(lost []ChunkID) error
}

// StoreStats is a snapshot of store counters.
type StoreStats struct {
	Slots     int64
	UsedSlots int64
	ChunkSize int64
	// Recovery at the last open: slots checked because the activity log
	// listed them (or all used slots if a log block was torn), and blocks
	// whose CRC was replaced by the one of the data on disk.
	RecoveryChecked int64
	RecoveryFixed   int64
}

// Store is a node store: chunks in one file or block device, read and written
// with O_DIRECT through one io_uring per shard.
type Store struct {
	path    string
	f       *os.File
	fd      int32
	blkdev  bool
	direct  bool
	log     *slog.Logger
	tab     *crc32.Table
	sb      *superblock
	chunk   int64
	blocks  int
	zeroCRC uint32

	slots []slotMeta
	crcs  []uint32

	freeMu sync.Mutex
	free   []uint32
	used   atomic.Int64

	syncNext, synced atomic.Uint64
	dirtyLeft        atomic.Int64 // dirty headers shards failed to write at close
	skipClean        atomic.Bool  // tests: stop shards as a crash would, headers dirty
	noPunch          atomic.Bool  // the file or device refused PUNCH_HOLE once
	// syncHook (tests) is called on a shard's thread with the epoch of each
	// fdatasync just before it is prepared: what the store holds then is
	// what that fdatasync makes durable.
	syncHook func(epoch uint64)
	// pl is the power-loss fault hook (builds with -tags faults only).
	pl *powerLog
	// onRecover is StoreOptions.OnRecover (open only).
	onRecover func(lost []ChunkID) error

	shards               []*shard
	recChecked, recFixed int64
	nshards              int
	closed               atomic.Bool
	closeMu              sync.Mutex
}

// Path is the file or device the store lives in.
func (s *Store) Path() string { return s.path }

// Direct reports whether the store uses O_DIRECT (false after a fallback to
// buffered I/O).
func (s *Store) Direct() bool { return s.direct }

// ChunkSize is the chunk size in bytes.
func (s *Store) ChunkSize() int64 { return s.chunk }

// VolumeSize is the volume size the store was created for (0 if none).
func (s *Store) VolumeSize() int64 { return int64(s.sb.volSize) }

// Stats returns current counters.
func (s *Store) Stats() StoreStats {
	return StoreStats{Slots: int64(len(s.slots)), UsedSlots: s.used.Load(), ChunkSize: s.chunk,
		RecoveryChecked: s.recChecked, RecoveryFixed: s.recFixed}
}

// SlotDataOffset returns the byte offset in the store of the data of chunk
// id, and false if the chunk has no slot. It is meant for tests and tools and
// must not race with writes or discards of id.
func (s *Store) SlotDataOffset(id ChunkID) (int64, bool) {
	for i := range s.slots {
		m := &s.slots[i]
		if m.used && m.id == id {
			return s.dataOff(int32(i)), true
		}
	}
	return 0, false
}

func (s *Store) dataOff(slot int32) int64 { return int64(s.sb.dataOff) + int64(slot)*s.chunk }
func (s *Store) hdrOff(slot int32) int64  { return int64(s.sb.hdrOff) + int64(slot)*engine.BlockSize }

// CreateStore makes a new store at path (a file that must not exist, or a
// block device whose first 4 KiB are zero) and opens it.
func CreateStore(path string, opt StoreOptions) (*Store, error) {
	cs := opt.ChunkSize
	if cs == 0 {
		cs = DefaultChunkSize
	}
	if err := checkChunkSize(cs); err != nil {
		return nil, fmt.Errorf("create store %s: %w", path, err)
	}
	if len(opt.ClusterID) > maxClusterID {
		return nil, fmt.Errorf("create store %s: cluster id longer than %d bytes", path, maxClusterID)
	}
	tab := crc32.MakeTable(crc32.Castagnoli)
	// A new store has no data yet, so it is clean: nothing to recover.
	sb := &superblock{version: storeFormatVersion, flags: sbFlagClean, blockSize: engine.BlockSize,
		chunkSize: uint32(cs), volSize: uint64(opt.VolumeSize), clusterID: opt.ClusterID}
	if _, err := rand.Read(sb.uuid[:]); err != nil {
		return nil, fmt.Errorf("create store %s: uuid: %w", path, err)
	}
	buf, err := alignbuf.Alloc(engine.BlockSize)
	if err != nil {
		return nil, err
	}
	defer alignbuf.Free(buf)

	if st, err := os.Stat(path); err == nil && st.Mode()&os.ModeDevice != 0 {
		f, err := os.OpenFile(path, os.O_RDWR|unix.O_DIRECT|unix.O_EXCL, 0)
		if err != nil {
			return nil, fmt.Errorf("create store on device %s: %w", path, err)
		}
		defer f.Close()
		if _, err := f.ReadAt(buf, 0); err != nil {
			return nil, fmt.Errorf("create store on device %s: read first block: %w", path, err)
		}
		for _, c := range buf {
			if c != 0 {
				return nil, fmt.Errorf("create store on device %s: first 4 KiB not zero; refusing to overwrite (wipe it first)", path)
			}
		}
		size, err := unix.IoctlGetUint64(int(f.Fd()), unix.BLKGETSIZE64)
		if err != nil {
			return nil, fmt.Errorf("create store on device %s: size: %w", path, err)
		}
		slots := uint64(opt.Slots)
		if slots == 0 {
			slots = size / uint64(cs)
			for slots > 0 {
				if _, _, t := layout(slots, uint64(cs)); t <= size {
					break
				}
				slots--
			}
		}
		sb.slots = slots
		sb.hdrOff, sb.dataOff, _ = layout(slots, uint64(cs))
		if _, _, t := layout(slots, uint64(cs)); slots == 0 || t > size {
			return nil, fmt.Errorf("create store on device %s: %d bytes cannot hold %d chunks of %d", path, size, slots, cs)
		}
		zero, err := alignbuf.Alloc(1 << 20)
		if err != nil {
			return nil, err
		}
		defer alignbuf.Free(zero)
		for off := uint64(alOff); off < sb.dataOff; off += uint64(len(zero)) {
			n := min(uint64(len(zero)), sb.dataOff-off)
			if _, err := f.WriteAt(zero[:n], int64(off)); err != nil {
				return nil, fmt.Errorf("create store on device %s: clear headers: %w", path, err)
			}
		}
		sb.encode(buf, tab)
		if _, err := f.WriteAt(buf, 0); err != nil {
			return nil, fmt.Errorf("create store on device %s: write superblock: %w", path, err)
		}
		if err := f.Sync(); err != nil {
			return nil, fmt.Errorf("create store on device %s: sync: %w", path, err)
		}
		f.Close()
		return OpenStore(path, opt)
	}

	if opt.Slots <= 0 {
		return nil, fmt.Errorf("create store %s: slot count %d", path, opt.Slots)
	}
	sb.slots = uint64(opt.Slots)
	var total uint64
	sb.hdrOff, sb.dataOff, total = layout(sb.slots, uint64(cs))
	// Build in a temporary file and rename, so a crash never leaves a
	// half-made store at path.
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		if errors.Is(err, os.ErrPermission) {
			return nil, fmt.Errorf("create store %s: directory %s is not writable: %w", path, filepath.Dir(path), err)
		}
		return nil, fmt.Errorf("create store %s: %w", path, err)
	}
	fail := func(err error) (*Store, error) {
		f.Close()
		os.Remove(tmp)
		return nil, fmt.Errorf("create store %s: %w", path, err)
	}
	if err := f.Truncate(int64(total)); err != nil {
		return fail(err)
	}
	sb.encode(buf, tab)
	if _, err := f.WriteAt(buf, 0); err != nil {
		return fail(err)
	}
	if err := f.Sync(); err != nil {
		return fail(err)
	}
	if err := f.Close(); err != nil {
		return fail(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return nil, fmt.Errorf("create store %s: %w", path, err)
	}
	if d, err := os.Open(filepath.Dir(path)); err == nil {
		d.Sync()
		d.Close()
	}
	return OpenStore(path, opt)
}

// storeLockWait is how long OpenStore waits for a store another open file
// holds (a process still running, or the I/O a killed one left in flight).
const storeLockWait = 30 * time.Second

// lockStore takes an exclusive flock on f, the store at path, waiting up to
// storeLockWait. The lock goes when the last reference to the open file
// goes, and an io_uring request in flight holds one: so a store whose
// previous process was killed is opened (and recovered) only once that
// process's writes have landed, never under them. It also keeps two
// processes from opening one store.
func lockStore(f *os.File, path string, log *slog.Logger) error {
	deadline := time.Now().Add(storeLockWait)
	warned := false
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			return nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) {
			return fmt.Errorf("open store %s: lock: %w", path, err)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("open store %s: in use by another process for %v (two processes must never open one store): %w",
				path, storeLockWait, ErrInUse)
		}
		if !warned {
			log.Warn("store: in use by another process, or a killed one's I/O is still in flight; waiting", "path", path)
			warned = true
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// OpenStore opens an existing store. Only Shards, ForceBuffered and Logger of
// opt are used.
func OpenStore(path string, opt StoreOptions) (*Store, error) {
	log := opt.Logger
	if log == nil {
		log = slog.Default()
	}
	s := &Store{path: path, log: log, tab: crc32.MakeTable(crc32.Castagnoli)}
	s.syncNext.Store(1)
	flags := os.O_RDWR
	direct := !opt.ForceBuffered
	var f *os.File
	var err error
	if direct {
		f, err = os.OpenFile(path, flags|unix.O_DIRECT, 0)
		if errors.Is(err, unix.EINVAL) {
			log.Warn("store: filesystem refuses O_DIRECT; falling back to buffered I/O with fdatasync at flush and FUA", "path", path)
			direct = false
		}
	}
	if !direct {
		f, err = os.OpenFile(path, flags, 0)
	}
	if err != nil {
		return nil, fmt.Errorf("open store %s: %w", path, err)
	}
	if err := lockStore(f, path, log); err != nil {
		f.Close()
		return nil, err
	}
	if err := undoPowerLoss(path); err != nil {
		f.Close()
		return nil, err
	}
	s.f, s.fd, s.direct = f, int32(f.Fd()), direct
	if err := s.armPowerLog(); err != nil {
		f.Close()
		return nil, err
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("open store %s: %w", path, err)
	}
	s.blkdev = st.Mode()&os.ModeDevice != 0
	s.onRecover = opt.OnRecover
	if err := s.load(); err != nil {
		f.Close()
		return nil, fmt.Errorf("open store %s: %w", path, err)
	}
	if err := s.startShards(opt.Shards); err != nil {
		s.stopShards()
		f.Close()
		return nil, fmt.Errorf("open store %s: %w", path, err)
	}
	return s, nil
}

// load reads the superblock and all slot headers, recovers after an unclean
// shutdown and marks the store open (not clean) on disk.
func (s *Store) load() error {
	// Recovery reads whole chunks into buf.
	buf, err := alignbuf.Alloc(MaxChunkSize)
	if err != nil {
		return err
	}
	defer alignbuf.Free(buf)
	if n, err := s.f.ReadAt(buf[:engine.BlockSize], 0); n < engine.BlockSize {
		return fmt.Errorf("read superblock: %d bytes: %v: %w", n, err, ErrCorrupt)
	}
	sb, err := decodeSuperblock(buf[:engine.BlockSize], s.tab)
	if err != nil {
		return err
	}
	s.sb = sb
	s.chunk = int64(sb.chunkSize)
	s.blocks = int(s.chunk / engine.BlockSize)
	var zero [engine.BlockSize]byte
	s.zeroCRC = crc32.Checksum(zero[:], s.tab)
	_, _, total := layout(sb.slots, uint64(sb.chunkSize))
	size := int64(0)
	if s.blkdev {
		sz, err := unix.IoctlGetUint64(int(s.fd), unix.BLKGETSIZE64)
		if err != nil {
			return fmt.Errorf("device size: %w", err)
		}
		size = int64(sz)
	} else if st, err := s.f.Stat(); err == nil {
		size = st.Size()
	}
	if size < int64(total) {
		return fmt.Errorf("store is %d bytes, its superblock needs %d: %w", size, total, ErrCorrupt)
	}

	n := int(sb.slots)
	s.slots = make([]slotMeta, n)
	s.crcs = make([]uint32, n*s.blocks)
	seen := make(map[ChunkID]int32)
	for base := 0; base < n; base += len(buf) / engine.BlockSize {
		cnt := min(len(buf)/engine.BlockSize, n-base)
		if _, err := s.f.ReadAt(buf[:cnt*engine.BlockSize], s.hdrOff(int32(base))); err != nil {
			return fmt.Errorf("read slot headers: %w", err)
		}
		for i := 0; i < cnt; i++ {
			slot := base + i
			m := &s.slots[slot]
			m.crcs = s.crcs[slot*s.blocks : (slot+1)*s.blocks : (slot+1)*s.blocks]
			if err := m.decode(buf[i*engine.BlockSize:(i+1)*engine.BlockSize], s.blocks, s.tab); err != nil {
				return fmt.Errorf("slot %d: %w", slot, err)
			}
			if m.used {
				if o, dup := seen[m.id]; dup {
					return fmt.Errorf("slots %d and %d both hold chunk %v: %w", o, slot, m.id, ErrCorrupt)
				}
				seen[m.id] = int32(slot)
				s.used.Add(1)
			}
		}
	}
	for i := n - 1; i >= 0; i-- {
		if !s.slots[i].used {
			s.free = append(s.free, uint32(i))
		}
	}
	if sb.flags&sbFlagClean == 0 {
		if err := s.recover(buf); err != nil {
			return err
		}
	}
	sb.flags &^= sbFlagClean
	return s.writeSuperblock(buf[:engine.BlockSize])
}

// recover runs after an unclean shutdown. Slots listed in the activity log
// may have had writes in flight: for each written block of theirs whose CRC
// does not match the disk, it adopts the CRC of what is on disk. Such a block
// was being written when the store stopped, so it holds either the old or
// the new data, both acceptable for an unflushed write. If a log block is
// torn, every used slot is checked.
func (s *Store) recover(buf []byte) error {
	if _, err := s.f.ReadAt(buf[:alBlocks*engine.BlockSize], alOff); err != nil {
		return fmt.Errorf("recovery: read activity log: %w", err)
	}
	var list []uint32
	full := false
	for i := 0; i < alBlocks; i++ {
		var ok bool
		if list, ok = decodeAL(buf[i*engine.BlockSize:(i+1)*engine.BlockSize], s.tab, list); !ok {
			s.log.Warn("store: activity log block torn; checking every used slot", "path", s.path, "block", i)
			full = true
		}
	}
	if full {
		list = list[:0]
		for i := range s.slots {
			list = append(list, uint32(i))
		}
	}
	fixed, slots, checked, zeroed := 0, 0, 0, 0
	for _, i := range list {
		if int(i) >= len(s.slots) {
			return fmt.Errorf("recovery: activity log names slot %d of %d: %w", i, len(s.slots), ErrCorrupt)
		}
		m := &s.slots[i]
		if !m.used {
			// A free slot still listed may have been freed by a discard
			// whose punch was not durable yet, or taken by a write whose
			// header did not land: zero it, so that the chunk that takes
			// it next cannot inherit its data. With a torn log every slot
			// is listed; then only slots that were ever used are looked at.
			if full && m.changes == 0 {
				continue
			}
			if _, err := s.f.ReadAt(buf[:s.chunk], s.dataOff(int32(i))); err != nil {
				return fmt.Errorf("recovery: read free slot %d: %w", i, err)
			}
			if allZero(buf[:s.chunk]) {
				continue
			}
			if err := s.zeroSlot(int32(i), buf); err != nil {
				return fmt.Errorf("recovery: %w", err)
			}
			zeroed++
			continue
		}
		checked++
		if _, err := s.f.ReadAt(buf[:s.chunk], s.dataOff(int32(i))); err != nil {
			return fmt.Errorf("recovery: read slot %d: %w", i, err)
		}
		// Its header may be behind its data or ahead of it: its version
		// is unknown from now on.
		changed := !m.ver.IsZero()
		m.ver = Version{}
		for b := 0; b < s.blocks; b++ {
			if !m.bit(b) {
				continue
			}
			if c := crc32c.Checksum(buf[b*engine.BlockSize : (b+1)*engine.BlockSize]); c != m.crcs[b] {
				m.crcs[b] = c
				changed = true
				fixed++
			}
		}
		if changed {
			slots++
			m.changes++
			m.encode(buf[:engine.BlockSize], s.blocks, s.tab)
			if _, err := s.f.WriteAt(buf[:engine.BlockSize], s.hdrOff(int32(i))); err != nil {
				return fmt.Errorf("recovery: write slot %d header: %w", i, err)
			}
		}
	}
	if err := unix.Fdatasync(int(s.fd)); err != nil {
		return fmt.Errorf("recovery: fdatasync: %w", err)
	}
	if s.onRecover != nil {
		var lost []ChunkID
		for _, i := range list {
			if m := &s.slots[i]; m.used {
				lost = append(lost, m.id)
			}
		}
		if err := s.onRecover(lost); err != nil {
			return fmt.Errorf("recovery: %w", err)
		}
	}
	// The log has done its job: every listed slot now verifies.
	clear(buf[:alBlocks*engine.BlockSize])
	if _, err := s.f.WriteAt(buf[:alBlocks*engine.BlockSize], alOff); err != nil {
		return fmt.Errorf("recovery: clear activity log: %w", err)
	}
	s.recChecked, s.recFixed = int64(checked), int64(fixed)
	s.log.Warn("store: recovered after unclean shutdown", "path", s.path, "slots_checked", checked,
		"blocks_rechecksummed", fixed, "slots_fixed", slots, "free_slots_zeroed", zeroed)
	return nil
}

// allZero reports whether b holds only zero bytes.
func allZero(b []byte) bool {
	for len(b) >= 8 {
		if binary.LittleEndian.Uint64(b) != 0 {
			return false
		}
		b = b[8:]
	}
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// zeroSlot makes the data region of slot read as zeros: a punched hole,
// else a zeroed range, else written zeros (buf is scratch memory). It runs
// only at open, before the shards start.
func (s *Store) zeroSlot(slot int32, buf []byte) error {
	off := s.dataOff(slot)
	err := unix.Fallocate(int(s.fd), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, s.chunk)
	if err == nil {
		return nil
	}
	if err = unix.Fallocate(int(s.fd), unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, off, s.chunk); err == nil {
		return nil
	}
	clear(buf)
	for done := int64(0); done < s.chunk; {
		n := min(int64(len(buf)), s.chunk-done)
		if _, err := s.f.WriteAt(buf[:n], off+done); err != nil {
			return fmt.Errorf("zero free slot %d: %w", slot, err)
		}
		done += n
	}
	return nil
}

func (s *Store) writeSuperblock(buf []byte) error {
	s.sb.encode(buf, s.tab)
	if _, err := s.f.WriteAt(buf, 0); err != nil {
		return fmt.Errorf("write superblock: %w", err)
	}
	if err := unix.Fdatasync(int(s.fd)); err != nil {
		return fmt.Errorf("fdatasync superblock: %w", err)
	}
	return nil
}

// allocSlot takes a free slot for id, or returns -1 when none is left.
func (s *Store) allocSlot(id ChunkID) int32 {
	s.freeMu.Lock()
	n := len(s.free)
	if n == 0 {
		s.freeMu.Unlock()
		return -1
	}
	slot := s.free[n-1]
	s.free = s.free[:n-1]
	s.freeMu.Unlock()
	m := &s.slots[slot]
	m.id = id
	m.used = true
	m.alState, m.alPos1, m.alWriters = alCold, 0, 0
	m.dirty, m.hdrFail, m.hdrEpoch = false, false, 0
	m.fresh = true
	m.changes++
	m.ver = Version{}
	m.written = [len(m.written)]uint64{}
	clear(m.crcs)
	s.used.Add(1)
	return int32(slot)
}

// releaseSlot returns a slot whose free header is on disk; the caller must
// not touch it afterwards.
func (s *Store) releaseSlot(slot int32) {
	s.used.Add(-1)
	s.freeMu.Lock()
	s.free = append(s.free, uint32(slot))
	s.freeMu.Unlock()
}

// shardOfIndex picks the shard of a chunk.
// Every snapshot copy of a chunk (any Snap) is on the head's shard, which
// resolves AsOf reads and lists them.
func (s *Store) shardOfIndex(id ChunkID) int {
	h := id.Volume*0x9e3779b97f4a7c15 ^ id.Index*0xbf58476d1ce4e5b9
	h ^= h >> 31
	return int(h % uint64(s.nshards))
}

func (s *Store) shardOf(id ChunkID) *shard { return s.shards[s.shardOfIndex(id)] }

// Submit starts op; op.Done is called exactly once, possibly on another
// goroutine and possibly before Submit returns. Submit does not allocate.
func (s *Store) Submit(op *ChunkOp) {
	op.sh = nil
	if err := s.check(op); err != nil {
		op.Done.CompleteChunk(op, err)
		return
	}
	s.shardOf(op.Chunk).push(op)
}

// check returns the error op completes with without being issued: a closed
// store, or a range, length or op the store does not take.
func (s *Store) check(op *ChunkOp) error {
	if s.closed.Load() {
		return engine.ErrClosed
	}
	if op.Op == engine.OpFlush {
		return nil
	}
	if op.Off < 0 || op.Length <= 0 || op.Off%engine.BlockSize != 0 || op.Length%engine.BlockSize != 0 ||
		op.Off+op.Length > s.chunk {
		return engine.ErrRange
	}
	if (op.Op == engine.OpRead || op.Op == engine.OpWrite) && int64(len(op.Buf)) != op.Length {
		return engine.ErrRange
	}
	switch op.Op {
	case engine.OpRead, engine.OpWrite, engine.OpDiscard, engine.OpWriteZeroes:
		return nil
	}
	return engine.ErrRange
}

// Close waits for submitted ops, writes dirty slot headers, makes completed
// writes durable, records a clean shutdown in the superblock and closes the
// store.
func (s *Store) Close() error {
	s.closeMu.Lock()
	defer s.closeMu.Unlock()
	if s.closed.Swap(true) {
		return engine.ErrClosed
	}
	s.stopShards()
	var errs []error
	if n := s.dirtyLeft.Load(); n > 0 {
		// The activity log still lists these slots, so the next open
		// recovers their CRCs; the store must not be marked clean.
		errs = append(errs, fmt.Errorf("close store %s: %d slot headers could not be written", s.path, n))
		if err := unix.Fdatasync(int(s.fd)); err != nil {
			errs = append(errs, fmt.Errorf("close store %s: fdatasync: %w", s.path, err))
		}
	} else if err := unix.Fdatasync(int(s.fd)); err != nil {
		errs = append(errs, fmt.Errorf("close store %s: fdatasync: %w", s.path, err))
	} else if buf, err := alignbuf.Alloc(engine.BlockSize); err != nil {
		errs = append(errs, err)
	} else {
		s.plSynced(math.MaxUint64) // everything written is durable now
		s.sb.flags |= sbFlagClean
		if err := s.writeSuperblock(buf); err != nil {
			errs = append(errs, fmt.Errorf("close store %s: %w", s.path, err))
		}
		alignbuf.Free(buf)
	}
	if err := s.f.Close(); err != nil {
		errs = append(errs, fmt.Errorf("close store %s: %w", s.path, err))
	}
	return errors.Join(errs...)
}

func (s *Store) startShards(n int) error {
	if n <= 0 {
		n = runtime.NumCPU()
	}
	n = min(n, alShards)
	s.nshards = n
	for i := 0; i < n; i++ {
		sh, err := newShard(s, i)
		if err != nil {
			return err
		}
		s.shards = append(s.shards, sh)
	}
	return nil
}

func (s *Store) stopShards() {
	// s.shards stays: a stopped shard refuses ops with engine.ErrClosed.
	for _, sh := range s.shards {
		sh.stop()
	}
}
