package main

import (
	"strings"
	"testing"
)

// TestNearFullFlag: --near-full outside (0, 1) and a --usage-interval that
// is not positive are usage errors (exit 2) naming the flag, before the
// node touches etcd or its data dir.
func TestNearFullFlag(t *testing.T) {
	for _, bad := range [][]string{
		{"--near-full", "0"}, {"--near-full", "1"}, {"--near-full", "1.5"}, {"--near-full", "-0.2"}, {"--near-full", "NaN"},
		{"--near-full", "lots"}, {"--usage-interval", "0s"}, {"--usage-interval", "-1s"},
	} {
		p := start(t, nodeArgs(prefix(t), t.TempDir(), t.TempDir(), bad...)...)
		if code := p.WaitExit(t); code != 2 || !strings.Contains(p.Log(), bad[0]) || !strings.Contains(p.Log(), "usage: ") {
			t.Errorf("torusd %s %s: exit %d, stderr:\n%s", bad[0], bad[1], code, p.Log())
		}
	}
}
