package meta

// Invariants of the attach lock:
//   - clientepochs/ID is the epoch of the volume's last attach by a client,
//     written in that attach's transaction. AttachAfter(E) succeeds only
//     while it is still E: a client resuming a device of epoch E (its
//     kernel queue and filesystem cache) never does after another client
//     wrote the volume.
//   - attach/ID exists iff some holder's lease is alive. Attach creates it
//     only in the transaction that also writes epochs/ID = previous epoch + 1,
//     so the epoch of a new holder is greater than every earlier one.
//   - Reattach re-creates attach/ID for a holder whose lease was lost, with
//     that holder's epoch unchanged, only in a transaction that checks that
//     epochs/ID still holds that epoch and attach/ID is free. Epochs only
//     grow, so this proves no one attached in between: no storage node can
//     know a newer epoch, and the holder's view of the volume (missed marks,
//     moves, the data of its cache) is still the only one. A holder for
//     which that check fails never holds the volume again (ErrNotHolder).
//   - Storage nodes fence writes by epoch: a holder whose lease was lost may
//     not have noticed yet, so Lost is a hint to stop, the epoch is the
//     guarantee.
//   - A Client made by Guarded(l) writes only in transactions that also check
//     epochs/ID == l's epoch and that attach/ID is held under the current
//     lease of l's holder (l's, or the one of its latest Reattach), so a
//     holder that lost the lock changes no metadata.
//   - An AttachLease's goroutine closes lost exactly once, when the
//     keepalive ends for any reason other than Release, or when the lock
//     key is deleted or put under another lease (a client took a storage
//     node's maintenance lock over).
//   - Only a maintenance lock (Maintenance in the record) is ever taken
//     over, by a client's Attach, in a transaction that checks the key's
//     mod revision and bumps the epoch like any attach.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// attachRecord is the value of attach/ID.
type attachRecord struct {
	Holder string    `json:"holder"`
	Host   string    `json:"host"`
	Epoch  uint64    `json:"epoch"`
	Since  time.Time `json:"since"`
	// Maintenance marks a storage node repairing a volume no client holds
	// (AttachMaintenance): a client's Attach takes the lock over.
	Maintenance bool `json:"maintenance,omitempty"`
}

func attachedError(name string, val []byte) error {
	var a attachRecord
	json.Unmarshal(val, &a)
	return fmt.Errorf("volume %s is attached by %q on host %s (epoch %d, since %s): %w",
		name, a.Holder, a.Host, a.Epoch, a.Since.Format(time.RFC3339), ErrAttached)
}

// AttachLease is a held attach lock on a volume. Keep it until Release; a
// goroutine keeps its lease alive.
type AttachLease struct {
	s      *Client
	volume Volume
	holder string
	epoch  uint64
	lease  clientv3.LeaseID
	g      *guard // shared with the leases Reattach makes from this one
	lost   chan struct{}
	stop   context.CancelFunc
	done   chan struct{}

	mu       sync.Mutex
	released bool
}

// Attach takes the attach lock of the volume called name for holder, under
// a lease of ttl, and bumps the volume's epoch in the same transaction. It
// fails with ErrAttached (naming the holder) while another client holds it;
// a storage node's maintenance lock (AttachMaintenance) is taken over: its
// lease sees the lock lost, and the new epoch fences its writes.
func (s *Client) Attach(ctx context.Context, name, holder string, ttl time.Duration) (*AttachLease, error) {
	return s.attach(ctx, name, holder, ttl, false, 0)
}

// AttachAfter is Attach for a holder that resumes a device it served
// under epoch (a recovered ublk device, whose kernel queue and filesystem
// cache carry on from that epoch): it fails with an error wrapping
// ErrNotHolder if another client attached the volume since. Storage nodes'
// maintenance locks in between change no data and are allowed. The new
// lock has a new epoch, as every attach.
func (s *Client) AttachAfter(ctx context.Context, name, holder string, ttl time.Duration, epoch uint64) (*AttachLease, error) {
	if epoch == 0 {
		return nil, fmt.Errorf("meta: attach %s after epoch 0: %w", name, ErrInvalid)
	}
	return s.attach(ctx, name, holder, ttl, false, epoch)
}

// AttachMaintenance takes the attach lock of the volume called name for a
// storage node that repairs, moves or scrubs it while no client holds it.
// It fails with ErrAttached while anyone holds the lock. A client's Attach
// takes the lock over at any time: the lease's Lost channel is closed then.
func (s *Client) AttachMaintenance(ctx context.Context, name, holder string, ttl time.Duration) (*AttachLease, error) {
	return s.attach(ctx, name, holder, ttl, true, 0)
}

