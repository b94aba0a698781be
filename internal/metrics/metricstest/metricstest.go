// Package metricstest holds what the tests of the metrics endpoints share:
// a parser of the Prometheus text format and the metric table of
// docs/OPERATIONS.md, so that a test can hold what a process exposes and
// what the documentation lists to each other.
package metricstest

import (
	"bufio"
	"errors"
	"fmt"
	"maps"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
)

// Family is one metric family of a scrape.
type Family struct {
	Name, Type, Help string
	// Labels are the names of the labels of its samples, sorted.
	Labels  []string
	Samples []Sample
}

// Sample is one sample of a family. Its Name is the family's, or for a
// summary or histogram the family's with a suffix such as _sum.
type Sample struct {
	Name   string
	Labels map[string]string
	Value  float64
}

// Value returns the value of the sample of f whose labels include want
// (name, value pairs), and false if f has none.
func (f *Family) Value(want ...string) (float64, bool) {
	for _, s := range f.Samples {
		if s.Name != f.Name {
			continue
		}
		ok := true
		for i := 0; i+1 < len(want); i += 2 {
			if s.Labels[want[i]] != want[i+1] {
				ok = false
			}
		}
		if ok {
			return s.Value, true
		}
	}
	return 0, false
}

// Parse parses a scrape in the Prometheus text format (version 0.0.4) into
// its families by name. Every sample must follow the TYPE line of its
// family, as the format requires.
func Parse(body string) (map[string]*Family, error) {
	fams := make(map[string]*Family)
	var cur *Family
	get := func(name string) *Family {
		f := fams[name]
		if f == nil {
			f = &Family{Name: name}
			fams[name] = f
		}
		return f
	}
	sc := bufio.NewScanner(strings.NewReader(body))
	sc.Buffer(nil, 1<<20)
	for line := 1; sc.Scan(); line++ {
		text := sc.Text()
		switch {
		case strings.TrimSpace(text) == "":
		case strings.HasPrefix(text, "# HELP "):
			name, help, _ := strings.Cut(strings.TrimPrefix(text, "# HELP "), " ")
			get(name).Help = help
		case strings.HasPrefix(text, "# TYPE "):
			name, typ, _ := strings.Cut(strings.TrimPrefix(text, "# TYPE "), " ")
			cur = get(name)
			cur.Type = typ
		case strings.HasPrefix(text, "#"):
		default:
			s, err := parseSample(text)
			if err != nil {
				return nil, fmt.Errorf("line %d %q: %w", line, text, err)
			}
			if cur == nil || !ofFamily(s.Name, cur.Name) {
				return nil, fmt.Errorf("line %d: sample %s does not follow the TYPE line of its family", line, s.Name)
			}
			cur.Samples = append(cur.Samples, s)
			for l := range s.Labels {
				if !slices.Contains(cur.Labels, l) && !(l == "quantile" || l == "le") {
					cur.Labels = append(cur.Labels, l)
					slices.Sort(cur.Labels)
				}
			}
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read scrape: %w", err)
	}
	return fams, nil
}

// ofFamily says whether a sample called name belongs to family fam: the
// same name, or a summary's or histogram's _sum, _count or _bucket.
func ofFamily(name, fam string) bool {
	suffix, ok := strings.CutPrefix(name, fam)
	return ok && (suffix == "" || suffix == "_sum" || suffix == "_count" || suffix == "_bucket")
}

// parseSample parses `name{label="value",...} value [timestamp]`.
func parseSample(text string) (Sample, error) {
	s := Sample{Labels: map[string]string{}}
	i := strings.IndexAny(text, "{ ")
	if i <= 0 {
		return s, errors.New("no metric name")
	}
	s.Name, text = text[:i], text[i:]
	if text[0] == '{' {
		text = text[1:]
		for {
			text = strings.TrimLeft(text, ", ")
			if strings.HasPrefix(text, "}") {
				text = text[1:]
				break
			}
			name, rest, ok := strings.Cut(text, `="`)
			if !ok || name == "" {
				return s, errors.New("bad label")
			}
			var val strings.Builder
			j := 0
			for ; j < len(rest) && rest[j] != '"'; j++ {
				if rest[j] == '\\' && j+1 < len(rest) {
					j++
					switch rest[j] {
					case 'n':
						val.WriteByte('\n')
					default:
						val.WriteByte(rest[j])
					}
					continue
				}
				val.WriteByte(rest[j])
			}
			if j == len(rest) {
				return s, fmt.Errorf("label %s: unterminated value", name)
			}
			s.Labels[name] = val.String()
			text = rest[j+1:]
		}
	}
	fields := strings.Fields(text)
	if len(fields) < 1 || len(fields) > 2 {
		return s, errors.New("want a value and at most a timestamp")
	}
	v, err := strconv.ParseFloat(fields[0], 64)
	if err != nil {
		return s, fmt.Errorf("value: %w", err)
	}
	s.Value = v
	return s, nil
}

// Doc is one row of the metric table of docs/OPERATIONS.md.
type Doc struct {
	// Name is the metric's name; Exporter the command that serves it
	// (one of Exporters); Type counter or gauge.
	Name, Exporter, Type string
	// Labels are the label names, sorted.
	Labels []string
	// Meaning is the last cell of the row.
	Meaning string
}

// Exporters are the commands that serve metrics.
var Exporters = []string{"torusd", "torusblk"}

// docName matches a backquoted metric name.
var docName = regexp.MustCompile("^`([a-z_:][a-z0-9_:]*)`$")

// mention matches a metric name in prose (not a prefix such as torus_volume_*).
var mention = regexp.MustCompile(`\btorus_[a-z0-9_]*[a-z0-9]\b`)

// ReadDocs reads the metric table of the Markdown file at path: the rows of
// its "## Metrics" section whose first cell is a backquoted torus_ name,
// with the cells metric, exported by, type, labels, meaning. Every other
// torus_ name the file mentions must have a row.
func ReadDocs(path string) ([]Doc, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read the metric table: %w", err)
	}
	_, sec, ok := strings.Cut(string(b), "\n## Metrics\n")
	if !ok {
		return nil, fmt.Errorf("%s: no \"## Metrics\" section", path)
	}
	if i := strings.Index(sec, "\n## "); i >= 0 {
		sec = sec[:i]
	}
	var docs []Doc
	for _, line := range strings.Split(sec, "\n") {
		if !strings.HasPrefix(line, "| `torus_") {
			continue
		}
		cells := strings.Split(strings.Trim(line, "| "), "|")
		for i := range cells {
			cells[i] = strings.TrimSpace(cells[i])
		}
		if len(cells) != 5 {
			return nil, fmt.Errorf("%s: metric row %q: want 5 cells (metric, exported by, type, labels, meaning)", path, line)
		}
		m := docName.FindStringSubmatch(cells[0])
		if m == nil {
			return nil, fmt.Errorf("%s: metric row %q: want one backquoted metric name per row", path, line)
		}
		d := Doc{Name: m[1], Exporter: cells[1], Type: cells[2], Meaning: cells[4]}
		switch {
		case !slices.Contains(Exporters, d.Exporter):
			return nil, fmt.Errorf("%s: metric %s: exported by %q, want one of %v", path, d.Name, d.Exporter, Exporters)
		case d.Type != "counter" && d.Type != "gauge":
			return nil, fmt.Errorf("%s: metric %s: type %q, want counter or gauge", path, d.Name, d.Type)
		case d.Meaning == "":
			return nil, fmt.Errorf("%s: metric %s: no meaning", path, d.Name)
		case slices.ContainsFunc(docs, func(o Doc) bool { return o.Name == d.Name && o.Exporter == d.Exporter }):
			return nil, fmt.Errorf("%s: metric %s of %s listed twice", path, d.Name, d.Exporter)
		}
		for l := range strings.SplitSeq(cells[3], ",") {
			l = strings.Trim(strings.TrimSpace(l), "`")
			if l != "" && l != "none" {
				d.Labels = append(d.Labels, l)
			}
		}
		slices.Sort(d.Labels)
		docs = append(docs, d)
	}
	if len(docs) == 0 {
		return nil, fmt.Errorf("%s: no metric rows in the \"## Metrics\" section", path)
	}
	for _, name := range mention.FindAllString(string(b), -1) {
		if !slices.ContainsFunc(docs, func(d Doc) bool { return d.Name == name }) {
			return nil, fmt.Errorf("%s mentions %s, which is not in its metric table", path, name)
		}
	}
	return docs, nil
}

