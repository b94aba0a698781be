package nbd

// Host tests of the kernel attach code that need no kernel NBD: the netlink
// encoding and decoding, and the handshake-less transmission phase the kernel
// speaks. The tests against a real /dev/nbdN are in kernel_vm_test.go (build
// tag vm, run by nbd/vmtest.sh in a VM).

import (
	"bytes"
	"context"
	"encoding/binary"
	"net"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/torus-storage/torus/internal/nbdtest"
)

func TestNetlinkConnectEncoding(t *testing.T) {
	b := encodeConnect(connectParams{
		index: 3, size: 1 << 30, blockSize: 4096, serverFlags: 0x16d,
		timeout: 1500 * time.Millisecond, deadConn: 0, fds: []int{7, 9},
	})
	if len(b)%4 != 0 {
		t.Fatalf("attributes not 4-byte aligned: %d bytes", len(b))
	}
	attrs, err := parseAttrs(b)
	if err != nil {
		t.Fatal(err)
	}
	got := map[uint16][]byte{}
	var order []uint16
	for _, a := range attrs {
		got[a.typ] = a.data
		order = append(order, a.typ)
	}
	u64 := func(typ uint16) uint64 {
		t.Helper()
		d, ok := got[typ]
		if !ok || len(d) != 8 {
			t.Fatalf("attribute %d: %x (present %v)", typ, d, ok)
		}
		return binary.NativeEndian.Uint64(d)
	}
	if idx, err := (nlAttr{nbdAttrIndex, got[nbdAttrIndex]}).u32(); err != nil || idx != 3 {
		t.Errorf("index %d, %v", idx, err)
	}
	if v := u64(nbdAttrSizeBytes); v != 1<<30 {
		t.Errorf("size %d", v)
	}
	if v := u64(nbdAttrBlockSizeBytes); v != 4096 {
		t.Errorf("block size %d", v)
	}
	if v := u64(nbdAttrServerFlags); v != 0x16d {
		t.Errorf("flags %#x", v)
	}
	if v := u64(nbdAttrTimeout); v != 2 {
		t.Errorf("timeout %d s, want 2 (rounded up)", v)
	}
	if v := u64(nbdAttrDeadConnTimeout); v != 0 {
		t.Errorf("dead conn timeout %d", v)
	}
	// The sockets attribute is flagged nested and holds one SOCK_ITEM per fd.
	off := 0
	for _, a := range attrs {
		if a.typ == nbdAttrSockets {
			break
		}
		off += nlAlign(4 + len(a.data))
	}
	if f := binary.NativeEndian.Uint16(b[off+2:]); f&unix.NLA_F_NESTED == 0 {
		t.Errorf("NBD_ATTR_SOCKETS type %#x lacks NLA_F_NESTED", f)
	}
	items, err := parseAttrs(got[nbdAttrSockets])
	if err != nil {
		t.Fatal(err)
	}
	var fds []uint32
	for _, it := range items {
		if it.typ != nbdSockItem {
			t.Errorf("socket list item of type %d", it.typ)
		}
		inner, err := parseAttrs(it.data)
		if err != nil || len(inner) != 1 || inner[0].typ != nbdSockFD {
			t.Fatalf("sock item %x: %v %v", it.data, inner, err)
		}
		fd, _ := inner[0].u32()
		fds = append(fds, fd)
	}
	if len(fds) != 2 || fds[0] != 7 || fds[1] != 9 {
		t.Errorf("fds %v", fds)
	}
	t.Logf("attribute order %v", order)

	// Without an index the kernel picks one: no NBD_ATTR_INDEX at all.
	attrs, _ = parseAttrs(encodeConnect(connectParams{index: -1, size: 4096, blockSize: 4096, fds: []int{1}}))
	for _, a := range attrs {
		if a.typ == nbdAttrIndex || a.typ == nbdAttrTimeout {
			t.Errorf("attribute %d present", a.typ)
		}
	}
}

