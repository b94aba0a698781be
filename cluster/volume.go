package cluster

// Volume is a replicated engine.Volume whose chunks live on storage nodes
// (node.Server), placed by the ring kept in etcd.
//
// Invariants:
//   - An engine.Request is split at chunk boundaries into parts taken from a
//     fixed pool (a buffered channel of clusterParts, as many as one node
//     client has call slots, so an asynchronous call never waits for a slot
//     while the pool is respected). The first part is the request's parent
//     and goes back to the pool last, after the request completed; the
//     request's Completer runs after every part is back.
//   - parent.remaining counts unfinished parts plus one for the submitter,
//     which drops it after the last part is submitted; part.pending counts
//     unfinished calls of a part plus one for the code issuing them. So
//     nothing completes while Submit is still issuing it.
//   - A write, discard or write-zeroes part completes after every owner
//     (ring.Owners(ChunkKey(vol, index, 0), R), plus the owners under the
//     rings of a move in progress) answered; the first error of any owner
//     that is not a node failure is the part's error, and it succeeds only
//     if an owner without a missed mark for the chunk took it. Every such call carries the attach
//     epoch; a node that knows a newer one answers stale-epoch
//     (engine.ErrFenced) without changing anything.
//   - A peer is marked dirty when a write to it completes (before the
//     request's Completer runs); a Flush clears the mark of each dirty peer
//     before sending it a flush (and sets it again if the flush fails), so
//     every write completed before a Flush was submitted is covered by a
//     flush of every node that took it.
//   - A read part asks one owner at a time (the local node first, then in
//     ring order, peers recently failed last; never one that may be stale,
//     see rebuild.go) and moves to the next on any error but
//     engine.ErrRange, including timeouts, checksum errors and a reply from an
//     owner that turned out to be possibly stale (it restarted) or behind
//     (an older chunk version than a change acknowledged before the read
//     started, version.go); it fails only when every owner failed.
//   - The data path never takes c.mu: it reads the current clusterState (ring
//     and peer per ring node) through an atomic pointer, replaced as a whole
//     when the ring or the node registry changes.
//   - Once c learns that another holder attached the volume after it (Fence
//     by the caller, a node's stale-epoch answer, or an etcd write refused
//     by the attach lease's guard, meta.ErrNotHolder), c is fenced for good:
//     Submit fails every request, reads and flushes included, with
//     engine.ErrFenced, and the background work (rebuild, rebalance, scrub)
//     writes nothing more to the nodes or to etcd. Its marks, moves and the
//     data its user cached may predate the other holder's writes. On the data
//     path this costs one atomic load.

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/torus-storage/torus/engine"
	"github.com/torus-storage/torus/internal/wire"
	"github.com/torus-storage/torus/meta"
	"github.com/torus-storage/torus/netquic"
	"github.com/torus-storage/torus/ring"
	"github.com/torus-storage/torus/store"
)

// Options configure Open.
type Options struct {
	// TLS is the client side of mutual TLS (netquic.LoadTLS(dir).Client).
	TLS *tls.Config
	// Epoch is the attach epoch (meta.AttachLease.Epoch()); every write
	// carries it and nodes refuse writes with an older one.
	Epoch uint64
	// LocalNode is the ID of a node on this host whose replica reads
	// prefer (optional). When it registered a unix socket (meta.Node.Socket)
	// that answers as that node, every request to it goes over the socket
	// (netquic.TransportUnix) instead of QUIC: the same frames without the
	// UDP, TLS and QUIC stack.
	LocalNode string

	// Timeout bounds each request to one replica (default 5 s).
	Timeout time.Duration
	// Transport is the netquic transport (default QUIC).
	Transport string
	// Logger receives warnings (default slog.Default()).
	Logger *slog.Logger
	// RebuildRate bounds the bytes per second the rebuild of missed chunks
	// copies (default DefaultRebuildRate).
	RebuildRate int64
	// Holder names who runs the volume's background jobs in their progress
	// records (the attach lock's holder).
	Holder string
	// Snapshot, if not 0, opens a read-only view of the volume as of its
	// snapshot with this number (meta.Snapshot.ID): it needs no attach
	// lock and changes nothing, so it can be open while a holder writes
	// the volume. Writes fail with engine.ErrReadOnly.
	Snapshot uint64
}

// maxReplicas is the most copies of a chunk a Volume writes.
const maxReplicas = 8

// Every chunk size meta.CheckChunkSize allows is addressed by the chunk
// protocol and fits whole in one transport frame (a whole-chunk write or
// read reply: rebuild copies); these constants do not compile otherwise.
const (
	_ uint = wire.MaxChunk - store.MaxChunkSize
	_ uint = netquic.DefaultMaxPayload - store.MaxChunkSize
)

// Client call slots per node, and so parts per Volume.
const (
	clusterStreams = 4
	clusterDepth   = 64
	cloneDepth     = 16 // clone jobs in flight (snapshot.go)
)

// peerRetry is how long a node whose connection failed is tried last by
// reads.
const peerRetry = time.Second

// Volume is a replicated volume (engine.Volume) whose chunks live on
// storage nodes.
type Volume struct {
	ms    *meta.Client
	vol   meta.Volume
	opt   Options
	log   *slog.Logger
	size  atomic.Int64 // bytes; only grows (grow.go)
	chunk int64
	repl  int
	nopts netquic.Options

	state atomic.Pointer[clusterState]
	parts chan *clusterPart
	// cloneParts are the parts of clone jobs (snapshot.go): a pool of its
	// own, since the writes that wait for a clone hold parts of parts.
	cloneParts chan *clusterPart
	all        []clusterPart

	failovers atomic.Uint64
	epoch     atomic.Uint64 // the attach epoch every write carries
	fenced    atomic.Bool   // Fence ran: every request fails with engine.ErrFenced
	opened    atomic.Bool   // Open read the marks after fencing (peers made later need reload)
	fenceWhy  atomic.Pointer[error]

	// Degraded writes and rebuild (rebuild.go).
	marks       markSet
	moveTotal   atomic.Int64  // chunk copies of the current rebalance
	movePending atomic.Bool   // a moves record is in etcd (from its start to its end)
	moves       atomic.Uint64 // rebalances finished
	markq       chan *markJob
	rebuildKick chan struct{}
	probeKick   chan struct{} // a peer needs its marks read again (peer.reload)
	// clearMu orders the clearing of marks (in etcd, then in memory)
	// against reloadMarks (a read of etcd, then an add in memory), so that
	// a reload never brings back in memory a mark cleared meanwhile.
	// clears, guarded by it, grows at every clearing: a reload that read
	// etcd without holding it adds what it read only if clears is as
	// before the read.
	clearMu                               sync.Mutex
	clears                                uint64
	rebuilt, rebuiltBytes, degradedEvents atomic.Uint64
	restarts                              atomic.Uint64 // node restarts seen (a new incarnation)

	// Snapshots (snapshot.go) and clones (clone.go).
	snap  snapState
	clone cloneState

	// Chunk versions (version.go).
	vers        *verTable     // by chunk
	behindFound atomic.Uint64 // replicas found behind by their version
	// copiesRefused counts rebuild copies a target refused (it held a
	// newer version).
	copiesRefused atomic.Uint64
	// behindPending holds the (node, chunk) pairs found behind whose mark
	// is queued, so that each is queued and logged once (markKey → struct{}).
	behindPending sync.Map
	// refused remembers the copies a target refused (markKey → refusal), so
	// that the rebuild tries such a chunk again only once it was written.
	refused sync.Map

	mu      sync.Mutex // guards peers, nodes, ring, prev, unixOK; never taken on the data path
	peers   map[string]*peer
	nodes   map[string]meta.Node
	unixOK  map[string]bool            // unix socket path → answered the hello (probed once)
	unixCli map[string]*netquic.Client // hello's client, until a peer takes it
	ring    *ring.Ring
	prev    []*ring.Ring // rings of a rebalance in progress (rebalance.go)
	refresh chan struct{}

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	closed atomic.Bool

	// testMoveSwitched, set by tests before any move ends, runs in
	// finishMove once the previous rings left the placement; true stops
	// the end there, as a crash would.
	testMoveSwitched atomic.Pointer[func() bool]
	// testSnapDelay, set by tests, delays the answer to a snapshot
	// request (a holder slow to see it).
	testSnapDelay atomic.Pointer[time.Duration]
}

