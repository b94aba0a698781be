package wire

import (
	"errors"

	"github.com/torus-storage/torus/engine"
)

// StatusOf maps the error of a chunk op to the status of its response.
func StatusOf(err error) Status {
	switch {
	case err == nil:
		return StatusOK
	case errors.Is(err, engine.ErrRange):
		return StatusRange
	case errors.Is(err, engine.ErrNoSpace):
		return StatusNoSpace
	case errors.Is(err, engine.ErrChecksum):
		return StatusChecksum
	case errors.Is(err, engine.ErrFenced):
		return StatusStaleEpoch
	case errors.Is(err, engine.ErrNewer):
		return StatusNewer
	}
	return StatusIO
}

// ErrOf maps a response status to the error a volume reports.
func ErrOf(s Status) error {
	switch s {
	case StatusOK:
		return nil
	case StatusRange:
		return engine.ErrRange
	case StatusNoSpace:
		return engine.ErrNoSpace
	case StatusChecksum:
		return engine.ErrChecksum
	case StatusStaleEpoch:
		return engine.ErrFenced
	case StatusBadRequest:
		return ErrBadRequest
	case StatusNewer:
		return engine.ErrNewer
	}
	return ErrNodeIO
}

// Errors of statuses with no engine error.
var (
	// ErrNodeIO is StatusIO: the node failed the op (its log says why).
	ErrNodeIO = errors.New("wire: I/O error on the storage node (see its log)")
	// ErrBadRequest is StatusBadRequest: the node could not parse the
	// request.
	ErrBadRequest = errors.New("wire: storage node refused a malformed request (client and node versions differ?)")
)
