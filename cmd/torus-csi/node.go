package main

// The CSI Node service: a volume staged on this host is a block device
// (ublk, else the kernel NBD client) served by its own torusblk process;
// a mount volume gets ext4 or xfs, made only on a blank device, mounted at
// the staging path and bind mounted at each target; a block volume's
// device node is bind mounted at each target.
//
// Invariants:
//   - One writer: the device server holds the volume's attach lock. A stage
//     while another host holds it waits that lease out (a dead host) and
//     then fences it, or fails with FAILED_PRECONDITION (a live one).
//   - mkfs runs only on a device blkid finds blank: a volume's data, or
//     anything blkid can name, is never formatted over.
//   - Unstage detaches only a device mounted nowhere (the CO unpublishes
//     first; if it has not, unstage fails instead of pulling the device
//     from under a filesystem).

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/spf13/pflag"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/torus-storage/torus/cluster"
	"github.com/torus-storage/torus/internal/blockdev"
	"github.com/torus-storage/torus/internal/cli"
	"github.com/torus-storage/torus/meta"
)

// nodeConfig is the node service's configuration (its flags).
type nodeConfig struct {
	cluster    cli.Cluster
	nodeID     string
	tlsDir     string
	runDir     string
	torusblk   string
	attachMode string
	leaseTTL   time.Duration
}

// flags defines the node service's flags on fs.
func (nc *nodeConfig) flags(fs *pflag.FlagSet) {
	host, _ := os.Hostname()
	fs.StringVar(&nc.nodeID, "node-id", host, "node service: this host's `ID` for the CO (in Kubernetes the node's name)")
	cli.TLSDirFlag(fs, &nc.tlsDir)
	fs.StringVar(&nc.runDir, "run-dir", blockdev.DefaultRunDir, "node service: host `DIR` of the attached devices' state files, from which a restarted plugin adopts them")
	fs.StringVar(&nc.torusblk, "torusblk", "", "node service: `PATH` of torusblk, which serves each device (default: next to this binary, else in PATH)")
	fs.StringVar(&nc.attachMode, "attach-mode", "auto", "node service: ublk, nbd (the kernel NBD client) or auto (ublk where the kernel has it)")
	fs.DurationVar(&nc.leaseTTL, "lease-ttl", cluster.DefaultAttachTTL, "node service: attach lock lease of the devices served here; a stage on another host after this one died waits it out")
}

// check validates the node service's flags and finds torusblk.
func (nc *nodeConfig) check() error {
	if nc.nodeID == "" {
		return cli.Usagef("--node-id is required (the host name is unknown)")
	}
	if nc.tlsDir == "" {
		return cli.Usagef("--tls-dir (or %s) is required by the node service: a directory with this client's node.crt, node.key and ca.crt", cli.EnvTLSDir)
	}
	switch blockdev.Mode(nc.attachMode) {
	case blockdev.ModeAuto, blockdev.ModeUblk, blockdev.ModeNBD:
	default:
		return cli.Usagef("--attach-mode %q: want ublk, nbd or auto", nc.attachMode)
	}
	if nc.leaseTTL < time.Second {
		return cli.Usagef("--lease-ttl %v: at least 1s", nc.leaseTTL)
	}
	if nc.torusblk == "" {
		if exe, err := os.Executable(); err == nil {
			if p := filepath.Join(filepath.Dir(exe), "torusblk"); fileExists(p) {
				nc.torusblk = p
			}
		}
	}
	if nc.torusblk == "" {
		p, err := exec.LookPath("torusblk")
		if err != nil {
			return fmt.Errorf("torusblk, which serves the devices, is neither next to this binary nor in PATH: give --torusblk PATH")
		}
		nc.torusblk = p
	}
	if !fileExists(nc.torusblk) {
		return cli.Usagef("--torusblk %s: no such file", nc.torusblk)
	}
	if os.Geteuid() != 0 {
		return errors.New("the node service attaches devices and mounts filesystems: run it as root (a privileged container)")
	}
	return nil
}

func fileExists(p string) bool { _, err := os.Stat(p); return err == nil }

// node serves the Node service.
type node struct {
	csi.UnimplementedNodeServer
	ms         *meta.Client
	cfg        nodeConfig
	mode       blockdev.Mode
	log        *slog.Logger
	locks      keyedMutex
	recovering sync.WaitGroup
}