var _ engine.Volume = (*Volume)(nil)

// clusterState is an immutable snapshot of placement.
type clusterState struct {
	r     *ring.Ring
	peers []*peer // by ring node index; nil when the node has no known address
	all   []*peer // every peer with a client, in or out of the ring (flush targets)
	// prev are the earlier rings while a rebalance moves chunks to r's
	// owners (oldest first), prevPeers their peers by node index: writes go
	// to their owners too and reads and copies may come from them.
	prev      []*ring.Ring
	prevPeers [][]*peer
}

// peer is one storage node as seen by the client.
type peer struct {
	id, addr string
	cli      *netquic.Client
	dirty    atomic.Bool   // a write was sent since the last flush
	gen      atomic.Uint32 // fence generation: raised (and fenced) each time the node comes back (wireEpoch)
	downTill atomic.Int64  // Unix ns: reads try it last until then
	flushing atomic.Int32  // flushes in flight: a later Flush must send its own

	// Degraded mode (rebuild.go).
	down     atomic.Bool     // failed: writes skip it (marked) until the prober reaches it
	seq      atomic.Uint64   // writes it completed (OK), a sequence
	lastSeq  *chunkWriteSeqs // by chunk: seq of the last write of it the node took
	flushed  atomic.Uint64   // every write with seq <= flushed is covered by a flush
	inc      atomic.Uint64   // node incarnation of its last OK reply
	incMu    sync.Mutex      // serialises incarnation changes; guards suspect
	suspect  map[int64]bool  // chunks a restart may have cost it whose marks are not yet in etcd
	suspectN atomic.Int32    // len(suspect)
	// reload: the node restarted, or was first reached, after this client
	// read the marks: those it recorded for itself when it started
	// (torusd marks what an unclean shutdown may have cost) may be missing
	// from c.marks. Every chunk of it is suspect until the prober reads
	// them again (reloadMarks).
	reload    atomic.Bool
	reloadGen uint64 // guarded by incMu: grows each time reload is set
}

// clusterPart is one chunk-sized piece of a request (or one node's flush).
type clusterPart struct {
	c         *Volume
	parent    *clusterPart
	req       *engine.Request
	remaining atomic.Int32 // parent only
	mu        sync.Mutex   // parent only: guards err
	err       error        // parent: the request's first error

	home    chan *clusterPart // the pool it goes back to
	preq    engine.Request    // a clone's read of its parent (clone.go)
	job     *cloneJob         // an OpClone part: its job (snapshot.go)
	pending atomic.Int32      // calls in flight + 1 while issuing
	perr    atomic.Pointer[error]
	op      wire.Op
	msg     netquic.Message
	buf     []byte // read destination
	n       int    // owners
	n1      int    // write: owners under the current ring; the rest are owners under previous rings (rebalance)
	next    int    // read: next owner to try
	owners  [maxReplicas]*peer
	idx     [maxReplicas]int
	calls   [maxReplicas]clusterCall

	chunk    int64                        // chunk index (not for flush)
	vseq     uint64                       // write-like: the sequence of its version (version.go)
	vwant    store.Version                // read: the newest version acknowledged when it started
	tracked  bool                         // marks.trackStart was true
	missed   [maxReplicas]bool            // write: owner i failed (needs a mark)
	zeroVer  [maxReplicas]bool            // write: owner i was sent the change without its version (lacksEarlier)
	nmiss    atomic.Int32                 // owners missed
	ownerIDs [maxReplicas]string          // ring node ids of the owners
	flushErr atomic.Pointer[error]        // flush: the node's flush failed
	fseq     uint64                       // flush: the node's write seq when it was sent
	active   atomic.Int64                 // write-like: chunk index while in flight, else -1
	placed   atomic.Pointer[clusterState] // the placement a read or write part was sent under, while in flight
	markWait atomic.Int32                 // mark jobs still to be recorded
}

// clusterCall is one asynchronous call of a part to one node.
type clusterCall struct {
	p    *clusterPart
	i    int // owner index in p
	peer *peer
	msg  netquic.Message // the part's request with the epoch of this peer (wireEpoch)
	resp netquic.Message
}

