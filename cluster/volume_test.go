package cluster

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/torus-storage/torus/engine"
	"github.com/torus-storage/torus/internal/devetcd"
	"github.com/torus-storage/torus/internal/testcluster"
	"github.com/torus-storage/torus/internal/voltest"
	"github.com/torus-storage/torus/meta"
	"github.com/torus-storage/torus/netquic"
	"github.com/torus-storage/torus/node"
	"github.com/torus-storage/torus/ring"
	"github.com/torus-storage/torus/store"
)

// quietLog keeps test output to warnings.
var quietLog = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))

const testChunk = 64 << 10

// testNode is one storage node: a store served by a node.Server over
// netquic on 127.0.0.1.
type testNode struct {
	id   string
	path string
	st   *store.Store
	ns   *node.Server
	srv  *netquic.Server
	addr string
	tls  *netquic.TLSConfigs
	meta meta.Node
	reg  *meta.Registration
}

// testCluster is an embedded etcd, an initialised cluster and nodes.
type testCluster struct {
	t      testing.TB
	etcd   *devetcd.Server
	ms     *meta.Client
	ca     string
	client *netquic.TLSConfigs
	nodes  []*testNode

	transport string
	chunk     int64 // the cluster's chunk size
}

func startCluster(t testing.TB, n int, slots int64) *testCluster {
	t.Helper()
	return startClusterTransport(t, n, slots, netquic.TransportQUIC)
}

// startClusterTransport starts n nodes serving over transport.
func startClusterTransport(t testing.TB, n int, slots int64, transport string) *testCluster {
	t.Helper()
	return startClusterChunk(t, n, slots, transport, testChunk)
}

