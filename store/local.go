package store

// Local is an engine.Volume kept in one node store on this machine.
//
// Invariants:
//   - An engine.Request is split at chunk boundaries into parts taken from a
//     fixed pool (a buffered channel); the first part is the request's
//     parent and goes back to the pool last, after the request completed.
//   - parent.remaining counts unfinished parts plus one for the submitter,
//     which drops it after the last part is submitted, so the request never
//     completes while Submit is still splitting it.
//   - The first error of any part is the request's error.
//   - A request submitted through a ShardDriver (parent.home set) completes
//     on the driver's thread: the part that finishes it last does so only if
//     it runs on a shard that driver drives; otherwise it pushes the parent
//     to the driver's first shard as an opDeliver op. Driver submits never
//     block for a part: when the pool is empty they make one, and a part
//     returned to a full pool is dropped (no allocation while the pool
//     suffices).

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"

	"github.com/torus-storage/torus/engine"
)

// LocalOptions configure OpenLocal.
type LocalOptions struct {
	// ChunkSize of a new store (default 1 MiB).
	ChunkSize int64
	// Slots of a new store; 0 means enough chunks for the whole volume. Fewer
	// makes a thin store that fails writes with engine.ErrNoSpace when full.
	Slots int64
	// Shards is the number of io_uring shards (default runtime.NumCPU()).
	Shards int
	// Parts is the number of chunk sub-requests in flight at most (default
	// 1024); Submit blocks when all are in use.
	Parts int
	// ForceBuffered opens the store without O_DIRECT (for tests and for
	// filesystems that refuse it, which is also detected).
	ForceBuffered bool
	// Logger receives warnings (default slog.Default()).
	Logger *slog.Logger
}

// Local is an engine.Volume stored in one node store file or block device.
type Local struct {
	st    *Store
	size  int64
	chunk int64
	parts chan *part
	all   []part
}

type part struct {
	ChunkOp
	l         *Local
	parent    *part
	req       *engine.Request
	remaining atomic.Int32
	mu        sync.Mutex
	err       error
	home      *ShardDriver // parent only: deliver on this driver's thread
}

var _ engine.Volume = (*Local)(nil)

// OpenLocal opens the local volume store at path (a file or block device),
// creating it for a volume of size bytes if it does not exist. An existing
// store must have been made for the same size.
func OpenLocal(path string, size int64, opt LocalOptions) (*Local, error) {
	if size <= 0 || size%engine.BlockSize != 0 {
		return nil, fmt.Errorf("volume size %d is not a positive multiple of %d bytes", size, engine.BlockSize)
	}
	sopt := StoreOptions{ChunkSize: opt.ChunkSize, Slots: opt.Slots, VolumeSize: size,
		Shards: opt.Shards, ForceBuffered: opt.ForceBuffered, Logger: opt.Logger}
	var st *Store
	fi, err := os.Stat(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
		cs := opt.ChunkSize
		if cs == 0 {
			cs = DefaultChunkSize
		}
		if sopt.Slots == 0 {
			sopt.Slots = (size + cs - 1) / cs
		}
		st, err = CreateStore(path, sopt)
	case err != nil:
		return nil, fmt.Errorf("store %s: %w", path, err)
	case fi.Mode()&os.ModeDevice != 0:
		st, err = OpenStore(path, sopt)
		if err != nil && errors.Is(err, ErrNotStore) && isZeroDevice(path) {
			st, err = CreateStore(path, sopt)
		}
	default:
		st, err = OpenStore(path, sopt)
	}
	if err != nil {
		return nil, err
	}
	if st.VolumeSize() != size {
		st.Close()
		return nil, fmt.Errorf("store %s was made for a %s volume, not %s: use --size %s or a new --store",
			path, humanSize(st.VolumeSize()), humanSize(size), flagSize(st.VolumeSize()))
	}
	n := opt.Parts
	if n <= 0 {
		n = 1024
	}
	l := &Local{st: st, size: size, chunk: st.ChunkSize(), parts: make(chan *part, n), all: make([]part, n)}
	for i := range l.all {
		p := &l.all[i]
		p.l = l
		p.Done = p
		l.parts <- p
	}
	return l, nil
}

