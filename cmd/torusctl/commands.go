package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/pflag"

	"github.com/torus-storage/torus/internal/cli"
	"github.com/torus-storage/torus/internal/units"
	"github.com/torus-storage/torus/meta"
	"github.com/torus-storage/torus/netquic"
)

// commands returns the command table.
func commands() []command {
	return []command{
		{path: "init", summary: "create the cluster: its CA and its config in etcd",
			flags: "--cluster-dir DIR [--chunk-size 1MiB] [--replication 3]", build: buildInit},
		{path: "status", summary: "the cluster's config, nodes, volumes and background work", build: plain(cmdStatus)},
		{path: "node list", summary: "the live storage nodes", build: plain(cmdNodeList)},
		{path: "node remove", summary: "take a node out of the ring", args: "ID", flags: "[--force]", nargs: 1, build: buildNodeRemove},
		{path: "ring show", summary: "the placement ring", build: plain(cmdRingShow)},
		{path: "ring set-replication", summary: "the replication of volumes created from now on", args: "N", nargs: 1,
			build: plain(cmdRingSetReplication)},
		{path: "volume create", summary: "create a volume", args: "NAME", flags: "--size SIZE [--replication N] " + qosFlagsUsage, nargs: 1,
			build: buildVolumeCreate},
		{path: "volume list", summary: "the volumes, with the bytes they take on the nodes' disks (all replicas)", build: plain(cmdVolumeList)},
		{path: "volume info", summary: "a volume, its attach epoch, its copies and its bytes on the nodes' disks (all replicas)", args: "NAME",
			nargs: 1, build: plain(cmdVolumeInfo)},
		{path: "volume resize", summary: "grow a volume (and its attached device, where it can)", args: "NAME", flags: "--size SIZE [--wait 30s]",
			nargs: 1, build: buildVolumeResize},
		{path: "volume set-qos", summary: "change a volume's I/O limits, live", args: "NAME", flags: qosFlagsUsage, nargs: 1,
			build: buildVolumeSetQoS},
		{path: "volume delete", summary: "delete a volume", args: "NAME", nargs: 1, build: plain(cmdVolumeDelete)},
		{path: "volume clone", summary: "make a writable volume from a snapshot, at once (no data copied)", args: "VOLUME@SNAPSHOT NAME",
			nargs: 2, build: plain(cmdVolumeClone)},
		{path: "volume flatten", summary: "make a clone hold all its data, in the background, and drop its parent snapshot", args: "NAME",
			nargs: 1, build: plain(cmdVolumeFlatten)},
		{path: "volume rollback", summary: "make a detached volume read as one of its snapshots again", args: "VOLUME@SNAPSHOT",
			flags: "--tls-dir DIR", nargs: 1, build: buildVolumeRollback},
		{path: "snapshot create", summary: "snapshot one volume, or several at one instant (--group)", args: "VOLUME@SNAPSHOT...",
			flags: "[--group NAME] [--wait 10s]", nargs: 1, maxArgs: -1, build: buildSnapshotCreate},
		{path: "snapshot list", summary: "the snapshots of every volume, or of one, with the bytes only each holds", args: "[VOLUME]", maxArgs: 1,
			build: plain(cmdSnapshotList)},
		{path: "snapshot diff", summary: "the extents that differ between two snapshots of a volume", args: "VOLUME@FROM VOLUME@TO",
			flags: "--tls-dir DIR", nargs: 2, build: buildSnapshotDiff},
		{path: "snapshot delete", summary: "delete a snapshot (the nodes give its space back)", args: "VOLUME@SNAPSHOT", nargs: 1,
			build: plain(cmdSnapshotDelete)},
	}
}

// plain is the build function of a command without flags of its own.
func plain(f runFunc) func(*pflag.FlagSet) runFunc {
	return func(*pflag.FlagSet) runFunc { return f }
}

// withStore opens the metadata client, runs f and closes the client.
func withStore(ctx context.Context, e *env, f func(s *meta.Client) error) error {
	s, err := e.g.open(ctx)
	if err != nil {
		return err
	}
	defer s.Close()
	return f(s)
}

// printJSON writes v as indented JSON.
func (e *env) printJSON(v any) error { return cli.WriteJSON(e.stdout, v) }

// table returns a tabwriter on stdout; Flush it.
func (e *env) table() *tabwriter.Writer {
	return tabwriter.NewWriter(e.stdout, 0, 8, 2, ' ', 0)
}

