package cli

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/spf13/pflag"
)

// testProgram is a program like torusctl: global flags and nested groups,
// plus a command that fails.
func testProgram(got *[]string) *Command {
	var c Cluster
	var out Output
	var size Size
	var force bool
	record := func(ctx context.Context, args []string, io IO) error {
		*got = append(*got, fmt.Sprintf("etcd=%s prefix=%s output=%s size=%d force=%v args=%q",
			c.Etcd, c.Prefix, out, size, force, args))
		fmt.Fprintln(io.Stdout, "ran")
		return nil
	}
	return &Command{
		Name:    "prog",
		Summary: "a test program",
		Global: func(fs *pflag.FlagSet) {
			c.Flags(fs)
			OutputFlag(fs, &out)
		},
		Sub: []*Command{
			{Name: "status", Run: record},
			{Name: "volume", Sub: []*Command{
				{
					Name: "create", Usage: "NAME --size SIZE [--force]", Summary: "create a volume",
					Flags: func(fs *pflag.FlagSet) {
						fs.Var(&size, "size", "volume size")
						fs.BoolVar(&force, "force", false, "force it")
					},
					Run: func(ctx context.Context, args []string, io IO) error {
						if len(args) != 1 {
							return Usagef("want NAME, got %d arguments", len(args))
						}
						return record(ctx, args, io)
					},
				},
				{Name: "list", Run: record},
			}},
			{Name: "fail", Run: func(context.Context, []string, IO) error { return errors.New("it broke") }},
		},
	}
}

// testNode is a program like torusd: the root runs itself and has a
// subcommand; it has no global flags.
func testNode(got *[]string) *Command {
	var dir string
	var nodes int
	return &Command{
		Name:    "node",
		Summary: "a test node",
		Usage:   "--data-dir DIR\n [--more]",
		Flags:   func(fs *pflag.FlagSet) { fs.StringVar(&dir, "data-dir", "", "data `DIR`") },
		Run: func(_ context.Context, args []string, _ IO) error {
			if len(args) > 0 {
				return Usagef("unexpected arguments %q", args)
			}
			if dir == "" {
				return Usagef("--data-dir is required")
			}
			*got = append(*got, "node "+dir)
			return nil
		},
		Sub: []*Command{{
			Name:  "dev",
			Usage: "--nodes N",
			Flags: func(fs *pflag.FlagSet) { fs.IntVar(&nodes, "nodes", 3, "number of nodes") },
			Run: func(context.Context, []string, IO) error {
				*got = append(*got, fmt.Sprintf("dev %d", nodes))
				return nil
			},
		}},
	}
}

type result struct {
	code           int
	stdout, stderr string
	ran            []string
}

func run(prog func(*[]string) *Command, args ...string) result {
	var r result
	var so, se bytes.Buffer
	r.code = Main(context.Background(), prog(&r.ran), args, &so, &se)
	r.stdout, r.stderr = so.String(), se.String()
	return r
}

