// Command torus-csi is the Container Storage Interface driver of Torus.
//
//	torus-csi --mode controller|node|all --endpoint unix:///csi/csi.sock --etcd URL [--prefix P]
//	          [--node-id ID --tls-dir DIR --run-dir DIR --torusblk PATH --attach-mode auto|ublk|nbd]
//
// The controller (Identity and Controller services) keeps volumes,
// snapshots and clones as records in etcd (package meta); the node service
// attaches volumes as block devices on its host, each served by a torusblk
// process of its own that outlives the plugin. Usage errors exit 2, other
// failures 1 (the conventions of internal/cli).
package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/spf13/pflag"
	"google.golang.org/grpc"

	"github.com/torus-storage/torus/internal/cli"
	"github.com/torus-storage/torus/meta"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr *os.File) int {
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	var c cli.Cluster
	var mode, endpoint string
	var nc nodeConfig
	root := &cli.Command{
		Name:    "torus-csi",
		Summary: "the Container Storage Interface driver of Torus",
		Usage:   "--mode controller|node|all --endpoint unix:///PATH --etcd URL [--node-id ID --tls-dir DIR]",
		Flags: func(fs *pflag.FlagSet) {
			c.Flags(fs)
			fs.StringVar(&mode, "mode", "all", "services to serve: controller (Identity and Controller), node (Identity and Node), or all")
			fs.StringVar(&endpoint, "endpoint", "unix:///csi/csi.sock", "where to serve CSI (gRPC): unix:///PATH")
			nc.flags(fs)
		},
		Run: func(ctx context.Context, args []string, _ cli.IO) error {
			if len(args) != 0 {
				return cli.Usagef("unexpected arguments %q", args)
			}
			if mode != "controller" && mode != "node" && mode != "all" {
				return cli.Usagef("--mode %q: want controller, node or all", mode)
			}
			path, ok := strings.CutPrefix(endpoint, "unix://")
			if !ok || path == "" {
				return cli.Usagef("--endpoint %q: want unix:///PATH", endpoint)
			}
			if mode != "controller" {
				if err := nc.check(); err != nil {
					return err
				}
			}
			ms, err := meta.Open(ctx, c.Endpoints(), c.Prefix, meta.Options{Logger: log})
			if err != nil {
				if errors.Is(err, meta.ErrUnreachable) {
					return fmt.Errorf("%w: is etcd running at %s? (--etcd or %s)", err, c.Etcd, cli.EnvEtcd)
				}
				return err
			}
			defer ms.Close()
			var svc services
			svc.identity = &identity{ms: ms, version: version, controller: mode != "node"}
			if mode != "node" {
				svc.controller = &controller{ms: ms}
			}
			if mode != "controller" {
				nc.cluster = c
				n, err := newNode(ctx, ms, nc, log)
				if err != nil {
					return err
				}
				svc.node = n
			}
			return serve(ctx, path, svc, log)
		},
	}
	return cli.Main(ctx, root, args, stdout, stderr)
}

// version is the driver's version (GetPluginInfo), set at link time:
// -ldflags "-X main.version=V".
var version = "dev"

// services are the CSI services one process serves: Identity always, the
// others as --mode says (nil: not served).
type services struct {
	identity   csi.IdentityServer
	controller csi.ControllerServer
	node       csi.NodeServer
}

// serve serves svc on the unix socket path until ctx ends.
func serve(ctx context.Context, path string, svc services, log *slog.Logger) error {
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("endpoint %s: %w", path, err)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("endpoint %s: %w", path, err)
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return fmt.Errorf("endpoint %s: %w", path, err)
	}
	srv := grpc.NewServer(grpc.UnaryInterceptor(logErrors(log)))
	csi.RegisterIdentityServer(srv, svc.identity)
	if svc.controller != nil {
		csi.RegisterControllerServer(srv, svc.controller)
	}
	if svc.node != nil {
		csi.RegisterNodeServer(srv, svc.node)
	}
	go func() {
		<-ctx.Done()
		srv.GracefulStop()
	}()
	log.Info("serving CSI", "endpoint", "unix://"+path, "driver", driverName,
		"controller", svc.controller != nil, "node", svc.node != nil)
	return srv.Serve(l)
}

// logErrors logs every call that fails, with its method and error: the CO
// shows the error in its events, the log keeps it on this host.
func logErrors(log *slog.Logger) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		resp, err := h(ctx, req)
		if err != nil {
			log.Warn("CSI call failed", "method", info.FullMethod, "err", err)
		}
		return resp, err
	}
}
