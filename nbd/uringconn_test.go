package nbd

import (
	"bytes"
	"context"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/torus-storage/torus/engine"
	"github.com/torus-storage/torus/internal/nbdtest"
	"github.com/torus-storage/torus/store"
)

// openLocal opens a real store of size bytes in a test directory.
func openLocal(t testing.TB, size int64, shards int) *store.Local {
	t.Helper()
	v, err := store.OpenLocal(filepath.Join(t.TempDir(), "v.store"), size, store.LocalOptions{Shards: shards})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := v.Close(); err != nil {
			t.Errorf("close store: %v", err)
		}
	})
	return v
}

// startUringServer serves v over a unix socket and returns the server and
// the socket path. The cleanup (registered after the volume's) stops the
// server before the volume closes.
func startUringServer(t testing.TB, v engine.Volume, opt Options) (*Server, string) {
	t.Helper()
	srv, err := NewServer([]Export{{Name: "", Volume: v}}, opt)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "nbd.sock")
	l, err := Listen("unix:" + path)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, l) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Serve: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Errorf("Serve did not return after cancel")
		}
	})
	return srv, path
}

// drivenShards counts the shards of v that uring connections run.
func (s *Server) drivenShards(v engine.Volume) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, d := range s.driven[v.(driveable)] {
		if d {
			n++
		}
	}
	return n
}

// waitDriven waits until want shards of v are driven.
func waitDriven(t *testing.T, s *Server, v engine.Volume, want int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for s.drivenShards(v) != want {
		if time.Now().After(deadline) {
			t.Fatalf("%d shards driven, want %d", s.drivenShards(v), want)
		}
		time.Sleep(time.Millisecond)
	}
}

func pattern(seed, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(seed*131 + i*7 + i>>12)
	}
	return b
}

// TestUringPipelined drives a uring connection with many requests in flight,
// small and large writes (a large payload is received straight into its
// buffer), reads replied from sbuf and from the slot's buffer, and every
// other command.
func TestUringPipelined(t *testing.T) {
	for _, structured := range []bool{false, true} {
		v := openLocal(t, 16<<20, 2)
		srv, path := startUringServer(t, v, Options{})
		c := nbdtest.Dial(t, path, structured)
		waitDriven(t, srv, v, 2)

		const n = 200
		var wg sync.WaitGroup
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < n; i++ {
				c.Send(cmdWrite, 0, uint64(i), uint64(i)*4096, 4096, pattern(i, 4096))
			}
			c.Send(cmdWrite, cmdFlagFUA, n, 4<<20, 3<<20, pattern(n, 3<<20))
		}()
		for i := 0; i <= n; i++ {
			if r := c.Recv(); r.Errno != 0 {
				t.Fatalf("write reply %v", r)
			}
		}
		wg.Wait()
		if r := c.Do(cmdFlush, 0, 0, 0, nil); r.Errno != 0 {
			t.Fatalf("flush %v", r)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < n; i++ {
				c.Send(cmdRead, 0, uint64(i), uint64(i)*4096, 4096, nil)
			}
		}()
		for i := 0; i < n; i++ {
			r := c.Recv()
			if r.Errno != 0 || !bytes.Equal(r.Data, pattern(int(r.Cookie), 4096)) {
				t.Fatalf("read reply %v: data differs", r)
			}
		}
		wg.Wait()
		if r := c.Do(cmdRead, 0, 4<<20, 3<<20, nil); r.Errno != 0 || !bytes.Equal(r.Data, pattern(n, 3<<20)) {
			t.Fatalf("large read %v: data differs", r)
		}
		if r := c.Do(cmdTrim, 0, 0, 8192, nil); r.Errno != 0 {
			t.Fatalf("trim %v", r)
		}
		if r := c.Do(cmdWriteZeroes, cmdFlagNoHole, 8192, 4096, nil); r.Errno != 0 {
			t.Fatalf("write zeroes %v", r)
		}
		if r := c.Do(cmdRead, 0, 0, 16384, nil); r.Errno != 0 || !bytes.Equal(r.Data[:12288], make([]byte, 12288)) ||
			!bytes.Equal(r.Data[12288:], pattern(3, 4096)) {
			t.Fatalf("read after trim %v", r)
		}
		c.Send(cmdDisc, 0, 1, 0, 0, nil)
		c.ExpectEOF()
		waitDriven(t, srv, v, 0)
	}
}