// volumeSize checks the --size of a volume: given, positive, a multiple of
// 4 KiB.
func volumeSize(fs *pflag.FlagSet, size cli.Size) (uint64, error) {
	if !fs.Changed("size") {
		return 0, cli.Usagef("--size is required (example: --size 10GiB)")
	}
	if size <= 0 || size%4096 != 0 {
		return 0, cli.Usagef("--size %s: must be a positive multiple of 4 KiB", &size)
	}
	return uint64(size), nil
}

func plural(n int, one, many string) string {
	if n == 1 {
		return fmt.Sprintf("%d %s", n, one)
	}
	return fmt.Sprintf("%d %s", n, many)
}

// initResult is what init prints.
type initResult struct {
	ClusterID   string `json:"cluster_id"`
	ChunkSize   uint64 `json:"chunk_size"`
	Replication int    `json:"replication"`
	CADir       string `json:"ca_dir"`
}

func buildInit(fs *pflag.FlagSet) runFunc {
	dir := fs.String("cluster-dir", "", "`DIR` for the cluster CA (ca.crt, ca.key); created if absent")
	chunk := cli.Size(units.MiB)
	fs.Var(&chunk, "chunk-size", "placement chunk size, a power of two from 64KiB to 2MiB")
	repl := fs.Int("replication", 3, "default number of copies of each chunk")
	return func(ctx context.Context, e *env, _ []string) error {
		if *dir == "" {
			return cli.Usagef("--cluster-dir is required (example: --cluster-dir /etc/torus)")
		}
		cs := int64(chunk)
		if cs <= 0 || meta.CheckChunkSize(uint64(cs)) != nil {
			return cli.Usagef("--chunk-size %s: must be a power of two from 64KiB to 2MiB "+
				"(64KiB, 128KiB, 256KiB, 512KiB, 1MiB or 2MiB)", &chunk)
		}
		if *repl < 1 {
			return cli.Usagef("--replication %d: must be at least 1", *repl)
		}
		return withStore(ctx, e, func(s *meta.Client) error {
			// Refuse before touching the CA directory if etcd already
			// holds a cluster.
			if _, err := s.Config(ctx); err == nil {
				return fmt.Errorf("prefix %s of etcd %s already holds a cluster (see 'torusctl status'): "+
					"use another --prefix to create a second one", s.Prefix(), e.g.cluster.Etcd)
			} else if !errors.Is(err, meta.ErrNotInitialized) {
				return err
			}
			if err := netquic.NewCA(*dir); err != nil {
				return fmt.Errorf("%w: remove the old CA or pick another --cluster-dir", err)
			}
			var b [16]byte
			rand.Read(b[:])
			cfg := meta.Config{ClusterID: hex.EncodeToString(b[:]), ChunkSize: uint64(cs), Replication: *repl}
			if err := s.Init(ctx, cfg); err != nil {
				// The CA was created just now and belongs to no cluster.
				os.Remove(filepath.Join(*dir, netquic.CAKeyFile))
				os.Remove(filepath.Join(*dir, netquic.CACertFile))
				if errors.Is(err, meta.ErrAlreadyInitialized) {
					return fmt.Errorf("%w: use another --prefix to create a second one", err)
				}
				return err
			}
			abs, _ := filepath.Abs(*dir)
			res := initResult{cfg.ClusterID, cfg.ChunkSize, cfg.Replication, abs}
			if e.g.output == cli.JSON {
				return e.printJSON(res)
			}
			fmt.Fprintf(e.stdout, "initialised cluster %s under %s (chunk size %s, replication %d)\nCA in %s\n",
				res.ClusterID, s.Prefix(), units.FormatSize(cs), res.Replication, abs)
			return nil
		})
	}
}

// statusResult is what status prints.
type statusResult struct {
	ClusterID   string    `json:"cluster_id"`
	Created     time.Time `json:"created"`
	ChunkSize   uint64    `json:"chunk_size"`
	Replication int       `json:"replication"`
	LiveNodes   int       `json:"live_nodes"`
	Volumes     int       `json:"volumes"`
	RingVersion uint64    `json:"ring_version"`
	// Full lists the nodes that refused writes for lack of space;
	// NearFull those at or above their near-full ratio that still take
	// writes.
	Full     []fullNode     `json:"full"`
	NearFull []nearFullNode `json:"near_full"`
	// Degraded lists volumes with missed marks; Jobs the rebuild,
	// rebalance and scrub progress of volumes.
	Degraded []degradedResult `json:"degraded"`
	Jobs     []jobResult      `json:"jobs"`
	// Moving lists the volumes whose chunks are not all placed under the
	// current ring yet: a node removed from the ring still holds copies
	// of theirs until this is empty.
	Moving []meta.MovingVolume `json:"moving"`
}

