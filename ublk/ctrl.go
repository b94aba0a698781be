package ublk

// The control path: commands to /dev/ublk-control as URING_CMDs on a
// dedicated SQE128 ring.
//
// Invariants:
//   - One goroutine (ctrl.serve) owns the ring and runs one command at a
//     time; callers hand it requests over a channel and wait for the reply.
//     Control commands may block in the kernel for long (START_DEV waits for
//     every queue, DEL_DEV for the last opener), so they never run on a queue
//     thread.
//   - Command payloads (dev_info, params, features) live in c.page, memory
//     outside the Go heap, so the kernel may read and write them while the
//     command is in flight. Only the serving goroutine touches c.page between
//     a request and its reply; the channel hand-off orders the accesses.
//   - c.legacy is decided once, by the first command the kernel refuses in
//     the ioctl encoding and accepts in the legacy one.

import (
	"errors"
	"fmt"
	"os"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/torus-storage/torus/internal/alignbuf"
	"github.com/torus-storage/torus/iouring"
)

// ControlPath is the ublk control device.
const ControlPath = "/dev/ublk-control"

type ctrlReq struct {
	nr      uint32
	devID   uint32
	data    uint64
	bufLen  uint16 // bytes of c.page passed as addr/len; 0 for none
	reply   chan ctrlReply
	payload func(page []byte) // fills c.page before the command (serve goroutine)
	result  func(page []byte) // reads c.page after the command (serve goroutine)
}

type ctrlReply struct {
	res int32
	err error
}

type ctrl struct {
	fd     int
	uring  *iouring.Uring
	page   []byte
	legacy bool
	reqs   chan ctrlReq
	done   chan struct{}
}

// openCtrl opens /dev/ublk-control and starts the control goroutine.
func openCtrl() (*ctrl, error) {
	if err := Available(); err != nil {
		return nil, err
	}
	fd, err := unix.Open(ControlPath, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("ublk: open %s: %w", ControlPath, err)
	}
	uring, err := iouring.New(4, iouring.SetupSQE128)
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("ublk: control ring: %w", err)
	}
	page, err := alignbuf.Alloc(alignbuf.PageSize)
	if err != nil {
		uring.Close()
		unix.Close(fd)
		return nil, err
	}
	c := &ctrl{fd: fd, uring: uring, page: page, reqs: make(chan ctrlReq), done: make(chan struct{})}
	go c.serve()
	return c, nil
}

// close stops the control goroutine and releases the ring and the fd.
func (c *ctrl) close() error {
	close(c.reqs)
	<-c.done
	return errors.Join(c.uring.Close(), unix.Close(c.fd), alignbuf.Free(c.page))
}

func (c *ctrl) serve() {
	defer close(c.done)
	for r := range c.reqs {
		clear(c.page)
		if r.payload != nil {
			r.payload(c.page)
		}
		res, err := c.issue(r)
		if err == nil && res == -int32(unix.EOPNOTSUPP) && !c.legacy && r.nr != cmdGetFeatures && r.nr != cmdUpdateSize {
			// Kernels built without legacy opcodes refuse nothing here; kernels
			// without the ioctl encoding (before 6.4) refuse it: use the
			// legacy numbers from now on.
			c.legacy = true
			if r.payload != nil {
				clear(c.page)
				r.payload(c.page)
			}
			res, err = c.issue(r)
			if err == nil && res < 0 {
				c.legacy = false
			}
		}
		if err == nil && res >= 0 && r.result != nil {
			r.result(c.page)
		}
		r.reply <- ctrlReply{res: res, err: err}
	}
}

func (c *ctrl) issue(r ctrlReq) (int32, error) {
	sqe := c.uring.SQE()
	if sqe == nil {
		return 0, errors.New("ublk: control ring full")
	}
	sqe.PrepURingCmd(int32(c.fd), ctrlOp(r.nr, c.legacy))
	cmd := (*ctrlCmd)(unsafe.Pointer(sqe.Cmd()))
	cmd.devID = r.devID
	cmd.queueID = 0xffff
	cmd.data = r.data
	if r.bufLen > 0 {
		cmd.addr = uint64(uintptr(unsafe.Pointer(&c.page[0])))
		cmd.len = r.bufLen
	}
	sqe.UserData = uint64(r.nr)
	var cqe [1]iouring.CQE
	for {
		n, err := c.uring.WaitCQEs(cqe[:], 1)
		if n == 1 {
			return cqe[0].Res, nil
		}
		if err != nil {
			return 0, fmt.Errorf("ublk: control command %#x: %w", r.nr, err)
		}
	}
}

