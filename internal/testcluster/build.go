package testcluster

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/torus-storage/torus/internal/devetcd"
)

// ModuleRoot walks up from the working directory to the directory holding
// go.mod.
func ModuleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", fmt.Errorf("getwd: %w", err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("go.mod not found above the working directory; run from the repository")
		}
		dir = parent
	}
}

// Build builds the command ./cmd/NAME of this module into dir and returns
// the binary's path. The go command takes GOFLAGS from the environment, so
// a test binary that sets GOFLAGS=-tags=... gets binaries with those tags.
func Build(ctx context.Context, dir, name string) (string, error) {
	root, err := ModuleRoot()
	if err != nil {
		return "", fmt.Errorf("build %s: %w", name, err)
	}
	out := filepath.Join(dir, name)
	cmd := exec.CommandContext(ctx, "go", "build", "-o", out, "./cmd/"+name)
	cmd.Dir = root
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("build %s (go build -o %s ./cmd/%s): %w\n%s", name, out, name, err, b)
	}
	return out, nil
}

// bins holds the binaries built once per process (test binary).
var bins struct {
	mu    sync.Mutex
	dir   string // made on first use; Main removes it
	built map[string]*built
}

type built struct {
	once sync.Once
	path string
	err  error
}

// binDir returns the directory of the binaries, making it on first use.
func binDir() (string, error) {
	bins.mu.Lock()
	defer bins.mu.Unlock()
	if bins.dir == "" {
		dir, err := os.MkdirTemp("", "torus-test-bin")
		if err != nil {
			return "", fmt.Errorf("directory for test binaries: %w", err)
		}
		bins.dir = dir
	}
	return bins.dir, nil
}

// BuildOnce returns the path of the command ./cmd/NAME built for this
// process, building it on the first call (later calls wait for that build
// and share its result). The binaries go to a temporary directory that Main
// removes.
func BuildOnce(name string) (string, error) {
	dir, err := binDir()
	if err != nil {
		return "", err
	}
	bins.mu.Lock()
	if bins.built == nil {
		bins.built = map[string]*built{}
	}
	b := bins.built[name]
	if b == nil {
		b = &built{}
		bins.built[name] = b
	}
	bins.mu.Unlock()
	b.once.Do(func() { b.path, b.err = Build(context.Background(), dir, name) })
	return b.path, b.err
}

// Bin is BuildOnce for a test: it fails the test if the build fails.
func Bin(t testing.TB, name string) string {
	t.Helper()
	p, err := BuildOnce(name)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// MainOptions say what Main prepares before a test binary's tests run.
type MainOptions struct {
	// Build maps commands (./cmd/NAME) to the variables that get the paths
	// of their binaries, built before the tests run. Other commands are
	// built on first use (Bin).
	Build map[string]*string
	// Etcd, if set, gets the endpoint of an embedded etcd shared by the
	// whole test binary (each test on a prefix of its own).
	Etcd *string
}

// Main prepares what opt asks for, runs the tests and returns the exit code
// for os.Exit (1, with the reason on stderr, when the preparation fails).
// It removes the binaries afterwards. Call it from TestMain:
//
//	os.Exit(testcluster.Main(m, testcluster.MainOptions{...}))
func Main(m *testing.M, opt MainOptions) int {
	defer func() {
		bins.mu.Lock()
		if bins.dir != "" {
			os.RemoveAll(bins.dir)
		}
		bins.mu.Unlock()
	}()
	for name, p := range opt.Build {
		path, err := BuildOnce(name)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		*p = path
	}
	if opt.Etcd != nil {
		dir, err := binDir()
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		e, err := devetcd.Start(ctx, filepath.Join(dir, "etcd"), "", "")
		cancel()
		if err != nil {
			fmt.Fprintf(os.Stderr, "start embedded etcd: %v\n", err)
			return 1
		}
		defer e.Close()
		*opt.Etcd = e.Endpoint()
	}
	return m.Run()
}
