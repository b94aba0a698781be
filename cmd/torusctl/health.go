package main

// node remove, and the degraded-volume and background-job parts of status.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/spf13/pflag"
	"golang.org/x/sys/unix"

	"github.com/torus-storage/torus/internal/cli"
	"github.com/torus-storage/torus/meta"
	"github.com/torus-storage/torus/ring"
)

// removeResult is what node remove prints.
type removeResult struct {
	Removed     string `json:"removed"`
	RingVersion uint64 `json:"ring_version"`
	Nodes       int    `json:"nodes"`
	Live        bool   `json:"live"`
}

// buildNodeRemove takes a node out of the ring. It refuses when fewer
// nodes would remain than the largest replication of any volume (such a
// volume could not keep all its copies), unless --force.
func buildNodeRemove(fs *pflag.FlagSet) runFunc {
	force := fs.Bool("force", false, "remove even if fewer nodes than a volume's replication remain")
	return func(ctx context.Context, e *env, args []string) error {
		id := args[0]
		return withStore(ctx, e, func(s *meta.Client) error {
			rg, _, err := s.Ring(ctx)
			if err != nil {
				return err
			}
			if !slices.ContainsFunc(rg.Nodes(), func(n ring.Node) bool { return n.ID == id }) {
				return fmt.Errorf("node %s is not in the ring (version %d): see 'torusctl ring show'", id, rg.Version())
			}
			vols, err := s.Volumes(ctx)
			if err != nil {
				return err
			}
			maxR, maxVol := 0, ""
			for _, v := range vols {
				if v.Replication > maxR {
					maxR, maxVol = v.Replication, v.Name
				}
			}
			if left := rg.Len() - 1; left < maxR && !*force {
				return fmt.Errorf("not enough nodes for R=%d after removing %s; add a node first "+
					"(volume %s has replication %d and %s would remain; --force removes it anyway, leaving such volumes short of copies)",
					maxR, id, maxVol, maxR, plural(left, "node", "nodes"))
			}
			next, err := s.RemoveNode(ctx, id)
			if errors.Is(err, meta.ErrNotFound) {
				return fmt.Errorf("node %s is not in the ring (someone removed it meanwhile): see 'torusctl ring show'", id)
			}
			if err != nil {
				return err
			}
			live := false
			if nodes, err := s.Nodes(ctx); err == nil {
				live = slices.ContainsFunc(nodes, func(n meta.Node) bool { return n.ID == id })
			}
			res := removeResult{Removed: id, RingVersion: next.Version(), Nodes: next.Len(), Live: live}
			if e.g.output == cli.JSON {
				return e.printJSON(res)
			}
			fmt.Fprintf(e.stdout, "removed node %s from the ring (version %d, %s left)\n",
				id, res.RingVersion, plural(res.Nodes, "node", "nodes"))
			fmt.Fprintln(e.stdout, "attached clients, or the nodes for volumes no client holds, now move its chunks to their new owners; 'torusctl status' shows the progress")
			if live {
				fmt.Fprintf(e.stdout, "node %s still runs and serves its chunks until they are moved: stop it once 'torusctl status' shows no moving volumes\n", id)
			}
			return nil
		})
	}
}

// printMoving writes the moving volumes as text.
func printMoving(w io.Writer, moving []meta.MovingVolume, cur uint64) {
	if len(moving) == 0 {
		fmt.Fprintln(w, "moving volumes: none")
		return
	}
	fmt.Fprintf(w, "moving volumes: %d (nodes removed from the ring still hold their copies)\n", len(moving))
	for _, m := range moving {
		if m.PlacedRing != cur {
			fmt.Fprintf(w, "  %s: placed under ring %d, the ring is at %d: its move is still to be recorded\n", m.Volume, m.PlacedRing, cur)
		} else {
			fmt.Fprintf(w, "  %s: copying chunks from %s\n", m.Volume, plural(m.Moves, "earlier ring", "earlier rings"))
		}
	}
}

// degradedResult is a volume with missed marks, as status prints it.
type degradedResult struct {
	Volume string         `json:"volume"`
	ID     uint64         `json:"id"`
	Missed map[string]int `json:"missed"` // chunks missed, by node
}

