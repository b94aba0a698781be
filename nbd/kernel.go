package nbd

// Attaching a Volume as /dev/nbdN through the kernel's own NBD client, in
// process.
//
// AttachKernel creates one socketpair per connection, serves one end of each
// with ServeTransmission (the kernel does no handshake) and hands the other
// ends to the kernel: over generic netlink (NBD_CMD_CONNECT, several
// connections, as CAN_MULTI_CONN allows), or, when the kernel has no "nbd"
// netlink family or ForceIoctl is set, over the ioctl interface (one
// connection; NBD_DO_IT blocks a dedicated thread until the disconnect).
//
// Invariants:
//   - The serving goroutines run before the kernel gets the sockets: it may
//     send requests (a partition scan) as soon as it is configured.
//   - The kernel takes its own references to its socket ends; this process
//     closes its copies once NBD_CMD_CONNECT or NBD_SET_SOCK returned.
//   - done is closed only after every ServeTransmission returned (every
//     request the kernel sent was completed and answered, or its socket died)
//     and, on the ioctl path, after NBD_DO_IT returned and the device fd was
//     closed. The Volume is never closed here: the caller owns it.
//   - The NBD_DO_IT thread blocks every signal and stays locked until its
//     goroutine exits, so the thread dies with it: a signal would interrupt
//     the kernel's wait and tear the device down.
//   - Close disconnects at most once.

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/torus-storage/torus/engine"
)

// Ioctls of include/uapi/linux/nbd.h: _IO(0xab, n).
const (
	nbdSetSock       = 0xab00
	nbdSetBlksize    = 0xab01
	nbdDoIt          = 0xab03
	nbdClearSock     = 0xab04
	nbdClearQue      = 0xab05
	nbdSetSizeBlocks = 0xab07
	nbdDisconnect    = 0xab08
	nbdSetTimeout    = 0xab09
	nbdSetFlags      = 0xab0a
)

const (
	defaultKernelConns = 4
	maxKernelConns     = 64
	// kernelSockBuf is the socket buffer size asked for on both ends (the
	// kernel caps it unless we may force it).
	kernelSockBuf = 4 << 20
	// attachTimeout bounds AttachKernel when ctx has no deadline.
	attachTimeout = 30 * time.Second
	// detachTimeout bounds how long Close waits for the kernel to let go of
	// the connections before it stops serving them itself.
	detachTimeout = 20 * time.Second
)

// AttachOptions tune AttachKernel.
type AttachOptions struct {
	// Index is N of /dev/nbdN; -1 picks any free device. (0 is /dev/nbd0.)
	Index int
	// Conns is the number of connections (default 4). The ioctl interface
	// supports only one and uses one whatever Conns says.
	Conns int
	// Timeout is the kernel's per-request timeout, in whole seconds
	// (NBD_ATTR_TIMEOUT, NBD_SET_TIMEOUT). Zero leaves it unset: recent
	// kernels then wait for slow requests instead of failing them.
	Timeout time.Duration
	// ForceIoctl uses the ioctl interface even when netlink is available.
	ForceIoctl bool
	// Logger receives attach and detach events; nil discards them.
	Logger *slog.Logger
}

// KernelStatus is one kernel NBD device as NBD_CMD_STATUS reports it.
type KernelStatus struct {
	// Index is N of /dev/nbdN.
	Index int
	// Connected reports that the device is configured (in use).
	Connected bool
}

// KernelDevice is a Volume attached as /dev/nbdN. Its methods are safe for
// concurrent use.
type KernelDevice struct {
	index   int
	path    string
	netlink bool
	vol     engine.Volume
	log     *slog.Logger
	cancel  context.CancelFunc // stops serving (backstop for Close)
	done    chan struct{}      // closed when the device let go of the volume

	mu  sync.Mutex
	err error // first serving error; guarded by mu, final once done is closed

	sizeMu sync.Mutex // serialises SetSize

	closeOnce sync.Once
	closeErr  error
}

// KernelAvailable reports why kernel NBD cannot be used here, or nil.
func KernelAvailable() error {
	_, modErr := os.Stat("/sys/module/nbd")
	fi, devErr := os.Stat("/dev/nbd0")
	if modErr != nil && (devErr != nil || fi.Mode()&os.ModeDevice == 0) {
		return errors.New("kernel NBD is not available: /dev/nbd0 is missing and the nbd module is not loaded: modprobe nbd")
	}
	if os.Geteuid() != 0 {
		return errors.New("kernel NBD needs root (CAP_SYS_ADMIN): run as root")
	}
	return nil
}

