// Package unixsock listens on unix socket paths the way a server restarted
// after a crash needs: a stale socket file (nobody accepts on it) is
// replaced, while a live socket or any other file in the way is refused.
package unixsock

import (
	"errors"
	"fmt"
	"net"
	"os"
	"syscall"
	"time"
)

// ErrNotSocket is wrapped by Listen's error when something other than a
// socket exists at the path.
var ErrNotSocket = errors.New("exists and is not a socket")

// Listen listens on the unix socket path. When a socket file is already
// there and a connection to it succeeds, another process serves it and the
// error wraps syscall.EADDRINUSE; a socket file nobody accepts on is
// removed first; any other file makes the error wrap ErrNotSocket and is
// left alone. Closing the listener removes the socket file.
func Listen(path string) (*net.UnixListener, error) {
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode().Type() != os.ModeSocket {
			return nil, fmt.Errorf("%s %w", path, ErrNotSocket)
		}
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("%s is in use by another process: %w", path, syscall.EADDRINUSE)
		}
		if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("remove stale socket %s: %w", path, err)
		}
	}
	return net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
}
