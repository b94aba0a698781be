//go:build faults

package netquic

// Fault hook (compiled only with -tags faults; the production build has
// faults_off.go instead, which returns the socket unchanged, so no build
// without the tag can drop a packet on purpose).
//
// Invariants:
//   - The hook is armed only when $TORUS_FAULTS_FILE names a file at the
//     moment an endpoint opens its UDP socket; an endpoint opened without it
//     is the plain socket, exactly as in production.
//   - While that file contains the word "drop", every datagram the endpoint
//     receives is discarded after it is read and every datagram it sends is
//     reported as sent and discarded: the endpoint is partitioned from every
//     peer in both directions, and QUIC sees loss, not errors.
//   - The file is re-read at most every faultPoll, by one caller at a time
//     (a compare-and-swap on the next check time); the packet path reads
//     only an atomic flag otherwise.
//   - The wrapper exposes only net.PacketConn, so quic-go falls back to plain
//     ReadFrom/WriteTo (no GSO, no batched reads) and every datagram passes
//     through the hook.

import (
	"bytes"
	"log/slog"
	"net"
	"os"
	"sync/atomic"
	"time"
)

// FaultsEnv names the environment variable of the fault hook in builds with
// -tags faults: the path of a file that, while it contains "drop", makes
// every netquic endpoint opened by the process drop all datagrams.
const FaultsEnv = "TORUS_FAULTS_FILE"

// faultPoll is how often the fault file is re-read.
const faultPoll = 50 * time.Millisecond

// faultConn is a UDP socket whose datagrams are dropped while the fault file
// says so.
type faultConn struct {
	c    *net.UDPConn
	path string
	log  *slog.Logger

	drop      atomic.Bool
	nextCheck atomic.Int64 // unix nanos of the next re-read of path
	dropped   atomic.Uint64
}

// faultPacketConn returns c wrapped by the fault hook when $TORUS_FAULTS_FILE
// is set, else c.
func faultPacketConn(c *net.UDPConn, log *slog.Logger) net.PacketConn {
	path := os.Getenv(FaultsEnv)
	if path == "" {
		return c
	}
	log.Warn("netquic: fault hook armed (build tag faults): this endpoint drops every datagram while the file contains \"drop\"",
		"addr", c.LocalAddr().String(), "file", path)
	f := &faultConn{c: c, path: path, log: log}
	f.check(time.Now().UnixNano())
	return f
}

// dropping reports whether datagrams are dropped now, re-reading the file
// when faultPoll has passed.
func (f *faultConn) dropping() bool {
	now := time.Now().UnixNano()
	if next := f.nextCheck.Load(); now >= next && f.nextCheck.CompareAndSwap(next, now+int64(faultPoll)) {
		f.check(now)
	}
	return f.drop.Load()
}

func (f *faultConn) check(now int64) {
	f.nextCheck.Store(now + int64(faultPoll))
	b, err := os.ReadFile(f.path)
	drop := err == nil && bytes.Contains(b, []byte("drop"))
	if f.drop.Swap(drop) != drop {
		f.log.Warn("netquic: fault hook", "addr", f.c.LocalAddr().String(), "drop", drop, "dropped", f.dropped.Load())
	}
}

// ReadFrom returns the next datagram that is not dropped.
func (f *faultConn) ReadFrom(p []byte) (int, net.Addr, error) {
	for {
		n, addr, err := f.c.ReadFrom(p)
		if err != nil || !f.dropping() {
			return n, addr, err
		}
		f.dropped.Add(1)
	}
}

// WriteTo sends p unless datagrams are dropped, in which case it pretends to.
func (f *faultConn) WriteTo(p []byte, addr net.Addr) (int, error) {
	if f.dropping() {
		f.dropped.Add(1)
		return len(p), nil
	}
	return f.c.WriteTo(p, addr)
}

func (f *faultConn) Close() error                       { return f.c.Close() }
func (f *faultConn) LocalAddr() net.Addr                { return f.c.LocalAddr() }
func (f *faultConn) SetDeadline(t time.Time) error      { return f.c.SetDeadline(t) }
func (f *faultConn) SetReadDeadline(t time.Time) error  { return f.c.SetReadDeadline(t) }
func (f *faultConn) SetWriteDeadline(t time.Time) error { return f.c.SetWriteDeadline(t) }

// SetReadBuffer and SetWriteBuffer let quic-go size the socket's buffers
// (it only warns without them); they do not bypass the hook.
func (f *faultConn) SetReadBuffer(n int) error  { return f.c.SetReadBuffer(n) }
func (f *faultConn) SetWriteBuffer(n int) error { return f.c.SetWriteBuffer(n) }
