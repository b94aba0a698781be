package main

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/torus-storage/torus/meta"
)

// TestVolumeResizeDevice: volume resize says what the attached device did,
// from the device record its holder keeps in etcd: nothing attached; a
// device that grew (the holder reports the new size); one that cannot grow
// live (it says why and what to do); an NBD export; a holder that reports
// nothing in time (exit 1).
func TestVolumeResizeDevice(t *testing.T) {
	initCluster(t, 1)
	registerNodes(t, "n", 1)
	ctx := context.Background()
	s, err := meta.Open(ctx, []string{endpoint}, prefix(t), meta.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	must(t, "volume", "create", "rv", "--size", "1GiB")

	if out := must(t, "volume", "resize", "rv", "--size", "2GiB"); !strings.Contains(out, "not attached: the next attach gets the new size") {
		t.Fatalf("resize of a detached volume:\n%s", out)
	}

	l, err := s.Attach(ctx, "rv", "test holder", 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Release(ctx)
	v, err := s.Volume(ctx, "rv")
	if err != nil {
		t.Fatal(err)
	}
	if out := must(t, "volume", "resize", "rv", "--size", "3GiB", "--wait", "1s"); !strings.Contains(out, "reports no device") {
		t.Fatalf("resize with a holder that reports no device:\n%s", out)
	}

	// A live device: the holder reports the new size once it sees it.
	dev := meta.Device{Path: "/dev/ublkb7", Frontend: "ublk", Size: 3 << 30, Grow: meta.GrowLive}
	if err := s.SetDevice(ctx, l, dev); err != nil {
		t.Fatal(err)
	}
	wctx, stop := context.WithCancel(ctx)
	go func() {
		for nv := range s.WatchVolume(wctx, v.ID) {
			if nv.Size > dev.Size {
				dev.Size = nv.Size
				s.SetDevice(wctx, l, dev)
			}
		}
	}()
	out := must(t, "volume", "resize", "rv", "--size", "4GiB")
	stop()
	if !strings.Contains(out, "device /dev/ublkb7 on ") || !strings.Contains(out, "grew to 4 GiB") || !strings.Contains(out, "resize2fs /dev/ublkb7") {
		t.Fatalf("resize with a live device:\n%s", out)
	}

	// A device that cannot grow live.
	why := "ublk: kernel 6.12.0: no UBLK_F_UPDATE_SIZE"
	if err := s.SetDevice(ctx, l, meta.Device{Path: "/dev/ublkb7", Frontend: "ublk", Size: 4 << 30, Grow: meta.GrowReattach, Why: why}); err != nil {
		t.Fatal(err)
	}
	var r resizeResult
	if err := json.Unmarshal([]byte(must(t, "--output", "json", "volume", "resize", "rv", "--size", "5GiB")), &r); err != nil {
		t.Fatal(err)
	}
	if r.Outcome != resizeReattach || r.Size != 5<<30 || r.Device == nil || r.Device.Size != 4<<30 ||
		!strings.Contains(r.Note, why) || !strings.Contains(r.Note, "torusblk detach /dev/ublkb7") || !strings.Contains(r.Note, "torusblk attach rv") {
		t.Fatalf("resize with a device that cannot grow live: %+v", r)
	}

	// An NBD export.
	if err := s.SetDevice(ctx, l, meta.Device{Path: "unix:/run/rv.sock", Frontend: "nbd-export", Size: 6 << 30, Grow: meta.GrowReconnect}); err != nil {
		t.Fatal(err)
	}
	if out := must(t, "volume", "resize", "rv", "--size", "6GiB"); !strings.Contains(out, "new connections") {
		t.Fatalf("resize with an NBD export:\n%s", out)
	}

	// A live device that does not report in time.
	if err := s.SetDevice(ctx, l, meta.Device{Path: "/dev/nbd2", Frontend: "nbd", Size: 6 << 30, Grow: meta.GrowLive}); err != nil {
		t.Fatal(err)
	}
	fails(t, 1, "did not report the new size within 1s", "volume", "resize", "rv", "--size", "7GiB", "--wait", "1s")
}
