// Package ring places chunks on storage nodes with a consistent hash ring.
//
// Every node gets a number of virtual nodes (vnodes) proportional to its
// Capacity; vnode i of node n sits at position hash(n.ID, i) on a 64-bit
// circle. A chunk's key is ChunkKey(volume, index, snap). Its owners are found
// by walking the circle clockwise from the key (the first vnode at a position
// >= key, wrapping around):
//
// Placement rule. Owners are chosen one after another. For each owner the
// rule in force is the strongest of these that can still be satisfied:
//
//  1. zone: while some zone holds no owner yet, the next owner is the first
//     node on the walk whose zone holds no owner yet;
//  2. host: else, while some host holds no owner yet, the first node on the
//     walk whose host holds no owner yet;
//  3. node: else the first node on the walk that is not an owner yet.
//
// Each rule's walk starts at the key; within one rule the walk resumes after
// the previous owner chosen under that rule (nodes passed over stay
// ineligible, since the set of owners only grows). A host is identified by
// the pair (Zone, Host), so equal Host names in different zones are different
// hosts. Consequences:
//
//   - the first owner (the primary) is always the node of the first vnode
//     clockwise from the key;
//   - with Z zones and H hosts, a chunk with R owners has min(R, Z) zones and
//     min(R, H) hosts among its owners, and R distinct owners if R <= nodes;
//   - with fewer than R nodes, every node is an owner (Owners returns fewer
//     than R entries, never duplicates, never an error);
//   - with R=1, adding a node moves exactly the keys whose first vnode is now
//     one of the new node's, about Capacity(new)/Capacity(total) of them;
//     removing a node moves only the keys it owned;
//   - for any R, removing a node that is not the last of its zone or host
//     leaves the owners (and their order) of every key it did not own
//     unchanged; adding a node changes only the owner sets it joins, plus
//     any other set whose zone or host count the addition changes.
//
// Weighting is exact for the primary (R=1: a node's share of keys is its
// share of vnodes, so of Capacity). For R>1 a node holds at most one replica
// of a chunk, so replicas are drawn without replacement and shares compress
// toward equal: measured, a 2x node among ten gets 1.63x the mean load at
// R=3 (see TestWeighting). Keep weights within a small range, or correct the
// Capacity given to New.
//
// Zone spreading has a price when zones differ in capacity: every zone owns
// one replica of (nearly) every chunk when R >= zones, so a small zone's
// nodes carry more than their capacity share. Capacity weighting is exact
// only within a zone, or across zones of equal capacity.
//
// Cost: a lookup is a table-indexed search for the key's vnode and, per
// owner, a walk of at most 16 vnodes; when the eligible domains are rare on
// the ring (say a new zone with one small node) it then looks up the next
// vnode of every eligible domain (binary search per domain), so a lookup
// never walks the whole ring. Memory is about 40 bytes per vnode.
//
// A Ring is immutable and safe for concurrent use; a new ring version is a new
// Ring (see Ring.Next). Rings serialise with MarshalBinary so that the current
// one can be kept in a CAS store; the Version travels along.
package ring

// Invariants of a Ring (established by New, never changed afterwards):
//   - nodes is sorted by ID; IDs are unique and non-empty; Capacity > 0.
//   - pos is sorted ascending; owner[i] is the node index of the vnode at
//     pos[i]; ties in pos are ordered by node index, so the order of vnodes is
//     a function of the node list alone (not of its input order).
//   - every node has at least one vnode; vnode counts depend only on the
//     node's own Capacity and the resolved Options (Unit, VNodesPerUnit),
//     never on the other nodes, so rings built with the same Options move the
//     fewest chunks between versions.
//   - lut[b] is the index of the first vnode with pos >= b<<(64-lutBits)
//     (len(pos) when none); lut has 1<<lutBits + 1 entries, the last being
//     len(pos). search(key) is therefore a short forward scan from lut[b].
//   - zone[n] in [0, nZones), host[n] in [0, nHosts); host indices are per
//     (Zone, Host) pair, so equal host indices imply equal zone indices.
//   - byDomain[rule] lists every vnode index once, grouped by the domain
//     (zone, host, node) of its node, ascending within the group; every
//     domain has at least one vnode (every node has one).

