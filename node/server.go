package node

// Server serves a store.Store's chunks over netquic with the chunk protocol
// of internal/wire.
//
// Invariants:
//   - Every request is validated (known op, well-formed header, range inside
//     the store's chunk, payload length) before anything reaches the store;
//     a bad one is answered with StatusBadRequest or StatusRange and changes
//     nothing.
//   - No goroutine per request: Serve runs on the stream's reader goroutine,
//     submits one pooled nodeOp to the store.Store and returns; the store's
//     completion replies and returns the nodeOp to the pool.
//   - Epoch fencing: epochs[volume] only grows. A write, discard or
//     write-zeroes is checked against it and submitted to the store while
//     holding the volume's read lock; a raise (fence, or a write with a
//     higher epoch) takes the write lock. So once a fence is answered, every
//     write with an older epoch was either submitted to the store before it
//     (and the store keeps overlapping ops in submission order) or is
//     refused with StatusStaleEpoch without touching the store.
//   - Epochs are fence epochs (wire.FenceEpoch): the attach epoch above the
//     client's fence generation for this node. Reads are refused below the
//     volume's epoch too (no lock: a read changes nothing, and a read that
//     passed just before a fence returns data from before it). Flushes
//     carry no epoch check.
//   - Snapshot copies (chunks with Snap > 0) change only by an OpClone (the
//     head read whole, then written as the copy unless one exists, FUA) or
//     by a rebuild's copy or discard, all fenced like writes; an as-of read
//     is not fenced (it reads data that never changes: a copy, or a head no
//     change has touched since the snapshot, which the store orders before
//     any later write of it).
//   - Chunk versions: a write-class request's version reaches the store
//     with it (the store keeps the newest, or exactly a copy's and refuses
//     an older copy); an OK read reply carries the version the chunk had
//     when the read started, a refused copy's reply the chunk's version.

import (
	"log/slog"
	"math/rand/v2"
	"sync"
	"sync/atomic"

	"github.com/torus-storage/torus/engine"
	"github.com/torus-storage/torus/internal/wire"
	"github.com/torus-storage/torus/iouring"
	"github.com/torus-storage/torus/netquic"
	"github.com/torus-storage/torus/store"
)

// ServerOptions configure NewServer.
type ServerOptions struct {
	// NodeID names the node in logs and errors.
	NodeID string
	// Logger receives warnings (default slog.Default()).
	Logger *slog.Logger
	// Incarnation is carried by every OK reply. A client that sees it
	// change takes the node to have lost every write no flush covered, so
	// it must change whenever that may be so (a power loss, a new store)
	// and may stay the same across a restart of the process alone, which
	// loses nothing the kernel took. Zero draws a new one.
	Incarnation uint64
}

// Stats are a Server's counters since it started.
type Stats struct {
	Reads, Writes, ReadBytes, WriteBytes, Flushes, Discards uint64
	// Clones counts snapshot copies asked for (OpClone).
	Clones uint64
	// Errors counts requests answered with any status but OK; NoSpace and
	// StaleEpoch count two kinds of them.
	Errors, NoSpace, StaleEpoch uint64
}

// Server serves a store.Store's chunks to clients over netquic; it implements
// netquic.Handler.
type Server struct {
	st    *store.Store
	id    string
	log   *slog.Logger
	chunk int64

	ops    sync.Pool // *nodeOp
	epochs sync.Map  // volume id → *volEpoch
	// boot is the header of every OK reply: Epoch holds the node's
	// incarnation (ServerOptions.Incarnation), so a client sees that
	// the node may have lost writes it had not flushed.
	boot [wire.HeaderSize]byte

	reads, writes, readBytes, writeBytes, flushes, discards atomic.Uint64
	errs, noSpace, stale                                    atomic.Uint64
	clones                                                  atomic.Uint64
}

var _ netquic.Handler = (*Server)(nil)

type volEpoch struct {
	mu sync.RWMutex
	e  atomic.Uint64 // written under mu's write lock
}

// nodeOp is one request in flight to the store.
type nodeOp struct {
	store.ChunkOp
	n   *Server
	r   *netquic.ServerRequest
	wop wire.Op
	// snap is, for an OpClone, the snapshot number of the copy; it is set
	// while the head is read and zero once the copy is being written.
	snap uint64
	// ifHead: an OpClone with FlagIfHead.
	ifHead bool
}