func (s *Client) attach(ctx context.Context, name, holder string, ttl time.Duration, maint bool, after uint64) (*AttachLease, error) {
	if holder == "" {
		return nil, fmt.Errorf("meta: attach %s: empty holder: %w", name, ErrInvalid)
	}
	host, _ := os.Hostname()
	takeOver := int64(0) // mod revision of a maintenance lock to take over
	for range maxTries {
		v, rev, err := s.volume(ctx, name)
		if err != nil {
			return nil, fmt.Errorf("meta: attach: %w", err)
		}
		ak, ek := s.attachKey(v.ID), s.epochKey(v.ID)
		resp, err := s.cli.Get(ctx, ek)
		if err != nil {
			return nil, fmt.Errorf("meta: attach %s: read epoch: %w", name, err)
		}
		epoch, erev, err := parseEpoch(resp)
		if err != nil {
			return nil, fmt.Errorf("meta: attach %s: %w", name, err)
		}
		cek := s.clientEpochKey(v.ID)
		cr, err := s.cli.Get(ctx, cek)
		if err != nil {
			return nil, fmt.Errorf("meta: attach %s: read epoch: %w", name, err)
		}
		client, crev, err := parseEpoch(cr)
		if err != nil {
			return nil, fmt.Errorf("meta: attach %s: %w", name, err)
		}
		if len(cr.Kvs) == 0 {
			client = epoch // attached before client epochs were kept
		}
		if after != 0 && client != after {
			// The CAS on crev below keeps this true up to the attach.
			ar, _ := s.cli.Get(ctx, ak)
			var kvs []*mvccpb.KeyValue
			if ar != nil {
				kvs = ar.Kvs
			}
			return nil, fmt.Errorf("meta: attach: %w", notHolderError(name, after, client, kvs))
		}
		epoch++
		rec, _ := json.Marshal(attachRecord{Holder: holder, Host: host, Epoch: epoch, Since: time.Now().UTC(), Maintenance: maint})
		g, err := s.cli.Grant(ctx, ttlSeconds(ttl))
		if err != nil {
			return nil, fmt.Errorf("meta: attach %s: grant lease: %w", name, err)
		}
		puts := []clientv3.Op{
			clientv3.OpPut(ak, string(rec), clientv3.WithLease(g.ID)),
			clientv3.OpPut(ek, strconv.FormatUint(epoch, 10)),
		}
		if !maint {
			puts = append(puts, clientv3.OpPut(cek, strconv.FormatUint(epoch, 10)))
		}
		free := clientv3.Compare(clientv3.CreateRevision(ak), "=", 0)
		if takeOver != 0 {
			free = clientv3.Compare(clientv3.ModRevision(ak), "=", takeOver)
		}
		tr, err := s.txn(ctx,
			[]clientv3.Cmp{
				clientv3.Compare(clientv3.ModRevision(s.volKey(v.ID)), "=", rev),
				free,
				clientv3.Compare(clientv3.ModRevision(ek), "=", erev),
				clientv3.Compare(clientv3.ModRevision(cek), "=", crev),
			},
			puts,
			[]clientv3.Op{clientv3.OpGet(ak)})
		if err == nil && tr.Succeeded {
			gd := &guard{vol: v.ID, name: v.Name, epoch: epoch}
			gd.lease.Store(int64(g.ID))
			return s.newAttachLease(v, holder, epoch, g.ID, gd, ak, tr.Header.Revision), nil
		}
		s.cli.Revoke(context.WithoutCancel(ctx), g.ID)
		if err != nil {
			return nil, fmt.Errorf("meta: attach %s: %w", name, err)
		}
		takeOver = 0
		if kvs := tr.Responses[0].GetResponseRange().Kvs; len(kvs) == 1 {
			var held attachRecord
			if !maint && json.Unmarshal(kvs[0].Value, &held) == nil && held.Maintenance {
				takeOver = kvs[0].ModRevision
				s.log.Info("attach: taking the lock over from maintenance", "volume", name, "from", held.Holder, "epoch", held.Epoch)
				continue
			}
			return nil, fmt.Errorf("meta: attach: %w", attachedError(name, kvs[0].Value))
		}
		// The volume or its epoch changed under us: retry.
	}
	return nil, fmt.Errorf("meta: attach %s: contended %d times: %w", name, maxTries, ErrConflict)
}