func cmdStatus(ctx context.Context, e *env, _ []string) error {
	return withStore(ctx, e, func(s *meta.Client) error {
		cfg, err := s.Config(ctx)
		if err != nil {
			return err
		}
		nodes, err := s.Nodes(ctx)
		if err != nil {
			return err
		}
		vols, err := s.Volumes(ctx)
		if err != nil {
			return err
		}
		r, _, err := s.Ring(ctx)
		if err != nil {
			return err
		}
		names := make(map[uint64]string, len(vols))
		for _, v := range vols {
			names[v.ID] = v.Name
		}
		deg, jobs, err := healthOf(ctx, s, names)
		if err != nil {
			return err
		}
		full, near := []fullNode{}, []nearFullNode{}
		for _, n := range nodes {
			switch {
			case n.Full:
				full = append(full, fullNode{n.ID, n.Used, n.Capacity, n.NoSpace})
			case n.NearFull:
				near = append(near, nearFullNode{n.ID, n.Used, n.Capacity, n.NearFullRatio})
			}
		}
		moving, err := s.Moving(ctx, vols, r.Version())
		if err != nil {
			return err
		}
		res := statusResult{cfg.ClusterID, cfg.Created, cfg.ChunkSize, cfg.Replication, len(nodes), len(vols), r.Version(),
			full, near, deg, jobs, moving}
		if e.g.output == cli.JSON {
			return e.printJSON(res)
		}
		tw := e.table()
		fmt.Fprintf(tw, "cluster id:\t%s\n", res.ClusterID)
		fmt.Fprintf(tw, "created:\t%s\n", res.Created.Format(time.RFC3339))
		fmt.Fprintf(tw, "chunk size:\t%s\n", units.FormatSize(int64(res.ChunkSize)))
		fmt.Fprintf(tw, "replication:\t%d\n", res.Replication)
		fmt.Fprintf(tw, "live nodes:\t%d\n", res.LiveNodes)
		fmt.Fprintf(tw, "volumes:\t%d\n", res.Volumes)
		fmt.Fprintf(tw, "ring version:\t%d\n", res.RingVersion)
		for _, f := range full {
			fmt.Fprintf(tw, "OUT OF SPACE:\tnode %s refused %d writes (%s of %s used): free space (discard, delete volumes) or add nodes\n",
				f.ID, f.NoSpace, units.FormatSize(int64(f.Used)), units.FormatSize(int64(f.Capacity)))
		}
		for _, f := range near {
			fmt.Fprintf(tw, "NEAR FULL:\tnode %s: %s: free space (delete snapshots or volumes) or add nodes before it refuses writes\n",
				f.ID, nearFullText(f.Used, f.Capacity, f.Ratio))
		}
		if err := tw.Flush(); err != nil {
			return err
		}
		printHealth(e.stdout, deg, jobs, isTerminal(e.stdout), time.Now())
		printMoving(e.stdout, moving, r.Version())
		return nil
	})
}

func cmdNodeList(ctx context.Context, e *env, _ []string) error {
	return withStore(ctx, e, func(s *meta.Client) error {
		nodes, err := s.Nodes(ctx)
		if err != nil {
			return err
		}
		if e.g.output == cli.JSON {
			return e.printJSON(nodes)
		}
		tw := e.table()
		fmt.Fprintln(tw, "ID\tADDRESS\tZONE\tHOST\tCAPACITY\tUSED\tSTATE")
		for _, n := range nodes {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", n.ID, n.Addr, n.Zone, n.Host, units.FormatSize(int64(n.Capacity)),
				units.FormatSize(int64(n.Used)), nodeState(n))
		}
		return tw.Flush()
	})
}

// ringResult is what ring show prints.
type ringResult struct {
	Version     uint64   `json:"version"`
	Nodes       []string `json:"nodes"`
	VNodes      int      `json:"vnodes"`
	Zones       int      `json:"zones"`
	Hosts       int      `json:"hosts"`
	Replication int      `json:"replication"`
}