// NewServer returns a server of st's chunks. Serve it with
// netquic.Listen(addr, tls, n, opts).
func NewServer(st *store.Store, opt ServerOptions) *Server {
	n := &Server{st: st, id: opt.NodeID, log: opt.Logger, chunk: st.ChunkSize()}
	inc := opt.Incarnation
	if inc == 0 {
		inc = rand.Uint64() | 1
	}
	boot := wire.Header{Epoch: inc}
	boot.Encode(&n.boot)
	if n.log == nil {
		n.log = slog.Default()
	}
	n.ops.New = func() any {
		o := &nodeOp{n: n}
		o.Done = o
		return o
	}
	return n
}

// Stats returns the server's counters.
func (n *Server) Stats() Stats {
	return Stats{
		Reads: n.reads.Load(), Writes: n.writes.Load(), ReadBytes: n.readBytes.Load(),
		WriteBytes: n.writeBytes.Load(), Flushes: n.flushes.Load(), Discards: n.discards.Load(), Clones: n.clones.Load(),
		Errors: n.errs.Load(), NoSpace: n.noSpace.Load(), StaleEpoch: n.stale.Load(),
	}
}

// Epoch returns the highest attach epoch known for volume (0 if none).
func (n *Server) Epoch(volume uint64) uint64 { return wire.AttachEpoch(n.fenceEpoch(volume)) }

// fenceEpoch returns the highest fence epoch (wire.FenceEpoch) known for
// volume.
func (n *Server) fenceEpoch(volume uint64) uint64 {
	if v, ok := n.epochs.Load(volume); ok {
		return v.(*volEpoch).e.Load()
	}
	return 0
}

func (n *Server) volEpoch(volume uint64) *volEpoch {
	if v, ok := n.epochs.Load(volume); ok {
		return v.(*volEpoch)
	}
	v, _ := n.epochs.LoadOrStore(volume, &volEpoch{})
	return v.(*volEpoch)
}

// RaiseEpoch records that requests for volume must come from attach epoch
// e or later (from etcd: at start-up, and whenever a holder attaches). A
// lower e than the current one changes nothing.
func (n *Server) RaiseEpoch(volume, e uint64) { n.raise(volume, wire.FenceEpoch(e, 0)) }

// raise records that requests for volume must carry fence epoch e or
// higher (a fence, or a request with a higher one).
func (n *Server) raise(volume, e uint64) {
	v := n.volEpoch(volume)
	if v.e.Load() >= e {
		return
	}
	v.mu.Lock()
	if v.e.Load() < e {
		v.e.Store(e)
	}
	v.mu.Unlock()
}

