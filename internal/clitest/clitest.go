// Package clitest runs a command's tests against the command's real binary,
// built fresh, and a real etcd (embedded) shared by the whole test binary.
package clitest

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/torus-storage/torus/internal/devetcd"
)

// Main builds the package in the current directory as name into a
// temporary directory, starts an embedded etcd there, sets *bin to the
// binary and *etcd to the endpoint, runs m and returns its exit code (or 1
// when the set-up fails). Call it from TestMain:
// os.Exit(clitest.Main(m, "torusd", &binPath, &endpoint)).
func Main(m *testing.M, name string, bin, etcd *string) int {
	tmp, err := os.MkdirTemp("", name+"-test")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(tmp)
	*bin = filepath.Join(tmp, name)
	if out, err := exec.Command("go", "build", "-o", *bin, ".").CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "build %s: %v\n%s", name, err, out)
		return 1
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	e, err := devetcd.Start(ctx, filepath.Join(tmp, "etcd"), "", "")
	if err != nil {
		fmt.Fprintf(os.Stderr, "start embedded etcd: %v\n", err)
		return 1
	}
	defer e.Close()
	*etcd = e.Endpoint()
	return m.Run()
}