// TestNetlinkReconfigureSizeEncoding: NBD_CMD_RECONFIGURE's attributes
// name the device and carry the new size and the block size, nothing else.
func TestNetlinkReconfigureSizeEncoding(t *testing.T) {
	attrs, err := parseAttrs(encodeReconfigureSize(5, 3<<30, 4096))
	if err != nil {
		t.Fatal(err)
	}
	want := map[uint16]uint64{nbdAttrIndex: 5, nbdAttrSizeBytes: 3 << 30, nbdAttrBlockSizeBytes: 4096}
	if len(attrs) != len(want) {
		t.Fatalf("%d attributes, want %d: %v", len(attrs), len(want), attrs)
	}
	for _, a := range attrs {
		var v uint64
		switch len(a.data) {
		case 4:
			v = uint64(binary.NativeEndian.Uint32(a.data))
		case 8:
			v = binary.NativeEndian.Uint64(a.data)
		default:
			t.Fatalf("attribute %d: %d bytes", a.typ, len(a.data))
		}
		if w, ok := want[a.typ]; !ok || v != w {
			t.Errorf("attribute %d = %d, want %d (expected %v)", a.typ, v, w, ok)
		}
	}
	if nbdCmdReconfigure != 3 {
		t.Fatalf("NBD_CMD_RECONFIGURE is 3 in nbd-netlink.h, not %d", nbdCmdReconfigure)
	}
}

func TestNetlinkStatusDecoding(t *testing.T) {
	var a nlAttrs
	a.nest(nbdAttrDeviceList, func() {
		for i, c := range []bool{true, false, true} {
			a.nest(nbdDeviceItem, func() {
				a.u32(nbdDeviceIndex, uint32(i*2))
				v := byte(0)
				if c {
					v = 1
				}
				a.put(nbdDeviceConnected, []byte{v})
			})
		}
	})
	st, err := parseStatus(a.b)
	if err != nil {
		t.Fatal(err)
	}
	want := []KernelStatus{{0, true}, {2, false}, {4, true}}
	if len(st) != len(want) {
		t.Fatalf("got %v, want %v", st, want)
	}
	for i := range want {
		if st[i] != want[i] {
			t.Errorf("item %d: %v, want %v", i, st[i], want[i])
		}
	}
}

func TestNetlinkReplies(t *testing.T) {
	msg := func(typ uint16, seq uint32, body []byte) []byte {
		b := binary.NativeEndian.AppendUint32(nil, uint32(16+len(body)))
		b = binary.NativeEndian.AppendUint16(b, typ)
		b = binary.NativeEndian.AppendUint16(b, 0)
		b = binary.NativeEndian.AppendUint32(b, seq)
		b = binary.NativeEndian.AppendUint32(b, 0)
		b = append(b, body...)
		for len(b)%4 != 0 {
			b = append(b, 0)
		}
		return b
	}
	var a nlAttrs
	a.u32(nbdAttrIndex, 5)
	data := append([]byte{nbdCmdConnect, 1, 0, 0}, a.b...)
	ack := binary.NativeEndian.AppendUint32(nil, 0)
	stream := append(append(msg(0x20, 6, data), msg(0x20, 7, data)...), msg(unix.NLMSG_ERROR, 7, ack)...)
	var replies [][]byte
	done, err := parseReplies(stream, 7, &replies)
	if !done || err != nil || len(replies) != 1 || !bytes.Equal(replies[0], a.b) {
		t.Fatalf("done %v err %v replies %x", done, err, replies)
	}
	nack := binary.NativeEndian.AppendUint32(nil, uint32(0xffffffff-uint32(syscall.EBUSY)+1))
	replies = nil
	done, err = parseReplies(msg(unix.NLMSG_ERROR, 9, nack), 9, &replies)
	if !done || err != syscall.EBUSY {
		t.Fatalf("error reply: done %v err %v", done, err)
	}
	// Truncated and garbage input must not panic.
	for _, b := range [][]byte{stream[:5], stream[:17], {0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0}} {
		parseReplies(b, 7, &replies)
		parseAttrs(b)
		parseStatus(b)
	}
}