// Serve handles one request; it implements netquic.Handler.
func (n *Server) Serve(r *netquic.ServerRequest) {
	op := wire.Op(r.Code)
	var h wire.Header
	if err := wire.Decode(op, &r.Header, &h); err != nil {
		n.fail(r, wire.StatusBadRequest, err)
		return
	}
	if err := wire.CheckPayload(op, &h, len(r.Payload)); err != nil {
		n.fail(r, wire.StatusRange, err)
		return
	}
	switch op {
	case wire.OpHello:
		_ = r.Reply(uint8(wire.StatusOK), &n.boot, []byte(n.id))
		return
	case wire.OpFence:
		n.raise(h.Volume, h.Epoch)
		if cur := n.fenceEpoch(h.Volume); cur > h.Epoch {
			n.stale.Add(1)
			n.staleReply(r, cur)
			return
		}
		_ = r.Reply(uint8(wire.StatusOK), &n.boot, nil)
		return
	case wire.OpFlush:
		o := n.get(r, op)
		o.Op, o.Flags = engine.OpFlush, 0
		o.Chunk, o.Off, o.Length, o.Buf = store.ChunkID{}, 0, 0, nil
		n.flushes.Add(1)
		n.submit(r, &o.ChunkOp)
		return
	}
	if int64(h.Off)+int64(h.Len) > n.chunk {
		n.fail(r, wire.StatusRange, nil)
		return
	}
	o := n.get(r, op)
	o.Chunk = store.ChunkID{Volume: h.Volume, Index: h.Index, Snap: uint64(h.Snap)}
	o.Off, o.Length = int64(h.Off), int64(h.Len)
	o.Flags = 0
	if h.Flags&wire.FlagFUA != 0 {
		o.Flags |= engine.FlagFUA
	}
	if h.Flags&wire.FlagNoUnmap != 0 {
		o.Flags |= engine.FlagNoUnmap
	}
	if h.Flags&wire.FlagCopy != 0 {
		o.Flags |= engine.FlagCopy
	}
	o.IfAbsent = h.Flags&wire.FlagIfAbsent != 0
	o.Ver = store.Version{Epoch: h.VerEpoch, Seq: h.VerSeq}
	switch op {
	case wire.OpSnaps:
		buf, err := r.Buffer(wire.MaxSnapsListed * 8)
		if err != nil {
			n.put(o)
			n.fail(r, wire.StatusIO, err)
			return
		}
		o.Op, o.Buf, o.Off, o.Length, o.ListSnaps = engine.OpRead, buf, 0, int64(len(buf)), true
		n.submit(r, &o.ChunkOp)
		return
	case wire.OpRead:
		if h.Flags&wire.FlagAsOf != 0 {
			// Snapshot data never changes: no epoch, no fence.
			buf, err := r.Buffer(int(h.Len))
			if err != nil {
				n.put(o)
				n.fail(r, wire.StatusIO, err)
				return
			}
			o.Op, o.Buf, o.Ver, o.AsOf = engine.OpRead, buf, store.Version{}, true
			n.reads.Add(1)
			n.readBytes.Add(uint64(h.Len))
			n.submit(r, &o.ChunkOp)
			return
		}
		buf, err := r.Buffer(int(h.Len))
		if err != nil {
			n.put(o)
			n.fail(r, wire.StatusIO, err)
			return
		}
		o.Op, o.Buf, o.Ver = engine.OpRead, buf, store.Version{}
		// A read from a holder that was superseded is refused too: its
		// data may predate the new holder's writes.
		v := n.volEpoch(h.Volume)
		for {
			cur := v.e.Load()
			if h.Epoch < cur {
				n.put(o)
				n.stale.Add(1)
				n.staleReply(r, cur)
				return
			}
			if h.Epoch == cur {
				break
			}
			n.raise(h.Volume, h.Epoch)
		}
		n.reads.Add(1)
		n.readBytes.Add(uint64(h.Len))
		n.submit(r, &o.ChunkOp)
		return
	case wire.OpWrite:
		o.Op, o.Buf = engine.OpWrite, r.Payload
	case wire.OpDiscard:
		o.Op, o.Buf = engine.OpDiscard, nil
	case wire.OpWriteZeroes:
		o.Op, o.Buf = engine.OpWriteZeroes, nil
	case wire.OpClone:
		// First the head, whole; the copy is written when it is read.
		buf, err := r.Buffer(int(n.chunk))
		if err != nil {
			n.put(o)
			n.fail(r, wire.StatusIO, err)
			return
		}
		o.Op, o.Buf, o.Off, o.Length, o.Ver = engine.OpRead, buf, 0, n.chunk, store.Version{}
		o.Chunk.Snap = 0
		o.snap = uint64(h.Snap)
		o.ifHead = h.Flags&wire.FlagIfHead != 0
	}
	v := n.volEpoch(h.Volume)
	for {
		v.mu.RLock()
		cur := v.e.Load()
		if h.Epoch < cur {
			v.mu.RUnlock()
			n.put(o)
			n.stale.Add(1)
			n.staleReply(r, cur)
			return
		}
		if h.Epoch == cur {
			switch op {
			case wire.OpWrite:
				n.writes.Add(1)
				n.writeBytes.Add(uint64(h.Len))
			case wire.OpClone:
				n.clones.Add(1)
			default:
				n.discards.Add(1)
			}
			// Submit only queues the op (or completes it at once on
			// error), so the read lock is held briefly.
			n.submit(r, &o.ChunkOp)
			v.mu.RUnlock()
			return
		}
		v.mu.RUnlock()
		n.raise(h.Volume, h.Epoch)
	}
}

// submit starts op: on the uring thread of a unix connection that drives
// the store's shards (AttachUring), straight on those shards; otherwise
// through the shards' queues.
func (n *Server) submit(r *netquic.ServerRequest, op *store.ChunkOp) {
	if d, ok := r.Driver().(*store.ShardDriver); ok {
		d.SubmitChunk(op)
		return
	}
	n.st.Submit(op)
}

