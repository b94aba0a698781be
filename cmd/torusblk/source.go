package main

import (
	"context"
	"log/slog"
	"strings"
	"time"

	"github.com/spf13/pflag"

	"github.com/torus-storage/torus/cluster"
	"github.com/torus-storage/torus/engine"
	"github.com/torus-storage/torus/internal/blockdev"
	"github.com/torus-storage/torus/internal/cli"
	"github.com/torus-storage/torus/meta"
	"github.com/torus-storage/torus/store"
)

// volumeSource is the volume serve and attach take (and recover takes
// back), in one of two forms:
//
//	--store DIR --size SIZE            a local volume: a store on this machine
//	NAME [--etcd URL] [--tls-dir DIR]  a volume of a Torus cluster
//	NAME@SNAPSHOT [...]                one of its snapshots, read-only
//
// register defines the flags of both forms; parse picks the form from the
// positional arguments and checks it, once; open opens the volume.
type volumeSource struct {
	fs      *pflag.FlagSet
	store   string   // --store
	size    cli.Size // --size; the local volume's size
	cluster clusterFlags

	// name is the cluster volume's name, "" for a local volume.
	name string
	// snapshot is the snapshot of it to open read-only ("": the volume).
	snapshot string
	// path is the local volume's store: the file in --store DIR, or the
	// block device --store names.
	path string
}

// register defines the flags of both forms on fs.
func (s *volumeSource) register(fs *pflag.FlagSet) {
	s.fs = fs
	fs.StringVar(&s.store, "store", "", "local volume: `DIR` of the local store (created if absent), or a block device")
	fs.Var(&s.size, "size", "local volume: volume size, e.g. 10GiB (a multiple of 4 KiB)")
	s.cluster.register(fs)
}

// parse picks the form from args, the positional arguments of command cmd
// (a NAME is a cluster volume), and checks its flags. For a local volume
// it creates --store DIR if needed and checks that it can be written.
func (s *volumeSource) parse(cmd string, args []string) error {
	if len(args) > 1 {
		return cli.Usagef("unexpected argument %q: %s takes one cluster volume NAME, or --store and --size for a local volume", args[1], cmd)
	}
	if len(args) == 1 {
		s.name = args[0]
		if strings.Contains(s.name, "@") {
			r, err := meta.ParseSnapshotName(s.name)
			if err != nil {
				return cli.Usagef("%q: want NAME or NAME@SNAPSHOT", s.name)
			}
			s.name, s.snapshot = r.Volume, r.Name
		}
		if s.store != "" || s.fs.Changed("size") {
			return cli.Usagef("--store and --size are for a local volume; cluster volume %s lives in the cluster (its size is in etcd)", s.name)
		}
		if s.cluster.tlsDir == "" {
			return cli.Usagef("--tls-dir (or TORUS_TLS_DIR) is required for a cluster volume: a directory with this client's node.crt, node.key and ca.crt. " +
				"torusd dev prints one (its tls: line); for another cluster, issue one from the cluster CA (the --cluster-dir of torusctl init) " +
				"with netquic.IssueCert, as docs/OPERATIONS.md describes under Certificates")
		}
		if s.cluster.ttl < time.Second {
			return cli.Usagef("--lease-ttl %v: at least 1s", s.cluster.ttl)
		}
		return nil
	}
	if s.store == "" || !s.fs.Changed("size") {
		return cli.Usagef("--store and --size are required (example: --store /var/lib/torus/vol0 --size 10GiB), or give a cluster volume NAME")
	}
	if s.size <= 0 || s.size%4096 != 0 {
		return cli.Usagef("--size %s: must be a positive multiple of 4 KiB", &s.size)
	}
	var err error
	s.path, err = storePath(s.store)
	return err
}

// isCluster reports whether the volume is a cluster volume.
func (s *volumeSource) isCluster() bool { return s.name != "" }

// String names the volume: "cluster:NAME[@SNAPSHOT]", or the local
// store's path.
func (s *volumeSource) String() string {
	if s.snapshot != "" {
		return "cluster:" + s.name + "@" + s.snapshot
	}
	if s.isCluster() {
		return "cluster:" + s.name
	}
	return s.path
}

// open opens the volume: the local store, with shards io_uring shards (0:
// one per CPU), or the cluster volume under its attach lock, with the
// services sf asks for (none for the zero serviceFlags). For a cluster
// volume, wait > 0 keeps retrying while the attach lock is still held (by a
// server that died and whose lease has not expired yet).
func (s *volumeSource) open(ctx context.Context, shards int, wait time.Duration, sf serviceFlags, log *slog.Logger) (engine.Volume, error) {
	if !s.isCluster() {
		lv, err := store.OpenLocal(s.path, int64(s.size), store.LocalOptions{Logger: log, Shards: shards})
		if err != nil {
			return nil, err
		}
		return lv, nil
	}
	if s.snapshot != "" {
		return openSnapshot(ctx, s.name, s.snapshot, s.cluster, log)
	}
	cv, err := openCluster(ctx, s.name, s.cluster, wait, sf, log)
	if err != nil {
		return nil, err
	}
	return cv, nil
}

// record returns what the state file of an attached device keeps of the
// volume, for recover to open it again (sourceOf).
func (s *volumeSource) record() blockdev.Source {
	if s.isCluster() {
		cf := s.cluster
		return blockdev.Source{Volume: s.name, Etcd: cf.cluster.Etcd, Prefix: cf.cluster.Prefix, TLSDir: cf.tlsDir,
			TTL: cf.ttl.String(), ReplicaTimeout: cf.timeout.String(), Holder: cf.holder}
	}
	return blockdev.Source{Store: s.path}
}

// sourceOf returns the volume a device was attached from, as record kept
// it in the device's state st.
func sourceOf(st blockdev.State) *volumeSource {
	if st.Volume == "" {
		return &volumeSource{path: st.Store, size: cli.Size(st.Size)}
	}
	cf := clusterFlags{cluster: cli.Cluster{Etcd: st.Etcd, Prefix: st.Prefix}, tlsDir: st.TLSDir, holder: st.Holder, after: st.Epoch, ttl: cluster.DefaultAttachTTL, timeout: 5 * time.Second}
	if d, err := time.ParseDuration(st.TTL); err == nil {
		cf.ttl = d
	}
	if d, err := time.ParseDuration(st.ReplicaTimeout); err == nil {
		cf.timeout = d
	}
	return &volumeSource{name: st.Volume, cluster: cf}
}
