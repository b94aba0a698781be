package cluster

// Attach: a replicated volume held under its attach lock, as a client
// (torusblk serve|attach NAME) holds it while it serves the volume.
//
// Invariants:
//   - An Attached volume is served only while this process holds the
//     volume's attach lock (meta.Client.Attach); every write carries the
//     lock's epoch, so a process that lost the lock without noticing is
//     fenced by the nodes.
//   - The volume's metadata writes (missed marks, moves, progress) go
//     through a client guarded by the lock (meta.Client.Guarded): etcd refuses
//     them once this process no longer holds the lock with its epoch.
//   - After the lease is lost (etcd unreachable past the TTL) the lock is
//     taken back only with the same epoch and only if nobody attached in
//     between (meta.AttachLease.Reattach, a compare-and-swap on the epoch).
//     If someone did, even if they have detached since, this process is
//     fenced for good (Volume.Fence): every I/O fails with EIO until it is
//     detached, because its marks, moves and the kernel's page cache may
//     predate the other holder's writes.
//   - Attached.Close closes the replicated volume (which makes completed
//     writes durable on every replica) before it releases the lock, so the
//     next holder never sees a write of ours land after it attached.
//   - One periodic scrub runs at a time per volume (a single goroutine runs
//     them in turn), and it is stopped and waited for, with the metrics
//     endpoint, before the volume closes (Attached.Close), so neither ever
//     uses a closed volume.
//   - The scrub totals grow once per finished scrub, by its ScrubResult.
//   - The volume grows (Volume.Grow) when its record in etcd shows a larger
//     size, before Resized signals it, so a device told to grow after the
//     signal never sends a request the volume refuses (see grow.go).

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/torus-storage/torus/internal/procs"
	"github.com/torus-storage/torus/internal/qos"
	"github.com/torus-storage/torus/meta"
)

// DefaultAttachTTL is the attach lock's lease when AttachOptions.TTL is 0.
const DefaultAttachTTL = 10 * time.Second

// AttachOptions configure Attach.
type AttachOptions struct {
	// Options configure the replicated volume (Open). Epoch is ignored: the
	// volume is opened under the attach lock's epoch. Holder names this
	// process in the attach lock and in progress records (default "pid N
	// on HOST"). An empty LocalNode picks the node on this host: the
	// first registered with this host name, else the first whose unix
	// socket is on this machine, else none.
	Options
	// TTL is the attach lock's lease (default DefaultAttachTTL): after a
	// crash the volume can be attached elsewhere once it expires, and a
	// longer etcd outage loses the lock (taken back if nobody attached
	// meanwhile).
	TTL time.Duration
	// Wait, if positive, is how long to keep trying while another holder
	// has the lock (meta.ErrAttached), e.g. a server that died and whose
	// lease has not expired yet. 0 fails at once.
	Wait time.Duration
	// After, if not 0, resumes a device served under that epoch (a
	// recovered ublk device): the attach fails with meta.ErrNotHolder if
	// another client attached the volume since (meta.AttachAfter).
	After uint64
	// ScrubInterval, if positive, scrubs the volume every interval (the
	// first run one interval after Attach), one scrub at a time, until
	// Close; a failed scrub is logged and tried again at the next interval.
	// ScrubTotals adds them up. 0 never scrubs.
	ScrubInterval time.Duration
}

// Attached is a replicated volume held under its attach lock (Attach): an
// engine.Volume whose Close closes the volume and then releases the lock.
// While it is open a goroutine keeps the lock (taking it back after an
// etcd outage, or fencing the volume for good), another keeps the runtime
// from idling between requests (procs.Keeper), another grows the volume
// when its record in etcd grows (Resized), and the periodic scrub and the
// metrics endpoint run if asked for.
type Attached struct {
	*Volume
	info meta.Volume
	ttl  time.Duration
	log  *slog.Logger

	mu    sync.Mutex // guards lease (replaced after an etcd outage)
	lease *meta.AttachLease
	wg    sync.WaitGroup // the lock keeper and procs.Keeper
	stop  context.CancelFunc

	// services: the scrubber and the metrics server, stopped before the
	// volume closes.
	svcCtx    context.Context
	svcCancel context.CancelFunc
	svcWG     sync.WaitGroup
	scrub     scrubTotals

	// QoS (qos.go): the limiter every Submit passes, and the limits of
	// the record it enforces.
	qos       *qos.Limiter
	qosRecord atomic.Pointer[meta.QoS]

	resized chan struct{} // capacity 1: the volume grew (Resized)
	devMu   sync.Mutex    // guards dev, hasDev
	dev     meta.Device   // the device last reported (ReportDevice)
	hasDev  bool
	ms      *meta.Client
}

