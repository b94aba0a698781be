// Package cli runs the commands of the Torus binaries (torusd, torusctl,
// torusblk) the same way.
//
// A program is a tree of Commands: Main picks the command that the leading
// words of the arguments name, parses its flags and runs it. Every program
// follows the same conventions:
//
//   - --help, -h or the word help prints the usage to stdout and exits 0;
//     "help COMMAND" prints that command's.
//   - A usage error (an unknown command or flag, a missing or bad argument:
//     any error that wraps ErrUsage) prints "NAME: error", then the usage, to
//     stderr and exits 2.
//   - Any other error prints "NAME: error" to stderr and exits 1.
//
// NAME is the command's path, such as "torusctl volume create".
package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/spf13/pflag"
)

// A Command is one command of a program: a leaf that runs, a group of
// subcommands, or both (a program that runs by itself and also has
// subcommands, like torusd and torusd dev).
type Command struct {
	// Name is the word that selects the command; the root command's is
	// the program's name.
	Name string
	// Summary is a one-line description, printed atop the command's help.
	Summary string
	// Usage shows the arguments and flags that follow the command's name,
	// one form per line, e.g. "NAME --size SIZE [--replication N]". A
	// line that starts with a space continues the one before it.
	Usage string
	// Help, if set, is printed by --help between the usage and the flags.
	Help string
	// Global, if set, defines flags that this command and every command
	// under it accept, before or after their names. (On a command that
	// also runs itself, flags before the next word are its own: there a
	// subcommand's name comes first.)
	Global func(fs *pflag.FlagSet)
	// Flags, if set, defines the command's own flags. It is called before
	// the arguments are parsed, so the values it binds are set when Run is
	// called (and again, on a fresh flag set, to print the help).
	Flags func(fs *pflag.FlagSet)
	// Run runs the command with the positional arguments left after the
	// flags. It is nil for a group that only holds subcommands.
	Run func(ctx context.Context, args []string, io IO) error
	// Sub are the subcommands.
	Sub []*Command
}

// IO is where a command writes: data and help on Stdout, logs and errors
// on Stderr.
type IO struct {
	Stdout, Stderr io.Writer
}

// ErrUsage marks errors caused by how a command was called: Main prints
// them with the usage and exits 2. Make one with Usagef or UsageError.
var ErrUsage = errors.New("usage")

// Usagef returns a usage error formatted like fmt.Errorf: its message is
// "usage: " and the formatted text, and it wraps ErrUsage (and any %w
// operand).
func Usagef(format string, a ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrUsage}, a...)...)
}

// UsageError marks err as a usage error without changing its message; nil
// stays nil.
func UsageError(err error) error {
	if err == nil || errors.Is(err, ErrUsage) {
		return err
	}
	return usageError{err}
}

type usageError struct{ err error }

func (e usageError) Error() string   { return e.err.Error() }
func (e usageError) Unwrap() []error { return []error{ErrUsage, e.err} }

// Main runs the command of the program root that args (without the program
// name) select, with ctx, and returns the process's exit status: 0 on
// success or help, 2 on a usage error, 1 on any other error.
func Main(ctx context.Context, root *Command, args []string, stdout, stderr io.Writer) int {
	s := &invocation{stdout: stdout, stderr: stderr, global: newFlagSet(root.Name)}
	s.global.SetInterspersed(false) // stop at the next command word
	s.path = []*Command{root}
	for {
		c := s.cmd()
		if c.Global != nil {
			c.Global(s.global)
		}
		if len(c.Sub) == 0 {
			break
		}
		if s.global.HasFlags() && c.Run == nil {
			if err := s.global.Parse(args); err != nil {
				return s.parseError(err)
			}
			args = s.global.Args()
		}
		if len(args) == 0 {
			if c.Run != nil {
				break
			}
			s.writeHelp(stderr) // no command given
			return 2
		}
		w := args[0]
		if w == "help" {
			return s.help(args[1:])
		}
		if sub := c.sub(w); sub != nil {
			s.path = append(s.path, sub)
			args = args[1:]
			continue
		}
		if c.Run != nil {
			break // the group runs itself, with these arguments
		}
		if w == "-h" || w == "--help" {
			s.writeHelp(stdout)
			return 0
		}
		if strings.HasPrefix(w, "-") && w != "-" {
			return s.exit(Usagef("unknown flag: %s", w))
		}
		return s.exit(Usagef("unknown command %q", w))
	}

	c := s.cmd()
	if c.Run == nil {
		panic("cli: command " + s.name() + " has neither Run nor subcommands")
	}
	fs := s.flagSet()
	if err := fs.Parse(args); err != nil {
		return s.parseError(err)
	}
	return s.exit(c.Run(ctx, fs.Args(), IO{stdout, stderr}))
}

// invocation is one run of Main.
type invocation struct {
	stdout, stderr io.Writer
	// path is the command being run and the commands above it, root first.
	path []*Command
	// global holds the Global flags of the commands on path.
	global *pflag.FlagSet
}

func newFlagSet(name string) *pflag.FlagSet {
	fs := pflag.NewFlagSet(name, pflag.ContinueOnError)
	fs.SetOutput(io.Discard) // Main prints errors and usage itself
	return fs
}

