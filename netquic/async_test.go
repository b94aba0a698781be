package netquic

import (
	"bytes"
	"errors"
	"fmt"
	"testing"
	"time"
)

// chanDone collects asynchronous completions.
type chanDone chan error

func (c chanDone) CallDone(_ *Message, err error) { c <- err }

// TestGo runs asynchronous calls over both transports: many in flight at
// once with their responses matched, and calls to a slow handler that time
// out while later calls still work.
func TestGo(t *testing.T) {
	p := newPKI(t)
	for _, tr := range transports {
		t.Run(tr, func(t *testing.T) {
			_, cli := startPair(t, p, tr, slowEcho)
			const n = 100
			reqs := make([]Message, n)
			resps := make([]Message, n)
			done := make(chanDone, n)
			for i := range reqs {
				reqs[i] = Message{Code: 1, Payload: []byte(fmt.Sprintf("call %d", i))}
				resps[i] = Message{Payload: make([]byte, 64)}
				cli.Go(&reqs[i], &resps[i], time.Now().Add(5*time.Second), done)
			}
			for range n {
				if err := <-done; err != nil {
					t.Fatal(err)
				}
			}
			for i := range resps {
				if !bytes.Equal(resps[i].Payload, reqs[i].Payload) || resps[i].Code != 2 {
					t.Fatalf("call %d: response %d %q", i, resps[i].Code, resps[i].Payload)
				}
			}
			// Code 9 sleeps 1 s in the handler: these time out, and their
			// late responses must not land in their buffers.
			slow := make([]Message, 5)
			for i := range slow {
				slow[i] = Message{Payload: make([]byte, 64)}
				cli.Go(&Message{Code: 9, Payload: []byte("late")}, &slow[i], time.Now().Add(50*time.Millisecond), done)
			}
			for range slow {
				if err := <-done; !errors.Is(err, ErrTimeout) {
					t.Fatalf("slow call: err %v, want ErrTimeout", err)
				}
			}
			time.Sleep(1200 * time.Millisecond) // the late responses arrive and are drained
			for i := range slow {
				if len(slow[i].Payload) != 64 || slow[i].Payload[0] != 0 {
					t.Fatalf("late response written into an expired call's buffer: %q", slow[i].Payload)
				}
			}
			r := Message{Payload: make([]byte, 64)}
			cli.Go(&Message{Code: 1, Payload: []byte("after")}, &r, time.Now().Add(5*time.Second), done)
			if err := <-done; err != nil || string(r.Payload) != "after" {
				t.Fatalf("call after timeouts: %v %q", err, r.Payload)
			}
		})
	}
}

// TestGoConnLost: calls in flight when the server goes away complete with
// ErrConnLost.
func TestGoConnLost(t *testing.T) {
	p := newPKI(t)
	srv, cli := startPair(t, p, TransportTCP, slowEcho)
	done := make(chanDone, 1)
	r := Message{Payload: make([]byte, 64)}
	cli.Go(&Message{Code: 1, Payload: []byte("x")}, &r, time.Time{}, done)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	cli.Go(&Message{Code: 9, Payload: []byte("x")}, &r, time.Time{}, done)
	time.Sleep(100 * time.Millisecond)
	srv.Close()
	select {
	case err := <-done:
		if !errors.Is(err, ErrConnLost) {
			t.Fatalf("err %v, want ErrConnLost", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("call in flight never completed after the server closed")
	}
}