// newNode resolves the attach mode and adopts the devices a previous plugin
// left on this host.
func newNode(ctx context.Context, ms *meta.Client, cfg nodeConfig, log *slog.Logger) (*node, error) {
	mode, err := blockdev.ResolveMode(blockdev.Mode(cfg.attachMode), log)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(cfg.runDir, 0o755); err != nil {
		return nil, fmt.Errorf("--run-dir: %w", err)
	}
	n := &node{ms: ms, cfg: cfg, mode: mode, log: log.With("node", cfg.nodeID)}
	if err := n.adopt(ctx); err != nil {
		return nil, err
	}
	return n, nil
}

// NodeGetInfo implements csi.NodeServer.
func (n *node) NodeGetInfo(context.Context, *csi.NodeGetInfoRequest) (*csi.NodeGetInfoResponse, error) {
	return &csi.NodeGetInfoResponse{NodeId: n.cfg.nodeID}, nil
}

// NodeGetCapabilities implements csi.NodeServer.
func (n *node) NodeGetCapabilities(context.Context, *csi.NodeGetCapabilitiesRequest) (*csi.NodeGetCapabilitiesResponse, error) {
	var caps []*csi.NodeServiceCapability
	for _, t := range []csi.NodeServiceCapability_RPC_Type{
		csi.NodeServiceCapability_RPC_STAGE_UNSTAGE_VOLUME,
		csi.NodeServiceCapability_RPC_EXPAND_VOLUME,
		csi.NodeServiceCapability_RPC_GET_VOLUME_STATS,
		csi.NodeServiceCapability_RPC_GET_VOLUME_HEALTH,
	} {
		caps = append(caps, &csi.NodeServiceCapability{Type: &csi.NodeServiceCapability_Rpc{
			Rpc: &csi.NodeServiceCapability_RPC{Type: t}}})
	}
	return &csi.NodeGetCapabilitiesResponse{Capabilities: caps}, nil
}

// checkCap checks the one capability of a node call.
func checkCap(c *csi.VolumeCapability) error {
	if c == nil {
		return status.Error(codes.InvalidArgument, "volume capability missing")
	}
	if err := checkCaps([]*csi.VolumeCapability{c}); err != nil {
		return err
	}
	if m := c.GetMount(); m != nil {
		if fs := m.GetFsType(); fs != "" && mkfsArgs[fs] == nil {
			return status.Errorf(codes.InvalidArgument, "filesystem %q: want ext4 or xfs", fs)
		}
	}
	return nil
}

// readOnly reports whether c is a read-only access mode.
func readOnly(c *csi.VolumeCapability) bool {
	return c.GetAccessMode().GetMode() == csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY
}

// NodeStageVolume implements csi.NodeServer: attach the volume (ublk, else
// the kernel NBD client) and, for a mount volume, make its filesystem if
// the device is blank, mount it at the staging path and grow it to the
// device (the volume may have grown while it was not staged).
func (n *node) NodeStageVolume(ctx context.Context, r *csi.NodeStageVolumeRequest) (_ *csi.NodeStageVolumeResponse, err error) {
	vol, staging := r.GetVolumeId(), r.GetStagingTargetPath()
	if vol == "" {
		return nil, status.Error(codes.InvalidArgument, "volume id missing")
	}
	if staging == "" {
		return nil, status.Error(codes.InvalidArgument, "staging target path missing")
	}
	if err := checkCap(r.GetVolumeCapability()); err != nil {
		return nil, err
	}
	defer n.locks.lock(vol)()
	if _, err := n.ms.Volume(ctx, vol); err != nil {
		return nil, metaErr("volume "+vol, err)
	}
	st, err := n.served(vol)
	if err != nil {
		return nil, err
	}
	started := false // this call started the device's server
	switch {
	case st == nil:
		if st, err = n.attach(ctx, vol); err != nil {
			return nil, err
		}
		started = true
	case st.ServerAlive():
	case st.Mode == blockdev.ModeUblk:
		old := st
		if st, err = n.recoverDevice(ctx, st); err != nil {
			n.abandonIfTaken(old, err)
			return nil, err
		}
	default:
		if pts, _ := mountsOf(st.Device); len(pts) > 0 {
			return nil, status.Errorf(codes.FailedPrecondition, "volume %s: the server of kernel NBD device %s died and it is still mounted at %s: unpublish and unstage it first",
				vol, st.Device, strings.Join(pts, ", "))
		}
		n.log.Warn("the server of a kernel NBD device died: removing the device and attaching the volume again", "volume", vol, "device", st.Device)
		if err := n.detach(st); err != nil {
			return nil, err
		}
		if st, err = n.attach(ctx, vol); err != nil {
			return nil, err
		}
		started = true
	}
	// A stage that fails for good leaves nothing behind: the kubelet does
	// not unstage after a failed stage, and the server would hold the
	// volume's attach lock.
	defer func() {
		if err != nil && started && !retryable(err) {
			n.log.Warn("the stage failed: detaching the device it attached", "volume", vol, "device", st.Device, "err", err)
			if derr := n.detach(st); derr != nil {
				n.log.Error("detaching after a failed stage", "volume", vol, "err", derr)
			}
		}
	}()
	m := r.GetVolumeCapability().GetMount()
	if m == nil {
		n.log.Info("staged", "volume", vol, "device", st.Device, "access", "block")
		return &csi.NodeStageVolumeResponse{}, nil
	}
	if err = n.mountStaging(ctx, vol, st.Device, staging, m, readOnly(r.GetVolumeCapability())); err != nil {
		return nil, err
	}
	return &csi.NodeStageVolumeResponse{}, nil
}

