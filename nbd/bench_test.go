package nbd

import (
	"bufio"
	"encoding/binary"
	"io"
	"testing"
	"time"

	"github.com/torus-storage/torus/internal/nbdtest"
)

// BenchmarkRoundTrip4K measures pipelined 4 KiB requests (alternating read
// and write, queue depth 32) over a unix socket against an in-memory volume.
// The client side is allocation-free too, so allocs/op is the server's.
func BenchmarkRoundTrip4K(b *testing.B) {
	v := newMemVolume(64 << 20)
	path := startServer(b, oneExport(v), Options{})
	c := nbdtest.Dial(b, path, false)
	c.NC.SetDeadline(time.Time{})
	roundTrip4K(b, c.NC, uint64(v.Size()/4096))
}

// roundTrip4K drives b.N pipelined 4 KiB requests with simple replies over nc.
func roundTrip4K(b *testing.B, nc io.ReadWriter, blocks uint64) {
	const qd = 32
	br := bufio.NewReaderSize(nc, 256<<10)
	bw := bufio.NewWriterSize(nc, 256<<10)
	tokens := make(chan struct{}, qd)
	for range qd {
		tokens <- struct{}{}
	}
	payload := make([]byte, 4096)
	sendErr := make(chan error, 1)
	var hdr [requestSize]byte
	var rh [simpleReplySize]byte
	data := make([]byte, 4096)

	b.ReportAllocs()
	b.SetBytes(4096)
	b.ResetTimer()
	go func() {
		for i := 0; i < b.N; i++ {
			select {
			case <-tokens:
			default:
				if err := bw.Flush(); err != nil {
					sendErr <- err
					return
				}
				<-tokens
			}
			typ := uint16(cmdRead)
			if i&1 == 1 {
				typ = cmdWrite
			}
			binary.BigEndian.PutUint32(hdr[0:], requestMagic)
			binary.BigEndian.PutUint16(hdr[4:], 0)
			binary.BigEndian.PutUint16(hdr[6:], typ)
			binary.BigEndian.PutUint64(hdr[8:], uint64(i))
			binary.BigEndian.PutUint64(hdr[16:], (uint64(i)*7919%blocks)*4096)
			binary.BigEndian.PutUint32(hdr[24:], 4096)
			bw.Write(hdr[:])
			if typ == cmdWrite {
				bw.Write(payload)
			}
		}
		sendErr <- bw.Flush()
	}()
	for i := 0; i < b.N; i++ {
		if _, err := io.ReadFull(br, rh[:]); err != nil {
			b.Fatal(err)
		}
		if binary.BigEndian.Uint32(rh[4:]) != 0 {
			b.Fatalf("error reply %d", binary.BigEndian.Uint32(rh[4:]))
		}
		if binary.BigEndian.Uint64(rh[8:])&1 == 0 {
			if _, err := io.ReadFull(br, data); err != nil {
				b.Fatal(err)
			}
		}
		tokens <- struct{}{}
	}
	b.StopTimer()
	if err := <-sendErr; err != nil {
		b.Fatal(err)
	}
}

// TestRoundTripZeroAlloc fails if the steady-state data path allocates.
func TestRoundTripZeroAlloc(t *testing.T) {
	r := testing.Benchmark(BenchmarkRoundTrip4K)
	if r.N == 0 {
		t.Fatal("benchmark did not run")
	}
	if a := r.AllocsPerOp(); a != 0 {
		t.Fatalf("%d allocs/op (%d B/op) in the 4K round trip, want 0", a, r.AllocedBytesPerOp())
	}
	t.Logf("%v", r)
}
