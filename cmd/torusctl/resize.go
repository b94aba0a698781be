package main

// What a volume resize did to the device that serves the volume: the
// holder of the attach lock grows its volume when the record in etcd grows
// and reports its device (meta.Device); torusctl waits for that report and
// says what happened and, where the device cannot grow while attached, what
// to do.

import (
	"context"
	"fmt"
	"time"

	"github.com/torus-storage/torus/internal/units"
	"github.com/torus-storage/torus/meta"
)

// Outcomes of a resize for the attached device (resizeResult.Outcome).
const (
	resizeDetached  = "not-attached" // the next attach gets the new size
	resizeGrown     = "device-grown" // the device shows the new size
	resizeReconnect = "reconnect"    // an NBD export: new connections get it
	resizeReattach  = "reattach"     // the device keeps its size until re-attached
	resizeUnknown   = "unknown"      // held by a process that reports no device
	resizeTimedOut  = "timed-out"    // the device did not report in time
)

// resizeResult is the outcome of volume resize (its --output json form).
type resizeResult struct {
	meta.Volume
	// Outcome is one of the resize* constants.
	Outcome string `json:"outcome"`
	// Device is the device as last reported, if any.
	Device *meta.Device `json:"device,omitempty"`
	// Note says what happened and what to do, in words.
	Note string `json:"note"`
}

// resizeOutcome waits up to wait for the holder of v (already resized in
// etcd) to report its device with the new size, or that it cannot grow.
func resizeOutcome(ctx context.Context, s *meta.Client, v meta.Volume, wait time.Duration) (resizeResult, error) {
	r := resizeResult{Volume: v}
	size := units.FormatSize(int64(v.Size))
	holder, host, maint, held, err := s.AttachHolder(ctx, v)
	if err != nil {
		return r, err
	}
	if !held || maint {
		r.Outcome = resizeDetached
		r.Note = "it is not attached: the next attach gets the new size"
		return r, nil
	}
	wctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	var last *meta.Device
watch:
	for u := range s.WatchVolumeDevice(wctx, v) {
		if !u.OK {
			continue
		}
		d := u.Device
		last = &d
		switch {
		case d.Grow == meta.GrowReattach:
			r.Outcome = resizeReattach
		case d.Size >= v.Size && d.Grow == meta.GrowLive:
			r.Outcome = resizeGrown
		case d.Size >= v.Size && d.Grow == meta.GrowReconnect:
			r.Outcome = resizeReconnect
		default:
			continue
		}
		break watch
	}
	r.Device = last
	if r.Outcome == "" {
		if last == nil {
			r.Outcome = resizeUnknown
			r.Note = fmt.Sprintf("it is attached by %q on %s, which reports no device: its volume grows, its device may not (re-attach it to be sure)", holder, host)
			return r, nil
		}
		r.Outcome = resizeTimedOut
	}
	d := last
	what := fmt.Sprintf("device %s on %s (%s)", d.Path, d.Host, d.Frontend)
	switch r.Outcome {
	case resizeGrown:
		r.Note = fmt.Sprintf("%s grew to %s: now grow the file system on it (resize2fs %s works while mounted; xfs_growfs takes the mount point)", what, size, d.Path)
	case resizeReconnect:
		r.Note = fmt.Sprintf("NBD export %s on %s gives %s to new connections; connected clients keep the size they were given until they reconnect", d.Path, d.Host, size)
	case resizeReattach:
		r.Note = fmt.Sprintf("%s keeps %s while attached: it cannot grow live: %s\n"+
			"to use the new size: stop its users (umount), run `torusblk detach %s` on %s, then `torusblk attach %s ...` again, and grow the file system",
			what, units.FormatSize(int64(d.Size)), d.Why, d.Path, d.Host, v.Name)
	case resizeTimedOut:
		r.Note = fmt.Sprintf("%s still shows %s", what, units.FormatSize(int64(d.Size)))
	}
	return r, nil
}
