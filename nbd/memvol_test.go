package nbd

import (
	"sync"

	"github.com/torus-storage/torus/engine"
)

// memVolume is an in-memory engine.Volume for tests. It completes requests
// inline unless holding is switched on, in which case completions are parked
// until holdUntil requests are pending (or release is called).
type memVolume struct {
	mu         sync.Mutex
	data       []byte
	holdUntil  int // >0: park completions until this many are pending
	holdAll    bool
	held       []heldReq
	pending    int
	maxPending int
	record     bool
	ops        []opRecord
	flushes    int
}

type heldReq struct {
	r   *engine.Request
	err error
}

type opRecord struct {
	op     engine.Op
	flags  engine.Flags
	offset int64
	length int64
}

func newMemVolume(size int) *memVolume { return &memVolume{data: make([]byte, size)} }

func (v *memVolume) Size() int64    { return int64(len(v.data)) }
func (v *memVolume) BlockSize() int { return 4096 }
func (v *memVolume) Close() error   { return nil }

func (v *memVolume) Submit(r *engine.Request) {
	v.mu.Lock()
	err := v.do(r)
	if v.record {
		v.ops = append(v.ops, opRecord{r.Op, r.Flags, r.Offset, r.Length})
	}
	if v.holdUntil > 0 || v.holdAll {
		v.held = append(v.held, heldReq{r, err})
		v.pending++
		v.maxPending = max(v.maxPending, v.pending)
		if v.holdUntil > 0 && len(v.held) >= v.holdUntil {
			v.holdUntil = 0
			v.mu.Unlock()
			v.release()
			return
		}
		v.mu.Unlock()
		return
	}
	v.mu.Unlock()
	r.Done.Complete(r, err)
}

// release completes every parked request (from another goroutine, as a real
// volume would) and stops parking new ones unless holdAll is still set.
func (v *memVolume) release() {
	v.mu.Lock()
	held := v.held
	v.held = nil
	v.pending -= len(held)
	v.mu.Unlock()
	go func() {
		for _, h := range held {
			h.r.Done.Complete(h.r, h.err)
		}
	}()
}

func (v *memVolume) numHeld() int {
	v.mu.Lock()
	defer v.mu.Unlock()
	return len(v.held)
}

// do runs r against the data; v.mu is held.
func (v *memVolume) do(r *engine.Request) error {
	if r.Op == engine.OpFlush {
		v.flushes++
		return nil
	}
	if r.Offset < 0 || r.Length <= 0 || r.Offset%4096 != 0 || r.Length%4096 != 0 || r.Offset+r.Length > int64(len(v.data)) {
		return engine.ErrRange
	}
	d := v.data[r.Offset : r.Offset+r.Length]
	switch r.Op {
	case engine.OpRead:
		copy(r.Buf, d)
	case engine.OpWrite:
		copy(d, r.Buf)
	case engine.OpDiscard, engine.OpWriteZeroes:
		clear(d)
	}
	return nil
}
