package meta

// Invariants of a Registration:
//   - At most one goroutine (run) owns the keepalive; it exits only when
//     Close cancels its context or the Client closes.
//   - r.lease is the lease the node key was last written with; Close revokes
//     it after run exits, which deletes the key at once.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/torus-storage/torus/ring"
)

// Node is a storage node as registered in etcd.
type Node struct {
	// ID names the node, unique in the cluster; no '/'.
	ID string `json:"id"`
	// Addr is the node's QUIC address, host:port.
	Addr string `json:"addr"`
	// Socket is the path of the node's unix socket (optional): clients on
	// the node's own host (Host) may send it the same requests there.
	Socket string `json:"socket,omitempty"`
	// Capacity is the bytes the node offers.
	Capacity uint64 `json:"capacity"`
	// Used is the bytes its chunks take, NoSpace the writes it refused for
	// lack of space since it started, and Full whether it is out of space
	// now (no free slot, or a write refused in the last 10 s), as last
	// reported (Registration.Update).
	Used    uint64 `json:"used,omitempty"`
	NoSpace uint64 `json:"no_space,omitempty"`
	Full    bool   `json:"full,omitempty"`
	// NearFullRatio is the node's --near-full ratio of Used to Capacity,
	// and NearFull whether Used is at or above it, as last reported: a
	// warning before the node runs out of space (Full).
	NearFullRatio float64 `json:"near_full_ratio,omitempty"`
	NearFull      bool    `json:"near_full,omitempty"`
	// Zone and Host are the failure domains (see ring.Node).
	Zone string `json:"zone"`
	Host string `json:"host"`
	// Started is when the node process started; RegisterNode fills it in if
	// zero.
	Started time.Time `json:"started"`
}

// RingNode returns n as a ring member.
func (n Node) RingNode() ring.Node {
	return ring.Node{ID: n.ID, Zone: n.Zone, Host: n.Host, Capacity: n.Capacity}
}

func validName(kind, s string) error {
	if s == "" || len(s) > 200 || strings.ContainsAny(s, "/\x00") {
		return fmt.Errorf("meta: %s %q: must be 1-200 bytes without '/': %w", kind, s, ErrInvalid)
	}
	return nil
}

// Registration keeps a node registered: its key lives as long as the lease,
// which a background goroutine keeps alive. If the lease is lost (etcd
// unreachable longer than the TTL), the node registers again as soon as it
// can.
type Registration struct {
	s    *Client
	key  string
	val  string // guarded by mu
	ttl  int64
	stop context.CancelFunc
	done chan struct{}

	mu    sync.Mutex
	lease clientv3.LeaseID
	// usage and usageLease are the usage record last written and the
	// lease it was written under (PutUsage, usage.go).
	usage      string
	usageLease clientv3.LeaseID
}

// RegisterNode writes n under a new lease of ttl (rounded up to seconds;
// etcd may raise very short TTLs to its minimum) and keeps it alive until
// Close. It fails with ErrExists while another live process holds n.ID.
func (s *Client) RegisterNode(ctx context.Context, n Node, ttl time.Duration) (*Registration, error) {
	if err := validName("node id", n.ID); err != nil {
		return nil, err
	}
	if n.Addr == "" || n.Capacity == 0 {
		return nil, fmt.Errorf("meta: node %s: address and capacity are required: %w", n.ID, ErrInvalid)
	}
	if n.Started.IsZero() {
		n.Started = time.Now().UTC()
	}
	js, err := json.Marshal(n)
	if err != nil {
		return nil, fmt.Errorf("meta: register node %s: %w", n.ID, err)
	}
	r := &Registration{s: s, key: s.kNodes + n.ID, val: string(js), ttl: ttlSeconds(ttl), done: make(chan struct{})}
	lease, err := r.register(ctx, 0)
	if err != nil {
		return nil, err
	}
	r.lease = lease
	rctx, stop := context.WithCancel(s.cli.Ctx())
	r.stop = stop
	go r.run(rctx, lease)
	return r, nil
}

