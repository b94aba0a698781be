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
//	torusctl volume resize NAME --size SIZE [--wait 30s]
//	torusctl volume delete NAME
//	torusctl volume clone VOLUME@SNAPSHOT NAME
//	torusctl volume flatten NAME
//	torusctl volume rollback VOLUME@SNAPSHOT --tls-dir DIR
//	torusctl snapshot create [--group NAME] VOLUME@SNAPSHOT...
//	torusctl snapshot list [VOLUME]
//	torusctl snapshot diff VOLUME@FROM VOLUME@TO --tls-dir DIR
//	torusctl snapshot delete VOLUME@SNAPSHOT
//
// Global flags (before or after the command): --etcd URL[,URL] (default
// $TORUS_ETCD, else http://127.0.0.1:2379), --prefix (default /torus/) and
// --output text|json (table is another name for text). It needs no
// torusd: everything it reads and writes is in etcd (see package meta for
// the schema). --help prints the usage to stdout; usage errors exit 2,
// other failures exit 1 (the conventions of internal/cli).
package main

import (
	"context"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/pflag"

	"github.com/torus-storage/torus/internal/cli"
	"github.com/torus-storage/torus/meta"
)

// globals are the flags every command accepts.
type globals struct {
	cluster cli.Cluster
	output  cli.Output
}

func (g *globals) register(fs *pflag.FlagSet) {
	g.cluster.Flags(fs)
	cli.OutputFlag(fs, &g.output)
}

func (g *globals) check() error {
	if len(g.cluster.Endpoints()) == 0 {
		return cli.Usagef("--etcd is empty (example: --etcd http://127.0.0.1:2379)")
	}
	return nil
}

// open connects to the cluster metadata.
func (g *globals) open(ctx context.Context) (*meta.Client, error) {
	return meta.Open(ctx, g.cluster.Endpoints(), g.cluster.Prefix, meta.Options{DialTimeout: 3 * time.Second})
}

// command is one leaf command: its words, its arguments and flags and what
// it runs.
type command struct {
	path    string // e.g. "volume create"
	summary string // what it does, for its --help
	args    string // positional arguments, for the usage line
	flags   string // its flags, for the usage line
	nargs   int    // count of positional arguments (the least, with maxArgs)
	maxArgs int    // if not 0, the most positional arguments (-1: any)
	// build registers the command's flags on fs and returns the function
	// that runs it with their parsed values.
	build func(fs *pflag.FlagSet) runFunc
}

// runFunc runs a command with its positional arguments.
type runFunc func(ctx context.Context, e *env, args []string) error

// env is what a command runs with.
type env struct {
	g      *globals
	stdout io.Writer
	stderr io.Writer
}

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	return cli.Main(ctx, program(), args, stdout, stderr)
}

// program is torusctl's command tree: the commands of the table, grouped
// by their first word.
func program() *cli.Command {
	g := new(globals)
	root := &cli.Command{Name: "torusctl", Summary: "administer a Torus cluster through etcd", Global: g.register}
	groups := map[string]*cli.Command{}
	for _, c := range commands() {
		words := strings.Fields(c.path)
		leaf := c.command(g, words[len(words)-1])
		if len(words) == 1 {
			root.Sub = append(root.Sub, leaf)
			continue
		}
		grp := groups[words[0]]
		if grp == nil {
			grp = &cli.Command{Name: words[0]}
			groups[words[0]] = grp
			root.Sub = append(root.Sub, grp)
		}
		grp.Sub = append(grp.Sub, leaf)
	}
	return root
}

// command returns c as a command named name that checks the global flags
// and the count of positional arguments before it runs.
func (c *command) command(g *globals, name string) *cli.Command {
	var run runFunc
	return &cli.Command{
		Name:    name,
		Summary: c.summary,
		Usage:   strings.TrimSpace(c.args + " " + c.flags),
		Flags:   func(fs *pflag.FlagSet) { run = c.build(fs) },
		Run: func(ctx context.Context, args []string, io cli.IO) error {
			if err := g.check(); err != nil {
				return err
			}
			if c.maxArgs != 0 && len(args) >= c.nargs && (c.maxArgs < 0 || len(args) <= c.maxArgs) {
				return run(ctx, &env{g: g, stdout: io.Stdout, stderr: io.Stderr}, args)
			}
			if len(args) != c.nargs || c.maxArgs != 0 {
				if c.nargs == 0 && c.maxArgs == 0 {
					return cli.Usagef("unexpected arguments %q", args)
				}
				return cli.Usagef("want %s, got %d arguments (example: torusctl %s %s)",
					c.args, len(args), c.path, example(c))
			}
			return run(ctx, &env{g: g, stdout: io.Stdout, stderr: io.Stderr}, args)
		},
	}
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
	case "snapshot create", "snapshot delete", "volume rollback":
		return "vol0@before-upgrade"
	case "snapshot diff":
		return "vol0@mon vol0@tue"
	case "volume clone":
		return "vol0@golden vol1"
	default:
		return "vol0"
	}
}