// retryable reports whether a call's error may pass if the CO calls again.
func retryable(err error) bool {
	switch status.Code(err) {
	case codes.DeadlineExceeded, codes.Canceled, codes.Unavailable, codes.Aborted:
		return true
	}
	return false
}

// mountStaging mounts dev's filesystem (made if dev is blank) at staging.
func (n *node) mountStaging(ctx context.Context, vol, dev, staging string, m *csi.VolumeCapability_MountVolume, ro bool) error {
	want := m.GetFsType()
	if mp, err := isMountPoint(staging); err != nil {
		return status.Errorf(codes.Internal, "mount table: %v", err)
	} else if mp {
		same, err := isDevice(staging, dev)
		if err != nil || !same {
			return status.Errorf(codes.AlreadyExists, "staging path %s has another filesystem mounted (not %s of volume %s)", staging, dev, vol)
		}
		return nil // staged already
	}
	if err := os.MkdirAll(staging, 0o750); err != nil {
		return status.Errorf(codes.Internal, "staging path: %v", err)
	}
	have, err := probe(ctx, dev)
	if err != nil {
		return status.Errorf(codes.Internal, "volume %s: %v", vol, err)
	}
	if have == "" {
		// blkid also says "nothing found" when it cannot read: format only
		// a device whose first and last MiB read back as zeroes.
		if err := zeroed(dev); err != nil {
			return status.Errorf(codes.FailedPrecondition, "volume %s: blkid finds no filesystem, but it is not blank: %v; it is not formatted", vol, err)
		}
	}
	switch {
	case have == "":
		if ro {
			return status.Errorf(codes.FailedPrecondition, "volume %s is blank and staged read-only: no filesystem to mount", vol)
		}
		fs := want
		if fs == "" {
			fs = defaultFS
		}
		args := append(slices.Clone(mkfsArgs[fs][1:]), dev)
		start := time.Now()
		if _, err := tool(ctx, mkfsArgs[fs][0], args...); err != nil {
			return status.Errorf(codes.Internal, "volume %s: %v", vol, err)
		}
		n.log.Info("made a filesystem on a blank volume", "volume", vol, "device", dev, "fs", fs, "took", time.Since(start).Round(time.Millisecond))
		have = fs
	case mkfsArgs[have] == nil:
		return status.Errorf(codes.FailedPrecondition, "volume %s holds %s, not ext4 or xfs: it is not formatted over", vol, have)
	case want != "" && want != have:
		return status.Errorf(codes.FailedPrecondition, "volume %s has an %s filesystem, not the %s asked for: it is not formatted over", vol, have, want)
	}
	opts := slices.Clone(m.GetMountFlags())
	if have == "xfs" && !slices.Contains(opts, "nouuid") {
		// A clone's XFS has its parent's UUID, which XFS refuses to mount
		// twice on one host.
		opts = append(opts, "nouuid")
	}
	if ro {
		opts = append(opts, "ro")
	}
	args := []string{"-t", have}
	if len(opts) > 0 {
		args = append(args, "-o", strings.Join(opts, ","))
	}
	if _, err := tool(ctx, "mount", append(args, dev, staging)...); err != nil {
		return status.Errorf(codes.Internal, "volume %s: %v", vol, err)
	}
	if !ro {
		if err := grow(ctx, have, dev, staging); err != nil {
			n.log.Warn("the filesystem was not grown to its device", "volume", vol, "err", err)
		}
	}
	n.log.Info("staged", "volume", vol, "device", dev, "access", "mount", "fs", have, "path", staging)
	return nil
}

