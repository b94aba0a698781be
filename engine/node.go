package engine

// NodeServer serves a Store's chunks over netquic with the chunk protocol of
// internal/wire.
//
// Invariants:
//   - Every request is validated (known op, well-formed header, range inside
//     the store's chunk, payload length) before anything reaches the store;
//     a bad one is answered with StatusBadRequest or StatusRange and changes
//     nothing.
//   - No goroutine per request: Serve runs on the stream's reader goroutine,
//     submits one pooled nodeOp to the Store and returns; the store's
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
//   - Chunk versions: a write-class request's version reaches the store
//     with it (the store keeps the newest, or exactly a copy's and refuses
//     an older copy); an OK read reply carries the version the chunk had
//     when the read started, a refused copy's reply the chunk's version.

import (
	"errors"
	"log/slog"
	"math/rand/v2"
	"sync"
	"sync/atomic"

	"github.com/torus-storage/torus/internal/wire"
	"github.com/torus-storage/torus/iouring"
	"github.com/torus-storage/torus/netquic"
)

// ErrFenced is reported for a write refused by a storage node because a
// newer writer attached the volume (its attach epoch is higher), and for
// every request to a Cluster that learnt so (Cluster.Fence).
var ErrFenced = errors.New("engine: writer fenced: the volume was attached again by a newer holder; stop writing and re-attach")

