// Package ublk serves an engine.Volume as a Linux block device through
// ublk_drv (userspace block driver, Linux 6.0+ with CONFIG_BLK_DEV_UBLK).
//
// Create adds /dev/ublkbN and serves it until Close; Recover re-attaches a
// new server process to a device whose previous server died (devices created
// with Options.Recovery). The data path runs on one OS-thread-locked
// goroutine per hardware queue with its own io_uring, and allocates nothing
// per I/O. Over an store.Local the queue threads also run the store's
// shards on their rings (store.ShardDriver), so an I/O stays on one thread.
//
// Lifecycle:
//
//	dev, err := ublk.Create(ctx, vol, ublk.Options{})
//	// dev.Path() is /dev/ublkbN and serves I/O now.
//	err = dev.Close() // STOP_DEV, queues drain, DEL_DEV; vol stays open
//
// Close never closes the Volume; the caller does, after Close.
//
// Invariants:
//   - A Device is created (ADD_DEV) before its queues start and deleted
//     (DEL_DEV) only after every queue goroutine has exited and /dev/ublkcN
//     is closed; a failed Create deletes what it added.
//   - START_DEV and END_USER_RECOVERY are sent only after every queue has
//     submitted FETCH_REQ for all of its tags (the kernel waits for that).
package ublk

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"runtime"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/torus-storage/torus/engine"
)

// Options configure Create and Recover. The zero value is usable.
type Options struct {
	// Queues is the number of hardware queues, each served by its own
	// locked OS thread (the kernel caps it at the CPU count). Ignored by
	// Recover, which uses the device's. The default is runtime.NumCPU(),
	// except for a volume whose store shards the queues can run themselves
	// (store.Local): then 1, and that queue thread runs every shard, so
	// that an I/O never crosses threads (measured best on 2 CPUs, where
	// the other CPU is left to the application).
	//
	// With such a volume, queue i runs the shards j with j%Queues == i
	// (shard i alone if there are more queues than shards) on its own
	// ring; a request for a chunk of another queue's shard is handed over
	// to that thread and back.
	Queues int
	// Depth is the number of tags (requests in flight) per queue (default
	// 128, at most 4096). Ignored by Recover.
	Depth int
	// MaxIO is the largest request in bytes (default 512 KiB; a multiple of
	// 4096). Every tag owns a buffer of this size. Ignored by Recover.
	MaxIO int
	// Recovery creates the device with UBLK_F_USER_RECOVERY (and _REISSUE:
	// writes to a block store are idempotent) when the kernel offers it:
	// if the server dies, the device stays and queues I/O until Recover
	// attaches a new server. Without it the device fails when the server
	// dies.
	Recovery bool
	// Logger receives warnings (default slog.Default()).
	Logger *slog.Logger
}

const (
	defaultDepth = 128
	defaultMaxIO = 512 << 10
	// maxDiscard bounds one discard/write-zeroes request: the volume splits
	// it into chunk parts and Submit waits for free parts on the queue
	// thread, so very large ones would stall the queue.
	maxDiscard = 64 << 20
)

