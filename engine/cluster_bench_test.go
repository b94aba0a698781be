package engine

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/torus-storage/torus/netquic"
)

// benchVolume keeps qd random 4 KiB requests of op in flight on v (whose
// first size bytes were written) until b.N completed, and reports IOPS; at
// QD1 ns/op is the mean latency of one request.
func benchVolume(b *testing.B, v Volume, op Op, qd int, size int64) {
	lp := &benchLoop{v: v, n: int64(b.N), fin: make(chan struct{}), blocks: uint64(size / BlockSize)}
	reqs := make([]benchReq, qd)
	for i := range reqs {
		q := &reqs[i]
		q.lp, q.rng = lp, uint64(i)*0x9e3779b97f4a7c15+1
		q.Op, q.Length, q.Buf, q.Done = op, BlockSize, abuf(b, BlockSize), q
		fill(q.Buf, uint64(i))
	}
	b.ReportAllocs()
	b.ResetTimer()
	start := time.Now()
	for i := range reqs {
		if lp.issued.Add(1) > lp.n {
			break
		}
		reqs[i].next()
		v.Submit(&reqs[i].Request)
	}
	<-lp.fin
	el := time.Since(start)
	b.StopTimer()
	if e := lp.errs.Load(); e != 0 {
		b.Fatalf("%d requests failed", e)
	}
	b.ReportMetric(float64(b.N)/el.Seconds(), "IOPS")
}

const benchSize = 16 << 20

func prefill(b *testing.B, v Volume) {
	big := abuf(b, 1<<20)
	fill(big, 1)
	for off := int64(0); off < benchSize; off += int64(len(big)) {
		if err := do(v, OpWrite, 0, off, int64(len(big)), big); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkReplicated compares QD1 (and QD32) 4 KiB random reads and writes
// through a Cluster volume (3 nodes, R=3, on loopback, over QUIC and over
// the TCP transport) with the same through a Local volume on one store.
// Run it under flock /tmp/torus-bench.lock, e.g.
//
//	go test -run XXX -bench Replicated -benchtime 3000x ./engine/
func BenchmarkReplicated(b *testing.B) {
	for _, op := range []Op{OpRead, OpWrite} {
		for _, qd := range []int{1, 32} {
			name := op.String() + "/QD" + itoa(qd)
			b.Run(name+"/local", func(b *testing.B) {
				l, err := OpenLocal(filepath.Join(b.TempDir(), "v.store"), benchSize,
					LocalOptions{ChunkSize: testChunk, Shards: 1, Logger: quietLog})
				if err != nil {
					b.Fatal(err)
				}
				defer l.Close()
				prefill(b, l)
				benchVolume(b, l, op, qd, benchSize)
			})
			for _, tr := range []string{netquic.TransportQUIC, netquic.TransportTCP} {
				b.Run(name+"/R3-"+tr, func(b *testing.B) { benchCluster(b, op, qd, tr, 3) })
			}
			b.Run(name+"/R1-tcp", func(b *testing.B) { benchCluster(b, op, qd, netquic.TransportTCP, 1) })
		}
	}
}

// benchCluster runs benchVolume on a Cluster volume with r replicas on 3
// nodes over transport tr.
func benchCluster(b *testing.B, op Op, qd int, tr string, r int) {
	tc := startClusterTransport(b, 3, 512, tr)
	vol := tc.volume("bench", benchSize, r)
	c, err := OpenCluster(context.Background(), tc.ms, vol, ClusterOptions{TLS: tc.client.Client,
		Epoch: 1, Transport: tr, Logger: quietLog})
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	prefill(b, c)
	benchVolume(b, c, op, qd, benchSize)
}

func itoa(n int) string {
	if n < 10 {
		return string(rune('0' + n))
	}
	return itoa(n/10) + string(rune('0'+n%10))
}
