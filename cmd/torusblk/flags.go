package main

import (
	"github.com/spf13/pflag"

	"github.com/torus-storage/torus/internal/cli"
)

// volumeFlags are the volume sources shared by serve, attach and recover.
type volumeFlags struct {
	fs    *pflag.FlagSet
	store string
	size  cli.Size
}

func (v *volumeFlags) register(fs *pflag.FlagSet) {
	v.fs = fs
	fs.StringVar(&v.store, "store", "", "local volume: `DIR` of the local store (created if absent), or a block device")
	fs.Var(&v.size, "size", "local volume: volume size, e.g. 10GiB (a multiple of 4 KiB)")
}

// given reports whether any of the flags was given.
func (v *volumeFlags) given() bool { return v.store != "" || v.fs.Changed("size") }

// complete reports whether both flags were given.
func (v *volumeFlags) complete() bool { return v.store != "" && v.fs.Changed("size") }

// parse checks the flags and returns the store path and the size.
func (v *volumeFlags) parse() (string, int64, error) {
	if !v.complete() {
		return "", 0, cli.Usagef("--store and --size are required (example: --store /var/lib/torus/vol0 --size 10GiB)")
	}
	if v.size <= 0 || v.size%4096 != 0 {
		return "", 0, cli.Usagef("--size %s: must be a positive multiple of 4 KiB", &v.size)
	}
	path, err := storePath(v.store)
	return path, int64(v.size), err
}
