package main

// Companions of a served cluster volume: the periodic scrub
// (--scrub-interval) and the Prometheus endpoint (--metrics HOST:PORT).
// Both run in cluster.Attached (cluster/attach.go, cluster/metrics.go keep
// their invariants); this file holds their flags.

import (
	"time"

	"github.com/spf13/pflag"

	"github.com/torus-storage/torus/internal/cli"
)

// serviceFlags configure the services that run beside a cluster volume: the
// periodic scrub and the metrics endpoint. The zero value runs neither.
type serviceFlags struct {
	metrics       string
	scrubInterval time.Duration
}

func (e *serviceFlags) register(fs *pflag.FlagSet) {
	fs.StringVar(&e.metrics, "metrics", "", "cluster volume: serve Prometheus metrics on `HOST:PORT` (/metrics)")
	fs.DurationVar(&e.scrubInterval, "scrub-interval", 24*time.Hour, "cluster volume: verify every replica this often (first run one interval after attach); 0 turns scrubbing off")
}

// check validates the flags; local says the volume is not a cluster volume.
func (e *serviceFlags) check(local bool) error {
	if e.scrubInterval < 0 {
		return cli.Usagef("--scrub-interval %v: want a duration >= 0 (0 = off)", e.scrubInterval)
	}
	if local && e.metrics != "" {
		return cli.Usagef("--metrics is for cluster volumes (a local volume has no replicas to report on)")
	}
	return nil
}
