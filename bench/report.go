package main

import (
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
)

// Performance targets of the single-node volume (informational; the report
// prints them as "performance targets").
const (
	wantPeerRatioQD32 = 1.5 // Torus IOPS / best NBD peer IOPS at QD32
	wantRawRatio      = 0.7 // Torus IOPS / raw io_uring IOPS
)

func fmtIOPS(v float64) string {
	switch {
	case v >= 100e3:
		return fmt.Sprintf("%.0fk", v/1e3)
	case v >= 10e3:
		return fmt.Sprintf("%.1fk", v/1e3)
	}
	return fmt.Sprintf("%.0f", v)
}

func fmtUs(v float64) string {
	if v >= 10e3 {
		return fmt.Sprintf("%.0f", v)
	}
	return fmt.Sprintf("%.1f", v)
}

// bestPeer returns the NBD peer with the most IOPS on job, if any ran.
func bestPeer(rep *report, jobName string) (string, result, bool) {
	var (
		best  string
		bestR result
		found bool
	)
	for _, p := range nbdPeers {
		r, ok := rep.Results[p][jobName]
		if ok && (!found || r.IOPS > bestR.IOPS) {
			best, bestR, found = p, r, true
		}
	}
	return best, bestR, found
}

// bestPeerP50 returns the NBD peer with the lowest p50 latency on job.
func bestPeerP50(rep *report, jobName string) (string, result, bool) {
	var (
		best  string
		bestR result
		found bool
	)
	for _, p := range nbdPeers {
		r, ok := rep.Results[p][jobName]
		if ok && (!found || r.P50us < bestR.P50us) {
			best, bestR, found = p, r, true
		}
	}
	return best, bestR, found
}

// printTable prints IOPS and p50/p99 completion latency (µs) per job and
// target, then the ratios of Torus to its peers.
func printTable(w io.Writer, rep *report) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	hdr := []string{"job"}
	sub := []string{""}
	for _, t := range rep.Targets {
		hdr = append(hdr, t, "", "")
		sub = append(sub, "IOPS", "p50µs", "p99µs")
	}
	fmt.Fprintln(tw, strings.Join(hdr, "\t")+"\t")
	fmt.Fprintln(tw, strings.Join(sub, "\t")+"\t")
	for _, j := range rep.Jobs {
		row := []string{j.Name}
		for _, t := range rep.Targets {
			r, ok := rep.Results[t][j.Name]
			if !ok {
				row = append(row, "-", "-", "-")
				continue
			}
			row = append(row, fmtIOPS(r.IOPS), fmtUs(r.P50us), fmtUs(r.P99us))
		}
		fmt.Fprintln(tw, strings.Join(row, "\t")+"\t")
	}
	tw.Flush()

	if !comparable(rep) {
		return
	}
	fmt.Fprintln(w)
	tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "job\ttorus/best-peer IOPS\tbest peer\ttorus/raw IOPS\ttorus p50 / best-peer p50\t")
	for _, j := range rep.Jobs {
		tr := rep.Results["torus"][j.Name]
		row := []string{j.Name, "-", "-", "-", "-"}
		if p, pr, ok := bestPeer(rep, j.Name); ok && pr.IOPS > 0 {
			row[1] = fmt.Sprintf("%.2fx", tr.IOPS/pr.IOPS)
			row[2] = p
		}
		if rr, ok := rep.Results["raw"][j.Name]; ok && rr.IOPS > 0 {
			row[3] = fmt.Sprintf("%.0f%%", 100*tr.IOPS/rr.IOPS)
		}
		if j.IODepth == 1 {
			if p, pr, ok := bestPeerP50(rep, j.Name); ok && pr.P50us > 0 {
				row[4] = fmt.Sprintf("%s / %s µs (%s)", fmtUs(tr.P50us), fmtUs(pr.P50us), p)
			}
		}
		fmt.Fprintln(tw, strings.Join(row, "\t")+"\t")
	}
	tw.Flush()
}

// printVerdict prints PASS/MISS for each performance target. It is
// informational: a miss never fails the run.
func printVerdict(w io.Writer, rep *report) {
	if !comparable(rep) {
		return
	}
	tr := rep.Results["torus"]
	fmt.Fprintln(w, "\nperformance targets (informational):")
	verdict := func(pass bool) string {
		if pass {
			return "PASS"
		}
		return "MISS"
	}
	for _, j := range rep.Jobs {
		if j.IODepth < 32 {
			continue
		}
		p, pr, ok := bestPeer(rep, j.Name)
		if !ok || pr.IOPS == 0 {
			continue
		}
		ratio := tr[j.Name].IOPS / pr.IOPS
		fmt.Fprintf(w, "  %s  %-18s torus IOPS >= %.1fx best peer: %.2fx (%s)\n",
			verdict(ratio >= wantPeerRatioQD32), j.Name, wantPeerRatioQD32, ratio, p)
	}
	for _, j := range rep.Jobs {
		rr, ok := rep.Results["raw"][j.Name]
		if !ok || rr.IOPS == 0 {
			continue
		}
		ratio := tr[j.Name].IOPS / rr.IOPS
		fmt.Fprintf(w, "  %s  %-18s torus IOPS >= %.0f%% of raw io_uring: %.0f%%\n",
			verdict(ratio >= wantRawRatio), j.Name, 100*wantRawRatio, 100*ratio)
	}
	for _, j := range rep.Jobs {
		if j.IODepth != 1 {
			continue
		}
		p, pr, ok := bestPeerP50(rep, j.Name)
		if !ok {
			continue
		}
		t50 := tr[j.Name].P50us
		fmt.Fprintf(w, "  %s  %-18s torus p50 <= best peer p50: %s vs %s µs (%s)\n",
			verdict(t50 <= pr.P50us), j.Name, fmtUs(t50), fmtUs(pr.P50us), p)
	}
}

// comparable reports whether Torus ran together with a peer or raw io_uring.
func comparable(rep *report) bool {
	if _, ok := rep.Results["torus"]; !ok {
		return false
	}
	for _, t := range append([]string{"raw"}, nbdPeers...) {
		if _, ok := rep.Results[t]; ok {
			return true
		}
	}
	return false
}