func FuzzParseStatus(f *testing.F) {
	var a nlAttrs
	a.nest(nbdAttrDeviceList, func() {
		a.nest(nbdDeviceItem, func() { a.u32(nbdDeviceIndex, 1); a.put(nbdDeviceConnected, []byte{1}) })
	})
	f.Add(a.b)
	f.Fuzz(func(t *testing.T, b []byte) {
		parseStatus(b)
		var r [][]byte
		parseReplies(b, 1, &r)
	})
}

// TestServeTransmission talks to the server as the kernel does: no handshake,
// simple replies, NBD_CMD_DISC at the end.
func TestServeTransmission(t *testing.T) {
	v := newMemVolume(1 << 20)
	srv, err := NewServer(oneExport(v), Options{})
	if err != nil {
		t.Fatal(err)
	}
	if f, ok := srv.TransmissionFlags(""); !ok || f&tflagCanMultiConn == 0 || f&tflagSendFlush == 0 {
		t.Fatalf("flags %#x %v", f, ok)
	}
	if _, ok := srv.TransmissionFlags("nope"); ok {
		t.Fatal("flags of a missing export")
	}
	nc, kfd, err := kernelSocketPair()
	if err != nil {
		t.Fatal(err)
	}
	kf := os.NewFile(uintptr(kfd), "kernel-end")
	kc, err := net.FileConn(kf)
	kf.Close()
	if err != nil {
		t.Fatal(err)
	}
	kc.SetDeadline(time.Now().Add(20 * time.Second))
	done := make(chan error, 1)
	go func() { done <- srv.ServeTransmission(context.Background(), nc, "") }()
	c := nbdtest.NewConn(t, kc)
	payload := bytes.Repeat([]byte("kernel!!"), 1024)
	if r := c.Do(cmdWrite, cmdFlagFUA, 8192, uint32(len(payload)), payload); r.Errno != 0 {
		t.Fatalf("write: %v", r)
	}
	if r := c.Do(cmdFlush, 0, 0, 0, nil); r.Errno != 0 {
		t.Fatalf("flush: %v", r)
	}
	if r := c.Do(cmdRead, 0, 8192, uint32(len(payload)), nil); r.Errno != 0 || !bytes.Equal(r.Data, payload) {
		t.Fatalf("read back: %v", r)
	}
	if r := c.Do(cmdRead, 0, 1<<20, 4096, nil); r.Errno != errInval {
		t.Fatalf("read past the end: %v", r)
	}
	c.Send(cmdDisc, 0, 0, 0, 0, nil)
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("ServeTransmission: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("ServeTransmission did not return after NBD_CMD_DISC")
	}
	c.ExpectEOF()

	// An unknown export fails at once and closes the connection.
	nc2, kfd2, err := kernelSocketPair()
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(kfd2)
	if err := srv.ServeTransmission(context.Background(), nc2, "nope"); err == nil || !strings.Contains(err.Error(), "nope") {
		t.Fatalf("unknown export: %v", err)
	}
}

// TestServeTransmissionCancel: cancelling ctx ends the connection without an
// error even while the peer is idle.
func TestServeTransmissionCancel(t *testing.T) {
	srv, err := NewServer(oneExport(newMemVolume(1<<20)), Options{})
	if err != nil {
		t.Fatal(err)
	}
	nc, kfd, err := kernelSocketPair()
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(kfd)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.ServeTransmission(ctx, nc, "") }()
	time.Sleep(20 * time.Millisecond)
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("ServeTransmission after cancel: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("ServeTransmission ignored cancellation")
	}
}

// TestKernelAvailable checks the message on a machine without kernel NBD and
// success on one with it (as root).
func TestKernelAvailable(t *testing.T) {
	err := KernelAvailable()
	_, modErr := os.Stat("/sys/module/nbd")
	_, devErr := os.Stat("/dev/nbd0")
	switch {
	case modErr != nil && devErr != nil:
		if err == nil || !strings.Contains(err.Error(), "modprobe nbd") {
			t.Fatalf("no nbd here, KernelAvailable said %v", err)
		}
	case os.Geteuid() != 0:
		if err == nil || !strings.Contains(err.Error(), "root") {
			t.Fatalf("not root, KernelAvailable said %v", err)
		}
	default:
		if err != nil {
			t.Fatalf("nbd is loaded and we are root, KernelAvailable said %v", err)
		}
	}
	if err != nil {
		if _, aerr := AttachKernel(context.Background(), newMemVolume(1<<20), AttachOptions{Index: -1}); aerr == nil || aerr.Error() != err.Error() {
			t.Fatalf("AttachKernel without kernel NBD: %v, want %v", aerr, err)
		}
	}
}

