// Package devetcd runs a single-member etcd server inside the process, for
// torusd dev and tests. Nothing else links the etcd server: production
// binaries talk to an etcd of their own through package meta.
package devetcd

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"strings"
	"sync"
	"syscall"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
)

// Server is a single-member etcd server running in this process.
type Server struct {
	e        *embed.Etcd
	endpoint string
	once     sync.Once
}

// Start starts a single-member etcd with its data in dir and waits
// until it serves. clientURL and peerURL are like "http://127.0.0.1:2379";
// an empty one means a free port on 127.0.0.1. The server ticks every 50 ms
// (election 500 ms), so leases as short as 1 s are honoured.
func Start(ctx context.Context, dir, clientURL, peerURL string) (*Server, error) {
	// A port picked here is free only until etcd binds it: another process
	// may take it first. Then pick again (a port given by the caller is
	// never changed).
	for try := 1; ; try++ {
		m, picked, err := start(ctx, dir, clientURL, peerURL)
		if err == nil || !picked || try == 3 || !errors.Is(err, syscall.EADDRINUSE) {
			return m, err
		}
	}
}

// start is one attempt of Start; picked reports whether it
// chose a port itself.
func start(ctx context.Context, dir, clientURL, peerURL string) (m *Server, picked bool, err error) {
	cu, pu := clientURL, peerURL
	if cu == "" || pu == "" {
		picked = true
		// Both are chosen while both listeners are open, so they differ
		// from each other and from a given one.
		urls, err := freeURLs(2, cu+" "+pu)
		if err != nil {
			return nil, picked, err
		}
		if cu == "" {
			cu = urls[0]
		}
		if pu == "" {
			pu = urls[1]
		}
	}
	lc, err := url.Parse(cu)
	if err != nil {
		return nil, picked, fmt.Errorf("meta: embedded etcd: client url %q: %w", cu, err)
	}
	lp, err := url.Parse(pu)
	if err != nil {
		return nil, picked, fmt.Errorf("meta: embedded etcd: peer url %q: %w", pu, err)
	}
	cfg := embed.NewConfig()
	cfg.Dir = dir
	cfg.Name = "torus"
	cfg.ListenClientUrls = []url.URL{*lc}
	cfg.AdvertiseClientUrls = []url.URL{*lc}
	cfg.ListenPeerUrls = []url.URL{*lp}
	cfg.AdvertisePeerUrls = []url.URL{*lp}
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
	cfg.TickMs = 50
	cfg.ElectionMs = 500
	// The server logs nothing (it reports errors even on a clean Close);
	// its failures surface through Err.
	cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return nil, picked, fmt.Errorf("meta: start embedded etcd in %s (client %s, peer %s): %w", dir, cu, pu, err)
	}
	select {
	case <-e.Server.ReadyNotify():
	case err := <-e.Err():
		e.Close()
		return nil, picked, fmt.Errorf("meta: embedded etcd in %s failed: %w", dir, err)
	case <-ctx.Done():
		e.Close()
		return nil, picked, fmt.Errorf("meta: waiting for embedded etcd in %s: %w", dir, ctx.Err())
	case <-time.After(30 * time.Second):
		e.Close()
		return nil, picked, fmt.Errorf("meta: embedded etcd in %s not ready after 30s", dir)
	}
	return &Server{e: e, endpoint: lc.String()}, picked, nil
}

// freeURLs returns n http URLs on distinct ports of 127.0.0.1 that were
// free a moment ago, none of them a port named in avoid.
func freeURLs(n int, avoid string) ([]string, error) {
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	var urls []string
	for len(urls) < n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("meta: find a free port: %w", err)
		}
		ls = append(ls, l) // held, so the next pick differs
		if u := "http://" + l.Addr().String(); !strings.Contains(avoid, u) {
			urls = append(urls, u)
		}
	}
	return urls, nil
}

// Endpoint returns the client URL, for meta.Open.
func (m *Server) Endpoint() string { return m.endpoint }

// Err returns a channel that receives the server's fatal errors.
func (m *Server) Err() <-chan error { return m.e.Err() }

// Close stops the server and waits until it has stopped.
func (m *Server) Close() {
	m.once.Do(m.e.Close)
}
