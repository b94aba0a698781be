package main

import (
	"os/exec"
	"strings"
	"testing"
)

func TestValidSchedName(t *testing.T) {
	for _, name := range []string{"none", "kernel", "mq-deadline", "bfq", "kyber", "a_b-9"} {
		if !validSchedName(name) {
			t.Errorf("validSchedName(%q) = false, want true", name)
		}
	}
	for _, name := range []string{"", "None", "mq deadline", "../x", "none\n", "[none]", strings.Repeat("a", 33)} {
		if validSchedName(name) {
			t.Errorf("validSchedName(%q) = true, want false", name)
		}
	}
}

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
