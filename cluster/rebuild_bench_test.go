package cluster

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/torus-storage/torus/engine"
	"github.com/torus-storage/torus/internal/voltest"
)

// BenchmarkRebuildImpact measures how much foreground I/O a rebuild leaves:
// 4 KiB random reads and writes at QD8 on an R=3 volume, for one second
// with every node healthy and one second during the rebuild of a node that
// missed a 24 MiB region (at the default RebuildRate). Reported: fg-iops-before, fg-iops-during and their ratio
// (fg-kept), and the rebuild's MiB/s. Not a test: it asserts nothing about
// speed.
func BenchmarkRebuildImpact(b *testing.B) {
	for _, rate := range []int64{4 << 20, DefaultRebuildRate} {
		b.Run(fmt.Sprintf("rate=%dMiB", rate>>20), func(b *testing.B) { benchRebuildImpact(b, rate) })
	}
}

func benchRebuildImpact(b *testing.B, rate int64) {
	for b.Loop() {
		tc := startCluster(b, 3, 1024)
		const size = 48 << 20
		vol := tc.volume("impact", size, 3)
		c, err := Open(context.Background(), tc.ms, vol, Options{TLS: tc.client.Client, Epoch: 1,
			Timeout: time.Second, Logger: quietLog, RebuildRate: rate})
		if err != nil {
			b.Fatal(err)
		}
		big := voltest.Buf(b, 24<<20)
		voltest.Fill(big, 1)
		if err := voltest.Do(c, engine.OpWrite, 0, 0, int64(len(big)), big); err != nil {
			b.Fatal(err)
		}
		before := measure(b, c, size, time.Second)
		down := tc.nodes[2]
		down.srv.Close()
		voltest.Fill(big, 2)
		if err := voltest.Do(c, engine.OpWrite, 0, 0, int64(len(big)), big); err != nil {
			b.Fatal(err)
		}
		tc.serve(down, down.addr)
		for c.Stats().Rebuilt == 0 && c.Stats().Missed > 0 {
			time.Sleep(5 * time.Millisecond)
		}
		start, bytes0 := time.Now(), c.Stats().RebuiltBytes
		during := measure(b, c, size, time.Second)
		rate := float64(c.Stats().RebuiltBytes-bytes0) / time.Since(start).Seconds() / (1 << 20)
		b.ReportMetric(before, "fg-iops-before")
		b.ReportMetric(during, "fg-iops-during")
		b.ReportMetric(during/before, "fg-kept")
		b.ReportMetric(rate, "rebuild-MiB/s")
		c.Close()
	}
}

// measure runs 4 KiB random reads and writes at QD8 on c for d and returns
// the IOPS.
func measure(b *testing.B, c *Volume, size int64, d time.Duration) float64 {
	var ops atomic.Int64
	stop := time.Now().Add(d)
	var wg sync.WaitGroup
	for w := range 8 {
		buf := voltest.Buf(b, engine.BlockSize)
		wg.Go(func() {
			r := rand.New(rand.NewPCG(uint64(w), 9))
			for time.Now().Before(stop) {
				off := r.Int64N(size/engine.BlockSize) * engine.BlockSize
				op := engine.OpRead
				if r.IntN(2) == 0 {
					op = engine.OpWrite
				}
				if err := voltest.Do(c, op, 0, off, engine.BlockSize, buf); err != nil {
					b.Error(err)
					return
				}
				ops.Add(1)
			}
		})
	}
	wg.Wait()
	return float64(ops.Load()) / d.Seconds()
}
