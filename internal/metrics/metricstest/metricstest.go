// Package metricstest holds what the tests of the metrics endpoints share:
// a parser of the Prometheus text format.
package metricstest

import (
	"bufio"
	"errors"
	"fmt"
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
