package procs

import (
	"io"
	"log/slog"
	"runtime"
	"testing"
)

func TestSet(t *testing.T) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	orig := runtime.GOMAXPROCS(0)
	t.Cleanup(func() { runtime.GOMAXPROCS(orig) })
	cpus := runtime.NumCPU()

	t.Setenv("GOMAXPROCS", "")
	if got, err := Set(Auto, 3, log); err != nil || got != cpus+3 || runtime.GOMAXPROCS(0) != cpus+3 {
		t.Fatalf("auto, 3 threads: got %d (runtime %d), %v; want %d", got, runtime.GOMAXPROCS(0), err, cpus+3)
	}
	if got, _ := Set(Auto, 0, log); got != 2*cpus {
		t.Fatalf("auto, default threads: got %d, want %d", got, 2*cpus)
	}
	if got, _ := Set(5, 1, log); got != 5 || runtime.GOMAXPROCS(0) != 5 {
		t.Fatalf("--gomaxprocs 5: got %d (runtime %d)", got, runtime.GOMAXPROCS(0))
	}
	if got, _ := Set(-1, 1, log); got != 5 {
		t.Fatalf("--gomaxprocs -1 must leave 5 alone, got %d", got)
	}
	t.Setenv("GOMAXPROCS", "1")
	if got, _ := Set(Auto, 4, log); got != 5 {
		t.Fatalf("GOMAXPROCS set in the environment must win over auto, got %d", got)
	}
	if _, err := Set(Auto, -1, log); err != nil {
		t.Fatalf("env set: threads is not looked at, got %v", err)
	}
	t.Setenv("GOMAXPROCS", "")
	if _, err := Set(Auto, -1, log); err == nil {
		t.Fatal("negative thread count accepted")
	}
}
