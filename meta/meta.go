// Package meta keeps Torus cluster metadata in etcd: the cluster config, the
// node registry, the placement ring, volumes and their attach locks.
//
// Everything lives under one key prefix (default DefaultPrefix):
//
//	PREFIX/schema                   "1.0": schema version, major.minor
//	PREFIX/v1/config                JSON Config
//	PREFIX/v1/nodes/ID              JSON Node, attached to the node's lease
//	PREFIX/v1/ring                  ring.Ring binary encoding
//	PREFIX/v1/volumes/next-id       next volume id, decimal
//	PREFIX/v1/volumes/by-name/NAME  volume id, decimal
//	PREFIX/v1/volumes/ID            JSON Volume; ID is 20 zero-padded digits
//	PREFIX/v1/attach/ID             JSON attach record, attached to the holder's lease
//	PREFIX/v1/devices/ID            JSON Device the holder serves the volume with,
//	                                attached to the holder's lease (device.go)
//	PREFIX/v1/epochs/ID             last attach epoch of the volume, decimal
//	PREFIX/v1/missed/ID/NODE/CHUNK  a missed mark: node NODE lacks the latest
//	                                data of chunk CHUNK (20 digits) of volume
//	                                ID; value: RFC 3339 time of the mark
//	PREFIX/v1/progress/ID           JSON Progress of the volume's rebuild,
//	                                rebalance or scrub
//	PREFIX/v1/moves/ID              the rings a rebalancing volume's chunks may
//	                                still live under (see moves.go)
//	PREFIX/v1/rings/VERSION         every ring written, by version (20 digits):
//	                                the history placement changes are read from
//	PREFIX/v1/placed/ID             the ring version up to which the volume's
//	                                placement changes are recorded (moves.go)
//	PREFIX/v1/usage/NODE            JSON NodeUsage: the chunks a node holds
//	                                per volume, attached to the node's lease
//	                                (usage.go)
//
// Invariants (kept by this file's txn helper and by every writer):
//
//   - Every write is one etcd transaction whose first comparison is
//     "PREFIX/schema == the value seen at Open or Init"; a cluster that was
//     never initialised, or whose schema changed under us, refuses writes
//     with ErrNotInitialized or ErrSchemaVersion.
//   - Open refuses a prefix holding another major schema version.
//   - The ring key changes only by compare-and-swap on its mod revision, in
//     the transaction that also writes the ring to rings/VERSION, so every
//     placement change is on record the moment it takes effect (moves.go).
//   - A volume's attach key and its epoch bump are written in the same
//     transaction, so every holder of the attach lock has a distinct epoch,
//     and epochs of successive holders strictly increase. The one exception
//     keeps that true: a holder whose lease ended re-creates the key with its
//     own epoch only if the epoch is still the volume's (see attach.go).
//   - A Client made by Guarded writes only while its holder holds the lock
//     with its epoch (the comparisons are in the same transaction).
//   - Volume ids come from the next-id counter, changed only by CAS, so an
//     id is never reused, not even after a delete (epochs stay monotonic).
//   - Keys attached to a lease (nodes, usage, attach) vanish when the lease ends:
//     presence means a live owner.
//   - Missed marks and progress records exist only for existing volumes:
//     they are written in transactions that check the volume record and
//     deleted with it (see marks.go).
package meta

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"time"

	"google.golang.org/grpc"
	grpcbackoff "google.golang.org/grpc/backoff"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// DefaultPrefix is the key prefix used when Open is given "".
const DefaultPrefix = "/torus/"

// SchemaMajor and SchemaMinor are the schema version this package writes.
// Open refuses a prefix initialised with another major version.
const (
	SchemaMajor = 1
	SchemaMinor = 0
)

// DefaultDialTimeout bounds how long Open waits for etcd.
const DefaultDialTimeout = 3 * time.Second

// Sentinel errors, for errors.Is. Returned errors wrap them with context.
var (
	ErrUnreachable        = errors.New("etcd is unreachable")
	ErrNotInitialized     = errors.New("cluster not initialised")
	ErrAlreadyInitialized = errors.New("cluster already initialised")
	ErrSchemaVersion      = errors.New("unsupported metadata schema version")
	ErrConflict           = errors.New("concurrent update")
	ErrExists             = errors.New("already exists")
	ErrNotFound           = errors.New("not found")
	ErrAttached           = errors.New("volume is attached")
	ErrShrink             = errors.New("size below the current size")
	ErrInvalid            = errors.New("invalid argument")
	// ErrInUse: a snapshot (or a volume with one) that clones still read
	// from.
	ErrInUse = errors.New("in use by clones")
	// ErrNotReleased: the volume's last holder did not detach cleanly (its
	// lease expired): it may still be writing without etcd. A snapshot of
	// it needs a holder that fences the nodes first (attach it).
	ErrNotReleased = errors.New("the last holder did not detach cleanly")
	// ErrNotHolder: another holder attached the volume after the caller's
	// attach (its epoch is no longer the volume's). The caller must stop
	// all I/O to it for good.
	ErrNotHolder = errors.New("no longer the holder of the volume")
	// ErrLeaseLost: the caller's attach lease ended and nobody attached
	// since; AttachLease.Reattach may take the lock back.
	ErrLeaseLost = errors.New("attach lease lost")
)

