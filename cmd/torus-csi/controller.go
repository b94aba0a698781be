package main

// The CSI Identity and Controller services: volumes, snapshots and clones
// as records in etcd (package meta); no data moves here.
//
// Invariants:
//   - A CSI volume id is the Torus volume name, which is the CSI name
//     CreateVolume was given; a CSI snapshot id is VOLUME@NAME. So a
//     retried CreateVolume or CreateSnapshot finds what the first made.
//   - Only single-node-writer access modes are taken: a Torus volume has one
//     writer (its attach lock), so any other is refused (INVALID_ARGUMENT
//     at create, unconfirmed at validate).

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/torus-storage/torus/internal/units"
	"github.com/torus-storage/torus/meta"
)

// driverName is the CSI driver's name (GetPluginInfo).
const driverName = "torus.csi.torus-storage.io"

// defaultSize is a volume's size when the request names none.
const defaultSize = 1 << 30

// snapshotWait bounds how long CreateSnapshot waits for a volume's holder
// to pause its writes.
const snapshotWait = 10 * time.Second

// controller serves the Controller service.
type controller struct {
	csi.UnimplementedControllerServer
	ms *meta.Client
}

// ControllerGetCapabilities implements csi.ControllerServer.
func (c *controller) ControllerGetCapabilities(context.Context, *csi.ControllerGetCapabilitiesRequest) (*csi.ControllerGetCapabilitiesResponse, error) {
	var caps []*csi.ControllerServiceCapability
	for _, t := range []csi.ControllerServiceCapability_RPC_Type{
		csi.ControllerServiceCapability_RPC_CREATE_DELETE_VOLUME,
		csi.ControllerServiceCapability_RPC_CREATE_DELETE_SNAPSHOT,
		csi.ControllerServiceCapability_RPC_LIST_SNAPSHOTS,
		csi.ControllerServiceCapability_RPC_CLONE_VOLUME,
		csi.ControllerServiceCapability_RPC_EXPAND_VOLUME,
		csi.ControllerServiceCapability_RPC_LIST_VOLUMES,
		csi.ControllerServiceCapability_RPC_GET_CAPACITY,
	} {
		caps = append(caps, &csi.ControllerServiceCapability{Type: &csi.ControllerServiceCapability_Rpc{
			Rpc: &csi.ControllerServiceCapability_RPC{Type: t}}})
	}
	return &csi.ControllerGetCapabilitiesResponse{Capabilities: caps}, nil
}

// checkCaps refuses access modes other than single-node writer (and read
// only on one node), and access types other than mount and block.
func checkCaps(caps []*csi.VolumeCapability) error {
	if len(caps) == 0 {
		return status.Error(codes.InvalidArgument, "volume capabilities missing")
	}
	for _, cp := range caps {
		if cp.GetBlock() == nil && cp.GetMount() == nil {
			return status.Error(codes.InvalidArgument, "volume capability: access type missing (block or mount)")
		}
		switch m := cp.GetAccessMode().GetMode(); m {
		case csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER, csi.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER,
			csi.VolumeCapability_AccessMode_SINGLE_NODE_MULTI_WRITER, csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY:
		case csi.VolumeCapability_AccessMode_UNKNOWN:
			return status.Error(codes.InvalidArgument, "volume capability: access mode missing")
		default:
			return status.Errorf(codes.InvalidArgument, "access mode %v: a Torus volume has one writer on one node at a time", m)
		}
	}
	return nil
}

// sizeOf picks a volume size for a capacity range: the required bytes
// rounded up to 4 KiB (default 1 GiB), at most the limit.
func sizeOf(r *csi.CapacityRange) (uint64, error) {
	req, lim := r.GetRequiredBytes(), r.GetLimitBytes()
	if req < 0 || lim < 0 {
		return 0, status.Error(codes.InvalidArgument, "capacity range: negative bytes")
	}
	size := uint64(req)
	if size == 0 {
		size = defaultSize
		if lim > 0 && uint64(lim) < size {
			size = uint64(lim)
		}
	}
	size = (size + 4095) &^ 4095
	if lim > 0 && size > uint64(lim) {
		return 0, status.Errorf(codes.OutOfRange, "capacity range: %d bytes required, rounded to 4 KiB, exceed the limit of %d", req, lim)
	}
	return size, nil
}

