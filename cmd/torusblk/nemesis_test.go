//go:build faults

package main

// TestNemesis (`make test-nemesis`, part of `make test`): a randomized fault
// test in the style of Jepsen, on the machinery of the fault suite (real
// torusd processes, an embedded etcd, torusctl, `torusblk serve` on a unix
// socket, the Go NBD test client, the netquic fault hook).
//
//   - Writers: nemWriters goroutines, each with its own NBD connection to
//     the serving torusblk process, issue random 4 KiB writes, reads and
//     flushes over nemBlocks blocks spread over nemChunks chunks of an R=2
//     volume on 3-4 nodes. A write's payload names its block, its writer and
//     a unique write id, and ends in a CRC32C, so every read says exactly
//     which write it returned.
//   - The nemesis, in the test goroutine: every few seconds it picks a fault
//     with the seeded generator, holds it, and heals it: kill -9 of a node
//     and a restart; a power loss of a node on a repaired cluster (kill -9,
//     then a restart whose store undoes every write no fdatasync covered:
//     the store's fault hook); a partition of a node (netquic fault hook, each node
//     armed with its own file); a node added (a new torusd joins the ring) or
//     one removed (`torusctl node remove`, then stopped once its chunks
//     moved); etcd stopped and restarted within the attach lease; etcd
//     stopped for longer than the lease (the client loses its attach lock and
//     takes it again with a new epoch); kill -9 of the client and a re-attach
//     by a new torusblk process, whose writers reconnect. One fault is active
//     at a time.
//   - The history holds every op with its invoke and completion times (the
//     test's monotonic clock) and its result: ok, failed (an NBD error) or
//     indeterminate (connection lost, or no answer within nemOpDeadline,
//     which is also reported as a hang and fails the test).
//   - The checker (nemCheck), per block: a read may return a write w only if
//     w was invoked before the read completed and no write w2 acknowledged
//     before the read started was invoked after w's effect window ended.
//     The window of an acknowledged write ends at its ack; a failed or
//     indeterminate write may land at any time after its invocation, but not
//     after its writer process was fenced (the next torusblk process
//     serving). The zeros of a fresh volume are a write acknowledged at time
//     zero. A read outside that set is an anomaly, named after its cause:
//     lost-flushed (a newer write acknowledged before a completed FLUSH
//     is gone), fenced-write-resurfaced (an unacknowledged write of a
//     killed client overwrote a newer write of its successor), stale,
//     future (a write invoked after the read completed), corrupt (bad CRC,
//     wrong block, unknown id).
//   - At the end every fault is healed, the writers stop, the cluster must
//     repair (no missed marks, no pending moves), and every block is read
//     once through the serving process and once through a new one per ring
//     node preferring that node's replicas (--local-node); these reads are
//     checked the same way.
//
// Everything the nemesis chooses comes from -nemesis.seed (timing varies).

import (
	"context"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"hash/crc32"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/torus-storage/torus/internal/nbdtest"
	"github.com/torus-storage/torus/internal/testcluster"
	"github.com/torus-storage/torus/meta"
	"github.com/torus-storage/torus/netquic"
	"github.com/torus-storage/torus/ring"
	"github.com/torus-storage/torus/store"
)

var (
	nemesisDuration = flag.Duration("nemesis.duration", 3*time.Minute, "TestNemesis: how long faults are injected")
	nemesisSeed     = flag.Uint64("nemesis.seed", 0, "TestNemesis: seed of every choice (0: pick one and print it)")
)

const (
	nemWriters    = 4
	nemChunks     = 8
	nemBlocks     = 128 // nemBlocks/nemChunks blocks in each chunk
	nemOpDeadline = 60 * time.Second
	nemLeaseTTL   = "10s" // longer than an etcd restart (its close alone takes about 5 s)
	nemVolume     = "nem"
)

// nemOffset is the byte offset of block b: consecutive blocks are in
// different chunks, so every chunk gets its share of the contention.
func nemOffset(b int) uint64 {
	return uint64(b%nemChunks)<<20 + uint64(b/nemChunks)*4096
}

var crc32c = crc32.MakeTable(crc32.Castagnoli)

// nemPayload is the 4 KiB of write id on block b by writer w: a header,
// a filler derived from the id, and a CRC32C of the rest in the last 4 bytes.
func nemPayload(b, w int, id uint64) []byte {
	p := make([]byte, 4096)
	copy(p, "NEMESIS\x00")
	binary.LittleEndian.PutUint64(p[8:], uint64(b))
	binary.LittleEndian.PutUint64(p[16:], uint64(w))
	binary.LittleEndian.PutUint64(p[24:], id)
	x := id ^ uint64(b)<<48
	for i := 32; i+8 <= 4092; i += 8 {
		x += 0x9e3779b97f4a7c15
		z := (x ^ x>>30) * 0xbf58476d1ce4e5b9
		binary.LittleEndian.PutUint64(p[i:], z^z>>31)
	}
	binary.LittleEndian.PutUint32(p[4092:], crc32.Checksum(p[:4092], crc32c))
	return p
}

