package cluster

import (
	"context"
	"path/filepath"
	"testing"

	"github.com/torus-storage/torus/engine"
	"github.com/torus-storage/torus/internal/voltest"
	"github.com/torus-storage/torus/netquic"
	"github.com/torus-storage/torus/store"
)

const benchSize = 16 << 20

func prefill(b *testing.B, v engine.Volume) {
	big := voltest.Buf(b, 1<<20)
	voltest.Fill(big, 1)
	for off := int64(0); off < benchSize; off += int64(len(big)) {
		if err := voltest.Do(v, engine.OpWrite, 0, off, int64(len(big)), big); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkReplicated compares QD1 (and QD32) 4 KiB random reads and writes
// through a replicated volume (3 nodes, R=3, on loopback, over QUIC and over
// the TCP transport) with the same through a local volume (store.Local) on
// one store.
// Run it under flock /tmp/torus-bench.lock, e.g.
//
//	go test -run XXX -bench Replicated -benchtime 3000x ./cluster/
func BenchmarkReplicated(b *testing.B) {
	for _, op := range []engine.Op{engine.OpRead, engine.OpWrite} {
		for _, qd := range []int{1, 32} {
			name := op.String() + "/QD" + itoa(qd)
			b.Run(name+"/local", func(b *testing.B) {
				l, err := store.OpenLocal(filepath.Join(b.TempDir(), "v.store"), benchSize,
					store.LocalOptions{ChunkSize: testChunk, Shards: 1, Logger: quietLog})
				if err != nil {
					b.Fatal(err)
				}
				defer l.Close()
				prefill(b, l)
				voltest.Bench(b, l, op, qd, benchSize)
			})
			for _, tr := range []string{netquic.TransportQUIC, netquic.TransportTCP} {
				b.Run(name+"/R3-"+tr, func(b *testing.B) { benchCluster(b, op, qd, tr, 3) })
			}
			b.Run(name+"/R1-tcp", func(b *testing.B) { benchCluster(b, op, qd, netquic.TransportTCP, 1) })
		}
	}
}

// benchCluster runs voltest.Bench on a replicated volume with r replicas on 3
// nodes over transport tr.
func benchCluster(b *testing.B, op engine.Op, qd int, tr string, r int) {
	tc := startClusterTransport(b, 3, 512, tr)
	vol := tc.volume("bench", benchSize, r)
	c, err := Open(context.Background(), tc.ms, vol, Options{TLS: tc.client.Client,
		Epoch: 1, Transport: tr, Logger: quietLog})
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	prefill(b, c)
	voltest.Bench(b, c, op, qd, benchSize)
}

func itoa(n int) string {
	if n < 10 {
		return string(rune('0' + n))
	}
	return itoa(n/10) + string(rune('0'+n%10))
}
