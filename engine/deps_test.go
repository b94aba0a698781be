package engine_test

import (
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

// The frontends, the store and the Volume seam never link the etcd server:
// only torusd dev and tests run one (internal/devetcd). A dependency that
// pulls it in (through package meta, say) fails here.
func TestNoEtcdServer(t *testing.T) {
	gobin, err := exec.LookPath("go")
	if err != nil {
		gobin = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	for _, pkg := range []string{"engine", "store", "nbd", "ublk"} {
		out, err := exec.Command(gobin, "list", "-deps", "github.com/torus-storage/torus/"+pkg).CombinedOutput()
		if err != nil {
			t.Fatalf("go list -deps %s: %v\n%s", pkg, err, out)
		}
		for _, dep := range strings.Fields(string(out)) {
			if strings.HasPrefix(dep, "go.etcd.io/etcd/server") {
				t.Errorf("package %s links %s", pkg, dep)
				break
			}
		}
	}
	out, err := exec.Command(gobin, "list", "-deps", "github.com/torus-storage/torus/engine").CombinedOutput()
	if err != nil {
		t.Fatalf("go list -deps engine: %v\n%s", err, out)
	}
	for _, dep := range strings.Fields(string(out)) {
		if strings.Contains(strings.Split(dep, "/")[0], ".") && dep != "github.com/torus-storage/torus/engine" {
			t.Errorf("package engine links %s: the Volume seam depends on the standard library only", dep)
		}
	}
}