// Attach takes the attach lock of the volume called name in ms and opens
// the volume for I/O under it, with a view of ms guarded by the lock (see
// the invariants above). ms stays the caller's: close it after the
// Attached. A held lock fails with meta.ErrAttached (after opt.Wait), a
// missing volume with meta.ErrNotFound; meta's errors name the volume.
func Attach(ctx context.Context, ms *meta.Client, name string, opt AttachOptions) (*Attached, error) {
	log := opt.Logger
	if log == nil {
		log = slog.Default()
	}
	ttl := opt.TTL
	if ttl <= 0 {
		ttl = DefaultAttachTTL
	}
	host, _ := os.Hostname()
	if opt.Holder == "" {
		opt.Holder = fmt.Sprintf("pid %d on %s", os.Getpid(), host)
	}
	lease, err := attachLock(ctx, ms, name, opt.Holder, ttl, opt.Wait, opt.After, log)
	if err != nil {
		return nil, err
	}
	if opt.LocalNode == "" {
		if nodes, err := ms.Nodes(ctx); err == nil {
			opt.LocalNode = localNode(nodes, host, log)
		}
	}
	vopt := opt.Options
	vopt.Epoch = lease.Epoch()
	vopt.Logger = log
	vol, err := Open(ctx, ms.Guarded(lease), lease.Volume(), vopt)
	if err != nil {
		rctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		lease.Release(rctx)
		cancel()
		return nil, fmt.Errorf("opening volume %s: %w", name, err)
	}
	wctx, stop := context.WithCancel(context.Background())
	a := &Attached{Volume: vol, info: lease.Volume(), ttl: ttl, log: log, lease: lease, stop: stop,
		resized: make(chan struct{}, 1), ms: ms}
	a.svcCtx, a.svcCancel = context.WithCancel(context.Background())
	a.startQoS(ms)
	a.wg.Add(3)
	go a.keepLock(wctx)
	go a.watchSize(wctx)
	// Requests to the nodes leave every P idle while they wait; the
	// keeper spares the runtime a sysmon wake-up on each (internal/procs).
	go func() {
		defer a.wg.Done()
		new(procs.Keeper).Keep(wctx)
	}()
	log.Info("attached cluster volume", "volume", name, "id", a.info.ID, "replication", a.info.Replication, "epoch", lease.Epoch())
	if opt.ScrubInterval > 0 {
		a.svcWG.Go(func() { a.scrubber(a.svcCtx, opt.ScrubInterval) })
	}
	return a, nil
}