// fits reports whether a volume of size bytes satisfies r.
func fits(size uint64, r *csi.CapacityRange) bool {
	return size >= uint64(r.GetRequiredBytes()) && (r.GetLimitBytes() == 0 || size <= uint64(r.GetLimitBytes()))
}

// metaErr maps a meta error to a gRPC status.
func metaErr(what string, err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, meta.ErrNotFound):
		return status.Errorf(codes.NotFound, "%s: %v", what, err)
	case errors.Is(err, meta.ErrExists):
		return status.Errorf(codes.AlreadyExists, "%s: %v", what, err)
	case errors.Is(err, meta.ErrInvalid):
		return status.Errorf(codes.InvalidArgument, "%s: %v", what, err)
	case errors.Is(err, meta.ErrAttached), errors.Is(err, meta.ErrInUse), errors.Is(err, meta.ErrNotReleased):
		return status.Errorf(codes.FailedPrecondition, "%s: %v", what, err)
	case errors.Is(err, meta.ErrConflict), errors.Is(err, meta.ErrUnreachable), errors.Is(err, context.DeadlineExceeded):
		return status.Errorf(codes.Unavailable, "%s: %v", what, err)
	}
	return status.Errorf(codes.Internal, "%s: %v", what, err)
}

// volumeOf is the CSI volume of v.
func volumeOf(v meta.Volume) *csi.Volume {
	cv := &csi.Volume{VolumeId: v.Name, CapacityBytes: int64(v.Size)}
	if p := v.Parent; p != nil {
		cv.ContentSource = &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{
			Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: p.Name + "@" + p.Snapshot}}}
	}
	return cv
}

// CreateVolume implements csi.ControllerServer. Parameters: replication
// (N), and the QoS limits of torusctl volume create (readIOPS, writeIOPS,
// readBPS, writeBPS, burst). A snapshot source makes a clone of it; a
// volume source a snapshot of that volume named clone-NAME, then a clone.
func (c *controller) CreateVolume(ctx context.Context, r *csi.CreateVolumeRequest) (*csi.CreateVolumeResponse, error) {
	name := r.GetName()
	if name == "" {
		return nil, status.Error(codes.InvalidArgument, "name missing")
	}
	if err := checkCaps(r.GetVolumeCapabilities()); err != nil {
		return nil, err
	}
	size, err := sizeOf(r.GetCapacityRange())
	if err != nil {
		return nil, err
	}
	repl, qos, err := parseParameters(r.GetParameters())
	if err != nil {
		return nil, err
	}
	// Idempotent by name.
	if v, err := c.ms.Volume(ctx, name); err == nil {
		if !fits(v.Size, r.GetCapacityRange()) {
			return nil, status.Errorf(codes.AlreadyExists, "volume %s exists with %d bytes, outside the capacity range asked for", name, v.Size)
		}
		if !sameSource(v, r.GetVolumeContentSource()) {
			return nil, status.Errorf(codes.AlreadyExists, "volume %s exists with another content source", name)
		}
		return &csi.CreateVolumeResponse{Volume: volumeOf(v)}, nil
	} else if !errors.Is(err, meta.ErrNotFound) {
		return nil, metaErr("read volume "+name, err)
	}
	var v meta.Volume
	switch src := r.GetVolumeContentSource(); {
	case src.GetSnapshot() != nil:
		sr, err := meta.ParseSnapshotName(src.GetSnapshot().GetSnapshotId())
		if err != nil {
			return nil, status.Errorf(codes.NotFound, "snapshot %q: %v", src.GetSnapshot().GetSnapshotId(), err)
		}
		v, err = c.clone(ctx, sr, name, size)
		if err != nil {
			return nil, err
		}
	case src.GetVolume() != nil:
		from := src.GetVolume().GetVolumeId()
		sr := meta.SnapshotRequest{Volume: from, Name: "clone-" + name}
		if _, err := c.ms.TakeSnapshots(ctx, "", []meta.SnapshotRequest{sr}, snapshotWait); err != nil && !errors.Is(err, meta.ErrExists) {
			return nil, metaErr("snapshot of source volume "+from, err)
		}
		if v, err = c.clone(ctx, sr, name, size); err != nil {
			return nil, err
		}
	default:
		if v, err = c.ms.CreateVolume(ctx, name, size, repl, meta.WithQoS(qos)); err != nil {
			return nil, metaErr("create volume "+name, err)
		}
		return &csi.CreateVolumeResponse{Volume: volumeOf(v)}, nil
	}
	// A clone: its replication is its parent's; its QoS is set here.
	if !qos.Unlimited() {
		if v, err = c.ms.UpdateQoS(ctx, name, func(q *meta.QoS) { *q = qos }); err != nil {
			return nil, metaErr("set the QoS of clone "+name, err)
		}
	}
	return &csi.CreateVolumeResponse{Volume: volumeOf(v)}, nil
}

