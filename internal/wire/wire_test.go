package wire

import (
	"errors"
	"testing"
)

func TestRoundTrip(t *testing.T) {
	h := Header{Volume: 1<<63 | 5, Index: 1234567, Epoch: 99, Off: 8 * BlockSize, Len: 504 * BlockSize,
		Flags: FlagFUA | FlagNoUnmap | FlagCopy, Snap: 1<<24 - 1, VerEpoch: 7, VerSeq: 1<<63 + 1}
	var b [HeaderSize]byte
	h.Encode(&b)
	var g Header
	if err := Decode(OpWrite, &b, &g); err != nil {
		t.Fatal(err)
	}
	if g != h {
		t.Fatalf("decoded %+v, want %+v", g, h)
	}
	if e, q := Version(&b); e != h.VerEpoch || q != h.VerSeq {
		t.Fatalf("Version = %d.%d, want %d.%d", e, q, h.VerEpoch, h.VerSeq)
	}
}

func TestDecodeRejects(t *testing.T) {
	for _, tc := range []struct {
		name string
		op   Op
		h    Header
	}{
		{"unknown op", 0, Header{Len: BlockSize}},
		{"unknown op 8", 8, Header{Len: BlockSize}},
		{"zero length read", OpRead, Header{}},
		{"past the largest chunk", OpWrite, Header{Off: MaxChunk - BlockSize, Len: 2 * BlockSize}},
		{"unknown flag", OpRead, Header{Len: BlockSize, Flags: 8}},
		{"copy flag on a read", OpRead, Header{Len: BlockSize, Flags: FlagCopy}},
		{"copy flag on a discard", OpDiscard, Header{Len: BlockSize, Flags: FlagCopy}},
	} {
		var b [HeaderSize]byte
		tc.h.Encode(&b)
		var g Header
		if err := Decode(tc.op, &b, &g); !errors.Is(err, ErrMalformed) {
			t.Errorf("%s: err %v, want ErrMalformed", tc.name, err)
		}
	}
	// Flush, fence and hello carry no range.
	var b [HeaderSize]byte
	var g Header
	for _, op := range []Op{OpFlush, OpFence, OpHello} {
		if err := Decode(op, &b, &g); err != nil {
			t.Errorf("%v with empty header: %v", op, err)
		}
	}
}

// FuzzDecode feeds arbitrary peer bytes to Decode: it must never panic, and
// what it accepts must satisfy the header invariants and re-encode to the
// same bytes.
func FuzzDecode(f *testing.F) {
	seed := Header{Volume: 3, Index: 7, Epoch: 2, Off: 4096, Len: 8192, Flags: FlagFUA | FlagCopy, VerEpoch: 2, VerSeq: 9}
	var b [HeaderSize]byte
	seed.Encode(&b)
	f.Add(uint8(OpWrite), b[:])
	f.Add(uint8(OpFence), make([]byte, HeaderSize))
	f.Add(uint8(OpHello), make([]byte, HeaderSize))
	f.Add(uint8(0xff), []byte{1, 2, 3})
	f.Fuzz(func(t *testing.T, op uint8, data []byte) {
		var b [HeaderSize]byte
		copy(b[:], data)
		var h Header
		if err := Decode(Op(op), &b, &h); err != nil {
			return
		}
		if err := CheckPayload(Op(op), &h, len(data)-min(len(data), HeaderSize)); err == nil &&
			Op(op) == OpWrite && len(data)-HeaderSize != int(h.Len) {
			t.Fatalf("payload of %d accepted for %+v", len(data)-HeaderSize, h)
		}
		if h.Off%BlockSize != 0 || h.Len%BlockSize != 0 || h.Flags&^flagsKnown != 0 || h.Snap >= 1<<24 ||
			h.Flags&FlagCopy != 0 && Op(op) != OpWrite && Op(op) != OpWriteZeroes {
			t.Fatalf("accepted bad header %+v", h)
		}
		switch Op(op) {
		case OpRead, OpWrite, OpDiscard, OpWriteZeroes:
			if h.Len == 0 || h.Off+h.Len > MaxChunk {
				t.Fatalf("accepted bad range %+v", h)
			}
			var c [HeaderSize]byte
			h.Encode(&c)
			if c != b {
				t.Fatalf("re-encode differs: %x vs %x", c, b)
			}
		}
	})
}