func cmdRingShow(ctx context.Context, e *env, _ []string) error {
	return withStore(ctx, e, func(s *meta.Client) error {
		cfg, err := s.Config(ctx)
		if err != nil {
			return err
		}
		r, _, err := s.Ring(ctx)
		if err != nil {
			return err
		}
		res := ringResult{Version: r.Version(), Nodes: []string{}, VNodes: r.VNodes(), Zones: r.Zones(),
			Hosts: r.Hosts(), Replication: cfg.Replication}
		for _, n := range r.Nodes() {
			res.Nodes = append(res.Nodes, n.ID)
		}
		if e.g.output == cli.JSON {
			return e.printJSON(res)
		}
		tw := e.table()
		fmt.Fprintf(tw, "version:\t%d\n", res.Version)
		fmt.Fprintf(tw, "nodes:\t%d %v\n", len(res.Nodes), res.Nodes)
		fmt.Fprintf(tw, "vnodes:\t%d\n", res.VNodes)
		fmt.Fprintf(tw, "zones/hosts:\t%d/%d\n", res.Zones, res.Hosts)
		fmt.Fprintf(tw, "replication:\t%d\n", res.Replication)
		if len(res.Nodes) == 0 {
			fmt.Fprintln(tw, "(empty ring: no node has been added to it yet)")
		}
		return tw.Flush()
	})
}

// cmdRingSetReplication changes the cluster's default replication. It
// refuses more copies than the ring has nodes: such a replication could not
// place R distinct copies of a chunk.
func cmdRingSetReplication(ctx context.Context, e *env, args []string) error {
	r, err := strconv.Atoi(args[0])
	if err != nil || r < 1 {
		return cli.Usagef("replication %q: must be a whole number of at least 1 (example: torusctl ring set-replication 3)",
			args[0])
	}
	return withStore(ctx, e, func(s *meta.Client) error {
		cfg, err := s.Config(ctx)
		if err != nil {
			return err
		}
		rg, _, err := s.Ring(ctx)
		if err != nil {
			return err
		}
		if rg.Len() < r {
			return fmt.Errorf("not enough nodes for R=%d: the ring has %d; add nodes first (start torusd on more machines)",
				r, rg.Len())
		}
		if err := s.SetReplication(ctx, r); err != nil {
			return err
		}
		if e.g.output == cli.JSON {
			return e.printJSON(map[string]int{"replication": r, "previous": cfg.Replication})
		}
		fmt.Fprintf(e.stdout, "replication is now %d (was %d); it applies to volumes created from now on\n",
			r, cfg.Replication)
		return nil
	})
}

// volumeResult is a volume as printed, with its attach epoch.
type volumeResult struct {
	meta.Volume
	Epoch uint64 `json:"epoch"`
	// FewestCopies is the fewest live good copies any chunk of the volume
	// has (volume info); OneCopy counts chunks down to one or none.
	FewestCopies int    `json:"fewest_copies"`
	OneCopy      uint64 `json:"chunks_on_one_copy"`
	// Space is the volume's bytes on the nodes (volume info).
	*VolumeSpace
}

