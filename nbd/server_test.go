package nbd

import (
	"bytes"
	"context"
	"encoding/binary"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/torus-storage/torus/engine"
	"github.com/torus-storage/torus/internal/nbdtest"
)

// startServer serves exports on a unix socket until the test ends.
func startServer(t testing.TB, exports []Export, opt Options) string {
	t.Helper()
	srv, err := NewServer(exports, opt)
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
	return path
}

const testVolSize = 8 << 20

func oneExport(v *memVolume) []Export {
	return []Export{{Name: "disk", Description: "test disk", Volume: v}}
}

func TestHandshakeGo(t *testing.T) {
	v := newMemVolume(testVolSize)
	path := startServer(t, oneExport(v), Options{MaxPayload: 4 << 20})
	c := nbdtest.DialRaw(t, path, clientFlagFixedNewstyle|clientFlagNoZeroes)
	got, rep := c.Info(optGo, "disk", infoName, infoDescription)
	if rep != repAck {
		t.Fatalf("GO reply %#x", rep)
	}
	if c.Size != testVolSize {
		t.Errorf("size %d", c.Size)
	}
	want := uint16(tflagHasFlags | tflagSendFlush | tflagSendFUA | tflagSendTrim | tflagSendWriteZeroes | tflagCanMultiConn)
	if c.Flags != want {
		t.Errorf("flags %#x, want %#x", c.Flags, want)
	}
	if string(got[infoName]) != "disk" || string(got[infoDescription]) != "test disk" {
		t.Errorf("name %q description %q", got[infoName], got[infoDescription])
	}
	bs := got[infoBlockSize]
	if len(bs) != 12 || binary.BigEndian.Uint32(bs) != 4096 || binary.BigEndian.Uint32(bs[4:]) != 4096 || binary.BigEndian.Uint32(bs[8:]) != 4<<20 {
		t.Errorf("block size info %x", bs)
	}
	// Transmission works after GO.
	if r := c.Do(cmdFlush, 0, 0, 0, nil); r.Errno != 0 {
		t.Fatalf("flush: %v", r)
	}
	// An option after GO is not a request (bad magic): the server hangs up
	// cleanly once it has a request header's worth of bytes.
	c.SendOpt(optInfo, nbdtest.InfoData("disk", 0, 0, 0))
	c.ExpectEOF()
}

func TestOptions(t *testing.T) {
	v1, v2 := newMemVolume(1<<20), newMemVolume(2<<20)
	path := startServer(t, []Export{{Name: "a", Description: "first", Volume: v1}, {Name: "b", Volume: v2, ReadOnly: true}}, Options{})
	c := nbdtest.DialRaw(t, path, clientFlagFixedNewstyle|clientFlagNoZeroes)

	c.SendOpt(optList, nil)
	var names []string
	for {
		_, typ, data := c.ReadOptReply()
		if typ == repAck {
			break
		}
		if typ != repServer {
			t.Fatalf("LIST reply %#x", typ)
		}
		n := binary.BigEndian.Uint32(data)
		names = append(names, string(data[4:4+n])+"/"+string(data[4+n:]))
	}
	if strings.Join(names, ",") != "a/first,b/" {
		t.Errorf("LIST = %v", names)
	}
	c.SendOpt(optList, []byte{1})
	if _, typ, _ := c.ReadOptReply(); typ != repErrInvalid {
		t.Errorf("LIST with data: %#x", typ)
	}
	if _, rep := c.Info(optInfo, "b"); rep != repAck || c.Size != 2<<20 || c.Flags&tflagReadOnly == 0 {
		t.Errorf("INFO b: rep %#x size %d flags %#x", rep, c.Size, c.Flags)
	}
	if _, rep := c.Info(optInfo, "nope"); rep != repErrUnknown {
		t.Errorf("INFO unknown export: %#x", rep)
	}
	c.SendOpt(optInfo, []byte{0, 0, 0, 9, 'x'}) // name length beyond data
	if _, typ, _ := c.ReadOptReply(); typ != repErrInvalid {
		t.Errorf("INFO malformed: %#x", typ)
	}
	c.SendOpt(optGo, append(nbdtest.InfoData("a"), 0)) // trailing byte
	if _, typ, _ := c.ReadOptReply(); typ != repErrInvalid {
		t.Errorf("GO malformed: %#x", typ)
	}
	c.SendOpt(optStartTLS, nil)
	if _, typ, _ := c.ReadOptReply(); typ != repErrPolicy {
		t.Errorf("STARTTLS: %#x", typ)
	}
	c.SendOpt(99, []byte("whatever"))
	if o, typ, _ := c.ReadOptReply(); typ != repErrUnsup || o != 99 {
		t.Errorf("unknown option: %d %#x", o, typ)
	}
	c.SendOpt(optStructuredReply, []byte{1})
	if _, typ, _ := c.ReadOptReply(); typ != repErrInvalid {
		t.Errorf("STRUCTURED_REPLY with data: %#x", typ)
	}
	c.SendOpt(optAbort, nil)
	if _, typ, _ := c.ReadOptReply(); typ != repAck {
		t.Errorf("ABORT: %#x", typ)
	}
	c.ExpectEOF()

	// Absurd option length: clean disconnect.
	c = nbdtest.DialRaw(t, path, clientFlagFixedNewstyle|clientFlagNoZeroes)
	b := binary.BigEndian.AppendUint64(nil, optMagic)
	b = binary.BigEndian.AppendUint32(b, optInfo)
	c.Write(binary.BigEndian.AppendUint32(b, 1<<30))
	c.ExpectEOF()

	// Unknown client flags: disconnect.
	c = nbdtest.DialRaw(t, path, clientFlagFixedNewstyle|1<<7)
	c.ExpectEOF()
}

