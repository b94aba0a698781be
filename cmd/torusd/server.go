package main

import (
	"log/slog"

	"github.com/torus-storage/torus/engine"
	"github.com/torus-storage/torus/netquic"
)

// nodeStats are the data-path counters a node exports as metrics.
type nodeStats = engine.NodeStats

// chunkServer serves a store's chunks over netquic.
type chunkServer interface {
	netquic.Handler
	// RaiseEpoch fences writers of volume carrying an epoch below e.
	RaiseEpoch(volume, e uint64)
	// Stats returns the data-path counters.
	Stats() nodeStats
}

// newChunkServer returns the chunk server of node id over st, answering
// with incarnation inc.
func newChunkServer(st *engine.Store, id string, inc uint64, log *slog.Logger) chunkServer {
	return engine.NewNodeServer(st, engine.NodeServerOptions{NodeID: id, Logger: log, Incarnation: inc})
}
