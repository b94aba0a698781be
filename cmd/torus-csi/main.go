// Command torus-csi is the Container Storage Interface driver of Torus.
//
//	torus-csi --mode controller|node|all --endpoint unix:///csi/csi.sock --etcd URL [--prefix P]
//
// The controller (Identity and Controller services) keeps volumes,
// snapshots and clones as records in etcd (package meta); the node service
// attaches volumes as block devices on its host. Usage errors exit 2,
// other failures 1 (the conventions of internal/cli).
package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
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
	root := &cli.Command{
		Name:    "torus-csi",
		Summary: "the Container Storage Interface driver of Torus",
		Usage:   "--mode controller|node|all --endpoint unix:///PATH --etcd URL",
		Flags: func(fs *pflag.FlagSet) {
			c.Flags(fs)
			fs.StringVar(&mode, "mode", "all", "services to serve: controller (Identity and Controller), node, or all")
			fs.StringVar(&endpoint, "endpoint", "unix:///csi/csi.sock", "where to serve CSI (gRPC): unix:///PATH")
		},
		Run: func(ctx context.Context, args []string, _ cli.IO) error {
			if len(args) != 0 {
				return cli.Usagef("unexpected arguments %q", args)
			}
			if mode != "controller" && mode != "all" {
				return cli.Usagef("--mode %q: the node service is not built yet; want controller or all", mode)
			}
			path, ok := strings.CutPrefix(endpoint, "unix://")
			if !ok || path == "" {
				return cli.Usagef("--endpoint %q: want unix:///PATH", endpoint)
			}
			ms, err := meta.Open(ctx, c.Endpoints(), c.Prefix, meta.Options{Logger: log})
			if err != nil {
				return err
			}
			defer ms.Close()
			return serve(ctx, path, &controller{ms: ms, version: "dev"}, log)
		},
	}
	return cli.Main(ctx, root, args, stdout, stderr)
}

// serve serves ctl's services, and those more registers, on the unix
// socket path until ctx ends.
func serve(ctx context.Context, path string, ctl *controller, log *slog.Logger, more ...func(*grpc.Server)) error {
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("endpoint %s: %w", path, err)
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return fmt.Errorf("endpoint %s: %w", path, err)
	}
	srv := grpc.NewServer()
	csi.RegisterIdentityServer(srv, ctl)
	csi.RegisterControllerServer(srv, ctl)
	for _, m := range more {
		m(srv)
	}
	go func() {
		<-ctx.Done()
		srv.GracefulStop()
	}()
	log.Info("serving CSI", "endpoint", "unix://"+path, "driver", driverName)
	return srv.Serve(l)
}