func TestExportName(t *testing.T) {
	v := newMemVolume(1 << 20)
	path := startServer(t, oneExport(v), Options{})
	// Without NO_ZEROES the reply carries 124 zero bytes.
	c := nbdtest.DialRaw(t, path, clientFlagFixedNewstyle)
	c.SendOpt(optExportName, []byte("disk"))
	var b [134]byte
	c.ReadFull(b[:])
	if binary.BigEndian.Uint64(b[:]) != 1<<20 || binary.BigEndian.Uint16(b[8:]) == 0 || !bytes.Equal(b[10:], make([]byte, 124)) {
		t.Fatalf("EXPORT_NAME reply %x", b[:12])
	}
	if r := c.Do(cmdRead, 0, 0, 4096, nil); r.Errno != 0 || len(r.Data) != 4096 {
		t.Fatalf("read after EXPORT_NAME: %v", r)
	}
	// Unknown export name: the server hangs up.
	c = nbdtest.DialRaw(t, path, clientFlagFixedNewstyle|clientFlagNoZeroes)
	c.SendOpt(optExportName, []byte("nope"))
	c.ExpectEOF()
}

func testPipelined(t *testing.T, structured bool) {
	v := newMemVolume(testVolSize)
	path := startServer(t, oneExport(v), Options{})
	c := nbdtest.Dial(t, path, structured)
	rng := rand.New(rand.NewPCG(1, 2))
	const n = 300
	want := make([]byte, testVolSize)
	type w struct {
		off  uint64
		data []byte
	}
	var writes []w
	for i := 0; i < n; i++ {
		blocks := 1 + rng.IntN(40)
		off := uint64(rng.IntN(testVolSize/4096-blocks)) * 4096
		data := make([]byte, blocks*4096)
		for j := range data {
			data[j] = byte(rng.Uint32())
		}
		copy(want[off:], data)
		writes = append(writes, w{off, data})
	}
	go func() {
		for i, wr := range writes {
			c.Send(cmdWrite, 0, uint64(i), wr.off, uint32(len(wr.data)), wr.data)
		}
	}()
	seen := map[uint64]bool{}
	for range writes {
		r := c.Recv()
		if r.Errno != 0 || seen[r.Cookie] {
			t.Fatalf("write reply %v (dup %v)", r, seen[r.Cookie])
		}
		seen[r.Cookie] = true
	}
	if !bytes.Equal(v.data, want) {
		t.Fatal("volume contents differ from what was written")
	}
	// Pipelined reads of random ranges compared against the volume.
	type rd struct {
		off uint64
		n   uint32
	}
	reads := map[uint64]rd{}
	for i := 0; i < n; i++ {
		blocks := 1 + rng.IntN(64)
		reads[uint64(i)] = rd{uint64(rng.IntN(testVolSize/4096-blocks)) * 4096, uint32(blocks * 4096)}
	}
	go func() {
		for i := 0; i < n; i++ {
			r := reads[uint64(i)]
			c.Send(cmdRead, 0, uint64(i), r.off, r.n, nil)
		}
	}()
	for i := 0; i < n; i++ {
		r := c.Recv()
		q, ok := reads[r.Cookie]
		if !ok || r.Errno != 0 {
			t.Fatalf("read reply %v", r)
		}
		delete(reads, r.Cookie)
		if structured && r.Offset != q.off {
			t.Fatalf("chunk offset %d, want %d", r.Offset, q.off)
		}
		if !bytes.Equal(r.Data, want[q.off:q.off+uint64(q.n)]) {
			t.Fatalf("read %d at %d: data mismatch", r.Cookie, q.off)
		}
	}
}

