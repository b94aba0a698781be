// Package units parses and prints byte sizes the way operators write them.
package units

import (
	"fmt"
	"strconv"
	"strings"
)

// Binary size multipliers.
const (
	KiB int64 = 1 << (10 * (iota + 1))
	MiB
	GiB
	TiB
	PiB
)

var suffixes = []struct {
	s string
	m int64
}{
	{"pib", PiB}, {"tib", TiB}, {"gib", GiB}, {"mib", MiB}, {"kib", KiB},
	{"pb", PiB}, {"tb", TiB}, {"gb", GiB}, {"mb", MiB}, {"kb", KiB},
	{"p", PiB}, {"t", TiB}, {"g", GiB}, {"m", MiB}, {"k", KiB},
	{"b", 1},
}

// ParseSize parses sizes such as "4096", "512M", "10GiB" or "1.5T". Every
// suffix is binary (G and GB both mean 2^30), as block-device tools use them.
func ParseSize(s string) (int64, error) {
	in := strings.TrimSpace(s)
	low := strings.ToLower(in)
	mult := int64(1)
	for _, x := range suffixes {
		if strings.HasSuffix(low, x.s) {
			mult = x.m
			low = strings.TrimSpace(strings.TrimSuffix(low, x.s))
			break
		}
	}
	if low == "" {
		return 0, fmt.Errorf("size %q: no number (examples: 4096, 512MiB, 10GiB)", s)
	}
	if n, err := strconv.ParseInt(low, 10, 64); err == nil {
		if n < 0 {
			return 0, fmt.Errorf("size %q: negative", s)
		}
		if n > 0 && mult > (1<<62)/n {
			return 0, fmt.Errorf("size %q: too large", s)
		}
		return n * mult, nil
	}
	f, err := strconv.ParseFloat(low, 64)
	if err != nil || f < 0 || f != f {
		return 0, fmt.Errorf("size %q: not a size (examples: 4096, 512MiB, 10GiB)", s)
	}
	v := f * float64(mult)
	if v > float64(int64(1)<<62) {
		return 0, fmt.Errorf("size %q: too large", s)
	}
	return int64(v), nil
}

// FormatSize prints n bytes with the largest binary unit that keeps it exact
// to two decimals, e.g. "10 GiB", "1.5 MiB", "4096 B".
func FormatSize(n int64) string {
	units := []struct {
		s string
		m int64
	}{{"PiB", PiB}, {"TiB", TiB}, {"GiB", GiB}, {"MiB", MiB}, {"KiB", KiB}}
	for _, u := range units {
		if n >= u.m {
			if n%u.m == 0 {
				return fmt.Sprintf("%d %s", n/u.m, u.s)
			}
			return strconv.FormatFloat(float64(n)/float64(u.m), 'f', 2, 64) + " " + u.s
		}
	}
	return fmt.Sprintf("%d B", n)
}