func (o *Options) fill(vol engine.Volume) error {
	if o.Queues <= 0 {
		o.Queues = runtime.NumCPU()
		if _, ok := vol.(driveable); ok {
			o.Queues = 1
		}
	}
	if o.Depth <= 0 {
		o.Depth = defaultDepth
	}
	if o.MaxIO <= 0 {
		o.MaxIO = defaultMaxIO
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	switch {
	case o.Queues > 4096:
		return fmt.Errorf("ublk: %d queues, at most 4096", o.Queues)
	case o.Depth > maxQueueDepth:
		return fmt.Errorf("ublk: depth %d, at most %d", o.Depth, maxQueueDepth)
	case o.MaxIO%4096 != 0 || o.MaxIO > 32<<20:
		return fmt.Errorf("ublk: MaxIO %d is not a multiple of 4096 up to 32 MiB", o.MaxIO)
	}
	return nil
}

// Device is one ublk block device served by this process.
type Device struct {
	id     uint32
	info   devInfo
	ctrl   *ctrl
	cfd    int
	queues []*queue
	vol    engine.Volume
	log    *slog.Logger
	feats  uint64 // GET_FEATURES (0 before 6.5)

	sizeMu    sync.Mutex    // serialises SetSize
	done      chan struct{} // closed when every queue goroutine has exited
	waitErr   error         // first queue error, set before done closes
	closeOnce sync.Once
	closeErr  error
}

// Available reports whether ublk can be used here: nil when
// /dev/ublk-control opens, else an error saying what is missing.
func Available() error {
	fd, err := unix.Open(ControlPath, unix.O_RDWR|unix.O_CLOEXEC, 0)
	switch {
	case err == nil:
		unix.Close(fd)
		return nil
	case errors.Is(err, unix.ENOENT):
		return fmt.Errorf("ublk is not available: %s missing (modprobe ublk_drv; needs Linux 6.0+ with CONFIG_BLK_DEV_UBLK): %w", ControlPath, err)
	case errors.Is(err, unix.EACCES) || errors.Is(err, unix.EPERM):
		return fmt.Errorf("ublk is not available: opening %s: %w (needs root)", ControlPath, err)
	}
	return fmt.Errorf("ublk is not available: opening %s: %w", ControlPath, err)
}

// Features returns the UBLK_F_* flags (the Feature* constants) the kernel
// supports (GET_FEATURES, Linux 6.5+).
func Features() (uint64, error) {
	c, err := openCtrl()
	if err != nil {
		return 0, err
	}
	defer c.close()
	return c.getFeatures()
}

// Create adds a ublk device serving vol and returns once /dev/ublkbN exists
// and serves I/O. vol.BlockSize() becomes the logical and physical block
// size. ctx bounds the setup only.
func Create(ctx context.Context, vol engine.Volume, opt Options) (*Device, error) {
	if err := opt.fill(vol); err != nil {
		return nil, err
	}
	bs := vol.BlockSize()
	if bs < 512 || bs > 4096 || bs&(bs-1) != 0 || vol.Size()%int64(bs) != 0 {
		return nil, fmt.Errorf("ublk: volume block size %d / size %d not servable", bs, vol.Size())
	}
	c, err := openCtrl()
	if err != nil {
		return nil, err
	}
	feats, ferr := c.getFeatures()
	if ferr != nil {
		// Before 6.5: no GET_FEATURES; ask and let ADD_DEV mask what is unknown.
		feats = FeatureCmdIoctlEncode | FeatureUserRecovery | FeatureUserRecoveryReissue
	}
	var flags uint64
	if feats&FeatureCmdIoctlEncode != 0 {
		flags |= FeatureCmdIoctlEncode
	}
	if feats&FeatureUpdateSize != 0 {
		flags |= FeatureUpdateSize
	}
	if opt.Recovery {
		if feats&FeatureUserRecovery == 0 {
			c.close()
			return nil, fmt.Errorf("ublk: Recovery requested but the kernel does not offer UBLK_F_USER_RECOVERY (features %#x)", feats)
		}
		flags |= FeatureUserRecovery
		if feats&FeatureUserRecoveryReissue != 0 {
			flags |= FeatureUserRecoveryReissue
		}
	}
	in := devInfo{
		nrHWQueues:    uint16(opt.Queues),
		queueDepth:    uint16(opt.Depth),
		maxIOBufBytes: uint32(opt.MaxIO),
		devID:         ^uint32(0),
		ublksrvPID:    int32(os.Getpid()),
		flags:         flags,
	}
	info, err := c.addDev(in)
	if err != nil {
		c.close()
		return nil, err
	}
	if ferr != nil {
		feats = 0 // a guess, not what the kernel said
	}
	d := &Device{id: info.devID, info: info, ctrl: c, cfd: -1, vol: vol, log: opt.Logger, feats: feats, done: make(chan struct{})}
	if opt.Recovery && info.flags&FeatureUserRecovery == 0 {
		d.abort()
		return nil, fmt.Errorf("ublk: kernel refused UBLK_F_USER_RECOVERY (granted flags %#x)", info.flags)
	}
	maxIO := int(info.maxIOBufBytes) &^ 4095
	shift := func(n int) uint8 {
		s := uint8(0)
		for 1<<(s+1) <= n {
			s++
		}
		return s
	}
	discard := uint32(min(int64(maxDiscard), vol.Size()) >> 9)
	p := params{
		types: paramTypeBasic | paramTypeDiscard,
		basic: paramBasic{
			attrs:           attrVolatileCache | attrFUA,
			logicalBSShift:  shift(bs),
			physicalBSShift: shift(bs),
			ioOptShift:      shift(maxIO),
			ioMinShift:      shift(bs),
			maxSectors:      uint32(maxIO >> 9),
			devSectors:      uint64(vol.Size()) >> 9,
		},
		discard: paramDiscard{
			discardGranularity:    uint32(bs),
			maxDiscardSectors:     discard,
			maxWriteZeroesSectors: discard,
			maxDiscardSegments:    1,
		},
	}
	if err := c.setParams(d.id, p); err != nil {
		d.abort()
		return nil, err
	}
	if err := d.attach(ctx); err != nil {
		d.abort()
		return nil, err
	}
	if err := c.startDev(d.id); err != nil {
		d.abort()
		return nil, err
	}
	if err := waitPath(ctx, d.Path()); err != nil {
		d.Close()
		return nil, err
	}
	d.log.Info("ublk: device started", "dev", d.Path(), "queues", info.nrHWQueues, "depth", info.queueDepth,
		"max_io", maxIO, "flags", fmt.Sprintf("%#x", info.flags))
	return d, nil
}

// Recover attaches this process as the new server of device devID, whose
// previous server died (created with Options.Recovery): START_USER_RECOVERY
// (retried while the kernel still sees the old server), then the queues
// FETCH every tag and END_USER_RECOVERY resumes the queued I/O. vol must be
// the same volume (its size is checked). Queues, Depth and MaxIO of opt are
// ignored: the device's are used.
func Recover(ctx context.Context, devID int, vol engine.Volume, opt Options) (*Device, error) {
	if err := opt.fill(vol); err != nil {
		return nil, err
	}
	c, err := openCtrl()
	if err != nil {
		return nil, err
	}
	id := uint32(devID)
	info, err := c.getDevInfo(id)
	if err != nil {
		c.close()
		return nil, err
	}
	if info.flags&FeatureUserRecovery == 0 {
		c.close()
		return nil, fmt.Errorf("ublk: device %d was not created with recovery (flags %#x)", devID, info.flags)
	}
	// The volume may have grown since the device was made (SetSize grows
	// the device after the recovery, where the kernel can); it never shrinks.
	devSectors := uint64(0)
	if p, err := c.getParams(id); err == nil {
		devSectors = p.basic.devSectors
		if devSectors > uint64(vol.Size())>>9 {
			c.close()
			return nil, fmt.Errorf("ublk: device %d has %d sectors, more than the volume's %d bytes", devID, devSectors, vol.Size())
		}
	}
	feats, _ := c.getFeatures()
	deadline := time.Now().Add(30 * time.Second)
	for {
		err = c.startUserRecovery(id)
		if err == nil {
			break
		}
		if !errors.Is(err, unix.EBUSY) || time.Now().After(deadline) {
			c.close()
			return nil, err
		}
		if err := sleepCtx(ctx, 50*time.Millisecond); err != nil {
			c.close()
			return nil, fmt.Errorf("ublk: recover device %d: %w", devID, err)
		}
	}
	d := &Device{id: id, info: info, ctrl: c, cfd: -1, vol: vol, log: opt.Logger, feats: feats, done: make(chan struct{})}
	if err := d.attach(ctx); err != nil {
		d.detach()
		c.close()
		return nil, err
	}
	if err := c.endUserRecovery(id); err != nil {
		d.detach()
		c.close()
		return nil, err
	}
	d.log.Info("ublk: device recovered", "dev", d.Path(), "queues", info.nrHWQueues, "depth", info.queueDepth)
	if devSectors != 0 && devSectors < uint64(vol.Size())>>9 {
		if err := d.SetSize(vol.Size()); err != nil {
			d.log.Warn("ublk: the volume grew while the device was being recovered; the device keeps its old size", "dev", d.Path(), "err", err)
		}
	}
	return d, nil
}

// attach opens /dev/ublkcN and starts the queues; each has FETCHed all of
// its tags when attach returns nil.
func (d *Device) attach(ctx context.Context) error {
	cpath := fmt.Sprintf("/dev/ublkc%d", d.id)
	deadline := time.Now().Add(10 * time.Second)
	for {
		fd, err := unix.Open(cpath, unix.O_RDWR|unix.O_CLOEXEC, 0)
		if err == nil {
			d.cfd = fd
			break
		}
		if !(errors.Is(err, unix.ENOENT) || errors.Is(err, unix.EBUSY)) || time.Now().After(deadline) {
			return fmt.Errorf("ublk: open %s: %w", cpath, err)
		}
		if err := sleepCtx(ctx, 20*time.Millisecond); err != nil {
			return fmt.Errorf("ublk: open %s: %w", cpath, err)
		}
	}
	nq, depth, maxIO := int(d.info.nrHWQueues), int(d.info.queueDepth), int(d.info.maxIOBufBytes)&^4095
	legacy := d.info.flags&FeatureCmdIoctlEncode == 0
	ready := make(chan error, nq)
	for i := 0; i < nq; i++ {
		q := newQueue(i, depth, maxIO, d.cfd, legacy, d.vol, driveIDs(d.vol, i, nq), d.log)
		d.queues = append(d.queues, q)
		go q.run(ready)
	}
	var errs []error
	for i := 0; i < nq; i++ {
		if err := <-ready; err != nil {
			errs = append(errs, err)
		}
	}
	go d.watch()
	return errors.Join(errs...)
}

// driveIDs returns the store shards queue i of nq runs itself, or nil.
func driveIDs(vol engine.Volume, i, nq int) []int {
	dv, ok := vol.(driveable)
	if !ok {
		return nil
	}
	ns := dv.Shards()
	if nq > ns {
		if i < ns {
			return []int{i}
		}
		return nil
	}
	var ids []int
	for j := i; j < ns; j += nq {
		ids = append(ids, j)
	}
	return ids
}

// watch closes d.done when every queue goroutine has exited.
func (d *Device) watch() {
	var errs []error
	for _, q := range d.queues {
		<-q.exited
		if q.err != nil {
			errs = append(errs, q.err)
		}
	}
	d.waitErr = errors.Join(errs...)
	close(d.done)
}

// detach makes the queues quit, waits for them and closes /dev/ublkcN.
func (d *Device) detach() error {
	for _, q := range d.queues {
		q.requestQuit()
	}
	if len(d.queues) > 0 {
		<-d.done
	}
	if d.cfd >= 0 {
		unix.Close(d.cfd)
		d.cfd = -1
	}
	return nil
}

// abort undoes a Create that failed before START_DEV.
func (d *Device) abort() {
	d.detach()
	if err := d.ctrl.delDev(d.id); err != nil {
		d.log.Warn("ublk: deleting the half-created device failed", "dev", d.id, "err", err)
	}
	d.ctrl.close()
}

// ID returns the device number N of /dev/ublkbN.
func (d *Device) ID() int { return int(d.id) }

// Path returns the block device path, /dev/ublkbN.
func (d *Device) Path() string { return fmt.Sprintf("/dev/ublkb%d", d.id) }

// CharPath returns the control character device path, /dev/ublkcN.
func (d *Device) CharPath() string { return fmt.Sprintf("/dev/ublkc%d", d.id) }

// Flags returns the UBLK_F_* flags the device runs with.
func (d *Device) Flags() uint64 { return d.info.flags }

// ErrNoResize is wrapped by SetSize's and Resizable's error when the kernel
// cannot change the size of a live ublk device: it lacks
// UBLK_F_UPDATE_SIZE (Linux 6.16 and later have it).
var ErrNoResize = errors.New("the kernel's ublk driver cannot resize a live device (no UBLK_F_UPDATE_SIZE; Linux 6.16 and later have it)")

// Resizable returns nil if SetSize can change the device's size while it
// serves I/O, else an error wrapping ErrNoResize that names the kernel.
func (d *Device) Resizable() error {
	if (d.feats|d.info.flags)&FeatureUpdateSize != 0 {
		return nil
	}
	var u unix.Utsname
	rel := "this kernel"
	if unix.Uname(&u) == nil {
		rel = "kernel " + unix.ByteSliceToString(u.Release[:])
	}
	return fmt.Errorf("ublk: %s (features %#x): %w", rel, d.feats, ErrNoResize)
}

// SetSize makes the device size bytes long while it serves I/O
// (UBLK_U_CMD_UPDATE_SIZE): the block layer, and the file systems on the
// device, see the new capacity when it returns. The volume must already
// take requests up to size. It fails with ErrNoResize where the kernel
// cannot (Resizable).
func (d *Device) SetSize(size int64) error {
	if err := d.Resizable(); err != nil {
		return err
	}
	if size <= 0 || size%512 != 0 || size > d.vol.Size() {
		return fmt.Errorf("ublk: resize %s to %d bytes: not a multiple of 512 up to the volume's %d", d.Path(), size, d.vol.Size())
	}
	d.sizeMu.Lock()
	defer d.sizeMu.Unlock()
	if err := d.ctrl.updateSize(d.id, uint64(size)>>9); err != nil {
		return fmt.Errorf("ublk: resize %s to %d bytes: %w", d.Path(), size, err)
	}
	d.log.Info("ublk: device resized", "dev", d.Path(), "size", size)
	return nil
}

// Wait blocks until the device is stopped (by Close or by someone else, such
// as `ublk del`) and every queue has drained. It returns the first queue
// error, or nil. Call Close afterwards to delete the device.
func (d *Device) Wait() error {
	<-d.done
	return d.waitErr
}

// Close stops the device (STOP_DEV), lets the queues drain, and deletes it
// (DEL_DEV); afterwards neither /dev/ublkbN nor /dev/ublkcN exists. DEL_DEV
// waits while /dev/ublkbN is still open or mounted. Close does not close the
// Volume. It is safe to call more than once and from any goroutine.
func (d *Device) Close() error {
	d.closeOnce.Do(func() { d.closeErr = d.close() })
	return d.closeErr
}

func (d *Device) close() error {
	var errs []error
	select {
	case <-d.done:
	default:
		if err := d.ctrl.stopDev(d.id); err != nil && !errors.Is(err, unix.ENODEV) {
			errs = append(errs, err)
		}
	}
	// STOP_DEV aborts every fetched tag: the queues drain and exit. A queue
	// still waiting after that (a kernel that does not abort a commit racing
	// the stop) is told to quit: closing its ring cancels the rest.
	select {
	case <-d.done:
	case <-time.After(5 * time.Second):
		d.log.Warn("ublk: queues still busy after STOP_DEV; forcing them out", "dev", d.Path())
	}
	d.detach()
	if d.waitErr != nil {
		errs = append(errs, d.waitErr)
	}
	if err := d.ctrl.delDev(d.id); err != nil {
		errs = append(errs, err)
	}
	errs = append(errs, d.ctrl.close())
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("ublk: close %s: %w", d.Path(), err)
	}
	return nil
}

