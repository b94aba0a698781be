package node

// Invariants of a node's data directory:
//   - DIR/identity.json is written (atomically: temporary file, fsync,
//     rename, fsync of DIR) before DIR/store is created, so a store never
//     exists without an identity naming its node and cluster.
//   - The identity's cluster id never changes: a data dir belongs to one
//     cluster for life, and torusd refuses to start it in another.
//   - The identity's node id never changes either: a restart on the same
//     data dir is the same node, with the same place in the ring.
//   - The store never shrinks: torusd refuses a --size below the capacity
//     of the existing store (the chunks beyond it would be lost).

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/torus-storage/torus/internal/units"
	"github.com/torus-storage/torus/store"
)

// File names inside a data directory.
const (
	identityFile = "identity.json"
	storeFile    = "store"
	tlsSubdir    = "tls"
)

// identity is the content of DIR/identity.json.
type identity struct {
	NodeID    string    `json:"node_id"`
	ClusterID string    `json:"cluster_id"`
	Created   time.Time `json:"created"`
	// Addr is the address the node last listened on; a node started with
	// port 0 (torusd dev) listens there again, so its address is stable.
	Addr string `json:"addr,omitempty"`
}

// readIdentity reads DIR/identity.json; ok is false if it does not exist.
func readIdentity(dir string) (id identity, ok bool, err error) {
	b, err := os.ReadFile(filepath.Join(dir, identityFile))
	if errors.Is(err, os.ErrNotExist) {
		return id, false, nil
	}
	if err != nil {
		return id, false, fmt.Errorf("read node identity: %w", err)
	}
	if err := json.Unmarshal(b, &id); err != nil || id.NodeID == "" || id.ClusterID == "" {
		return id, false, fmt.Errorf("node identity %s is corrupt (%v): restore it, or move the data dir away to start a new node",
			filepath.Join(dir, identityFile), err)
	}
	return id, true, nil
}

// writeIdentity replaces DIR/identity.json atomically and durably.
func writeIdentity(dir string, id identity) error {
	b, err := json.MarshalIndent(id, "", "  ")
	if err != nil {
		return fmt.Errorf("write node identity: %w", err)
	}
	if err := writeDurable(dir, identityFile, append(b, '\n')); err != nil {
		return fmt.Errorf("write node identity: %w", err)
	}
	return nil
}

// writeDurable replaces dir/name with b as a crash leaves either the old
// file or the new one, whole: b goes to a temporary file that is synced,
// then renamed over name, then the directory is synced.
func writeDurable(dir, name string, b []byte) error {
	path := filepath.Join(dir, name)
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	_, err = f.Write(b)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("%s: %w", path, err)
	}
	return syncDir(dir)
}

// syncDir makes the entries of dir (a rename, a removal) durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	return nil
}

// newNodeID returns a random node id.
func newNodeID() string {
	var b [6]byte
	rand.Read(b[:])
	return "node-" + hex.EncodeToString(b[:])
}

// prepareDataDir makes sure dir exists and is writable, and returns the
// node's identity: the existing one (refused if it belongs to another
// cluster or another --id) or a new one, written before anything else.
func prepareDataDir(dir, wantID, clusterID string) (identity, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return identity{}, fmt.Errorf("data dir %s: %w: pick a --data-dir you can write", dir, err)
	}
	probe, err := os.CreateTemp(dir, ".probe-*")
	if err != nil {
		return identity{}, fmt.Errorf("data dir %s is not writable (%w): fix its permissions or pick another --data-dir", dir, err)
	}
	probe.Close()
	os.Remove(probe.Name())

	id, ok, err := readIdentity(dir)
	if err != nil {
		return id, err
	}
	if ok {
		if id.ClusterID != clusterID {
			return id, fmt.Errorf("data dir %s belongs to cluster %s, but etcd holds cluster %s: "+
				"point --etcd/--prefix at cluster %s, or use another --data-dir for this one",
				dir, id.ClusterID, clusterID, id.ClusterID)
		}
		if wantID != "" && wantID != id.NodeID {
			return id, fmt.Errorf("data dir %s belongs to node %s, not --id %s: drop --id or use another --data-dir",
				dir, id.NodeID, wantID)
		}
		return id, nil
	}
	if _, err := os.Stat(filepath.Join(dir, storeFile)); err == nil {
		return id, fmt.Errorf("data dir %s holds a store but no %s: it was not made by torusd, or the identity was lost; "+
			"move it away to start a new node", dir, identityFile)
	}
	if wantID == "" {
		wantID = newNodeID()
	}
	id = identity{NodeID: wantID, ClusterID: clusterID, Created: time.Now().UTC()}
	return id, writeIdentity(dir, id)
}

// openStore opens DIR/store, or creates it with size bytes of chunks of
// chunkSize. An existing store must have the cluster's chunk size and at
// most size bytes of capacity; a larger --size is noted (stores do not
// grow yet) and the store keeps its capacity.
func openStore(dir string, size, chunkSize int64, clusterID string, log *slog.Logger) (*store.Store, error) {
	path := filepath.Join(dir, storeFile)
	if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
		// A new store holds none of what the node took before: clients
		// must see a new incarnation.
		if err := dropIncarnation(dir); err != nil {
			return nil, err
		}
		st, err := store.CreateStore(path, store.StoreOptions{
			ChunkSize: chunkSize,
			Slots:     size / chunkSize,
			ClusterID: []byte(clusterID),
			Logger:    log,
		})
		if err != nil {
			return nil, err
		}
		log.Info("created store", "path", path, "capacity", units.FormatSize(size/chunkSize*chunkSize),
			"chunk_size", units.FormatSize(chunkSize), "direct_io", st.Direct())
		return st, nil
	}
	st, err := store.OpenStore(path, store.StoreOptions{Logger: log, OnRecover: onRecover(dir, log)})
	if err != nil {
		return nil, fmt.Errorf("%w: if the store is damaged beyond repair, move %s away to start the node empty", err, path)
	}
	stats := st.Stats()
	capacity := stats.Slots * stats.ChunkSize
	switch {
	case stats.ChunkSize != chunkSize:
		st.Close()
		return nil, fmt.Errorf("store %s has chunks of %s but the cluster uses %s: it belongs to another cluster",
			path, units.FormatSize(stats.ChunkSize), units.FormatSize(chunkSize))
	case size < capacity:
		st.Close()
		return nil, fmt.Errorf("--size %s is smaller than the existing store %s (%s): stores do not shrink; "+
			"pass --size %s or more", units.FormatSize(size), path, units.FormatSize(capacity), units.FormatSize(capacity))
	case size/chunkSize > stats.Slots:
		log.Warn("--size is larger than the existing store, which keeps its capacity (stores do not grow yet)",
			"size", units.FormatSize(size), "capacity", units.FormatSize(capacity))
	}
	log.Info("opened store", "path", path, "capacity", units.FormatSize(capacity),
		"used_slots", stats.UsedSlots, "slots", stats.Slots, "recovered_blocks", stats.RecoveryFixed)
	return st, nil
}
