package main

// export-diff and import-diff: the blocks of a cluster volume that changed
// between two snapshots, as a checksummed stream (internal/diffstream).

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"time"

	"github.com/spf13/pflag"

	"github.com/torus-storage/torus/cluster"
	"github.com/torus-storage/torus/engine"
	"github.com/torus-storage/torus/internal/cli"
	"github.com/torus-storage/torus/internal/diffstream"
	"github.com/torus-storage/torus/internal/units"
	"github.com/torus-storage/torus/meta"
	"github.com/torus-storage/torus/netquic"
)

// diffFlags are the cluster flags of export-diff and import-diff.
type diffFlags struct {
	cluster cli.Cluster
	tlsDir  string
}

func (d *diffFlags) register(fs *pflag.FlagSet) {
	d.cluster.Flags(fs)
	cli.TLSDirFlag(fs, &d.tlsDir)
}

// open checks the flags and opens the cluster's etcd and TLS.
func (d *diffFlags) open(ctx context.Context, log *slog.Logger) (*meta.Client, *netquic.TLSConfigs, error) {
	if d.tlsDir == "" {
		return nil, nil, cli.Usagef("--tls-dir (or TORUS_TLS_DIR) is required: a directory with this client's node.crt, node.key and ca.crt")
	}
	tc, err := netquic.LoadTLS(d.tlsDir)
	if err != nil {
		return nil, nil, fmt.Errorf("--tls-dir %s: %w", d.tlsDir, err)
	}
	ms, err := meta.Open(ctx, d.cluster.Endpoints(), d.cluster.Prefix, meta.Options{Logger: log})
	if err != nil {
		if errors.Is(err, meta.ErrUnreachable) {
			return nil, nil, fmt.Errorf("%w: is etcd running at %s? (--etcd or TORUS_ETCD)", err, d.cluster.Etcd)
		}
		return nil, nil, err
	}
	return ms, tc, nil
}

// parseDiffRange parses VOLUME@B (everything of B) or VOLUME@A..@B.
func parseDiffRange(s string) (volume, from, to string, err error) {
	bad := cli.Usagef("%q: want VOLUME@SNAPSHOT or VOLUME@FROM..@TO (example: db@mon..@tue)", s)
	volume, rest, ok := strings.Cut(s, "@")
	if !ok || volume == "" {
		return "", "", "", bad
	}
	to = rest
	if a, b, ok := strings.Cut(rest, "..@"); ok {
		if a == "" {
			return "", "", "", bad
		}
		from, to = a, b
	}
	if to == "" || strings.ContainsAny(from+to, "@/") {
		return "", "", "", bad
	}
	return volume, from, to, nil
}

func exportDiffCommand(log *slog.Logger) *cli.Command {
	var df diffFlags
	return &cli.Command{
		Name:    "export-diff",
		Summary: "write the blocks that changed between two snapshots (or all of one) to a file",
		Usage:   "VOLUME@FROM..@TO|VOLUME@SNAPSHOT FILE|- --etcd URL --tls-dir DIR",
		Help: "The file is a checksummed stream of data and zero extents (docs/OPERATIONS.md, Backups); import-diff applies it. " +
			"VOLUME@SNAPSHOT exports every block of the snapshot (a full backup). No attach lock is taken: the volume may be in use.",
		Flags: df.register,
		Run: func(ctx context.Context, args []string, o cli.IO) error {
			if len(args) != 2 {
				return cli.Usagef("want VOLUME@FROM..@TO (or VOLUME@SNAPSHOT) and FILE (- for standard output), got %d arguments", len(args))
			}
			volume, from, to, err := parseDiffRange(args[0])
			if err != nil {
				return err
			}
			ms, tc, err := df.open(ctx, log)
			if err != nil {
				return err
			}
			defer ms.Close()
			var out io.Writer = o.Stdout
			var f *os.File
			if args[1] != "-" {
				if f, err = os.OpenFile(args[1], os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600); err != nil {
					return fmt.Errorf("export-diff: %w (it is never overwritten)", err)
				}
				out = f
			}
			start := time.Now()
			info, n, err := exportDiff(ctx, ms, tc, volume, from, to, out, log)
			if f != nil {
				if cerr := f.Sync(); err == nil && cerr != nil {
					err = cerr
				}
				if cerr := f.Close(); err == nil && cerr != nil {
					err = cerr
				}
				if err != nil {
					os.Remove(args[1])
				}
			}
			if err != nil {
				return err
			}
			log.Info("diff exported", "volume", volume, "from", from, "to", to, "chunks", info.Chunks, "chunks_read", info.Read,
				"data", units.FormatSize(n), "took", time.Since(start).Round(time.Millisecond))
			return nil
		},
	}
}

// exportDiff writes the diff of volume from..to to out and returns the data
// bytes it holds.
func exportDiff(ctx context.Context, ms *meta.Client, tc *netquic.TLSConfigs, volume, from, to string, out io.Writer, log *slog.Logger) (cluster.DiffInfo, int64, error) {
	v, err := ms.Volume(ctx, volume)
	if err != nil {
		return cluster.DiffInfo{}, 0, err
	}
	s, ok := v.Snapshot(to)
	if !ok {
		return cluster.DiffInfo{}, 0, fmt.Errorf("volume %s has no snapshot %s: see `torusctl snapshot list %s`", volume, to, volume)
	}
	w, err := diffstream.NewWriter(out, diffstream.Header{Size: s.Size, BlockSize: engine.BlockSize, From: from, To: to})
	if err != nil {
		return cluster.DiffInfo{}, 0, err
	}
	var data int64
	info, err := cluster.Diff(ctx, ms, volume, cluster.DiffOptions{Options: cluster.Options{TLS: tc.Client, Logger: log}, From: from, To: to},
		func(e cluster.Extent, b []byte) error {
			if e.Zero {
				return w.Zeros(uint64(e.Offset), uint64(e.Length))
			}
			data += e.Length
			return w.Data(uint64(e.Offset), b)
		})
	if err != nil {
		return info, 0, err
	}
	return info, data, w.Close()
}