// AttachKernel attaches vol as /dev/nbdN and returns once the device shows
// the volume's size. ctx bounds the attach only; the device stays attached
// until Close, DisconnectKernel (from any process), or a broken connection.
// The caller keeps ownership of vol and closes it after Close or Wait
// returned.
func AttachKernel(ctx context.Context, vol engine.Volume, opt AttachOptions) (*KernelDevice, error) {
	d, err := attachKernel(ctx, vol, opt)
	// Seen about once in ten back-to-back attaches on 6.1 over ioctl: the
	// kernel ends the new connection at once. The retry usually gets the
	// same (least used) device back, so it waits a little longer each time
	// for the kernel to finish with it; twice in a row has been seen.
	for try := 1; try <= 3 && errors.Is(err, errCutEarly) && opt.Index < 0; try++ {
		if opt.Logger != nil {
			opt.Logger.Warn("nbd: the kernel cut the new device before it was usable; attaching again", "err", err, "try", try)
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("nbd: attach: %w (after: %w)", ctx.Err(), err)
		case <-time.After(time.Duration(try*try) * 50 * time.Millisecond):
		}
		d, err = attachKernel(ctx, vol, opt)
	}
	return d, err
}

// errCutEarly is wrapped when the kernel ends a new connection before the
// device shows its size.
var errCutEarly = errors.New("disconnected before it became usable")

func attachKernel(ctx context.Context, vol engine.Volume, opt AttachOptions) (*KernelDevice, error) {
	if err := KernelAvailable(); err != nil {
		return nil, err
	}
	if opt.Index < -1 {
		return nil, fmt.Errorf("nbd: attach: bad device index %d", opt.Index)
	}
	if opt.Conns == 0 {
		opt.Conns = defaultKernelConns
	}
	if opt.Conns < 1 || opt.Conns > maxKernelConns {
		return nil, fmt.Errorf("nbd: attach: %d connections: want 1 to %d", opt.Conns, maxKernelConns)
	}
	if opt.Timeout < 0 {
		return nil, fmt.Errorf("nbd: attach: negative timeout %v", opt.Timeout)
	}
	log := opt.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if vol.Size() <= 0 {
		return nil, fmt.Errorf("nbd: attach: volume size %d", vol.Size())
	}
	srv, err := NewServer([]Export{{Volume: vol, liveSize: true}}, Options{Logger: log})
	if err != nil {
		return nil, fmt.Errorf("nbd: attach: %w", err)
	}
	flags, _ := srv.TransmissionFlags("")

	var g *nbdGenl
	if !opt.ForceIoctl {
		g, err = openNBDGenl()
		switch {
		case errors.Is(err, errNoGenl):
			log.Info("nbd: no nbd netlink family; falling back to the ioctl interface with one connection")
		case err != nil:
			return nil, fmt.Errorf("nbd: attach: %w", err)
		default:
			defer g.close()
		}
	}
	conns := opt.Conns
	if g == nil {
		conns = 1
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, attachTimeout)
		defer cancel()
	}

	serveCtx, cancel := context.WithCancel(context.Background())
	d := &KernelDevice{index: opt.Index, netlink: g != nil, vol: vol, log: log, cancel: cancel, done: make(chan struct{})}
	var wg sync.WaitGroup
	kfds := make([]int, 0, conns)
	closeKernelEnds := func() {
		for _, fd := range kfds {
			unix.Close(fd)
		}
		kfds = nil
	}
	fail := func(err error) (*KernelDevice, error) {
		closeKernelEnds()
		cancel()
		wg.Wait()
		return nil, err
	}
	for range conns {
		nc, kfd, err := kernelSocketPair()
		if err != nil {
			return fail(err)
		}
		kfds = append(kfds, kfd)
		wg.Go(func() {
			if err := srv.ServeTransmission(serveCtx, nc, ""); err != nil {
				d.setErr(err)
			}
		})
	}

	blocks := vol.Size() / blockSize
	var ioctlDone chan struct{}
	if g != nil {
		p := connectParams{
			index: opt.Index, size: uint64(vol.Size()), blockSize: blockSize,
			serverFlags: uint64(flags), timeout: opt.Timeout, fds: kfds,
		}
		connected := false
		if free := freeIoctlDevices(); opt.Index < 0 && len(free) > 0 {
			// Any device: take the least used free one ourselves (the
			// kernel would take the lowest, which may be one whose last
			// connection is still being torn down; see freeIoctlDevices).
			p.index = free[0]
			if d.index, err = g.connect(p); err == nil {
				connected = true
			} else {
				p.index = opt.Index
			}
		}
		if !connected {
			d.index, err = g.connect(p)
		}
		if err != nil {
			return fail(attachError(opt.Index, err))
		}
		closeKernelEnds()
	} else {
		ioctlDone = make(chan struct{})
		d.index, err = startIoctl(opt.Index, kfds[0], blocks, flags, opt.Timeout, d, ioctlDone)
		kfds = nil // startIoctl owns (and closed) it
		if err != nil {
			return fail(attachError(opt.Index, err))
		}
	}
	d.path = fmt.Sprintf("/dev/nbd%d", d.index)
	go func() {
		wg.Wait()
		if ioctlDone != nil {
			<-ioctlDone
		}
		close(d.done)
	}()
	if err := waitSize(ctx, d.index, blocks*blockSize, d.done); err != nil {
		d.Close()
		return nil, fmt.Errorf("nbd: attach: %w", err)
	}
	iface := "netlink"
	if !d.netlink {
		iface = "ioctl"
	}
	log.Info("nbd: attached", "device", d.path, "size", vol.Size(), "conns", conns, "interface", iface)
	return d, nil
}