func (s *Client) releasedKey(id uint64) string { return fmt.Sprintf("%s%020d", s.kReleased, id) }

func parseEpoch(resp *clientv3.GetResponse) (epoch uint64, rev int64, err error) {
	if len(resp.Kvs) == 0 {
		return 0, 0, nil
	}
	epoch, err = strconv.ParseUint(string(resp.Kvs[0].Value), 10, 64)
	if err != nil {
		return 0, 0, fmt.Errorf("corrupt epoch %q: %w", resp.Kvs[0].Value, err)
	}
	return epoch, resp.Kvs[0].ModRevision, nil
}

func (s *Client) newAttachLease(v Volume, holder string, epoch uint64, lease clientv3.LeaseID, g *guard, key string, rev int64) *AttachLease {
	ctx, stop := context.WithCancel(s.cli.Ctx())
	a := &AttachLease{s: s, volume: v, holder: holder, epoch: epoch, lease: lease, g: g,
		lost: make(chan struct{}), stop: stop, done: make(chan struct{})}
	go a.run(ctx, key, rev)
	return a
}

func (a *AttachLease) run(ctx context.Context, key string, rev int64) {
	defer close(a.done)
	kctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer cancel()
	ch, err := a.s.cli.KeepAlive(kctx, a.lease)
	if err == nil {
		// The keepalive ends with the lease; a watch of the lock ends it
		// too once another holder owns the key (a take-over).
		go func() {
			if a.s.keyTaken(kctx, key, rev, a.lease) {
				a.s.log.Warn("attach lock taken over", "volume", a.volume.Name, "epoch", a.epoch)
				cancel()
			}
		}()
		for range ch { // drain
		}
	}
	a.mu.Lock()
	released := a.released
	a.mu.Unlock()
	if !released {
		a.s.log.Warn("attach lease lost", "volume", a.volume.Name, "epoch", a.epoch, "err", err)
	}
	close(a.lost)
}

// keyTaken watches the lock key from revision rev on and reports true once
// it is deleted or held under another lease than lease; false when ctx
// ends. A watch that fails is started again after re-reading the key.
func (s *Client) keyTaken(ctx context.Context, key string, rev int64, lease clientv3.LeaseID) bool {
	d := 50 * time.Millisecond
	for ctx.Err() == nil {
		wch := s.cli.Watch(ctx, key, clientv3.WithRev(rev+1))
		for wr := range wch {
			if wr.CompactRevision != 0 || wr.Err() != nil {
				break
			}
			for _, ev := range wr.Events {
				if ev.Type == mvccpb.DELETE || clientv3.LeaseID(ev.Kv.Lease) != lease {
					return true
				}
			}
			rev = wr.Header.Revision
		}
		if ctx.Err() != nil {
			return false
		}
		resp, err := s.cli.Get(ctx, key)
		if err != nil {
			backoff(ctx, &d, 2*time.Second)
			continue
		}
		if len(resp.Kvs) == 0 || clientv3.LeaseID(resp.Kvs[0].Lease) != lease {
			return true
		}
		rev = resp.Header.Revision
	}
	return false
}

