package main

import (
	"strings"
	"testing"
)

// TestParseMountinfo reads mount points, devices, roots and types from
// mountinfo lines, with optional fields and escaped spaces, and skips
// malformed lines.
func TestParseMountinfo(t *testing.T) {
	in := `22 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw
36 22 252:0 / /var/lib/kubelet/plugins/kubernetes.io/csi/staging/vol\0401 rw,relatime shared:20 master:3 - xfs /dev/ublkb0 rw
40 22 0:5 /ublkb0 /var/lib/kubelet/pods/p/volumeDevices/vol rw,nosuid - devtmpfs udev rw,size=1k
garbage
41 22 x:y / /bad rw - ext4 /dev/x rw
42 22 8:1 / /no-separator rw ext4 /dev/x rw
`
	ms := parseMountinfo(strings.NewReader(in))
	if len(ms) != 3 {
		t.Fatalf("parsed %d mounts, want 3: %+v", len(ms), ms)
	}
	if m := ms[1]; m.major != 252 || m.minor != 0 || m.point != "/var/lib/kubelet/plugins/kubernetes.io/csi/staging/vol 1" || m.fstype != "xfs" || m.src != "/dev/ublkb0" {
		t.Errorf("line 2: %+v", m)
	}
	if m := ms[2]; m.root != "/ublkb0" || m.fstype != "devtmpfs" {
		t.Errorf("line 3: %+v", m)
	}
	for in, want := range map[string]string{`a\040b`: "a b", `a\\b`: `a\\b`, `x\011`: "x\t", `\04`: `\04`, `plain`: "plain"} {
		if got := unescape(in); got != want {
			t.Errorf("unescape(%q) = %q, want %q", in, got, want)
		}
	}
}
