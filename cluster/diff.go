package cluster

// Differences between two snapshots of a volume.
//
// A chunk can differ between snapshots a < b only if a change of it was
// made under a number in [a, b), and the first such change copied its head
// as snapshot copy n in [a, b). The smallest copy >= a is what a read as of
// a resolves to, so no collection drops it while a exists: the chunk may
// differ iff that copy is below b. Diff reads only those chunks, and
// compares them block by block.

import (
	"context"
	"errors"
	"fmt"

	"github.com/torus-storage/torus/engine"
	"github.com/torus-storage/torus/meta"
)

// Extent is a range of a volume in a diff: data (read from the newer
// snapshot) or zeros.
type Extent struct {
	Offset int64 `json:"offset"`
	Length int64 `json:"length"`
	Zero   bool  `json:"zero"`
}

// DiffOptions configure Diff.
type DiffOptions struct {
	Options
	// From is the older snapshot ("": none, every block of To is in the
	// diff: data, or zeros).
	From string
	// To is the newer snapshot.
	To string
}

// DiffInfo describes a diff.
type DiffInfo struct {
	// Size is the volume's size as of To.
	Size int64
	// FromID and ToID are the snapshots' numbers (FromID 0: none).
	FromID, ToID uint64
	// Chunks is the number of chunks; Read those read because they may
	// differ.
	Chunks, Read int64
}

// Diff calls emit for every extent of the volume called volume that
// differs between snapshots opt.From and opt.To, in ascending order, with
// adjacent extents of one kind merged (at most one chunk each); data holds
// a data extent's bytes (valid during the call). The views need no attach
// lock: the volume may be written meanwhile.
func Diff(ctx context.Context, ms *meta.Client, volume string, opt DiffOptions, emit func(e Extent, data []byte) error) (DiffInfo, error) {
	var info DiffInfo
	v, err := ms.Volume(ctx, volume)
	if err != nil {
		return info, err
	}
	to, ok := v.Snapshot(opt.To)
	if !ok {
		return info, fmt.Errorf("volume %s has no snapshot %s: %w", volume, opt.To, meta.ErrNotFound)
	}
	info.ToID = to.ID
	tv, err := OpenSnapshot(ctx, ms, volume, opt.To, opt.Options)
	if err != nil {
		return info, err
	}
	defer tv.Close()
	info.Size = tv.Size()
	var fv *Volume
	if opt.From != "" {
		from, ok := v.Snapshot(opt.From)
		if !ok {
			return info, fmt.Errorf("volume %s has no snapshot %s: %w", volume, opt.From, meta.ErrNotFound)
		}
		if from.ID >= to.ID {
			return info, fmt.Errorf("snapshot %s@%s is not older than %s@%s: %w", volume, opt.From, volume, opt.To, meta.ErrInvalid)
		}
		info.FromID = from.ID
		if fv, err = OpenSnapshot(ctx, ms, volume, opt.From, opt.Options); err != nil {
			return info, err
		}
		defer fv.Close()
	}
	chunk := tv.chunk
	nb, ob := make([]byte, chunk), make([]byte, chunk)
	var cur Extent // pending extent, Length 0: none
	var curData []byte
	flush := func() error {
		if cur.Length == 0 {
			return nil
		}
		err := emit(cur, curData)
		cur, curData = Extent{}, nil
		return err
	}
	for off := int64(0); off < info.Size; off += chunk {
		if err := ctx.Err(); err != nil {
			return info, err
		}
		idx := off / chunk
		info.Chunks++
		n := min(chunk, info.Size-off)
		if fv != nil {
			changed, err := tv.mayDiffer(ctx, idx, info.FromID, info.ToID)
			if err != nil {
				return info, err
			}
			if !changed {
				continue
			}
		}
		info.Read++
		if err := doIO(tv, engine.OpRead, off, nb[:n]); err != nil {
			return info, fmt.Errorf("read %s@%s at %d: %w", volume, opt.To, off, err)
		}
		if fv != nil {
			clear(ob[:n])
			if m := min(n, fv.Size()-off); m > 0 {
				if err := doIO(fv, engine.OpRead, off, ob[:m]); err != nil {
					return info, fmt.Errorf("read %s@%s at %d: %w", volume, opt.From, off, err)
				}
			}
		}
		// Extents never span chunks: data points into nb.
		if err := flush(); err != nil {
			return info, err
		}
		for b := int64(0); b < n; b += engine.BlockSize {
			blk := nb[b : b+engine.BlockSize]
			if fv != nil && string(blk) == string(ob[b:b+engine.BlockSize]) {
				if err := flush(); err != nil {
					return info, err
				}
				continue
			}
			zero := allZero(blk)
			if cur.Length > 0 && cur.Zero == zero && cur.Offset+cur.Length == off+b {
				cur.Length += engine.BlockSize
				if !zero {
					curData = nb[cur.Offset-off : cur.Offset-off+cur.Length]
				}
				continue
			}
			if err := flush(); err != nil {
				return info, err
			}
			cur = Extent{Offset: off + b, Length: engine.BlockSize, Zero: zero}
			if !zero {
				curData = blk
			}
		}
		if err := flush(); err != nil {
			return info, err
		}
	}
	return info, flush()
}

// mayDiffer reports whether chunk idx may differ between snapshots from and
// to (from < to): whether its smallest snapshot copy >= from is below to,
// as listed by an owner that holds a complete copy.
func (c *Volume) mayDiffer(ctx context.Context, idx int64, from, to uint64) (bool, error) {
	var errs []error
	for _, p := range c.sources(c.state.Load(), idx) {
		l, err := c.listSnaps(ctx, p, idx)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		for _, s := range l {
			if s >= from {
				return s < to, nil
			}
		}
		return false, nil
	}
	if len(errs) == 0 {
		return false, fmt.Errorf("chunk %d: no owner holds a copy that can be read now", idx)
	}
	return false, fmt.Errorf("chunk %d: %w", idx, errors.Join(errs...))
}