// jobResult is a volume's background job, as status prints it.
type jobResult struct {
	Volume string `json:"volume"`
	ID     uint64 `json:"id"`
	meta.Progress
	Percent float64 `json:"percent"`
}

// healthOf reads the degraded volumes and background jobs, ordered by
// volume id; names maps volume ids to names.
func healthOf(ctx context.Context, s *meta.Client, names map[uint64]string) ([]degradedResult, []jobResult, error) {
	counts, err := s.MissedCounts(ctx)
	if err != nil {
		return nil, nil, err
	}
	progress, err := s.Progress(ctx)
	if err != nil {
		return nil, nil, err
	}
	name := func(id uint64) string {
		if n, ok := names[id]; ok {
			return n
		}
		return fmt.Sprintf("#%d", id) // deleted after the volume list was read
	}
	deg := []degradedResult{}
	for _, id := range sortedKeys(counts) {
		deg = append(deg, degradedResult{Volume: name(id), ID: id, Missed: counts[id]})
	}
	jobs := []jobResult{}
	for _, id := range sortedKeys(progress) {
		p := progress[id]
		jobs = append(jobs, jobResult{Volume: name(id), ID: id, Progress: p, Percent: p.Percent()})
	}
	return deg, jobs, nil
}

func sortedKeys[V any](m map[uint64]V) []uint64 {
	ks := make([]uint64, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	slices.Sort(ks)
	return ks
}

// printHealth writes the degraded volumes and jobs as text; bars draws a
// progress bar per job (on a terminal).
func printHealth(w io.Writer, deg []degradedResult, jobs []jobResult, bars bool, now time.Time) {
	if len(deg) == 0 {
		fmt.Fprintln(w, "degraded volumes: none")
	} else {
		fmt.Fprintf(w, "degraded volumes: %d\n", len(deg))
		for _, d := range deg {
			nodes := make([]string, 0, len(d.Missed))
			for _, n := range slices.Sorted(maps.Keys(d.Missed)) {
				nodes = append(nodes, fmt.Sprintf("%s missed %s", n, plural(d.Missed[n], "chunk", "chunks")))
			}
			fmt.Fprintf(w, "  %s (id %d): %s\n", d.Volume, d.ID, strings.Join(nodes, ", "))
		}
	}
	if len(jobs) == 0 {
		fmt.Fprintln(w, "background jobs: none")
		return
	}
	fmt.Fprintf(w, "background jobs: %d\n", len(jobs))
	for _, j := range jobs {
		state := "running"
		if j.Finished() {
			state = "finished"
		}
		line := fmt.Sprintf("%d/%d chunks (%.1f%%)", min(j.Done, j.Total), j.Total, j.Percent)
		if bars {
			line = progressBar(j.Percent, 30) + " " + line
		}
		extra := ""
		if j.Kind == meta.ProgressScrub || j.Repaired > 0 || j.Mismatches > 0 {
			extra = fmt.Sprintf(", %d mismatches, %d repaired", j.Mismatches, j.Repaired)
		}
		if r := j.Rate(); r > 0 && !j.Finished() {
			extra += fmt.Sprintf(", %.1f chunks/s, ETA %s", r, j.ETA().Round(time.Second))
		}
		if j.Holder != "" {
			extra += ", by " + j.Holder
		}
		fmt.Fprintf(w, "  %s (id %d): %s %s, %s, ring v%d%s, updated %s ago\n", j.Volume, j.ID, j.Kind, state, line,
			j.RingVersion, extra, now.Sub(j.Updated).Round(time.Second))
	}
}

// progressBar draws pct (0-100) as "[####......]" of width cells inside
// the brackets, with a partial cell drawn as '>' ahead of the filled ones.
func progressBar(pct float64, width int) string {
	pct = max(0, min(100, pct))
	filled := int(pct / 100 * float64(width))
	var b strings.Builder
	b.WriteByte('[')
	b.WriteString(strings.Repeat("#", filled))
	if filled < width {
		if pct > 0 && float64(filled) < pct/100*float64(width) {
			b.WriteByte('>')
			filled++
		}
		b.WriteString(strings.Repeat(".", width-filled))
	}
	b.WriteByte(']')
	return b.String()
}

// isTerminal reports whether w is a terminal (progress bars are drawn only
// there; pipes and files get plain numbers).
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}