func (e *env) printVolume(v volumeResult) error {
	if e.g.output == cli.JSON {
		return e.printJSON(v)
	}
	tw := e.table()
	fmt.Fprintf(tw, "name:\t%s\n", v.Name)
	fmt.Fprintf(tw, "id:\t%d\n", v.ID)
	fmt.Fprintf(tw, "size:\t%s (%d bytes)\n", units.FormatSize(int64(v.Size)), v.Size)
	fmt.Fprintf(tw, "replication:\t%d\n", v.Replication)
	fmt.Fprintf(tw, "state:\t%s\n", v.State)
	fmt.Fprintf(tw, "created:\t%s\n", v.Created.Format(time.RFC3339))
	fmt.Fprintf(tw, "epoch:\t%d\n", v.Epoch)
	fmt.Fprintf(tw, "qos:\t%s\n", formatQoS(v.QoS))
	if p := v.Parent; p != nil {
		state := "reads it where it has not written"
		if p.Flatten {
			state = "flattening: its holder copies what it still reads from it"
		}
		fmt.Fprintf(tw, "parent:\t%s@%s (a clone; %s)\n", p.Name, p.Snapshot, state)
	}
	if n := len(v.Snapshots); n > 0 {
		fmt.Fprintf(tw, "snapshots:\t%d (torusctl snapshot list %s)\n", n, v.Name)
	}
	if sp := v.VolumeSpace; sp != nil {
		note := fmt.Sprintf("%d of %d nodes reported", sp.Reported, sp.Nodes)
		if len(sp.Missing) > 0 {
			note = fmt.Sprintf("only %s; missing %s: their bytes are not counted", note, strings.Join(sp.Missing, ", "))
		}
		fmt.Fprintf(tw, "allocated:\t%s on the nodes' disks, all replicas (%s)\n", units.FormatSize(int64(sp.AllocatedBytes)), note)
		fmt.Fprintf(tw, "snapshot copies:\t%s on the nodes' disks, all replicas\n", units.FormatSize(int64(sp.SnapshotBytes)))
	}
	if v.FewestCopies > 0 || v.OneCopy > 0 {
		line := fmt.Sprintf("%d of %d", v.FewestCopies, v.Replication)
		if v.OneCopy > 0 {
			line += fmt.Sprintf(" (AT RISK: %s on one copy or none; the cluster is repairing it)", plural(int(v.OneCopy), "chunk", "chunks"))
		}
		fmt.Fprintf(tw, "fewest copies:\t%s\n", line)
	}
	return tw.Flush()
}

func buildVolumeCreate(fs *pflag.FlagSet) runFunc {
	var size cli.Size
	fs.Var(&size, "size", "volume size, e.g. 10GiB (a multiple of 4 KiB)")
	repl := fs.Int("replication", 0, "copies of each chunk (default: the cluster's replication)")
	var qf qosFlags
	qf.register(fs)
	return func(ctx context.Context, e *env, args []string) error {
		n, err := volumeSize(fs, size)
		if err != nil {
			return err
		}
		var q meta.QoS
		if err := qf.apply(&q); err != nil {
			return err
		}
		if *repl < 0 {
			return cli.Usagef("--replication %d: must be at least 1", *repl)
		}
		return withStore(ctx, e, func(s *meta.Client) error {
			cfg, err := s.Config(ctx)
			if err != nil {
				return err
			}
			r := *repl
			if r == 0 {
				r = cfg.Replication
			}
			nodes, err := s.Nodes(ctx)
			if err != nil {
				return err
			}
			if len(nodes) < r {
				hint := "start more torusd nodes"
				if len(nodes) > 0 {
					hint += fmt.Sprintf(" or pass --replication %d", len(nodes))
				}
				live := "no node is live"
				if len(nodes) > 0 {
					live = "only " + plural(len(nodes), "node is", "nodes are") + " live"
				}
				return fmt.Errorf("volume needs %d replicas but %s: %s", r, live, hint)
			}
			v, err := s.CreateVolume(ctx, args[0], n, r, meta.WithQoS(q))
			if errors.Is(err, meta.ErrExists) {
				return fmt.Errorf("volume %s already exists: pick another name, or see 'torusctl volume info %s'",
					args[0], args[0])
			}
			if err != nil {
				return err
			}
			if e.g.output == cli.JSON {
				return e.printJSON(volumeResult{Volume: v})
			}
			fmt.Fprintf(e.stdout, "created volume %s (id %d, %s, replication %d, qos %s)\n",
				v.Name, v.ID, units.FormatSize(int64(v.Size)), v.Replication, formatQoS(v.QoS))
			return nil
		})
	}
}

func cmdVolumeList(ctx context.Context, e *env, _ []string) error {
	return withStore(ctx, e, func(s *meta.Client) error {
		vols, err := s.Volumes(ctx)
		if err != nil {
			return err
		}
		sp, err := readSpace(ctx, s)
		if err != nil {
			return err
		}
		rows := make([]volumeRow, len(vols))
		for i, v := range vols {
			rows[i] = volumeRow{v, sp.volume(v.ID)}
		}
		if e.g.output == cli.JSON {
			return e.printJSON(rows)
		}
		tw := e.table()
		fmt.Fprintln(tw, "NAME\tID\tSIZE\tREPLICATION\tSTATE\tALLOCATED\tSNAPSHOTS\tCREATED")
		for _, r := range rows {
			fmt.Fprintf(tw, "%s\t%d\t%s\t%d\t%s\t%s\t%s\t%s\n", r.Name, r.ID, units.FormatSize(int64(r.Size)),
				r.Replication, r.State, units.FormatSize(int64(r.AllocatedBytes)), units.FormatSize(int64(r.SnapshotBytes)),
				r.Created.Format(time.RFC3339))
		}
		if err := tw.Flush(); err != nil {
			return err
		}
		if len(rows) > 0 {
			fmt.Fprintf(e.stdout, "ALLOCATED (live data) and SNAPSHOTS (snapshot copies): bytes on the nodes' disks, all replicas; %s\n",
				sp.reported())
		}
		return nil
	})
}

