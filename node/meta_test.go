package node

import (
	"context"
	"path/filepath"
	"testing"

	"github.com/torus-storage/torus/internal/devetcd"
	"github.com/torus-storage/torus/meta"
)

// testMeta starts an embedded etcd for the test and returns a client of an
// initialised cluster (1 MiB chunks, one replica) in it.
func testMeta(t *testing.T) *meta.Client {
	t.Helper()
	ctx := context.Background()
	e, err := devetcd.Start(ctx, filepath.Join(t.TempDir(), "etcd"), "", "")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.Close)
	ms, err := meta.Open(ctx, []string{e.Endpoint()}, "", meta.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ms.Close() })
	if err := ms.Init(ctx, meta.Config{ChunkSize: 1 << 20, Replication: 1}); err != nil {
		t.Fatal(err)
	}
	return ms
}
