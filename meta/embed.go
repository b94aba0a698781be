package meta

import (
	"context"
	"fmt"
	"net"
	"net/url"
	"sync"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
)

// Embedded is a single-member etcd server running in this process, for
// tests and the development cluster.
type Embedded struct {
	e        *embed.Etcd
	endpoint string
	once     sync.Once
}

// StartEmbedded starts a single-member etcd with its data in dir and waits
// until it serves. clientURL and peerURL are like "http://127.0.0.1:2379";
// an empty one means a free port on 127.0.0.1. The server ticks every 50 ms
// (election 500 ms), so leases as short as 1 s are honoured.
func StartEmbedded(ctx context.Context, dir, clientURL, peerURL string) (*Embedded, error) {
	var err error
	cu, pu := clientURL, peerURL
	if cu == "" {
		if cu, err = freeURL(); err != nil {
			return nil, err
		}
	}
	if pu == "" {
		if pu, err = freeURL(); err != nil {
			return nil, err
		}
	}
	lc, err := url.Parse(cu)
	if err != nil {
		return nil, fmt.Errorf("meta: embedded etcd: client url %q: %w", cu, err)
	}
	lp, err := url.Parse(pu)
	if err != nil {
		return nil, fmt.Errorf("meta: embedded etcd: peer url %q: %w", pu, err)
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
		return nil, fmt.Errorf("meta: start embedded etcd in %s (client %s, peer %s): %w", dir, cu, pu, err)
	}
	select {
	case <-e.Server.ReadyNotify():
	case err := <-e.Err():
		e.Close()
		return nil, fmt.Errorf("meta: embedded etcd in %s failed: %w", dir, err)
	case <-ctx.Done():
		e.Close()
		return nil, fmt.Errorf("meta: waiting for embedded etcd in %s: %w", dir, ctx.Err())
	case <-time.After(30 * time.Second):
		e.Close()
		return nil, fmt.Errorf("meta: embedded etcd in %s not ready after 30s", dir)
	}
	return &Embedded{e: e, endpoint: lc.String()}, nil
}

// freeURL returns an http URL on a port of 127.0.0.1 that was free a moment
// ago.
func freeURL() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", fmt.Errorf("meta: find a free port: %w", err)
	}
	defer l.Close()
	return "http://" + l.Addr().String(), nil
}

// Endpoint returns the client URL, for Open.
func (m *Embedded) Endpoint() string { return m.endpoint }

// Err returns a channel that receives the server's fatal errors.
func (m *Embedded) Err() <-chan error { return m.e.Err() }

// Close stops the server and waits until it has stopped.
func (m *Embedded) Close() {
	m.once.Do(m.e.Close)
}