// Open opens volume vol (from meta) for I/O: reads the cluster
// config (chunk size), the ring and the nodes from ms, keeps the ring current
// with ms.WatchRing, fences older writers on every owner node, and returns a
// Volume. Close stops everything (it does not release the attach lease: the
// caller owns it).
//
// ms should be guarded by the attach lease (ms.Guarded(lease)), so that the
// volume's metadata writes (missed marks, moves, progress) fail once the
// lock is no longer held with opt.Epoch; a refusal because another holder
// attached fences the volume (see Fence).
func Open(ctx context.Context, ms *meta.Client, vol meta.Volume, opt Options) (*Volume, error) {
	if opt.TLS == nil {
		return nil, fmt.Errorf("open volume %s: no client TLS configuration (give the cluster's client TLS directory)", vol.Name)
	}
	if opt.Timeout <= 0 {
		opt.Timeout = 5 * time.Second
	}
	if opt.Logger == nil {
		opt.Logger = slog.Default()
	}
	cfg, err := ms.Config(ctx)
	if err != nil {
		return nil, fmt.Errorf("open volume %s: %w", vol.Name, err)
	}
	if err := meta.CheckChunkSize(cfg.ChunkSize); err != nil {
		return nil, fmt.Errorf("open volume %s: cluster config: %w", vol.Name, err)
	}
	chunk := int64(cfg.ChunkSize)
	repl := vol.Replication
	if repl <= 0 {
		repl = cfg.Replication
	}
	if repl < 1 || repl > maxReplicas {
		return nil, fmt.Errorf("open volume %s: replication %d not in [1, %d]", vol.Name, repl, maxReplicas)
	}
	size := int64(vol.Size)
	if size <= 0 || size%engine.BlockSize != 0 {
		return nil, fmt.Errorf("open volume %s: size %d is not a positive multiple of 4 KiB", vol.Name, size)
	}
	c := &Volume{
		ms: ms, vol: vol, opt: opt, log: opt.Logger, chunk: chunk, repl: repl,
		nopts: netquic.Options{Transport: opt.Transport, Streams: clusterStreams, Depth: clusterDepth, Logger: opt.Logger},
		peers: make(map[string]*peer), nodes: make(map[string]meta.Node), refresh: make(chan struct{}, 1),
		unixOK:  make(map[string]bool),
		unixCli: make(map[string]*netquic.Client),
		marks:   newMarkSet(), markq: make(chan *markJob, 4096), rebuildKick: make(chan struct{}, 1), probeKick: make(chan struct{}, 1),
	}
	if c.opt.RebuildRate <= 0 {
		c.opt.RebuildRate = DefaultRebuildRate
	}
	n := clusterStreams * clusterDepth
	c.parts = make(chan *clusterPart, n)
	c.cloneParts = make(chan *clusterPart, cloneDepth)
	c.all = make([]clusterPart, n+cloneDepth)
	for i := range c.all {
		p := &c.all[i]
		p.c = c
		p.home = c.parts
		if i >= n {
			p.home = c.cloneParts
		}
		p.active.Store(-1)
		for j := range p.calls {
			p.calls[j].p = p
			p.calls[j].i = j
		}
		p.home <- p
	}
	r, _, err := ms.Ring(ctx)
	if err != nil {
		return nil, fmt.Errorf("open volume %s: %w", vol.Name, err)
	}
	if r.Len() == 0 {
		return nil, fmt.Errorf("open volume %s: the ring is empty: start storage nodes (torusd) first", vol.Name)
	}
	nodes, err := ms.Nodes(ctx)
	if err != nil {
		return nil, fmt.Errorf("open volume %s: %w", vol.Name, err)
	}
	prev, err := ms.Moves(ctx, vol.ID)
	if err != nil {
		return nil, fmt.Errorf("open volume %s: %w", vol.Name, err)
	}
	// The volume's data lives under the ring its placement was recorded
	// at (and the rings of a move in progress); ring changes since then
	// are recorded below before any I/O (rebalance.go).
	base, err := c.placedRing(ctx, r)
	if err != nil {
		return nil, fmt.Errorf("open volume %s: %w", vol.Name, err)
	}
	if opt.Epoch >= 1<<32 {
		return nil, fmt.Errorf("open volume %s: attach epoch %d is beyond 2^32", vol.Name, opt.Epoch)
	}
	c.epoch.Store(opt.Epoch)
	c.size.Store(size)
	c.vers = newChunkTable[chunkVer](c.nchunks(size))
	c.initSnap(vol)
	if vol.Parent != nil {
		if err := c.openParent(ctx, vol); err != nil {
			return nil, fmt.Errorf("open volume %s: %w", vol.Name, err)
		}
	}
	c.ctx, c.cancel = context.WithCancel(context.Background())
	fail := func(err error) (*Volume, error) {
		c.cancel()
		c.closeClients()
		if c.clone.parent != nil {
			c.clone.parent.Close()
		}
		return nil, fmt.Errorf("open volume %s: %w", vol.Name, err)
	}
	c.mu.Lock()
	c.ring = base
	c.prev = prev
	c.movePending.Store(len(prev) > 0)
	for _, nd := range nodes {
		c.nodes[nd.ID] = nd
	}
	err = c.rebuildLocked()
	c.mu.Unlock()
	if err != nil {
		return fail(err)
	}
	if err := c.loadMarks(ctx); err != nil {
		return fail(fmt.Errorf("missed chunks: %w", err))
	}
	if opt.Snapshot != 0 {
		// A view: no fence, no move recorded, no repair. opened stays
		// false: a node's first reply is trusted with the marks read
		// above (and re-read every second); a restart seen later makes
		// the node suspect until they are read again (viewRefresher).
		// While it is open the snapshot cannot be deleted.
		holder := opt.Holder
		if holder == "" {
			host, _ := os.Hostname()
			holder = fmt.Sprintf("view pid %d on %s", os.Getpid(), host)
		}
		u, err := ms.UseSnapshot(ctx, vol, opt.Snapshot, holder, viewUseTTL)
		if err != nil {
			return fail(err)
		}
		c.snap.use = u
		c.wg.Go(c.refresher)
		c.wg.Go(c.viewRefresher)
		return c, nil
	}
	c.mu.Lock()
	err = c.advanceLocked(ctx, r)
	c.mu.Unlock()
	if err != nil {
		return fail(fmt.Errorf("recording the placement changes of the ring: %w", err))
	}
	if err := c.fence(ctx); err != nil {
		return fail(err)
	}
	// A node that restarted before it answered the fence recorded what it
	// may have lost before it answered: read the marks again. One that
	// restarts later shows a new incarnation (reload).
	if err := c.loadMarks(ctx); err != nil {
		return fail(fmt.Errorf("missed chunks: %w", err))
	}
	c.opened.Store(true)
	c.wg.Go(c.watchRing)
	c.wg.Go(c.refresher)
	c.wg.Go(c.marker)
	c.wg.Go(c.prober)
	c.wg.Go(c.rebuildLoop)
	c.wg.Go(c.snapWatcher)
	if c.clone.parent != nil {
		c.wg.Go(c.flattener)
	}
	return c, nil
}

