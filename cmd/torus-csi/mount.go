package main

// Filesystems and mounts of the node service, through the host's tools
// (blkid, mkfs.ext4, mkfs.xfs, mount, umount, resize2fs, xfs_growfs) and
// /proc/self/mountinfo.

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// defaultFS is the filesystem of a mount volume whose capability names none.
const defaultFS = "ext4"

// mkfsArgs are the filesystems NodeStage makes, with their mkfs command:
// no discard of a new (already empty) volume, ext4's tables initialised
// lazily and no reserved blocks, as a volume belongs to one application.
var mkfsArgs = map[string][]string{
	"ext4": {"mkfs.ext4", "-q", "-F", "-m0", "-E", "nodiscard,lazy_itable_init=1,lazy_journal_init=1"},
	"xfs":  {"mkfs.xfs", "-q", "-f", "-K"},
}

// tool runs a host tool and returns its output; a failure carries the
// command and what it printed.
func tool(ctx context.Context, name string, args ...string) (string, error) {
	var out bytes.Buffer
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(out.String()))
	}
	return out.String(), nil
}

// probe returns what blkid finds on dev: a filesystem type (TYPE), or a
// partition table (PTTYPE, as "partition table X"), or "" for a blank
// device.
func probe(ctx context.Context, dev string) (string, error) {
	out, err := tool(ctx, "blkid", "-p", "-o", "export", dev)
	var ee *exec.ExitError
	if errors.As(err, &ee) && ee.ExitCode() == 2 {
		return "", nil // nothing found
	}
	if err != nil {
		return "", err
	}
	var typ, pt string
	for l := range strings.SplitSeq(out, "\n") {
		if v, ok := strings.CutPrefix(l, "TYPE="); ok {
			typ = v
		}
		if v, ok := strings.CutPrefix(l, "PTTYPE="); ok {
			pt = v
		}
	}
	switch {
	case typ != "":
		return typ, nil
	case pt != "":
		return "partition table " + pt, nil
	}
	return "something blkid cannot name", nil
}

// zeroed checks that the first and the last MiB of dev read as zeroes,
// with direct I/O (not the page cache).
func zeroed(dev string) error {
	f, err := os.OpenFile(dev, os.O_RDONLY|unix.O_DIRECT, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	size, err := deviceSize(dev)
	if err != nil {
		return err
	}
	const n = 1 << 20
	buf, err := unix.Mmap(-1, 0, n, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		return err
	}
	defer unix.Munmap(buf)
	for _, off := range []int64{0, max(0, size-n)} {
		b := buf[:min(n, size)]
		if _, err := f.ReadAt(b, off); err != nil {
			return fmt.Errorf("reading %s at %d: %w", dev, off, err)
		}
		for i, c := range b {
			if c != 0 {
				return fmt.Errorf("%s has data at byte %d", dev, off+int64(i))
			}
		}
	}
	return nil
}

// mountInfo is one line of /proc/self/mountinfo.
type mountInfo struct {
	major, minor uint32
	root, point  string
	fstype, src  string
}

// parseMountinfo parses the mountinfo format (proc(5)); malformed lines are
// skipped.
func parseMountinfo(r io.Reader) []mountInfo {
	var ms []mountInfo
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		sep := -1
		for i := 6; i < len(f); i++ {
			if f[i] == "-" {
				sep = i
				break
			}
		}
		if len(f) < 5 || sep < 0 || sep+2 >= len(f) {
			continue
		}
		maj, min, ok := strings.Cut(f[2], ":")
		a, err1 := strconv.ParseUint(maj, 10, 32)
		b, err2 := strconv.ParseUint(min, 10, 32)
		if !ok || err1 != nil || err2 != nil {
			continue
		}
		ms = append(ms, mountInfo{major: uint32(a), minor: uint32(b), root: unescape(f[3]), point: unescape(f[4]),
			fstype: f[sep+1], src: unescape(f[sep+2])})
	}
	return ms
}

// unescape undoes mountinfo's octal escapes (\040 for a space).
func unescape(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// mounts returns this process's mount table.
func mounts() ([]mountInfo, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return parseMountinfo(f), nil
}

// isMountPoint reports whether path is a mount point.
func isMountPoint(path string) (bool, error) {
	ms, err := mounts()
	if err != nil {
		return false, err
	}
	path = filepath.Clean(path)
	for _, m := range ms {
		if m.point == path {
			return true, nil
		}
	}
	return false, nil
}

// mountsOf returns where block device dev is mounted: its filesystem, and
// bind mounts of the device node itself (a published block volume). A
// stopped device has no node any more: its mounts are found by name.
func mountsOf(dev string) ([]string, error) {
	ms, err := mounts()
	if err != nil {
		return nil, err
	}
	var pts []string
	for _, m := range ms {
		if m.of(dev) {
			pts = append(pts, m.point)
		}
	}
	return pts, nil
}

// of reports whether m mounts block device dev, or binds its node.
func (m mountInfo) of(dev string) bool {
	if m.src == dev || (m.fstype == "devtmpfs" && m.root == "/"+filepath.Base(dev)) {
		return true
	}
	var st unix.Stat_t
	return unix.Stat(dev, &st) == nil && st.Mode&unix.S_IFMT == unix.S_IFBLK &&
		m.major == unix.Major(st.Rdev) && m.minor == unix.Minor(st.Rdev)
}

// mountedFrom reports whether path is a mount point of dev.
func mountedFrom(path, dev string) bool {
	ms, _ := mounts()
	path = filepath.Clean(path)
	for _, m := range ms {
		if m.point == path && m.of(dev) {
			return true
		}
	}
	return false
}

// isDevice reports whether path is (a filesystem on, or a bind mount of)
// block device dev.
func isDevice(path, dev string) (bool, error) {
	var ps, ds unix.Stat_t
	if err := unix.Stat(dev, &ds); err != nil {
		return false, err
	}
	if err := unix.Stat(path, &ps); err != nil {
		return false, err
	}
	if ps.Mode&unix.S_IFMT == unix.S_IFBLK {
		return ps.Rdev == ds.Rdev, nil
	}
	return ps.Dev == ds.Rdev, nil
}

// unmount unmounts path if it is a mount point.
func unmount(ctx context.Context, path string) error {
	mp, err := isMountPoint(path)
	if err != nil || !mp {
		return err
	}
	_, err = tool(ctx, "umount", path)
	return err
}

// grow grows the filesystem fstype on dev, mounted at path, to the size of
// dev (nothing to do when it already fills it).
func grow(ctx context.Context, fstype, dev, path string) error {
	var err error
	switch fstype {
	case "ext4", "ext3", "ext2":
		_, err = tool(ctx, "resize2fs", dev)
	case "xfs":
		_, err = tool(ctx, "xfs_growfs", path)
	default:
		return fmt.Errorf("growing a %s filesystem is not supported (ext4 and xfs are)", fstype)
	}
	return err
}

// deviceSize returns the size in bytes of block device dev.
func deviceSize(dev string) (int64, error) {
	f, err := os.Open(dev)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	n, err := unix.IoctlGetUint64(int(f.Fd()), unix.BLKGETSIZE64)
	if err != nil {
		return 0, fmt.Errorf("%s: BLKGETSIZE64: %w", dev, err)
	}
	return int64(n), nil
}
