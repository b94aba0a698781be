package ring

// The hashes here are part of the placement contract: every process, on
// every machine and with every build, must compute the same ring positions
// and the same chunk keys, or replicas would be looked for on the wrong
// nodes. They are therefore fixed functions written out here (no seeding, no
// hash/maphash, no dependence on map order). Changing any constant moves
// (almost) every chunk; the golden-value tests pin them.

// golden is the splitmix64 increment, 2^64 / phi.
const golden = 0x9e3779b97f4a7c15

// mix64 is the splitmix64 finalizer (Stafford variant 13): a bijection on
// uint64 with full avalanche.
func mix64(x uint64) uint64 {
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	x ^= x >> 31
	return x
}

// ChunkKey is the ring key of the chunk store.ChunkID{volume, index, snap}.
// It is a fixed function of its arguments: the same on every process,
// machine and build.
func ChunkKey(volume, index, snap uint64) uint64 {
	h := mix64(volume + golden)
	h = mix64((h ^ index) + golden)
	return mix64((h ^ snap) + golden)
}

// hashString is 64-bit FNV-1a followed by mix64 (FNV alone avalanches
// poorly in the high bits, which decide ring positions).
func hashString(s string) uint64 {
	h := uint64(0xcbf29ce484222325)
	for i := 0; i < len(s); i++ {
		h ^= uint64(s[i])
		h *= 0x100000001b3
	}
	return mix64(h)
}

// vnodePos is the ring position of virtual node i of the node whose ID hashes
// to idHash: the i-th output of a splitmix64 generator seeded with idHash.
// Positions of a node's first k vnodes do not depend on how many it has, so
// growing a node's capacity only adds vnodes.
func vnodePos(idHash uint64, i int) uint64 {
	return mix64(idHash + uint64(i+1)*golden)
}