// attachError explains a failed connect; a busy device gets a hint.
func attachError(index int, err error) error {
	dev := "a free /dev/nbdN"
	if index >= 0 {
		dev = fmt.Sprintf("/dev/nbd%d", index)
	}
	if errors.Is(err, unix.EBUSY) || (index >= 0 && errors.Is(err, unix.EINVAL) && strings.Contains(err.Error(), "SET_SOCK")) {
		return fmt.Errorf("nbd: attach to %s: the device is in use (pick another index, or -1 for any free one): %w", dev, err)
	}
	return fmt.Errorf("nbd: attach to %s: %w", dev, err)
}

// kernelSocketPair returns the served end of a new socketpair as a net.Conn
// and the kernel's end as a raw fd.
func kernelSocketPair() (net.Conn, int, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, -1, fmt.Errorf("nbd: socketpair: %w", err)
	}
	for _, fd := range fds {
		// Best effort: larger buffers let big reads and writes stream.
		if unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, kernelSockBuf) != nil {
			unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUF, kernelSockBuf)
		}
		if unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, kernelSockBuf) != nil {
			unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, kernelSockBuf)
		}
	}
	f := os.NewFile(uintptr(fds[0]), "nbd-server")
	nc, err := net.FileConn(f)
	f.Close()
	if err != nil {
		unix.Close(fds[1])
		return nil, -1, fmt.Errorf("nbd: socketpair conn: %w", err)
	}
	return nc, fds[1], nil
}

// startIoctl configures a device through ioctls with the kernel socket kfd
// (which it closes) and runs NBD_DO_IT on a dedicated thread, closing
// finished when NBD_DO_IT has returned and the device fd is closed. index -1
// tries free devices in order. It returns once the device runs, or the error
// that stopped it.
func startIoctl(index int, kfd int, blocks int64, flags uint16, timeout time.Duration, d *KernelDevice, finished chan struct{}) (int, error) {
	candidates := []int{index}
	if index < 0 {
		candidates = freeIoctlDevices()
		if len(candidates) == 0 {
			unix.Close(kfd)
			return -1, errors.New("no free /dev/nbdN device (all are configured)")
		}
	}
	type result struct {
		index int
		err   error
	}
	setup := make(chan result, 1)
	go func() {
		defer close(finished)
		// Never unlocked: the signal mask below must die with the thread.
		runtime.LockOSThread()
		var all unix.Sigset_t
		for i := range all.Val {
			all.Val[i] = ^all.Val[i]
		}
		if err := unix.PthreadSigmask(unix.SIG_BLOCK, &all, nil); err != nil {
			unix.Close(kfd)
			setup <- result{-1, fmt.Errorf("blocking signals on the NBD_DO_IT thread: %w", err)}
			return
		}
		var fd, idx int
		var err error
		for _, idx = range candidates {
			fd, err = configureIoctl(idx, kfd, blocks, flags, timeout)
			if err == nil || index >= 0 {
				break
			}
			d.log.Debug("nbd: device busy, trying the next", "index", idx, "err", err)
		}
		unix.Close(kfd)
		if err != nil {
			setup <- result{-1, err}
			return
		}
		setup <- result{idx, nil}
		_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), nbdDoIt, 0)
		if errno != 0 {
			d.setErr(fmt.Errorf("nbd: NBD_DO_IT on nbd%d: %w", idx, errno))
		}
		unix.Syscall(unix.SYS_IOCTL, uintptr(fd), nbdClearQue, 0)
		unix.Syscall(unix.SYS_IOCTL, uintptr(fd), nbdClearSock, 0)
		unix.Close(fd)
		d.log.Debug("nbd: NBD_DO_IT returned", "index", idx, "errno", errno)
	}()
	r := <-setup
	return r.index, r.err
}