func TestHelp(t *testing.T) {
	t.Setenv(EnvEtcd, "")
	for _, args := range [][]string{{"--help"}, {"-h"}, {"help"}, {"--etcd", "x", "--help"}} {
		r := run(testProgram, args...)
		if r.code != 0 || r.stderr != "" || len(r.ran) != 0 {
			t.Fatalf("prog %q: exit %d, stderr %q, ran %q; want exit 0, no stderr, nothing run", args, r.code, r.stderr, r.ran)
		}
		for _, want := range []string{
			"prog: a test program",
			"  prog [global flags] status\n",
			"  prog [global flags] volume create NAME --size SIZE [--force]\n",
			"  prog [global flags] volume list\n",
			"Global flags:",
			"--etcd URL[,URL]",
			`(default "` + DefaultEtcd + `")`,
			"--output FORMAT",
			"Run 'prog COMMAND --help' for a command's flags.",
		} {
			if !strings.Contains(r.stdout, want) {
				t.Errorf("prog %q: help lacks %q:\n%s", args, want, r.stdout)
			}
		}
	}
	for _, args := range [][]string{{"volume", "create", "--help"}, {"volume", "create", "x", "-h"}, {"help", "volume", "create"}, {"--prefix", "/p/", "volume", "create", "--help"}} {
		r := run(testProgram, args...)
		if r.code != 0 || r.stderr != "" || len(r.ran) != 0 {
			t.Fatalf("prog %q: exit %d, stderr %q, ran %q", args, r.code, r.stderr, r.ran)
		}
		for _, want := range []string{"prog volume create: create a volume", "Usage:\n  prog [global flags] volume create NAME --size SIZE [--force]\n",
			"Flags:\n", "--size size", "--force", "Global flags:\n", "--prefix PREFIX"} {
			if !strings.Contains(r.stdout, want) {
				t.Errorf("prog %q: help lacks %q:\n%s", args, want, r.stdout)
			}
		}
		if flags := r.stdout[strings.Index(r.stdout, "Flags:"):strings.Index(r.stdout, "Global flags:")]; strings.Contains(flags, "--etcd") {
			t.Errorf("prog %q: global flags listed among the command's own:\n%s", args, r.stdout)
		}
	}
	// A group's help lists only its commands.
	r := run(testProgram, "volume", "--help")
	if r.code != 0 || !strings.Contains(r.stdout, "prog [global flags] volume list") || strings.Contains(r.stdout, "status") {
		t.Fatalf("prog volume --help: exit %d, stdout:\n%s", r.code, r.stdout)
	}
}

func TestHelpRunningRoot(t *testing.T) {
	for _, args := range [][]string{{"--help"}, {"help"}, {"-h"}, {"--data-dir", "d", "--help"}} {
		r := run(testNode, args...)
		if r.code != 0 || r.stderr != "" || len(r.ran) != 0 {
			t.Fatalf("node %q: exit %d, stderr %q, ran %q", args, r.code, r.stderr, r.ran)
		}
		for _, want := range []string{
			"node: a test node",
			"  node --data-dir DIR\n       [--more]\n", // continuation lines align after the name
			"  node dev --nodes N\n",
			"Flags:\n", "--data-dir DIR",
			"Run 'node --help' or 'node COMMAND --help' for the flags.",
		} {
			if !strings.Contains(r.stdout, want) {
				t.Errorf("node %q: help lacks %q:\n%s", args, want, r.stdout)
			}
		}
		if strings.Contains(r.stdout, "number of nodes") {
			t.Errorf("node %q: the subcommand's flags are in the root's help:\n%s", args, r.stdout)
		}
	}
	r := run(testNode, "dev", "--help")
	if r.code != 0 || !strings.Contains(r.stdout, "--nodes int") || strings.Contains(r.stdout, "--data-dir") {
		t.Fatalf("node dev --help: exit %d, stdout:\n%s", r.code, r.stdout)
	}
}

