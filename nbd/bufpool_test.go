package nbd

import (
	"bytes"
	"testing"
	"time"
	"unsafe"

	"github.com/torus-storage/torus/internal/nbdtest"
)

func TestBufPool(t *testing.T) {
	p, err := newBufPool(8, 4<<20)
	if err != nil {
		t.Fatal(err)
	}
	defer p.close()
	stop := make(chan struct{})
	if got := p.classFor(4096); p.classes[got].size != 4096 {
		t.Fatalf("classFor(4096) = %d", got)
	}
	if got := p.classFor(5000); p.classes[got].size != 64<<10 {
		t.Fatalf("classFor(5000) = %d", got)
	}
	if got := p.classFor(4<<20 + 1); got != -1 {
		t.Fatalf("classFor(too big) = %d", got)
	}
	// Exhaust the 4K class; further gets fall back to larger classes.
	var held [][]byte
	var classes []int
	for i := 0; i < 8; i++ {
		b, ci, err := p.get(0, stop)
		if err != nil || ci != 0 || len(b) != 4096 || uintptr(unsafe.Pointer(&b[0]))%4096 != 0 {
			t.Fatalf("get %d: %v class %d len %d", i, err, ci, len(b))
		}
		held = append(held, b)
		classes = append(classes, ci)
	}
	b, ci, err := p.get(0, stop)
	if err != nil || ci == 0 || len(b) < 4096 {
		t.Fatalf("fallback: %v class %d", err, ci)
	}
	p.put(ci, b)
	// The large class allocates lazily, at most twice, then waits.
	large := len(p.classes) - 1
	for i := 0; i < 2; i++ {
		b, ci, err := p.get(large, stop)
		if err != nil || ci != large || len(b) != 4<<20 {
			t.Fatalf("large %d: %v %d %d", i, err, ci, len(b))
		}
		held = append(held, b)
		classes = append(classes, ci)
	}
	got := make(chan error, 1)
	go func() {
		_, _, err := p.get(large, stop)
		got <- err
	}()
	select {
	case err := <-got:
		t.Fatalf("third large get did not wait: %v", err)
	case <-time.After(20 * time.Millisecond):
	}
	close(stop)
	if err := <-got; err != errStopped {
		t.Fatalf("get after stop: %v", err)
	}
	for i, b := range held {
		p.put(classes[i], b)
	}
}

func TestLargePayloads(t *testing.T) {
	v := newMemVolume(32 << 20)
	path := startServer(t, oneExport(v), Options{MaxPayload: 8 << 20})
	c := nbdtest.Dial(t, path, true)
	const n = 6
	want := make([][]byte, n)
	go func() {
		for i := 0; i < n; i++ {
			want[i] = bytes.Repeat([]byte{byte(i + 1)}, 5<<20)
		}
		for i := 0; i < n; i++ {
			c.Send(cmdWrite, 0, uint64(i), uint64(i)*(5<<20), 5<<20, want[i])
		}
		for i := 0; i < n; i++ {
			c.Send(cmdRead, 0, uint64(100+i), uint64(i)*(5<<20), 5<<20, nil)
		}
	}()
	for i := 0; i < 2*n; i++ {
		r := c.Recv()
		if r.Errno != 0 {
			t.Fatalf("reply %v", r)
		}
		if r.Cookie >= 100 {
			k := r.Cookie - 100
			if !bytes.Equal(r.Data, bytes.Repeat([]byte{byte(k + 1)}, 5<<20)) {
				t.Fatalf("read %d: data mismatch", k)
			}
		}
	}
}