// Reattach takes the attach lock back for a's holder after a was lost (etcd
// was unreachable for longer than the TTL), under a new lease of ttl and
// with a's epoch unchanged. It succeeds only if nobody attached the volume
// since a was taken: epochs/ID still holds a's epoch and attach/ID is free
// (an attach/ID still held by a's own lease, which etcd may restore after a
// restart, is revoked first). The CAS on the epoch is what makes keeping it
// safe: epochs only grow, so no storage node knows a newer one and nothing
// needs fencing again.
//
// When someone else attached in between, or the volume was deleted, it
// fails with an error wrapping ErrNotHolder that names the epoch now
// recorded (and the holder, if one is attached): a's holder must then stop
// all I/O for good, since its metadata and cached data may predate the
// other holder's writes. Other errors (etcd unreachable) may be retried.
//
// A Client made by Guarded(a) follows the new lease. a itself stays lost.
func (a *AttachLease) Reattach(ctx context.Context, ttl time.Duration) (*AttachLease, error) {
	s, v := a.s, a.volume
	name := v.Name
	ak, ek := s.attachKey(v.ID), s.epochKey(v.ID)
	host, _ := os.Hostname()
	for range maxTries {
		rec, _ := json.Marshal(attachRecord{Holder: a.holder, Host: host, Epoch: a.epoch, Since: time.Now().UTC()})
		g, err := s.cli.Grant(ctx, ttlSeconds(ttl))
		if err != nil {
			return nil, fmt.Errorf("meta: reattach %s: grant lease: %w", name, err)
		}
		tr, err := s.txn(ctx,
			[]clientv3.Cmp{
				clientv3.Compare(clientv3.CreateRevision(s.volKey(v.ID)), ">", 0),
				clientv3.Compare(clientv3.Value(ek), "=", strconv.FormatUint(a.epoch, 10)),
				clientv3.Compare(clientv3.CreateRevision(ak), "=", 0),
			},
			[]clientv3.Op{clientv3.OpPut(ak, string(rec), clientv3.WithLease(g.ID))},
			[]clientv3.Op{clientv3.OpGet(ak), clientv3.OpGet(ek), clientv3.OpGet(s.volKey(v.ID))})
		if err == nil && tr.Succeeded {
			a.stop() // its keepalive has ended already
			a.g.lease.Store(int64(g.ID))
			return s.newAttachLease(v, a.holder, a.epoch, g.ID, a.g, ak, tr.Header.Revision), nil
		}
		s.cli.Revoke(context.WithoutCancel(ctx), g.ID)
		if err != nil {
			return nil, fmt.Errorf("meta: reattach %s: %w", name, err)
		}
		akv := tr.Responses[0].GetResponseRange().Kvs
		if len(tr.Responses[2].GetResponseRange().Kvs) == 0 {
			return nil, fmt.Errorf("meta: reattach %s: the volume was deleted since epoch %d: %w: %w", name, a.epoch, ErrNotHolder, ErrNotFound)
		}
		now, _, perr := parseEpoch(&clientv3.GetResponse{Kvs: tr.Responses[1].GetResponseRange().Kvs})
		if perr != nil {
			return nil, fmt.Errorf("meta: reattach %s: %w", name, perr)
		}
		if now != a.epoch {
			return nil, fmt.Errorf("meta: reattach %s: %w", name, notHolderError(name, a.epoch, now, akv))
		}
		if len(akv) == 1 && clientv3.LeaseID(akv[0].Lease) == a.lease {
			// Our own old lock, restored by etcd and not expired yet.
			if _, err := s.cli.Revoke(ctx, a.lease); err != nil && !errors.Is(err, rpctypes.ErrLeaseNotFound) {
				return nil, fmt.Errorf("meta: reattach %s: revoke the lost lease: %w", name, err)
			}
			continue
		}
		if len(akv) == 1 {
			// Held under another lease with our epoch: not ours either.
			return nil, fmt.Errorf("meta: reattach %s: %w", name, notHolderError(name, a.epoch, now, akv))
		}
		// The lock was freed or taken between the reads: retry.
	}
	return nil, fmt.Errorf("meta: reattach %s: contended %d times: %w", name, maxTries, ErrConflict)
}

// notHolderError says that the holder of epoch mine lost volume name to
// another attach: epochs/ID is now now, and attach/ID is kv (if any).
func notHolderError(name string, mine, now uint64, kv []*mvccpb.KeyValue) error {
	who := "that holder has detached since"
	if len(kv) == 1 {
		var a attachRecord
		json.Unmarshal(kv[0].Value, &a)
		who = fmt.Sprintf("attached by %q on host %s since %s", a.Holder, a.Host, a.Since.Format(time.RFC3339))
	}
	return fmt.Errorf("volume %s was attached by another holder after epoch %d: its epoch is now %d (%s): %w",
		name, mine, now, who, ErrNotHolder)
}

// Volume returns the attached volume as it was when attached.
func (a *AttachLease) Volume() Volume { return a.volume }

// Epoch returns the attach epoch: greater than that of every earlier
// holder. Storage nodes refuse writes carrying an older epoch.
func (a *AttachLease) Epoch() uint64 { return a.epoch }

// Lost returns a channel closed when the lease ends: released, expired (etcd
// unreachable for longer than the TTL) or revoked. After that the holder must
// stop writing; another holder may already have a higher epoch.
func (a *AttachLease) Lost() <-chan struct{} { return a.lost }

