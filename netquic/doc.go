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
// Every frame is a 64-byte header (FrameHeaderSize: magic/version, kind,
// op or status, a reserved byte, request id, payload length, and
// UserHeaderSize = 48 caller-defined bytes such as chunk id, offset and
// epoch) and a payload of at most Options.MaxPayload bytes
// (DefaultMaxPayload unless configured). The transport never interprets op,
// status or the caller's header.
//
// Options.Transport "tcp" runs the same framing over TLS 1.3 on TCP (one
// connection per stream), for comparison and as a fallback where UDP is
// blocked; "unix" runs it without TLS over a unix socket, for a client on
// the node's own machine. A Server whose Handler is a UringHandler serves a
// unix connection on one io_uring thread that also runs the handler's I/O
// (uringserve.go).
//
// Bulk over QUIC is bound by per-packet cost (1452-byte packets, a
// sendmsg/recvmmsg and an AES-GCM seal/open each), so GSO matters, and the
// header and a small payload go out in one stream Write, not two. The code
// of this package allocates nothing per request (TestZeroAlloc, over
// in-memory pipes); quic-go allocates per datagram and crypto/tls per
// record read. go test -run TestReport -v prints
// round-trip latency, QD32 throughput and bulk bandwidth of each transport;
// bench/README.md has the figures.
package netquic