func isZeroDevice(path string) bool {
	f, err := os.Open(path)
	if err != nil {
		return false
	}
	defer f.Close()
	var b [engine.BlockSize]byte
	if _, err := f.ReadAt(b[:], 0); err != nil {
		return false
	}
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// humanSize prints n in the largest binary unit that divides it.
func humanSize(n int64) string {
	for _, u := range []struct {
		s string
		m int64
	}{{"TiB", 1 << 40}, {"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10}} {
		if n >= u.m && n%u.m == 0 {
			return fmt.Sprintf("%d %s", n/u.m, u.s)
		}
	}
	return fmt.Sprintf("%d bytes", n)
}

func flagSize(n int64) string {
	s := humanSize(n)
	for i, c := range s {
		if c == ' ' {
			s = s[:i] + s[i+1:]
			break
		}
	}
	if len(s) > 5 && s[len(s)-5:] == "bytes" {
		s = s[:len(s)-5]
	}
	return s
}

// Store returns the store behind the volume (for tests and statistics).
func (l *Local) Store() *Store { return l.st }

// Size is the volume size in bytes.
func (l *Local) Size() int64 { return l.size }

// BlockSize is 4096.
func (l *Local) BlockSize() int { return engine.BlockSize }

// Submit starts r; it blocks only while all parts are in use.
func (l *Local) Submit(r *engine.Request) { l.submit(r, nil) }

// getPart takes a part from the pool; a driver never waits for one.
func (l *Local) getPart(d *ShardDriver) *part {
	if d == nil {
		return <-l.parts
	}
	select {
	case p := <-l.parts:
		return p
	default:
		p := &part{l: l}
		p.Done = p
		return p
	}
}

func (l *Local) putPart(p *part) {
	select {
	case l.parts <- p:
	default: // an extra part made by a driver
	}
}

func (l *Local) submitOp(op *ChunkOp, d *ShardDriver) {
	if d == nil {
		l.st.Submit(op)
		return
	}
	d.submitOp(op)
}

// submit starts r from an ordinary goroutine (d nil) or from driver d's
// thread.
func (l *Local) submit(r *engine.Request, d *ShardDriver) {
	if r.Op == engine.OpFlush {
		p := l.getPart(d)
		p.start(r, p, d)
		p.Op, p.Flags, p.Chunk, p.Off, p.Length, p.Buf = engine.OpFlush, r.Flags, ChunkID{}, 0, 0, nil
		p.remaining.Store(1)
		l.submitOp(&p.ChunkOp, d)
		return
	}
	if r.Offset < 0 || r.Length <= 0 || r.Offset%engine.BlockSize != 0 || r.Length%engine.BlockSize != 0 ||
		r.Offset > l.size || r.Length > l.size-r.Offset {
		r.Done.Complete(r, engine.ErrRange)
		return
	}
	switch r.Op {
	case engine.OpRead, engine.OpWrite:
		if int64(len(r.Buf)) != r.Length {
			r.Done.Complete(r, engine.ErrRange)
			return
		}
	case engine.OpDiscard, engine.OpWriteZeroes:
	default:
		r.Done.Complete(r, engine.ErrRange)
		return
	}
	parent := l.getPart(d)
	parent.start(r, parent, d)
	parent.remaining.Store(1)
	off, end := r.Offset, r.Offset+r.Length
	p := parent
	for off < end {
		if p == nil {
			p = l.getPart(d)
			p.start(r, parent, nil)
		}
		idx := off / l.chunk
		in := off - idx*l.chunk
		n := min(l.chunk-in, end-off)
		p.Op, p.Flags, p.Off, p.Length, p.Ver = r.Op, r.Flags&^engine.FlagCopy, in, n, Version{}
		p.Chunk = ChunkID{Index: uint64(idx)}
		p.Buf = nil
		if r.Op == engine.OpRead || r.Op == engine.OpWrite {
			b := off - r.Offset
			p.Buf = r.Buf[b : b+n : b+n]
		}
		parent.remaining.Add(1)
		off += n
		l.submitOp(&p.ChunkOp, d)
		p = nil
	}
	var cur *shard
	if d != nil {
		cur = d.shards[0]
	}
	parent.done(cur)
}

func (p *part) start(r *engine.Request, parent *part, home *ShardDriver) {
	p.req, p.parent, p.err, p.home = r, parent, nil, home
	if home != nil {
		home.pending++
	}
}

// CompleteChunk records the part's result and finishes the request after its
// last part; for an opDeliver op it completes the request.
func (p *part) CompleteChunk(op *ChunkOp, err error) {
	if p.Op == opDeliver {
		p.deliver()
		return
	}
	parent := p.parent
	if err != nil {
		parent.mu.Lock()
		if parent.err == nil {
			parent.err = err
		}
		parent.mu.Unlock()
	}
	p.Buf = nil
	if p != parent {
		p.req, p.parent = nil, nil
		p.l.putPart(p)
	}
	parent.done(op.sh)
}

// done drops one reference of parent p; cur is the shard whose owner thread
// runs the call (nil: not a shard thread).
func (p *part) done(cur *shard) {
	if p.remaining.Add(-1) != 0 {
		return
	}
	if p.home != nil && (cur == nil || cur.driver != p.home) {
		p.Op = opDeliver
		p.home.shards[0].push(&p.ChunkOp)
		return
	}
	p.deliver()
}

// deliver completes the request of parent p.
func (p *part) deliver() {
	r, err := p.req, p.err
	if p.home != nil {
		p.home.pending--
	}
	p.req, p.parent, p.err, p.home = nil, nil, nil, nil
	p.l.putPart(p)
	r.Done.Complete(r, err)
}

// Close waits for in-flight requests, makes completed writes durable and
// closes the store.
func (l *Local) Close() error {
	return l.st.Close()
}
