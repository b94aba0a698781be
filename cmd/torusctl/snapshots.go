package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"time"

	"github.com/spf13/pflag"

	"github.com/torus-storage/torus/cluster"
	"github.com/torus-storage/torus/internal/cli"
	"github.com/torus-storage/torus/internal/units"
	"github.com/torus-storage/torus/meta"
	"github.com/torus-storage/torus/netquic"
)

// snapshotNames parses VOLUME@SNAPSHOT arguments.
func snapshotNames(args []string) ([]meta.SnapshotRequest, error) {
	var reqs []meta.SnapshotRequest
	for _, a := range args {
		r, err := meta.ParseSnapshotName(a)
		if err != nil {
			return nil, cli.Usagef("%q: want VOLUME@SNAPSHOT (example: vol0@before-upgrade)", a)
		}
		reqs = append(reqs, r)
	}
	return reqs, nil
}

func buildSnapshotCreate(fs *pflag.FlagSet) runFunc {
	var group, tlsDir string
	var wait time.Duration
	cli.TLSDirFlag(fs, &tlsDir)
	fs.Lookup("tls-dir").Usage += "; needed only for a volume whose last holder did not detach (torusctl then attaches it, which fences that holder on the nodes, for the snapshot)"
	fs.StringVar(&group, "group", "", "take the snapshots of every VOLUME@SNAPSHOT at one instant, as group `NAME` (needed for more than one)")
	fs.DurationVar(&wait, "wait", 10*time.Second, "how long the clients holding the volumes may take to pause their writes; past it the snapshot is cancelled")
	return func(ctx context.Context, e *env, args []string) error {
		reqs, err := snapshotNames(args)
		if err != nil {
			return err
		}
		if len(reqs) > 1 && group == "" {
			return cli.Usagef("%d volumes: snapshots of several volumes are taken at one instant as a group: give --group NAME", len(reqs))
		}
		if wait <= 0 {
			return cli.Usagef("--wait %v: must be positive", wait)
		}
		return withStore(ctx, e, func(s *meta.Client) error {
			start := time.Now()
			snaps, err := s.TakeSnapshots(ctx, group, reqs, wait)
			if errors.Is(err, meta.ErrNotReleased) {
				if tlsDir == "" {
					return fmt.Errorf("%w: attach the volume, or give --tls-dir and torusctl attaches it for the snapshot (fencing that holder)", err)
				}
				snaps, err = snapshotFenced(ctx, s, e, tlsDir, group, reqs, wait)
			}
			switch {
			case errors.Is(err, meta.ErrExists):
				return fmt.Errorf("%w: pick another name or delete the old snapshot", err)
			case errors.Is(err, context.DeadlineExceeded):
				return fmt.Errorf("%w: the snapshot is cancelled (a client holding the volume did not pause in time; is it reachable from etcd?)", err)
			case err != nil:
				return notFound(err)
			}
			took := time.Since(start)
			if e.g.output == cli.JSON {
				return e.printJSON(snaps)
			}
			for i, sn := range snaps {
				fmt.Fprintf(e.stdout, "snapshot %s@%s taken (number %d, %s)\n", reqs[i].Volume, sn.Name, sn.ID, took.Round(time.Millisecond))
			}
			return nil
		})
	}
}

// snapshotRow is a line of snapshot list.
type snapshotRow struct {
	Volume string `json:"volume"`
	meta.Snapshot
	// Exclusive is the bytes, on the nodes' disks and all replicas, that
	// only this snapshot holds: what deleting it gives back. Unknown when
	// ExclusiveUnknown (a node left the breakdown out of its record).
	Exclusive        uint64 `json:"exclusive_bytes"`
	ExclusiveUnknown bool   `json:"exclusive_unknown,omitempty"`
	// Reported of Nodes nodes had a usage record (see volume list).
	Reported int `json:"usage_nodes_reported"`
	Nodes    int `json:"usage_nodes"`
}

