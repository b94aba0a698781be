package cluster

import (
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"testing"

	"github.com/torus-storage/torus/meta"
)

// TestLocalNode: the node registered with this host name wins; else the
// first (by id) whose unix socket exists here; else none.
func TestLocalNode(t *testing.T) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	sock := filepath.Join(t.TempDir(), "n.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	gone := filepath.Join(t.TempDir(), "gone.sock")
	nodes := []meta.Node{
		{ID: "c", Host: "other", Socket: sock},
		{ID: "a", Host: "other", Socket: gone},
		{ID: "b", Host: "here"},
	}
	if got := localNode(nodes, "here", log); got != "b" {
		t.Fatalf("host name match: got %q, want b", got)
	}
	if got := localNode(nodes, "elsewhere", log); got != "c" {
		t.Fatalf("socket on this machine: got %q, want c", got)
	}
	if got := localNode(nodes[1:], "elsewhere", log); got != "" {
		t.Fatalf("no local node: got %q", got)
	}
}