func TestPipelinedSimple(t *testing.T)     { testPipelined(t, false) }
func TestPipelinedStructured(t *testing.T) { testPipelined(t, true) }

func TestCommandsAndFlags(t *testing.T) {
	for _, structured := range []bool{false, true} {
		v := newMemVolume(1 << 20)
		v.record = true
		path := startServer(t, oneExport(v), Options{})
		c := nbdtest.Dial(t, path, structured)
		for i := range v.data {
			v.data[i] = 0xaa
		}
		check := func(r nbdtest.Reply, what string) {
			t.Helper()
			if r.Errno != 0 {
				t.Fatalf("%s: %v", what, r)
			}
			if structured && (len(r.Types) != 1 || r.Types[0] != replyTypeNone) {
				t.Fatalf("%s: chunk types %v, want one NONE", what, r.Types)
			}
		}
		check(c.Do(cmdWrite, cmdFlagFUA, 4096, 4096, bytes.Repeat([]byte{1}, 4096)), "write fua")
		check(c.Do(cmdFlush, 0, 0, 0, nil), "flush")
		check(c.Do(cmdTrim, 0, 8192, 8192, nil), "trim")
		check(c.Do(cmdWriteZeroes, cmdFlagNoHole|cmdFlagFUA, 16384, 4096, nil), "write zeroes")
		check(c.Do(cmdWriteZeroes, 0, 20480, 4096, nil), "write zeroes (hole ok)")
		want := []opRecord{
			{engine.OpWrite, engine.FlagFUA, 4096, 4096},
			{engine.OpFlush, 0, 0, 0},
			{engine.OpDiscard, 0, 8192, 8192},
			{engine.OpWriteZeroes, engine.FlagFUA | engine.FlagNoUnmap, 16384, 4096},
			{engine.OpWriteZeroes, 0, 20480, 4096},
		}
		v.mu.Lock()
		ops := append([]opRecord(nil), v.ops...)
		v.mu.Unlock()
		if len(ops) != len(want) {
			t.Fatalf("ops %v, want %v", ops, want)
		}
		for i := range want {
			if ops[i] != want[i] {
				t.Errorf("op %d = %+v, want %+v", i, ops[i], want[i])
			}
		}
		r := c.Do(cmdRead, 0, 0, 24576, nil)
		exp := bytes.Repeat([]byte{0xaa}, 24576)
		copy(exp[4096:], bytes.Repeat([]byte{1}, 4096))
		clear(exp[8192:24576])
		if r.Errno != 0 || !bytes.Equal(r.Data, exp) {
			t.Fatalf("read back after trim/zero: %v", r)
		}
		if structured && (len(r.Types) != 1 || r.Types[0] != replyTypeOffsetData) {
			t.Fatalf("read chunks %v", r.Types)
		}
		c.Send(cmdDisc, 0, 1, 0, 0, nil)
		c.ExpectEOF()
	}
}

