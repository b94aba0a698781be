package main

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
)

// machine describes where the benchmark ran.
type machine struct {
	CPUs     int    `json:"nproc"`
	CPUModel string `json:"cpu_model"`
	MemBytes int64  `json:"mem_bytes"`
	Kernel   string `json:"kernel"`
	Dir      string `json:"dir"`
	FSType   string `json:"fs_type"`
	FSSource string `json:"fs_source"`
	Mount    string `json:"mount_point"`
	Tools    string `json:"tools"`
	LoadAvg  string `json:"loadavg_start"`
}

func (m machine) String() string {
	return fmt.Sprintf("machine: nproc=%d cpu=%q mem=%.1fGiB kernel=%s loadavg=%s\ndir: %s on %s (%s, mounted at %s)\ntools: %s",
		m.CPUs, m.CPUModel, float64(m.MemBytes)/(1<<30), m.Kernel, m.LoadAvg, m.Dir, m.FSType, m.FSSource, m.Mount, m.Tools)
}

// describeMachine gathers the machine facts; missing facts are left empty.
func describeMachine(dir string) machine {
	m := machine{CPUs: runtime.NumCPU(), Dir: dir}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m.Kernel = strings.TrimSpace(string(b))
	}
	m.CPUModel = procField("/proc/cpuinfo", "model name")
	if kb := procField("/proc/meminfo", "MemTotal"); kb != "" {
		n, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(kb), " kB"), 10, 64)
		m.MemBytes = n << 10
	}
	m.FSType, m.FSSource, m.Mount = mountOf(dir)
	m.LoadAvg = loadAvg()
	return m
}

// loadAvg returns the 1, 5 and 15 minute load averages: other work on the
// machine skews every number, so the report records it.
func loadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}

// procField returns the value of the first "key: value" line with key.
func procField(path, key string) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if ok && strings.TrimSpace(k) == key {
			return strings.TrimSpace(v)
		}
	}
	return ""
}

// mountOf finds the mount holding dir in /proc/self/mountinfo: the longest
// mount point that is a prefix of dir's real path.
func mountOf(dir string) (fstype, source, mountPoint string) {
	real, err := filepath.EvalSymlinks(dir)
	if err != nil {
		real = dir
	}
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return "", "", ""
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// id parent major:minor root mountpoint opts [optional...] - fstype source superopts
		pre, post, ok := strings.Cut(sc.Text(), " - ")
		if !ok {
			continue
		}
		pf, qf := strings.Fields(pre), strings.Fields(post)
		if len(pf) < 5 || len(qf) < 2 {
			continue
		}
		mp := unescapeMount(pf[4])
		if !underPath(real, mp) || len(mp) < len(mountPoint) {
			continue
		}
		mountPoint, fstype, source = mp, qf[0], qf[1]
	}
	return fstype, source, mountPoint
}

func underPath(p, dir string) bool {
	if dir == "/" {
		return true
	}
	return p == dir || strings.HasPrefix(p, dir+"/")
}

// unescapeMount undoes the octal escapes (\040 for space) of mountinfo.
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// tmpfsMagic is TMPFS_MAGIC from linux/magic.h.
const tmpfsMagic = 0x01021994

// isTmpfs reports whether dir lives on tmpfs (memory, not storage).
func isTmpfs(dir string) (bool, error) {
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		return false, fmt.Errorf("statfs %s: %w", dir, err)
	}
	return st.Type == tmpfsMagic, nil
}

// sameFS reports whether a and b are on the same filesystem.
func sameFS(a, b string) bool {
	var sa, sb syscall.Stat_t
	if syscall.Stat(a, &sa) != nil || syscall.Stat(b, &sb) != nil {
		return false
	}
	return sa.Dev == sb.Dev
}