// Options tune Open.
type Options struct {
	// DialTimeout bounds how long Open waits for etcd to answer; zero means
	// DefaultDialTimeout.
	DialTimeout time.Duration
	// Logger receives background events (re-registrations, lost leases,
	// watch restarts); nil means slog.Default().
	Logger *slog.Logger
}

// Client is a handle on the metadata of one Torus cluster. It is safe for
// concurrent use. Close it when done.
type Client struct {
	cli    *clientv3.Client
	log    *slog.Logger
	prefix string
	schema string // schema value every write compares against
	guard  *guard // set by Guarded: an attach lock every write compares against

	kSchema, kConfig, kNodes, kRing, kNextID, kByName, kVolumes, kAttach, kEpochs, kMissed, kProgress, kMoves, kRings, kPlaced string
	kSnapReq, kSnapAck, kReleased, kSnapUse, kUsage, kClientEpochs                                                             string
}

type unreachableError struct {
	endpoints string
	cause     error
}

func (e *unreachableError) Error() string {
	return fmt.Sprintf("etcd at %s is unreachable: start etcd or pass --etcd (%v)", e.endpoints, e.cause)
}

func (e *unreachableError) Is(target error) bool { return target == ErrUnreachable }
func (e *unreachableError) Unwrap() error        { return e.cause }

// Open connects to etcd at endpoints and checks the schema under prefix
// ("" means DefaultPrefix; it must start and end with "/"). It fails with
// ErrUnreachable within opt.DialTimeout if etcd does not answer, and with
// ErrSchemaVersion if prefix holds another major schema version. An
// uninitialised prefix is fine: call Init.
func Open(ctx context.Context, endpoints []string, prefix string, opt Options) (*Client, error) {
	if prefix == "" {
		prefix = DefaultPrefix
	}
	if !strings.HasPrefix(prefix, "/") || !strings.HasSuffix(prefix, "/") {
		return nil, fmt.Errorf("meta: prefix %q must start and end with '/': %w", prefix, ErrInvalid)
	}
	if len(endpoints) == 0 {
		return nil, fmt.Errorf("meta: no etcd endpoints: %w", ErrInvalid)
	}
	if opt.DialTimeout <= 0 {
		opt.DialTimeout = DefaultDialTimeout
	}
	if opt.Logger == nil {
		opt.Logger = slog.Default()
	}
	eps := strings.Join(endpoints, ",")
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:   endpoints,
		DialTimeout: opt.DialTimeout,
		Logger:      zap.NewNop(),
		// gRPC's default reconnect backoff grows to 120 s: after an etcd
		// outage, leases (node registrations, attach locks) would come
		// back minutes late. Retry every few seconds at most.
		DialOptions: []grpc.DialOption{grpc.WithConnectParams(grpc.ConnectParams{
			Backoff:           grpcbackoff.Config{BaseDelay: 200 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: 3 * time.Second},
			MinConnectTimeout: 2 * time.Second,
		})},
	})
	if err != nil {
		return nil, &unreachableError{eps, err}
	}
	s := newClient(cli, prefix, opt.Logger)

	pctx, cancel := context.WithTimeout(ctx, opt.DialTimeout)
	resp, err := cli.Get(clientv3.WithRequireLeader(pctx), s.kSchema)
	cancel()
	if err != nil {
		cli.Close()
		if ctx.Err() != nil {
			return nil, fmt.Errorf("meta: open %s: %w", eps, ctx.Err())
		}
		return nil, &unreachableError{eps, err}
	}
	if len(resp.Kvs) == 1 {
		v := string(resp.Kvs[0].Value)
		if err := s.checkSchema(v); err != nil {
			cli.Close()
			return nil, err
		}
		s.schema = v
	}
	return s, nil
}

