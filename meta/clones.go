package meta

// Clones: writable volumes made from a snapshot without copying it.
//
// Invariants:
//   - A clone's Parent names a committed snapshot of another volume, and
//     that snapshot's Clones lists the clone's name, both written in the
//     transaction that creates the clone; they are removed together, by
//     the transaction that deletes the clone or ends its flattening.
//   - A snapshot whose Clones is not empty is not deleted, nor is its
//     volume: every clone can always read it.
//   - A clone's record loses its Parent only in FinishFlatten, which the
//     clone's holder calls once every chunk of the clone is its own.

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// Parent is the snapshot a clone reads where it has no chunk of its own.
type Parent struct {
	// Volume and Name are the parent volume's id and name.
	Volume uint64 `json:"volume"`
	Name   string `json:"name"`
	// Snapshot and Snap are the snapshot's name and number.
	Snapshot string `json:"snapshot"`
	Snap     uint64 `json:"snap"`
	// Flatten asks the clone's holder to copy every chunk it still reads
	// from the parent and then drop the parent (FlattenVolume).
	Flatten bool `json:"flatten,omitempty"`
}

// CloneVolume creates volume name as a clone of snapshot src: as large as
// the snapshot, with its volume's replication and QoS, reading the
// snapshot wherever it has not written. No data is copied.
func (s *Client) CloneVolume(ctx context.Context, src SnapshotRequest, name string) (Volume, error) {
	if err := validName("volume name", name); err != nil {
		return Volume{}, err
	}
	p, err := s.Volume(ctx, src.Volume)
	if err != nil {
		return Volume{}, fmt.Errorf("meta: clone %s@%s: %w", src.Volume, src.Name, err)
	}
	sn, ok := p.Snapshot(src.Name)
	if !ok {
		return Volume{}, fmt.Errorf("meta: clone: volume %s has no snapshot %s: %w", src.Volume, src.Name, ErrNotFound)
	}
	tmpl := Volume{Size: sn.Size, Replication: p.Replication, QoS: p.QoS,
		Parent: &Parent{Volume: p.ID, Name: p.Name, Snapshot: sn.Name, Snap: sn.ID}}
	return s.create(ctx, name, tmpl, func(uint64) ([]clientv3.Cmp, []clientv3.Op, error) {
		p, rev, err := s.volume(ctx, src.Volume)
		if err != nil {
			return nil, nil, err
		}
		i := slices.IndexFunc(p.Snapshots, func(o Snapshot) bool { return o.ID == sn.ID && !o.Pending })
		if p.ID != tmpl.Parent.Volume || i < 0 {
			return nil, nil, fmt.Errorf("volume %s has no snapshot %s any more: %w", src.Volume, src.Name, ErrNotFound)
		}
		if !slices.Contains(p.Snapshots[i].Clones, name) {
			p.Snapshots[i].Clones = append(p.Snapshots[i].Clones, name)
		}
		js, _ := json.Marshal(p)
		return []clientv3.Cmp{clientv3.Compare(clientv3.ModRevision(s.volKey(p.ID)), "=", rev)},
			[]clientv3.Op{clientv3.OpPut(s.volKey(p.ID), string(js))}, nil
	})
}

// txnPart is part of a transaction: comparisons and operations.
type txnPart struct {
	cmps []clientv3.Cmp
	ops  []clientv3.Op
}

// unlinkClone returns what removes clone v (if it is one) from its
// parent's snapshot's Clones: the parent record as read now, compared.
func (s *Client) unlinkClone(ctx context.Context, v Volume) (txnPart, error) {
	if v.Parent == nil {
		return txnPart{}, nil
	}
	p, rev, err := s.volume(ctx, v.Parent.Name)
	if err != nil || p.ID != v.Parent.Volume {
		return txnPart{}, fmt.Errorf("parent %s of clone %s: %w", v.Parent.Name, v.Name, err)
	}
	for i := range p.Snapshots {
		if p.Snapshots[i].ID == v.Parent.Snap {
			p.Snapshots[i].Clones = slices.DeleteFunc(p.Snapshots[i].Clones, func(n string) bool { return n == v.Name })
		}
	}
	js, _ := json.Marshal(p)
	return txnPart{
		cmps: []clientv3.Cmp{clientv3.Compare(clientv3.ModRevision(s.volKey(p.ID)), "=", rev)},
		ops:  []clientv3.Op{clientv3.OpPut(s.volKey(p.ID), string(js))},
	}, nil
}

// FlattenVolume asks the holder of clone name (its attached client, else
// a storage node's maintenance job) to copy every chunk it still reads from
// its parent, and then to drop the parent (FinishFlatten). Progress shows
// in the volume's progress record. It fails with ErrInvalid if the volume
// is not a clone.
func (s *Client) FlattenVolume(ctx context.Context, name string) (Volume, error) {
	for range maxTries {
		v, rev, err := s.volume(ctx, name)
		if err != nil {
			return v, fmt.Errorf("meta: flatten: %w", err)
		}
		if v.Parent == nil {
			return v, fmt.Errorf("meta: flatten %s: not a clone (or flattened already): %w", name, ErrInvalid)
		}
		if v.Parent.Flatten {
			return v, nil
		}
		v.Parent.Flatten = true
		js, _ := json.Marshal(v)
		tr, err := s.txn(ctx, []clientv3.Cmp{clientv3.Compare(clientv3.ModRevision(s.volKey(v.ID)), "=", rev)},
			[]clientv3.Op{clientv3.OpPut(s.volKey(v.ID), string(js))}, nil)
		if err != nil {
			return v, fmt.Errorf("meta: flatten %s: %w", name, err)
		}
		if tr.Succeeded {
			return v, nil
		}
	}
	return Volume{}, fmt.Errorf("meta: flatten %s: contended %d times: %w", name, maxTries, ErrConflict)
}

// FinishFlatten drops the parent of clone name, whose every chunk is now
// its own, and removes it from its parent's snapshot's clones, in one
// transaction. Call it on a client guarded by the clone's attach lease.
func (s *Client) FinishFlatten(ctx context.Context, name string) error {
	for range maxTries {
		v, rev, err := s.volume(ctx, name)
		if err != nil {
			return fmt.Errorf("meta: finish flatten: %w", err)
		}
		if v.Parent == nil {
			return nil
		}
		unlink, err := s.unlinkClone(ctx, v)
		if err != nil {
			return fmt.Errorf("meta: finish flatten %s: %w", name, err)
		}
		v.Parent = nil
		js, _ := json.Marshal(v)
		tr, err := s.txn(ctx, append([]clientv3.Cmp{clientv3.Compare(clientv3.ModRevision(s.volKey(v.ID)), "=", rev)}, unlink.cmps...),
			append([]clientv3.Op{clientv3.OpPut(s.volKey(v.ID), string(js))}, unlink.ops...), nil)
		if err != nil {
			return fmt.Errorf("meta: finish flatten %s: %w", name, err)
		}
		if tr.Succeeded {
			return nil
		}
	}
	return fmt.Errorf("meta: finish flatten %s: contended %d times: %w", name, maxTries, ErrConflict)
}