// TestGenlFamily resolves the controller's own family over a real netlink
// socket, and the nbd family as absent where the module is not loaded.
func TestGenlFamily(t *testing.T) {
	c, err := dialGenl()
	if err != nil {
		t.Fatal(err)
	}
	defer c.close()
	id, err := c.familyID("nlctrl")
	if err != nil || id != unix.GENL_ID_CTRL {
		t.Fatalf("nlctrl: id %#x, %v", id, err)
	}
	id, err = c.familyID("torus-nofam")
	if err != errNoGenl {
		t.Fatalf("missing family: id %#x, %v", id, err)
	}
	if _, err := os.Stat("/sys/module/nbd"); err != nil {
		if _, err := c.familyID(nbdGenlName); err != errNoGenl {
			t.Fatalf("nbd family without the module: %v", err)
		}
	}
}

// BenchmarkServeTransmission4K is BenchmarkRoundTrip4K over the path the
// kernel uses: a socketpair served by ServeTransmission, no handshake.
func BenchmarkServeTransmission4K(b *testing.B) {
	v := newMemVolume(64 << 20)
	srv, err := NewServer(oneExport(v), Options{})
	if err != nil {
		b.Fatal(err)
	}
	nc, kfd, err := kernelSocketPair()
	if err != nil {
		b.Fatal(err)
	}
	kf := os.NewFile(uintptr(kfd), "kernel-end")
	kc, err := net.FileConn(kf)
	kf.Close()
	if err != nil {
		b.Fatal(err)
	}
	defer kc.Close()
	done := make(chan error, 1)
	go func() { done <- srv.ServeTransmission(context.Background(), nc, "") }()
	roundTrip4K(b, kc, uint64(v.Size()/4096))
	kc.Close()
	if err := <-done; err != nil {
		b.Fatal(err)
	}
}

// TestServeTransmissionZeroAlloc fails if the kernel-facing data path
// allocates in steady state.
func TestServeTransmissionZeroAlloc(t *testing.T) {
	r := testing.Benchmark(BenchmarkServeTransmission4K)
	if r.N == 0 {
		t.Fatal("benchmark did not run")
	}
	if a := r.AllocsPerOp(); a != 0 {
		t.Fatalf("%d allocs/op (%d B/op), want 0", a, r.AllocedBytesPerOp())
	}
	t.Logf("%v", r)
}

// TestLimitsLiveSize: the kernel client's connections check requests
// against the volume's current size, so that a device grown by SetSize can
// use the new end; a handshake connection keeps the size it was given.
func TestLimitsLiveSize(t *testing.T) {
	v := newMemVolume(8 * blockSize)
	live := newLimits(&Export{Volume: v, liveSize: true}, Options{MaxPayload: 1 << 20})
	fixed := newLimits(&Export{Volume: v}, Options{MaxPayload: 1 << 20})
	past := request{typ: cmdWrite, offset: 8 * blockSize, length: blockSize}
	if live.check(past) != errInval || fixed.check(past) != errInval {
		t.Fatal("a write past the end is taken")
	}
	v.data = append(v.data, make([]byte, 4*blockSize)...)
	if e := live.check(past); e != 0 {
		t.Fatalf("live limits refuse a write below the grown size: errno %d", e)
	}
	if e := live.check(request{typ: cmdRead, offset: 12 * blockSize, length: blockSize}); e != errInval {
		t.Fatalf("live limits take a read past the grown size: errno %d", e)
	}
	if fixed.check(past) != errInval {
		t.Fatal("a handshake connection's limit grew with the volume")
	}
}