func newClient(cli *clientv3.Client, prefix string, log *slog.Logger) *Client {
	v := prefix + "v" + strconv.Itoa(SchemaMajor) + "/"
	return &Client{
		cli:       cli,
		log:       log.With("component", "meta"),
		prefix:    prefix,
		schema:    schemaValue(),
		kSchema:   prefix + "schema",
		kConfig:   v + "config",
		kNodes:    v + "nodes/",
		kRing:     v + "ring",
		kNextID:   v + "volumes/next-id",
		kByName:   v + "volumes/by-name/",
		kVolumes:  v + "volumes/",
		kAttach:   v + "attach/",
		kEpochs:   v + "epochs/",
		kMissed:   v + "missed/",
		kProgress: v + "progress/",
		kMoves:    v + "moves/",
		kRings:    v + "rings/",
		kPlaced:   v + "placed/",
		kSnapReq:  v + "snapreq/",
		kSnapAck:  v + "snapack/",
		kReleased: v + "released/",
		kSnapUse:  v + "snapuse/",
		kUsage:    v + "usage/",

		kClientEpochs: v + "clientepochs/",
	}
}

func schemaValue() string { return fmt.Sprintf("%d.%d", SchemaMajor, SchemaMinor) }

func (s *Client) checkSchema(v string) error {
	major, _, _ := strings.Cut(v, ".")
	if major != strconv.Itoa(SchemaMajor) {
		return fmt.Errorf("meta: etcd prefix %s holds schema version %q, this build understands %d.x only: "+
			"use a matching torus build or another prefix: %w", s.prefix, v, SchemaMajor, ErrSchemaVersion)
	}
	return nil
}

// Close closes the etcd client. Leases of registrations and attach locks
// still held are not revoked: they expire after their TTL (call their
// Close/Release first for a clean exit).
func (s *Client) Close() error { return s.cli.Close() }

// Prefix returns the key prefix of the client.
func (s *Client) Prefix() string { return s.prefix }

// txn runs If(schema == s.schema, guard..., cmps...).Then(thens...).Else(elses...).
// When the comparison fails it reports a missing or changed schema, or a
// failed guard (a Client made by Guarded), as an error; otherwise it returns
// the response for the caller to interpret (the Else responses are
// resp.Responses[:len(elses)]).
func (s *Client) txn(ctx context.Context, cmps []clientv3.Cmp, thens, elses []clientv3.Op) (*clientv3.TxnResponse, error) {
	all := append([]clientv3.Cmp{clientv3.Compare(clientv3.Value(s.kSchema), "=", s.schema)}, s.guardCmps()...)
	all = append(all, cmps...)
	el := append(elses[:len(elses):len(elses)], clientv3.OpGet(s.kSchema))
	if s.guard != nil {
		el = append(el, clientv3.OpGet(s.epochKey(s.guard.vol)), clientv3.OpGet(s.attachKey(s.guard.vol)))
	}
	resp, err := s.cli.Txn(ctx).If(all...).Then(thens...).Else(el...).Commit()
	if err != nil {
		return nil, err
	}
	if resp.Succeeded {
		return resp, nil
	}
	kvs := resp.Responses[len(elses)].GetResponseRange().Kvs
	if len(kvs) == 0 {
		return nil, fmt.Errorf("meta: prefix %s: %w: run init first", s.prefix, ErrNotInitialized)
	}
	if v := string(kvs[0].Value); v != s.schema {
		if err := s.checkSchema(v); err != nil {
			return nil, err
		}
		return nil, fmt.Errorf("meta: schema under %s changed from %q to %q while open: reopen: %w",
			s.prefix, s.schema, v, ErrSchemaVersion)
	}
	if s.guard != nil {
		n := len(elses)
		if err := s.guardErr(resp.Responses[n+1].GetResponseRange().Kvs, resp.Responses[n+2].GetResponseRange().Kvs); err != nil {
			return nil, err
		}
	}
	return resp, nil
}

// Config is the cluster-wide configuration, written by Init; afterwards
// only Replication changes (SetReplication).
type Config struct {
	// ClusterID names the cluster; Init fills in a random one if empty.
	ClusterID string `json:"cluster_id"`
	// ChunkSize is the placement unit in bytes: a power of two from
	// MinChunkSize to MaxChunkSize (CheckChunkSize).
	ChunkSize uint64 `json:"chunk_size"`
	// Replication is the default number of copies of a chunk.
	Replication int `json:"replication"`
	// Created is when Init ran; Init fills it in if zero.
	Created time.Time `json:"created"`
}