func TestErrorsKeepStreamInSync(t *testing.T) {
	for _, structured := range []bool{false, true} {
		v := newMemVolume(1 << 20)
		path := startServer(t, oneExport(v), Options{MaxPayload: 1 << 20})
		c := nbdtest.Dial(t, path, structured)
		copy(v.data[4096:], "hello")
		cases := []struct {
			name       string
			typ, flags uint16
			off        uint64
			n          uint32
			payload    []byte
			errno      uint32
		}{
			{"read past end", cmdRead, 0, 1 << 20, 4096, nil, errInval},
			{"read straddling end", cmdRead, 0, 1<<20 - 4096, 8192, nil, errInval},
			{"read offset overflow", cmdRead, 0, ^uint64(0) - 4095, 4096, nil, errInval},
			{"read unaligned offset", cmdRead, 0, 512, 4096, nil, errInval},
			{"read unaligned length", cmdRead, 0, 0, 512, nil, errInval},
			{"read zero length", cmdRead, 0, 0, 0, nil, errInval},
			{"write unaligned", cmdWrite, 0, 100, 5000, make([]byte, 5000), errInval},
			{"write past end", cmdWrite, 0, 1 << 20, 4096, make([]byte, 4096), errInval},
			{"write too large", cmdWrite, 0, 0, 1<<20 + 4096, make([]byte, 1<<20+4096), errInval},
			{"unknown command", 42, 0, 0, 4096, nil, errInval},
			{"bad flag", cmdTrim, cmdFlagNoHole, 0, 4096, nil, errInval},
			{"trim unaligned", cmdTrim, 0, 1, 4096, nil, errInval},
			{"read too large", cmdRead, 0, 0, 2 << 20, nil, errInval},
		}
		for _, tc := range cases {
			c.Send(tc.typ, tc.flags, 9, tc.off, tc.n, tc.payload)
			r := c.Recv()
			if r.Cookie != 9 || r.Errno != tc.errno {
				t.Fatalf("%s: %v, want errno %d", tc.name, r, tc.errno)
			}
			if structured && r.Types[0] != replyTypeError {
				t.Fatalf("%s: chunk %v", tc.name, r.Types)
			}
			// The stream is still in sync.
			r = c.Do(cmdRead, 0, 4096, 4096, nil)
			if r.Errno != 0 || string(r.Data[:5]) != "hello" {
				t.Fatalf("after %s: %v", tc.name, r)
			}
		}
		// A write far beyond any sane bound cannot be resynchronised: clean disconnect.
		c.Send(cmdWrite, 0, 9, 0, 1<<31, nil)
		c.ExpectEOF()
		// Bad magic: clean disconnect.
		c = nbdtest.Dial(t, path, structured)
		c.Write(make([]byte, requestSize))
		c.ExpectEOF()
	}
}

func TestReadOnly(t *testing.T) {
	v := newMemVolume(1 << 20)
	path := startServer(t, []Export{{Name: "ro", Volume: v, ReadOnly: true}}, Options{})
	c := nbdtest.Dial(t, path, false)
	if c.Flags&tflagReadOnly == 0 {
		t.Fatalf("flags %#x lack READ_ONLY", c.Flags)
	}
	for _, typ := range []uint16{cmdWrite, cmdTrim, cmdWriteZeroes} {
		var p []byte
		if typ == cmdWrite {
			p = make([]byte, 4096)
		}
		if r := c.Do(typ, 0, 0, 4096, p); r.Errno != errPerm {
			t.Fatalf("cmd %d on read-only export: %v", typ, r)
		}
	}
	if r := c.Do(cmdRead, 0, 0, 4096, nil); r.Errno != 0 {
		t.Fatalf("read: %v", r)
	}
}

func TestVolumeErrorMapping(t *testing.T) {
	for err, want := range map[error]uint32{
		engine.ErrRange: errInval, engine.ErrNoSpace: errNoSpc, engine.ErrReadOnly: errPerm,
		engine.ErrClosed: errShutdown, engine.ErrChecksum: errIO, nil: 0,
	} {
		if got := nbdErrno(err); got != want {
			t.Errorf("nbdErrno(%v) = %d, want %d", err, got, want)
		}
	}
}

