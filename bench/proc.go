package main

import (
	"errors"
	"strings"
	"time"

	"github.com/torus-storage/torus/internal/testcluster"
)

// stopGrace is how long a stopped process group gets between SIGTERM and
// SIGKILL.
const stopGrace = 5 * time.Second

// startProc starts bin with args in a new process group, logging its stdout
// and stderr to logPath. Terminate (and a cancelled Wait) sends the group
// SIGTERM, then SIGKILL after stopGrace, and sweeps up what is left of it.
func startProc(logPath, bin string, args ...string) (*testcluster.Proc, error) {
	return testcluster.Start(testcluster.Spec{Bin: bin, Args: args, LogFile: logPath, Group: true, StopTimeout: stopGrace})
}

// stopProc stops p's process group (see startProc).
func stopProc(p *testcluster.Proc) { _ = p.Terminate(stopGrace) }

// tail returns the last lines of the process's log, for error messages.
func tail(p *testcluster.Proc) string {
	s := strings.TrimSpace(p.Log())
	lines := strings.Split(s, "\n")
	if len(lines) > 8 {
		lines = lines[len(lines)-8:]
	}
	return "log " + p.LogFile() + ": " + strings.Join(lines, " | ")
}

// errMissing marks a peer binary that is not installed.
var errMissing = errors.New("not installed")
