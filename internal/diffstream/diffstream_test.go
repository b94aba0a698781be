package diffstream

import (
	"bytes"
	"errors"
	"io"
	"testing"
)

func sample(t testing.TB) []byte {
	var b bytes.Buffer
	w, err := NewWriter(&b, Header{Size: 1 << 20, BlockSize: 4096, From: "a", To: "b"})
	if err != nil {
		t.Fatal(err)
	}
	if err := w.Data(0, bytes.Repeat([]byte{7}, 8192)); err != nil {
		t.Fatal(err)
	}
	if err := w.Zeros(65536, 4096); err != nil {
		t.Fatal(err)
	}
	if err := w.Data(1<<20-4096, bytes.Repeat([]byte{9}, 4096)); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// A written diff reads back record for record; every flipped bit and every
// truncation is an error, never a different diff.
func TestRoundTripAndDamage(t *testing.T) {
	b := sample(t)
	r, err := NewReader(bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	if h := r.Header(); h.From != "a" || h.To != "b" || h.Size != 1<<20 {
		t.Fatalf("header %+v", h)
	}
	var got []Record
	for {
		rec, err := r.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		rec.Data = append([]byte(nil), rec.Data...)
		got = append(got, rec)
	}
	if len(got) != 3 || got[0].Len != 8192 || got[0].Data[0] != 7 || got[1].Kind != KindZeros || got[2].Offset != 1<<20-4096 {
		t.Fatalf("records %+v", got)
	}
	readAll := func(b []byte) error {
		r, err := NewReader(bytes.NewReader(b))
		if err != nil {
			return err
		}
		for {
			if _, err := r.Next(); err != nil {
				if err == io.EOF {
					return nil
				}
				return err
			}
		}
	}
	for i := 0; i < len(b); i++ {
		for _, bit := range []byte{1, 0x80} {
			c := append([]byte(nil), b...)
			c[i] ^= bit
			if err := readAll(c); !errors.Is(err, ErrFormat) {
				t.Fatalf("bit %#x of byte %d flipped: %v", bit, i, err)
			}
		}
	}
	for n := 0; n < len(b); n++ {
		if err := readAll(b[:n]); !errors.Is(err, ErrFormat) {
			t.Fatalf("truncated to %d bytes: %v", n, err)
		}
	}
	if err := readAll(append(append([]byte(nil), b...), 0)); !errors.Is(err, ErrFormat) {
		t.Fatalf("a byte after the end: %v", err)
	}
}

func FuzzReader(f *testing.F) {
	f.Add(sample(f))
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := NewReader(bytes.NewReader(b))
		if err != nil {
			return
		}
		for i := 0; i < 1<<16; i++ {
			rec, err := r.Next()
			if err != nil {
				return
			}
			if rec.Offset+rec.Len > r.Header().Size || (rec.Kind == KindData && uint64(len(rec.Data)) != rec.Len) {
				t.Fatalf("record %+v past the volume or with wrong data length", rec)
			}
		}
	})
}