func TestManyInFlightOverlap(t *testing.T) {
	v := newMemVolume(testVolSize)
	v.holdUntil = 150 // completions are parked until 150 requests are pending
	path := startServer(t, oneExport(v), Options{})
	c := nbdtest.Dial(t, path, false)
	const n = 200
	go func() {
		for i := 0; i < n; i++ {
			c.Send(cmdRead, 0, uint64(i), uint64(i)*4096, 4096, nil)
		}
	}()
	seen := map[uint64]bool{}
	for i := 0; i < n; i++ {
		r := c.Recv()
		if r.Errno != 0 || seen[r.Cookie] {
			t.Fatalf("reply %v", r)
		}
		seen[r.Cookie] = true
	}
	v.mu.Lock()
	mp := v.maxPending
	v.mu.Unlock()
	if mp < 150 {
		t.Fatalf("max pending in volume %d, want >= 150", mp)
	}
}

func TestBackPressure(t *testing.T) {
	v := newMemVolume(testVolSize)
	v.holdAll = true
	path := startServer(t, oneExport(v), Options{MaxInFlight: 128})
	c := nbdtest.Dial(t, path, false)
	const n = 200
	go func() {
		for i := 0; i < n; i++ {
			c.Send(cmdWrite, 0, uint64(i), uint64(i)*4096, 4096, make([]byte, 4096))
		}
	}()
	deadline := time.Now().Add(5 * time.Second)
	for v.numHeld() < 128 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	time.Sleep(50 * time.Millisecond)
	if h := v.numHeld(); h != 128 {
		t.Fatalf("volume holds %d requests, want exactly MaxInFlight=128", h)
	}
	v.mu.Lock()
	v.holdAll = false
	v.mu.Unlock()
	v.release()
	for i := 0; i < n; i++ {
		if r := c.Recv(); r.Errno != 0 {
			t.Fatalf("reply %v", r)
		}
	}
}

func TestDiscWaitsForInFlight(t *testing.T) {
	v := newMemVolume(1 << 20)
	v.holdAll = true
	path := startServer(t, oneExport(v), Options{})
	c := nbdtest.Dial(t, path, true)
	for i := 0; i < 10; i++ {
		c.Send(cmdWrite, 0, uint64(i), uint64(i)*4096, 4096, bytes.Repeat([]byte{byte(i)}, 4096))
	}
	c.Send(cmdDisc, 0, 99, 0, 0, nil)
	for v.numHeld() < 10 {
		time.Sleep(time.Millisecond)
	}
	time.AfterFunc(50*time.Millisecond, func() {
		v.mu.Lock()
		v.holdAll = false
		v.mu.Unlock()
		v.release()
	})
	for i := 0; i < 10; i++ {
		if r := c.Recv(); r.Errno != 0 || r.Cookie >= 10 {
			t.Fatalf("reply %v", r)
		}
	}
	c.ExpectEOF()
	if v.data[9*4096] != 9 {
		t.Fatal("write not applied")
	}
}

func TestServeCancelDrains(t *testing.T) {
	v := newMemVolume(1 << 20)
	v.holdAll = true
	srv, err := NewServer(oneExport(v), Options{})
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
	c.Send(cmdRead, 0, 5, 0, 4096, nil)
	for v.numHeld() < 1 {
		time.Sleep(time.Millisecond)
	}
	cancel()
	select {
	case <-done:
		t.Fatal("Serve returned with a request in flight")
	case <-time.After(50 * time.Millisecond):
	}
	v.mu.Lock()
	v.holdAll = false
	v.mu.Unlock()
	v.release()
	if r := c.Recv(); r.Cookie != 5 || r.Errno != 0 {
		t.Fatalf("reply %v", r)
	}
	c.ExpectEOF()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Serve did not return")
	}
}

func TestMultiConnSharesVolume(t *testing.T) {
	v := newMemVolume(1 << 20)
	path := startServer(t, oneExport(v), Options{})
	a, b := nbdtest.Dial(t, path, false), nbdtest.Dial(t, path, true)
	if r := a.Do(cmdWrite, 0, 0, 4096, bytes.Repeat([]byte{7}, 4096)); r.Errno != 0 {
		t.Fatal(r)
	}
	if r := b.Do(cmdFlush, 0, 0, 0, nil); r.Errno != 0 {
		t.Fatal(r)
	}
	if r := b.Do(cmdRead, 0, 0, 4096, nil); r.Errno != 0 || r.Data[0] != 7 {
		t.Fatalf("read on second connection: %v", r)
	}
}

