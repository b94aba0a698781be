package main

import (
	"context"

	"github.com/torus-storage/torus/cluster"
	"github.com/torus-storage/torus/meta"
	"github.com/torus-storage/torus/node"
)

// openRepair opens a replicated volume for a node's maintenance job: the
// client's own machinery (package cluster) rebuilds and moves its chunks.
func openRepair(ctx context.Context, ms *meta.Client, vol meta.Volume, o node.RepairOptions) (node.Repair, error) {
	v, err := cluster.Open(ctx, ms, vol, cluster.Options{
		TLS: o.TLS, Epoch: o.Epoch, LocalNode: o.LocalNode, Logger: o.Logger, RebuildRate: o.RebuildRate, Holder: o.Holder,
	})
	if err != nil {
		return nil, err
	}
	return repairJob{v}, nil
}

// repairJob is a replicated volume as a node.Repair.
type repairJob struct{ *cluster.Volume }

// Pending implements node.Repair.
func (j repairJob) Pending() (bool, uint64, int64) {
	st := j.Stats()
	return st.Missed > 0 || st.Moving, st.Rebuilt, st.MoveCopies
}
