package ublk

import (
	"log/slog"
	"sync"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/torus-storage/torus/engine"
	"github.com/torus-storage/torus/internal/alignbuf"
	"github.com/torus-storage/torus/iouring"
)

// memVolume is an in-memory Volume that completes synchronously, or on a
// goroutine when async is set.
type memVolume struct {
	data  []byte
	async bool
	mu    sync.Mutex
	ops   []engine.Op
	flags []engine.Flags
	keep  bool
}

func (m *memVolume) Size() int64    { return int64(len(m.data)) }
func (m *memVolume) BlockSize() int { return 4096 }
func (m *memVolume) Close() error   { return nil }
func (m *memVolume) Submit(r *engine.Request) {
	if m.keep {
		m.mu.Lock()
		m.ops = append(m.ops, r.Op)
		m.flags = append(m.flags, r.Flags)
		m.mu.Unlock()
	}
	if m.async {
		go m.do(r)
		return
	}
	m.do(r)
}

func (m *memVolume) do(r *engine.Request) {
	switch r.Op {
	case engine.OpRead:
		copy(r.Buf, m.data[r.Offset:])
	case engine.OpWrite:
		copy(m.data[r.Offset:], r.Buf)
	case engine.OpDiscard, engine.OpWriteZeroes:
		clear(m.data[r.Offset : r.Offset+r.Length])
	}
	r.Done.Complete(r, nil)
}