// configureIoctl opens /dev/nbdN and hands it kfd and the geometry. The
// socket goes first: NBD_SET_SOCK fails on a device another task set up, so a
// busy device is left alone.
func configureIoctl(index, kfd int, blocks int64, flags uint16, timeout time.Duration) (int, error) {
	path := fmt.Sprintf("/dev/nbd%d", index)
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("opening %s: %w", path, err)
	}
	steps := []struct {
		name string
		req  uintptr
		arg  uintptr
	}{
		{"NBD_SET_SOCK", nbdSetSock, uintptr(kfd)},
		{"NBD_SET_BLKSIZE", nbdSetBlksize, blockSize},
		{"NBD_SET_SIZE_BLOCKS", nbdSetSizeBlocks, uintptr(blocks)},
		{"NBD_SET_FLAGS", nbdSetFlags, uintptr(flags)},
		{"NBD_SET_TIMEOUT", nbdSetTimeout, uintptr(seconds(timeout))},
	}
	for i, s := range steps {
		if _, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), s.req, s.arg); errno != 0 {
			if i > 0 {
				unix.Syscall(unix.SYS_IOCTL, uintptr(fd), nbdClearSock, 0)
			}
			unix.Close(fd)
			return -1, fmt.Errorf("%s on %s: %w", s.name, path, errno)
		}
	}
	return fd, nil
}

// freeIoctlDevices lists the indexes of /sys/block/nbdN devices that look
// unconfigured (no pid file, size 0), least used first (completed reads and
// writes in /sys/block/nbdN/stat), then in numeric order. Least used first,
// because the kernel (6.1) can still be tearing down the last connection of
// a device after its size dropped to 0: a new connection on it may then lose
// its capacity or be cut right away (seen as ENOSPC writes, or an attach
// that ends at once, in back-to-back attach tests).
func freeIoctlDevices() []int {
	names, _ := filepath.Glob("/sys/block/nbd*")
	var out []int
	for _, n := range names {
		i, err := strconv.Atoi(strings.TrimPrefix(filepath.Base(n), "nbd"))
		if err != nil {
			continue
		}
		if _, err := os.Stat(filepath.Join(n, "pid")); err == nil {
			continue
		}
		if sz, err := sysfsSize(i); err != nil || sz != 0 {
			continue
		}
		out = append(out, i)
	}
	use := make(map[int]uint64, len(out))
	for _, i := range out {
		use[i] = deviceIOs(i)
	}
	sort.Slice(out, func(a, b int) bool {
		if use[out[a]] != use[out[b]] {
			return use[out[a]] < use[out[b]]
		}
		return out[a] < out[b]
	})
	return out
}

// deviceIOs returns the reads and writes /dev/nbdN completed since boot.
func deviceIOs(index int) uint64 {
	b, err := os.ReadFile(fmt.Sprintf("/sys/block/nbd%d/stat", index))
	if err != nil {
		return 0
	}
	f := strings.Fields(string(b))
	if len(f) < 5 {
		return 0
	}
	r, _ := strconv.ParseUint(f[0], 10, 64)
	w, _ := strconv.ParseUint(f[4], 10, 64)
	return r + w
}

// sysfsSize returns the size in bytes the kernel shows for /dev/nbdN.
func sysfsSize(index int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/sys/block/nbd%d/size", index))
	if err != nil {
		return 0, err
	}
	sectors, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("nbd%d size %q: %w", index, b, err)
	}
	return sectors * 512, nil
}

