package blockdev

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/torus-storage/torus/engine"
	"github.com/torus-storage/torus/meta"
)

// growVolume is an engine.Volume that grows on demand (Growable) and keeps
// the device reports.
type growVolume struct {
	size    atomic.Int64
	resized chan struct{}
	mu      sync.Mutex
	reports []meta.Device
	closed  atomic.Bool
}

func (v *growVolume) Size() int64              { return v.size.Load() }
func (v *growVolume) BlockSize() int           { return engine.BlockSize }
func (v *growVolume) Submit(r *engine.Request) { r.Done.Complete(r, engine.ErrRange) }
func (v *growVolume) Close() error             { v.closed.Store(true); return nil }
func (v *growVolume) Resized() <-chan struct{} { return v.resized }

func (v *growVolume) ReportDevice(_ context.Context, d meta.Device) error {
	v.mu.Lock()
	v.reports = append(v.reports, d)
	v.mu.Unlock()
	return nil
}

func (v *growVolume) last() (meta.Device, int) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if len(v.reports) == 0 {
		return meta.Device{}, 0
	}
	return v.reports[len(v.reports)-1], len(v.reports)
}

// grow makes v size bytes and signals it, as cluster.Attached does.
func (v *growVolume) grow(size int64) {
	v.size.Store(size)
	select {
	case v.resized <- struct{}{}:
	default:
	}
}

// TestServeFollowsGrowth: Serve reports the device, grows it after the
// volume grew (and records the size in the state file), reports a device
// that cannot grow live or whose growth failed as GrowReattach with why,
// and still stops at once when asked.
func TestServeFollowsGrowth(t *testing.T) {
	for _, tc := range []struct {
		name     string
		resize   error // Resizable's answer
		growErr  error
		wantGrow string
		wantSize int64
	}{
		{"live", nil, nil, meta.GrowLive, 3 << 20},
		{"cannot", errors.New("ublk: kernel 6.12: no UBLK_F_UPDATE_SIZE"), nil, meta.GrowReattach, 1 << 20},
		{"fails", nil, errors.New("UPDATE_SIZE: EINVAL"), meta.GrowReattach, 1 << 20},
	} {
		t.Run(tc.name, func(t *testing.T) {
			vol := &growVolume{resized: make(chan struct{}, 1)}
			vol.size.Store(1 << 20)
			stop := make(chan struct{})
			var once sync.Once
			var grown []int64
			d := &Device{
				st:     State{Device: "/dev/ublkb9", Mode: ModeUblk, Size: 1 << 20, PID: 1},
				runDir: t.TempDir(), vol: vol, log: slog.New(slog.DiscardHandler),
				wait:  func() error { <-stop; return nil },
				close: func() error { once.Do(func() { close(stop) }); return nil },
			}
			d.setGrow(tc.resize, func(size int64) error {
				if tc.growErr != nil {
					return tc.growErr
				}
				grown = append(grown, size)
				return nil
			})
			ctx, cancel := context.WithCancel(context.Background())
			served := make(chan error, 1)
			go func() { served <- d.Serve(ctx, func(string) {}) }()
			waitReport := func(n int) meta.Device {
				t.Helper()
				for range 200 {
					if r, got := vol.last(); got >= n {
						return r
					}
					time.Sleep(10 * time.Millisecond)
				}
				t.Fatalf("fewer than %d device reports", n)
				return meta.Device{}
			}
			first := waitReport(1)
			if first.Path != "/dev/ublkb9" || first.Size != 1<<20 || (tc.resize == nil) != (first.Grow == meta.GrowLive) {
				t.Fatalf("first report %+v", first)
			}
			vol.grow(3 << 20)
			r := waitReport(2)
			if r.Grow != tc.wantGrow || int64(r.Size) != tc.wantSize {
				t.Fatalf("report after the growth %+v, want grow %s size %d", r, tc.wantGrow, tc.wantSize)
			}
			if tc.wantGrow == meta.GrowReattach && r.Why == "" {
				t.Fatal("a device that did not grow reports no reason")
			}
			if tc.name == "live" {
				if len(grown) != 1 || grown[0] != 3<<20 {
					t.Fatalf("device grown to %v, want [3 MiB]", grown)
				}
				if st, err := load(d.runDir, "/dev/ublkb9"); err != nil || st.Size != 3<<20 {
					t.Fatalf("state file after the growth: %+v, %v", st, err)
				}
			}
			cancel()
			select {
			case err := <-served:
				if err != nil {
					t.Fatal(err)
				}
			case <-time.After(5 * time.Second):
				t.Fatal("Serve did not return within 5s of its context ending")
			}
			if !vol.closed.Load() {
				t.Fatal("the volume is not closed after Serve")
			}
		})
	}
}