// hostQueue builds a queue whose "ublkc" fd is an eventfd (URING_CMDs on it
// fail harmlessly) and whose descriptor area is ordinary memory, so the
// dispatch path runs without ublk_drv.
func hostQueue(t testing.TB, vol engine.Volume, depth int) (*queue, []ioDesc) {
	t.Helper()
	fake, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		t.Fatal(err)
	}
	q := newQueue(0, depth, 64<<10, fake, false, vol, nil, slog.New(slog.DiscardHandler))
	q.uring, err = iouring.New(uint32(depth+2), 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := q.allocBufs(); err != nil {
		t.Fatal(err)
	}
	q.efd, err = unix.Eventfd(0, unix.EFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	descs := make([]ioDesc, depth)
	q.descs = unsafe.Slice((*byte)(unsafe.Pointer(&descs[0])), depth*24)
	t.Cleanup(func() {
		q.uring.Close()
		unix.Close(q.efd)
		unix.Close(fake)
		alignbuf.Free(q.bufs)
	})
	return q, descs
}

// deliver pretends the kernel answered tag's FETCH with a request.
func deliver(q *queue, tag uint16) {
	q.inKernel++
	q.handle(&iouring.CQE{UserData: uint64(tag), Res: ioResOK})
}

func TestQueueDispatch(t *testing.T) {
	vol := &memVolume{data: make([]byte, 1<<20), keep: true}
	q, descs := hostQueue(t, vol, 4)
	copy(q.tags[0].buf, "hello")
	descs[0] = ioDesc{opFlags: opWrite | ioFlagFUA, nrSectors: 8, startSector: 16}
	descs[1] = ioDesc{opFlags: opRead, nrSectors: 8, startSector: 16}
	descs[2] = ioDesc{opFlags: opFlush}
	descs[3] = ioDesc{opFlags: opWriteZeroes | ioFlagNoUnmap, nrSectors: 8, startSector: 16}
	deliver(q, 0)
	deliver(q, 2)
	q.drain()
	deliver(q, 1)
	q.drain()
	if string(vol.data[16*512:16*512+5]) != "hello" {
		t.Fatalf("write did not reach the volume")
	}
	if string(q.tags[1].buf[:5]) != "hello" {
		t.Fatalf("read did not fill the tag buffer")
	}
	if q.tags[0].res != 4096 || q.tags[1].res != 4096 || q.tags[2].res != 0 {
		t.Fatalf("results %d %d %d", q.tags[0].res, q.tags[1].res, q.tags[2].res)
	}
	deliver(q, 3)
	q.drain()
	want := []engine.Op{engine.OpWrite, engine.OpFlush, engine.OpRead, engine.OpWriteZeroes}
	wantF := []engine.Flags{engine.FlagFUA, 0, 0, engine.FlagNoUnmap}
	for i := range want {
		if vol.ops[i] != want[i] || vol.flags[i] != wantF[i] {
			t.Fatalf("op %d = %v/%v, want %v/%v", i, vol.ops[i], vol.flags[i], want[i], wantF[i])
		}
	}
	if q.inVolume != 0 || q.inKernel != 4 {
		t.Fatalf("inVolume %d inKernel %d, want 0 and 4 commits", q.inVolume, q.inKernel)
	}
	// Too large a request and an unknown op are answered without the volume.
	descs[0] = ioDesc{opFlags: opRead, nrSectors: uint32(q.maxIO/512 + 8)}
	descs[1] = ioDesc{opFlags: 18}
	deliver(q, 0)
	deliver(q, 1)
	if q.inVolume != 0 || len(vol.ops) != 4 {
		t.Fatalf("bad requests reached the volume")
	}
	// -ENODEV retires a tag.
	q.inKernel++
	q.handle(&iouring.CQE{UserData: 2, Res: ioResAbort})
	if !q.tags[2].dead {
		t.Fatalf("tag 2 not dead after -ENODEV")
	}
}

func TestFillCmd(t *testing.T) {
	q, _ := hostQueue(t, &memVolume{data: make([]byte, 1<<20)}, 4)
	q.id = 3
	var raw [128]byte
	sqe := (*iouring.SQE)(unsafe.Pointer(&raw[0]))
	q.fillCmd(sqe, q.opCommit, 2, -5)
	c := (*ioCmd)(unsafe.Pointer(&raw[48]))
	if sqe.Opcode != iouring.OpURingCmd || sqe.Off != 0xC0107521 || sqe.UserData != 2 {
		t.Fatalf("sqe %+v", *sqe)
	}
	if c.qID != 3 || c.tag != 2 || c.result != -5 || c.addr != uint64(uintptr(unsafe.Pointer(&q.tags[2].buf[0]))) {
		t.Fatalf("cmd %+v", *c)
	}
}

// TestQueueAsyncHandoff completes requests on other goroutines and checks
// that the eventfd poll wakes the queue loop and every tag is committed.
func TestQueueAsyncHandoff(t *testing.T) {
	vol := &memVolume{data: make([]byte, 1<<20), async: true}
	q, descs := hostQueue(t, vol, 16)
	q.armWake()
	for i := range descs {
		descs[i] = ioDesc{opFlags: opWrite, nrSectors: 8, startSector: uint64(i * 8)}
		deliver(q, uint16(i))
	}
	// The URING_CMD commits fail on the fake fd (tags die), so the loop
	// ends once the volume has answered every request.
	if err := q.loop(); err != nil {
		t.Fatal(err)
	}
	if q.inVolume != 0 {
		t.Fatalf("inVolume %d", q.inVolume)
	}
}

func TestQueueNoAllocs(t *testing.T) {
	vol := &memVolume{data: make([]byte, 1<<20)}
	q, descs := hostQueue(t, vol, 4)
	descs[0] = ioDesc{opFlags: opWrite, nrSectors: 8, startSector: 8}
	step := queueStep(q)
	step()
	if n := testing.AllocsPerRun(200, step); n != 0 {
		t.Fatalf("%v allocations per I/O, want 0", n)
	}
}

// queueStep returns one full I/O on the host queue: FETCH CQE, descriptor
// decode, volume submit and completion, hand-off, COMMIT_AND_FETCH SQE,
// submission and reaping.
func queueStep(q *queue) func() {
	return func() {
		deliver(q, 0)
		q.drain()
		q.uring.Submit()
		for q.uring.PeekCQEs(q.cqes) == 0 {
			q.uring.SubmitAndWait(1)
		}
		q.inKernel--
		q.mu.Lock()
		q.signaled = false // as the loop does before it sleeps
		q.mu.Unlock()
	}
}

func BenchmarkQueueIO(b *testing.B) {
	vol := &memVolume{data: make([]byte, 1<<20)}
	q, descs := hostQueue(b, vol, 4)
	descs[0] = ioDesc{opFlags: opWrite, nrSectors: 8, startSector: 8}
	step := queueStep(q)
	b.ReportAllocs()
	for b.Loop() {
		step()
	}
}