// NodeUnstageVolume implements csi.NodeServer: unmount the staging path and
// detach the device. Nothing staged is success.
func (n *node) NodeUnstageVolume(ctx context.Context, r *csi.NodeUnstageVolumeRequest) (*csi.NodeUnstageVolumeResponse, error) {
	vol, staging := r.GetVolumeId(), r.GetStagingTargetPath()
	if vol == "" {
		return nil, status.Error(codes.InvalidArgument, "volume id missing")
	}
	if staging == "" {
		return nil, status.Error(codes.InvalidArgument, "staging target path missing")
	}
	defer n.locks.lock(vol)()
	st, err := n.served(vol)
	if err != nil {
		return nil, err
	}
	if st == nil {
		// Nothing served here; a staging mount left by a device that is
		// gone still goes.
		if err := unmount(ctx, staging); err != nil {
			return nil, status.Errorf(codes.Internal, "volume %s: %v", vol, err)
		}
		return &csi.NodeUnstageVolumeResponse{}, nil
	}
	if !st.ServerAlive() && st.Mode == blockdev.ModeUblk {
		// Its I/O is queued: an unmount would wait on it for ever. Serve it
		// again so that the unmount completes, or stop it if another host
		// took the volume.
		old := st
		if st, err = n.recoverDevice(ctx, st); err != nil {
			if !n.abandonIfTaken(old, err) {
				return nil, status.Errorf(codes.Unavailable, "volume %s: its device's server died and is not recovered yet (unmounting would wait on its I/O): %v", vol, err)
			}
			st = old
		}
	}
	{
		if mountedFrom(staging, st.Device) {
			if err := unmount(ctx, staging); err != nil {
				return nil, status.Errorf(codes.Internal, "volume %s: %v", vol, err)
			}
		}
		pts, err := mountsOf(st.Device)
		if err != nil {
			return nil, status.Errorf(codes.Internal, "volume %s: %v", vol, err)
		}
		if len(pts) > 0 {
			return nil, status.Errorf(codes.FailedPrecondition, "volume %s: %s is still mounted at %s: unpublish it first", vol, st.Device, strings.Join(pts, ", "))
		}
		if err := n.detach(st); err != nil {
			return nil, err
		}
		n.log.Info("unstaged", "volume", vol, "device", st.Device)
	}
	return &csi.NodeUnstageVolumeResponse{}, nil
}

// NodePublishVolume implements csi.NodeServer: bind mount the staged
// filesystem, or the device node of a block volume, at the target path.
func (n *node) NodePublishVolume(ctx context.Context, r *csi.NodePublishVolumeRequest) (*csi.NodePublishVolumeResponse, error) {
	vol, target, staging := r.GetVolumeId(), r.GetTargetPath(), r.GetStagingTargetPath()
	switch {
	case vol == "":
		return nil, status.Error(codes.InvalidArgument, "volume id missing")
	case target == "":
		return nil, status.Error(codes.InvalidArgument, "target path missing")
	case staging == "":
		return nil, status.Error(codes.InvalidArgument, "staging target path missing (this driver stages)")
	}
	if err := checkCap(r.GetVolumeCapability()); err != nil {
		return nil, err
	}
	defer n.locks.lock(vol)()
	st, err := n.served(vol)
	if err != nil {
		return nil, err
	}
	if st == nil {
		return nil, status.Errorf(codes.FailedPrecondition, "volume %s is %v", vol, errNotStaged)
	}
	src := staging
	block := r.GetVolumeCapability().GetBlock() != nil
	if block {
		src = st.Device
	} else if ok, _ := isDevice(staging, st.Device); !ok {
		return nil, status.Errorf(codes.FailedPrecondition, "volume %s is not mounted at its staging path %s", vol, staging)
	}
	if mp, err := isMountPoint(target); err != nil {
		return nil, status.Errorf(codes.Internal, "mount table: %v", err)
	} else if mp {
		if ok, _ := isDevice(target, st.Device); ok {
			return &csi.NodePublishVolumeResponse{}, nil // published already
		}
		return nil, status.Errorf(codes.AlreadyExists, "target path %s has something else mounted", target)
	}
	if err := makeTarget(target, block); err != nil {
		return nil, status.Errorf(codes.Internal, "target path: %v", err)
	}
	if _, err := tool(ctx, "mount", "--bind", src, target); err != nil {
		return nil, status.Errorf(codes.Internal, "volume %s: %v", vol, err)
	}
	if r.GetReadonly() || readOnly(r.GetVolumeCapability()) {
		if _, err := tool(ctx, "mount", "-o", "remount,bind,ro", target); err != nil {
			unmount(ctx, target)
			return nil, status.Errorf(codes.Internal, "volume %s: %v", vol, err)
		}
	}
	n.log.Info("published", "volume", vol, "target", target, "block", block)
	return &csi.NodePublishVolumeResponse{}, nil
}