import (
	"cmp"
	"errors"
	"fmt"
	"math/bits"
	"slices"
)

// Limits enforced by New (and so by UnmarshalBinary).
const (
	// MaxNodes is the largest number of nodes in a ring.
	MaxNodes = 1 << 16
	// MaxVNodes is the largest total number of vnodes in a ring.
	MaxVNodes = 1 << 21
	// MaxNameLen is the longest ID, Zone or Host, in bytes.
	MaxNameLen = 1024
	// DefaultVNodesPerUnit is used when Options.VNodesPerUnit is zero.
	DefaultVNodesPerUnit = 128
)

// Node is one storage node.
type Node struct {
	// ID names the node; unique in a ring, not empty. Vnode positions are a
	// function of the ID, so a node keeps its place across ring versions.
	ID string
	// Zone is the failure domain (rack, room, region); may be empty, which
	// is a zone like any other.
	Zone string
	// Host is the machine; several nodes (disks) may share one. Hosts are
	// told apart by (Zone, Host).
	Host string
	// Capacity is the node's weight, in bytes or any unit; must be > 0.
	Capacity uint64
}

// Options tune how a Ring is built.
type Options struct {
	// Version of the ring; carried along unchanged (Ring.Next adds one).
	Version uint64
	// Unit is the Capacity that gets VNodesPerUnit vnodes: a node gets
	// ceil(Capacity*VNodesPerUnit/Unit) vnodes, at least one. Zero means the
	// mean Capacity of the nodes given to New; Ring.Options reports the value
	// used. Keep Unit fixed across ring versions (Ring.Next does), or every
	// node's vnode count changes and many more chunks move.
	Unit uint64
	// VNodesPerUnit is the vnode count of a node of Capacity Unit; zero means
	// DefaultVNodesPerUnit. More vnodes balance better and use more memory
	// (about 40 bytes per vnode, lookup tables included).
	VNodesPerUnit uint32
}

// Ring is an immutable consistent hash ring. The zero Ring is empty; use New
// or UnmarshalBinary.
type Ring struct {
	opt   Options
	nodes []Node

	zone   []uint32 // per node
	host   []uint32 // per node
	nZones int
	nHosts int

	pos     []uint64 // sorted vnode positions
	owner   []uint32 // node index per vnode
	lut     []uint32
	lutBits uint

	// For each rule, the vnode indices grouped by domain (zone, host or
	// node), ascending within a domain: domain k of rule d has
	// byDomain[d][domOff[d][k]:domOff[d][k+1]].
	byDomain [3][]uint32
	domOff   [3][]uint32
}

