package ring

import (
	"bytes"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"slices"
	"testing"
)

func TestMarshalRoundTrip(t *testing.T) {
	for _, ns := range [][]Node{nil, flat(1), topo(3, 3, 2), {
		{ID: "a", Zone: "", Host: "", Capacity: 1},
		{ID: "ü-ñ", Zone: "zone with spaces", Host: "h", Capacity: 1 << 50},
	}} {
		r := mustNew(t, ns, Options{Version: 42})
		b, err := r.MarshalBinary()
		if err != nil {
			t.Fatal(err)
		}
		var got Ring
		if err := got.UnmarshalBinary(b); err != nil {
			t.Fatalf("UnmarshalBinary: %v", err)
		}
		if got.Version() != 42 || got.Options() != r.Options() {
			t.Fatalf("options %+v, want %+v", got.Options(), r.Options())
		}
		if !slices.Equal(got.Nodes(), r.Nodes()) || !slices.Equal(got.pos, r.pos) || !slices.Equal(got.owner, r.owner) {
			t.Fatal("decoded ring differs")
		}
		b2, _ := got.MarshalBinary()
		if !bytes.Equal(b, b2) {
			t.Fatal("re-encoding differs")
		}
	}
}

func TestUnmarshalErrors(t *testing.T) {
	r := mustNew(t, topo(2, 2, 1), Options{})
	good, _ := r.MarshalBinary()
	fix := func(b []byte) []byte { // recompute the CRC after tampering
		body := b[:len(b)-4]
		binary.LittleEndian.PutUint32(b[len(b)-4:], crc32.Checksum(body, castagnoli))
		return b
	}
	for _, c := range []struct {
		name string
		b    []byte
		want error
	}{
		{"empty", nil, ErrCorrupt},
		{"truncated", good[:len(good)-1], ErrCorrupt},
		{"bit flip", func() []byte { b := slices.Clone(good); b[30] ^= 1; return b }(), ErrCorrupt},
		{"magic", fix(append([]byte("XXXX"), good[4:]...)), ErrCorrupt},
		{"huge count", func() []byte {
			b := slices.Clone(good)
			binary.LittleEndian.PutUint32(b[24:], 1<<31)
			return fix(b)
		}(), ErrCorrupt},
		{"trailing", func() []byte {
			b := slices.Clone(good[:len(good)-4])
			b = append(b, 0, 0, 0, 0, 0)
			return fix(b)
		}(), ErrCorrupt},
	} {
		var got Ring
		if err := got.UnmarshalBinary(c.b); !errors.Is(err, c.want) {
			t.Errorf("%s: err = %v, want %v", c.name, err, c.want)
		}
	}
	// Valid framing, invalid ring: duplicate IDs are rejected by New.
	dup := mustNew(t, []Node{{ID: "a", Capacity: 1}, {ID: "b", Capacity: 1}}, Options{})
	b, _ := dup.MarshalBinary()
	i := bytes.LastIndex(b, []byte{1, 'b'})
	b[i+1] = 'a'
	var got Ring
	if err := got.UnmarshalBinary(fix(b)); err == nil {
		t.Error("duplicate IDs decoded")
	}
}

// FuzzUnmarshalBinary: never panics; whatever decodes re-encodes stably.
// The fuzzer's input has its CRC fixed up when fixcrc is set, so mutations
// reach the parser instead of dying at the checksum.
func FuzzUnmarshalBinary(f *testing.F) {
	for _, ns := range [][]Node{nil, flat(2), topo(2, 2, 1)} {
		r := mustNew(f, ns, Options{Version: 3})
		b, _ := r.MarshalBinary()
		f.Add(b, true)
		f.Add(b, false)
	}
	f.Fuzz(func(t *testing.T, b []byte, fixcrc bool) {
		if fixcrc && len(b) >= 4 {
			binary.LittleEndian.PutUint32(b[len(b)-4:], crc32.Checksum(b[:len(b)-4], castagnoli))
		}
		var r Ring
		if err := r.UnmarshalBinary(b); err != nil {
			return
		}
		b1, _ := r.MarshalBinary()
		var r2 Ring
		if err := r2.UnmarshalBinary(b1); err != nil {
			t.Fatalf("re-decode: %v", err)
		}
		b2, _ := r2.MarshalBinary()
		if !bytes.Equal(b1, b2) {
			t.Fatal("encoding not stable")
		}
		dst := r.Owners(ChunkKey(1, 2, 3), 3, nil)
		if len(dst) != min(3, r.Len()) {
			t.Fatalf("%d owners", len(dst))
		}
	})
}