// fence tells every node of the current and previous rings that writers of
// the volume now need c's epoch. A node that knows a newer epoch makes it
// fail with engine.ErrFenced; an unreachable node is logged (writes to it fail
// until it is back, and the first write it takes raises its epoch).
func (c *Volume) fence(ctx context.Context) error {
	st := c.state.Load()
	var wg sync.WaitGroup
	errs := make([]error, len(st.all))
	for i, p := range st.peers {
		if p == nil {
			c.log.Warn("cluster: node in the ring is not registered; not fenced", "volume", c.vol.Name, "node", st.r.Node(i).ID)
		}
	}
	for i, p := range st.all {
		wg.Go(func() {
			h := wire.Header{Volume: c.vol.ID, Epoch: c.wireEpoch(p)}
			req := netquic.Message{Code: uint8(wire.OpFence)}
			h.Encode(&req.Header)
			resp := netquic.Message{}
			cctx, cancel := context.WithTimeout(ctx, c.opt.Timeout)
			defer cancel()
			if err := p.cli.Call(cctx, &req, &resp); err != nil {
				c.log.Warn("cluster: cannot fence node; it refuses older writers once it sees a write", "volume", c.vol.Name, "node", p.id, "err", err)
				p.incMu.Lock()
				c.needReload(p) // no incarnation known: it may restart before we reach it
				p.incMu.Unlock()
				return
			}
			if s := wire.Status(resp.Code); s == wire.StatusOK {
				c.sawIncarnation(p, wire.Incarnation(&resp.Header))
			} else {
				var rh wire.Header
				_ = wire.Decode(wire.OpFence, &resp.Header, &rh)
				errs[i] = fmt.Errorf("node %s: epoch %d refused (node knows %d): %w", p.id, c.epoch.Load(), wire.AttachEpoch(rh.Epoch), wire.ErrOf(s))
			}
		})
	}
	wg.Wait()
	return errors.Join(errs...)
}

// wireEpoch is the epoch requests to p carry: the attach epoch above p's
// fence generation. The generation grows, and p is fenced with it, each
// time p comes back after a failure and before anything is copied to it, so
// a request sent to p before that (a write that timed out, held by the
// network) is refused if it arrives after: it cannot land on top of a
// rebuilt copy.
func (c *Volume) wireEpoch(p *peer) uint64 {
	return wire.FenceEpoch(c.epoch.Load(), p.gen.Load())
}

// peerAddr is where requests to node nd go: its unix socket when nd is the
// local node (LocalNode), registered one, and a hello on it is answered with
// nd's ID; else its QUIC address. Each socket path is probed once; one
// that fails stays on QUIC (warned once), so a socket this process may not
// use (another user's torusd, another machine's path) never turns into a
// failing replica. Called with c.mu held.
func (c *Volume) peerAddr(nd meta.Node) (addr, transport string) {
	if nd.Socket == "" || nd.ID != c.opt.LocalNode {
		return nd.Addr, c.nopts.Transport
	}
	ok, seen := c.unixOK[nd.Socket]
	if !seen {
		cli, err := c.hello(nd)
		ok = err == nil
		c.unixOK[nd.Socket] = ok
		if ok {
			// Kept for the peer: its connections are the node's first
			// from this client, and the first one a node gets may run on
			// the node's store ring (netquic.UringHandler).
			c.unixCli[nd.Socket] = cli
		}
		if ok {
			c.log.Info("cluster: requests to the local node go over its unix socket", "node", nd.ID, "socket", nd.Socket)
		} else {
			c.log.Warn("cluster: the local node's unix socket is not usable, using QUIC", "node", nd.ID, "socket", nd.Socket, "err", err)
		}
	}
	if !ok {
		return nd.Addr, c.nopts.Transport
	}
	return nd.Socket, netquic.TransportUnix
}

// hello checks that node nd answers on its unix socket as itself and
// returns the client it asked with.
func (c *Volume) hello(nd meta.Node) (*netquic.Client, error) {
	cli, err := c.newClient(nd.Socket, netquic.TransportUnix)
	if err != nil {
		return nil, err
	}
	fail := func(err error) (*netquic.Client, error) { cli.Close(); return nil, err }
	// Not c.ctx: Open probes before it exists.
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	var hb [netquic.UserHeaderSize]byte
	resp := netquic.Message{Payload: make([]byte, 256)}
	if err := cli.Call(ctx, &netquic.Message{Code: uint8(wire.OpHello), Header: hb}, &resp); err != nil {
		return fail(err)
	}
	if st := wire.Status(resp.Code); st != wire.StatusOK {
		return fail(fmt.Errorf("hello: %v", st))
	}
	if got := string(resp.Payload); got != nd.ID {
		return fail(fmt.Errorf("hello: the socket is node %q's, not %q", got, nd.ID))
	}
	return cli, nil
}

// client returns the client of a peer at addr: the one hello kept for that
// socket if there is one, else a new one. Called with c.mu held.
func (c *Volume) client(addr, transport string) (*netquic.Client, error) {
	if transport == netquic.TransportUnix {
		if cli := c.unixCli[addr]; cli != nil {
			delete(c.unixCli, addr)
			return cli, nil
		}
	}
	return c.newClient(addr, transport)
}

// newClient is a netquic client of addr over transport.
func (c *Volume) newClient(addr, transport string) (*netquic.Client, error) {
	o := c.nopts
	o.Transport = transport
	return netquic.NewClient(addr, c.opt.TLS, &o)
}

// rebuildLocked makes a new clusterState from c.ring and c.nodes, making
// clients for new nodes and nodes whose address changed. Called with c.mu
// held.
func (c *Volume) rebuildLocked() error {
	r := c.ring
	st := &clusterState{r: r, peers: make([]*peer, r.Len())}
	for i := range st.peers {
		id := r.Node(i).ID
		nd, ok := c.nodes[id]
		if !ok {
			continue
		}
		p := c.peers[id]
		if addr, tr := c.peerAddr(nd); p == nil || p.addr != addr {
			cli, err := c.client(addr, tr)
			if err != nil {
				return fmt.Errorf("node %s: %w", id, err)
			}
			np := &peer{id: id, addr: addr, cli: cli, lastSeq: newChunkTable[atomic.Uint64](c.nchunks(c.size.Load()))}
			if c.opened.Load() {
				c.needReload(np) // its own marks may be newer than ours
			}
			if p != nil {
				np.dirty.Store(true) // it may hold unflushed writes under its old address
				np.inherit(p)        // a restart on the new address is noticed as any other
				old := p.cli
				time.AfterFunc(2*c.opt.Timeout, func() { old.Close() })
			}
			p = np
			c.peers[id] = p
		}
		st.peers[i] = p
	}
	for _, pr := range c.prev {
		pp := make([]*peer, pr.Len())
		for i := range pp {
			id := pr.Node(i).ID
			if p := c.peers[id]; p != nil {
				pp[i] = p
				continue
			}
			nd, ok := c.nodes[id]
			if !ok {
				continue
			}
			addr, tr := c.peerAddr(nd)
			cli, err := c.client(addr, tr)
			if err != nil {
				return fmt.Errorf("node %s: %w", id, err)
			}
			p := &peer{id: id, addr: addr, cli: cli, lastSeq: newChunkTable[atomic.Uint64](c.nchunks(c.size.Load()))}
			if c.opened.Load() {
				c.needReload(p)
			}
			c.peers[id] = p
			pp[i] = p
		}
		st.prev = append(st.prev, pr)
		st.prevPeers = append(st.prevPeers, pp)
	}
	for _, p := range c.peers {
		st.all = append(st.all, p)
	}
	c.state.Store(st)
	return nil
}