// NodeServerOptions configure NewNodeServer.
type NodeServerOptions struct {
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

// NodeStats are a NodeServer's counters since it started.
type NodeStats struct {
	Reads, Writes, ReadBytes, WriteBytes, Flushes, Discards uint64
	// Errors counts requests answered with any status but OK; NoSpace and
	// StaleEpoch count two kinds of them.
	Errors, NoSpace, StaleEpoch uint64
}

// NodeServer serves a Store's chunks to clients over netquic; it implements
// netquic.Handler.
type NodeServer struct {
	st    *Store
	id    string
	log   *slog.Logger
	chunk int64

	ops    sync.Pool // *nodeOp
	epochs sync.Map  // volume id → *volEpoch
	// boot is the header of every OK reply: Epoch holds the node's
	// incarnation (NodeServerOptions.Incarnation), so a client sees that
	// the node may have lost writes it had not flushed.
	boot [wire.HeaderSize]byte

	reads, writes, readBytes, writeBytes, flushes, discards atomic.Uint64
	errs, noSpace, stale                                    atomic.Uint64
}

var _ netquic.Handler = (*NodeServer)(nil)

type volEpoch struct {
	mu sync.RWMutex
	e  atomic.Uint64 // written under mu's write lock
}

// nodeOp is one request in flight to the store.
type nodeOp struct {
	ChunkOp
	n   *NodeServer
	r   *netquic.ServerRequest
	wop wire.Op
}

// NewNodeServer returns a server of st's chunks. Serve it with
// netquic.Listen(addr, tls, n, opts).
func NewNodeServer(st *Store, opt NodeServerOptions) *NodeServer {
	n := &NodeServer{st: st, id: opt.NodeID, log: opt.Logger, chunk: st.ChunkSize()}
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
func (n *NodeServer) Stats() NodeStats {
	return NodeStats{
		Reads: n.reads.Load(), Writes: n.writes.Load(), ReadBytes: n.readBytes.Load(),
		WriteBytes: n.writeBytes.Load(), Flushes: n.flushes.Load(), Discards: n.discards.Load(),
		Errors: n.errs.Load(), NoSpace: n.noSpace.Load(), StaleEpoch: n.stale.Load(),
	}
}

// Epoch returns the highest attach epoch known for volume (0 if none).
func (n *NodeServer) Epoch(volume uint64) uint64 { return wire.AttachEpoch(n.fenceEpoch(volume)) }

// fenceEpoch returns the highest fence epoch (wire.FenceEpoch) known for
// volume.
func (n *NodeServer) fenceEpoch(volume uint64) uint64 {
	if v, ok := n.epochs.Load(volume); ok {
		return v.(*volEpoch).e.Load()
	}
	return 0
}

func (n *NodeServer) volEpoch(volume uint64) *volEpoch {
	if v, ok := n.epochs.Load(volume); ok {
		return v.(*volEpoch)
	}
	v, _ := n.epochs.LoadOrStore(volume, &volEpoch{})
	return v.(*volEpoch)
}

// RaiseEpoch records that requests for volume must come from attach epoch
// e or later (from etcd: at start-up, and whenever a holder attaches). A
// lower e than the current one changes nothing.
func (n *NodeServer) RaiseEpoch(volume, e uint64) { n.raise(volume, wire.FenceEpoch(e, 0)) }

// raise records that requests for volume must carry fence epoch e or
// higher (a fence, or a request with a higher one).
func (n *NodeServer) raise(volume, e uint64) {
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
func (n *NodeServer) Serve(r *netquic.ServerRequest) {
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
		o.Op, o.Flags = OpFlush, 0
		o.Chunk, o.Off, o.Length, o.Buf = ChunkID{}, 0, 0, nil
		n.flushes.Add(1)
		n.submit(r, &o.ChunkOp)
		return
	}
	if h.Snap != 0 {
		n.fail(r, wire.StatusBadRequest, errors.New("snapshots are not served yet"))
		return
	}
	if int64(h.Off)+int64(h.Len) > n.chunk {
		n.fail(r, wire.StatusRange, nil)
		return
	}
	o := n.get(r, op)
	o.Chunk = ChunkID{Volume: h.Volume, Index: h.Index}
	o.Off, o.Length = int64(h.Off), int64(h.Len)
	o.Flags = 0
	if h.Flags&wire.FlagFUA != 0 {
		o.Flags |= FlagFUA
	}
	if h.Flags&wire.FlagNoUnmap != 0 {
		o.Flags |= FlagNoUnmap
	}
	if h.Flags&wire.FlagCopy != 0 {
		o.Flags |= FlagCopy
	}
	o.Ver = Version{Epoch: h.VerEpoch, Seq: h.VerSeq}
	switch op {
	case wire.OpRead:
		buf, err := r.Buffer(int(h.Len))
		if err != nil {
			n.put(o)
			n.fail(r, wire.StatusIO, err)
			return
		}
		o.Op, o.Buf, o.Ver = OpRead, buf, Version{}
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
		o.Op, o.Buf = OpWrite, r.Payload
	case wire.OpDiscard:
		o.Op, o.Buf = OpDiscard, nil
	case wire.OpWriteZeroes:
		o.Op, o.Buf = OpWriteZeroes, nil
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
			if op == wire.OpWrite {
				n.writes.Add(1)
				n.writeBytes.Add(uint64(h.Len))
			} else {
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

// submit starts op: on the ring thread of a unix connection that drives
// the store's shards (AttachRing), straight on those shards; otherwise
// through the shards' queues.
func (n *NodeServer) submit(r *netquic.ServerRequest, op *ChunkOp) {
	if d, ok := r.Driver().(*ShardDriver); ok {
		d.SubmitChunk(op)
		return
	}
	n.st.Submit(op)
}

// AttachRing implements netquic.RingHandler: the unix connection whose
// thread owns r runs every shard of the node's store on r, so a request
// from a client on this host is read, issued, completed and answered on
// that one thread. Only one connection drives the shards at a time; the
// others (and every QUIC stream) reach them through their queues.
func (n *NodeServer) AttachRing(r *iouring.Ring) (netquic.RingDriver, error) {
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

func (n *NodeServer) get(r *netquic.ServerRequest, op wire.Op) *nodeOp {
	o := n.ops.Get().(*nodeOp)
	o.r, o.wop = r, op
	return o
}

func (n *NodeServer) put(o *nodeOp) {
	o.r, o.Buf = nil, nil
	n.ops.Put(o)
}

// fail answers r with status s; err (optional) is logged at debug level.
func (n *NodeServer) fail(r *netquic.ServerRequest, s wire.Status, err error) {
	n.errs.Add(1)
	if err != nil {
		n.log.Debug("node: bad request", "node", n.id, "peer", r.PeerName(), "op", wire.Op(r.Code).String(), "err", err)
	}
	_ = r.Reply(uint8(s), nil, nil)
}

func (n *NodeServer) staleReply(r *netquic.ServerRequest, cur uint64) {
	n.errs.Add(1)
	var hb [wire.HeaderSize]byte
	h := wire.Header{Epoch: cur}
	h.Encode(&hb)
	_ = r.Reply(uint8(wire.StatusStaleEpoch), &hb, nil)
}

// CompleteChunk answers the request of o from the store's completion.
func (o *nodeOp) CompleteChunk(_ *ChunkOp, err error) {
	n, r := o.n, o.r
	var payload []byte
	s := wire.StatusOK
	if err != nil {
		s = statusOf(err)
		n.errs.Add(1)
		if s == wire.StatusNoSpace {
			n.noSpace.Add(1)
			n.log.Warn("node: out of space: write refused", "node", n.id, "chunk", o.Chunk)
		} else if s == wire.StatusNewer {
			n.log.Info("node: rebuild copy refused: the chunk holds a newer version", "node", n.id, "chunk", o.Chunk, "err", err)
		} else if s != wire.StatusRange {
			n.log.Warn("node: chunk I/O failed", "node", n.id, "op", o.wop.String(), "chunk", o.Chunk, "err", err)
		}
	} else if o.wop == wire.OpRead {
		payload = o.Buf
	}
	switch {
	case s == wire.StatusOK && o.wop == wire.OpRead, s == wire.StatusNewer:
		// The chunk's version, with the incarnation.
		hb := n.boot
		wire.SetVersion(&hb, o.Ver.Epoch, o.Ver.Seq)
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

// statusOf maps a store error to a wire status.
func statusOf(err error) wire.Status {
	switch {
	case err == nil:
		return wire.StatusOK
	case errors.Is(err, ErrRange):
		return wire.StatusRange
	case errors.Is(err, ErrNoSpace):
		return wire.StatusNoSpace
	case errors.Is(err, ErrChecksum):
		return wire.StatusChecksum
	case errors.Is(err, ErrFenced):
		return wire.StatusStaleEpoch
	case errors.Is(err, ErrNewer):
		return wire.StatusNewer
	}
	return wire.StatusIO
}

// errOf maps a wire status to the engine error a Volume reports.
func errOf(s wire.Status) error {
	switch s {
	case wire.StatusOK:
		return nil
	case wire.StatusRange:
		return ErrRange
	case wire.StatusNoSpace:
		return ErrNoSpace
	case wire.StatusChecksum:
		return ErrChecksum
	case wire.StatusStaleEpoch:
		return ErrFenced
	case wire.StatusBadRequest:
		return errBadRequest
	case wire.StatusNewer:
		return ErrNewer
	}
	return errNodeIO
}

var (
	errNodeIO     = errors.New("engine: I/O error on the storage node (see its log)")
	errBadRequest = errors.New("engine: storage node refused a malformed request (client and node versions differ?)")
)
