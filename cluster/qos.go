package cluster

// QoS of an attached volume: the limits of its record (meta.QoS) enforced
// on every request a frontend submits (internal/qos), and changed live when
// the record changes.
//
// Invariants:
//   - Every request submitted to an Attached passes its limiter
//     (Attached.Submit). The holder's own work (rebuild, rebalance, scrub)
//     calls the Volume directly: QoS limits what the volume's user does, and
//     that work has its own rate (Options.RebuildRate).
//   - The limits in force are those of the record as last read: at Attach,
//     then every change delivered by meta.WatchQoS, applied without
//     re-attaching, to requests already waiting too.
//   - The watch is a service (stopped before the volume closes); the
//     limiter is closed after it, which passes what it holds to the volume,
//     and the volume's Close then waits for those requests like any other.

import (
	"context"
	"time"

	"github.com/torus-storage/torus/engine"
	"github.com/torus-storage/torus/internal/qos"
	"github.com/torus-storage/torus/meta"
)

// QoSStats are the QoS limits in force on an attached volume and what they
// held back since Attach.
type QoSStats struct {
	// Limits are the limits in force (the zero QoS: unlimited).
	Limits meta.QoS
	// ReadThrottled and WriteThrottled count requests that waited for a
	// limit (writes include discard and write-zeroes).
	ReadThrottled, WriteThrottled uint64
	// ReadThrottledTime and WriteThrottledTime add up how long they
	// waited.
	ReadThrottledTime, WriteThrottledTime time.Duration
	// Queued is the number of requests waiting now.
	Queued int
}

// qosLimits converts a record's QoS to the limiter's Limits.
func qosLimits(q meta.QoS) qos.Limits {
	return qos.Limits{ReadIOPS: q.ReadIOPS, WriteIOPS: q.WriteIOPS, ReadBPS: q.ReadBPS, WriteBPS: q.WriteBPS,
		Burst: q.Burst()}
}

// startQoS puts the limits of the record read at Attach in force and
// starts watching the record; ms is the client Attach was given.
func (a *Attached) startQoS(ms *meta.Client) {
	a.qos = qos.New(a.Volume, qosLimits(a.info.QoS))
	a.qosRecord.Store(&a.info.QoS)
	if !a.info.QoS.Unlimited() {
		a.log.Info("qos limits", qosAttrs(a.info.Name, a.info.QoS)...)
	}
	a.svcWG.Go(func() { a.watchQoS(a.svcCtx, ms) })
}

// watchQoS applies every change of the volume's QoS until ctx is done.
func (a *Attached) watchQoS(ctx context.Context, ms *meta.Client) {
	for q := range ms.WatchQoS(ctx, a.info.ID) {
		if q == *a.qosRecord.Load() {
			continue
		}
		a.qos.SetLimits(qosLimits(q))
		a.qosRecord.Store(&q)
		a.log.Info("qos limits changed", qosAttrs(a.info.Name, q)...)
	}
}

// qosAttrs are the log attributes of q on volume name.
func qosAttrs(name string, q meta.QoS) []any {
	return []any{"volume", name, "read_iops", q.ReadIOPS, "write_iops", q.WriteIOPS,
		"read_bps", q.ReadBPS, "write_bps", q.WriteBPS, "burst", q.Burst()}
}

// Submit starts r once the volume's QoS limits admit it (at once when
// they are not reached, and always for a flush). It never waits for the
// limit: a request held back is queued and passed on by a timer, in
// submission order per direction.
func (a *Attached) Submit(r *engine.Request) { a.qos.Submit(r) }

// QoSStats returns the QoS limits in force and what they held back.
func (a *Attached) QoSStats() QoSStats {
	st := a.qos.Stats()
	return QoSStats{
		Limits:            *a.qosRecord.Load(),
		ReadThrottled:     st.Read.Throttled,
		WriteThrottled:    st.Write.Throttled,
		ReadThrottledTime: st.Read.ThrottledTime, WriteThrottledTime: st.Write.ThrottledTime,
		Queued: st.Read.Queued + st.Write.Queued,
	}
}