// register grants a lease and writes the node key with it, unless the key
// exists. If the key exists under prev (our lease, still alive), prev is
// returned to resume keeping it alive.
func (r *Registration) register(ctx context.Context, prev clientv3.LeaseID) (clientv3.LeaseID, error) {
	g, err := r.s.cli.Grant(ctx, r.ttl)
	if err != nil {
		return 0, fmt.Errorf("meta: register %s: grant lease: %w", r.key, err)
	}
	r.mu.Lock()
	val := r.val
	r.mu.Unlock()
	resp, err := r.s.txn(ctx,
		[]clientv3.Cmp{clientv3.Compare(clientv3.CreateRevision(r.key), "=", 0)},
		[]clientv3.Op{clientv3.OpPut(r.key, val, clientv3.WithLease(g.ID))},
		[]clientv3.Op{clientv3.OpGet(r.key)})
	if err == nil && resp.Succeeded {
		return g.ID, nil
	}
	r.s.cli.Revoke(context.WithoutCancel(ctx), g.ID)
	if err != nil {
		return 0, fmt.Errorf("meta: register %s: %w", r.key, err)
	}
	kvs := resp.Responses[0].GetResponseRange().Kvs
	if len(kvs) == 1 && prev != 0 && clientv3.LeaseID(kvs[0].Lease) == prev {
		return prev, nil
	}
	var old Node
	if len(kvs) == 1 {
		json.Unmarshal(kvs[0].Value, &old)
	}
	return 0, fmt.Errorf("meta: node %s is already registered by a live process (addr %s, started %s); "+
		"its lease expires within %ds of that process stopping: %w",
		strings.TrimPrefix(r.key, r.s.kNodes), old.Addr, old.Started.Format(time.RFC3339), r.ttl, ErrExists)
}

func (r *Registration) run(ctx context.Context, lease clientv3.LeaseID) {
	defer close(r.done)
	for {
		ch, err := r.s.cli.KeepAlive(clientv3.WithRequireLeader(ctx), lease)
		if err == nil {
			for range ch { // drain, or the client logs and drops responses
			}
		}
		if ctx.Err() != nil {
			return
		}
		r.s.log.Warn("node lease lost, registering again", "key", r.key, "lease", int64(lease), "err", err)
		d := 100 * time.Millisecond
		for {
			next, err := r.register(ctx, lease)
			if err == nil {
				lease = next
				break
			}
			if ctx.Err() != nil {
				return
			}
			r.s.log.Warn("node registration failed, retrying", "key", r.key, "err", err)
			if !backoff(ctx, &d, 5*time.Second) {
				return
			}
		}
		r.mu.Lock()
		r.lease = lease
		r.mu.Unlock()
	}
}

// Lease returns the lease the node key currently lives under.
func (r *Registration) Lease() clientv3.LeaseID {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.lease
}

// Update rewrites the registered record (same key, same lease) with n, for
// the usage a node reports while it runs. n.ID must be the registered one.
// If the lease was lost meanwhile, the next re-registration uses n.
func (r *Registration) Update(ctx context.Context, n Node) error {
	if r.key != r.s.kNodes+n.ID {
		return fmt.Errorf("meta: update node %s: registered as %s: %w", n.ID, r.key, ErrInvalid)
	}
	r.mu.Lock()
	var old Node
	json.Unmarshal([]byte(r.val), &old)
	if n.Started.IsZero() {
		n.Started = old.Started
	}
	b, err := json.Marshal(n)
	if err != nil {
		r.mu.Unlock()
		return fmt.Errorf("meta: update node %s: %w", n.ID, err)
	}
	r.val = string(b)
	lease := r.lease
	r.mu.Unlock()
	_, err = r.s.txn(ctx,
		[]clientv3.Cmp{clientv3.Compare(clientv3.LeaseValue(r.key), "=", lease)},
		[]clientv3.Op{clientv3.OpPut(r.key, string(b), clientv3.WithLease(lease))}, nil)
	if err != nil {
		return fmt.Errorf("meta: update node %s: %w", n.ID, err)
	}
	return nil
}

// Close stops keeping the registration alive and revokes its lease, which
// removes the node from Nodes at once. It is safe to call more than once.
// The revoke waits for etcd: give ctx a deadline.
func (r *Registration) Close(ctx context.Context) error {
	r.stop()
	<-r.done
	r.mu.Lock()
	lease := r.lease
	r.lease = 0
	r.mu.Unlock()
	if lease == 0 {
		return nil
	}
	if _, err := r.s.cli.Revoke(ctx, lease); err != nil && !errors.Is(err, rpctypes.ErrLeaseNotFound) {
		return fmt.Errorf("meta: unregister %s: revoke lease: %w", r.key, err)
	}
	return nil
}

// Nodes returns the registered (live) nodes, ordered by ID.
func (s *Client) Nodes(ctx context.Context) ([]Node, error) {
	resp, err := s.cli.Get(ctx, s.kNodes, clientv3.WithPrefix())
	if err != nil {
		return nil, fmt.Errorf("meta: list nodes: %w", err)
	}
	nodes := make([]Node, 0, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		var n Node
		if err := json.Unmarshal(kv.Value, &n); err != nil {
			return nil, fmt.Errorf("meta: decode node %s: %w", kv.Key, err)
		}
		nodes = append(nodes, n)
	}
	return nodes, nil
}
