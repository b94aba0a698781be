package metricstest

import (
	"io"
	"net/http"
	"strings"
	"testing"
)

// Scrape fetches url (a /metrics endpoint) and returns the body; the test
// fails unless it answers 200 in the Prometheus text format.
func Scrape(t testing.TB, url string) string {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %s %v", url, resp.Status, err)
	}
	if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/plain; version=0.0.4") {
		t.Fatalf("GET %s: Content-Type %q, want the text format\n%s", url, ct, b)
	}
	return string(b)
}

// CheckRuntime fails the test unless fams has the Go runtime and process
// metrics, once and without labels.
func CheckRuntime(t testing.TB, fams map[string]*Family) {
	t.Helper()
	for _, name := range []string{"go_goroutines", "process_cpu_seconds_total"} {
		if f := fams[name]; f == nil || len(f.Samples) != 1 || len(f.Labels) != 0 {
			t.Errorf("%s: %+v, want one sample without labels", name, f)
		}
	}
}

// CheckDocumented fails the test unless the torus_ metrics of fams are
// exactly those the metric table of docsPath (docs/OPERATIONS.md) lists
// for exporter, with their types and labels.
func CheckDocumented(t testing.TB, docsPath, exporter string, fams map[string]*Family) {
	t.Helper()
	docs, err := ReadDocs(docsPath)
	if err != nil {
		t.Fatal(err)
	}
	if err := Check(docs, exporter, fams); err != nil {
		t.Errorf("metrics and %s disagree:\n%v", docsPath, err)
	}
}
