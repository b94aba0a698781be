// Package cluster is the replicated volume: an engine.Volume whose chunks
// live on R storage nodes placed by the consistent-hash ring in etcd. A write
// goes to every owner in parallel over QUIC (or a node's unix socket) and
// completes once on every live owner's device, with a missed mark in etcd for
// any owner that failed; a read goes to one owner, never a marked or stale
// one. The holder of a volume (a client, or a node's maintenance job) also
// rebuilds marked chunks, moves chunks after ring changes and scrubs.
//
// Open a volume with Open under an attach epoch (meta.Client.Attach).
package cluster