// watchRing keeps the ring current: each new ring's placement change is
// recorded (advanceLocked) before writes use it; one that cannot be recorded
// is retried every two seconds until it is.
func (c *Volume) watchRing() {
	ch := c.ms.WatchRing(c.ctx)
	var want *ring.Ring // newest ring not recorded yet
	retry := time.NewTimer(time.Hour)
	retry.Stop()
	defer retry.Stop()
	for {
		select {
		case u, ok := <-ch:
			if !ok {
				return
			}
			want = u.Ring
		case <-retry.C:
		}
		if want == nil {
			continue
		}
		c.mu.Lock()
		if c.fenced.Load() {
			c.mu.Unlock()
			continue // no move: it would write marks and moves
		}
		if want.Version() > c.ring.Version() {
			ctx, cancel := context.WithTimeout(c.ctx, 60*time.Second)
			err := c.fenceIf(c.advanceLocked(ctx, want))
			cancel()
			if err != nil {
				c.log.Error("cluster: ring changed but the move cannot be recorded in etcd; staying on the old ring for now",
					"volume", c.vol.Name, "version", want.Version(), "err", err)
				retry.Reset(2 * time.Second)
			} else {
				c.log.Info("cluster: ring changed", "volume", c.vol.Name, "version", want.Version(), "nodes", want.Len())
				want = nil
			}
		} else {
			want = nil
		}
		c.mu.Unlock()
		c.askRefresh() // new ring members may be new nodes
	}
}

// askRefresh asks the refresher to re-read the node registry.
func (c *Volume) askRefresh() {
	select {
	case c.refresh <- struct{}{}:
	default:
	}
}