// createParameters are the CreateVolume parameters (a StorageClass's),
// each with what it takes.
var createParameters = map[string]string{
	"replication": "copies of each chunk, e.g. 3 (default: the cluster's)",
	"readIOPS":    "QoS: read requests per second",
	"writeIOPS":   "QoS: write, discard and write-zeroes requests per second",
	"readBPS":     "QoS: bytes read per second, e.g. 100MiB",
	"writeBPS":    "QoS: bytes written per second, e.g. 50MiB",
	"burst":       "QoS: how long an idle volume saves credit above its limits, e.g. 1s",
}

// parseParameters reads CreateVolume's parameters: the replication (0:
// the cluster's) and the QoS limits.
func parseParameters(p map[string]string) (int, meta.QoS, error) {
	var q meta.QoS
	repl := 0
	for k, v := range p {
		var err error
		switch k {
		case "replication":
			if repl, err = strconv.Atoi(v); err == nil && repl < 1 {
				err = errors.New("want a positive number")
			}
		case "readIOPS":
			q.ReadIOPS, err = strconv.ParseUint(v, 10, 64)
		case "writeIOPS":
			q.WriteIOPS, err = strconv.ParseUint(v, 10, 64)
		case "readBPS", "writeBPS":
			var n int64
			if n, err = units.ParseSize(v); err == nil && n < 0 {
				err = errors.New("negative")
			}
			if k == "readBPS" {
				q.ReadBPS = uint64(n)
			} else {
				q.WriteBPS = uint64(n)
			}
		case "burst":
			var d time.Duration
			if d, err = time.ParseDuration(v); err == nil && d < 0 {
				err = errors.New("negative")
			}
			q.BurstMS = uint64(d / time.Millisecond)
		default:
			known := slices.Sorted(maps.Keys(createParameters))
			return 0, q, status.Errorf(codes.InvalidArgument, "unknown parameter %q (known: %s)", k, strings.Join(known, ", "))
		}
		if err != nil {
			return 0, q, status.Errorf(codes.InvalidArgument, "parameter %s %q: %v (%s)", k, v, err, createParameters[k])
		}
	}
	if err := q.Validate(); err != nil {
		return 0, q, status.Errorf(codes.InvalidArgument, "QoS parameters: %v", err)
	}
	return repl, q, nil
}

// clone makes volume name a clone of sr, grown to size if it is larger.
func (c *controller) clone(ctx context.Context, sr meta.SnapshotRequest, name string, size uint64) (meta.Volume, error) {
	v, err := c.ms.CloneVolume(ctx, sr, name)
	if err != nil {
		return v, metaErr(fmt.Sprintf("clone %s@%s", sr.Volume, sr.Name), err)
	}
	if size > v.Size {
		if v, err = c.ms.ResizeVolume(ctx, name, size); err != nil {
			return v, metaErr("grow clone "+name, err)
		}
	}
	return v, nil
}