// waitSize polls until /dev/nbdN exists and shows size bytes on checks at
// least stableFor apart: on 6.1 the device's capacity can still be reset to
// 0 just after it first shows (a write then fails with ENOSPC), so one
// matching look is not enough (30 ms was not either: under qemu TCG the
// reset came later, about one attach in fifteen). (It must not open the device: a close by the
// last opener can end a connection that is being set up.)
func waitSize(ctx context.Context, index int, size int64, done <-chan struct{}) error {
	const stableFor = 200 * time.Millisecond
	path := fmt.Sprintf("/dev/nbd%d", index)
	t := time.NewTicker(5 * time.Millisecond)
	defer t.Stop()
	var since time.Time
	for {
		sz, _ := sysfsSize(index)
		if fi, err := os.Stat(path); sz == size && err == nil && fi.Mode()&os.ModeDevice != 0 {
			if since.IsZero() {
				since = time.Now()
			} else if time.Since(since) >= stableFor {
				return nil
			}
		} else {
			since = time.Time{}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s did not show its size %d (shows %d): %w", path, size, sz, ctx.Err())
		case <-done:
			return fmt.Errorf("%s was %w", path, errCutEarly)
		case <-t.C:
		}
	}
}

func (d *KernelDevice) setErr(err error) {
	d.mu.Lock()
	if d.err == nil {
		d.err = err
	}
	d.mu.Unlock()
}

// Path is the device node, /dev/nbdN.
func (d *KernelDevice) Path() string { return d.path }

// Index is N of /dev/nbdN.
func (d *KernelDevice) Index() int { return d.index }

// ErrNoResize is wrapped by SetSize's and Resizable's error when the
// device cannot change its size while connected: it was attached over the
// ioctl interface (the kernel has no nbd netlink family, or ForceIoctl).
var ErrNoResize = errors.New("a kernel NBD device attached over ioctl cannot be resized while connected (resizing needs the nbd netlink family)")

// Resizable returns nil if SetSize can change the device's size while it
// is connected, else an error wrapping ErrNoResize.
func (d *KernelDevice) Resizable() error {
	if !d.netlink {
		return fmt.Errorf("nbd: %s: %w", d.path, ErrNoResize)
	}
	return nil
}

// SetSize makes the device size bytes long while connected: NBD_CMD_RECONFIGURE
// with NBD_ATTR_SIZE_BYTES, which the kernel applies to the live device
// (nbd_genl_reconfigure sets the size like a connect does), then it checks
// that /sys/block/nbdN/size shows it. The volume must already take requests
// up to size: the connections check each request against its current size.
func (d *KernelDevice) SetSize(size int64) error {
	if err := d.Resizable(); err != nil {
		return err
	}
	if size <= 0 || size%blockSize != 0 || size > d.vol.Size() {
		return fmt.Errorf("nbd: resize %s to %d bytes: not a multiple of %d up to the volume's %d", d.path, size, blockSize, d.vol.Size())
	}
	d.sizeMu.Lock()
	defer d.sizeMu.Unlock()
	g, err := openNBDGenl()
	if err != nil {
		return fmt.Errorf("nbd: resize %s: %w", d.path, err)
	}
	defer g.close()
	if err := g.reconfigureSize(d.index, uint64(size), blockSize); err != nil {
		return fmt.Errorf("nbd: resize %s to %d bytes: %w", d.path, size, err)
	}
	got, err := sysfsSize(d.index)
	if err != nil {
		return fmt.Errorf("nbd: resize %s: %w", d.path, err)
	}
	if got != size {
		return fmt.Errorf("nbd: resize %s to %d bytes: the kernel took NBD_CMD_RECONFIGURE but the device shows %d bytes", d.path, size, got)
	}
	d.log.Info("nbd: device resized", "device", d.path, "size", size)
	return nil
}

// Wait blocks until the device is disconnected (by Close, DisconnectKernel or
// a broken connection) and every request the kernel sent has been answered.
// It returns nil after an orderly disconnect.
func (d *KernelDevice) Wait() error {
	<-d.done
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.err
}

// Close flushes the device's page cache, disconnects it, waits for the
// in-flight requests to drain and for the kernel to free the device (its size
// drops to 0), and returns the first error met, including a serving error
// Wait would return. It does not close the volume. Whoever still has the
// device open (a mounted file system) sees I/O errors from then on.
func (d *KernelDevice) Close() error {
	d.closeOnce.Do(func() { d.closeErr = d.close() })
	return d.closeErr
}

