package metricstest

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestParseMetrics parses escaped label values, floats, timestamps and a
// summary's samples, and refuses samples out of their family.
func TestParseMetrics(t *testing.T) {
	fams, err := Parse(`# HELP a_total A counter.
# TYPE a_total counter
a_total{node="x\"\\\ny",zone="z"} 6.7108864e+07
a_total{node="b"} 3 1700000000000
# HELP s A summary.
# TYPE s summary
s{quantile="0.5"} 0.25
s_sum 1.5
s_count 4
# TYPE g gauge
g NaN
`)
	if err != nil {
		t.Fatal(err)
	}
	a := fams["a_total"]
	if a == nil || a.Type != "counter" || a.Help != "A counter." || strings.Join(a.Labels, ",") != "node,zone" || len(a.Samples) != 2 {
		t.Fatalf("a_total = %+v", a)
	}
	if v, ok := a.Value("node", "x\"\\\ny"); !ok || v != 67108864 {
		t.Errorf("a_total{node=escaped} = %v, %v", v, ok)
	}
	if v, ok := a.Value("node", "b"); !ok || v != 3 {
		t.Errorf("a_total{node=b} = %v, %v", v, ok)
	}
	if _, ok := a.Value("node", "c"); ok {
		t.Error("a_total{node=c} found")
	}
	if s := fams["s"]; s == nil || len(s.Samples) != 3 || len(s.Labels) != 0 {
		t.Errorf("summary s = %+v, want 3 samples and no labels but quantile", s)
	}
	if fams["s_sum"] != nil || fams["g"] == nil {
		t.Errorf("families %v", fams)
	}
	for _, bad := range []string{
		"x 1\n",                          // no TYPE before
		"# TYPE a counter\nb 1\n",        // another family's sample
		"# TYPE a counter\na{l=\"v} 1\n", // unterminated value
		"# TYPE a counter\na one\n",      // not a number
		"# TYPE a counter\na{l=\"v\"}\n", // no value
	} {
		if _, err := Parse(bad); err == nil {
			t.Errorf("Parse(%q) succeeded", bad)
		}
	}
}

// TestReadDocsMetrics reads a metric table and refuses what would make it
// ambiguous.
func TestReadDocsMetrics(t *testing.T) {
	const head = "# Ops\n\nSee `torus_up`.\n\n## Metrics\n\n| metric | exported by | type | labels | meaning |\n|---|---|---|---|---|\n"
	write := func(s string) string {
		p := filepath.Join(t.TempDir(), "OPS.md")
		if err := os.WriteFile(p, []byte(s), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	docs, err := ReadDocs(write(head + "| `torus_up` | torusd | gauge | `node` | 1 while up |\n" +
		"| `torus_x_total` | torusblk | counter | `volume`, `a` | x |\n\n## Next\n\n| `torus_other` | torusd | gauge | | not in the section |\n"))
	if err == nil {
		t.Fatalf("a mention of torus_other outside the table was accepted: %+v", docs)
	}
	docs, err = ReadDocs(write(head + "| `torus_up` | torusd | gauge | `node` | 1 while up |\n" +
		"| `torus_x_total` | torusblk | counter | `volume`, `a` | x |\n\n## Next\n"))
	if err != nil || len(docs) != 2 || docs[1].Exporter != "torusblk" || strings.Join(docs[1].Labels, ",") != "a,volume" {
		t.Fatalf("ReadDocs = %+v, %v", docs, err)
	}
	fams, err := Parse("# HELP torus_up Up.\n# TYPE torus_up gauge\ntorus_up{node=\"n\"} 1\n# HELP torus_y Y.\n# TYPE torus_y gauge\ntorus_y{node=\"n\"} 1\n")
	if err != nil {
		t.Fatal(err)
	}
	err = Check(docs, "torusd", fams)
	if err == nil || !strings.Contains(err.Error(), "torus_y is exposed") || strings.Contains(err.Error(), "torus_up") {
		t.Errorf("Check = %v, want only torus_y undocumented", err)
	}
	for _, row := range []string{
		"| `torus_up`, `torus_b` | torusd | gauge | `node` | two names |\n",
		"| `torus_up` | torusctl | gauge | `node` | unknown exporter |\n",
		"| `torus_up` | torusd | histogram | `node` | unknown type |\n",
		"| `torus_up` | torusd | gauge | `node` |\n",
		"| `torus_up` | torusd | gauge | `node` | a |\n| `torus_up` | torusd | gauge | `node` | b |\n",
	} {
		if docs, err := ReadDocs(write(head + row)); err == nil {
			t.Errorf("row %q accepted: %+v", row, docs)
		}
	}
}