// sameSource reports whether v was made from src.
func sameSource(v meta.Volume, src *csi.VolumeContentSource) bool {
	switch {
	case src == nil:
		return v.Parent == nil
	case src.GetSnapshot() != nil:
		return v.Parent != nil && v.Parent.Name+"@"+v.Parent.Snapshot == src.GetSnapshot().GetSnapshotId()
	case src.GetVolume() != nil:
		return v.Parent != nil && v.Parent.Name == src.GetVolume().GetVolumeId() && v.Parent.Snapshot == "clone-"+v.Name
	}
	return false
}

// DeleteVolume implements csi.ControllerServer: a missing volume is
// deleted already; an attached one, or one with clones, is refused.
func (c *controller) DeleteVolume(ctx context.Context, r *csi.DeleteVolumeRequest) (*csi.DeleteVolumeResponse, error) {
	name := r.GetVolumeId()
	if name == "" {
		return nil, status.Error(codes.InvalidArgument, "volume id missing")
	}
	v, err := c.ms.Volume(ctx, name)
	if errors.Is(err, meta.ErrNotFound) || errors.Is(err, meta.ErrInvalid) {
		return &csi.DeleteVolumeResponse{}, nil
	}
	if err != nil {
		return nil, metaErr("read volume "+name, err)
	}
	if err := c.ms.DeleteVolume(ctx, name); err != nil && !errors.Is(err, meta.ErrNotFound) {
		return nil, metaErr("delete volume "+name, err)
	}
	// The hidden snapshot a volume-to-volume clone was made from.
	if p := v.Parent; p != nil && p.Snapshot == "clone-"+name {
		if err := c.ms.DeleteSnapshot(ctx, p.Name, p.Snapshot); err != nil && !errors.Is(err, meta.ErrNotFound) && !errors.Is(err, meta.ErrInUse) {
			return nil, metaErr("delete the snapshot clone "+name+" was made from", err)
		}
	}
	return &csi.DeleteVolumeResponse{}, nil
}

// ValidateVolumeCapabilities implements csi.ControllerServer.
func (c *controller) ValidateVolumeCapabilities(ctx context.Context, r *csi.ValidateVolumeCapabilitiesRequest) (*csi.ValidateVolumeCapabilitiesResponse, error) {
	if r.GetVolumeId() == "" {
		return nil, status.Error(codes.InvalidArgument, "volume id missing")
	}
	if len(r.GetVolumeCapabilities()) == 0 {
		return nil, status.Error(codes.InvalidArgument, "volume capabilities missing")
	}
	if _, err := c.ms.Volume(ctx, r.GetVolumeId()); err != nil {
		return nil, metaErr("volume "+r.GetVolumeId(), err)
	}
	if err := checkCaps(r.GetVolumeCapabilities()); err != nil {
		return &csi.ValidateVolumeCapabilitiesResponse{Message: status.Convert(err).Message()}, nil
	}
	return &csi.ValidateVolumeCapabilitiesResponse{Confirmed: &csi.ValidateVolumeCapabilitiesResponse_Confirmed{
		VolumeCapabilities: r.GetVolumeCapabilities(), VolumeContext: r.GetVolumeContext(), Parameters: r.GetParameters()}}, nil
}

// page returns the items of a list of n from token on, at most max (0: all),
// and the next token.
func page(n int, token string, max int32) (int, int, string, error) {
	start := 0
	if token != "" {
		s, err := strconv.Atoi(token)
		if err != nil || s < 0 || s > n {
			return 0, 0, "", status.Errorf(codes.Aborted, "starting token %q is not one this driver gave", token)
		}
		start = s
	}
	end := n
	if max > 0 && start+int(max) < n {
		end = start + int(max)
	}
	next := ""
	if end < n {
		next = strconv.Itoa(end)
	}
	return start, end, next, nil
}