// nemDecode returns the write id a block read back holds (0 for zeros), or
// why it is no write of this test to that block.
func nemDecode(p []byte, b int) (uint64, string) {
	if !slices.ContainsFunc(p, func(c byte) bool { return c != 0 }) {
		return 0, ""
	}
	if string(p[:8]) != "NEMESIS\x00" {
		return 0, fmt.Sprintf("no write header: %x...", p[:16])
	}
	if got, want := binary.LittleEndian.Uint32(p[4092:]), crc32.Checksum(p[:4092], crc32c); got != want {
		return 0, fmt.Sprintf("CRC32C %08x, want %08x (write id %#x)", got, want, binary.LittleEndian.Uint64(p[24:]))
	}
	if got := binary.LittleEndian.Uint64(p[8:]); got != uint64(b) {
		return 0, fmt.Sprintf("block %d's write id %#x (misplaced)", got, binary.LittleEndian.Uint64(p[24:]))
	}
	return binary.LittleEndian.Uint64(p[24:]), ""
}

type nemKind uint8

const (
	nemWrite nemKind = iota
	nemRead
	nemFlush
)

func (k nemKind) String() string { return [...]string{"write", "read", "flush"}[k] }

type nemResult uint8

const (
	resOK   nemResult = iota
	resFail           // the server answered with an NBD error
	resInfo           // no answer: connection lost (indeterminate)
	resHang           // no answer within nemOpDeadline (indeterminate, and a failure)
)

func (r nemResult) String() string { return [...]string{"ok", "fail", "indeterminate", "hang"}[r] }

// nemOp is one operation of the history. Times are from the test's start.
type nemOp struct {
	kind     nemKind
	writer   int // -1: the final reads
	gen      int // the torusblk serve process (0, 1, ...) the op went to
	block    int
	id       uint64 // write: its id; read: the id read back (0: zeros)
	inv, cmp time.Duration
	res      nemResult
	err      string
	corrupt  string // read: why the data is no write of this block
}

// nemNode is a storage node of the nemesis cluster.
type nemNode struct {
	*testcluster.Node
	faults  string // its netquic fault file
	inRing  bool
	running bool
}

type nemesis struct {
	t     *testing.T
	c     *testcluster.Cluster
	rng   *rand.Rand
	seed  uint64
	start time.Time
	volID uint64
	ms    *meta.Client // reopened after every etcd restart

	nodes   []*nemNode
	nextIdx int
	drawn   int                 // faults drawn so far
	first   []string            // the first pass: every kind once
	procs   []*testcluster.Proc // every process started, for the logs kept on failure

	mu       sync.Mutex
	sock     string
	gen      int
	serve    *testcluster.Proc
	serves   []*testcluster.Proc
	fenceEnd []time.Duration // fenceEnd[g]: when serve process g+1 served (g was fenced by then)

	hist     [][]*nemOp // per writer, and the final reads last
	injected map[string]int
	healed   map[string]int
	failures []string // liveness failures: hangs, nodes or repairs that did not come back
}

func (n *nemesis) now() time.Duration { return time.Since(n.start) }

func (n *nemesis) logf(format string, args ...any) {
	n.t.Logf("%7.2fs "+format, append([]any{n.now().Seconds()}, args...)...)
}

func (n *nemesis) fail(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	n.mu.Lock()
	n.failures = append(n.failures, msg)
	n.mu.Unlock()
	n.logf("FAILURE: %s", msg)
}

// startNemesisCluster starts etcd and makes the cluster (R=2), without nodes.
func startNemesisCluster(t *testing.T) *testcluster.Cluster {
	return testcluster.NewCluster(t, testcluster.Options{Replication: 2})
}

func (n *nemesis) openMeta() {
	if n.ms != nil {
		n.ms.Close()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ms, err := meta.Open(ctx, []string{n.c.Endpoint}, meta.DefaultPrefix, meta.Options{DialTimeout: 5 * time.Second})
	if err != nil {
		n.t.Fatalf("opening etcd: %v", err)
	}
	n.ms = ms
}

// newNode makes node idx on 127.0.0.idx (not started), with a 256 MiB
// store, a 3 s node lease and its own fault files armed: the netquic hook
// (partitions) and the store's power-loss log.
func (n *nemesis) newNode(idx int) *nemNode {
	nd := &nemNode{Node: n.c.NewNode(idx)}
	nd.faults = filepath.Join(n.c.Dir, nd.ID+".faults")
	nd.Size, nd.Args = "256MiB", []string{"--lease-ttl", "3s"}
	nd.Env = []string{netquic.FaultsEnv + "=" + nd.faults, store.PowerLogEnv + "=" + nd.faults + ".powerloss"}
	if err := os.WriteFile(nd.faults, nil, 0o644); err != nil {
		n.t.Fatal(err)
	}
	n.nodes = append(n.nodes, nd)
	return nd
}

// startNode starts torusd for nd; the store's power-loss hook undoes the
// writes no fdatasync covered if env holds store.PowerLossEnv=1.
func (n *nemesis) startNode(nd *nemNode, env ...string) {
	p := n.c.StartNode(nd.Node, env...)
	nd.running, nd.inRing = true, true
	n.mu.Lock()
	n.procs = append(n.procs, p)
	n.mu.Unlock()
}

// waitNode waits until nd is registered and in the ring.
func (n *nemesis) waitNode(nd *nemNode) bool {
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		if nd.Proc.Exited() {
			n.fail("torusd %s exited while starting:\n%s", nd.ID, tail(nd.Proc.Log()))
			return false
		}
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		nodes, err := n.ms.Nodes(ctx)
		r, _, rerr := n.ms.Ring(ctx)
		cancel()
		if err == nil && rerr == nil && r != nil &&
			slices.ContainsFunc(nodes, func(m meta.Node) bool { return m.ID == nd.ID }) &&
			slices.ContainsFunc(r.Nodes(), func(m ring.Node) bool { return m.ID == nd.ID }) {
			return true
		}
		time.Sleep(200 * time.Millisecond)
	}
	n.fail("%s not registered and in the ring 60 s after its start", nd.ID)
	return false
}