// The chunk sizes a cluster can have. This is the one definition every
// part checks against: meta.Init and torusctl init refuse others, nodes
// create stores with it (store.MinChunkSize and store.MaxChunkSize are
// these), and package cluster checks at compile time that the chunk protocol
// addresses and the transport carries a whole chunk of MaxChunkSize in one
// frame (a rebuild copies whole chunks).
const (
	// MinChunkSize is the smallest chunk size (64 KiB): below it a node
	// store's 4 KiB slot header per chunk costs more than 6% of its space.
	MinChunkSize = 64 << 10
	// MaxChunkSize is the largest chunk size (2 MiB): what a node store's
	// fixed 4 KiB slot header describes (a CRC32C and a written bit per
	// 4 KiB block) and the chunk protocol's block counts address.
	MaxChunkSize = 2 << 20
)

// CheckChunkSize reports whether n bytes is a valid chunk size: a power of
// two from MinChunkSize to MaxChunkSize (so a multiple of 4 KiB). Its
// error wraps ErrInvalid and names the allowed sizes.
func CheckChunkSize(n uint64) error {
	if n < MinChunkSize || n > MaxChunkSize || n&(n-1) != 0 {
		return fmt.Errorf("chunk size %d bytes is not allowed: give a power of two from 64 KiB to 2 MiB "+
			"(64KiB, 128KiB, 256KiB, 512KiB, 1MiB or 2MiB): %w", n, ErrInvalid)
	}
	return nil
}

// Init writes the schema version and cfg. It fails with
// ErrAlreadyInitialized if the prefix already holds a cluster, and with
// ErrInvalid if cfg.ChunkSize is not one CheckChunkSize allows or
// cfg.Replication is below 1.
func (s *Client) Init(ctx context.Context, cfg Config) error {
	if err := CheckChunkSize(cfg.ChunkSize); err != nil {
		return fmt.Errorf("meta: init: %w", err)
	}
	if cfg.Replication < 1 {
		return fmt.Errorf("meta: init: replication %d below 1: %w", cfg.Replication, ErrInvalid)
	}
	if cfg.ClusterID == "" {
		var b [8]byte
		rand.Read(b[:])
		cfg.ClusterID = hex.EncodeToString(b[:])
	}
	if cfg.Created.IsZero() {
		cfg.Created = time.Now().UTC()
	}
	js, err := json.Marshal(cfg)
	if err != nil {
		return fmt.Errorf("meta: init: %w", err)
	}
	resp, err := s.cli.Txn(ctx).
		If(clientv3.Compare(clientv3.CreateRevision(s.kSchema), "=", 0),
			clientv3.Compare(clientv3.CreateRevision(s.kConfig), "=", 0)).
		Then(clientv3.OpPut(s.kSchema, schemaValue()), clientv3.OpPut(s.kConfig, string(js))).
		Else(clientv3.OpGet(s.kSchema), clientv3.OpGet(s.kConfig)).
		Commit()
	if err != nil {
		return fmt.Errorf("meta: init %s: %w", s.prefix, err)
	}
	if resp.Succeeded {
		return nil // s.schema already is schemaValue(): Open saw no schema
	}
	detail := ""
	if kvs := resp.Responses[1].GetResponseRange().Kvs; len(kvs) == 1 {
		var old Config
		if json.Unmarshal(kvs[0].Value, &old) == nil {
			detail = fmt.Sprintf(" (cluster %s, created %s)", old.ClusterID, old.Created.Format(time.RFC3339))
		}
	}
	return fmt.Errorf("meta: init: prefix %s already holds a cluster%s: %w", s.prefix, detail, ErrAlreadyInitialized)
}

// Config returns the cluster configuration; ErrNotInitialized before Init.
func (s *Client) Config(ctx context.Context) (Config, error) {
	var cfg Config
	resp, err := s.cli.Get(ctx, s.kConfig)
	if err != nil {
		return cfg, fmt.Errorf("meta: read config: %w", err)
	}
	if len(resp.Kvs) == 0 {
		return cfg, fmt.Errorf("meta: prefix %s: %w: run init first", s.prefix, ErrNotInitialized)
	}
	if err := json.Unmarshal(resp.Kvs[0].Value, &cfg); err != nil {
		return cfg, fmt.Errorf("meta: decode config: %w", err)
	}
	return cfg, nil
}

// ttlSeconds converts a lease TTL to etcd's whole seconds, at least 1.
func ttlSeconds(ttl time.Duration) int64 {
	sec := int64((ttl + time.Second - 1) / time.Second)
	return max(sec, 1)
}

// backoff sleeps for d (doubling it up to max) or until ctx is done; it
// reports whether ctx is still live.
func backoff(ctx context.Context, d *time.Duration, maxD time.Duration) bool {
	t := time.NewTimer(*d)
	defer t.Stop()
	*d = min(*d*2, maxD)
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
