package main

import (
	"os/exec"
	"strings"
	"testing"
)

// TestAttachBadIOScheduler: a malformed --io-scheduler is a usage error that
// names the flag, given before anything is attached (and before the root
// check, so it runs on the host). Names the kernel does not offer are
// checked against sysfs by the VM test (scripts/vm/attach-e2e.sh).
func TestAttachBadIOScheduler(t *testing.T) {
	for _, name := range []string{"", "MQ-DEADLINE", "none; reboot"} {
		out, err := exec.Command(torusblkBin, "attach", "--store", t.TempDir(), "--size", "64MiB", "--io-scheduler", name).CombinedOutput()
		if err == nil {
			t.Fatalf("attach --io-scheduler %q succeeded: %s", name, out)
		}
		if !strings.Contains(string(out), "--io-scheduler") || !strings.Contains(string(out), "mq-deadline") {
			t.Errorf("attach --io-scheduler %q: error does not say what to give: %s", name, out)
		}
	}
}
