//go:build !faults

package store

// powerLog is the power-loss fault hook of builds with -tags faults
// (powerloss_faults.go). This build has none: nothing is recorded and a
// restart never undoes a write.
type powerLog struct{}

func undoPowerLoss(string) error             { return nil }
func (s *Store) armPowerLog() error          { return nil }
func (s *Store) plWrite(off uint64, n int64) {}
func (s *Store) plSynced(epoch uint64)       {}

// PowerLossSimulated reports whether this start follows a power loss
// simulated by the fault hook; always false without the faults build tag.
func PowerLossSimulated() bool { return false }