// makeTarget creates a target path: a directory, or for a block volume a
// file to bind the device node on.
func makeTarget(target string, block bool) error {
	if !block {
		return os.MkdirAll(target, 0o750)
	}
	if err := os.MkdirAll(filepath.Dir(target), 0o750); err != nil {
		return err
	}
	f, err := os.OpenFile(target, os.O_CREATE|os.O_RDONLY, 0o640)
	if err != nil {
		return err
	}
	return f.Close()
}

// NodeUnpublishVolume implements csi.NodeServer: unmount and remove the
// target path. A target that is gone is success.
func (n *node) NodeUnpublishVolume(ctx context.Context, r *csi.NodeUnpublishVolumeRequest) (*csi.NodeUnpublishVolumeResponse, error) {
	vol, target := r.GetVolumeId(), r.GetTargetPath()
	if vol == "" {
		return nil, status.Error(codes.InvalidArgument, "volume id missing")
	}
	if target == "" {
		return nil, status.Error(codes.InvalidArgument, "target path missing")
	}
	defer n.locks.lock(vol)()
	if err := unmount(ctx, target); err != nil {
		return nil, status.Errorf(codes.Internal, "volume %s: %v", vol, err)
	}
	if err := os.Remove(target); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, status.Errorf(codes.Internal, "volume %s: removing the target path: %v", vol, err)
	}
	n.log.Info("unpublished", "volume", vol, "target", target)
	return &csi.NodeUnpublishVolumeResponse{}, nil
}

// volumeAt checks that path is volume vol, served on this host, and
// returns its device's state: NOT_FOUND otherwise.
func (n *node) volumeAt(vol, path string) (*blockdev.State, error) {
	if vol == "" {
		return nil, status.Error(codes.InvalidArgument, "volume id missing")
	}
	if path == "" {
		return nil, status.Error(codes.InvalidArgument, "volume path missing")
	}
	st, err := n.served(vol)
	if err != nil {
		return nil, err
	}
	if st == nil {
		return nil, status.Errorf(codes.NotFound, "volume %s is %v", vol, errNotStaged)
	}
	if !fileExists(path) {
		return nil, status.Errorf(codes.NotFound, "volume path %s does not exist", path)
	}
	if ok, err := isDevice(path, st.Device); err != nil || !ok {
		return nil, status.Errorf(codes.NotFound, "volume path %s is not volume %s (%s)", path, vol, st.Device)
	}
	return st, nil
}

// NodeGetVolumeStats implements csi.NodeServer: a filesystem's bytes and
// inodes, a block volume's size.
func (n *node) NodeGetVolumeStats(ctx context.Context, r *csi.NodeGetVolumeStatsRequest) (*csi.NodeGetVolumeStatsResponse, error) {
	st, err := n.volumeAt(r.GetVolumeId(), r.GetVolumePath())
	if err != nil {
		return nil, err
	}
	resp := &csi.NodeGetVolumeStatsResponse{}
	var fi unix.Stat_t
	if err := unix.Stat(r.GetVolumePath(), &fi); err != nil {
		return nil, status.Errorf(codes.Internal, "%v", err)
	}
	if fi.Mode&unix.S_IFMT == unix.S_IFBLK {
		size, err := deviceSize(st.Device)
		if err != nil {
			return nil, status.Errorf(codes.Internal, "%v", err)
		}
		resp.Usage = []*csi.VolumeUsage{{Unit: csi.VolumeUsage_BYTES, Total: size}}
		return resp, nil
	}
	var sf unix.Statfs_t
	if err := unix.Statfs(r.GetVolumePath(), &sf); err != nil {
		return nil, status.Errorf(codes.Internal, "statfs %s: %v", r.GetVolumePath(), err)
	}
	bs := sf.Bsize
	resp.Usage = []*csi.VolumeUsage{
		{Unit: csi.VolumeUsage_BYTES, Total: int64(sf.Blocks) * bs, Available: int64(sf.Bavail) * bs, Used: int64(sf.Blocks-sf.Bfree) * bs},
		{Unit: csi.VolumeUsage_INODES, Total: int64(sf.Files), Available: int64(sf.Ffree), Used: int64(sf.Files - sf.Ffree)},
	}
	return resp, nil
}

