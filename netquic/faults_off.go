//go:build !faults

package netquic

import (
	"log/slog"
	"net"
)

// faultPacketConn returns c: the fault hook (faults.go) exists only in
// builds with -tags faults, so a production build cannot enable it.
func faultPacketConn(c *net.UDPConn, _ *slog.Logger) net.PacketConn { return c }