func tail(s string) string {
	if len(s) > 4000 {
		return "..." + s[len(s)-4000:]
	}
	return s
}

// startServe starts a new torusblk serve process of the volume, retrying
// while the previous holder's attach lock has not expired, and makes it the
// current one: the previous process counts as fenced from then on.
func (n *nemesis) startServe(extra ...string) bool {
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		sock := filepath.Join(n.t.TempDir(), "nbd.sock")
		args := append([]string{"serve", nemVolume, "--etcd", n.c.Endpoint, "--tls-dir", n.c.TLSDir,
			"--listen", "unix:" + sock, "--lease-ttl", nemLeaseTTL, "--replica-timeout", "3s"}, extra...)
		p := testcluster.StartT(n.t, testcluster.Spec{Name: "torusblk serve " + nemVolume, Bin: torusblkBin, Args: args})
		err := p.AwaitSocket(context.Background(), sock, time.Until(deadline))
		if err == nil {
			n.mu.Lock()
			n.fenceEnd = append(n.fenceEnd, n.now())
			n.gen++
			n.sock, n.serve = sock, p
			n.serves = append(n.serves, p)
			n.procs = append(n.procs, p)
			n.mu.Unlock()
			return true
		}
		if !errors.Is(err, testcluster.ErrExited) {
			p.Kill()
			break
		}
		if !strings.Contains(p.Log(), "is attached by") {
			n.logf("torusblk serve exited early (retrying):\n%s", tail(p.Log()))
		}
		time.Sleep(300 * time.Millisecond)
	}
	n.fail("no torusblk serve could attach %s within 60 s", nemVolume)
	return false
}

func (n *nemesis) current() (string, int) {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.sock, n.gen
}

// writer runs writer w's ops until ctx is done.
func (n *nemesis) writer(ctx context.Context, w int, hist *[]*nemOp) {
	rng := rand.New(rand.NewPCG(n.seed, uint64(w)+1))
	var cl *nbdtest.Client
	gen := -1
	var seq uint64
	defer func() {
		if cl != nil {
			cl.Close()
		}
	}()
	for ctx.Err() == nil {
		sock, g := n.current()
		if cl != nil && (g != gen || cl.Err() != nil) {
			cl.Close()
			cl = nil
		}
		if cl == nil {
			c, err := nbdtest.DialClient(sock, "torus")
			if err != nil {
				time.Sleep(50 * time.Millisecond)
				continue
			}
			cl, gen = c, g
		}
		r, b := rng.IntN(100), rng.IntN(nemBlocks)
		op := &nemOp{writer: w, gen: gen, block: b}
		var ch <-chan error
		var buf []byte
		switch {
		case r < 50:
			seq++
			op.kind, op.id = nemWrite, uint64(w+1)<<32|seq
			data := nemPayload(b, w, op.id)
			op.inv = n.now()
			ch = cl.Write(nemOffset(b), data)
		case r < 92:
			op.kind, buf = nemRead, make([]byte, 4096)
			op.inv = n.now()
			ch = cl.Read(nemOffset(b), buf)
		default:
			op.kind = nemFlush
			op.inv = n.now()
			ch = cl.Flush()
		}
		timer := time.NewTimer(nemOpDeadline)
		select {
		case err := <-ch:
			op.cmp = n.now()
			switch {
			case err == nil:
				op.res = resOK
			case strings.HasPrefix(err.Error(), "nbd error"):
				op.res, op.err = resFail, err.Error()
			default:
				op.res, op.err = resInfo, err.Error()
			}
		case <-timer.C:
			op.cmp, op.res = n.now(), resHang
			n.fail("writer %d: %s of block %d to serve process %d not answered within %v", w, op.kind, b, gen, nemOpDeadline)
			cl.Close()
			cl = nil
		}
		timer.Stop()
		if op.kind == nemRead && op.res == resOK {
			op.id, op.corrupt = nemDecode(buf, b)
		}
		*hist = append(*hist, op)
	}
}

// ringNodes returns the nodes in the ring that run, in id order.
func (n *nemesis) ringNodes() []*nemNode {
	var out []*nemNode
	for _, nd := range n.nodes {
		if nd.inRing && nd.running {
			out = append(out, nd)
		}
	}
	return out
}

// restartEtcd starts etcd again on its data and client URL.
func (n *nemesis) restartEtcd() {
	for try := 0; ; try++ {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		err := n.c.RestartEtcd(ctx)
		cancel()
		if err == nil {
			t0 := time.Now()
			n.openMeta()
			if d := time.Since(t0); d > time.Second {
				n.logf("etcd client open took %v", d.Round(time.Millisecond))
			}
			return
		}
		if try == 10 {
			n.t.Fatalf("restarting etcd: %v", err)
		}
		time.Sleep(time.Second)
	}
}

