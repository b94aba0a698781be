package cluster

import (
	"bytes"
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/torus-storage/torus/engine"
	"github.com/torus-storage/torus/internal/voltest"
	"github.com/torus-storage/torus/netquic"
)

// TestClusterLocalSocket: requests to the local node go over its unix
// socket once it answers a hello as that node — with the node's QUIC
// server closed, writes and reads still reach it and nothing degrades — and
// a socket that answers as another node is not used.
func TestClusterLocalSocket(t *testing.T) {
	tc := startCluster(t, 3, 64)
	n1, n2 := tc.nodes[0], tc.nodes[1]
	sock := filepath.Join(t.TempDir(), "node1.sock")
	local, err := netquic.Listen(sock, nil, n1.ns, &netquic.Options{Transport: netquic.TransportUnix, Logger: quietLog})
	if err != nil {
		t.Fatal(err)
	}
	defer local.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	m1 := n1.meta
	m1.Socket = sock
	if err := n1.reg.Update(ctx, m1); err != nil {
		t.Fatal(err)
	}
	// node2 claims node1's socket: the hello must unmask it.
	m2 := n2.meta
	m2.Socket = sock
	if err := n2.reg.Update(ctx, m2); err != nil {
		t.Fatal(err)
	}

	vol := tc.volume("local", 4*testChunk, 3)
	// openLocal opens vol with local node id and returns where it sends
	// that node's requests.
	openLocal := func(epoch uint64, id string) (*Volume, string) {
		c, err := Open(ctx, tc.ms, vol, Options{TLS: tc.client.Client, Epoch: epoch, LocalNode: id,
			Timeout: time.Second, Logger: quietLog})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		c.mu.Lock()
		defer c.mu.Unlock()
		return c, c.peers[id].addr
	}
	c, a1 := openLocal(1, "node1")
	if a1 != sock {
		t.Fatalf("node1 is reached at %s, want its socket %s", a1, sock)
	}

	// Only the socket reaches node1 now.
	n1.srv.Close()
	wbuf, rbuf := voltest.Buf(t, 2*engine.BlockSize), voltest.Buf(t, 2*engine.BlockSize)
	voltest.Fill(wbuf, 42)
	if err := voltest.Do(c, engine.OpWrite, engine.FlagFUA, testChunk+engine.BlockSize, int64(len(wbuf)), wbuf); err != nil {
		t.Fatalf("write: %v", err)
	}
	if err := voltest.Do(c, engine.OpRead, 0, testChunk+engine.BlockSize, int64(len(rbuf)), rbuf); err != nil {
		t.Fatalf("read: %v", err)
	}
	if !bytes.Equal(rbuf, wbuf) {
		t.Fatal("read back other bytes")
	}
	if st := c.Stats(); st.NodeFailures != 0 || st.Failovers != 0 {
		t.Fatalf("node1 over its socket must not fail: %+v", st)
	}
	if got := n1.ns.Stats(); got.Writes == 0 || got.Reads == 0 {
		t.Fatalf("node1 served %d writes and %d reads, want both (reads prefer it)", got.Writes, got.Reads)
	}

	// A Volume whose local node is node2 must not use node1's socket.
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if _, a2 := openLocal(2, "node2"); a2 != n2.addr {
		t.Fatalf("node2 is reached at %s, want its QUIC address %s (the socket answers as node1)", a2, n2.addr)
	}
}