// AttachUring implements netquic.UringHandler: the unix connection whose
// thread owns r runs every shard of the node's store on r, so a request
// from a client on this host is read, issued, completed and answered on
// that one thread. Only one connection drives the shards at a time; the
// others (and every QUIC stream) reach them through their queues.
func (n *Server) AttachUring(r *iouring.Uring) (netquic.UringDriver, error) {
	ids := make([]int, n.st.Shards())
	for i := range ids {
		ids[i] = i
	}
	d, err := n.st.DriveShards(r, ids...)
	if err != nil {
		n.log.Debug("node: unix connection not driving the store", "node", n.id, "err", err)
		return nil, nil
	}
	return d, nil
}

func (n *Server) get(r *netquic.ServerRequest, op wire.Op) *nodeOp {
	o := n.ops.Get().(*nodeOp)
	o.r, o.wop = r, op
	return o
}

func (n *Server) put(o *nodeOp) {
	o.r, o.Buf = nil, nil
	o.AsOf, o.ListSnaps, o.IfAbsent, o.snap, o.ifHead = false, false, false, 0, false
	n.ops.Put(o)
}

// fail answers r with status s; err (optional) is logged at debug level.
func (n *Server) fail(r *netquic.ServerRequest, s wire.Status, err error) {
	n.errs.Add(1)
	if err != nil {
		n.log.Debug("node: bad request", "node", n.id, "peer", r.PeerName(), "op", wire.Op(r.Code).String(), "err", err)
	}
	_ = r.Reply(uint8(s), nil, nil)
}

func (n *Server) staleReply(r *netquic.ServerRequest, cur uint64) {
	n.errs.Add(1)
	var hb [wire.HeaderSize]byte
	h := wire.Header{Epoch: cur}
	h.Encode(&hb)
	_ = r.Reply(uint8(wire.StatusStaleEpoch), &hb, nil)
}

// CompleteChunk answers the request of o from the store's completion.
func (o *nodeOp) CompleteChunk(_ *store.ChunkOp, err error) {
	n, r := o.n, o.r
	if o.snap != 0 && err == nil && !o.Found && o.ifHead {
		// No head, and the change to come leaves the chunk absent: no copy.
		hb := n.boot
		wire.SetReplyFlags(&hb, wire.ReplyAbsent)
		n.put(o)
		_ = r.Reply(uint8(wire.StatusOK), &hb, nil)
		return
	}
	if o.snap != 0 && err == nil {
		// OpClone: the head is read; write it as the snapshot copy (a
		// copy: exactly the head's version), unless the copy exists. An
		// absent head gives a copy of one zero block, which reads as
		// zeros whole.
		o.Chunk.Snap, o.snap = o.snap, 0
		o.Op, o.Off = engine.OpWrite, 0
		o.Flags = engine.FlagCopy | engine.FlagFUA
		o.IfAbsent = true
		if !o.Found {
			o.Buf = o.Buf[:engine.BlockSize]
			clear(o.Buf)
			o.Ver = store.Version{}
		}
		o.Length = int64(len(o.Buf))
		n.submit(r, &o.ChunkOp)
		return
	}
	var payload []byte
	s := wire.StatusOK
	if err != nil {
		s = wire.StatusOf(err)
		n.errs.Add(1)
		if s == wire.StatusNoSpace {
			n.noSpace.Add(1)
			n.log.Warn("node: out of space: write refused", "node", n.id, "chunk", o.Chunk)
		} else if s == wire.StatusNewer {
			n.log.Info("node: rebuild copy refused: the chunk holds a newer version", "node", n.id, "chunk", o.Chunk, "err", err)
		} else if s != wire.StatusRange {
			n.log.Warn("node: chunk I/O failed", "node", n.id, "op", o.wop.String(), "chunk", o.Chunk, "err", err)
		}
	} else if o.wop == wire.OpRead || o.wop == wire.OpSnaps {
		payload = o.Buf
	}
	switch {
	case s == wire.StatusOK && o.wop == wire.OpRead, s == wire.StatusNewer:
		// The chunk's version, with the incarnation.
		hb := n.boot
		wire.SetVersion(&hb, o.Ver.Epoch, o.Ver.Seq)
		if o.AsOf {
			wire.SetReplySnap(&hb, uint32(o.From))
		}
		if s == wire.StatusOK && !o.Found {
			wire.SetReplyFlags(&hb, wire.ReplyAbsent)
		}
		n.put(o)
		_ = r.Reply(uint8(s), &hb, payload)
	case s == wire.StatusOK:
		n.put(o)
		_ = r.Reply(uint8(s), &n.boot, payload)
	default:
		n.put(o)
		_ = r.Reply(uint8(s), nil, payload)
	}
}
