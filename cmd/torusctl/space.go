package main

// The space columns of volume list, volume info and snapshot list, added up
// from the nodes' usage records (meta.NodeUsage), and the near-full state
// of nodes.
//
// Every byte shown here is raw space on the nodes' disks: each replica of a
// chunk counts, in whole chunks. A node that has no record (down, or just
// started) is counted as missing, never as holding nothing: the output says
// how many of the nodes reported.

import (
	"context"
	"fmt"
	"slices"
	"strings"

	"github.com/torus-storage/torus/internal/units"
	"github.com/torus-storage/torus/meta"
)

// spaceReport is the usage records of a cluster and the nodes expected to
// have one.
type spaceReport struct {
	usage map[string]meta.NodeUsage
	// nodes are the ids of the nodes of the ring, the registered ones and
	// those with a record, sorted; missing those without a record.
	nodes, missing []string
}

// readSpace reads the usage records, the ring and the registry.
func readSpace(ctx context.Context, s *meta.Client) (spaceReport, error) {
	usage, err := s.Usage(ctx)
	if err != nil {
		return spaceReport{}, err
	}
	r, _, err := s.Ring(ctx)
	if err != nil {
		return spaceReport{}, fmt.Errorf("read the ring for the space report: %w", err)
	}
	reg, err := s.Nodes(ctx)
	if err != nil {
		return spaceReport{}, err
	}
	var ids []string
	for _, n := range r.Nodes() {
		ids = append(ids, n.ID)
	}
	for _, n := range reg {
		ids = append(ids, n.ID)
	}
	for id := range usage {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	rep := spaceReport{usage: usage, nodes: slices.Compact(ids)}
	for _, id := range rep.nodes {
		if _, ok := usage[id]; !ok {
			rep.missing = append(rep.missing, id)
		}
	}
	return rep, nil
}

// VolumeSpace is a volume's space on the nodes, as printed (exported so
// that JSON fills it in when embedded as a pointer).
type VolumeSpace struct {
	// AllocatedBytes is the bytes of the volume's live chunks on the nodes'
	// disks, every replica counted; SnapshotBytes those of its snapshot copies.
	AllocatedBytes uint64 `json:"allocated_bytes"`
	SnapshotBytes  uint64 `json:"snapshot_bytes"`
	// Reported of Nodes nodes had a usage record; Missing names the others
	// (their bytes are not in the sums).
	Reported int      `json:"usage_nodes_reported"`
	Nodes    int      `json:"usage_nodes"`
	Missing  []string `json:"usage_nodes_missing,omitempty"`
}

// volume adds up the records for volume id.
func (r spaceReport) volume(id uint64) VolumeSpace {
	vs := VolumeSpace{Reported: len(r.nodes) - len(r.missing), Nodes: len(r.nodes), Missing: r.missing}
	for _, u := range r.usage {
		v := u.Volumes[id]
		vs.AllocatedBytes += v.Head * u.ChunkSize
		vs.SnapshotBytes += v.Copies * u.ChunkSize
	}
	return vs
}

// exclusive adds up the bytes of volume vol's copies held only by snapshot
// snap; known is false if a node that holds copies of vol left its
// per-snapshot breakdown out (meta.NodeUsage.Partial).
func (r spaceReport) exclusive(vol, snap uint64) (bytes uint64, known bool) {
	known = true
	for _, u := range r.usage {
		v := u.Volumes[vol]
		if u.Partial && v.Copies > 0 {
			known = false
		}
		bytes += v.Only[snap] * u.ChunkSize
	}
	return bytes, known
}

// reported is the "(n of m nodes reported ...)" note of the space figures.
func (r spaceReport) reported() string {
	n, m := len(r.nodes)-len(r.missing), len(r.nodes)
	if len(r.missing) == 0 {
		return fmt.Sprintf("%d of %d nodes reported", n, m)
	}
	return fmt.Sprintf("only %d of %d nodes reported; missing %s (down, or just started): their bytes are not counted",
		n, m, strings.Join(r.missing, ", "))
}

// nearFullNode is a node at or above its near-full ratio that still takes
// writes (status).
type nearFullNode struct {
	ID       string  `json:"id"`
	Used     uint64  `json:"used"`
	Capacity uint64  `json:"capacity"`
	Ratio    float64 `json:"near_full_ratio"`
}

// percent is used as a whole percentage of capacity (rounded down).
func percent(used, capacity uint64) uint64 {
	if capacity == 0 {
		return 0
	}
	return used * 100 / capacity
}

// nearFullText describes a nearly full node's space.
func nearFullText(used, capacity uint64, ratio float64) string {
	return fmt.Sprintf("%s of %s used (%d%%, warns at %.0f%%)", units.FormatSize(int64(used)), units.FormatSize(int64(capacity)),
		percent(used, capacity), ratio*100)
}
