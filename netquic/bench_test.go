package netquic

import (
	"github.com/torus-storage/torus/iouring"

	"context"
	"fmt"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// benchHandler: op 1 echoes the request; op 2 acknowledges with an empty
// payload (a write); op 3 answers with a 4 KiB payload (a read).
var benchHandler = HandlerFunc(func(r *ServerRequest) {
	switch r.Code {
	case 2:
		_ = r.Reply(0, nil, nil)
	case 3:
		b, _ := r.Buffer(4096)
		_ = r.Reply(0, nil, b)
	default:
		_ = r.Reply(0, &r.Header, r.Payload)
	}
})

// uringBench serves benchHandler on a unix connection's ring (the node's
// path for its own host), with a driver that has no work of its own.
type uringBench struct{ Handler }

func (uringBench) AttachUring(*iouring.Uring) (UringDriver, error) { return idleDriver{}, nil }

type idleDriver struct{}

func (idleDriver) Owns(ud uint64) bool { return ud>>56 != 0 }
func (idleDriver) Handle(*iouring.CQE) {}
func (idleDriver) Poll()               {}
func (idleDriver) Sleep() bool         { return true }
func (idleDriver) Woke()               {}
func (idleDriver) Release() error      { return nil }

// benchTransports are the transports, plus "unix-ring": the unix transport
// with a UringHandler, so the connection is served on its own io_uring.
var benchTransports = append(append([]string(nil), transports...), "unix-ring")

func benchPair(tb testing.TB, tr string) *Client {
	p := newPKI(tb)
	var h Handler = benchHandler
	if tr == "unix-ring" {
		tr, h = TransportUnix, uringBench{benchHandler}
	}
	_, cli := startPair(tb, p, tr, h)
	if err := callOnce(cli, 10*time.Second); err != nil {
		tb.Fatal(err)
	}
	return cli
}

// rtt runs n QD1 calls of op with a reqLen payload and returns the sorted
// latencies.
func rtt(tb testing.TB, cli *Client, op uint8, reqLen, n int, lat []time.Duration) []time.Duration {
	ctx := context.Background()
	req := Message{Code: op, Payload: make([]byte, reqLen)}
	resp := Message{Payload: make([]byte, 8192)}
	lat = lat[:0]
	for range n {
		t0 := time.Now()
		resp.Payload = resp.Payload[:cap(resp.Payload)]
		if err := cli.Call(ctx, &req, &resp); err != nil {
			tb.Fatal(err)
		}
		lat = append(lat, time.Since(t0))
	}
	slices.Sort(lat)
	return lat
}

func pct(lat []time.Duration, p float64) time.Duration {
	if len(lat) == 0 {
		return 0
	}
	return lat[min(len(lat)-1, int(float64(len(lat))*p))]
}

// parallel runs workers callers of op with a reqLen payload for d (or n
// calls in all when n > 0) and returns the calls done and the time taken.
func parallel(tb testing.TB, cli *Client, workers int, op uint8, reqLen int, d time.Duration, n int64) (int64, time.Duration) {
	var done atomic.Int64
	var wg sync.WaitGroup
	var failed atomic.Value
	start := time.Now()
	stop := start.Add(d)
	for range workers {
		wg.Go(func() {
			req := Message{Code: op, Payload: make([]byte, reqLen)}
			resp := Message{Payload: make([]byte, reqLen+4096)}
			for {
				if n > 0 {
					if done.Add(1) > n {
						return
					}
				} else if time.Now().After(stop) {
					return
				}
				resp.Payload = resp.Payload[:cap(resp.Payload)]
				if err := cli.Call(context.Background(), &req, &resp); err != nil {
					failed.Store(err)
					return
				}
				if n <= 0 {
					done.Add(1)
				}
			}
		})
	}
	wg.Wait()
	if err, ok := failed.Load().(error); ok {
		tb.Fatal(err)
	}
	c := done.Load()
	if n > 0 {
		c = n
	}
	return c, time.Since(start)
}

// BenchmarkRTT4K is one caller (QD1) reading 4 KiB: a request with no
// payload answered by 4 KiB. Reports p50/p99 latency and allocs/op.
func BenchmarkRTT4K(b *testing.B) {
	for _, tr := range benchTransports {
		b.Run(tr, func(b *testing.B) {
			cli := benchPair(b, tr)
			lat := make([]time.Duration, 0, b.N)
			rtt(b, cli, 3, 0, 100, lat) // warm up
			b.ReportAllocs()
			b.ResetTimer()
			lat = rtt(b, cli, 3, 0, b.N, lat)
			b.StopTimer()
			b.ReportMetric(float64(pct(lat, 0.5).Microseconds()), "p50-µs")
			b.ReportMetric(float64(pct(lat, 0.99).Microseconds()), "p99-µs")
		})
	}
}

// BenchmarkEcho4K is QD1 with 4 KiB each way (a 4 KiB write with data echoed).
func BenchmarkEcho4K(b *testing.B) {
	for _, tr := range benchTransports {
		b.Run(tr, func(b *testing.B) {
			cli := benchPair(b, tr)
			lat := make([]time.Duration, 0, b.N)
			rtt(b, cli, 1, 4096, 100, lat)
			b.ReportAllocs()
			b.SetBytes(8192)
			b.ResetTimer()
			lat = rtt(b, cli, 1, 4096, b.N, lat)
			b.StopTimer()
			b.ReportMetric(float64(pct(lat, 0.5).Microseconds()), "p50-µs")
			b.ReportMetric(float64(pct(lat, 0.99).Microseconds()), "p99-µs")
		})
	}
}

// BenchmarkQD32Read4K is 32 concurrent callers reading 4 KiB.
func BenchmarkQD32Read4K(b *testing.B) {
	for _, tr := range benchTransports {
		b.Run(tr, func(b *testing.B) {
			cli := benchPair(b, tr)
			b.ReportAllocs()
			b.ResetTimer()
			n, d := parallel(b, cli, 32, 3, 0, 0, int64(b.N))
			b.ReportMetric(float64(n)/d.Seconds(), "ops/s")
		})
	}
}

// BenchmarkBulk1M is 8 concurrent callers writing 1 MiB each (pipelined).
func BenchmarkBulk1M(b *testing.B) {
	for _, tr := range transports {
		b.Run(tr, func(b *testing.B) {
			cli := benchPair(b, tr)
			b.ReportAllocs()
			b.SetBytes(1 << 20)
			b.ResetTimer()
			n, d := parallel(b, cli, 8, 2, 1<<20, 0, int64(b.N))
			b.ReportMetric(float64(n)*8*(1<<20)/d.Seconds()/1e9, "Gbit/s")
		})
	}
}

// TestReport prints QUIC against TLS-over-TCP on loopback with the same
// framing. Each figure takes well under a second; run it several times on a
// loaded machine.
func TestReport(t *testing.T) {
	d := 500 * time.Millisecond
	if testing.Short() {
		d = 100 * time.Millisecond
	}
	type row struct {
		tr                       string
		p50, p99, ep50           time.Duration
		qd32, gbit               float64
		allocsRead, allocsEcho4K float64
	}
	var rows []row
	for _, tr := range transports {
		cli := benchPair(t, tr)
		lat := make([]time.Duration, 0, 100000)
		rtt(t, cli, 3, 0, 200, lat)
		var r row
		r.tr = tr
		// QD1 4 KiB read, for d.
		n := 0
		for start := time.Now(); time.Since(start) < d; n += 500 {
			lat = append(lat, rtt(t, cli, 3, 0, 500, make([]time.Duration, 0, 500))...)
		}
		slices.Sort(lat)
		r.p50, r.p99 = pct(lat, 0.5), pct(lat, 0.99)
		el := rtt(t, cli, 1, 4096, 2000, make([]time.Duration, 0, 2000))
		r.ep50 = pct(el, 0.5)
		ops, dur := parallel(t, cli, 32, 3, 0, d, 0)
		r.qd32 = float64(ops) / dur.Seconds()
		ops, dur = parallel(t, cli, 8, 2, 1<<20, d, 0)
		r.gbit = float64(ops) * 8 * (1 << 20) / dur.Seconds() / 1e9
		r.allocsRead = allocsPerCall(t, cli, &Message{Code: 3})
		r.allocsEcho4K = allocsPerCall(t, cli, &Message{Code: 1, Payload: make([]byte, 4096)})
		rows = append(rows, r)
	}
	w := os.Stdout
	if u, err := listenUDP("127.0.0.1:0", 7<<20, quiet); err == nil {
		rcv, snd, err := setUDPBuffers(u, 7<<20)
		fmt.Fprintf(w, "\nUDP socket buffers obtained: rcv %d snd %d (wanted %d) %v\n", rcv, snd, 7<<20, err)
		u.Close()
	}
	fmt.Fprintf(w, "\n%-5s %12s %12s %14s %12s %12s %10s %10s\n", "", "4K-read p50", "4K-read p99", "4K-echo p50", "QD32 ops/s", "1MiB Gbit/s", "allocs/rd", "allocs/wr")
	for _, r := range rows {
		fmt.Fprintf(w, "%-5s %12v %12v %14v %12.0f %12.2f %10.1f %10.1f\n", r.tr, r.p50.Round(time.Microsecond), r.p99.Round(time.Microsecond),
			r.ep50.Round(time.Microsecond), r.qd32, r.gbit, r.allocsRead, r.allocsEcho4K)
	}
}

// allocsPerCall is the average number of allocations of one Call (client
// and server together, as both run in this process).
func allocsPerCall(t *testing.T, cli *Client, req *Message) float64 {
	resp := Message{Payload: make([]byte, 8192)}
	ctx := context.Background()
	return testing.AllocsPerRun(500, func() {
		resp.Payload = resp.Payload[:cap(resp.Payload)]
		if err := cli.Call(ctx, req, &resp); err != nil {
			t.Fatal(err)
		}
	})
}