func cmdSnapshotList(ctx context.Context, e *env, args []string) error {
	return withStore(ctx, e, func(s *meta.Client) error {
		var vols []meta.Volume
		if len(args) == 1 {
			v, err := s.Volume(ctx, args[0])
			if err != nil {
				return notFound(err)
			}
			vols = []meta.Volume{v}
		} else {
			var err error
			if vols, err = s.Volumes(ctx); err != nil {
				return err
			}
		}
		sp, err := readSpace(ctx, s)
		if err != nil {
			return err
		}
		rows := []snapshotRow{}
		for _, v := range vols {
			for _, sn := range v.Snapshots {
				ex, known := sp.exclusive(v.ID, sn.ID)
				rows = append(rows, snapshotRow{Volume: v.Name, Snapshot: sn, Exclusive: ex, ExclusiveUnknown: !known,
					Reported: len(sp.nodes) - len(sp.missing), Nodes: len(sp.nodes)})
			}
		}
		if e.g.output == cli.JSON {
			return e.printJSON(rows)
		}
		tw := e.table()
		fmt.Fprintln(tw, "SNAPSHOT\tNUMBER\tSIZE\tEXCLUSIVE\tCREATED\tGROUP\tSTATE")
		for _, r := range rows {
			state, group := "ready", r.Group
			if r.Pending {
				state = "pending (being taken, or left by a command that died: delete it)"
			}
			if group == "" {
				group = "-"
			}
			ex := units.FormatSize(int64(r.Exclusive))
			if r.ExclusiveUnknown {
				ex = "?"
			}
			fmt.Fprintf(tw, "%s@%s\t%d\t%s\t%s\t%s\t%s\t%s\n", r.Volume, r.Name, r.ID, units.FormatSize(int64(r.Size)), ex,
				r.Created.Format(time.RFC3339), group, state)
		}
		if err := tw.Flush(); err != nil {
			return err
		}
		if len(rows) > 0 {
			fmt.Fprintf(e.stdout, "SIZE: the volume's size when taken; EXCLUSIVE: bytes on the nodes' disks (all replicas) only that snapshot holds, "+
				"which deleting it gives back; %s\n", sp.reported())
		}
		return nil
	})
}

func cmdSnapshotDelete(ctx context.Context, e *env, args []string) error {
	reqs, err := snapshotNames(args)
	if err != nil {
		return err
	}
	r := reqs[0]
	return withStore(ctx, e, func(s *meta.Client) error {
		if err := s.DeleteSnapshot(ctx, r.Volume, r.Name); err != nil {
			if errors.Is(err, meta.ErrNotFound) {
				return fmt.Errorf("no snapshot %s@%s: %w: see 'torusctl snapshot list %s'", r.Volume, r.Name, err, r.Volume)
			}
			return err
		}
		if e.g.output == cli.JSON {
			return e.printJSON(map[string]string{"deleted": r.Volume + "@" + r.Name})
		}
		fmt.Fprintf(e.stdout, "deleted snapshot %s@%s (the nodes give back the space only it held)\n", r.Volume, r.Name)
		return nil
	})
}