// attachLock takes the attach lock of volume name for holder, trying again
// every 500 ms while another holder has it, until wait has passed.
func attachLock(ctx context.Context, ms *meta.Client, name, holder string, ttl, wait time.Duration, after uint64, log *slog.Logger) (*meta.AttachLease, error) {
	deadline := time.Now().Add(wait)
	var held error // the last ErrAttached: who held the lock
	var said time.Time
	for {
		var lease *meta.AttachLease
		var err error
		if after != 0 {
			lease, err = ms.AttachAfter(ctx, name, holder, ttl, after)
		} else {
			lease, err = ms.Attach(ctx, name, holder, ttl)
		}
		if err == nil && held != nil {
			log.Warn("took the attach lock once the previous holder's lease expired: the storage nodes now refuse that holder's writes (fenced by the new epoch)",
				"volume", name, "epoch", lease.Epoch(), "previous", held.Error())
		}
		if err == nil || !errors.Is(err, meta.ErrAttached) || time.Now().After(deadline) {
			return lease, err
		}
		if held == nil || time.Since(said) >= 5*time.Second {
			log.Info("waiting for the old attach lock to expire", "volume", name, "why", err.Error(), "for at most", time.Until(deadline).Round(time.Second))
			said = time.Now()
		}
		held = err
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("waiting for the attach lock of volume %s: %w", name, ctx.Err())
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// Epoch returns the attach epoch the volume is held under now.
func (a *Attached) Epoch() uint64 {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.lease.Epoch()
}

// Info returns the volume's metadata as it was when attached.
func (a *Attached) Info() meta.Volume { return a.info }

// keepLock takes the attach lock back when its lease is lost (etcd was
// unreachable for longer than the lease). I/O goes on meanwhile: the nodes
// keep accepting our epoch until someone else attaches and fences them.
// Once etcd answers, the lock is taken back with the same epoch if nobody
// attached in between (meta.AttachLease.Reattach); if someone did, the
// volume is fenced for good and every I/O fails until it is detached.
func (a *Attached) keepLock(ctx context.Context) {
	defer a.wg.Done()
	name, log := a.info.Name, a.log
	for {
		a.mu.Lock()
		lease := a.lease
		a.mu.Unlock()
		select {
		case <-ctx.Done():
			return
		case <-lease.Lost():
		}
		log.Error("attach lock lost (etcd unreachable longer than the lease); I/O goes on, taking the lock back when etcd answers unless another process attached meanwhile",
			"volume", name, "epoch", lease.Epoch())
		for {
			select {
			case <-ctx.Done():
				return
			case <-time.After(time.Second):
			}
			if err := a.Volume.Fenced(); err != nil {
				log.Error("volume fenced for good while its attach lock was lost; not taking the lock back: detach it",
					"volume", name, "err", err)
				return
			}
			actx, cancel := context.WithTimeout(ctx, 5*time.Second)
			nl, err := lease.Reattach(actx, a.ttl)
			cancel()
			if errors.Is(err, meta.ErrNotHolder) {
				a.Volume.Fence(err)
				log.Error("another process attached this volume while etcd was unreachable: this one is fenced for good and every I/O fails (EIO); detach it",
					"volume", name, "epoch", lease.Epoch(), "err", err)
				return
			}
			if err != nil {
				log.Debug("taking the attach lock back", "volume", name, "err", err)
				continue
			}
			a.mu.Lock()
			a.lease = nl
			a.mu.Unlock()
			log.Info("attach lock taken back: nobody attached meanwhile", "volume", name, "epoch", nl.Epoch())
			if err := a.putDevice(ctx); err != nil { // the record went with the old lease
				log.Warn("device record not restored", "volume", name, "err", err)
			}
			break
		}
	}
}

// Close stops the periodic scrub, the metrics endpoint and the QoS watch,
// passes on the requests QoS holds back, closes the volume (completed
// writes durable on every replica), then releases the attach lock. It does not close the meta.Client given to Attach.
func (a *Attached) Close() error {
	a.svcCancel()
	a.svcWG.Wait()
	a.qos.Close()
	err := a.Volume.Close()
	a.stop()
	a.wg.Wait()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	a.mu.Lock()
	lease := a.lease
	a.mu.Unlock()
	if rerr := lease.Release(ctx); rerr != nil {
		err = errors.Join(err, fmt.Errorf("releasing the attach lock of volume %s: %w", a.info.Name, rerr))
	}
	return err
}

// ScrubTotals add up the periodic scrubs of an Attached volume
// (AttachOptions.ScrubInterval) since Attach.
type ScrubTotals struct {
	// Runs counts the scrubs finished or stopped.
	Runs uint64
	// Chunks, Skipped, Checksum, Mismatches, Behind, Repaired and Lost add
	// up the ScrubResult fields of the same names over those runs.
	Chunks, Skipped, Checksum, Mismatches, Behind, Repaired, Lost uint64
	// Running is true while a scrub runs.
	Running bool
	// LastSuccess is when the last scrub without error finished, to the
	// second; zero if none has yet.
	LastSuccess time.Time
}

// scrubTotals are the atomics behind ScrubTotals: the scrubber bumps them,
// a metrics scrape reads them.
type scrubTotals struct {
	runs, chunks, skipped, checksum, mismatches, behind, repaired, lost atomic.Uint64
	running                                                             atomic.Bool
	lastSuccess                                                         atomic.Int64 // Unix seconds of the last finished scrub
}

func (s *scrubTotals) add(r ScrubResult) {
	s.runs.Add(1)
	s.chunks.Add(r.Chunks)
	s.skipped.Add(r.Skipped)
	s.checksum.Add(r.Checksum)
	s.mismatches.Add(r.Mismatches)
	s.behind.Add(r.Behind)
	s.repaired.Add(r.Repaired)
	s.lost.Add(r.Lost)
}

// ScrubTotals returns the totals of the periodic scrubs so far.
func (a *Attached) ScrubTotals() ScrubTotals {
	s := &a.scrub
	t := ScrubTotals{
		Runs: s.runs.Load(), Chunks: s.chunks.Load(), Skipped: s.skipped.Load(), Checksum: s.checksum.Load(),
		Mismatches: s.mismatches.Load(), Behind: s.behind.Load(), Repaired: s.repaired.Load(), Lost: s.lost.Load(),
		Running: s.running.Load(),
	}
	if sec := s.lastSuccess.Load(); sec != 0 {
		t.LastSuccess = time.Unix(sec, 0)
	}
	return t
}

// scrubber runs a scrub every interval until ctx is done.
func (a *Attached) scrubber(ctx context.Context, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		a.scrub.running.Store(true)
		res, err := a.Scrub(ctx)
		a.scrub.running.Store(false)
		a.scrub.add(res)
		if err != nil {
			if ctx.Err() == nil {
				a.log.Error("scrub failed; retrying at the next interval", "volume", a.info.Name, "err", err)
			}
			continue
		}
		a.scrub.lastSuccess.Store(time.Now().Unix())
	}
}

// localNode picks the node on this host whose replica reads prefer: the
// first node registered with this host name (torusd --host defaults to it),
// else the first whose unix socket is on this machine (a dev cluster's
// nodes carry made-up host labels). The replicated volume checks, before it
// uses the socket, that the node behind it is that node. "" when there is none.
func localNode(nodes []meta.Node, host string, log *slog.Logger) string {
	nodes = slices.Clone(nodes)
	slices.SortFunc(nodes, func(a, b meta.Node) int { return strings.Compare(a.ID, b.ID) })
	for _, n := range nodes {
		if n.Host == host {
			log.Info("reads prefer the node on this host", "node", n.ID)
			return n.ID
		}
	}
	for _, n := range nodes {
		if fi, err := os.Stat(n.Socket); n.Socket != "" && err == nil && fi.Mode().Type() == os.ModeSocket {
			log.Info("reads prefer the node whose socket is on this host", "node", n.ID, "socket", n.Socket)
			return n.ID
		}
	}
	return ""
}

// watchSize grows the volume when its record in etcd shows a larger size
// (torusctl volume resize), then signals Resized.
func (a *Attached) watchSize(ctx context.Context) {
	defer a.wg.Done()
	for v := range a.ms.WatchVolume(ctx, a.info.ID) {
		size := int64(v.Size)
		if size <= a.Volume.Size() {
			continue
		}
		if err := a.Volume.Grow(size); err != nil {
			a.log.Error("the volume's record grew but the volume cannot", "volume", a.info.Name, "size", size, "err", err)
			continue
		}
		select {
		case a.resized <- struct{}{}:
		default:
		}
	}
}

// Resized returns a channel that receives after the volume grew (the
// signals of several growths may come as one): Size is the new size, and
// requests up to it are taken. A device serving the volume grows then.
func (a *Attached) Resized() <-chan struct{} { return a.resized }

// ReportDevice records in etcd, under the attach lock, the device that
// serves the volume and how it follows a growth (meta.Device), for
// torusctl volume resize to tell the operator; again after each growth
// with the device's new size. It is recorded again when the lock is taken
// back after an etcd outage. A failure is returned (and logged by the
// caller); the record is only information.
func (a *Attached) ReportDevice(ctx context.Context, d meta.Device) error {
	a.devMu.Lock()
	a.dev, a.hasDev = d, true
	a.devMu.Unlock()
	return a.putDevice(ctx)
}

// putDevice writes the last reported device, if any, under the current lease.
func (a *Attached) putDevice(ctx context.Context) error {
	a.devMu.Lock()
	d, ok := a.dev, a.hasDev
	a.devMu.Unlock()
	if !ok {
		return nil
	}
	a.mu.Lock()
	lease := a.lease
	a.mu.Unlock()
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := a.ms.SetDevice(ctx, lease, d); err != nil {
		return fmt.Errorf("reporting device %s of volume %s: %w", d.Path, a.info.Name, err)
	}
	return nil
}