// ListVolumes implements csi.ControllerServer.
func (c *controller) ListVolumes(ctx context.Context, r *csi.ListVolumesRequest) (*csi.ListVolumesResponse, error) {
	if r.GetMaxEntries() < 0 {
		return nil, status.Error(codes.InvalidArgument, "max entries negative")
	}
	vols, err := c.ms.Volumes(ctx)
	if err != nil {
		return nil, metaErr("list volumes", err)
	}
	start, end, next, err := page(len(vols), r.GetStartingToken(), r.GetMaxEntries())
	if err != nil {
		return nil, err
	}
	out := &csi.ListVolumesResponse{NextToken: next}
	for _, v := range vols[start:end] {
		out.Entries = append(out.Entries, &csi.ListVolumesResponse_Entry{Volume: volumeOf(v)})
	}
	return out, nil
}

// GetCapacity implements csi.ControllerServer: the free bytes of the ring's
// nodes, divided by the replication a volume with these parameters gets.
func (c *controller) GetCapacity(ctx context.Context, r *csi.GetCapacityRequest) (*csi.GetCapacityResponse, error) {
	nodes, err := c.ms.Nodes(ctx)
	if err != nil {
		return nil, metaErr("list nodes", err)
	}
	cfg, err := c.ms.Config(ctx)
	if err != nil {
		return nil, metaErr("read config", err)
	}
	repl := cfg.Replication
	if s, ok := r.GetParameters()["replication"]; ok {
		if n, err := strconv.Atoi(s); err == nil && n > 0 {
			repl = n
		}
	}
	var free uint64
	for _, n := range nodes {
		if n.Capacity > n.Used {
			free += n.Capacity - n.Used
		}
	}
	return &csi.GetCapacityResponse{AvailableCapacity: int64(free / uint64(max(repl, 1)))}, nil
}

// ControllerExpandVolume implements csi.ControllerServer: the volume grows
// in etcd, and its holder grows the device where the kernel can; a file
// system is grown by NodeExpandVolume.
func (c *controller) ControllerExpandVolume(ctx context.Context, r *csi.ControllerExpandVolumeRequest) (*csi.ControllerExpandVolumeResponse, error) {
	if r.GetVolumeId() == "" {
		return nil, status.Error(codes.InvalidArgument, "volume id missing")
	}
	size, err := sizeOf(r.GetCapacityRange())
	if err != nil {
		return nil, err
	}
	v, err := c.ms.Volume(ctx, r.GetVolumeId())
	if err != nil {
		return nil, metaErr("volume "+r.GetVolumeId(), err)
	}
	if size > v.Size {
		if v, err = c.ms.ResizeVolume(ctx, v.Name, size); err != nil {
			return nil, metaErr("grow volume "+r.GetVolumeId(), err)
		}
	}
	block := r.GetVolumeCapability().GetBlock() != nil
	return &csi.ControllerExpandVolumeResponse{CapacityBytes: int64(v.Size), NodeExpansionRequired: !block}, nil
}

// snapshotOf is the CSI snapshot s of volume v.
func snapshotOf(v meta.Volume, s meta.Snapshot) *csi.Snapshot {
	return &csi.Snapshot{SnapshotId: v.Name + "@" + s.Name, SourceVolumeId: v.Name, CreationTime: timestamppb.New(s.Created),
		SizeBytes: int64(s.Size), ReadyToUse: !s.Pending}
}

// findSnapshot finds the snapshot called name on any volume (CSI names are
// global).
func (c *controller) findSnapshot(ctx context.Context, name string) (meta.Volume, meta.Snapshot, bool, error) {
	vols, err := c.ms.Volumes(ctx)
	if err != nil {
		return meta.Volume{}, meta.Snapshot{}, false, err
	}
	for _, v := range vols {
		for _, s := range v.Snapshots {
			if s.Name == name {
				return v, s, true, nil
			}
		}
	}
	return meta.Volume{}, meta.Snapshot{}, false, nil
}

