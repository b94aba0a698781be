package nbd

// Per-connection payload buffers outside the Go heap.
//
// Invariants:
//   - Only the connection's reader calls get; only its writer calls put (and
//     the reader, for a buffer it took but never submitted). A ring
//     connection (uringconn.go) calls tryGet and put from its one thread.
//   - Each class channel has capacity equal to the number of buffers the class
//     can ever hold, so put never blocks.
//   - A buffer returned by get is at least n bytes long, 4096-aligned, and not
//     in use by any other request until put.

import (
	"errors"
	"fmt"

	"github.com/torus-storage/torus/internal/alignbuf"
)

// errStopped reports that the connection is shutting down.
var errStopped = errors.New("nbd: connection shutting down")

// sizeClass is a set of equal-sized buffers.
type sizeClass struct {
	size int
	ch   chan []byte
	// arena backs a preallocated class; lazy classes allocate on demand up to
	// lazyLeft more buffers and remember them in owned.
	arena    []byte
	lazyLeft int
	owned    [][]byte
}

// bufPool hands out payload buffers by size class.
type bufPool struct {
	classes []sizeClass
}

// newBufPool creates classes of 4 KiB, 64 KiB, 256 KiB and 1 MiB scaled to
// inFlight, plus a small on-demand class of maxPayload buffers. The arenas are
// anonymous mappings, so untouched buffers cost address space, not memory
// (about 29 MiB for inFlight=256, plus up to 2×maxPayload on demand).
func newBufPool(inFlight, maxPayload int) (*bufPool, error) {
	p := &bufPool{}
	spec := []struct{ size, count int }{
		{4 << 10, inFlight},
		{64 << 10, max(inFlight/4, 2)},
		{256 << 10, max(inFlight/8, 2)},
		{1 << 20, max(inFlight/16, 2)},
	}
	for _, sc := range spec {
		if sc.size > maxPayload {
			break
		}
		arena, err := alignbuf.Alloc(sc.size * sc.count)
		if err != nil {
			p.close()
			return nil, fmt.Errorf("nbd: payload buffers: %w", err)
		}
		c := sizeClass{size: sc.size, ch: make(chan []byte, sc.count), arena: arena}
		for i := 0; i < sc.count; i++ {
			c.ch <- arena[i*sc.size : (i+1)*sc.size : (i+1)*sc.size]
		}
		p.classes = append(p.classes, c)
	}
	if last := p.classes[len(p.classes)-1].size; last < maxPayload {
		const large = 2
		p.classes = append(p.classes, sizeClass{size: maxPayload, ch: make(chan []byte, large), lazyLeft: large})
	}
	return p, nil
}

// fixedMax is the largest class whose arena is registered with a ring
// connection's io_uring (fixedArenas): registering pins the whole arena.
const fixedMax = 64 << 10

// fixedArenas returns the preallocated arenas of the classes up to
// fixedMax, for io_uring buffer registration.
func (p *bufPool) fixedArenas() [][]byte {
	var a [][]byte
	for _, c := range p.classes {
		if c.arena != nil && c.size <= fixedMax {
			a = append(a, c.arena)
		}
	}
	return a
}

// classFor returns the index of the smallest class holding n bytes, or -1.
func (p *bufPool) classFor(n int) int {
	for i := range p.classes {
		if n <= p.classes[i].size {
			return i
		}
	}
	return -1
}

// get returns a buffer of class ci or, if that class is exhausted, of a
// larger class with a free buffer; with none free it waits for class ci
// unless stop is closed first. It returns the class the buffer belongs to.
func (p *bufPool) get(ci int, stop <-chan struct{}) ([]byte, int, error) {
	for i := ci; i < len(p.classes); i++ {
		select {
		case b := <-p.classes[i].ch:
			return b, i, nil
		default:
		}
	}
	c := &p.classes[ci]
	if c.lazyLeft > 0 {
		b, err := alignbuf.Alloc(c.size)
		if err != nil {
			return nil, 0, fmt.Errorf("nbd: large payload buffer: %w", err)
		}
		c.lazyLeft--
		c.owned = append(c.owned, b)
		return b, ci, nil
	}
	select {
	case b := <-c.ch:
		return b, ci, nil
	case <-stop:
		return nil, 0, errStopped
	}
}

// tryGet is get without waiting: ok is false when class ci and every larger
// class are empty and class ci may not grow.
func (p *bufPool) tryGet(ci int) (b []byte, class int, ok bool, err error) {
	for i := ci; i < len(p.classes); i++ {
		select {
		case b := <-p.classes[i].ch:
			return b, i, true, nil
		default:
		}
	}
	c := &p.classes[ci]
	if c.lazyLeft > 0 {
		b, err := alignbuf.Alloc(c.size)
		if err != nil {
			return nil, 0, false, fmt.Errorf("nbd: large payload buffer: %w", err)
		}
		c.lazyLeft--
		c.owned = append(c.owned, b)
		return b, ci, true, nil
	}
	return nil, 0, false, nil
}

// put returns a buffer of class ci.
func (p *bufPool) put(ci int, b []byte) {
	p.classes[ci].ch <- b
}

// close unmaps every buffer; none may be in use.
func (p *bufPool) close() {
	for i := range p.classes {
		c := &p.classes[i]
		alignbuf.Free(c.arena)
		for _, b := range c.owned {
			alignbuf.Free(b)
		}
		c.arena, c.owned = nil, nil
	}
}