func TestUsageErrors(t *testing.T) {
	t.Setenv(EnvEtcd, "")
	for _, c := range []struct {
		prog func(*[]string) *Command
		args []string
		want string // first line of stderr
		// usage is a line of the usage that must follow.
		usage string
	}{
		{testProgram, []string{"bogus"}, `prog: usage: unknown command "bogus"`, "  prog [global flags] status"},
		{testProgram, []string{"--nope", "status"}, "prog: usage: unknown flag: --nope", "  prog [global flags] status"},
		{testProgram, []string{"status", "--nope"}, "prog status: usage: unknown flag: --nope", "Run 'prog status --help' for its flags."},
		{testProgram, []string{"volume", "create", "v", "--size", "lots"}, `prog volume create: usage: invalid argument "lots" for "--size" flag`,
			"  prog [global flags] volume create NAME --size SIZE [--force]"},
		{testProgram, []string{"volume", "create"}, "prog volume create: usage: want NAME, got 0 arguments", "Run 'prog volume create --help' for its flags."},
		{testProgram, []string{"volume", "bogus"}, `prog volume: usage: unknown command "bogus"`, "Run 'prog volume COMMAND --help' for a command's flags."},
		{testProgram, []string{"status", "--output", "yaml"}, `prog status: usage: invalid argument "yaml" for "--output" flag: want text or json`, "  prog [global flags] status"},
		{testProgram, []string{"help", "bogus"}, `prog: usage: help: unknown command "bogus"`, "  prog [global flags] status"},
		{testNode, []string{}, "node: usage: --data-dir is required", "  node dev --nodes N"},
		{testNode, []string{"bogus"}, `node: usage: unexpected arguments ["bogus"]`, "Run 'node --help' or 'node COMMAND --help' for the flags."},
		{testNode, []string{"--data-dir", "d", "dev"}, `node: usage: unexpected arguments ["dev"]`, "  node dev --nodes N"},
		{testNode, []string{"dev", "--data-dir", "d"}, "node dev: usage: unknown flag: --data-dir", "Run 'node dev --help' for its flags."},
	} {
		r := run(c.prog, c.args...)
		if r.code != 2 || r.stdout != "" || len(r.ran) != 0 {
			t.Errorf("%q: exit %d, stdout %q, ran %q; want exit 2, no stdout, nothing run", c.args, r.code, r.stdout, r.ran)
			continue
		}
		first, rest, _ := strings.Cut(r.stderr, "\n")
		if !strings.HasPrefix(first, c.want) || !strings.Contains(rest, "\nUsage:\n") || !strings.Contains(rest, c.usage) {
			t.Errorf("%q: stderr\n%s\nwant a first line starting %q, then the usage with %q", c.args, r.stderr, c.want, c.usage)
		}
	}

	// No command at all: the help, on stderr.
	r := run(testProgram)
	if r.code != 2 || r.stdout != "" || !strings.Contains(r.stderr, "prog: a test program") || !strings.Contains(r.stderr, "volume list") {
		t.Fatalf("prog: exit %d, stdout %q, stderr %q; want exit 2 with the help on stderr", r.code, r.stdout, r.stderr)
	}
}

func TestErrors(t *testing.T) {
	r := run(testProgram, "fail")
	if r.code != 1 || r.stderr != "prog fail: it broke\n" || r.stdout != "" {
		t.Fatalf("prog fail: exit %d, stdout %q, stderr %q; want exit 1 and only \"prog fail: it broke\"", r.code, r.stdout, r.stderr)
	}
	// UsageError keeps the message and makes it a usage error.
	base := errors.New("bad node config: --listen x")
	err := UsageError(fmt.Errorf("wrapped: %w", base))
	if err.Error() != "wrapped: bad node config: --listen x" || !errors.Is(err, ErrUsage) || !errors.Is(err, base) {
		t.Fatalf("UsageError: %q, is ErrUsage %v, is base %v", err, errors.Is(err, ErrUsage), errors.Is(err, base))
	}
	if UsageError(nil) != nil {
		t.Fatal("UsageError(nil) != nil")
	}
	if err := Usagef("--x %d: %w", 3, base); err.Error() != "usage: --x 3: bad node config: --listen x" || !errors.Is(err, base) || !errors.Is(err, ErrUsage) {
		t.Fatalf("Usagef: %q", err)
	}
}

func TestRun(t *testing.T) {
	t.Setenv(EnvEtcd, "")
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"status"}, `etcd=` + DefaultEtcd + ` prefix=/torus/ output=text size=0 force=false args=[]`},
		// Global flags before and after the command, and between its words.
		{[]string{"--etcd", "http://e:1", "volume", "--prefix", "/p/", "create", "v", "--size", "1MiB", "--output", "json", "--force"},
			`etcd=http://e:1 prefix=/p/ output=json size=1048576 force=true args=["v"]`},
		{[]string{"volume", "list", "--output", "table"}, `etcd=` + DefaultEtcd + ` prefix=/torus/ output=text size=0 force=false args=[]`},
	} {
		r := run(testProgram, c.args...)
		if r.code != 0 || r.stdout != "ran\n" || len(r.ran) != 1 || r.ran[0] != c.want {
			t.Errorf("prog %q: exit %d, stdout %q, stderr %q, ran %q; want %q", c.args, r.code, r.stdout, r.stderr, r.ran, c.want)
		}
	}
	if r := run(testNode, "--data-dir", "d"); r.code != 0 || len(r.ran) != 1 || r.ran[0] != "node d" {
		t.Errorf("node --data-dir d: exit %d, stderr %q, ran %q", r.code, r.stderr, r.ran)
	}
	if r := run(testNode, "dev", "--nodes", "5"); r.code != 0 || len(r.ran) != 1 || r.ran[0] != "dev 5" {
		t.Errorf("node dev --nodes 5: exit %d, stderr %q, ran %q", r.code, r.stderr, r.ran)
	}
}

