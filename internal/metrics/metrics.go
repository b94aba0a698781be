// Package metrics serves the Prometheus endpoint of torusd and torusblk:
// the caller's collectors plus the Go runtime and process collectors, on a
// registry of its own (never the global one), at GET /metrics.
//
// The callers' collectors read the counters the data path already keeps in
// its own atomics when /metrics is scraped and report them as const
// metrics: nothing on the I/O path calls Prometheus or allocates for it.
package metrics

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// NewRegistry returns a new registry holding the Go runtime collector
// (go_*), the process collector (process_*) and cs.
func NewRegistry(cs ...prometheus.Collector) (*prometheus.Registry, error) {
	reg := prometheus.NewRegistry()
	all := append([]prometheus.Collector{
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	}, cs...)
	for _, c := range all {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("metrics: register collector %T: %w", c, err)
		}
	}
	return reg, nil
}

// Handler serves GET /metrics from g in the format the scraper asks for
// (the text format by default); errors while gathering are logged to log
// and answered with HTTP 500.
func Handler(g prometheus.Gatherer, log *slog.Logger) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(g, promhttp.HandlerOpts{
		ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelError),
	}))
	return mux
}

// Serve serves Handler(g, log) on l until ctx is done, then shuts the
// server down (waiting at most 2 s for scrapes in flight). The returned
// channel is closed once the server has stopped.
func Serve(ctx context.Context, l net.Listener, g prometheus.Gatherer, log *slog.Logger) <-chan struct{} {
	srv := &http.Server{Handler: Handler(g, log), ReadHeaderTimeout: 5 * time.Second}
	served := make(chan struct{})
	go func() {
		defer close(served)
		if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("metrics server failed", "addr", l.Addr().String(), "err", err)
		}
	}()
	done := make(chan struct{})
	go func() {
		defer close(done)
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
		defer cancel()
		if err := srv.Shutdown(sctx); err != nil {
			log.Warn("metrics server: shutdown", "addr", l.Addr().String(), "err", err)
		}
		<-served
	}()
	return done
}
