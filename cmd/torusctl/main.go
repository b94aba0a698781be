// Command torusctl administers a Torus cluster through its etcd metadata.
//
//	torusctl init --cluster-dir DIR [--chunk-size 1MiB] [--replication 3]
//	torusctl status
//	torusctl node list
//	torusctl node remove ID [--force]
//	torusctl ring show
//	torusctl ring set-replication N
//	torusctl volume create NAME --size SIZE [--replication N]
//	torusctl volume list
//	torusctl volume info NAME
//	torusctl volume resize NAME --size SIZE
//	torusctl volume delete NAME
//
// Global flags (before or after the command): --etcd URL[,URL] (default
// http://127.0.0.1:2379, or $TORUS_ETCD), --prefix (default /torus/) and
// --output table|json. It needs no torusd: everything it reads and writes
// is in etcd (see package meta for the schema). Usage errors exit 2, other
// failures exit 1.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/pflag"

	"github.com/torus-storage/torus/meta"
)

const usage = `torusctl: administer a Torus cluster through etcd

Usage:
  torusctl [global flags] init --cluster-dir DIR [--chunk-size 1MiB] [--replication 3]
  torusctl [global flags] status
  torusctl [global flags] node list
  torusctl [global flags] node remove ID [--force]
  torusctl [global flags] ring show
  torusctl [global flags] ring set-replication N
  torusctl [global flags] volume create NAME --size SIZE [--replication N]
  torusctl [global flags] volume list
  torusctl [global flags] volume info NAME
  torusctl [global flags] volume resize NAME --size SIZE
  torusctl [global flags] volume delete NAME

Global flags:
  --etcd URL[,URL]     etcd endpoints (default http://127.0.0.1:2379, env TORUS_ETCD)
  --prefix PREFIX      etcd key prefix of the cluster (default /torus/)
  --output table|json  output format (default table)

Run 'torusctl COMMAND --help' for a command's flags.
`

// defaultEtcd is the endpoint used without --etcd and $TORUS_ETCD.
const defaultEtcd = "http://127.0.0.1:2379"

// errUsage marks errors caused by how the command was called; they exit 2.
var errUsage = errors.New("usage")

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// globals are the flags every command accepts.
type globals struct {
	etcd, prefix, output string
}

func (g *globals) register(fs *pflag.FlagSet) {
	def := defaultEtcd
	if e := os.Getenv("TORUS_ETCD"); e != "" {
		def = e
	}
	fs.StringVar(&g.etcd, "etcd", def, "etcd endpoints, comma separated (env TORUS_ETCD)")
	fs.StringVar(&g.prefix, "prefix", meta.DefaultPrefix, "etcd key prefix of the cluster")
	fs.StringVar(&g.output, "output", "table", "output format: table or json")
}

func (g *globals) check() error {
	if g.output != "table" && g.output != "json" {
		return fmt.Errorf("%w: --output %q: want table or json", errUsage, g.output)
	}
	if strings.TrimSpace(g.etcd) == "" {
		return fmt.Errorf("%w: --etcd is empty (example: --etcd http://127.0.0.1:2379)", errUsage)
	}
	return nil
}

// endpoints splits --etcd.
func (g *globals) endpoints() []string {
	var eps []string
	for e := range strings.SplitSeq(g.etcd, ",") {
		if e = strings.TrimSpace(e); e != "" {
			eps = append(eps, e)
		}
	}
	return eps
}

// open connects to the cluster metadata.
func (g *globals) open(ctx context.Context) (*meta.Client, error) {
	return meta.Open(ctx, g.endpoints(), g.prefix, meta.Options{DialTimeout: 3 * time.Second})
}

// command is one leaf command: its words, its flags and what it runs.
type command struct {
	path  string // e.g. "volume create"
	args  string // positional arguments, for the usage line
	nargs int    // exact count of positional arguments
	// build registers the command's flags on fs and returns the function
	// that runs it with their parsed values.
	build func(fs *pflag.FlagSet) runFunc
}

