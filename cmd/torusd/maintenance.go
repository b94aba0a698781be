package main

import (
	"context"

	"github.com/torus-storage/torus/cluster"
	"github.com/torus-storage/torus/meta"
	"github.com/torus-storage/torus/node"
)

// openMaintenance opens a replicated volume for a node's maintenance job: the
// client's own machinery (package cluster) rebuilds and moves its chunks.
func openMaintenance(ctx context.Context, ms *meta.Client, vol meta.Volume, o node.MaintenanceOptions) (node.MaintenanceJob, error) {
	v, err := cluster.Open(ctx, ms, vol, cluster.Options{
		TLS: o.TLS, Epoch: o.Epoch, LocalNode: o.LocalNode, Logger: o.Logger, RebuildRate: o.RebuildRate, Holder: o.Holder,
	})
	if err != nil {
		return nil, err
	}
	return maintenanceJob{v}, nil
}

// maintenanceJob is a replicated volume as a node.MaintenanceJob.
type maintenanceJob struct{ *cluster.Volume }

// Pending implements node.MaintenanceJob.
func (j maintenanceJob) Pending() (bool, uint64, int64) {
	st := j.Stats()
	return st.Missed > 0 || st.Moving || st.Flattening, st.Rebuilt, st.MoveCopies
}
