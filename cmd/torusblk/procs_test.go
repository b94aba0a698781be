package main

import (
	"io"
	"log/slog"
	"runtime"
	"testing"
)

func TestSetProcs(t *testing.T) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	orig := runtime.GOMAXPROCS(0)
	t.Cleanup(func() { runtime.GOMAXPROCS(orig) })
	cpus := runtime.NumCPU()

	t.Setenv("GOMAXPROCS", "")
	if got, err := setProcs(procsAuto, 3, log); err != nil || got != cpus+3 || runtime.GOMAXPROCS(0) != cpus+3 {
		t.Fatalf("auto, 3 shards: got %d (runtime %d), %v; want %d", got, runtime.GOMAXPROCS(0), err, cpus+3)
	}
	if got, _ := setProcs(procsAuto, 0, log); got != 2*cpus {
		t.Fatalf("auto, default shards: got %d, want %d", got, 2*cpus)
	}
	if got, _ := setProcs(5, 1, log); got != 5 || runtime.GOMAXPROCS(0) != 5 {
		t.Fatalf("--gomaxprocs 5: got %d (runtime %d)", got, runtime.GOMAXPROCS(0))
	}
	if got, _ := setProcs(-1, 1, log); got != 5 {
		t.Fatalf("--gomaxprocs -1 must leave 5 alone, got %d", got)
	}
	t.Setenv("GOMAXPROCS", "1")
	if got, _ := setProcs(procsAuto, 4, log); got != 5 {
		t.Fatalf("GOMAXPROCS set in the environment must win over auto, got %d", got)
	}
	if _, err := setProcs(procsAuto, -1, log); err != nil {
		t.Fatalf("env set: shards is not looked at, got %v", err)
	}
	t.Setenv("GOMAXPROCS", "")
	if _, err := setProcs(procsAuto, -1, log); err == nil {
		t.Fatal("negative --shards accepted")
	}
}
