// Package crc32c computes CRC-32C (Castagnoli) checksums with whichever
// implementation is fastest on the CPU the process runs on.
//
// On real x86-64 and arm64 hardware that is the CRC32 instruction used by
// hash/crc32 (≈0.15 µs per 4 KiB here). Under an emulator such as qemu TCG the
// instruction is emulated slowly (measured 37 µs per 4 KiB in the test VMs)
// while a table-driven slicing-by-8 loop runs at about 10 µs. The choice is
// made once per process, on first use, by timing both on a 4 KiB block; both
// compute the same function, so checksums never depend on the choice.
package crc32c

import (
	"encoding/binary"
	"hash/crc32"
	"sync"
	"time"
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// slicing8 holds the 8 tables of the software implementation.
var slicing8 = sync.OnceValue(func() *[8][256]uint32 {
	var t [8][256]uint32
	for i := range 256 {
		crc := uint32(i)
		for range 8 {
			if crc&1 == 1 {
				crc = crc>>1 ^ crc32.Castagnoli
			} else {
				crc >>= 1
			}
		}
		t[0][i] = crc
	}
	for i := range 256 {
		crc := t[0][i]
		for j := 1; j < 8; j++ {
			crc = t[0][crc&0xff] ^ crc>>8
			t[j][i] = crc
		}
	}
	return &t
})

// Library is hash/crc32's Castagnoli checksum (hardware when the CPU has it).
func Library(b []byte) uint32 { return crc32.Checksum(b, castagnoli) }

// Software is a table-driven slicing-by-8 CRC-32C.
func Software(b []byte) uint32 {
	t := slicing8()
	crc := ^uint32(0)
	for len(b) >= 8 {
		crc ^= binary.LittleEndian.Uint32(b)
		hi := binary.LittleEndian.Uint32(b[4:])
		crc = t[0][hi>>24] ^ t[1][hi>>16&0xff] ^ t[2][hi>>8&0xff] ^ t[3][hi&0xff] ^
			t[4][crc>>24] ^ t[5][crc>>16&0xff] ^ t[6][crc>>8&0xff] ^ t[7][crc&0xff]
		b = b[8:]
	}
	for _, c := range b {
		crc = t[0][byte(crc)^c] ^ crc>>8
	}
	return ^crc
}

// fastest times both implementations on a 4 KiB block and returns the
// faster, with its name.
func fastest() choice {
	var blk [4096]byte
	for i := range blk {
		blk[i] = byte(i * 7)
	}
	best := func(f func([]byte) uint32) time.Duration {
		m := time.Duration(1 << 62)
		for range 5 {
			start := time.Now()
			for range 8 {
				f(blk[:])
			}
			if d := time.Since(start); d < m {
				m = d
			}
		}
		return m
	}
	lib, sw := best(Library), best(Software)
	if sw < lib*3/4 {
		return choice{Software, "software slicing-by-8"}
	}
	return choice{Library, "hash/crc32"}
}

type choice struct {
	f    func([]byte) uint32
	name string
}

var chosen = sync.OnceValue(fastest)

// Checksum returns the CRC-32C of b with the fastest implementation.
func Checksum(b []byte) uint32 { return chosen().f(b) }

// Implementation names the implementation Checksum uses.
func Implementation() string { return chosen().name }
