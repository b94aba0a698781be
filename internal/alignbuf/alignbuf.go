// Package alignbuf hands out page-aligned memory outside the Go heap.
//
// The kernel reads from and writes into these buffers directly (O_DIRECT,
// io_uring, ublk), so they must not move and must satisfy direct-I/O
// alignment; mmap'd anonymous memory does both and the garbage collector never
// scans it.
package alignbuf

import (
	"fmt"
	"sync"

	"golang.org/x/sys/unix"
)

// PageSize is the alignment of every buffer.
const PageSize = 4096

// Alloc returns n bytes (rounded up to PageSize) of zeroed, page-aligned
// memory outside the Go heap. Release it with Free.
func Alloc(n int) ([]byte, error) {
	if n <= 0 {
		return nil, fmt.Errorf("alignbuf: bad size %d", n)
	}
	sz := (n + PageSize - 1) &^ (PageSize - 1)
	b, err := unix.Mmap(-1, 0, sz, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		return nil, fmt.Errorf("alignbuf: mmap %d bytes: %w", sz, err)
	}
	return b[:n:n], nil
}

// Free releases memory returned by Alloc.
func Free(b []byte) error {
	if cap(b) == 0 {
		return nil
	}
	b = b[:cap(b)]
	sz := (len(b) + PageSize - 1) &^ (PageSize - 1)
	return unix.Munmap(b[:sz:sz])
}

// Pool is a fixed set of equal-sized buffers carved out of one mapping.
// Get and Put are safe for concurrent use and do not allocate.
type Pool struct {
	mu    sync.Mutex
	free  [][]byte
	arena []byte
	size  int
}

// NewPool maps count buffers of size bytes each (size rounded up to PageSize).
func NewPool(size, count int) (*Pool, error) {
	if size <= 0 || count <= 0 {
		return nil, fmt.Errorf("alignbuf: bad pool %d x %d", size, count)
	}
	stride := (size + PageSize - 1) &^ (PageSize - 1)
	arena, err := Alloc(stride * count)
	if err != nil {
		return nil, err
	}
	p := &Pool{arena: arena, size: size, free: make([][]byte, 0, count)}
	for i := 0; i < count; i++ {
		p.free = append(p.free, arena[i*stride:i*stride+size:i*stride+size])
	}
	return p, nil
}

// BufSize is the length of every buffer of the pool.
func (p *Pool) BufSize() int { return p.size }

// Get returns a free buffer, or nil when all are in use.
func (p *Pool) Get() []byte {
	p.mu.Lock()
	n := len(p.free)
	if n == 0 {
		p.mu.Unlock()
		return nil
	}
	b := p.free[n-1]
	p.free = p.free[:n-1]
	p.mu.Unlock()
	return b
}

// Put returns a buffer obtained from Get.
func (p *Pool) Put(b []byte) {
	p.mu.Lock()
	p.free = append(p.free, b[:p.size:p.size])
	p.mu.Unlock()
}

// Close unmaps the pool; no buffer of it may be used afterwards.
func (p *Pool) Close() error { return Free(p.arena) }