func waitPath(ctx context.Context, path string) error {
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := os.Stat(path); err == nil {
			return nil
		} else if time.Now().After(deadline) {
			return fmt.Errorf("ublk: %s did not appear: %w", path, err)
		}
		if err := sleepCtx(ctx, 10*time.Millisecond); err != nil {
			return fmt.Errorf("ublk: waiting for %s: %w", path, err)
		}
	}
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// Delete stops and removes ublk device id whose server is gone (for example
// one left quiesced for recovery after its server was killed). It waits, as
// the kernel does, while /dev/ublkbN is still open or mounted.
func Delete(id int) error {
	return deleteDev(id, true)
}

// Stop stops device id whose server died and will not be recovered: the
// kernel fails its queued and future I/O, so that a filesystem on it can
// be unmounted, and removes /dev/ublkbN; Delete removes the device once
// nothing holds it open.
func Stop(id int) error {
	return deleteDev(id, false)
}

func deleteDev(id int, del bool) error {
	if id < 0 {
		return fmt.Errorf("ublk: bad device id %d", id)
	}
	c, err := openCtrl()
	if err != nil {
		return err
	}
	defer c.close()
	// STOP_DEV fails on a device that is already stopped; DEL_DEV is what
	// must succeed.
	serr := c.stopDev(uint32(id))
	if !del {
		if serr != nil {
			return fmt.Errorf("ublk: stopping device %d: %w", id, serr)
		}
		return nil
	}
	if err := c.delDev(uint32(id)); err != nil {
		return fmt.Errorf("ublk: deleting device %d: %w", id, err)
	}
	return nil
}