func TestListen(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "x.sock")
	l, err := Listen("unix:" + path)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Listen("unix:" + path); err == nil || !strings.Contains(err.Error(), "in use") {
		t.Fatalf("second listen on live socket: %v", err)
	}
	// Leave a stale socket file behind.
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	l.Close()
	if _, err := os.Stat(path); err != nil {
		t.Fatalf("stale socket missing: %v", err)
	}
	l, err = Listen("unix:" + path)
	if err != nil {
		t.Fatalf("listen over stale socket: %v", err)
	}
	l.Close()
	// A regular file is never removed.
	reg := filepath.Join(dir, "file")
	os.WriteFile(reg, nil, 0o600)
	if _, err := Listen("unix:" + reg); err == nil {
		t.Fatal("listen over a regular file succeeded")
	}

	tl, err := Listen("tcp:127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer tl.Close()
	addr := "tcp:" + tl.Addr().String()
	_, err = Listen(addr)
	if err == nil || !strings.Contains(err.Error(), addr+" is in use by another process: pick another --listen") {
		t.Fatalf("tcp port in use: %v", err)
	}
	for _, bad := range []string{"", "udp:1", "unix:", "tcp"} {
		if _, err := Listen(bad); err == nil {
			t.Errorf("Listen(%q) succeeded", bad)
		}
	}
}

func TestNewServerValidates(t *testing.T) {
	v := newMemVolume(1 << 20)
	bad := []struct {
		ex  []Export
		opt Options
	}{
		{nil, Options{}},
		{[]Export{{Name: "a"}}, Options{}},
		{[]Export{{Name: "a", Volume: v}, {Name: "a", Volume: v}}, Options{}},
		{oneExport(v), Options{MaxInFlight: 64}},
		{oneExport(v), Options{MaxPayload: 1000}},
	}
	for i, b := range bad {
		if _, err := NewServer(b.ex, b.opt); err == nil {
			t.Errorf("case %d: NewServer succeeded", i)
		}
	}
}

func TestServeListenerFailure(t *testing.T) {
	v := newMemVolume(1 << 20)
	srv, err := NewServer(oneExport(v), Options{})
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "f.sock")
	l, err := Listen("unix:" + path)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(context.Background(), l) }()
	c := nbdtest.Dial(t, path, false)
	if r := c.Do(cmdRead, 0, 0, 4096, nil); r.Errno != 0 {
		t.Fatal(r)
	}
	l.Close() // the listener fails underneath Serve
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("Serve returned nil after its listener failed")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Serve did not return after its listener failed")
	}
	c.ExpectEOF()
}

// TestDirectRepliesSocketFull sends reads one at a time (so each completes
// with nothing else in flight and its reply is written directly) without
// reading the replies until the socket is full: the direct writes hit EAGAIN
// and hand their tail to the writer goroutine. Every reply must still arrive
// whole and in one piece.
func TestDirectRepliesSocketFull(t *testing.T) {
	for _, structured := range []bool{false, true} {
		v := newMemVolume(testVolSize)
		for i := range v.data {
			v.data[i] = byte(i*7 + i>>12)
		}
		path := startServer(t, oneExport(v), Options{})
		c := nbdtest.Dial(t, path, structured)
		const n, size = 96, 64 << 10 // 6 MiB of replies, far above the socket buffer
		for i := 0; i < n; i++ {
			off := uint64(i%(testVolSize/size)) * size
			c.Send(cmdRead, 0, uint64(i), off, size, nil)
			time.Sleep(200 * time.Microsecond)
		}
		for i := 0; i < n; i++ {
			r := c.Recv()
			if r.Errno != 0 {
				t.Fatalf("structured=%v: reply %v", structured, r)
			}
			off := (r.Cookie % (testVolSize / size)) * size
			if !bytes.Equal(r.Data, v.data[off:off+size]) {
				t.Fatalf("structured=%v: read %d: data mismatch", structured, r.Cookie)
			}
		}
	}
}