// TestUringErrorsKeepStreamInSync is TestErrorsKeepStreamInSync on a ring
// connection.
func TestUringErrorsKeepStreamInSync(t *testing.T) {
	for _, structured := range []bool{false, true} {
		v := openLocal(t, 1<<20, 1)
		srv, path := startUringServer(t, v, Options{MaxPayload: 1 << 20})
		c := nbdtest.Dial(t, path, structured)
		waitDriven(t, srv, v, 1)
		if r := c.Do(cmdWrite, 0, 4096, 4096, append([]byte("hello"), make([]byte, 4091)...)); r.Errno != 0 {
			t.Fatal(r)
		}
		cases := []struct {
			name       string
			typ, flags uint16
			off        uint64
			n          uint32
			payload    []byte
		}{
			{"read past end", cmdRead, 0, 1 << 20, 4096, nil},
			{"read offset overflow", cmdRead, 0, ^uint64(0) - 4095, 4096, nil},
			{"read unaligned length", cmdRead, 0, 0, 512, nil},
			{"write unaligned", cmdWrite, 0, 100, 5000, make([]byte, 5000)},
			{"write past end", cmdWrite, 0, 1 << 20, 4096, make([]byte, 4096)},
			{"write too large", cmdWrite, 0, 0, 1<<20 + 4096, make([]byte, 1<<20+4096)},
			{"unknown command", 42, 0, 0, 4096, nil},
			{"bad flag", cmdTrim, cmdFlagNoHole, 0, 4096, nil},
		}
		for _, tc := range cases {
			c.Send(tc.typ, tc.flags, 9, tc.off, tc.n, tc.payload)
			if r := c.Recv(); r.Cookie != 9 || r.Errno != errInval {
				t.Fatalf("%s: %v, want errno %d", tc.name, r, errInval)
			}
			if r := c.Do(cmdRead, 0, 4096, 4096, nil); r.Errno != 0 || string(r.Data[:5]) != "hello" {
				t.Fatalf("after %s: %v", tc.name, r)
			}
		}
		c.Send(cmdWrite, 0, 9, 0, 1<<31, nil)
		c.ExpectEOF()
		waitDriven(t, srv, v, 0)
		c = nbdtest.Dial(t, path, structured)
		c.Write(make([]byte, requestSize))
		c.ExpectEOF()
		c = nbdtest.Dial(t, path, structured) // truncated request, then hang-up
		c.Write(make([]byte, 10))
		c.NC.Close()
		waitDriven(t, srv, v, 0)
	}
}

// TestUringMultiConn: the first connection runs every shard, a second one
// uses the goroutine path; a FLUSH on either covers writes of both.
func TestUringMultiConn(t *testing.T) {
	v := openLocal(t, 4<<20, 2)
	srv, path := startUringServer(t, v, Options{})
	a := nbdtest.Dial(t, path, false)
	waitDriven(t, srv, v, 2)
	b := nbdtest.Dial(t, path, true)
	if r := a.Do(cmdWrite, 0, 0, 4096, pattern(1, 4096)); r.Errno != 0 {
		t.Fatal(r)
	}
	if r := b.Do(cmdWrite, 0, 1<<20, 4096, pattern(2, 4096)); r.Errno != 0 {
		t.Fatal(r)
	}
	if r := b.Do(cmdFlush, 0, 0, 0, nil); r.Errno != 0 {
		t.Fatal(r)
	}
	if r := b.Do(cmdRead, 0, 0, 4096, nil); r.Errno != 0 || !bytes.Equal(r.Data, pattern(1, 4096)) {
		t.Fatalf("read on second connection: %v", r)
	}
	if r := a.Do(cmdRead, 0, 1<<20, 4096, nil); r.Errno != 0 || !bytes.Equal(r.Data, pattern(2, 4096)) {
		t.Fatalf("read on first connection: %v", r)
	}
	a.NC.Close()
	waitDriven(t, srv, v, 0)
	c := nbdtest.Dial(t, path, false) // the shards are free again
	waitDriven(t, srv, v, 2)
	if r := c.Do(cmdRead, 0, 1<<20, 4096, nil); r.Errno != 0 || !bytes.Equal(r.Data, pattern(2, 4096)) {
		t.Fatalf("read on third connection: %v", r)
	}
}

// TestUringServeCancel: cancelling Serve ends an idle uring connection and a
// busy one cleanly.
func TestUringServeCancel(t *testing.T) {
	v := openLocal(t, 4<<20, 2)
	srv, err := NewServer([]Export{{Volume: v}}, Options{})
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "s.sock")
	l, err := Listen("unix:" + path)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, l) }()
	c := nbdtest.Dial(t, path, false)
	waitDriven(t, srv, v, 2)
	for i := 0; i < 64; i++ {
		c.Send(cmdWrite, 0, uint64(i), uint64(i)*4096, 4096, pattern(i, 4096))
	}
	cancel()
	got := 0
	for {
		var h [simpleReplySize]byte
		if _, err := c.NC.Read(h[:1]); err != nil {
			break
		}
		c.ReadFull(h[1:])
		got++
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Serve did not return")
	}
	if srv.drivenShards(v) != 0 {
		t.Fatal("shards still driven after Serve returned")
	}
	t.Logf("%d of 64 writes answered before the stop", got)
}

// BenchmarkUringRoundTrip4K is BenchmarkRoundTrip4K against a real store on
// a uring connection.
func BenchmarkUringRoundTrip4K(b *testing.B) {
	v := openLocal(b, 64<<20, 1)
	_, path := startUringServer(b, v, Options{})
	c := nbdtest.Dial(b, path, false)
	c.NC.SetDeadline(time.Time{})
	roundTrip4K(b, c.NC, uint64(v.Size()/4096))
}

// TestUringRoundTripZeroAlloc fails if the ring data path allocates.
func TestUringRoundTripZeroAlloc(t *testing.T) {
	r := testing.Benchmark(BenchmarkUringRoundTrip4K)
	if r.N == 0 {
		t.Fatal("benchmark did not run")
	}
	if a := r.AllocsPerOp(); a != 0 {
		t.Fatalf("%d allocs/op (%d B/op) in the ring 4K round trip, want 0", a, r.AllocedBytesPerOp())
	}
	t.Logf("%v", r)
}