// Release stops the keepalive and revokes the lease, which frees the lock at
// once. It is safe to call more than once. The revoke waits for etcd: give
// ctx a deadline (if it fails, the lock is freed when the TTL runs out).
func (a *AttachLease) Release(ctx context.Context) error {
	a.mu.Lock()
	if a.released {
		a.mu.Unlock()
		return nil
	}
	a.released = true
	a.mu.Unlock()
	a.stop()
	<-a.done
	// Recorded before the lock goes: this epoch detached cleanly (a
	// snapshot of the volume needs no holder to pause). Only while still
	// held with our lease and epoch; if that fails, the detach counts as
	// unclean, which costs a snapshot a fencing attach, never a write.
	a.s.cli.Txn(ctx).If(
		clientv3.Compare(clientv3.Value(a.s.epochKey(a.volume.ID)), "=", strconv.FormatUint(a.epoch, 10)),
		clientv3.Compare(clientv3.LeaseValue(a.s.attachKey(a.volume.ID)), "=", a.lease),
	).Then(clientv3.OpPut(a.s.releasedKey(a.volume.ID), strconv.FormatUint(a.epoch, 10))).Commit()
	_, err := a.s.cli.Revoke(ctx, a.lease)
	if err != nil && !errors.Is(err, rpctypes.ErrLeaseNotFound) { // not found: expired already
		return fmt.Errorf("meta: release %s: revoke lease: %w", a.volume.Name, err)
	}
	return nil
}

// Epoch returns the last attach epoch of the volume called name (0 if it
// was never attached).
func (s *Client) Epoch(ctx context.Context, name string) (uint64, error) {
	v, _, err := s.volume(ctx, name)
	if err != nil {
		return 0, fmt.Errorf("meta: epoch: %w", err)
	}
	resp, err := s.cli.Get(ctx, s.epochKey(v.ID))
	if err != nil {
		return 0, fmt.Errorf("meta: epoch of %s: %w", name, err)
	}
	e, _, err := parseEpoch(resp)
	if err != nil {
		return 0, fmt.Errorf("meta: epoch of %s: %w", name, err)
	}
	return e, nil
}

// guard is the attach lock a guarded Client's writes depend on: volume vol
// held at epoch under lease (the holder's current lease; Reattach moves it).
type guard struct {
	vol   uint64
	name  string
	epoch uint64
	lease atomic.Int64 // clientv3.LeaseID
}

// Guarded returns a view of s whose every write (MarkMissed, ClearMissed,
// SetMoves, SetProgress, ...) succeeds only while the holder of l still
// holds the attach lock of l's volume with l's epoch: epochs/ID equals
// l.Epoch() and attach/ID is held under l's lease, or under the lease of
// the latest Reattach made from l. Otherwise the write changes nothing and
// fails with an error wrapping ErrNotHolder (another holder attached since:
// stop for good) or ErrLeaseLost (the lease ended and nobody attached yet:
// Reattach may take it back). Reads are not affected. The view shares s's
// etcd client: close s, not the view.
func (s *Client) Guarded(l *AttachLease) *Client {
	v := *s
	v.guard = l.g
	return &v
}

// guardCmps are the comparisons of s's guard (nil without one).
func (s *Client) guardCmps() []clientv3.Cmp {
	g := s.guard
	if g == nil {
		return nil
	}
	return []clientv3.Cmp{
		clientv3.Compare(clientv3.Value(s.epochKey(g.vol)), "=", strconv.FormatUint(g.epoch, 10)),
		clientv3.Compare(clientv3.LeaseValue(s.attachKey(g.vol)), "=", clientv3.LeaseID(g.lease.Load())),
	}
}

// guardErr tells from the epoch and attach keys read in a failed guarded
// transaction (ekv, akv) whether the guard failed, and how.
func (s *Client) guardErr(ekv, akv []*mvccpb.KeyValue) error {
	g := s.guard
	name := g.name
	now, _, err := parseEpoch(&clientv3.GetResponse{Kvs: ekv})
	if err != nil {
		return fmt.Errorf("meta: volume %s: %w", name, err)
	}
	if len(ekv) == 0 || now != g.epoch {
		return fmt.Errorf("meta: write refused: %w", notHolderError(name, g.epoch, now, akv))
	}
	if len(akv) == 0 {
		return fmt.Errorf("meta: write refused: the attach lease of volume %s (epoch %d) ended and the lock is not taken back yet: %w",
			name, g.epoch, ErrLeaseLost)
	}
	if clientv3.LeaseID(akv[0].Lease) != clientv3.LeaseID(g.lease.Load()) {
		return fmt.Errorf("meta: write refused: %w", notHolderError(name, g.epoch, now, akv))
	}
	return nil
}
