// Package netquic is the transport between clients and nodes and between
// nodes: mutually authenticated QUIC (TLS 1.3, ALPN "torus/1", certificates
// from a cluster CA) carrying small binary frames.
//
// Setup:
//
//	NewCA(caDir)                                   // once per cluster
//	IssueCert(caDir, "node1", []string{"10.0.0.1"}, nodeDir)
//	cfg, _ := LoadTLS(nodeDir)                     // cfg.Server, cfg.Client
//
// A Server hands every request to a Handler on the stream's reader
// goroutine; the handler answers with ServerRequest.Reply, at once or later
// from any goroutine (an io_uring completion), so no goroutine is spent per
// request. Request payloads arrive in page-aligned buffers outside the Go
// heap, ready for O_DIRECT.
//
// A Client keeps one connection with a few long-lived streams (a new QUIC
// stream per request costs ~65 µs in quic-go) and pipelines many requests on
// them; responses are matched by id. Call honours its context: when it ends,
// Call returns and the late response is dropped. After the connection fails,
// calls in flight fail with ErrConnLost and the next Call redials. A server
// restarted on the same address and key resets old connections at once
// (QUIC stateless reset derived from the node key).
//
// Every frame is a 48-byte header (magic/version, kind, op or status, id,
// payload length, 32 caller-defined bytes such as chunk id, offset and
// epoch) and a payload of at most Options.MaxPayload bytes. The transport
// never interprets op, status or the caller's header.
//
// Options.Transport "tcp" runs the same framing over TLS 1.3 on TCP (one
// connection per stream), for comparison and as a fallback where UDP is
// blocked.
//
// Measured on the 2-core development machine while other engineers were
// compiling (load 5–12; go test -run TestReport -v and go test -bench .;
// loopback, client and server in one process; spread over several runs):
//
//	                 QUIC             TLS 1.3/TCP, same framing
//	4K read QD1 p50  46–73 µs         22–27 µs
//	4K read QD1 p99  0.23–1.2 ms      43–316 µs
//	4K echo QD1 p50  70–105 µs        24–33 µs
//	4K read QD32     6k–32k ops/s     30k–56k ops/s
//	1 MiB writes x8  0.2–2.3 Gbit/s   1.2–6.7 Gbit/s
//	allocs/round trip 24 (read), 36 (echo)   2
//
// Bulk over QUIC is bound by per-packet cost (1452-byte packets, a
// sendmsg/recvmmsg and an AES-GCM seal/open each; syscalls are ~40% of the
// CPU profile) and is the first figure to fall under load. GSO matters:
// without it (QUIC_GO_DISABLE_GSO) bulk drops to ≈0.6 Gbit/s. Writing the
// header and a small payload in one stream Write instead of two cuts the
// 4K echo p50 from ≈110 µs to ≈70 µs. ECN off and GOGC=400 made no
// measurable difference; more streams or callers than 4 and 8 did not help.
// The code of this package allocates nothing per request (TestZeroAlloc, over
// in-memory pipes); the allocations above are quic-go's (x/net address
// parsing per received datagram, sockaddr per send, stream frames) and
// crypto/tls's (one per record read).
package netquic
