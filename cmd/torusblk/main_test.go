package main

import (
	"bytes"
	"strings"
	"testing"
)

// TestHelp: --help, -h and help print the usage to stdout and exit 0; the
// program's usage shows both forms of serve and attach, the local store and
// the cluster volume.
func TestHelp(t *testing.T) {
	for _, args := range [][]string{{"--help"}, {"-h"}, {"help"}} {
		var stdout, stderr bytes.Buffer
		code := runWithTimeout(t, args, &stdout, &stderr)
		if code != 0 || stderr.Len() != 0 {
			t.Fatalf("torusblk %q: exit %d, stderr %q", args, code, stderr.String())
		}
		for _, want := range []string{
			"torusblk serve --store DIR --size SIZE --listen unix:PATH|tcp:HOST:PORT",
			"torusblk serve NAME --etcd URL --tls-dir DIR --listen unix:PATH|tcp:HOST:PORT",
			"torusblk attach --store DIR --size SIZE [--mode ublk|nbd|auto]",
			"torusblk attach NAME --etcd URL --tls-dir DIR [--mode ublk|nbd|auto]",
			"torusblk detach DEVICE", "torusblk recover /dev/ublkbN", "torusblk list",
		} {
			if !strings.Contains(stdout.String(), want) {
				t.Errorf("torusblk %q: usage lacks %q:\n%s", args, want, stdout.String())
			}
		}
	}
	for _, cmd := range []string{"serve", "attach"} {
		for _, args := range [][]string{{cmd, "--help"}, {"help", cmd}} {
			var stdout, stderr bytes.Buffer
			code := runWithTimeout(t, args, &stdout, &stderr)
			out := stdout.String()
			if code != 0 || stderr.Len() != 0 || !strings.Contains(out, "torusblk "+cmd+" NAME --etcd URL --tls-dir DIR") {
				t.Fatalf("torusblk %q: exit %d, stderr %q, stdout:\n%s", args, code, stderr.String(), out)
			}
			// Flags show their value names, never a phrase of their help.
			for _, want := range []string{"--tls-dir DIR ", "--etcd URL[,URL] ", "--store DIR ", "--size size "} {
				if !strings.Contains(out, want) {
					t.Errorf("torusblk %q: flags lack %q:\n%s", args, want, out)
				}
			}
			if strings.Contains(out, "--tls-dir torusd dev") {
				t.Errorf("torusblk %q: --tls-dir shows a phrase of its help as its value:\n%s", args, out)
			}
		}
	}
}

// TestUsage: usage errors print the error and the usage to stderr and exit
// 2, before anything is opened.
func TestUsage(t *testing.T) {
	t.Setenv("TORUS_TLS_DIR", "")
	dir := t.TempDir()
	for _, c := range []struct {
		args []string
		want string
	}{
		{nil, "Usage:\n  torusblk serve"},
		{[]string{"bogus"}, `unknown command "bogus"`},
		{[]string{"--bogus"}, "unknown flag: --bogus"},
		{[]string{"serve", "--bogus"}, "unknown flag: --bogus"},
		{[]string{"serve", "a", "b"}, `unexpected argument "b"`},
		{[]string{"serve", "vol0", "--store", dir, "--listen", "unix:" + dir + "/s"}, "--store and --size are for a local volume"},
		{[]string{"serve", "vol0"}, "--listen is required"},
		// The cluster form needs this client's certificate, and says how to get one.
		{[]string{"serve", "vol0", "--listen", "unix:" + dir + "/s"}, "--tls-dir (or TORUS_TLS_DIR) is required for a cluster volume"},
		{[]string{"attach", "vol0"}, "torusd dev prints one (its tls: line); for another cluster, issue one from the cluster CA"},
		{[]string{"attach", "vol0", "--size", "1GiB"}, "--store and --size are for a local volume"},
		{[]string{"serve", "--store", dir, "--size", "1GiB", "--listen", "unix:" + dir + "/s", "--metrics", "127.0.0.1:0"}, "--metrics is for cluster volumes"},
		{[]string{"attach", "--store", dir}, "--store and --size are required"},
		{[]string{"attach", "--store", dir, "--size", "0"}, "--size 0: must be a positive multiple of 4 KiB"},
		{[]string{"list", "--output", "yaml"}, `invalid argument "yaml" for "--output" flag`},
		{[]string{"detach"}, "detach takes one device"},
		{[]string{"recover", "a", "b"}, "recover takes one device"},
	} {
		var stdout, stderr bytes.Buffer
		code := runWithTimeout(t, c.args, &stdout, &stderr)
		if code != 2 || stdout.Len() != 0 || !strings.Contains(stderr.String(), c.want) || !strings.Contains(stderr.String(), "Usage:\n  torusblk ") {
			t.Errorf("torusblk %q: exit %d, stdout %q, stderr:\n%s\nwant exit 2 with %q and the usage", c.args, code, stdout.String(), stderr.String(), c.want)
		}
	}
}

// TestList: list prints nothing attached from an empty run dir, as a
// table or, with --output json or --json, as JSON.
func TestList(t *testing.T) {
	dir := t.TempDir()
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"list", "--run-dir", dir}, "DEVICE"},
		{[]string{"list", "--run-dir", dir, "--output", "json"}, "null\n"},
		{[]string{"list", "--run-dir", dir, "--json"}, "null\n"},
	} {
		var stdout, stderr bytes.Buffer
		if code := runWithTimeout(t, c.args, &stdout, &stderr); code != 0 || !strings.HasPrefix(stdout.String(), c.want) {
			t.Errorf("torusblk %q: exit %d, stdout %q, stderr %q; want %q", c.args, code, stdout.String(), stderr.String(), c.want)
		}
	}
}
