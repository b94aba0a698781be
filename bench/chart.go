package main

// The chart subcommand draws results files as one SVG, written by hand with
// the standard library: grouped bars of IOPS and of p99 latency per job and
// target (from the last file given), and one line per file of the subject's
// IOPS over its best peer's per job.
//
// Invariants:
//   - Every bar is a <rect class="bar"> with data-metric ("iops" or "p99"),
//     data-job and data-target attributes, one per job and target that has
//     the figure; a figure that was not recorded draws no bar.
//   - Every string from a results file is XML-escaped before it is written.

import (
	"bufio"
	"encoding/xml"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"strings"

	"github.com/torus-storage/torus/internal/testcluster"
)

// runChart is "bench chart [-o FILE] [RESULTS...]". It returns the exit
// status: 0 when the chart was written, 1 when a file could not be read or
// written, 2 on bad flags.
func runChart(args []string) int {
	fs := flag.NewFlagSet("bench chart", flag.ContinueOnError)
	out := fs.String("o", "", "write the SVG to this file (default: standard output)")
	fs.Usage = func() {
		fmt.Fprintln(fs.Output(), "usage: go run ./bench chart [-o FILE] [RESULTS.json...]")
		fmt.Fprintln(fs.Output(), "Bars from the last file; one ratio line per file. Without files: the newest complete host results in bench/results.")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if err := chart(fs.Args(), *out); err != nil {
		fmt.Fprintf(os.Stderr, "bench chart: %v\n", err)
		return 1
	}
	return 0
}

// chart loads the results files (the newest complete host file when paths
// is empty) and writes their chart to out, or to standard output.
func chart(paths []string, out string) error {
	if len(paths) == 0 {
		root, err := testcluster.ModuleRoot()
		if err != nil {
			return err
		}
		p, err := newestResults(filepath.Join(root, "bench", "results"), "host")
		if err != nil {
			return err
		}
		paths = []string{p}
	}
	var runs []*runResults
	for _, p := range paths {
		r, err := loadResults(p)
		if err != nil {
			return err
		}
		runs = append(runs, r)
	}
	if out == "" {
		w := bufio.NewWriter(os.Stdout)
		if err := writeChart(w, runs); err != nil {
			return err
		}
		return w.Flush()
	}
	f, err := os.Create(out)
	if err != nil {
		return fmt.Errorf("create chart: %w", err)
	}
	w := bufio.NewWriter(f)
	if err := writeChart(w, runs); err != nil {
		f.Close()
		return err
	}
	if err := w.Flush(); err != nil {
		f.Close()
		return fmt.Errorf("write chart %s: %w", out, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("write chart %s: %w", out, err)
	}
	return nil
}

// Chart geometry, in SVG user units.
const (
	chartWidth  = 960
	chartLeft   = 72 // room for the y-axis labels
	chartRight  = 16
	barPanelH   = 220
	ratioPanelH = 180
	panelGap    = 112 // between panels: x labels, next panel's title, room for value labels
	labelRoom   = 40  // between a bar panel's title and its plot, for the labels of the highest bars
)

// targetColors are fixed colours for the known targets, so that one target
// looks the same in every chart.
var targetColors = map[string]string{
	"torus":      "#1f6fb4",
	"cluster":    "#6baed6",
	"nbdkit":     "#f28e2b",
	"qemu-nbd":   "#59a14f",
	"raw":        "#8c8c8c",
	"ublk":       "#1f6fb4",
	"loop":       "#8c8c8c",
	"nbd":        "#f28e2b",
	"ublk-swcrc": "#b07aa1",
}

// otherColors colour targets that targetColors does not know, and the
// ratio lines of several files.
var otherColors = []string{"#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#4e79a7", "#bab0ac"}

func targetColor(r *runResults, target string) string {
	if c, ok := targetColors[target]; ok {
		return c
	}
	for i, t := range r.Targets {
		if t == target {
			return otherColors[i%len(otherColors)]
		}
	}
	return "#000000"
}

// svgWriter writes SVG elements and remembers the first write error.
type svgWriter struct {
	w   io.Writer
	err error
}

func (s *svgWriter) printf(format string, args ...any) {
	if s.err == nil {
		_, s.err = fmt.Fprintf(s.w, format, args...)
	}
}

// text writes a <text> element with escaped content.
func (s *svgWriter) text(x, y float64, size int, anchor, extra, content string) {
	s.printf(`<text x="%.1f" y="%.1f" font-size="%d" text-anchor="%s"%s>%s</text>`+"\n", x, y, size, anchor, extra, esc(content))
}

// esc escapes s for XML text and attribute values.
func esc(s string) string {
	var b strings.Builder
	_ = xml.EscapeText(&b, []byte(s)) // a strings.Builder does not fail
	return b.String()
}

// logScale maps values between the decades around lo and hi onto a panel.
type logScale struct {
	lo, hi    float64 // decade bounds, lo < hi
	top, h    float64
	unitLabel func(float64) string
}

func newLogScale(vals []float64, top, h float64, label func(float64) string) logScale {
	lo, hi := math.Inf(1), math.Inf(-1)
	for _, v := range vals {
		if v > 0 {
			lo, hi = math.Min(lo, v), math.Max(hi, v)
		}
	}
	if math.IsInf(lo, 1) {
		lo, hi = 1, 10
	}
	lo = math.Pow(10, math.Floor(math.Log10(lo)))
	hi = math.Pow(10, math.Ceil(math.Log10(hi)))
	if hi <= lo {
		hi = lo * 10
	}
	return logScale{lo: lo, hi: hi, top: top, h: h, unitLabel: label}
}

func (s logScale) y(v float64) float64 {
	v = math.Max(v, s.lo)
	return s.top + s.h - s.h*(math.Log10(v)-math.Log10(s.lo))/(math.Log10(s.hi)-math.Log10(s.lo))
}

// fmtCount labels an IOPS decade: 100, 1k, 10k, 1M.
func fmtCount(v float64) string {
	switch {
	case v >= 1e6:
		return fmt.Sprintf("%gM", v/1e6)
	case v >= 1e3:
		return fmt.Sprintf("%gk", v/1e3)
	}
	return fmt.Sprintf("%g", v)
}

// fmtLatency labels a latency decade given in µs: 100 µs, 1 ms, 1 s.
func fmtLatency(us float64) string {
	switch {
	case us >= 1e6:
		return fmt.Sprintf("%g s", us/1e6)
	case us >= 1e3:
		return fmt.Sprintf("%g ms", us/1e3)
	}
	return fmt.Sprintf("%g µs", us)
}

// fmtBarUs labels a latency bar in µs as the tables print it, without a
// fractional part for whole numbers (the VM bench prints those).
func fmtBarUs(v float64) string {
	if v == math.Trunc(v) {
		return fmt.Sprintf("%.0f", v)
	}
	return fmtUs(v)
}

// writeChart writes the SVG chart of runs: bars from the last run, a ratio
// line for each.
func writeChart(w io.Writer, runs []*runResults) error {
	if len(runs) == 0 {
		return errors.New("chart: no results")
	}
	last := runs[len(runs)-1]
	plotW := float64(chartWidth - chartLeft - chartRight)
	titleH := 96.0
	iopsTop := titleH + labelRoom + 14
	p99Top := iopsTop + barPanelH + panelGap
	ratioTop := p99Top + barPanelH + panelGap - labelRoom + 24
	height := ratioTop + ratioPanelH + 52 + 16*float64(len(runs))

	s := &svgWriter{w: w}
	s.printf(`<?xml version="1.0" encoding="UTF-8"?>` + "\n")
	s.printf(`<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%.0f" viewBox="0 0 %d %.0f" font-family="DejaVu Sans, Helvetica, Arial, sans-serif">`+"\n",
		chartWidth, height, chartWidth, height)
	s.printf(`<rect x="0" y="0" width="%d" height="%.0f" fill="#ffffff"/>`+"\n", chartWidth, height)

	// Title: the run the bars show, its machine and its command.
	s.text(chartLeft, 26, 16, "start", ` font-weight="bold"`, "Torus bench, measured "+last.title())
	if d := last.Machine.Description; d != "" {
		s.text(chartLeft, 46, 12, "start", "", d)
	}
	var params []string
	if last.Command != "" {
		params = append(params, last.Command)
	}
	if last.SizeMiB > 0 {
		params = append(params, fmt.Sprintf("%d MiB", last.SizeMiB))
	}
	if last.Runtime != "" {
		params = append(params, last.Runtime+" per job")
	}
	if last.Rounds > 0 {
		params = append(params, fmt.Sprintf("median of %d round(s)", last.Rounds))
	}
	if last.Partial {
		params = append(params, "partial: only some figures were recorded")
	}
	s.text(chartLeft, 62, 12, "start", "", strings.Join(params, "; "))
	// Legend of the targets.
	x := float64(chartLeft)
	for _, t := range last.Targets {
		s.printf(`<rect x="%.1f" y="76" width="12" height="12" fill="%s"/>`+"\n", x, targetColor(last, t))
		s.text(x+16, 86.5, 12, "start", "", t)
		x += 28 + 7.5*float64(len(t))
	}

	var iopsVals, p99Vals []float64
	for _, r := range last.Results {
		if r.IOPS != nil {
			iopsVals = append(iopsVals, *r.IOPS)
		}
		if r.P99us != nil {
			p99Vals = append(p99Vals, *r.P99us)
		}
	}
	iopsTitle := "IOPS per job (log scale; higher is better)"
	for _, j := range last.Jobs {
		if strings.Contains(j, "-1m-") {
			iopsTitle = "IOPS per job (log scale; for 1 MiB jobs IOPS = MiB/s; higher is better)"
		}
	}
	barPanel(s, last, "iops", iopsTitle,
		newLogScale(iopsVals, iopsTop, barPanelH, fmtCount), plotW,
		func(r runResult) *float64 { return r.IOPS }, fmtIOPS)
	barPanel(s, last, "p99", "p99 completion latency per job, µs on the bars (log scale; lower is better)",
		newLogScale(p99Vals, p99Top, barPanelH, fmtLatency), plotW,
		func(r runResult) *float64 { return r.P99us }, fmtBarUs)
	ratioPanel(s, runs, ratioTop, plotW)
	s.printf("</svg>\n")
	return s.err
}

// barPanel draws one grouped bar chart: a group per job, a bar per target.
func barPanel(s *svgWriter, r *runResults, metric, title string, sc logScale, plotW float64,
	field func(runResult) *float64, label func(float64) string) {
	s.text(chartLeft, sc.top-labelRoom, 13, "start", ` font-weight="bold"`, title)
	// Decade grid lines, with lighter lines at 2 and 5 times each decade.
	for d := sc.lo; d <= sc.hi*1.0001; d *= 10 {
		y := sc.y(d)
		s.printf(`<line x1="%d" y1="%.1f" x2="%.0f" y2="%.1f" stroke="#bbbbbb" stroke-width="1"/>`+"\n", chartLeft, y, chartLeft+plotW, y)
		s.text(chartLeft-6, y+4, 11, "end", "", sc.unitLabel(d))
		for _, m := range []float64{2, 5} {
			if d*m < sc.hi {
				ym := sc.y(d * m)
				s.printf(`<line x1="%d" y1="%.1f" x2="%.0f" y2="%.1f" stroke="#eeeeee" stroke-width="1"/>`+"\n", chartLeft, ym, chartLeft+plotW, ym)
			}
		}
	}
	groupW := plotW / float64(len(r.Jobs))
	barW := groupW * 0.8 / float64(len(r.Targets))
	for i, j := range r.Jobs {
		gx := chartLeft + float64(i)*groupW + groupW*0.1
		for k, t := range r.Targets {
			res, ok := r.lookup(j, t)
			if !ok || field(res) == nil {
				continue
			}
			v := *field(res)
			bx := gx + float64(k)*barW
			by := sc.y(v)
			s.printf(`<rect class="bar" data-metric="%s" data-job="%s" data-target="%s" x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="%s"><title>%s</title></rect>`+"\n",
				metric, esc(j), esc(t), bx+1, by, barW-2, sc.top+sc.h-by, targetColor(r, t), esc(t+" "+j+": "+label(v)))
			lx, ly := bx+barW/2+3, by-4
			s.text(lx, ly, 9, "start", fmt.Sprintf(` transform="rotate(-90 %.1f %.1f)" fill="#333333"`, lx, ly), label(v))
		}
		s.text(chartLeft+float64(i)*groupW+groupW/2, sc.top+sc.h+16, 12, "middle", "", j)
	}
	s.printf(`<line x1="%d" y1="%.1f" x2="%.0f" y2="%.1f" stroke="#333333" stroke-width="1"/>`+"\n",
		chartLeft, sc.top+sc.h, chartLeft+plotW, sc.top+sc.h)
}

// ratioPanel draws, for each run, the subject's IOPS over its best peer's
// per job of the last run, on a linear scale with a dashed line at 1.
func ratioPanel(s *svgWriter, runs []*runResults, top, plotW float64) {
	last := runs[len(runs)-1]
	title := fmt.Sprintf("%s IOPS / best peer's (%s) per job; dashed: equal", last.Subject, strings.Join(last.Peers, ", "))
	if len(last.Peers) == 0 {
		title = last.Subject + " IOPS / best peer's per job: no peer ran"
	}
	s.text(chartLeft, top-12, 13, "start", ` font-weight="bold"`, title)
	maxR := 2.0
	for _, r := range runs {
		for _, j := range last.Jobs {
			if v, _, ok := r.peerRatio(j); ok {
				maxR = math.Max(maxR, v)
			}
		}
	}
	maxR = math.Ceil(maxR*2) / 2
	y := func(v float64) float64 { return top + ratioPanelH - ratioPanelH*v/maxR }
	for g := 0.0; g <= maxR+1e-9; g += 0.5 {
		stroke, dash := "#eeeeee", ""
		if g == 1 {
			stroke, dash = "#555555", ` stroke-dasharray="6 4"`
		}
		s.printf(`<line x1="%d" y1="%.1f" x2="%.0f" y2="%.1f" stroke="%s" stroke-width="1"%s/>`+"\n", chartLeft, y(g), chartLeft+plotW, y(g), stroke, dash)
		s.text(chartLeft-6, y(g)+4, 11, "end", "", fmt.Sprintf("%.1f×", g))
	}
	groupW := plotW / float64(len(last.Jobs))
	for i, j := range last.Jobs {
		s.text(chartLeft+float64(i)*groupW+groupW/2, top+ratioPanelH+16, 12, "middle", "", j)
	}
	for n, r := range runs {
		color := targetColor(r, r.Subject)
		if len(runs) > 1 {
			color = otherColors[n%len(otherColors)]
		}
		// A job without both figures breaks the line.
		var seg []string
		flush := func() {
			if len(seg) > 1 {
				s.printf(`<polyline class="ratio" fill="none" stroke="%s" stroke-width="2" points="%s"/>`+"\n", color, strings.Join(seg, " "))
			}
			seg = nil
		}
		for i, j := range last.Jobs {
			v, peer, ok := r.peerRatio(j)
			if !ok {
				flush()
				continue
			}
			px, py := chartLeft+float64(i)*groupW+groupW/2, y(v)
			seg = append(seg, fmt.Sprintf("%.1f,%.1f", px, py))
			s.printf(`<circle class="ratio-point" data-job="%s" cx="%.1f" cy="%.1f" r="3.5" fill="%s"><title>%s</title></circle>`+"\n",
				esc(j), px, py, color, esc(fmt.Sprintf("%s %s: %.2f× %s", r.title(), j, v, peer)))
			if n == len(runs)-1 {
				s.text(px+6, py-6, 10, "start", "", fmt.Sprintf("%.2f× %s", v, peer))
			}
		}
		flush()
		ly := top + ratioPanelH + 40 + 16*float64(n)
		s.printf(`<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" stroke="%s" stroke-width="2"/>`+"\n", chartLeft, ly-4, chartLeft+20, ly-4, color)
		name := r.title()
		if r.Partial {
			name += ", partial"
		}
		s.text(chartLeft+26, ly, 11, "start", "", name)
	}
}