// refresher re-reads the node registry when asked, at most every 200 ms.
func (c *Volume) refresher() {
	for {
		select {
		case <-c.ctx.Done():
			return
		case <-c.refresh:
		}
		ctx, cancel := context.WithTimeout(c.ctx, 5*time.Second)
		nodes, err := c.ms.Nodes(ctx)
		cancel()
		if err != nil {
			if c.ctx.Err() == nil {
				c.log.Warn("cluster: re-read nodes", "volume", c.vol.Name, "err", err)
			}
		} else {
			c.mu.Lock()
			changed := len(nodes) != len(c.nodes)
			for _, nd := range nodes {
				if o, ok := c.nodes[nd.ID]; !ok || o.Addr != nd.Addr {
					changed = true
				}
			}
			if changed {
				c.nodes = make(map[string]meta.Node, len(nodes))
				for _, nd := range nodes {
					c.nodes[nd.ID] = nd
				}
				if err := c.rebuildLocked(); err != nil {
					c.log.Warn("cluster: node update", "volume", c.vol.Name, "err", err)
				}
			}
			c.mu.Unlock()
		}
		select {
		case <-c.ctx.Done():
			return
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// Size is the volume size in bytes; it grows with Grow.
func (c *Volume) Size() int64 { return c.size.Load() }

// BlockSize is 4096.
func (c *Volume) BlockSize() int { return engine.BlockSize }

// Failovers counts reads that moved to another replica after an error.
func (c *Volume) Failovers() uint64 { return c.failovers.Load() }

// Fence stops c for good, because another holder attached the volume after
// c's attach (cause says how that was learnt): from now on every request,
// reads and flushes included, fails with engine.ErrFenced (EIO at the block
// device), and the rebuild, rebalance and scrub write nothing more. The
// first cause is logged and kept (Fenced); later calls do nothing. c also
// fences itself when a node answers a write with stale-epoch or a guarded
// etcd write fails with meta.ErrNotHolder.
func (c *Volume) Fence(cause error) {
	if cause == nil {
		cause = engine.ErrFenced
	}
	if !c.fenceWhy.CompareAndSwap(nil, &cause) {
		return
	}
	c.fenced.Store(true)
	if c.opt.Snapshot != 0 {
		c.log.Error("cluster: snapshot view stopped: every read fails from now on", "volume", c.vol.Name, "snapshot", c.opt.Snapshot, "cause", cause)
		return
	}
	c.log.Error("cluster: volume fenced for good: another holder attached it after this client did; every I/O fails from now on: detach it",
		"volume", c.vol.Name, "epoch", c.epoch.Load(), "cause", cause)
}

// Fenced returns why c is fenced, or nil while it is not.
func (c *Volume) Fenced() error {
	if e := c.fenceWhy.Load(); e != nil {
		return *e
	}
	return nil
}

// fenceIf fences c when err says that another holder attached after c (a
// node's engine.ErrFenced, etcd's meta.ErrNotHolder), and returns err.
func (c *Volume) fenceIf(err error) error {
	if err != nil && !c.fenced.Load() && (errors.Is(err, engine.ErrFenced) || errors.Is(err, meta.ErrNotHolder)) {
		c.Fence(err)
	}
	return err
}

// Submit starts r; it blocks only while every part is in use, or while a
// rebuild copy holds back new writes to a chunk r writes (gateHold at most).
func (c *Volume) Submit(r *engine.Request) {
	if c.closed.Load() {
		r.Done.Complete(r, engine.ErrClosed)
		return
	}
	if c.fenced.Load() {
		r.Done.Complete(r, engine.ErrFenced)
		return
	}
	if r.Op == engine.OpFlush {
		st := c.state.Load()
		parent := <-c.parts
		parent.startReq(r, parent)
		parent.remaining.Store(1)
		for _, p := range st.all {
			// A flush already in flight to p may have been sent before a
			// write this Flush must cover completed: send another.
			if !p.dirty.Swap(false) && p.flushing.Load() == 0 && p.suspectN.Load() == 0 {
				continue
			}
			fp := <-c.parts
			fp.startReq(r, parent)
			fp.op = wire.OpFlush
			fp.msg = netquic.Message{Code: uint8(wire.OpFlush)}
			fp.n, fp.n1, fp.owners[0] = 1, 1, p
			fp.flushErr.Store(nil)
			parent.remaining.Add(1)
			if p.isDown() {
				// Its unflushed writes may be lost: mark them instead.
				c.flushFailed(fp, p, errNodeDown)
				continue
			}
			p.flushing.Add(1)
			fp.fseq = p.seq.Load()
			fp.sendAll()
		}
		parent.done()
		return
	}
	// The size is loaded before any per-chunk table is touched (grow.go).
	if size := c.size.Load(); r.Offset < 0 || r.Length <= 0 || r.Offset%engine.BlockSize != 0 || r.Length%engine.BlockSize != 0 ||
		r.Offset > size || r.Length > size-r.Offset {
		r.Done.Complete(r, engine.ErrRange)
		return
	}
	var op wire.Op
	switch r.Op {
	case engine.OpRead:
		op = wire.OpRead
	case engine.OpWrite:
		op = wire.OpWrite
	case engine.OpDiscard:
		op = wire.OpDiscard
	case engine.OpWriteZeroes:
		op = wire.OpWriteZeroes
	default:
		r.Done.Complete(r, engine.ErrRange)
		return
	}
	if (op == wire.OpRead || op == wire.OpWrite) && int64(len(r.Buf)) != r.Length {
		r.Done.Complete(r, engine.ErrRange)
		return
	}
	view := c.opt.Snapshot
	if op != wire.OpRead {
		if view != 0 {
			r.Done.Complete(r, engine.ErrReadOnly)
			return
		}
		if !c.holdWrite(r) {
			return
		}
	}
	var flags uint8
	if r.Flags&engine.FlagFUA != 0 {
		flags |= wire.FlagFUA
	}
	if r.Flags&engine.FlagNoUnmap != 0 {
		flags |= wire.FlagNoUnmap
	}
	if (op == wire.OpDiscard || op == wire.OpWriteZeroes) && c.cloneLive() {
		// A clone's chunk keeps its slot: without one it would read the
		// parent (clone.go).
		op, flags = wire.OpWriteZeroes, flags|wire.FlagNoUnmap
	}
	parent := <-c.parts
	parent.startReq(r, parent)
	parent.remaining.Store(1)
	off, end := r.Offset, r.Offset+r.Length
	p := parent
	for off < end {
		if p == nil {
			p = <-c.parts
			p.startReq(r, parent)
		}
		idx := off / c.chunk
		in := off - idx*c.chunk
		n := min(c.chunk-in, end-off)
		// The epoch is set per node when the part is sent (wireEpoch).
		h := wire.Header{Volume: c.vol.ID, Index: uint64(idx), Off: uint32(in), Len: uint32(n), Flags: flags}
		p.vseq, p.vwant = 0, store.Version{}
		if op == wire.OpRead {
			if view != 0 {
				h.Snap, h.Flags = uint32(view), h.Flags|wire.FlagAsOf
			} else {
				p.vwant = c.ackedVer(idx)
			}
		} else {
			p.vseq = c.nextVer(idx)
			h.VerEpoch, h.VerSeq = c.epoch.Load(), p.vseq
		}
		p.op = op
		p.msg.Code = uint8(op)
		h.Encode(&p.msg.Header)
		p.msg.Payload, p.buf = nil, nil
		if op == wire.OpRead || op == wire.OpWrite {
			b := off - r.Offset
			if op == wire.OpWrite {
				p.msg.Payload = r.Buf[b : b+n : b+n]
			} else {
				p.buf = r.Buf[b : b+n : b+n]
			}
		}
		parent.remaining.Add(1)
		off += n
		p.chunk = idx
		switch {
		case op == wire.OpRead:
			c.sendPart(p, idx)
		case c.needCopyUp(idx):
			c.copyUpThen(p, idx)
		default:
			c.sendChange(p, idx)
		}
		p = nil
	}
	parent.done()
}

// sendPart sends part p of chunk idx: a write-class part once no rebuild
// copy of the chunk runs, under the current placement.
func (c *Volume) sendPart(p *clusterPart, idx int64) {
	if p.op != wire.OpRead {
		for {
			p.active.Store(idx)
			tracked, gate := c.marks.trackStart(idx)
			if gate == nil {
				p.tracked = tracked
				break
			}
			// A rebuild copy of the chunk is running: wait for it
			// (it lasts one chunk's read and write), not in flight.
			p.active.Store(-1)
			<-gate
		}
	}
	// The placement is read only now, after the part is marked active
	// (and tracked): a move that switched the ring while this request
	// waited for a part has copied nothing this part could miss, and
	// one that switches later sees the part in flight. The part
	// publishes the placement it uses before it checks that it is
	// still current, so finishMove (which switches, then scans) either
	// sees it or it sees the switch.
	st := c.state.Load()
	for {
		p.placed.Store(st)
		cur := c.state.Load()
		if cur == st {
			break
		}
		st = cur
	}
	c.place(st, p, idx)
}

// place finds the owners of chunk idx and sends p to them (a write to all,
// a read to the first that answers).
func (c *Volume) place(st *clusterState, p *clusterPart, idx int64) {
	key := ring.ChunkKey(c.vol.ID, uint64(idx), 0)
	ids := st.r.OwnerIndices(key, c.repl, p.idx[:0])
	p.n = len(ids)
	if p.op != wire.OpRead {
		for i, k := range ids {
			p.owners[i] = st.peers[k]
			p.ownerIDs[i] = st.r.Node(k).ID
		}
		p.n1 = p.n
		if len(st.prev) > 0 {
			c.addPrevOwners(st, p, key)
		}
		if p.n1 < c.repl {
			p.finish(fmt.Errorf("cluster: volume %s needs %d replicas but the ring has %d nodes: start more storage nodes or lower its replication",
				c.vol.Name, c.repl, p.n))
			return
		}
		p.sendAll()
		return
	}
	// Reads: the local node first, then ring order; peers that failed
	// recently go last.
	// Owners with a missed mark, or that restarted and may have lost the
	// chunk (suspect until its mark is in etcd), may be stale: never read
	// from them.
	k := 0
	degraded := c.marks.any.Load()
	for _, i := range ids {
		if pp := st.peers[i]; pp != nil && pp.id == c.opt.LocalNode && !(degraded && c.marks.has(pp.id, idx)) && !pp.isSuspect(idx) {
			p.owners[k] = pp
			k++
		}
	}
	now := time.Now().UnixNano()
	for pass := 0; pass < 2; pass++ {
		for _, i := range ids {
			pp := st.peers[i]
			if pp != nil && pp.id == c.opt.LocalNode {
				continue
			}
			if degraded && c.marks.has(st.r.Node(i).ID, idx) || pp != nil && pp.isSuspect(idx) {
				continue
			}
			down := pp == nil || pp.downTill.Load() > now
			if down == (pass == 1) {
				p.owners[k] = pp
				k++
			}
		}
	}
	if len(st.prev) > 0 {
		k = c.addPrevReaders(st, p, key, idx, k)
	}
	p.n = k
	p.next = 0
	p.perr.Store(nil)
	p.tryRead()
}

// sendAll sends p to each of its n owners and completes it when all
// answered.
func (p *clusterPart) sendAll() {
	c := p.c
	p.perr.Store(nil)
	p.nmiss.Store(0)
	p.pending.Store(int32(p.n) + 1)
	for i := 0; i < p.n; i++ {
		cc := &p.calls[i]
		cc.peer = p.owners[i]
		p.missed[i], p.zeroVer[i] = false, false
		if cc.peer == nil || (p.op != wire.OpFlush && cc.peer.isDown()) {
			// A ring node with no address, or one known down: the write
			// goes on without it and it gets a mark (an owner under a
			// previous ring too: a copy that missed a write is no source).
			p.missed[i] = true
			p.nmiss.Add(1)
			if cc.peer == nil {
				c.askRefresh()
			}
			p.callDone()
			continue
		}
		cc.resp.Payload = nil
		cc.msg = p.msg
		if p.op != wire.OpFlush {
			wire.SetEpoch(&cc.msg.Header, c.wireEpoch(cc.peer))
			if p.zeroVer[i] = p.lacksEarlier(i); p.zeroVer[i] {
				// Its version must not claim the changes it lacks
				// (version.go).
				wire.SetVersion(&cc.msg.Header, 0, 0)
			}
		}
		// Each call its own deadline: Go may block dialing a dead node.
		cc.peer.cli.Go(&cc.msg, &cc.resp, time.Now().Add(c.opt.Timeout), cc)
	}
	p.callDone()
}

var (
	errUnknownNode = errors.New("cluster: a node of the ring is not registered (down?)")
	errNodeDown    = errors.New("cluster: node is down")
	errAllReplicas = errors.New("cluster: every replica of the chunk failed")
	errMaybeStale  = errors.New("cluster: replica may lack the latest data of the chunk (it restarted, or missed a write)")
)

// tryRead sends the read to the next owner, or fails the part when none is
// left.
func (p *clusterPart) tryRead() {
	c := p.c
	for p.next < p.n {
		cc := &p.calls[0]
		cc.peer = p.owners[p.next]
		p.next++
		if cc.peer == nil {
			p.callErr(errUnknownNode)
			c.askRefresh()
			continue
		}
		cc.resp.Payload = p.buf
		cc.msg = p.msg
		wire.SetEpoch(&cc.msg.Header, c.wireEpoch(cc.peer))
		cc.peer.cli.Go(&cc.msg, &cc.resp, time.Now().Add(c.opt.Timeout), cc)
		return
	}
	err := wire.ErrNodeIO
	if e := p.perr.Load(); e != nil {
		err = *e
	}
	if p.n == 0 {
		err = fmt.Errorf("cluster: volume %s chunk %d: no owner holds a copy that can be read now (each is marked for rebuild, restarted or unknown): %w",
			c.vol.Name, p.chunk, wire.ErrNodeIO)
	}
	p.finish(err)
}

// callErr records err as the part's error if it has none yet.
func (p *clusterPart) callErr(err error) {
	p.perr.CompareAndSwap(nil, &err)
}

// callDone drops one pending call of a write-like part.
func (p *clusterPart) callDone() {
	if p.pending.Add(-1) != 0 {
		return
	}
	var err error
	if e := p.perr.Load(); e != nil {
		err = *e
	}
	if p.op == wire.OpFlush {
		pp := p.owners[0]
		pp.flushing.Add(-1)
		if fe := p.flushErr.Load(); fe != nil {
			p.c.flushFailed(p, pp, *fe)
			return
		}
		// Writes the node took before a restart are not covered (their
		// chunks are suspect, marked before this completes); every other
		// write with seq <= fseq reached the process that flushed.
		pp.flushedUpTo(p.fseq)
		if pp.suspectN.Load() > 0 {
			p.c.awaitRestartMarks(p, pp)
			return
		}
		p.finish(nil)
		return
	}
	if err == nil {
		m := int(p.nmiss.Load())
		switch {
		case m >= p.n:
			err = fmt.Errorf("%w (volume %s chunk %d): %d owners down", errAllReplicas, p.c.vol.Name, p.chunk, m)
		case (p.c.marks.any.Load() || p.ownerSuspect()) && !p.completeCopyTook():
			err = fmt.Errorf("%w (volume %s chunk %d): every owner that took the write lacks earlier data of the chunk",
				errAllReplicas, p.c.vol.Name, p.chunk)
		case m > 0:
			p.degradedFinish()
			return
		}
	}
	p.finish(err)
}

// completeCopyTook reports whether an owner without a mark for the chunk
// (a complete copy) took the write: only then may it be acknowledged.
func (p *clusterPart) completeCopyTook() bool {
	for i := 0; i < p.n; i++ {
		if !p.missed[i] && !p.zeroVer[i] && !p.c.marks.has(p.ownerID(i), p.chunk) && (p.owners[i] == nil || !p.owners[i].isSuspect(p.chunk)) {
			return true
		}
	}
	return false
}

// ownerSuspect reports whether an owner of p has suspect chunks (a restart
// whose marks are not in etcd yet): one atomic load per owner.
func (p *clusterPart) ownerSuspect() bool {
	for i := 0; i < p.n; i++ {
		if o := p.owners[i]; o != nil && (o.suspectN.Load() > 0 || o.reload.Load()) {
			return true
		}
	}
	return false
}

// CallDone is the result of one node call.
func (cc *clusterCall) CallDone(resp *netquic.Message, err error) {
	p, c := cc.p, cc.p.c
	if err != nil {
		cc.peer.downTill.Store(time.Now().Add(peerRetry).UnixNano())
		c.askRefresh()
		err = fmt.Errorf("cluster: node %s: %w", cc.peer.id, err)
	} else if s := wire.Status(resp.Code); s != wire.StatusOK {
		err = wire.ErrOf(s)
		if s == wire.StatusStaleEpoch {
			var rh wire.Header
			_ = wire.Decode(wire.OpFence, &resp.Header, &rh)
			if wire.AttachEpoch(rh.Epoch) <= c.epoch.Load() {
				// Our own attach, a newer fence generation of this node:
				// the request was sent before the node came back and was
				// fenced again (a late one). A node failure for this call.
				err = fmt.Errorf("cluster: node %s: request older than its last fence: %w", cc.peer.id, errNodeDown)
			} else if !c.fenced.Load() {
				c.Fence(fmt.Errorf("cluster: node %s refused epoch %d, it knows epoch %d: %w",
					cc.peer.id, c.epoch.Load(), wire.AttachEpoch(rh.Epoch), engine.ErrFenced))
			}
		}
		if s != wire.StatusRange && s != wire.StatusStaleEpoch && s != wire.StatusNoSpace {
			err = fmt.Errorf("cluster: node %s: %w", cc.peer.id, err)
		}
	} else if p.op == wire.OpRead && len(resp.Payload) != len(p.buf) {
		err = fmt.Errorf("cluster: node %s: read returned %d bytes, want %d: %w", cc.peer.id, len(resp.Payload), len(p.buf), wire.ErrBadRequest)
	}
	if p.op != wire.OpRead {
		if p.op == wire.OpFlush {
			if err != nil {
				e := err // not &err: that would move err to the heap on every call
				p.flushErr.Store(&e)
			} else {
				c.sawIncarnation(cc.peer, wire.Incarnation(&resp.Header))
			}
			p.callDone()
			return
		}
		// Marked once the write is done (even if it failed: it may have
		// landed), so a Flush submitted after it sees the mark.
		cc.peer.dirty.Store(true)
		switch {
		case err == nil:
			// took first: if this reply is a restarted process's, or an
			// older one's processed late, the chunk is among those a
			// restart marks.
			cc.peer.took(p.chunk)
			if p.job != nil && wire.ReplyFlags(&resp.Header)&wire.ReplyAbsent == 0 {
				p.job.heads.Add(1)
			}
			c.sawIncarnation(cc.peer, wire.Incarnation(&resp.Header))
		case nodeFailure(err):
			c.setDown(cc.peer, err)
			p.missed[cc.i] = true
			p.nmiss.Add(1)
		case cc.i >= p.n1 && !errors.Is(err, engine.ErrFenced):
			// An owner under a previous ring only that refused the write
			// (no space, say): it is no copy source for the chunk now.
			p.missed[cc.i] = true
			p.nmiss.Add(1)
		default:
			p.callErr(err)
		}
		p.callDone()
		return
	}
	if err == nil {
		// A replica that restarted may have lost this chunk: its reply
		// must not be returned (nor any other sent before a mark).
		c.sawIncarnation(cc.peer, wire.Incarnation(&resp.Header))
		if cc.peer.isSuspect(p.chunk) || c.marks.has(cc.peer.id, p.chunk) {
			err = fmt.Errorf("cluster: node %s: %w", cc.peer.id, errMaybeStale)
		} else if got := replyVer(&resp.Header); behind(got, p.vwant) {
			c.markBehind(cc.peer, p.chunk, got, p.vwant)
			err = behindErr(cc.peer, got, p.vwant)
		}
	}
	if err == nil {
		if c.clone.parent != nil && wire.ReplyFlags(&resp.Header)&wire.ReplyAbsent != 0 {
			c.clone.reads.Add(1) // before the check: see clone.go
			if c.cloneLive() {
				c.readParent(p)
				return
			}
			c.clone.reads.Add(-1)
		}
		p.finish(nil)
		return
	}
	if errors.Is(err, engine.ErrRange) {
		p.finish(err)
		return
	}
	p.callErr(err)
	if p.next < p.n {
		c.failovers.Add(1)
		c.log.Debug("cluster: read failed over", "volume", c.vol.Name, "node", cc.peer.id, "err", err)
	}
	p.tryRead()
}

func (p *clusterPart) startReq(r *engine.Request, parent *clusterPart) {
	p.req, p.parent = r, parent
	if p == parent {
		p.err = nil
	}
}

// finish records the part's result and drops its reference on the parent.
func (p *clusterPart) finish(err error) {
	parent := p.parent
	if err != nil {
		parent.mu.Lock()
		if parent.err == nil {
			parent.err = err
		}
		parent.mu.Unlock()
	}
	if err == nil && p.vseq != 0 {
		p.c.ackVer(p.chunk, p.vseq)
	}
	p.vseq = 0
	if p.tracked {
		p.c.marks.trackEnd(p.chunk)
		p.tracked = false
	}
	p.active.Store(-1)
	p.placed.Store(nil)
	p.job = nil
	p.msg.Payload, p.buf = nil, nil
	for i := range p.calls[:p.n] {
		p.calls[i].peer = nil
		p.calls[i].resp.Payload = nil
	}
	if p != parent {
		p.req, p.parent = nil, nil
		p.home <- p
	}
	parent.done()
}

// done drops one reference of parent p and completes the request after the
// last.
func (p *clusterPart) done() {
	if p.remaining.Add(-1) != 0 {
		return
	}
	r, err := p.req, p.err
	p.req, p.parent, p.err = nil, nil, nil
	p.home <- p
	if r.Op != engine.OpRead && r.Op != engine.OpFlush && r.Op != 0 {
		p.c.writeDone()
	}
	r.Done.Complete(r, err)
}

// Close waits for in-flight requests, flushes every node written since its
// last flush, and closes the connections. It does not release the attach
// lease.
func (c *Volume) Close() error {
	if c.closed.Swap(true) {
		return engine.ErrClosed
	}
	for i := range c.all {
		<-c.all[i].home // every part back: nothing in flight
	}
	var errs []error
	st := c.state.Load()
	var wg sync.WaitGroup
	var emu sync.Mutex
	for _, p := range st.all {
		if !p.dirty.Load() && p.suspectN.Load() == 0 {
			continue
		}
		wg.Go(func() {
			var err error
			if p.isDown() {
				err = errNodeDown
			} else {
				ctx, cancel := context.WithTimeout(context.Background(), c.opt.Timeout)
				defer cancel()
				resp := netquic.Message{}
				err = p.cli.Call(ctx, &netquic.Message{Code: uint8(wire.OpFlush)}, &resp)
				if err == nil {
					err = wire.ErrOf(wire.Status(resp.Code))
				}
				if err == nil {
					c.sawIncarnation(p, wire.Incarnation(&resp.Header))
					p.flushedUpTo(p.seq.Load()) // nothing is in flight at Close
					// What a restart may have cost the node is marked
					// before Close reports the volume flushed.
					err = c.settleRestart(p)
				}
			}
			if err != nil && nodeFailure(err) {
				// The node may have lost writes it took: mark them, as a
				// flush during I/O does.
				if merr := c.recordAtRisk(p); merr == nil {
					err = nil
				} else {
					err = errors.Join(err, merr)
				}
			}
			if err != nil {
				emu.Lock()
				errs = append(errs, fmt.Errorf("close volume %s: flush node %s: %w", c.vol.Name, p.id, err))
				emu.Unlock()
			}
		})
	}
	wg.Wait()
	c.cancel()
	c.wg.Wait()
	c.closeClients()
	if pv := c.clone.parent; pv != nil {
		if err := pv.Close(); err != nil && !errors.Is(err, engine.ErrClosed) {
			errs = append(errs, err)
		}
	}
	if u := c.snap.use; u != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		if err := u.Close(ctx); err != nil {
			errs = append(errs, err)
		}
		cancel()
	}
	for i := range c.all {
		c.all[i].home <- &c.all[i]
	}
	return errors.Join(errs...)
}

func (c *Volume) closeClients() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, p := range c.peers {
		p.cli.Close()
	}
	for path, cli := range c.unixCli {
		cli.Close()
		delete(c.unixCli, path)
	}
}
