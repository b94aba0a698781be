package devetcd

import (
	"context"
	"errors"
	"net"
	"syscall"
	"testing"
)

// TestPortTaken: a port the caller gives is never swapped for
// another, and its bind error says "address in use" (errors.Is), which is
// what Start retries on when it picked the ports itself.
func TestPortTaken(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	_, err = Start(context.Background(), t.TempDir(), "", "http://"+l.Addr().String())
	if !errors.Is(err, syscall.EADDRINUSE) {
		t.Fatalf("Start on a taken peer port: %v, want EADDRINUSE", err)
	}
	us, err := freeURLs(3, "http://"+l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	if us[0] == us[1] || us[1] == us[2] || us[0] == us[2] {
		t.Fatalf("freeURLs gave a port twice: %v", us)
	}
}