// CreateSnapshot implements csi.ControllerServer: a crash-consistent
// snapshot (the holder of the volume pauses its writes for it).
func (c *controller) CreateSnapshot(ctx context.Context, r *csi.CreateSnapshotRequest) (*csi.CreateSnapshotResponse, error) {
	name, src := r.GetName(), r.GetSourceVolumeId()
	if name == "" || src == "" {
		return nil, status.Error(codes.InvalidArgument, "name and source volume id are required")
	}
	if strings.ContainsAny(name, "@/") {
		return nil, status.Errorf(codes.InvalidArgument, "snapshot name %q: no '@' or '/'", name)
	}
	if v, s, ok, err := c.findSnapshot(ctx, name); err != nil {
		return nil, metaErr("list snapshots", err)
	} else if ok {
		if v.Name != src {
			return nil, status.Errorf(codes.AlreadyExists, "snapshot %s exists, of volume %s", name, v.Name)
		}
		return &csi.CreateSnapshotResponse{Snapshot: snapshotOf(v, s)}, nil
	}
	snaps, err := c.ms.TakeSnapshots(ctx, "", []meta.SnapshotRequest{{Volume: src, Name: name}}, snapshotWait)
	if err != nil {
		return nil, metaErr("snapshot of volume "+src, err)
	}
	v, err := c.ms.Volume(ctx, src)
	if err != nil {
		return nil, metaErr("volume "+src, err)
	}
	return &csi.CreateSnapshotResponse{Snapshot: snapshotOf(v, snaps[0])}, nil
}

// DeleteSnapshot implements csi.ControllerServer.
func (c *controller) DeleteSnapshot(ctx context.Context, r *csi.DeleteSnapshotRequest) (*csi.DeleteSnapshotResponse, error) {
	if r.GetSnapshotId() == "" {
		return nil, status.Error(codes.InvalidArgument, "snapshot id missing")
	}
	sr, err := meta.ParseSnapshotName(r.GetSnapshotId())
	if err != nil {
		return &csi.DeleteSnapshotResponse{}, nil // not an id this driver gave: no such snapshot
	}
	if err := c.ms.DeleteSnapshot(ctx, sr.Volume, sr.Name); err != nil && !errors.Is(err, meta.ErrNotFound) {
		return nil, metaErr("delete snapshot "+r.GetSnapshotId(), err)
	}
	return &csi.DeleteSnapshotResponse{}, nil
}

// ListSnapshots implements csi.ControllerServer.
func (c *controller) ListSnapshots(ctx context.Context, r *csi.ListSnapshotsRequest) (*csi.ListSnapshotsResponse, error) {
	if r.GetMaxEntries() < 0 {
		return nil, status.Error(codes.InvalidArgument, "max entries negative")
	}
	vols, err := c.ms.Volumes(ctx)
	if err != nil {
		return nil, metaErr("list volumes", err)
	}
	var all []*csi.Snapshot
	for _, v := range vols {
		if r.GetSourceVolumeId() != "" && v.Name != r.GetSourceVolumeId() {
			continue
		}
		for _, s := range v.Snapshots {
			cs := snapshotOf(v, s)
			if r.GetSnapshotId() != "" && cs.SnapshotId != r.GetSnapshotId() {
				continue
			}
			all = append(all, cs)
		}
	}
	slices.SortFunc(all, func(a, b *csi.Snapshot) int { return strings.Compare(a.SnapshotId, b.SnapshotId) })
	start, end, next, err := page(len(all), r.GetStartingToken(), r.GetMaxEntries())
	if err != nil {
		return nil, err
	}
	out := &csi.ListSnapshotsResponse{NextToken: next}
	for _, s := range all[start:end] {
		out.Entries = append(out.Entries, &csi.ListSnapshotsResponse_Entry{Snapshot: s})
	}
	return out, nil
}
