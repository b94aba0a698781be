package main

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/pflag"

	"github.com/torus-storage/torus/internal/cli"
	"github.com/torus-storage/torus/internal/units"
	"github.com/torus-storage/torus/meta"
)

// qosFlagsUsage is the synopsis of the QoS flags.
const qosFlagsUsage = "[--read-iops N] [--write-iops N] [--read-bps SIZE] [--write-bps SIZE] [--burst DURATION]"

// qosFlags are the QoS limits of volume create and volume set-qos.
type qosFlags struct {
	fs                  *pflag.FlagSet
	readIOPS, writeIOPS iops
	readBPS, writeBPS   cli.Size
	burst               time.Duration
}

func (f *qosFlags) register(fs *pflag.FlagSet) {
	f.fs = fs
	fs.Var(&f.readIOPS, "read-iops", "QoS: read requests per second (0: unlimited)")
	fs.Var(&f.writeIOPS, "write-iops", "QoS: write, discard and write-zeroes requests per second (0: unlimited)")
	fs.Var(&f.readBPS, "read-bps", "QoS: bytes read per second, e.g. 100MiB (0: unlimited)")
	fs.Var(&f.writeBPS, "write-bps", "QoS: bytes written per second, e.g. 50MiB (0: unlimited)")
	fs.DurationVar(&f.burst, "burst", 0, "QoS: how long an idle volume saves credit above its limits, e.g. 1s (0: requests paced at the limits; at most 1m)")
}

// changed reports whether any QoS flag was given.
func (f *qosFlags) changed() bool {
	for _, n := range []string{"read-iops", "write-iops", "read-bps", "write-bps", "burst"} {
		if f.fs.Changed(n) {
			return true
		}
	}
	return false
}

// apply sets in q the limits whose flags were given, after checking them.
func (f *qosFlags) apply(q *meta.QoS) error {
	if f.burst < 0 {
		return cli.Usagef("--burst %v: must not be negative (0: no burst)", f.burst)
	}
	if f.burst%time.Millisecond != 0 {
		return cli.Usagef("--burst %v: give whole milliseconds (e.g. 250ms, 2s)", f.burst)
	}
	if f.burst > meta.MaxQoSBurst {
		return cli.Usagef("--burst %v: at most %v", f.burst, meta.MaxQoSBurst)
	}
	for _, b := range []struct {
		name string
		v    cli.Size
	}{{"read-bps", f.readBPS}, {"write-bps", f.writeBPS}} {
		if b.v != 0 && b.v < meta.MinQoSBytesPerSecond {
			return cli.Usagef("--%s %s: below %d bytes per second (one 4 KiB block); 0 is unlimited", b.name, &b.v, meta.MinQoSBytesPerSecond)
		}
	}
	set := func(name string, dst *uint64, v uint64) {
		if f.fs.Changed(name) {
			*dst = v
		}
	}
	set("read-iops", &q.ReadIOPS, uint64(f.readIOPS))
	set("write-iops", &q.WriteIOPS, uint64(f.writeIOPS))
	set("read-bps", &q.ReadBPS, uint64(f.readBPS))
	set("write-bps", &q.WriteBPS, uint64(f.writeBPS))
	set("burst", &q.BurstMS, uint64(f.burst/time.Millisecond))
	return nil
}

// iops is a flag value holding a request rate: a whole number, 0 or more.
type iops uint64

// Set implements pflag.Value.
func (n *iops) Set(s string) error {
	if strings.HasPrefix(strings.TrimSpace(s), "-") {
		return fmt.Errorf("%q: must not be negative (0: unlimited)", s)
	}
	v, err := strconv.ParseUint(strings.TrimSpace(s), 10, 64)
	if err != nil {
		return fmt.Errorf("%q: not a whole number of requests per second", s)
	}
	*n = iops(v)
	return nil
}

// String implements pflag.Value.
func (n *iops) String() string { return strconv.FormatUint(uint64(*n), 10) }

// Type implements pflag.Value.
func (n *iops) Type() string { return "N" }

// formatQoS is q as one line: "unlimited", or each direction's limits and
// the burst.
func formatQoS(q meta.QoS) string {
	if q.Unlimited() {
		return "unlimited"
	}
	dir := func(name string, ops, bps uint64) string {
		var parts []string
		if ops != 0 {
			parts = append(parts, fmt.Sprintf("%d IOPS", ops))
		}
		if bps != 0 {
			parts = append(parts, units.FormatSize(int64(bps))+"/s")
		}
		if len(parts) == 0 {
			return name + " unlimited"
		}
		return name + " " + strings.Join(parts, ", ")
	}
	burst := "no burst"
	if q.BurstMS != 0 {
		burst = "burst " + q.Burst().String()
	}
	return dir("read", q.ReadIOPS, q.ReadBPS) + "; " + dir("write", q.WriteIOPS, q.WriteBPS) + "; " + burst
}

func buildVolumeSetQoS(fs *pflag.FlagSet) runFunc {
	var qf qosFlags
	qf.register(fs)
	return func(ctx context.Context, e *env, args []string) error {
		if !qf.changed() {
			return cli.Usagef("give at least one limit to change: %s (0 lifts a limit)", qosFlagsUsage)
		}
		var probe meta.QoS
		if err := qf.apply(&probe); err != nil {
			return err
		}
		return withStore(ctx, e, func(s *meta.Client) error {
			v, err := s.UpdateQoS(ctx, args[0], func(q *meta.QoS) { _ = qf.apply(q) })
			if err != nil {
				return notFound(err)
			}
			if e.g.output == cli.JSON {
				return e.printJSON(volumeResult{Volume: v})
			}
			fmt.Fprintf(e.stdout, "volume %s qos: %s\n", v.Name, formatQoS(v.QoS))
			return nil
		})
	}
}