func buildVolumeRollback(fs *pflag.FlagSet) runFunc {
	var tlsDir string
	cli.TLSDirFlag(fs, &tlsDir)
	return func(ctx context.Context, e *env, args []string) error {
		reqs, err := snapshotNames(args)
		if err != nil {
			return err
		}
		if tlsDir == "" {
			return cli.Usagef("--tls-dir (or TORUS_TLS_DIR) is required: rollback reads and writes the volume's chunks on the nodes as a client")
		}
		tc, err := netquic.LoadTLS(tlsDir)
		if err != nil {
			return fmt.Errorf("--tls-dir %s: %w", tlsDir, err)
		}
		r := reqs[0]
		return withStore(ctx, e, func(s *meta.Client) error {
			host, _ := os.Hostname()
			log := slog.New(slog.NewTextHandler(e.stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
			start := time.Now()
			res, err := cluster.Rollback(ctx, s, r.Volume, r.Name, cluster.AttachOptions{Options: cluster.Options{
				TLS: tc.Client, Logger: log, Holder: fmt.Sprintf("torusctl rollback pid %d on %s", os.Getpid(), host)}})
			switch {
			case errors.Is(err, meta.ErrAttached):
				return fmt.Errorf("%w: rollback needs the volume detached: detach it first", err)
			case errors.Is(err, meta.ErrNotFound):
				return fmt.Errorf("%w: see 'torusctl snapshot list %s'", err, r.Volume)
			case err != nil:
				return err
			}
			if e.g.output == cli.JSON {
				return e.printJSON(map[string]any{"volume": r.Volume, "snapshot": r.Name, "chunks": res.Chunks, "rewritten": res.Changed})
			}
			fmt.Fprintf(e.stdout, "volume %s is back at snapshot %s: %d of %d chunks rewritten (%s)\n", r.Volume, r.Name,
				res.Changed, res.Chunks, time.Since(start).Round(time.Millisecond))
			return nil
		})
	}
}

func buildSnapshotDiff(fs *pflag.FlagSet) runFunc {
	var tlsDir string
	cli.TLSDirFlag(fs, &tlsDir)
	return func(ctx context.Context, e *env, args []string) error {
		reqs, err := snapshotNames(args)
		if err != nil {
			return err
		}
		if reqs[0].Volume != reqs[1].Volume {
			return cli.Usagef("%s and %s: both snapshots must be of one volume", args[0], args[1])
		}
		if tlsDir == "" {
			return cli.Usagef("--tls-dir (or TORUS_TLS_DIR) is required: diff reads the snapshots' chunks on the nodes as a client")
		}
		tc, err := netquic.LoadTLS(tlsDir)
		if err != nil {
			return fmt.Errorf("--tls-dir %s: %w", tlsDir, err)
		}
		return withStore(ctx, e, func(s *meta.Client) error {
			log := slog.New(slog.NewTextHandler(e.stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
			extents := []cluster.Extent{}
			info, err := cluster.Diff(ctx, s, reqs[0].Volume, cluster.DiffOptions{Options: cluster.Options{TLS: tc.Client, Logger: log},
				From: reqs[0].Name, To: reqs[1].Name}, func(x cluster.Extent, _ []byte) error {
				extents = append(extents, x)
				return nil
			})
			switch {
			case errors.Is(err, meta.ErrNotFound):
				return fmt.Errorf("%w: see 'torusctl snapshot list %s'", err, reqs[0].Volume)
			case err != nil:
				return err
			}
			if e.g.output == cli.JSON {
				return e.printJSON(map[string]any{"volume": reqs[0].Volume, "from": reqs[0].Name, "to": reqs[1].Name,
					"size": info.Size, "chunks": info.Chunks, "chunks_read": info.Read, "extents": extents})
			}
			tw := e.table()
			fmt.Fprintln(tw, "OFFSET\tLENGTH\tKIND")
			var data, zero int64
			for _, x := range extents {
				kind := "data"
				if x.Zero {
					kind, zero = "zero", zero+x.Length
				} else {
					data += x.Length
				}
				fmt.Fprintf(tw, "%d\t%d\t%s\n", x.Offset, x.Length, kind)
			}
			if err := tw.Flush(); err != nil {
				return err
			}
			fmt.Fprintf(e.stdout, "%d extents: %s of data, %s of zeros (%d of %d chunks read)\n", len(extents),
				units.FormatSize(data), units.FormatSize(zero), info.Read, info.Chunks)
			return nil
		})
	}
}

// snapshotFenced takes the snapshots while this process holds every
// detached volume of reqs (cluster.Attach fences their earlier holders on
// the nodes), then detaches them cleanly.
func snapshotFenced(ctx context.Context, s *meta.Client, e *env, tlsDir, group string, reqs []meta.SnapshotRequest, wait time.Duration) ([]meta.Snapshot, error) {
	tc, err := netquic.LoadTLS(tlsDir)
	if err != nil {
		return nil, fmt.Errorf("--tls-dir %s: %w", tlsDir, err)
	}
	log := slog.New(slog.NewTextHandler(e.stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	host, _ := os.Hostname()
	for _, r := range reqs {
		a, err := cluster.Attach(ctx, s, r.Volume, cluster.AttachOptions{Options: cluster.Options{
			TLS: tc.Client, Logger: log, Holder: fmt.Sprintf("torusctl snapshot pid %d on %s", os.Getpid(), host)}})
		if errors.Is(err, meta.ErrAttached) {
			continue // held: its holder pauses for the snapshot
		}
		if err != nil {
			return nil, fmt.Errorf("attaching %s to fence its last holder: %w", r.Volume, err)
		}
		defer a.Close()
	}
	return s.TakeSnapshots(ctx, group, reqs, wait)
}

func cmdVolumeClone(ctx context.Context, e *env, args []string) error {
	reqs, err := snapshotNames(args[:1])
	if err != nil {
		return err
	}
	return withStore(ctx, e, func(s *meta.Client) error {
		v, err := s.CloneVolume(ctx, reqs[0], args[1])
		switch {
		case errors.Is(err, meta.ErrExists):
			return fmt.Errorf("%w: pick another name", err)
		case errors.Is(err, meta.ErrNotFound):
			return fmt.Errorf("%w: see 'torusctl snapshot list %s'", err, reqs[0].Volume)
		case err != nil:
			return err
		}
		if e.g.output == cli.JSON {
			return e.printJSON(volumeResult{Volume: v})
		}
		fmt.Fprintf(e.stdout, "volume %s is a clone of %s@%s (%s); attach it anywhere\n", v.Name, reqs[0].Volume, reqs[0].Name,
			units.FormatSize(int64(v.Size)))
		return nil
	})
}

func cmdVolumeFlatten(ctx context.Context, e *env, args []string) error {
	return withStore(ctx, e, func(s *meta.Client) error {
		v, err := s.FlattenVolume(ctx, args[0])
		if err != nil {
			return notFound(err)
		}
		if e.g.output == cli.JSON {
			return e.printJSON(volumeResult{Volume: v})
		}
		fmt.Fprintf(e.stdout, "flattening %s: its holder (the attached client, else a storage node) copies what it still reads from %s@%s; "+
			"'torusctl status' shows the progress\n", v.Name, v.Parent.Name, v.Parent.Snapshot)
		return nil
	})
}