func importDiffCommand(log *slog.Logger) *cli.Command {
	var df diffFlags
	var ttl time.Duration
	return &cli.Command{
		Name:    "import-diff",
		Summary: "apply a diff written by export-diff to a volume, then snapshot it",
		Usage:   "FILE|- VOLUME --etcd URL --tls-dir DIR",
		Help: "The volume must be detached (import-diff holds its attach lock) and at least as large as the diff's volume; " +
			"a diff from snapshot FROM needs VOLUME@FROM (made by the import of the diff before). The whole diff is checked " +
			"as it is read; at its end the volume is flushed and snapshot VOLUME@TO is taken.",
		Flags: func(fs *pflag.FlagSet) {
			df.register(fs)
			fs.DurationVar(&ttl, "lease-ttl", cluster.DefaultAttachTTL, "attach lock lease")
		},
		Run: func(ctx context.Context, args []string, o cli.IO) error {
			if len(args) != 2 {
				return cli.Usagef("want FILE (- for standard input) and VOLUME, got %d arguments", len(args))
			}
			if ttl < time.Second {
				return cli.Usagef("--lease-ttl %v: at least 1s", ttl)
			}
			ms, tc, err := df.open(ctx, log)
			if err != nil {
				return err
			}
			defer ms.Close()
			var in io.Reader = os.Stdin
			if args[0] != "-" {
				f, err := os.Open(args[0])
				if err != nil {
					return fmt.Errorf("import-diff: %w", err)
				}
				defer f.Close()
				in = f
			}
			start := time.Now()
			n, h, err := importDiff(ctx, ms, tc, in, args[1], ttl, log)
			if err != nil {
				return err
			}
			log.Info("diff imported", "volume", args[1], "from", h.From, "to", h.To, "records", n,
				"took", time.Since(start).Round(time.Millisecond))
			return nil
		},
	}
}

// importDiff applies the diff in in to volume and snapshots it as the
// diff's To; it returns the records applied.
func importDiff(ctx context.Context, ms *meta.Client, tc *netquic.TLSConfigs, in io.Reader, volume string, ttl time.Duration, log *slog.Logger) (int, diffstream.Header, error) {
	r, err := diffstream.NewReader(in)
	if err != nil {
		return 0, diffstream.Header{}, err
	}
	h := r.Header()
	v, err := ms.Volume(ctx, volume)
	if err != nil {
		return 0, h, err
	}
	if h.From != "" {
		if _, ok := v.Snapshot(h.From); !ok {
			return 0, h, fmt.Errorf("the diff is from snapshot %s, which volume %s lacks: import the diff up to %s first", h.From, volume, h.From)
		}
	}
	if _, ok := v.Snapshot(h.To); ok {
		return 0, h, fmt.Errorf("volume %s already has snapshot %s: this diff was imported (delete the snapshot to import it again)", volume, h.To)
	}
	if v.Size < h.Size {
		return 0, h, fmt.Errorf("volume %s is %s, the diff's volume %s: grow it first (torusctl volume resize %s --size %d)",
			volume, units.FormatSize(int64(v.Size)), units.FormatSize(int64(h.Size)), volume, h.Size)
	}
	host, _ := os.Hostname()
	a, err := cluster.Attach(ctx, ms, volume, cluster.AttachOptions{
		Options: cluster.Options{TLS: tc.Client, Logger: log, Holder: fmt.Sprintf("torusblk import-diff pid %d on %s", os.Getpid(), host)},
		TTL:     ttl,
	})
	if err != nil {
		if errors.Is(err, meta.ErrAttached) {
			return 0, h, fmt.Errorf("%w: import-diff needs the volume detached", err)
		}
		return 0, h, err
	}
	n := 0
	err = func() error {
		for {
			rec, err := r.Next()
			if err == io.EOF {
				return nil
			}
			if err != nil {
				return err
			}
			op, buf := engine.OpWriteZeroes, []byte(nil)
			if rec.Kind == diffstream.KindData {
				op, buf = engine.OpWrite, rec.Data
			}
			if err := submitWait(a, op, int64(rec.Offset), int64(rec.Len), buf); err != nil {
				return fmt.Errorf("write %s at %d: %w", volume, rec.Offset, err)
			}
			n++
		}
	}()
	if err == nil {
		err = submitWait(a, engine.OpFlush, 0, 0, nil)
	}
	if cerr := a.Close(); err == nil && cerr != nil {
		err = cerr
	}
	if err != nil {
		return n, h, fmt.Errorf("import-diff into %s stopped after %d records: %w (the volume is partly updated: import the same diff again)", volume, n, err)
	}
	if _, err := ms.TakeSnapshots(ctx, "", []meta.SnapshotRequest{{Volume: volume, Name: h.To}}, 10*time.Second); err != nil {
		return n, h, fmt.Errorf("diff applied, but snapshot %s@%s not taken: %w (take it with torusctl snapshot create)", volume, h.To, err)
	}
	return n, h, nil
}

// submitWait runs one request on v and waits for it.
func submitWait(v engine.Volume, op engine.Op, off, length int64, buf []byte) error {
	w := make(chan error, 1)
	v.Submit(&engine.Request{Op: op, Offset: off, Length: length, Buf: buf, Done: reqDone(w)})
	return <-w
}

type reqDone chan error

func (d reqDone) Complete(_ *engine.Request, err error) { d <- err }
