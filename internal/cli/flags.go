package cli

// Flags shared by the Torus binaries, so that each means the same thing,
// takes the same values and has the same default everywhere.

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"

	"github.com/spf13/pflag"

	"github.com/torus-storage/torus/internal/units"
	"github.com/torus-storage/torus/meta"
)

// Environment variables that give flags their defaults.
const (
	// EnvEtcd is the default of --etcd.
	EnvEtcd = "TORUS_ETCD"
	// EnvTLSDir is the default of a client's --tls-dir.
	EnvTLSDir = "TORUS_TLS_DIR"
)

// DefaultEtcd is the etcd endpoint used without --etcd and $TORUS_ETCD:
// where torusd dev serves by default.
const DefaultEtcd = "http://127.0.0.1:2379"

// Cluster is where a cluster's metadata lives: the --etcd and --prefix
// flags.
type Cluster struct {
	// Etcd is --etcd: etcd endpoints, comma separated.
	Etcd string
	// Prefix is --prefix: the etcd key prefix of the cluster.
	Prefix string
}

// Flags defines --etcd (default $TORUS_ETCD, else DefaultEtcd) and --prefix
// (default meta.DefaultPrefix) on fs.
func (c *Cluster) Flags(fs *pflag.FlagSet) {
	def := os.Getenv(EnvEtcd)
	if def == "" {
		def = DefaultEtcd
	}
	fs.StringVar(&c.Etcd, "etcd", def, "etcd endpoints `URL[,URL]` (env "+EnvEtcd+")")
	fs.StringVar(&c.Prefix, "prefix", meta.DefaultPrefix, "etcd key `PREFIX` of the cluster")
}

// Endpoints returns the endpoints of --etcd, without blanks.
func (c *Cluster) Endpoints() []string {
	var eps []string
	for e := range strings.SplitSeq(c.Etcd, ",") {
		if e = strings.TrimSpace(e); e != "" {
			eps = append(eps, e)
		}
	}
	return eps
}

// TLSDirFlag defines a client's --tls-dir DIR on fs, stored in p: the
// directory with the client's certificate (node.crt, node.key and ca.crt),
// by default $TORUS_TLS_DIR.
func TLSDirFlag(fs *pflag.FlagSet, p *string) {
	fs.StringVar(p, "tls-dir", os.Getenv(EnvTLSDir),
		"`DIR` with this client's node.crt, node.key and ca.crt (env "+EnvTLSDir+"; torusd dev prints one)")
}

// Output is the value of --output: how a command prints data.
type Output string

// The formats of --output.
const (
	// Text is for people: tables and sentences.
	Text Output = "text"
	// JSON is for programs: one JSON document.
	JSON Output = "json"
)

// OutputFlag defines --output text|json on fs, stored in p, default Text.
// It also takes "table", torusctl's first name for text.
func OutputFlag(fs *pflag.FlagSet, p *Output) {
	*p = Text
	fs.Var(p, "output", "output `FORMAT`: text or json")
}

// Set implements pflag.Value.
func (o *Output) Set(s string) error {
	switch s {
	case "text", "table":
		*o = Text
	case "json":
		*o = JSON
	default:
		return fmt.Errorf("want text or json")
	}
	return nil
}

// String implements pflag.Value.
func (o *Output) String() string { return string(*o) }

// Type implements pflag.Value.
func (o *Output) Type() string { return "format" }

// WriteJSON writes v to w as indented JSON, ending with a newline.
func WriteJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// Size is a flag value holding a number of bytes, written as
// units.ParseSize reads it: 4096, 512MiB, 10GiB, 1.5T. Define one with
// fs.Var(&size, name, usage); a value that is not a size fails the parse
// of the flags, a usage error that names the flag. Whether the flag was
// given at all is fs.Changed(name).
type Size int64

// Set implements pflag.Value.
func (s *Size) Set(v string) error {
	n, err := units.ParseSize(v)
	if err != nil {
		return err
	}
	*s = Size(n)
	return nil
}

// String implements pflag.Value: the size in the largest binary unit that
// keeps it whole, as it would be written on the command line (64KiB, 1GiB,
// 4097).
func (s *Size) String() string {
	n := int64(*s)
	for _, u := range []struct {
		m int64
		s string
	}{{units.PiB, "PiB"}, {units.TiB, "TiB"}, {units.GiB, "GiB"}, {units.MiB, "MiB"}, {units.KiB, "KiB"}} {
		if n != 0 && n%u.m == 0 {
			return strconv.FormatInt(n/u.m, 10) + u.s
		}
	}
	return strconv.FormatInt(n, 10)
}

// Type implements pflag.Value.
func (s *Size) Type() string { return "size" }