// do runs one control command and returns its non-negative result or an
// error wrapping the errno.
func (c *ctrl) do(name string, r ctrlReq) (int32, error) {
	r.reply = make(chan ctrlReply, 1)
	c.reqs <- r
	rep := <-r.reply
	if rep.err != nil {
		return 0, rep.err
	}
	if rep.res < 0 {
		return rep.res, fmt.Errorf("ublk: %s (dev %d): %w", name, int32(r.devID), unix.Errno(-rep.res))
	}
	return rep.res, nil
}

func (c *ctrl) getFeatures() (uint64, error) {
	var f uint64
	_, err := c.do("GET_FEATURES", ctrlReq{nr: cmdGetFeatures, devID: ^uint32(0), bufLen: 8,
		result: func(p []byte) { f = *(*uint64)(unsafe.Pointer(&p[0])) }})
	return f, err
}

func (c *ctrl) addDev(in devInfo) (devInfo, error) {
	var out devInfo
	_, err := c.do("ADD_DEV", ctrlReq{nr: cmdAddDev, devID: in.devID, bufLen: uint16(unsafe.Sizeof(in)),
		payload: func(p []byte) { *(*devInfo)(unsafe.Pointer(&p[0])) = in },
		result:  func(p []byte) { out = *(*devInfo)(unsafe.Pointer(&p[0])) }})
	return out, err
}

func (c *ctrl) getDevInfo(id uint32) (devInfo, error) {
	var out devInfo
	_, err := c.do("GET_DEV_INFO", ctrlReq{nr: cmdGetDevInfo, devID: id, bufLen: uint16(unsafe.Sizeof(out)),
		result: func(p []byte) { out = *(*devInfo)(unsafe.Pointer(&p[0])) }})
	return out, err
}

func (c *ctrl) setParams(id uint32, in params) error {
	in.len = paramsLen
	_, err := c.do("SET_PARAMS", ctrlReq{nr: cmdSetParams, devID: id, bufLen: uint16(paramsLen),
		payload: func(p []byte) { *(*params)(unsafe.Pointer(&p[0])) = in }})
	return err
}

func (c *ctrl) getParams(id uint32) (params, error) {
	var out params
	_, err := c.do("GET_PARAMS", ctrlReq{nr: cmdGetParams, devID: id, bufLen: uint16(paramsLen),
		payload: func(p []byte) { (*params)(unsafe.Pointer(&p[0])).len = paramsLen },
		result:  func(p []byte) { out = *(*params)(unsafe.Pointer(&p[0])) }})
	return out, err
}

func (c *ctrl) simple(name string, nr, id uint32, data uint64) error {
	_, err := c.do(name, ctrlReq{nr: nr, devID: id, data: data})
	return err
}

func (c *ctrl) startDev(id uint32) error {
	return c.simple("START_DEV", cmdStartDev, id, uint64(os.Getpid()))
}

func (c *ctrl) stopDev(id uint32) error { return c.simple("STOP_DEV", cmdStopDev, id, 0) }

func (c *ctrl) delDev(id uint32) error { return c.simple("DEL_DEV", cmdDelDev, id, 0) }

// updateSize sets the capacity of a started device to sectors (512 bytes)
// and tells the block layer (UBLK_U_CMD_UPDATE_SIZE, data[0]).
func (c *ctrl) updateSize(id uint32, sectors uint64) error {
	return c.simple("UPDATE_SIZE", cmdUpdateSize, id, sectors)
}

func (c *ctrl) startUserRecovery(id uint32) error {
	return c.simple("START_USER_RECOVERY", cmdStartUserRecovery, id, 0)
}

func (c *ctrl) endUserRecovery(id uint32) error {
	return c.simple("END_USER_RECOVERY", cmdEndUserRecovery, id, uint64(os.Getpid()))
}
