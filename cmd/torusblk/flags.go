package main

import (
	"errors"
	"fmt"

	"github.com/spf13/pflag"

	"github.com/torus-storage/torus/internal/units"
)

// volumeFlags are the volume sources shared by serve, attach and recover.
type volumeFlags struct {
	store, size string
}

func (v *volumeFlags) register(fs *pflag.FlagSet) {
	fs.StringVar(&v.store, "store", "", "directory of the local store (created if absent), or a block device")
	fs.StringVar(&v.size, "size", "", "volume size, e.g. 10GiB (a multiple of 4 KiB)")
}

// parse checks the flags and returns the store path and the size.
func (v *volumeFlags) parse() (string, int64, error) {
	if v.store == "" || v.size == "" {
		return "", 0, fmt.Errorf("%w: --store and --size are required (example: --store /var/lib/torus/vol0 --size 10GiB)", errUsage)
	}
	size, err := units.ParseSize(v.size)
	if err != nil {
		return "", 0, fmt.Errorf("%w: --size: %v", errUsage, err)
	}
	if size <= 0 || size%4096 != 0 {
		return "", 0, fmt.Errorf("%w: --size %s: must be a positive multiple of 4 KiB", errUsage, v.size)
	}
	path, err := storePath(v.store)
	return path, size, err
}

func parseFlags(fs *pflag.FlagSet, args []string) (bool, error) {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			return true, nil
		}
		return false, fmt.Errorf("%w: %v", errUsage, err)
	}
	return false, nil
}
