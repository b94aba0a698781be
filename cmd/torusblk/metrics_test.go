package main

import (
	"bytes"
	"context"
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/torus-storage/torus/internal/metrics/metricstest"
	"github.com/torus-storage/torus/internal/nbdtest"
	"github.com/torus-storage/torus/store"
)

// TestClusterScrubMetrics: one node's copies of a volume get a flipped byte
// on disk (node stopped); `torusblk serve --scrub-interval 1s --metrics`
// then scrubs, the rebuild repairs the bad copies, and /metrics shows the
// checksum errors, the repairs and no missed chunk left; the data reads
// back intact.
func TestClusterScrubMetrics(t *testing.T) {
	c := startCluster(t, 3)
	c.Ctl("volume", "create", "scrubbed", "--size", "8MiB", "--replication", "3")
	s, sock := c.serve("scrubbed")
	cl, err := nbdtest.DialClient(sock, "torus")
	if err != nil {
		t.Fatalf("%v\n%s", err, s.Log())
	}
	data := make([]byte, 8<<20)
	for i := range data {
		data[i] = byte(i*7 + i>>12)
	}
	for off := 0; off < len(data); off += 256 << 10 {
		if err := <-cl.Write(uint64(off), data[off:off+256<<10]); err != nil {
			t.Fatal(err)
		}
	}
	if err := <-cl.Flush(); err != nil {
		t.Fatal(err)
	}
	cl.Close()
	s.Stop(t)

	// Flip a byte in every chunk of the volume on node1's disk.
	bad := c.Nodes[0]
	bad.Proc.Stop(t)
	storePath := filepath.Join(bad.DataDir, "store")
	st, err := store.OpenStore(storePath, store.StoreOptions{Shards: 1})
	if err != nil {
		t.Fatal(err)
	}
	v, err := c.Meta.Volume(context.Background(), "scrubbed")
	if err != nil {
		t.Fatal(err)
	}
	var offs []int64
	for i := range 8 {
		if off, ok := st.SlotDataOffset(store.ChunkID{Volume: v.ID, Index: uint64(i)}); ok {
			offs = append(offs, off+5000)
		}
	}
	st.Close()
	if len(offs) != 8 {
		t.Fatalf("%s holds %d of the 8 chunks (R=3 on 3 nodes: want all)", bad.ID, len(offs))
	}
	flipBytes(t, storePath, offs, 0x5a)
	c.StartNode(bad)
	c.WaitNodes(3)

	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	maddr := l.Addr().String()
	l.Close()
	s, sock = c.serve("scrubbed", "--metrics", maddr, "--scrub-interval", "1s", "--local-node", bad.ID)
	url := "http://" + maddr + "/metrics"
	deadline := time.Now().Add(60 * time.Second)
	var body string
	for {
		body = metricstest.Scrape(t, url)
		if metricValue(t, body, "torus_volume_scrub_runs_total") >= 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no scrub finished within 60s:\n%s\n%s", body, s.Log())
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Logf("metrics after the first scrub:\n%s", body)
	fams, err := metricstest.Parse(body)
	if err != nil {
		t.Fatal(err)
	}
	metricstest.CheckRuntime(t, fams)
	metricstest.CheckDocumented(t, "../../docs/OPERATIONS.md", "torusblk", fams)
	for name, want := range map[string]uint64{
		"torus_volume_scrub_checksum_errors_total": 8,
		"torus_volume_scrub_repaired_total":        8,
		"torus_volume_scrub_mismatches_total":      0,
		"torus_volume_missed_chunks":               0,
		"torus_volume_rebuilt_chunks_total":        8,
		"torus_volume_size_bytes":                  8 << 20,
	} {
		if got := metricValue(t, body, name); got != want {
			t.Errorf("%s = %d, want %d", name, got, want)
		}
	}
	if runs, chunks := metricValue(t, body, "torus_volume_scrub_runs_total"), metricValue(t, body, "torus_volume_scrub_chunks_total"); chunks != 8*runs {
		t.Errorf("%d scrubs compared %d chunks, want 8 each", runs, chunks)
	}
	// Reads prefer the repaired node (--local-node): the data is intact.
	cl, err = nbdtest.DialClient(sock, "torus")
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	got := make([]byte, len(data))
	for off := 0; off < len(data); off += 256 << 10 {
		if err := <-cl.Read(uint64(off), got[off:off+256<<10]); err != nil {
			t.Fatal(err)
		}
	}
	if !bytes.Equal(got, data) {
		t.Fatal("data read back after the scrub differs from what was written")
	}
	if f := metricValue(t, metricstest.Scrape(t, url), "torus_volume_read_failovers_total"); f != 0 {
		t.Errorf("reads failed over %d times after the repair: the bad node's copies are still bad", f)
	}
	cl.Close()
	s.Stop(t)
}

// metricValue returns the sample of name for volume "scrubbed", checking
// that it has a HELP and is a counter or a gauge.
func metricValue(t *testing.T, body, name string) uint64 {
	t.Helper()
	fams, err := metricstest.Parse(body)
	if err != nil {
		t.Fatalf("%v\n%s", err, body)
	}
	f := fams[name]
	if f == nil || f.Help == "" || f.Type != "counter" && f.Type != "gauge" {
		t.Fatalf("metric %s: %+v, want a counter or a gauge with a HELP:\n%s", name, f, body)
	}
	v, ok := f.Value("volume", "scrubbed")
	if !ok {
		t.Fatalf("no sample of %s for volume scrubbed:\n%s", name, body)
	}
	return uint64(v)
}