func TestEnvDefaults(t *testing.T) {
	t.Setenv(EnvEtcd, "http://from-env:2379")
	t.Setenv(EnvTLSDir, "/etc/torus/client")
	var c Cluster
	var tls string
	fs := pflag.NewFlagSet("t", pflag.ContinueOnError)
	c.Flags(fs)
	TLSDirFlag(fs, &tls)
	if err := fs.Parse(nil); err != nil {
		t.Fatal(err)
	}
	if c.Etcd != "http://from-env:2379" || c.Prefix != "/torus/" || tls != "/etc/torus/client" {
		t.Fatalf("defaults from the environment: %+v, tls-dir %q", c, tls)
	}
	if err := fs.Parse([]string{"--etcd", " http://a:1, ,http://b:2 ", "--tls-dir", "/d"}); err != nil {
		t.Fatal(err)
	}
	if eps := c.Endpoints(); len(eps) != 2 || eps[0] != "http://a:1" || eps[1] != "http://b:2" || tls != "/d" {
		t.Fatalf("flags over the environment: endpoints %q, tls-dir %q", eps, tls)
	}
	u := fs.FlagUsages()
	if !strings.Contains(u, "--tls-dir DIR") || !strings.Contains(u, "--etcd URL[,URL]") {
		t.Fatalf("value names:\n%s", u)
	}

	t.Setenv(EnvEtcd, "")
	t.Setenv(EnvTLSDir, "")
	var c2 Cluster
	var tls2 string
	fs = pflag.NewFlagSet("t", pflag.ContinueOnError)
	c2.Flags(fs)
	TLSDirFlag(fs, &tls2)
	if c2.Etcd != DefaultEtcd || tls2 != "" {
		t.Fatalf("defaults without the environment: %+v, tls-dir %q", c2, tls2)
	}
}

func TestSize(t *testing.T) {
	for _, c := range []struct {
		in   string
		n    int64
		text string
	}{
		{"4096", 4096, "4KiB"}, {"1MiB", 1 << 20, "1MiB"}, {"10G", 10 << 30, "10GiB"}, {"1.5GiB", 3 << 29, "1536MiB"},
		{"4097", 4097, "4097"}, {"0", 0, "0"}, {"64KiB", 64 << 10, "64KiB"}, {"2TiB", 2 << 40, "2TiB"},
	} {
		var s Size
		if err := s.Set(c.in); err != nil || int64(s) != c.n || s.String() != c.text {
			t.Errorf("Size.Set(%q): %d %q %v; want %d %q", c.in, int64(s), s.String(), err, c.n, c.text)
		}
	}
	for _, in := range []string{"lots", "", "-1", "1XB"} {
		var s Size
		if err := s.Set(in); err == nil {
			t.Errorf("Size.Set(%q) = %d, want an error", in, int64(s))
		}
	}
	// As a flag: its default is printed the way it is written.
	fs := pflag.NewFlagSet("t", pflag.ContinueOnError)
	sz := Size(1 << 20)
	fs.Var(&sz, "chunk-size", "chunk size")
	if u := fs.FlagUsages(); !strings.Contains(u, "--chunk-size size") || !strings.Contains(u, "(default 1MiB)") {
		t.Fatalf("usage: %s", u)
	}
}

func TestWriteJSON(t *testing.T) {
	var b bytes.Buffer
	if err := WriteJSON(&b, map[string]int{"a": 1}); err != nil || b.String() != "{\n  \"a\": 1\n}\n" {
		t.Fatalf("WriteJSON: %q %v", b.String(), err)
	}
}