func (d *KernelDevice) close() error {
	var errs []error
	select {
	case <-d.done:
	default:
		// Write back dirty pages of the device node before cutting it off.
		if f, err := os.OpenFile(d.path, os.O_RDWR, 0); err == nil {
			if err := f.Sync(); err != nil {
				errs = append(errs, fmt.Errorf("nbd: flushing %s: %w", d.path, err))
			}
			f.Close()
		}
		if err := disconnect(d.index, d.netlink); err != nil {
			errs = append(errs, err)
		}
	}
	select {
	case <-d.done:
	case <-time.After(detachTimeout):
		d.log.Warn("nbd: the kernel did not release the connections; closing them", "device", d.path)
		d.cancel()
		<-d.done
	}
	d.cancel()
	// The kernel frees the device's configuration when its last user lets
	// go; the size drops to 0 then.
	deadline := time.Now().Add(5 * time.Second)
	for {
		sz, err := sysfsSize(d.index)
		if err != nil || sz == 0 {
			break
		}
		if time.Now().After(deadline) {
			d.log.Warn("nbd: device still shows a size after detach (is it open or mounted?)", "device", d.path, "size", sz)
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	if err := d.Wait(); err != nil {
		errs = append(errs, err)
	}
	d.log.Info("nbd: detached", "device", d.path)
	return errors.Join(errs...)
}

// DisconnectKernel disconnects /dev/nbdN, whichever process serves it: over
// netlink when the kernel has it (a device that is not connected is left
// alone without error), otherwise with NBD_DISCONNECT and, if the server has
// not let go within a few seconds, NBD_CLEAR_SOCK.
func DisconnectKernel(index int) error {
	if err := KernelAvailable(); err != nil {
		return err
	}
	g, err := openNBDGenl()
	if err == nil {
		defer g.close()
		return g.disconnect(index)
	}
	if !errors.Is(err, errNoGenl) {
		return err
	}
	return disconnectIoctl(index, ioctlClearGrace)
}

// ioctlClearGrace is how long DisconnectKernel lets the server of an
// ioctl-configured device drain before it cuts the sockets.
const ioctlClearGrace = 5 * time.Second

// disconnect sends the disconnect through the interface that set the device
// up. On the ioctl path it only asks (NBD_DISCONNECT): the NBD_DO_IT thread
// clears the socket once the connection drained.
func disconnect(index int, netlink bool) error {
	if netlink {
		g, err := openNBDGenl()
		if err != nil {
			return fmt.Errorf("nbd: detach: %w", err)
		}
		defer g.close()
		return g.disconnect(index)
	}
	return disconnectIoctl(index, 0)
}

// disconnectIoctl sends NBD_DISCONNECT to /dev/nbdN. With grace > 0 it then
// waits up to grace for the device to be released (its pid file goes away
// once the server drained and every opener closed it) and issues
// NBD_CLEAR_SOCK if it was not.
func disconnectIoctl(index int, grace time.Duration) error {
	path := fmt.Sprintf("/dev/nbd%d", index)
	ioctl := func(req uintptr, name string) error {
		fd, err := unix.Open(path, unix.O_RDWR|unix.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("nbd: detach: opening %s: %w", path, err)
		}
		// Closed before waiting: an open descriptor keeps the device configured.
		defer unix.Close(fd)
		if _, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, 0); errno != 0 {
			return fmt.Errorf("nbd: %s on %s: %w", name, path, errno)
		}
		return nil
	}
	if err := ioctl(nbdDisconnect, "NBD_DISCONNECT"); err != nil || grace <= 0 {
		return err
	}
	pid := fmt.Sprintf("/sys/block/nbd%d/pid", index)
	for deadline := time.Now().Add(grace); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if _, err := os.Stat(pid); err != nil {
			return nil
		}
	}
	return ioctl(nbdClearSock, "NBD_CLEAR_SOCK")
}

// ListKernel lists the kernel's NBD devices and whether each is connected,
// through NBD_CMD_STATUS (or /sys/block when the kernel lacks netlink).
func ListKernel() ([]KernelStatus, error) {
	if err := KernelAvailable(); err != nil {
		return nil, err
	}
	g, err := openNBDGenl()
	if err == nil {
		defer g.close()
		st, err := g.status(-1)
		sort.Slice(st, func(i, j int) bool { return st[i].Index < st[j].Index })
		return st, err
	}
	if !errors.Is(err, errNoGenl) {
		return nil, err
	}
	names, _ := filepath.Glob("/sys/block/nbd*")
	var out []KernelStatus
	for _, n := range names {
		i, err := strconv.Atoi(strings.TrimPrefix(filepath.Base(n), "nbd"))
		if err != nil {
			continue
		}
		_, perr := os.Stat(filepath.Join(n, "pid"))
		out = append(out, KernelStatus{Index: i, Connected: perr == nil})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Index < out[j].Index })
	return out, nil
}