// New builds a ring of nodes. The order of nodes does not matter. It fails on
// an empty or duplicate ID, a zero Capacity, names longer than MaxNameLen,
// more than MaxNodes nodes, or more than MaxVNodes vnodes (raise Unit).
// An empty node list makes an empty ring, which owns nothing.
func New(nodes []Node, opt Options) (*Ring, error) {
	if len(nodes) > MaxNodes {
		return nil, fmt.Errorf("ring: %d nodes, more than %d", len(nodes), MaxNodes)
	}
	ns := slices.Clone(nodes)
	slices.SortFunc(ns, func(a, b Node) int { return cmp.Compare(a.ID, b.ID) })
	for i, n := range ns {
		switch {
		case n.ID == "":
			return nil, errors.New("ring: node with empty ID")
		case i > 0 && ns[i-1].ID == n.ID:
			return nil, fmt.Errorf("ring: duplicate node ID %q", n.ID)
		case n.Capacity == 0:
			return nil, fmt.Errorf("ring: node %q has zero capacity", n.ID)
		case len(n.ID) > MaxNameLen || len(n.Zone) > MaxNameLen || len(n.Host) > MaxNameLen:
			return nil, fmt.Errorf("ring: node %.32q: name longer than %d bytes", n.ID, MaxNameLen)
		}
	}
	if opt.VNodesPerUnit == 0 {
		opt.VNodesPerUnit = DefaultVNodesPerUnit
	}
	if opt.Unit == 0 && len(ns) > 0 {
		var hi, lo uint64
		for _, n := range ns {
			var c uint64
			lo, c = bits.Add64(lo, n.Capacity, 0)
			hi += c
		}
		// hi < len(ns) because every Capacity < 2^64.
		opt.Unit, _ = bits.Div64(hi, lo, uint64(len(ns)))
	}
	r := &Ring{opt: opt, nodes: ns}

	counts := make([]int, len(ns))
	total := 0
	for i, n := range ns {
		c, err := vnodeCount(n.Capacity, opt)
		if err != nil {
			return nil, fmt.Errorf("ring: node %q: %w", n.ID, err)
		}
		if total += c; total > MaxVNodes {
			return nil, fmt.Errorf("ring: more than %d vnodes (Unit %d, VNodesPerUnit %d): raise Unit", MaxVNodes, opt.Unit, opt.VNodesPerUnit)
		}
		counts[i] = c
	}

	r.indexDomains()

	type vnode struct {
		pos  uint64
		node uint32
	}
	vs := make([]vnode, 0, total)
	for i, n := range ns {
		h := hashString(n.ID)
		for j := range counts[i] {
			vs = append(vs, vnode{vnodePos(h, j), uint32(i)})
		}
	}
	slices.SortFunc(vs, func(a, b vnode) int {
		if c := cmp.Compare(a.pos, b.pos); c != 0 {
			return c
		}
		return cmp.Compare(a.node, b.node)
	})
	r.pos = make([]uint64, len(vs))
	r.owner = make([]uint32, len(vs))
	for i, v := range vs {
		r.pos[i], r.owner[i] = v.pos, v.node
	}
	r.buildLUT()
	r.buildDomains()
	return r, nil
}

// vnodeCount is ceil(capacity*VNodesPerUnit/Unit), at least 1.
func vnodeCount(capacity uint64, opt Options) (int, error) {
	hi, lo := bits.Mul64(capacity, uint64(opt.VNodesPerUnit))
	if hi >= opt.Unit {
		return 0, fmt.Errorf("capacity %d too large for Unit %d", capacity, opt.Unit)
	}
	q, rem := bits.Div64(hi, lo, opt.Unit)
	if rem != 0 {
		q++
	}
	if q > MaxVNodes {
		return 0, fmt.Errorf("capacity %d needs %d vnodes, more than %d: raise Unit", capacity, q, MaxVNodes)
	}
	return max(int(q), 1), nil
}

// indexDomains numbers zones and (zone, host) pairs in order of first
// appearance in the (sorted) node list.
func (r *Ring) indexDomains() {
	type hostKey struct{ zone, host string }
	zones := make(map[string]uint32)
	hosts := make(map[hostKey]uint32)
	r.zone = make([]uint32, len(r.nodes))
	r.host = make([]uint32, len(r.nodes))
	for i, n := range r.nodes {
		z, ok := zones[n.Zone]
		if !ok {
			z = uint32(len(zones))
			zones[n.Zone] = z
		}
		k := hostKey{n.Zone, n.Host}
		h, ok := hosts[k]
		if !ok {
			h = uint32(len(hosts))
			hosts[k] = h
		}
		r.zone[i], r.host[i] = z, h
	}
	r.nZones, r.nHosts = len(zones), len(hosts)
}

// buildLUT fills lut so that search needs no binary search: about one
// bucket per vnode, so the scan from lut[b] is about one step long.
func (r *Ring) buildLUT() {
	b := uint(bits.Len(uint(len(r.pos))))
	b = max(b, 1)
	r.lutBits = b
	r.lut = make([]uint32, 1<<b+1)
	i := 0
	for k := range 1 << b {
		lower := uint64(k) << (64 - b)
		for i < len(r.pos) && r.pos[i] < lower {
			i++
		}
		r.lut[k] = uint32(i)
	}
	r.lut[1<<b] = uint32(len(r.pos))
}

// search returns the index of the first vnode with pos >= key, wrapping to 0.
// The ring must not be empty.
func (r *Ring) search(key uint64) int {
	b := key >> (64 - r.lutBits)
	i, end := int(r.lut[b]), int(r.lut[b+1])
	pos := r.pos[:end]
	for i < len(pos) && pos[i] < key {
		i++
	}
	if i == len(r.pos) {
		return 0
	}
	return i
}

