//go:build faults

package netquic

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestFaultHookPartitions checks the fault hook on both ends: an endpoint
// whose fault file says "drop" neither answers nor sends, calls through it
// time out, and the same connection works again once the file is cleared.
func TestFaultHookPartitions(t *testing.T) {
	for _, side := range []string{"server", "client"} {
		t.Run(side, func(t *testing.T) {
			p := newPKI(t)
			file := filepath.Join(t.TempDir(), "faults")
			set := func(s string) {
				if err := os.WriteFile(file, []byte(s), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			set("")
			// The hook is armed for endpoints opened while the variable is
			// set: only the side under test gets it.
			var srv *Server
			var err error
			if side == "server" {
				t.Setenv(FaultsEnv, file)
			}
			srv, err = Listen("127.0.0.1:0", p.srvTLS.Server, echo, &Options{Logger: quiet})
			if err != nil {
				t.Fatal(err)
			}
			defer srv.Close()
			t.Setenv(FaultsEnv, "")
			if side == "client" {
				t.Setenv(FaultsEnv, file)
			}
			cli, err := NewClient(srv.Addr().String(), p.cliTLS.Client, &Options{Logger: quiet})
			if err != nil {
				t.Fatal(err)
			}
			defer cli.Close()
			call := func(d time.Duration) error {
				ctx, cancel := context.WithTimeout(context.Background(), d)
				defer cancel()
				resp := Message{Payload: make([]byte, 16)}
				return cli.Call(ctx, &Message{Code: 1, Payload: []byte("ping")}, &resp)
			}
			if err := call(5 * time.Second); err != nil {
				t.Fatalf("call before the fault: %v", err)
			}
			set("drop")
			time.Sleep(3 * faultPoll)
			for i := range 3 {
				if err := call(500 * time.Millisecond); err == nil {
					t.Fatalf("call %d through a %s that drops every datagram succeeded", i, side)
				}
			}
			set("")
			deadline := time.Now().Add(20 * time.Second)
			for {
				err := call(2 * time.Second)
				if err == nil {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("calls still fail 20 s after the fault was cleared: %v", err)
				}
			}
		})
	}
}
