package ublk

import (
	"os"
	"strings"
	"testing"
	"unsafe"
)

func TestStructLayout(t *testing.T) {
	check := func(name string, got, want uintptr) {
		t.Helper()
		if got != want {
			t.Errorf("%s = %d, want %d", name, got, want)
		}
	}
	check("sizeof(ublksrv_ctrl_cmd)", unsafe.Sizeof(ctrlCmd{}), 32)
	check("ctrl_cmd.queue_id", unsafe.Offsetof(ctrlCmd{}.queueID), 4)
	check("ctrl_cmd.len", unsafe.Offsetof(ctrlCmd{}.len), 6)
	check("ctrl_cmd.addr", unsafe.Offsetof(ctrlCmd{}.addr), 8)
	check("ctrl_cmd.data", unsafe.Offsetof(ctrlCmd{}.data), 16)
	check("ctrl_cmd.dev_path_len", unsafe.Offsetof(ctrlCmd{}.devPathLen), 24)

	check("sizeof(ublksrv_ctrl_dev_info)", unsafe.Sizeof(devInfo{}), 64)
	check("dev_info.max_io_buf_bytes", unsafe.Offsetof(devInfo{}.maxIOBufBytes), 8)
	check("dev_info.dev_id", unsafe.Offsetof(devInfo{}.devID), 12)
	check("dev_info.ublksrv_pid", unsafe.Offsetof(devInfo{}.ublksrvPID), 16)
	check("dev_info.flags", unsafe.Offsetof(devInfo{}.flags), 24)
	check("dev_info.owner_uid", unsafe.Offsetof(devInfo{}.ownerUID), 40)

	check("sizeof(ublksrv_io_desc)", unsafe.Sizeof(ioDesc{}), 24)
	check("io_desc.nr_sectors", unsafe.Offsetof(ioDesc{}.nrSectors), 4)
	check("io_desc.start_sector", unsafe.Offsetof(ioDesc{}.startSector), 8)
	check("io_desc.addr", unsafe.Offsetof(ioDesc{}.addr), 16)

	check("sizeof(ublksrv_io_cmd)", unsafe.Sizeof(ioCmd{}), 16)
	check("io_cmd.tag", unsafe.Offsetof(ioCmd{}.tag), 2)
	check("io_cmd.result", unsafe.Offsetof(ioCmd{}.result), 4)
	check("io_cmd.addr", unsafe.Offsetof(ioCmd{}.addr), 8)

	check("sizeof(ublk_param_basic)", unsafe.Sizeof(paramBasic{}), 32)
	check("basic.max_sectors", unsafe.Offsetof(paramBasic{}.maxSectors), 8)
	check("basic.dev_sectors", unsafe.Offsetof(paramBasic{}.devSectors), 16)
	check("sizeof(ublk_param_discard)", unsafe.Sizeof(paramDiscard{}), 20)
	check("discard.max_discard_segments", unsafe.Offsetof(paramDiscard{}.maxDiscardSegments), 16)
	check("params.basic", unsafe.Offsetof(params{}.basic), 8)
	check("params.discard", unsafe.Offsetof(params{}.discard), 40)
	check("params.devt", unsafe.Offsetof(params{}.devt), 60)
	check("paramsLen", uintptr(paramsLen), 76)
}

func TestOpcodes(t *testing.T) {
	for _, c := range []struct {
		name string
		got  uint32
		want uint32
	}{
		{"ADD_DEV", ctrlOp(cmdAddDev, false), 0xC0207504},
		{"DEL_DEV", ctrlOp(cmdDelDev, false), 0xC0207505},
		{"START_DEV", ctrlOp(cmdStartDev, false), 0xC0207506},
		{"STOP_DEV", ctrlOp(cmdStopDev, false), 0xC0207507},
		{"SET_PARAMS", ctrlOp(cmdSetParams, false), 0xC0207508},
		{"GET_PARAMS", ctrlOp(cmdGetParams, false), 0x80207509},
		{"GET_DEV_INFO", ctrlOp(cmdGetDevInfo, false), 0x80207502},
		{"START_USER_RECOVERY", ctrlOp(cmdStartUserRecovery, false), 0xC0207510},
		{"END_USER_RECOVERY", ctrlOp(cmdEndUserRecovery, false), 0xC0207511},
		{"GET_FEATURES", ctrlOp(cmdGetFeatures, false), 0x80207513},
		{"UPDATE_SIZE", ctrlOp(cmdUpdateSize, false), 0xC0207515},
		{"legacy ADD_DEV", ctrlOp(cmdAddDev, true), 0x04},
		{"FETCH_REQ", ioOp(ioFetchReq, false), 0xC0107520},
		{"COMMIT_AND_FETCH_REQ", ioOp(ioCommitAndFetchReq, false), 0xC0107521},
		{"legacy FETCH_REQ", ioOp(ioFetchReq, true), 0x20},
	} {
		if c.got != c.want {
			t.Errorf("%s = %#x, want %#x", c.name, c.got, c.want)
		}
	}
}

func TestDescOffset(t *testing.T) {
	if got := descOffset(0, 4096); got != 0 {
		t.Errorf("queue 0 offset %d", got)
	}
	// round_up(4096*24, 4096) = 98304, independent of the configured depth.
	if got := descOffset(1, 4096); got != 98304 {
		t.Errorf("queue 1 offset %d, want 98304", got)
	}
	if got := descOffset(3, 65536); got != 3*131072 {
		t.Errorf("queue 3 offset with 64K pages %d, want %d", got, 3*131072)
	}
	if got := descLen(128, 4096); got != 4096 {
		t.Errorf("descLen(128) = %d, want 4096", got)
	}
	if got := descLen(200, 4096); got != 8192 {
		t.Errorf("descLen(200) = %d, want 8192", got)
	}
}

func TestDescDecode(t *testing.T) {
	raw := []byte{
		0x01, 0x20, 0, 0, // op WRITE | FUA (1<<13)
		8, 0, 0, 0, // 8 sectors
		0x10, 0, 0, 0, 0, 0, 0, 0, // sector 16
		0, 0x10, 0, 0, 0, 0, 0, 0, // addr 0x1000
	}
	d := (*ioDesc)(unsafe.Pointer(&raw[0]))
	if d.op() != opWrite || d.opFlags&ioFlagFUA == 0 || d.nrSectors != 8 || d.startSector != 16 || d.addr != 0x1000 {
		t.Fatalf("decoded %+v", *d)
	}
}

// TestAvailable checks both answers: nil where the control device opens, the
// actionable message where it is missing (as on the host, which has no ublk).
func TestAvailable(t *testing.T) {
	err := Available()
	if _, serr := os.Stat(ControlPath); os.IsNotExist(serr) {
		if err == nil || !strings.Contains(err.Error(), "modprobe ublk_drv; needs Linux 6.0+ with CONFIG_BLK_DEV_UBLK") {
			t.Fatalf("Available() = %v, want the missing-module message", err)
		}
		return
	}
	if err != nil && !strings.Contains(err.Error(), "needs root") {
		t.Fatalf("Available() = %v with %s present", err, ControlPath)
	}
}