// Rule strengths, strongest first.
const (
	ruleZone = iota
	ruleHost
	ruleNode
)

// OwnerIndices appends to dst[:0] the indices (into Nodes) of the owners of
// key, at most n of them, and returns it; see the package comment for the
// rule. It returns min(n, Len()) distinct indices and does not allocate when
// dst has that capacity.
func (r *Ring) OwnerIndices(key uint64, n int, dst []int) []int {
	dst = dst[:0]
	n = min(n, len(r.nodes))
	if n <= 0 {
		return dst
	}
	nv := len(r.pos)
	start := r.search(key)
	// The primary is the first vnode's node under every rule.
	first := int(r.owner[start])
	dst = append(dst, first)
	zones, hosts := 1, 1
	rule, i := ruleZone, start+1
	for len(dst) < n {
		want := ruleNode
		if zones < r.nZones {
			want = ruleZone
		} else if hosts < r.nHosts {
			want = ruleHost
		}
		if want != rule {
			rule, i = want, start
		}
		// Walk a few vnodes; if the eligible domains are rare on the ring,
		// jump to the first vnode of each eligible domain instead. Both
		// find the first eligible vnode from i.
		c := -1
		for range walkSteps {
			if i >= nv {
				i = 0
			}
			n := int(r.owner[i])
			i++
			if r.eligible(n, rule, dst) {
				c = n
				break
			}
		}
		if c < 0 {
			if i >= nv {
				i = 0
			}
			g := r.nextEligible(rule, i, dst)
			c, i = int(r.owner[g]), g+1
		}
		dst = append(dst, c)
		if rule != ruleNode {
			hosts++
			if rule == ruleZone {
				zones++
			}
		}
	}
	return dst
}

// walkSteps is how many vnodes OwnerIndices walks before it looks the next
// eligible vnode up per domain (nextEligible).
const walkSteps = 16

// domainOf returns node c's domain under rule.
func (r *Ring) domainOf(rule, c int) int {
	switch rule {
	case ruleZone:
		return int(r.zone[c])
	case ruleHost:
		return int(r.host[c])
	}
	return c
}

// nextEligible returns the index of the first vnode at or after i (cyclic)
// whose node is eligible under rule: for every domain not holding an owner
// yet, its first vnode at or after i, whichever comes first. An eligible
// domain exists whenever OwnerIndices calls it.
func (r *Ring) nextEligible(rule, i int, owners []int) int {
	nv := len(r.pos)
	by, off := r.byDomain[rule], r.domOff[rule]
	best, bestDist := -1, nv
	for k := range len(off) - 1 {
		used := false
		for _, o := range owners {
			if r.domainOf(rule, o) == k {
				used = true
				break
			}
		}
		if used {
			continue
		}
		sub := by[off[k]:off[k+1]]
		j, _ := slices.BinarySearch(sub, uint32(i))
		if j == len(sub) {
			j = 0
		}
		g := int(sub[j])
		d := g - i
		if d < 0 {
			d += nv
		}
		if d < bestDist {
			best, bestDist = g, d
		}
	}
	if best < 0 {
		panic("ring: no eligible owner")
	}
	return best
}

// buildDomains fills byDomain and domOff.
func (r *Ring) buildDomains() {
	ndom := [3]int{r.nZones, r.nHosts, len(r.nodes)}
	for rule := range 3 {
		off := make([]uint32, ndom[rule]+1)
		for _, n := range r.owner {
			off[r.domainOf(rule, int(n))+1]++
		}
		for k := 1; k < len(off); k++ {
			off[k] += off[k-1]
		}
		next := slices.Clone(off[:len(off)-1])
		by := make([]uint32, len(r.owner))
		for g, n := range r.owner {
			k := r.domainOf(rule, int(n))
			by[next[k]] = uint32(g)
			next[k]++
		}
		r.byDomain[rule], r.domOff[rule] = by, off
	}
}

