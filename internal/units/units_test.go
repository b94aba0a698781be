package units

import "testing"

func TestParseSize(t *testing.T) {
	good := map[string]int64{
		"4096": 4096, "1k": 1024, "1KiB": 1024, "512M": 512 << 20, "10GiB": 10 << 30,
		"10 GB": 10 << 30, "1.5T": 3 << 39, "0": 0, "2b": 2,
	}
	for in, want := range good {
		got, err := ParseSize(in)
		if err != nil || got != want {
			t.Errorf("ParseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "G", "-1", "abc", "1X", "99999999999P", "NaN"} {
		if n, err := ParseSize(in); err == nil {
			t.Errorf("ParseSize(%q) = %d, want an error", in, n)
		}
	}
}

func TestFormatSize(t *testing.T) {
	for n, want := range map[int64]string{4096: "4 KiB", 10 << 30: "10 GiB", 1536 << 10: "1.50 MiB", 100: "100 B"} {
		if got := FormatSize(n); got != want {
			t.Errorf("FormatSize(%d) = %q, want %q", n, got, want)
		}
	}
}