// cmd is the command being run.
func (s *invocation) cmd() *Command { return s.path[len(s.path)-1] }

// name is the command's path, e.g. "torusctl volume create".
func (s *invocation) name() string {
	names := make([]string, len(s.path))
	for i, c := range s.path {
		names[i] = c.Name
	}
	return strings.Join(names, " ")
}

func (c *Command) sub(name string) *Command {
	for _, s := range c.Sub {
		if s.Name == name {
			return s
		}
	}
	return nil
}

// flagSet returns the command's flags followed by the global ones.
func (s *invocation) flagSet() *pflag.FlagSet {
	fs := newFlagSet(s.name())
	if c := s.cmd(); c.Flags != nil {
		c.Flags(fs)
	}
	fs.AddFlagSet(s.global) // the same flags: values parsed before stay
	return fs
}

// parseError reports an error of flag parsing: help or a usage error.
func (s *invocation) parseError(err error) int {
	if errors.Is(err, pflag.ErrHelp) {
		s.writeHelp(s.stdout)
		return 0
	}
	return s.exit(Usagef("%w", err))
}

// exit reports err and returns the exit status.
func (s *invocation) exit(err error) int {
	switch {
	case err == nil:
		return 0
	case errors.Is(err, ErrUsage):
		fmt.Fprintf(s.stderr, "%s: %v\n\n", s.name(), err)
		s.writeUsage(s.stderr)
		return 2
	default:
		fmt.Fprintf(s.stderr, "%s: %v\n", s.name(), err)
		return 1
	}
}

// help prints the help of the command that words name, under the current
// one.
func (s *invocation) help(words []string) int {
	for _, w := range words {
		sub := s.cmd().sub(w)
		if sub == nil {
			return s.exit(Usagef("help: unknown command %q", w))
		}
		s.path = append(s.path, sub)
		if sub.Global != nil {
			sub.Global(s.global)
		}
	}
	s.writeHelp(s.stdout)
	return 0
}

// writeUsage writes the short usage: the command's forms and where to find
// its flags.
func (s *invocation) writeUsage(w io.Writer) {
	fmt.Fprintf(w, "Usage:\n%s\n%s\n", s.synopsis(), s.footer())
}

// writeHelp writes the command's summary, forms, help and flags.
func (s *invocation) writeHelp(w io.Writer) {
	c := s.cmd()
	var parts []string // separated by blank lines
	if c.Summary != "" {
		parts = append(parts, fmt.Sprintf("%s: %s\n", s.name(), c.Summary))
	}
	parts = append(parts, "Usage:\n"+s.synopsis())
	if c.Help != "" {
		parts = append(parts, strings.TrimRight(c.Help, "\n")+"\n")
	}
	if c.Run != nil {
		own := newFlagSet(s.name())
		s.flagSet().VisitAll(func(f *pflag.Flag) {
			if s.global.Lookup(f.Name) != f {
				own.AddFlag(f)
			}
		})
		if own.HasFlags() {
			parts = append(parts, "Flags:\n"+own.FlagUsages())
		}
	}
	if s.global.HasFlags() {
		parts = append(parts, "Global flags:\n"+s.global.FlagUsages())
	}
	if len(c.Sub) > 0 {
		parts = append(parts, s.footer()+"\n")
	}
	fmt.Fprint(w, strings.Join(parts, "\n"))
}

// footer says how to get the flags.
func (s *invocation) footer() string {
	c, name := s.cmd(), s.name()
	switch {
	case len(c.Sub) == 0:
		return fmt.Sprintf("Run '%s --help' for its flags.", name)
	case c.Run != nil:
		return fmt.Sprintf("Run '%s --help' or '%s COMMAND --help' for the flags.", name, name)
	default:
		return fmt.Sprintf("Run '%s COMMAND --help' for a command's flags.", name)
	}
}

// synopsis returns the usage lines of the command and of every command
// under it, each line indented and prefixed with the command's path.
func (s *invocation) synopsis() string {
	var b strings.Builder
	prefix := make([]string, 0, len(s.path))
	for _, c := range s.path[:len(s.path)-1] {
		prefix = append(prefix, c.Name)
		if c.Global != nil {
			prefix = append(prefix, "[global flags]")
		}
	}
	writeSynopsis(&b, prefix, s.cmd())
	return b.String()
}

func writeSynopsis(b *strings.Builder, prefix []string, c *Command) {
	path := append(prefix[:len(prefix):len(prefix)], c.Name)
	if c.Global != nil && len(c.Sub) > 0 {
		path = append(path, "[global flags]")
	}
	if c.Run != nil {
		head := "  " + strings.Join(path, " ")
		if c.Usage == "" {
			b.WriteString(head + "\n")
		}
		for line := range strings.Lines(c.Usage) {
			line = strings.TrimRight(line, "\n")
			if strings.HasPrefix(line, " ") {
				fmt.Fprintf(b, "%*s%s\n", len(head)+1, "", strings.TrimLeft(line, " "))
			} else {
				fmt.Fprintf(b, "%s %s\n", head, line)
			}
		}
	}
	for _, sub := range c.Sub {
		writeSynopsis(b, path, sub)
	}
}