// NodeGetVolumeHealth implements csi.NodeServer: a volume staged here is
// inaccessible while its device's server is dead.
func (n *node) NodeGetVolumeHealth(ctx context.Context, r *csi.NodeGetVolumeHealthRequest) (*csi.NodeGetVolumeHealthResponse, error) {
	vol := r.GetVolumeId()
	if vol == "" {
		return nil, status.Error(codes.InvalidArgument, "volume id missing")
	}
	st, err := n.served(vol)
	if err != nil {
		return nil, err
	}
	if st == nil {
		return nil, status.Errorf(codes.NotFound, "volume %s is %v", vol, errNotStaged)
	}
	h := &csi.VolumeHealth{VolumeId: vol}
	if !st.ServerAlive() {
		h.HealthStatuses = append(h.HealthStatuses, &csi.VolumeHealth_VolumeHealthEntry{
			Status: csi.VolumeHealthErrorType_INACCESSIBLE, Reason: "DeviceServerDead",
			Message: fmt.Sprintf("the server of %s died: its I/O waits (ublk) or fails (NBD) until the plugin recovers it or the volume is staged again", st.Device)})
	}
	return &csi.NodeGetVolumeHealthResponse{VolumeHealth: h}, nil
}

// growWait bounds how long NodeExpandVolume waits for the device to show
// the volume's new size.
const growWait = 30 * time.Second

// NodeExpandVolume implements csi.NodeServer: wait until the device shows
// the volume's new size (its server grows it live where the kernel can),
// then grow the filesystem of a mount volume.
func (n *node) NodeExpandVolume(ctx context.Context, r *csi.NodeExpandVolumeRequest) (*csi.NodeExpandVolumeResponse, error) {
	vol, path := r.GetVolumeId(), r.GetVolumePath()
	defer n.locks.lock(vol)()
	st, err := n.volumeAt(vol, path)
	if err != nil {
		return nil, err
	}
	want := r.GetCapacityRange().GetRequiredBytes()
	size, err := deviceSize(st.Device)
	for deadline := time.Now().Add(growWait); err == nil && size < want && time.Now().Before(deadline); {
		select {
		case <-ctx.Done():
			return nil, status.FromContextError(ctx.Err()).Err()
		case <-time.After(200 * time.Millisecond):
		}
		size, err = deviceSize(st.Device)
	}
	if err != nil {
		return nil, status.Errorf(codes.Internal, "%v", err)
	}
	if size < want {
		why := "the device did not grow"
		if v, verr := n.ms.Volume(ctx, vol); verr == nil {
			if d, ok, _ := n.ms.VolumeDevice(ctx, v); ok && d.Why != "" {
				why = d.Why
			}
		}
		return nil, status.Errorf(codes.FailedPrecondition, "volume %s: %s is %d bytes, not the %d asked for: %s; its filesystem grows when the volume is staged again (move or restart the pod)",
			vol, st.Device, size, want, why)
	}
	var fi unix.Stat_t
	if err := unix.Stat(path, &fi); err != nil {
		return nil, status.Errorf(codes.Internal, "%v", err)
	}
	if fi.Mode&unix.S_IFMT != unix.S_IFBLK && r.GetVolumeCapability().GetBlock() == nil {
		fstype, err := probe(ctx, st.Device)
		if err != nil {
			return nil, status.Errorf(codes.Internal, "volume %s: %v", vol, err)
		}
		if err := grow(ctx, fstype, st.Device, path); err != nil {
			return nil, status.Errorf(codes.Internal, "volume %s: %v", vol, err)
		}
		n.log.Info("filesystem grown", "volume", vol, "fs", fstype, "size", size)
	}
	return &csi.NodeExpandVolumeResponse{CapacityBytes: size}, nil
}
