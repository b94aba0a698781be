package meta

// The device record of an attached volume, and the watch of one volume's
// record: how a resize reaches the holder, and how torusctl learns what the
// holder's device made of it.
//
// Invariants:
//   - devices/ID is written only by the holder of the volume's attach lock,
//     in a transaction guarded like every holder write (epoch and lease,
//     see Guarded), and under the holder's current lease: it vanishes with
//     the lock, so a record present belongs to the live holder.
//   - WatchVolume delivers records in increasing revision order and always
//     the latest one (a slow reader loses only intermediate ones); it ends
//     when the volume is deleted.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strconv"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// How a device follows a volume that grows (Device.Grow).
const (
	// GrowLive: the device grows while attached (ublk with
	// UBLK_F_UPDATE_SIZE, the kernel NBD client over netlink).
	GrowLive = "live"
	// GrowReconnect: an NBD export; each new connection's handshake gives
	// the new size, connected clients keep the size they were given.
	GrowReconnect = "reconnect"
	// GrowReattach: the device keeps its size until it is detached and
	// attached again (Device.Why says why).
	GrowReattach = "reattach"
)

// Device is what the holder of a volume's attach lock reports of the
// device or export that serves it, for torusctl volume resize and info.
type Device struct {
	// Holder and Host name the process, as in the attach lock (SetDevice
	// sets them).
	Holder string `json:"holder"`
	Host   string `json:"host"`
	// Path is the device (/dev/ublkb0, /dev/nbd3) or the NBD listen
	// address of an export.
	Path string `json:"path"`
	// Frontend is "ublk", "nbd" (the kernel NBD client) or "nbd-export".
	Frontend string `json:"frontend"`
	// Size is the size in bytes the device shows now (an export: the size
	// its next connection is given).
	Size uint64 `json:"size"`
	// Grow is GrowLive, GrowReconnect or GrowReattach.
	Grow string `json:"grow"`
	// Why says why the device cannot grow live, and what to do, when Grow
	// is not GrowLive, or why the last growth failed.
	Why string `json:"why,omitempty"`
	// Updated is when the record was written.
	Updated time.Time `json:"updated"`
}

func (s *Client) deviceKey(id uint64) string {
	return fmt.Sprintf("%sv%d/devices/%020d", s.prefix, SchemaMajor, id)
}

// SetDevice records d as the device of l's volume, under l's lease (the
// lease of its latest Reattach): the record goes with the lock. It fails
// with ErrNotHolder or ErrLeaseLost like every guarded write.
func (s *Client) SetDevice(ctx context.Context, l *AttachLease, d Device) error {
	g := s.Guarded(l)
	d.Holder = l.holder
	if d.Host == "" {
		d.Host, _ = os.Hostname()
	}
	d.Updated = time.Now().UTC()
	js, _ := json.Marshal(d)
	tr, err := g.txn(ctx, nil,
		[]clientv3.Op{clientv3.OpPut(s.deviceKey(l.volume.ID), string(js), clientv3.WithLease(clientv3.LeaseID(l.g.lease.Load())))}, nil)
	if err != nil {
		return fmt.Errorf("meta: record the device of volume %s: %w", l.volume.Name, err)
	}
	if !tr.Succeeded {
		return fmt.Errorf("meta: record the device of volume %s: refused", l.volume.Name)
	}
	return nil
}

// VolumeDevice returns the device the holder of volume v reports, and
// false if none does (not attached, or by a process that reports none).
func (s *Client) VolumeDevice(ctx context.Context, v Volume) (Device, bool, error) {
	var d Device
	resp, err := s.cli.Get(ctx, s.deviceKey(v.ID))
	if err != nil {
		return d, false, fmt.Errorf("meta: read the device of volume %s: %w", v.Name, err)
	}
	if len(resp.Kvs) == 0 {
		return d, false, nil
	}
	if err := json.Unmarshal(resp.Kvs[0].Value, &d); err != nil {
		return d, false, fmt.Errorf("meta: decode the device of volume %s: %w", v.Name, err)
	}
	return d, true, nil
}

// WatchVolumeDevice delivers the device record of volume v now (false: none)
// and after every change, until ctx is done, when the channel is closed.
// Changes are coalesced for a slow reader.
func (s *Client) WatchVolumeDevice(ctx context.Context, v Volume) <-chan DeviceUpdate {
	out := make(chan DeviceUpdate, 1)
	go func() {
		defer close(out)
		s.watchRead(ctx, "device watch", s.deviceKey(v.ID), func(ctx context.Context) (int64, error) {
			resp, err := s.cli.Get(ctx, s.deviceKey(v.ID))
			if err != nil {
				return 0, err
			}
			var u DeviceUpdate
			if len(resp.Kvs) == 1 {
				if err := json.Unmarshal(resp.Kvs[0].Value, &u.Device); err != nil {
					return 0, fmt.Errorf("meta: decode the device of volume %s: %w", v.Name, err)
				}
				u.OK = true
			}
			offerLatest(out, u)
			return resp.Header.Revision, nil
		})
	}()
	return out
}

// DeviceUpdate is one delivery of WatchVolumeDevice: OK is false while no
// device is recorded.
type DeviceUpdate struct {
	Device
	OK bool
}

// errVolumeGone ends WatchVolume's reads once the volume is deleted.
var errVolumeGone = errors.New("volume deleted")

// WatchVolume delivers the record of volume id now and after every change
// to it (a resize), until ctx is done or the volume is deleted; then the
// channel is closed. A slow reader gets only the latest record. It never
// gives up while the volume exists: after a compaction, a watch error or an
// unreachable etcd it reads and watches again.
func (s *Client) WatchVolume(ctx context.Context, id uint64) <-chan Volume {
	out := make(chan Volume, 1)
	ctx, cancel := context.WithCancel(ctx)
	go func() {
		defer close(out)
		defer cancel()
		key := s.volKey(id)
		s.watchRead(ctx, "volume record watch", key, func(rctx context.Context) (int64, error) {
			resp, err := s.cli.Get(rctx, key)
			if err != nil {
				return 0, err
			}
			if len(resp.Kvs) == 0 {
				cancel()
				return 0, fmt.Errorf("meta: volume %s: %w", strconv.FormatUint(id, 10), errVolumeGone)
			}
			var v Volume
			if err := json.Unmarshal(resp.Kvs[0].Value, &v); err != nil {
				return 0, fmt.Errorf("meta: decode volume %d: %w", id, err)
			}
			offerLatest(out, v)
			return resp.Header.Revision, nil
		})
	}()
	return out
}

// AttachHolder returns who holds the attach lock of volume v (false: no
// one), and whether it is a storage node's maintenance job.
func (s *Client) AttachHolder(ctx context.Context, v Volume) (holder, host string, maintenance, ok bool, err error) {
	resp, err := s.cli.Get(ctx, s.attachKey(v.ID))
	if err != nil {
		return "", "", false, false, fmt.Errorf("meta: read the attach lock of volume %s: %w", v.Name, err)
	}
	if len(resp.Kvs) == 0 {
		return "", "", false, false, nil
	}
	var a attachRecord
	if err := json.Unmarshal(resp.Kvs[0].Value, &a); err != nil {
		return "", "", false, false, fmt.Errorf("meta: decode the attach lock of volume %s: %w", v.Name, err)
	}
	return a.Holder, a.Host, a.Maintenance, true, nil
}