// ctl runs torusctl and returns its error instead of failing the test.
func (n *nemesis) ctl(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	return n.c.Torusctl(ctx, args...)
}

// stopProc sends SIGTERM and kills p after 30 s; it reports whether p
// exited cleanly (nil if it had exited already).
func stopProc(p *testcluster.Proc) error {
	if p.Exited() {
		return nil
	}
	return p.Terminate(30 * time.Second)
}

// waitMoved waits up to limit until the volume has no pending moves and,
// if marks, no missed marks.
func (n *nemesis) waitRepaired(limit time.Duration, marks bool) (string, bool) {
	deadline := time.Now().Add(limit)
	state := ""
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		moves, merr := n.ms.Moves(ctx, n.volID)
		missed, err := n.ms.Missed(ctx, n.volID)
		// As `torusctl status` does: a ring the volume's move is not yet
		// recorded for is a move too (the moves record is empty then).
		r, _, rerr := n.ms.Ring(ctx)
		placed, pok, perr := n.ms.Placed(ctx, n.volID)
		cancel()
		var rv uint64
		if r != nil {
			rv = r.Version()
		}
		lag := rerr == nil && perr == nil && pok && placed != rv
		state = fmt.Sprintf("moves %d (%v), placed under ring %d of %d (%v %v), missed %v (%v)", len(moves), merr, placed, rv, rerr, perr, missed, err)
		if merr == nil && err == nil && rerr == nil && perr == nil && !lag && len(moves) == 0 && (!marks || len(missed) == 0) {
			return state, true
		}
		if time.Now().After(deadline) {
			return state, false
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// leaseLost returns how often the current serve process logged that it lost
// its attach lock, and that it took it again.
func (n *nemesis) leaseLost() [2]int {
	n.mu.Lock()
	p := n.serve
	n.mu.Unlock()
	l := p.Log()
	return [2]int{strings.Count(l, "attach lock lost"), strings.Count(l, "attach lock taken back")}
}

func (n *nemesis) leaseRetaken() int { return n.leaseLost()[1] }

// stopRemoved stops a node that is no longer in the ring.
func (n *nemesis) stopRemoved(nd *nemNode) {
	if err := stopProc(nd.Proc); err != nil {
		n.logf("%s after its removal: %v", nd.ID, err)
	}
	nd.running = false
}

// fault injects one fault chosen by the seeded generator, holds it and heals
// it.
func (n *nemesis) fault() {
	hold := func(lo, hi int) time.Duration {
		return time.Duration(lo*1000+n.rng.IntN((hi-lo)*1000+1)) * time.Millisecond
	}
	// The etcd faults last 7-30 s each (etcd takes 6 s to close, the lock
	// comes back a lease after etcd): they are drawn half as often.
	kinds := []string{"kill-node", "power-loss", "partition-node", "partition-node", "membership", "membership",
		"kill-client", "kill-client", "etcd-restart", "lose-lease"}
	kind := kinds[n.rng.IntN(len(kinds))]
	// Every kind once first, in a seeded order, so that a short run covers
	// them all.
	if n.drawn == 0 {
		n.first = slices.Compact(slices.Sorted(slices.Values(kinds)))
		n.rng.Shuffle(len(n.first), func(i, j int) { n.first[i], n.first[j] = n.first[j], n.first[i] })
	}
	if n.drawn < len(n.first) {
		kind = n.first[n.drawn]
	}
	n.drawn++
	live := n.ringNodes()
	if kind == "membership" {
		kind = "add-node"
		if len(live) >= 4 {
			kind = "remove-node"
		}
	}
	switch kind {
	case "power-loss":
		// One power loss on a healthy cluster: every chunk has a copy
		// elsewhere that lost nothing. (With a chunk's other copy marked
		// too, what the lost writes leave is no copy anyone trusts.)
		nd, d := live[n.rng.IntN(len(live))], hold(2, 8)
		if state, ok := n.waitRepaired(20*time.Second, true); !ok {
			n.logf("power loss of %s skipped: the cluster is still repairing (%s)", nd.ID, state)
			if n.drawn <= len(n.first) && len(n.first) < 20 {
				n.first = append(n.first, kind) // still once in the first pass
			}
			return
		}
		n.injected[kind]++
		n.logf("power loss of %s for %v (its writes no fdatasync covered are undone)", nd.ID, d)
		nd.Proc.Kill()
		nd.running = false
		time.Sleep(d)
		n.startNode(nd, store.PowerLossEnv+"=1")
		if n.waitNode(nd) {
			n.healed[kind]++
			undone := "nothing to undo"
			for l := range strings.Lines(nd.Proc.Log()) {
				if i := strings.Index(l, "undid "); i >= 0 && strings.Contains(l, "power-loss fault") {
					undone = strings.TrimSpace(l[i:])
				}
			}
			n.logf("healed: %s back; %s", nd.ID, undone)
		}
	case "kill-node", "partition-node":
		nd, d := live[n.rng.IntN(len(live))], hold(2, 8)
		n.injected[kind]++
		if kind == "kill-node" {
			n.logf("kill -9 %s for %v", nd.ID, d)
			nd.Proc.Kill()
			nd.running = false
		} else {
			n.logf("partition %s for %v", nd.ID, d)
			os.WriteFile(nd.faults, []byte("drop"), 0o644)
		}
		time.Sleep(d)
		if kind == "kill-node" {
			n.startNode(nd)
		} else {
			os.WriteFile(nd.faults, nil, 0o644)
		}
		if n.waitNode(nd) {
			n.healed[kind]++
			n.logf("healed: %s back", nd.ID)
		}
	case "add-node":
		n.nextIdx++
		nd := n.newNode(n.nextIdx)
		n.injected[kind]++
		n.logf("add %s", nd.ID)
		n.startNode(nd)
		if n.waitNode(nd) {
			n.healed[kind]++
			n.logf("%s joined the ring", nd.ID)
		}
	case "remove-node":
		nd := live[n.rng.IntN(len(live))]
		n.injected[kind]++
		n.logf("torusctl node remove %s", nd.ID)
		if out, err := n.ctl("node", "remove", nd.ID); err != nil {
			n.fail("torusctl node remove %s: %v\n%s", nd.ID, err, out)
			return
		}
		nd.inRing = false
		// As an operator would: stop the node once its chunks moved. If
		// that takes longer (other faults, etcd away), the node keeps
		// serving until the writers stop (see TestNemesis).
		if state, ok := n.waitRepaired(30*time.Second, false); !ok {
			n.logf("%s: moves not done 30 s after its removal (%s); it runs until the end", nd.ID, state)
			n.healed[kind]++
			return
		}
		n.stopRemoved(nd)
		n.healed[kind]++
		n.logf("healed: %s stopped after its chunks moved", nd.ID)
	case "etcd-restart", "lose-lease":
		d := hold(0, 1) // with etcd's close and start, within the attach lease
		if kind == "lose-lease" {
			d = hold(10, 14) // past the lease
		}
		n.injected[kind]++
		n.logf("stop etcd for %v (%s)", d, kind)
		n.ms.Close()
		n.ms = nil
		lost := n.leaseLost()
		t0 := time.Now()
		n.c.StopEtcd()
		closing := time.Since(t0)
		time.Sleep(d)
		t1 := time.Now()
		n.restartEtcd()
		starting := time.Since(t1)
		// Whether the client lost its attach lock, and took it again.
		retaken := false
		for wait := time.Now().Add(20 * time.Second); time.Now().Before(wait); time.Sleep(200 * time.Millisecond) {
			if retaken = n.leaseRetaken() > lost[1]; retaken || kind == "etcd-restart" {
				break
			}
		}
		now := n.leaseLost()
		n.healed[kind]++
		n.logf("healed: etcd back after %v (close %v, start %v); attach lock lost: %v, taken again: %v",
			time.Since(t0).Round(time.Millisecond), closing.Round(time.Millisecond), starting.Round(time.Millisecond),
			now[0] > lost[0], retaken)
	case "kill-client":
		n.mu.Lock()
		old := n.serve
		n.mu.Unlock()
		n.injected[kind]++
		n.logf("kill -9 torusblk serve (process %d)", n.gen)
		old.Kill()
		if n.startServe() {
			n.healed[kind]++
			n.logf("healed: serve process %d attached", n.gen)
		}
	}
}

// TestNemesis: see the top of this file.
func TestNemesis(t *testing.T) {
	seed := *nemesisSeed
	if seed == 0 {
		seed = uint64(time.Now().UnixNano())%1_000_000_000 + 1
	}
	t.Logf("nemesis seed %d, duration %v (rerun: make test-nemesis NEMESIS_SEED=%d NEMESIS_DURATION=%v)",
		seed, *nemesisDuration, seed, *nemesisDuration)
	c := startNemesisCluster(t)
	n := &nemesis{t: t, c: c, seed: seed, rng: rand.New(rand.NewPCG(seed, 0)), start: time.Now(),
		injected: map[string]int{}, healed: map[string]int{}, gen: -1}
	n.openMeta()
	t.Cleanup(func() {
		if n.ms != nil {
			n.ms.Close()
		}
	})
	for i := 1; i <= 3; i++ {
		n.startNode(n.newNode(i))
	}
	n.nextIdx = 3
	for _, nd := range n.nodes {
		if !n.waitNode(nd) {
			t.Fatalf("the cluster did not start: %v", n.failures)
		}
	}
	c.Ctl("volume", "create", nemVolume, "--size", fmt.Sprintf("%dMiB", nemChunks), "--replication", "2")
	v, err := n.ms.Volume(context.Background(), nemVolume)
	if err != nil {
		t.Fatal(err)
	}
	n.volID = v.ID
	if !n.startServe() {
		t.Fatalf("%v", n.failures)
	}

	ctx, stopWriters := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	n.hist = make([][]*nemOp, nemWriters+1)
	for w := range nemWriters {
		wg.Add(1)
		go func() { defer wg.Done(); n.writer(ctx, w, &n.hist[w]) }()
	}
	// Cleanups run last first: this one, registered after every process
	// start so far, stops the writers before processes are killed if the
	// test ends early.
	t.Cleanup(func() { stopWriters(); wg.Wait() })

	n.logf("writers started; faults for %v", *nemesisDuration)
	end := time.Now().Add(*nemesisDuration)
	for time.Now().Before(end) {
		time.Sleep(time.Duration(2000+n.rng.IntN(2001)) * time.Millisecond)
		if time.Now().After(end) {
			break
		}
		n.fault()
	}
	// Heal everything (a fault is healed before the next one starts; this
	// catches a heal that failed) and let the writers run a little longer.
	for _, nd := range n.nodes {
		os.WriteFile(nd.faults, nil, 0o644)
		if nd.inRing && !nd.running {
			n.startNode(nd)
			n.waitNode(nd)
		}
	}
	time.Sleep(2 * time.Second)
	stopWriters()
	wg.Wait()
	n.logf("writers stopped")

	state, ok := n.waitRepaired(2*time.Minute, true)
	if !ok {
		n.fail("the cluster did not repair within 2 minutes of healing: %s", state)
	} else {
		n.logf("repaired: %s", state)
	}
	for _, nd := range n.nodes {
		if !nd.inRing && nd.running {
			n.stopRemoved(nd)
			n.logf("%s (removed) stopped", nd.ID)
		}
	}
	// Final reads: through the serving process, then through a new one per
	// ring node that prefers that node's replicas.
	final := &n.hist[nemWriters]
	n.finalReads(final, "current serve process")
	for _, nd := range n.ringNodes() {
		n.mu.Lock()
		old := n.serve
		n.mu.Unlock()
		if err := stopProc(old); err != nil {
			n.logf("stopping serve process %d: %v", n.gen, err)
		}
		if !n.startServe("--local-node", nd.ID) {
			break
		}
		n.finalReads(final, "reads preferring "+nd.ID)
	}
	n.mu.Lock()
	last := n.serve
	n.mu.Unlock()
	stopProc(last)

	n.report()
}

// finalReads reads every block once, one at a time.
func (n *nemesis) finalReads(hist *[]*nemOp, what string) {
	sock, gen := n.current()
	cl, err := nbdtest.DialClient(sock, "torus")
	if err != nil {
		n.fail("final reads (%s): %v", what, err)
		return
	}
	defer cl.Close()
	bad := 0
	for b := range nemBlocks {
		buf := make([]byte, 4096)
		op := &nemOp{kind: nemRead, writer: -1, gen: gen, block: b, inv: n.now()}
		select {
		case err := <-cl.Read(nemOffset(b), buf):
			op.cmp = n.now()
			if err != nil {
				op.res, op.err = resFail, err.Error()
				bad++
			} else {
				op.id, op.corrupt = nemDecode(buf, b)
			}
		case <-time.After(nemOpDeadline):
			op.cmp, op.res = n.now(), resHang
			n.fail("final read of block %d (%s) not answered within %v", b, what, nemOpDeadline)
			*hist = append(*hist, op)
			return
		}
		*hist = append(*hist, op)
	}
	if bad > 0 {
		n.fail("final reads (%s): %d of %d blocks failed", what, bad, nemBlocks)
	}
	n.logf("final reads (%s, serve process %d): %d blocks", what, gen, nemBlocks)
}

// keepLogs writes every process's log and the history to a directory that
// outlives the test, for whoever debugs a failure.
func (n *nemesis) keepLogs(hist []*nemOp) string {
	dir, err := os.MkdirTemp("", fmt.Sprintf("torus-nemesis-%d-", n.seed))
	if err != nil {
		return err.Error()
	}
	n.mu.Lock()
	procs := slices.Clone(n.procs)
	n.mu.Unlock()
	seen := map[string]int{}
	for _, p := range procs {
		name := strings.ReplaceAll(p.Name(), " ", "-")
		seen[name]++
		os.WriteFile(filepath.Join(dir, fmt.Sprintf("%s.%d.log", name, seen[name])), []byte(p.Log()), 0o644)
	}
	var h strings.Builder
	sorted := slices.Clone(hist)
	sort.SliceStable(sorted, func(i, j int) bool { return sorted[i].inv < sorted[j].inv })
	for _, op := range sorted {
		fmt.Fprintf(&h, "block %3d %v %s\n", op.block, op, op.err)
	}
	os.WriteFile(filepath.Join(dir, "history.txt"), []byte(h.String()), 0o644)
	return dir
}

// nemAnomaly is a read the checker refuses.
type nemAnomaly struct {
	kind       string
	read       *nemOp
	got        *nemOp // nil: zeros, or corrupt data
	candidates []*nemOp
	zerosOK    bool
	why        string
}

// nemCheck checks every read of the history: see the top of the file.
// fenceEnd[g] is when serve process g was fenced (math.MaxInt64 if never).
func nemCheck(hist []*nemOp, fenceEnd func(gen int) time.Duration) []nemAnomaly {
	byID := map[uint64]*nemOp{}
	writes := make([][]*nemOp, nemBlocks)
	var reads, flushes []*nemOp
	for _, op := range hist {
		switch op.kind {
		case nemWrite:
			byID[op.id] = op
			writes[op.block] = append(writes[op.block], op)
		case nemRead:
			if op.res == resOK {
				reads = append(reads, op)
			}
		case nemFlush:
			if op.res == resOK {
				flushes = append(flushes, op)
			}
		}
	}
	// end is when a write's effect can take place at the latest.
	end := func(w *nemOp) time.Duration {
		if w.res == resOK {
			return w.cmp
		}
		return fenceEnd(w.gen)
	}
	// flushedBy reports whether a FLUSH invoked after t completed before u.
	flushedBy := func(t, u time.Duration) bool {
		for _, f := range flushes {
			if f.inv > t && f.cmp < u {
				return true
			}
		}
		return false
	}
	// Per block, the acknowledged writes by ack time and the running
	// maximum of their invocation times.
	acked := make([][]*nemOp, nemBlocks)
	maxInv := make([][]time.Duration, nemBlocks)
	for b, ws := range writes {
		for _, w := range ws {
			if w.res == resOK {
				acked[b] = append(acked[b], w)
			}
		}
		sort.Slice(acked[b], func(i, j int) bool { return acked[b][i].cmp < acked[b][j].cmp })
		m := time.Duration(-1)
		for _, w := range acked[b] {
			m = max(m, w.inv)
			maxInv[b] = append(maxInv[b], m)
		}
	}
	var out []nemAnomaly
	for _, r := range reads {
		ws := writes[r.block]
		// m: the latest invocation of a write acknowledged before r started;
		// any write whose window ended before m was overwritten.
		m := time.Duration(-1)
		if i := sort.Search(len(acked[r.block]), func(i int) bool { return acked[r.block][i].cmp >= r.inv }); i > 0 {
			m = maxInv[r.block][i-1]
		}
		if r.corrupt == "" && r.id == 0 && m < 0 {
			continue
		}
		if w := byID[r.id]; r.corrupt == "" && w != nil && w.block == r.block && w.inv < r.cmp && end(w) >= m {
			continue
		}
		var cands []*nemOp
		for _, w := range ws {
			if w.inv < r.cmp && end(w) >= m {
				cands = append(cands, w)
			}
		}
		a := nemAnomaly{read: r, candidates: cands, zerosOK: m < 0}
		switch {
		case r.corrupt != "":
			a.kind, a.why = "corrupt", r.corrupt
		case r.id == 0:
			if a.zerosOK {
				continue
			}
			a.kind = "stale"
			a.why = "zeros, but a write was acknowledged before the read started"
			for _, w := range ws {
				if w.res == resOK && w.cmp < r.inv && flushedBy(w.cmp, r.inv) {
					a.kind, a.why = "lost-flushed", fmt.Sprintf("zeros, but write %#x was acknowledged and flushed before the read", w.id)
					break
				}
			}
		default:
			w := byID[r.id]
			a.got = w
			switch {
			case w == nil || w.block != r.block:
				a.kind, a.why = "corrupt", fmt.Sprintf("write id %#x was never issued to this block", r.id)
			case w.inv >= r.cmp:
				a.kind, a.why = "future", "the write was invoked after the read completed"
			case end(w) >= m:
				continue
			default:
				a.kind = "stale"
				for _, w2 := range ws {
					if w2.res != resOK || w2.cmp >= r.inv || w2.inv <= end(w) {
						continue
					}
					// w2 overwrote w before the read started.
					if a.why == "" {
						a.why = fmt.Sprintf("overwritten by write %#x (acknowledged at %.3fs) before the read", w2.id, w2.cmp.Seconds())
					}
					if w.res != resOK && w2.gen > w.gen {
						a.kind = "fenced-write-resurfaced"
						a.why = fmt.Sprintf("unacknowledged write of serve process %d, fenced at %.3fs, read after write %#x of process %d was acknowledged",
							w.gen, fenceEnd(w.gen).Seconds(), w2.id, w2.gen)
					}
					if flushedBy(w2.cmp, r.inv) && a.kind == "stale" {
						a.kind = "lost-flushed"
						a.why = fmt.Sprintf("write %#x was acknowledged at %.3fs and flushed before the read, yet the older write came back", w2.id, w2.cmp.Seconds())
					}
				}
			}
		}
		out = append(out, a)
	}
	return out
}

func (op *nemOp) String() string {
	who := fmt.Sprintf("writer %d", op.writer)
	if op.writer < 0 {
		who = "final read"
	}
	return fmt.Sprintf("%s %#x [%.3fs, %.3fs] %s, %s, serve process %d", op.kind, op.id, op.inv.Seconds(), op.cmp.Seconds(), op.res, who, op.gen)
}

// report prints the figures and fails the test on anomalies and failures.
func (n *nemesis) report() {
	var hist []*nemOp
	for _, h := range n.hist {
		hist = append(hist, h...)
	}
	n.mu.Lock()
	fenceEnd := slices.Clone(n.fenceEnd)
	n.mu.Unlock()
	// fenceEnd as recorded: entry i is when process i was fenced, i.e. when
	// process i+1 served; the first entry is the start of process 0.
	fenced := func(g int) time.Duration {
		if g+1 < len(fenceEnd) {
			return fenceEnd[g+1]
		}
		return math.MaxInt64
	}
	anomalies := nemCheck(hist, fenced)

	var b strings.Builder
	fmt.Fprintf(&b, "nemesis seed %d, %v of faults, %d serve processes\n", n.seed, *nemesisDuration, len(n.serves))
	counts := map[string]int{}
	for _, op := range hist {
		counts[op.kind.String()+" "+op.res.String()]++
	}
	keys := make([]string, 0, len(counts))
	for k := range counts {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	fmt.Fprintf(&b, "ops: %d\n", len(hist))
	for _, k := range keys {
		fmt.Fprintf(&b, "  %-24s %6d\n", k, counts[k])
	}
	fmt.Fprintf(&b, "faults (injected/healed):\n")
	kinds := make([]string, 0, len(n.injected))
	for k := range n.injected {
		kinds = append(kinds, k)
	}
	sort.Strings(kinds)
	for _, k := range kinds {
		fmt.Fprintf(&b, "  %-16s %3d/%d\n", k, n.injected[k], n.healed[k])
	}
	lost := 0
	for _, p := range n.serves {
		lost += strings.Count(p.Log(), "attach lock taken back")
	}
	fmt.Fprintf(&b, "attach lock lost and taken again: %d times\n", lost)
	fmt.Fprintf(&b, "anomalies: %d\n", len(anomalies))
	for _, a := range anomalies {
		fmt.Fprintf(&b, "  %s: block %d (offset %d): %s\n    read: %v\n", a.kind, a.read.block, nemOffset(a.read.block), a.why, a.read)
		if a.got != nil {
			fmt.Fprintf(&b, "    got:  %v\n", a.got)
		} else if a.read.id == 0 && a.read.corrupt == "" {
			fmt.Fprintf(&b, "    got:  zeros\n")
		}
		if a.zerosOK {
			fmt.Fprintf(&b, "    expected: zeros or one of\n")
		} else {
			fmt.Fprintf(&b, "    expected one of:\n")
		}
		for i, w := range a.candidates {
			if i == 8 {
				fmt.Fprintf(&b, "      ... %d more\n", len(a.candidates)-8)
				break
			}
			fmt.Fprintf(&b, "      %v\n", w)
		}
	}
	fmt.Fprintf(&b, "failures: %d\n", len(n.failures))
	for _, f := range n.failures {
		fmt.Fprintf(&b, "  %s\n", strings.SplitN(f, "\n", 2)[0])
	}
	// When first and last failed: the time line of the faults' effect.
	first, last := map[string]time.Duration{}, map[string]time.Duration{}
	for _, op := range hist {
		if op.res == resOK {
			continue
		}
		k := op.kind.String() + " " + op.res.String()
		if _, ok := first[k]; !ok || op.inv < first[k] {
			first[k] = op.inv
		}
		last[k] = max(last[k], op.inv)
	}
	for _, k := range keys {
		if _, ok := first[k]; ok {
			fmt.Fprintf(&b, "  %s: first invoked at %.2fs, last at %.2fs\n", k, first[k].Seconds(), last[k].Seconds())
		}
	}
	if len(anomalies) > 0 || len(n.failures) > 0 || n.t.Failed() {
		fmt.Fprintf(&b, "logs and history kept in %s\n", n.keepLogs(hist))
	}
	n.t.Log("\n" + b.String())
	for _, f := range n.failures {
		n.t.Error(f)
	}
	if len(anomalies) > 0 {
		n.t.Errorf("%d anomalies (seed %d)", len(anomalies), n.seed)
	}
}

// TestNemesisChecker: the checker accepts what NBD allows and names every
// kind of anomaly it must find.
func TestNemesisChecker(t *testing.T) {
	s := time.Second
	w := func(id uint64, gen int, inv, cmp time.Duration, res nemResult) *nemOp {
		return &nemOp{kind: nemWrite, id: id, gen: gen, inv: inv, cmp: cmp, res: res}
	}
	r := func(id uint64, inv, cmp time.Duration) *nemOp {
		return &nemOp{kind: nemRead, id: id, inv: inv, cmp: cmp, writer: 1}
	}
	flush := &nemOp{kind: nemFlush, inv: 25 * s, cmp: 26 * s}
	hist := []*nemOp{
		w(1, 0, 1*s, 2*s, resOK),
		w(2, 0, 3*s, 10*s, resOK),          // concurrent with the reads at 4-5 s
		w(3, 0, 11*s, 12*s, resInfo),       // indeterminate, process 0 fenced at 30 s
		w(4, 0, 20*s, 21*s, resOK),         // acknowledged and flushed
		w(5, 1, 31*s, 32*s, resOK),         // process 1's first write
		r(0, 0, 1500*time.Millisecond),     // zeros or write 1: ok
		r(1, 4*s, 5*s),                     // ok
		r(2, 4*s, 5*s),                     // ok: concurrent
		r(0, 3*s, 4*s),                     // stale: write 1 acknowledged before
		r(3, 13*s, 14*s),                   // ok: indeterminate
		r(3, 22*s, 23*s),                   // ok: write 3 may land until 30 s
		r(2, 27*s, 28*s),                   // lost-flushed: write 4 flushed at 26 s
		r(3, 33*s, 34*s),                   // fenced-write-resurfaced
		r(4, 33*s, 34*s),                   // stale
		r(6, 33*s, 34*s),                   // corrupt: never written
		r(5, 30*s, 30500*time.Millisecond), // future: invoked at 31 s
		flush,
	}
	fenced := func(g int) time.Duration {
		if g == 0 {
			return 30 * s
		}
		return math.MaxInt64
	}
	var got []string
	for _, a := range nemCheck(hist, fenced) {
		got = append(got, fmt.Sprintf("%d@%v:%s", a.read.id, a.read.inv, a.kind))
	}
	want := []string{"0@3s:stale", "2@27s:lost-flushed", "3@33s:fenced-write-resurfaced", "4@33s:stale",
		"6@33s:corrupt", "5@30s:future"}
	if !slices.Equal(got, want) {
		t.Fatalf("anomalies\n got %v\nwant %v", got, want)
	}
}