// volumeRow is a line of volume list: the volume and its space.
type volumeRow struct {
	meta.Volume
	VolumeSpace
}

// notFound adds a hint to a missing volume error.
func notFound(err error) error {
	if errors.Is(err, meta.ErrNotFound) {
		return fmt.Errorf("%w: see 'torusctl volume list'", err)
	}
	return err
}

func cmdVolumeInfo(ctx context.Context, e *env, args []string) error {
	return withStore(ctx, e, func(s *meta.Client) error {
		v, err := s.Volume(ctx, args[0])
		if err != nil {
			return notFound(err)
		}
		ep, err := s.Epoch(ctx, args[0])
		if err != nil {
			return notFound(err)
		}
		fewest, one, err := s.LiveCopies(ctx, v)
		if err != nil {
			return err
		}
		sp, err := readSpace(ctx, s)
		if err != nil {
			return err
		}
		space := sp.volume(v.ID)
		return e.printVolume(volumeResult{v, ep, fewest, one, &space})
	})
}

func buildVolumeResize(fs *pflag.FlagSet) runFunc {
	var size cli.Size
	var wait time.Duration
	fs.Var(&size, "size", "new volume size, e.g. 20GiB; volumes only grow")
	fs.DurationVar(&wait, "wait", 30*time.Second, "how long to wait for the attached device to report that it grew")
	return func(ctx context.Context, e *env, args []string) error {
		n, err := volumeSize(fs, size)
		if err != nil {
			return err
		}
		if wait < 0 {
			return cli.Usagef("--wait %v: must not be negative", wait)
		}
		return withStore(ctx, e, func(s *meta.Client) error {
			v, err := s.ResizeVolume(ctx, args[0], n)
			if errors.Is(err, meta.ErrShrink) {
				return fmt.Errorf("volume %s is %s, %s is smaller: volumes only grow (create a new one to shrink)",
					args[0], units.FormatSize(int64(v.Size)), units.FormatSize(int64(n)))
			}
			if err != nil {
				return notFound(err)
			}
			r, err := resizeOutcome(ctx, s, v, wait)
			if err != nil {
				return err
			}
			if e.g.output == cli.JSON {
				if err := e.printJSON(r); err != nil {
					return err
				}
			} else {
				fmt.Fprintf(e.stdout, "volume %s is now %s\n%s\n", v.Name, units.FormatSize(int64(v.Size)), r.Note)
			}
			if r.Outcome == resizeTimedOut {
				return fmt.Errorf("device %s on %s did not report the new size within %v: see its torusblk log", r.Device.Path, r.Device.Host, wait)
			}
			return nil
		})
	}
}

func cmdVolumeDelete(ctx context.Context, e *env, args []string) error {
	return withStore(ctx, e, func(s *meta.Client) error {
		err := s.DeleteVolume(ctx, args[0])
		if errors.Is(err, meta.ErrAttached) {
			return fmt.Errorf("%w: detach it first", err)
		}
		if err != nil {
			return notFound(err)
		}
		if e.g.output == cli.JSON {
			return e.printJSON(map[string]string{"deleted": args[0]})
		}
		fmt.Fprintf(e.stdout, "deleted volume %s\n", args[0])
		return nil
	})
}

// fullNode is a node that refused writes for lack of space (status).
type fullNode struct {
	ID       string `json:"id"`
	Used     uint64 `json:"used"`
	Capacity uint64 `json:"capacity"`
	NoSpace  uint64 `json:"no_space_writes"`
}

// nodeState is the STATE column of node list.
func nodeState(n meta.Node) string {
	switch {
	case n.Full:
		return fmt.Sprintf("out of space (%d writes refused)", n.NoSpace)
	case n.NearFull:
		return "near full: " + nearFullText(n.Used, n.Capacity, n.NearFullRatio)
	}
	return "ok"
}