// Check returns an error naming every difference between the torus_
// families of a scrape of exporter and the rows of docs for exporter:
// a family not documented, a documented metric not exposed, or a type, a
// label set or an empty HELP that differs.
func Check(docs []Doc, exporter string, fams map[string]*Family) error {
	var errs []error
	documented := map[string]bool{}
	for _, d := range docs {
		if d.Exporter != exporter {
			continue
		}
		documented[d.Name] = true
		f := fams[d.Name]
		switch {
		case f == nil || len(f.Samples) == 0:
			errs = append(errs, fmt.Errorf("%s is documented for %s but not exposed", d.Name, exporter))
		case f.Type != d.Type:
			errs = append(errs, fmt.Errorf("%s: type %s, documented as %s", d.Name, f.Type, d.Type))
		case !slices.Equal(f.Labels, d.Labels):
			errs = append(errs, fmt.Errorf("%s: labels %v, documented as %v", d.Name, f.Labels, d.Labels))
		case f.Help == "":
			errs = append(errs, fmt.Errorf("%s: no HELP", d.Name))
		}
		if d.Type == "counter" && !strings.HasSuffix(d.Name, "_total") {
			errs = append(errs, fmt.Errorf("%s: a counter's name ends in _total", d.Name))
		}
	}
	for _, name := range slices.Sorted(maps.Keys(fams)) {
		if strings.HasPrefix(name, "torus_") && !documented[name] {
			errs = append(errs, fmt.Errorf("%s is exposed by %s but not in the metric table of docs/OPERATIONS.md", name, exporter))
		}
	}
	return errors.Join(errs...)
}
