package meta

// Invariants of volume records:
//   - by-name/NAME exists iff volumes/ID exists with Name == NAME; both are
//     created and deleted in one transaction.
//   - Size only grows (ResizeVolume refuses to shrink).
//   - A volume is deleted only while its attach key is absent, checked in
//     the deleting transaction, which also deletes its epoch, missed marks,
//     progress, moves and placement records.
//   - A volume is created with placed/ID = the version of the ring current
//     in the creating transaction (see moves.go).

import (
	"context"
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// Volume states.
const (
	// VolumeReady is a volume that can be attached.
	VolumeReady = "ready"
)

// Volume is the metadata of a volume.
type Volume struct {
	// ID is allocated by CreateVolume, never reused; it is the volume
	// number in chunk keys (ring.ChunkKey).
	ID uint64 `json:"id"`
	// Name is unique in the cluster.
	Name string `json:"name"`
	// Size in bytes.
	Size uint64 `json:"size"`
	// Replication is the number of copies of each chunk.
	Replication int `json:"replication"`
	// State is VolumeReady.
	State string `json:"state"`
	// Created is when CreateVolume ran.
	Created time.Time `json:"created"`
	// SnapSeq is the newest snapshot number given out (0: none); its
	// holder makes every change under it (see snapshots.go).
	SnapSeq uint64 `json:"snap_seq,omitempty"`
	// Snapshots, by ascending ID.
	Snapshots []Snapshot `json:"snapshots,omitempty"`
	// Parent is, for a clone, the snapshot it reads where it has no chunk
	// of its own (nil once flattened, and for other volumes).
	Parent *Parent `json:"parent,omitempty"`
	// QoS are the I/O limits the attached client enforces (qos.go);
	// the zero QoS is unlimited.
	QoS QoS `json:"qos"`
}

// maxTries bounds CAS retry loops against concurrent writers.
const maxTries = 64

func (s *Client) volKey(id uint64) string    { return fmt.Sprintf("%s%020d", s.kVolumes, id) }
func (s *Client) attachKey(id uint64) string { return fmt.Sprintf("%s%020d", s.kAttach, id) }
func (s *Client) epochKey(id uint64) string  { return fmt.Sprintf("%s%020d", s.kEpochs, id) }

// clientEpochKey holds the epoch of the volume's last attach by a client
// (not a storage node's maintenance lock).
func (s *Client) clientEpochKey(id uint64) string { return fmt.Sprintf("%s%020d", s.kClientEpochs, id) }

// CreateVolume creates a volume of size bytes with replication copies
// (0: the cluster default from Config), with the settings opts give (such
// as WithQoS). It fails with ErrExists if name is taken, and with
// ErrInvalid for a bad setting.
func (s *Client) CreateVolume(ctx context.Context, name string, size uint64, replication int, opts ...VolumeOption) (Volume, error) {
	if err := validName("volume name", name); err != nil {
		return Volume{}, err
	}
	var set Volume
	for _, o := range opts {
		o(&set)
	}
	if err := set.QoS.Validate(); err != nil {
		return Volume{}, fmt.Errorf("meta: create volume %s: %w", name, err)
	}
	if size == 0 {
		return Volume{}, fmt.Errorf("meta: create volume %s: size 0: %w", name, ErrInvalid)
	}
	if replication <= 0 {
		cfg, err := s.Config(ctx)
		if err != nil {
			return Volume{}, fmt.Errorf("meta: create volume %s: %w", name, err)
		}
		replication = cfg.Replication
	}
	return s.create(ctx, name, Volume{Size: size, Replication: replication, QoS: set.QoS}, nil)
}

// create creates volume name from tmpl (size, replication, settings); more,
// if not nil, gives for the new volume's id further comparisons and
// operations of the creating transaction (a clone's parent record).
func (s *Client) create(ctx context.Context, name string, tmpl Volume, more func(id uint64) ([]clientv3.Cmp, []clientv3.Op, error)) (Volume, error) {
	nameKey := s.kByName + name
	for range maxTries {
		resp, err := s.cli.Get(ctx, s.kNextID)
		if err != nil {
			return Volume{}, fmt.Errorf("meta: create volume %s: read id counter: %w", name, err)
		}
		id, rev := uint64(1), int64(0)
		if len(resp.Kvs) == 1 {
			if id, err = strconv.ParseUint(string(resp.Kvs[0].Value), 10, 64); err != nil {
				return Volume{}, fmt.Errorf("meta: create volume %s: corrupt id counter: %w", name, err)
			}
			rev = resp.Kvs[0].ModRevision
		}
		v := tmpl
		v.ID, v.Name, v.State, v.Created = id, name, VolumeReady, time.Now().UTC()
		js, _ := json.Marshal(v)
		// The new volume has no data: its placement is recorded up to the
		// current ring (checked unchanged in the same transaction).
		r, ringRev, err := s.Ring(ctx)
		if err != nil {
			return Volume{}, fmt.Errorf("meta: create volume %s: %w", name, err)
		}
		cmps := []clientv3.Cmp{
			clientv3.Compare(clientv3.CreateRevision(nameKey), "=", 0),
			clientv3.Compare(clientv3.ModRevision(s.kNextID), "=", rev),
			clientv3.Compare(clientv3.ModRevision(s.kRing), "=", ringRev),
		}
		ops := []clientv3.Op{
			clientv3.OpPut(nameKey, strconv.FormatUint(id, 10)),
			clientv3.OpPut(s.volKey(id), string(js)),
			clientv3.OpPut(s.kNextID, strconv.FormatUint(id+1, 10)),
			clientv3.OpPut(s.placedKey(id), strconv.FormatUint(r.Version(), 10)),
		}
		if more != nil {
			c, o, err := more(id)
			if err != nil {
				return Volume{}, fmt.Errorf("meta: create volume %s: %w", name, err)
			}
			cmps, ops = append(cmps, c...), append(ops, o...)
		}
		tr, err := s.txn(ctx, cmps, ops, []clientv3.Op{clientv3.OpGet(nameKey, clientv3.WithCountOnly())})
		if err != nil {
			return Volume{}, fmt.Errorf("meta: create volume %s: %w", name, err)
		}
		if tr.Succeeded {
			return v, nil
		}
		if tr.Responses[0].GetResponseRange().Count > 0 {
			return Volume{}, fmt.Errorf("meta: volume %s already exists: %w", name, ErrExists)
		}
	}
	return Volume{}, fmt.Errorf("meta: create volume %s: id counter contended %d times: %w", name, maxTries, ErrConflict)
}

// volume reads a volume by name with the mod revision of its record.
func (s *Client) volume(ctx context.Context, name string) (Volume, int64, error) {
	var v Volume
	if err := validName("volume name", name); err != nil {
		return v, 0, err
	}
	resp, err := s.cli.Get(ctx, s.kByName+name)
	if err != nil {
		return v, 0, fmt.Errorf("meta: read volume %s: %w", name, err)
	}
	if len(resp.Kvs) == 0 {
		return v, 0, fmt.Errorf("meta: volume %s: %w", name, ErrNotFound)
	}
	id, err := strconv.ParseUint(string(resp.Kvs[0].Value), 10, 64)
	if err != nil {
		return v, 0, fmt.Errorf("meta: volume %s: corrupt id: %w", name, err)
	}
	resp, err = s.cli.Get(ctx, s.volKey(id))
	if err != nil {
		return v, 0, fmt.Errorf("meta: read volume %s: %w", name, err)
	}
	if len(resp.Kvs) == 0 { // deleted between the two reads
		return v, 0, fmt.Errorf("meta: volume %s: %w", name, ErrNotFound)
	}
	if err := json.Unmarshal(resp.Kvs[0].Value, &v); err != nil {
		return v, 0, fmt.Errorf("meta: decode volume %s: %w", name, err)
	}
	return v, resp.Kvs[0].ModRevision, nil
}

// Volume returns the volume called name, or ErrNotFound.
func (s *Client) Volume(ctx context.Context, name string) (Volume, error) {
	v, _, err := s.volume(ctx, name)
	return v, err
}

// Volumes returns all volumes, ordered by ID.
func (s *Client) Volumes(ctx context.Context) ([]Volume, error) {
	// Records are volumes/<digits>; by-name/ and next-id sort after '9'.
	resp, err := s.cli.Get(ctx, s.kVolumes+"0", clientv3.WithRange(s.kVolumes+":"))
	if err != nil {
		return nil, fmt.Errorf("meta: list volumes: %w", err)
	}
	vols := make([]Volume, 0, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		var v Volume
		if err := json.Unmarshal(kv.Value, &v); err != nil {
			return nil, fmt.Errorf("meta: decode volume %s: %w", kv.Key, err)
		}
		vols = append(vols, v)
	}
	return vols, nil
}

// DeleteVolume removes the volume called name. It is refused with
// ErrAttached while the volume is attached.
func (s *Client) DeleteVolume(ctx context.Context, name string) error {
	for range maxTries {
		v, rev, err := s.volume(ctx, name)
		if err != nil {
			return fmt.Errorf("meta: delete: %w", err)
		}
		for _, sn := range v.Snapshots {
			if len(sn.Clones) > 0 {
				return fmt.Errorf("meta: delete volume %s: snapshot %s has clones %s: flatten or delete them first: %w",
					name, sn.Name, strings.Join(sn.Clones, ", "), ErrInUse)
			}
		}
		ak := s.attachKey(v.ID)
		unlink, err := s.unlinkClone(ctx, v)
		if err != nil {
			return fmt.Errorf("meta: delete volume %s: %w", name, err)
		}
		tr, err := s.txn(ctx,
			append([]clientv3.Cmp{
				clientv3.Compare(clientv3.ModRevision(s.volKey(v.ID)), "=", rev),
				clientv3.Compare(clientv3.CreateRevision(ak), "=", 0),
			}, unlink.cmps...),
			append([]clientv3.Op{
				clientv3.OpDelete(s.kByName + name),
				clientv3.OpDelete(s.volKey(v.ID)),
				clientv3.OpDelete(s.epochKey(v.ID)),
				clientv3.OpDelete(s.clientEpochKey(v.ID)),
				clientv3.OpDelete(s.releasedKey(v.ID)),
				clientv3.OpDelete(fmt.Sprintf("%s%020d/", s.kSnapUse, v.ID), clientv3.WithPrefix()),
				clientv3.OpDelete(s.missedVolPrefix(v.ID), clientv3.WithPrefix()),
				clientv3.OpDelete(s.progressKey(v.ID)),
				clientv3.OpDelete(s.movesKey(v.ID)),
				clientv3.OpDelete(s.placedKey(v.ID)),
				clientv3.OpDelete(s.SnapRequestKey(v.ID)),
				clientv3.OpDelete(s.SnapAckKey(v.ID)),
			}, unlink.ops...),
			[]clientv3.Op{clientv3.OpGet(ak)})
		if err != nil {
			return fmt.Errorf("meta: delete volume %s: %w", name, err)
		}
		if tr.Succeeded {
			return nil
		}
		if kvs := tr.Responses[0].GetResponseRange().Kvs; len(kvs) == 1 {
			return fmt.Errorf("meta: delete volume %s: %w", name, attachedError(name, kvs[0].Value))
		}
	}
	return fmt.Errorf("meta: delete volume %s: contended %d times: %w", name, maxTries, ErrConflict)
}

// ResizeVolume grows the volume called name to newSize bytes. Shrinking is
// refused with ErrShrink; the same size is a no-op.
func (s *Client) ResizeVolume(ctx context.Context, name string, newSize uint64) (Volume, error) {
	for range maxTries {
		v, rev, err := s.volume(ctx, name)
		if err != nil {
			return v, fmt.Errorf("meta: resize: %w", err)
		}
		if newSize < v.Size {
			return v, fmt.Errorf("meta: resize volume %s to %d bytes: %w (%d bytes)", name, newSize, ErrShrink, v.Size)
		}
		if newSize == v.Size {
			return v, nil
		}
		v.Size = newSize
		js, _ := json.Marshal(v)
		tr, err := s.txn(ctx,
			[]clientv3.Cmp{clientv3.Compare(clientv3.ModRevision(s.volKey(v.ID)), "=", rev)},
			[]clientv3.Op{clientv3.OpPut(s.volKey(v.ID), string(js))}, nil)
		if err != nil {
			return v, fmt.Errorf("meta: resize volume %s: %w", name, err)
		}
		if tr.Succeeded {
			return v, nil
		}
	}
	return Volume{}, fmt.Errorf("meta: resize volume %s: contended %d times: %w", name, maxTries, ErrConflict)
}
