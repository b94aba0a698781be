package crc32c

import (
	"hash/crc32"
	"math/rand/v2"
	"testing"
)

func TestSameAsLibrary(t *testing.T) {
	tab := crc32.MakeTable(crc32.Castagnoli)
	r := rand.New(rand.NewPCG(1, 2))
	for n := range 300 {
		b := make([]byte, n*17%5000)
		for i := range b {
			b[i] = byte(r.Uint32())
		}
		want := crc32.Checksum(b, tab)
		if got := Software(b); got != want {
			t.Fatalf("len %d: Software %#x, want %#x", len(b), got, want)
		}
		if got := Checksum(b); got != want {
			t.Fatalf("len %d: Checksum (%s) %#x, want %#x", len(b), Implementation(), got, want)
		}
	}
	t.Logf("Checksum uses %s", Implementation())
}

func FuzzSoftware(f *testing.F) {
	f.Add([]byte("123456789"))
	tab := crc32.MakeTable(crc32.Castagnoli)
	f.Fuzz(func(t *testing.T, b []byte) {
		if Software(b) != crc32.Checksum(b, tab) {
			t.Fatal("Software differs from hash/crc32")
		}
	})
}

func BenchmarkChecksum4K(b *testing.B) {
	blk := make([]byte, 4096)
	for _, c := range []struct {
		name string
		f    func([]byte) uint32
	}{{"library", Library}, {"software", Software}, {"chosen", Checksum}} {
		b.Run(c.name, func(b *testing.B) {
			b.SetBytes(4096)
			for b.Loop() {
				c.f(blk)
			}
		})
	}
}