// startClusterChunk starts n nodes serving over transport, in a cluster
// whose chunk size is chunk.
func startClusterChunk(t testing.TB, n int, slots int64, transport string, chunk int64) *testCluster {
	t.Helper()
	// etcd, the configuration, the CA and a client certificate as every
	// test cluster has them (testcluster); the nodes are in-process (below),
	// on stores the tests snapshot and roll back.
	c := testcluster.NewCluster(t, testcluster.Options{ClusterID: "test", ChunkSize: uint64(chunk), Replication: 3, Logger: quietLog})
	tc := &testCluster{t: t, etcd: c.Etcd, ms: c.Meta, ca: c.CADir, transport: transport, chunk: chunk}
	var err error
	if tc.client, err = netquic.LoadTLS(c.TLSDir); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var rn []ring.Node
	for i := range n {
		nd := tc.startNode(fmt.Sprintf("node%d", i+1), slots)
		rn = append(rn, nd.meta.RingNode())
	}
	r, err := ring.New(rn, ring.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := tc.ms.CASRing(ctx, 0, r); err != nil {
		t.Fatal(err)
	}
	return tc
}

// startNode makes node id (certificate, store of slots chunks), serves it on
// 127.0.0.1 and registers it in etcd; it does not touch the ring.
func (tc *testCluster) startNode(id string, slots int64) *testNode {
	t := tc.t
	t.Helper()
	dir := t.TempDir()
	nd := &testNode{id: id, path: filepath.Join(dir, "store")}
	ndir := filepath.Join(dir, "tls")
	if err := netquic.IssueCert(tc.ca, nd.id, []string{"127.0.0.1"}, ndir); err != nil {
		t.Fatal(err)
	}
	var err error
	if nd.tls, err = netquic.LoadTLS(ndir); err != nil {
		t.Fatal(err)
	}
	if nd.st, err = store.CreateStore(nd.path, store.StoreOptions{ChunkSize: tc.chunk, Slots: slots, ClusterID: []byte("test"),
		Shards: 1, Logger: quietLog}); err != nil {
		t.Fatal(err)
	}
	tc.serve(nd, "127.0.0.1:0")
	t.Cleanup(func() {
		nd.srv.Close()
		nd.st.Close()
	})
	nd.meta = meta.Node{ID: nd.id, Addr: nd.addr, Capacity: 1 << 30, Host: nd.id}
	reg, err := tc.ms.RegisterNode(context.Background(), nd.meta, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	nd.reg = reg
	t.Cleanup(func() {
		c, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		reg.Close(c)
	})
	tc.nodes = append(tc.nodes, nd)
	return nd
}

// serve starts nd's node.Server on addr.
func (tc *testCluster) serve(nd *testNode, addr string) {
	tc.t.Helper()
	nd.ns = node.NewServer(nd.st, node.ServerOptions{NodeID: nd.id, Logger: quietLog})
	srv, err := netquic.Listen(addr, nd.tls.Server, nd.ns, &netquic.Options{Logger: quietLog, Transport: tc.transport})
	if err != nil {
		tc.t.Fatal(err)
	}
	nd.srv, nd.addr = srv, srv.Addr().String()
}

func (tc *testCluster) volume(name string, size uint64, r int) meta.Volume {
	tc.t.Helper()
	v, err := tc.ms.CreateVolume(context.Background(), name, size, r)
	if err != nil {
		tc.t.Fatal(err)
	}
	return v
}

func (tc *testCluster) open(v meta.Volume, epoch uint64) (*Volume, error) {
	return Open(context.Background(), tc.ms, v, Options{TLS: tc.client.Client, Epoch: epoch,
		Timeout: time.Second, Logger: quietLog})
}

func (tc *testCluster) mustOpen(v meta.Volume, epoch uint64) *Volume {
	tc.t.Helper()
	c, err := tc.open(v, epoch)
	if err != nil {
		tc.t.Fatal(err)
	}
	return c
}

type chunkWaiter chan error

func (w chunkWaiter) CompleteChunk(_ *store.ChunkOp, err error) { w <- err }

// readCopy reads node nd's copy of chunk (vol, idx) directly from its store;
// ok is false if the node has no slot for it.
func readCopy(t testing.TB, nd *testNode, vol, idx uint64) (data []byte, ok bool) {
	t.Helper()
	id := store.ChunkID{Volume: vol, Index: idx}
	if _, ok := nd.st.SlotDataOffset(id); !ok {
		return nil, false
	}
	buf := voltest.Buf(t, testChunk)
	w := make(chunkWaiter, 1)
	nd.st.Submit(&store.ChunkOp{Op: engine.OpRead, Chunk: id, Length: testChunk, Buf: buf, Done: w})
	if err := <-w; err != nil {
		t.Fatalf("%s: read chunk %d: %v", nd.id, idx, err)
	}
	return buf, true
}

// checkReplicas checks that every chunk in written is on exactly r nodes
// with identical bytes equal to model, and that no other chunk exists.
func checkReplicas(t *testing.T, tc *testCluster, vol meta.Volume, r int, model []byte) {
	t.Helper()
	nchunks := uint64(len(model) / testChunk)
	counts := map[string]int{}
	for idx := range nchunks {
		want := model[idx*testChunk : (idx+1)*testChunk]
		zero := bytes.Count(want, []byte{0}) == len(want)
		copies := 0
		for _, nd := range tc.nodes {
			got, ok := readCopy(t, nd, vol.ID, idx)
			if !ok {
				continue
			}
			copies++
			counts[nd.id]++
			if !bytes.Equal(got, want) {
				t.Fatalf("chunk %d on %s differs from what was written", idx, nd.id)
			}
		}
		if copies != r && !(zero && copies == 0) {
			t.Fatalf("chunk %d is on %d nodes, want %d", idx, copies, r)
		}
	}
	t.Logf("volume %s (R=%d): chunks per node %v", vol.Name, r, counts)
}

func TestCluster(t *testing.T) {
	tc := startCluster(t, 3, 512)
	const size = 4 << 20 // 64 chunks
	for _, r := range []int{3, 2} {
		t.Run(fmt.Sprintf("R%d", r), func(t *testing.T) {
			vol := tc.volume(fmt.Sprintf("vol-r%d", r), size, r)
			c := tc.mustOpen(vol, 1)
			model := make([]byte, size)
			rng := rand.New(rand.NewPCG(uint64(r), 1))
			buf := voltest.Buf(t, 256<<10)
			// Random writes, some spanning chunks, some FUA.
			for i := range 200 {
				blocks := 1 + rng.IntN(24)
				off := int64(rng.IntN(size/engine.BlockSize-blocks)) * engine.BlockSize
				n := int64(blocks) * engine.BlockSize
				voltest.Fill(buf[:n], uint64(i)+100*uint64(r))
				var fl engine.Flags
				if i%7 == 0 {
					fl = engine.FlagFUA
				}
				if err := voltest.Do(c, engine.OpWrite, fl, off, n, buf[:n]); err != nil {
					t.Fatalf("write %d at %d+%d: %v", i, off, n, err)
				}
				copy(model[off:], buf[:n])
			}
			// A write exactly across a chunk boundary.
			off := int64(5*testChunk - 2*engine.BlockSize)
			voltest.Fill(buf[:4*engine.BlockSize], 77)
			if err := voltest.Do(c, engine.OpWrite, 0, off, 4*engine.BlockSize, buf[:4*engine.BlockSize]); err != nil {
				t.Fatal(err)
			}
			copy(model[off:], buf[:4*engine.BlockSize])
			// Discard and write-zeroes, spanning chunks too.
			if err := voltest.Do(c, engine.OpDiscard, 0, 9*testChunk-engine.BlockSize, 2*engine.BlockSize, nil); err != nil {
				t.Fatal(err)
			}
			clear(model[9*testChunk-engine.BlockSize : 9*testChunk+engine.BlockSize])
			if err := voltest.Do(c, engine.OpWriteZeroes, engine.FlagNoUnmap, 20*testChunk, 3*engine.BlockSize, nil); err != nil {
				t.Fatal(err)
			}
			clear(model[20*testChunk : 20*testChunk+3*engine.BlockSize])
			verify(t, c, model)
			if err := voltest.Do(c, engine.OpFlush, 0, 0, 0, nil); err != nil {
				t.Fatal(err)
			}
			checkReplicas(t, tc, vol, r, model)

			// Out of range and unaligned requests change nothing.
			for _, tcse := range []struct{ off, n int64 }{{size, engine.BlockSize}, {size - engine.BlockSize, 2 * engine.BlockSize}, {100, engine.BlockSize}, {-engine.BlockSize, engine.BlockSize}} {
				if err := voltest.Do(c, engine.OpWrite, 0, tcse.off, tcse.n, buf[:tcse.n]); !errors.Is(err, engine.ErrRange) {
					t.Errorf("write at %d+%d: err %v, want ErrRange", tcse.off, tcse.n, err)
				}
				if err := voltest.Do(c, engine.OpRead, 0, tcse.off, tcse.n, buf[:tcse.n]); !errors.Is(err, engine.ErrRange) {
					t.Errorf("read at %d+%d: err %v, want ErrRange", tcse.off, tcse.n, err)
				}
			}
			if err := c.Close(); err != nil {
				t.Fatal(err)
			}
			// A new writer (higher epoch) sees everything.
			c2 := tc.mustOpen(vol, 2)
			verify(t, c2, model)
			if err := c2.Close(); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// verify reads the whole volume in 192 KiB pieces (3 chunks, unaligned to
// them) and compares with model.
func verify(t *testing.T, v engine.Volume, model []byte) {
	t.Helper()
	const piece = 192 << 10
	buf := voltest.Buf(t, piece)
	for off := int64(engine.BlockSize); off < int64(len(model)); off += piece {
		n := min(piece, int64(len(model))-off)
		if err := voltest.Do(v, engine.OpRead, 0, off, n, buf[:n]); err != nil {
			t.Fatalf("read at %d+%d: %v", off, n, err)
		}
		if !bytes.Equal(buf[:n], model[off:off+n]) {
			t.Fatalf("read at %d+%d: data differs", off, n)
		}
	}
	if err := voltest.Do(v, engine.OpRead, 0, 0, engine.BlockSize, buf[:engine.BlockSize]); err != nil || !bytes.Equal(buf[:engine.BlockSize], model[:engine.BlockSize]) {
		t.Fatalf("read of block 0: %v", err)
	}
}

// TestClusterFencing: once a writer with a higher epoch opened the volume,
// the older writer's writes fail with engine.ErrFenced and change nothing,
// after which all its requests fail, and a writer opening with a lower epoch
// is refused.
func TestClusterFencing(t *testing.T) {
	tc := startCluster(t, 3, 64)
	vol := tc.volume("fenced", 1<<20, 3)
	old := tc.mustOpen(vol, 5)
	defer old.Close()
	a, b := voltest.Buf(t, 2*engine.BlockSize), voltest.Buf(t, 2*engine.BlockSize)
	voltest.Fill(a, 1)
	if err := voltest.Do(old, engine.OpWrite, 0, testChunk-engine.BlockSize, 2*engine.BlockSize, a); err != nil {
		t.Fatal(err)
	}
	nw := tc.mustOpen(vol, 6)
	defer nw.Close()
	voltest.Fill(b, 2)
	for _, op := range []engine.Op{engine.OpWrite, engine.OpDiscard, engine.OpWriteZeroes} {
		var buf []byte
		if op == engine.OpWrite {
			buf = b
		}
		if err := voltest.Do(old, op, 0, testChunk-engine.BlockSize, 2*engine.BlockSize, buf); !errors.Is(err, engine.ErrFenced) {
			t.Fatalf("%v by the fenced writer: err %v, want ErrFenced", op, err)
		}
	}
	got := voltest.Buf(t, 2*engine.BlockSize)
	if err := voltest.Do(nw, engine.OpRead, 0, testChunk-engine.BlockSize, 2*engine.BlockSize, got); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, a) {
		t.Fatal("the fenced writer changed the data")
	}
	// The stale-epoch answer fenced the old writer for good: its reads fail
	// too (what it cached may predate the new writer's data).
	if err := voltest.Do(old, engine.OpRead, 0, testChunk-engine.BlockSize, 2*engine.BlockSize, got); !errors.Is(err, engine.ErrFenced) {
		t.Fatalf("read by the fenced writer: err %v, want ErrFenced", err)
	}
	if err := voltest.Do(old, engine.OpFlush, 0, 0, 0, nil); !errors.Is(err, engine.ErrFenced) {
		t.Fatalf("flush by the fenced writer: err %v, want ErrFenced", err)
	}
	if err := old.Fenced(); err == nil || !strings.Contains(err.Error(), "knows epoch 6") {
		t.Fatalf("Fenced() = %v, want the node's newer epoch 6", err)
	}
	if _, err := tc.open(vol, 4); !errors.Is(err, engine.ErrFenced) {
		t.Fatalf("open with an older epoch: err %v, want ErrFenced", err)
	}
	var stale uint64
	for _, nd := range tc.nodes {
		stale += nd.ns.Stats().StaleEpoch
	}
	if stale == 0 {
		t.Fatal("nodes counted no stale-epoch refusals")
	}
}

// TestClusterFailover: with one node's server stopped, every read still
// succeeds (from the other replicas), writes go on degraded, and once the
// node is back writes work again.
func TestClusterFailover(t *testing.T) {
	tc := startCluster(t, 3, 128)
	const size = 2 << 20
	vol := tc.volume("failover", size, 3)
	c := tc.mustOpen(vol, 1)
	defer c.Close()
	model := make([]byte, size)
	voltest.Fill(model, 9)
	buf := voltest.Buf(t, size)
	copy(buf, model)
	if err := voltest.Do(c, engine.OpWrite, 0, 0, size, buf); err != nil {
		t.Fatal(err)
	}
	down := tc.nodes[0]
	down.srv.Close()
	verify(t, c, model)
	if c.Failovers() == 0 {
		t.Fatal("no read failed over although a node is down")
	}
	t.Logf("failovers: %d", c.Failovers())
	// Degraded write: it succeeds on the two live replicas (the down node
	// gets a missed mark; see TestClusterDegraded).
	if err := voltest.Do(c, engine.OpWrite, 0, 0, engine.BlockSize, buf[:engine.BlockSize]); err != nil {
		t.Fatalf("write with one replica down: %v", err)
	}
	// Back on the same address: writes work again.
	tc.serve(down, down.addr)
	deadline := time.Now().Add(10 * time.Second)
	for {
		err := voltest.Do(c, engine.OpWrite, 0, 0, engine.BlockSize, buf[:engine.BlockSize])
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("write after the node came back: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	verify(t, c, model)
}