// eligible reports whether node c may be the next owner under rule, given
// the owners so far.
func (r *Ring) eligible(c, rule int, owners []int) bool {
	switch rule {
	case ruleZone:
		z := r.zone[c]
		for _, o := range owners {
			if r.zone[o] == z {
				return false
			}
		}
	case ruleHost:
		h := r.host[c]
		for _, o := range owners {
			if r.host[o] == h {
				return false
			}
		}
	default:
		for _, o := range owners {
			if o == c {
				return false
			}
		}
	}
	return true
}

// Owners appends to dst[:0] the IDs of the owners of key, at most n of them,
// and returns it: the IDs of OwnerIndices, in the same order (the first is the
// primary). It does not allocate when dst has capacity min(n, Len()) and
// min(n, Len()) <= 16.
func (r *Ring) Owners(key uint64, n int, dst []string) []string {
	var buf [16]int
	var idx []int
	if min(n, len(r.nodes)) <= len(buf) {
		idx = r.OwnerIndices(key, n, buf[:0])
	} else {
		idx = r.OwnerIndices(key, n, nil)
	}
	dst = dst[:0]
	for _, i := range idx {
		dst = append(dst, r.nodes[i].ID)
	}
	return dst
}

// Primary returns the index (into Nodes) of the first owner of key, or -1 if
// the ring is empty.
func (r *Ring) Primary(key uint64) int {
	if len(r.pos) == 0 {
		return -1
	}
	return int(r.owner[r.search(key)])
}

// Len returns the number of nodes.
func (r *Ring) Len() int { return len(r.nodes) }

// VNodes returns the total number of vnodes.
func (r *Ring) VNodes() int { return len(r.pos) }

// Node returns the node with index i, as used by OwnerIndices.
func (r *Ring) Node(i int) Node { return r.nodes[i] }

// Nodes returns a copy of the nodes, sorted by ID; OwnerIndices indexes it.
func (r *Ring) Nodes() []Node { return slices.Clone(r.nodes) }

// Index returns the index of the node with the given ID, or -1.
func (r *Ring) Index(id string) int {
	i, ok := slices.BinarySearchFunc(r.nodes, id, func(n Node, id string) int { return cmp.Compare(n.ID, id) })
	if !ok {
		return -1
	}
	return i
}

// Version returns the ring's version (Options.Version).
func (r *Ring) Version() uint64 { return r.opt.Version }

// Options returns the options the ring was built with, with defaults
// resolved (Unit and VNodesPerUnit are never zero for a non-empty ring).
func (r *Ring) Options() Options { return r.opt }

// Zones returns the number of distinct zones.
func (r *Ring) Zones() int { return r.nZones }

// Hosts returns the number of distinct (Zone, Host) pairs.
func (r *Ring) Hosts() int { return r.nHosts }

// Next builds the next version of r over nodes: same Unit and VNodesPerUnit
// (so unchanged nodes keep their vnodes) and Version r.Version()+1.
func (r *Ring) Next(nodes []Node) (*Ring, error) {
	opt := r.opt
	opt.Version++
	return New(nodes, opt)
}

// Moved returns the fraction of placements that differ between old and r
// for n owners over keys: the number of (key, owner) pairs in r's owner sets
// that are not in old's, divided by the number of pairs in r (0 if none).
// Owner order is ignored: a replica that only changes role moves no data.
// If keys is empty, SampleKeys(1<<16) is used.
func (r *Ring) Moved(old *Ring, n int, keys []uint64) float64 {
	if len(keys) == 0 {
		keys = SampleKeys(1 << 16)
	}
	var a, b []string
	moved, total := 0, 0
	for _, k := range keys {
		a = old.Owners(k, n, a)
		b = r.Owners(k, n, b)
		total += len(b)
		for _, id := range b {
			if !slices.Contains(a, id) {
				moved++
			}
		}
	}
	if total == 0 {
		return 0
	}
	return float64(moved) / float64(total)
}

// SampleKeys returns n deterministic, uniformly spread keys: the keys of
// chunks 0..n-1 of volume 0.
func SampleKeys(n int) []uint64 {
	ks := make([]uint64, n)
	for i := range ks {
		ks[i] = ChunkKey(0, uint64(i), 0)
	}
	return ks
}