// runFunc runs a command with its positional arguments.
type runFunc func(ctx context.Context, e *env, args []string) error

// env is what a command runs with.
type env struct {
	g      globals
	stdout io.Writer
	stderr io.Writer
}

func run(args []string, stdout, stderr io.Writer) int {
	e := &env{stdout: stdout, stderr: stderr}
	gfs := pflag.NewFlagSet("torusctl", pflag.ContinueOnError)
	gfs.SetOutput(io.Discard)
	gfs.SetInterspersed(false)
	e.g.register(gfs)
	if err := gfs.Parse(args); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			fmt.Fprint(stdout, usage)
			return 0
		}
		fmt.Fprintf(stderr, "torusctl: %v\n\n%s", err, usage)
		return 2
	}
	rest := gfs.Args()
	if len(rest) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	if rest[0] == "help" {
		fmt.Fprint(stdout, usage)
		return 0
	}
	cmd, rest := lookup(rest)
	if cmd == nil {
		fmt.Fprintf(stderr, "torusctl: unknown command %q\n\n%s", strings.Join(rest, " "), usage)
		return 2
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	err := runCommand(ctx, e, cmd, rest)
	switch {
	case err == nil:
		return 0
	case errors.Is(err, pflag.ErrHelp):
		return 0
	case errors.Is(err, errUsage):
		fmt.Fprintf(stderr, "torusctl %s: %v\nRun 'torusctl %s --help' for its flags.\n", cmd.path, err, cmd.path)
		return 2
	default:
		fmt.Fprintf(stderr, "torusctl %s: %v\n", cmd.path, err)
		return 1
	}
}

// lookup finds the command named by the leading words of args and returns
// it with the remaining arguments; nil if no command matches.
func lookup(args []string) (*command, []string) {
	cmds := commands()
	for i := range cmds {
		c := &cmds[i]
		words := strings.Fields(c.path)
		if len(args) < len(words) {
			continue
		}
		match := true
		for j, w := range words {
			if args[j] != w {
				match = false
				break
			}
		}
		if match {
			return c, args[len(words):]
		}
	}
	return nil, args
}

// runCommand parses the command's flags (the globals again, so they may
// follow the command) and runs it.
func runCommand(ctx context.Context, e *env, c *command, args []string) error {
	fs := pflag.NewFlagSet("torusctl "+c.path, pflag.ContinueOnError)
	fs.SetOutput(e.stderr)
	fs.Usage = func() { // only --help calls it: parse errors are returned
		fmt.Fprintf(e.stdout, "Usage: torusctl %s %s [flags]\n\nFlags:\n%s", c.path, c.args, fs.FlagUsages())
	}
	// Re-register the globals with the values already parsed as defaults.
	g := e.g
	fs.StringVar(&e.g.etcd, "etcd", g.etcd, "etcd endpoints, comma separated (env TORUS_ETCD)")
	fs.StringVar(&e.g.prefix, "prefix", g.prefix, "etcd key prefix of the cluster")
	fs.StringVar(&e.g.output, "output", g.output, "output format: table or json")
	runc := c.build(fs)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			return err
		}
		return fmt.Errorf("%w: %v", errUsage, err)
	}
	if err := e.g.check(); err != nil {
		return err
	}
	pos := fs.Args()
	if len(pos) != c.nargs {
		if c.nargs == 0 {
			return fmt.Errorf("%w: unexpected arguments %q", errUsage, pos)
		}
		return fmt.Errorf("%w: want %s, got %d arguments (example: torusctl %s %s)",
			errUsage, c.args, len(pos), c.path, example(c))
	}
	return runc(ctx, e, pos)
}

func example(c *command) string {
	switch c.path {
	case "volume create":
		return "vol0 --size 10GiB"
	case "volume resize":
		return "vol0 --size 20GiB"
	case "ring set-replication":
		return "3"
	case "node remove":
		return "node4"
	default:
		return "vol0"
	}
}
