// Command torusblk serves and attaches Torus volumes.
//
//	torusblk serve   --store DIR --size SIZE --listen unix:PATH|tcp:HOST:PORT
//	torusblk serve   NAME --etcd URL --tls-dir DIR --listen unix:PATH|tcp:HOST:PORT
//	torusblk attach  --store DIR --size SIZE [--mode ublk|nbd|auto]
//	torusblk attach  NAME --etcd URL --tls-dir DIR [--mode ublk|nbd|auto]
//	torusblk detach  DEVICE
//	torusblk recover /dev/ublkbN
//	torusblk list    [--output text|json]
//	torusblk serve   NAME@SNAPSHOT --read-only --etcd URL --tls-dir DIR --listen ...
//	torusblk export-diff NAME@FROM..@TO|NAME@SNAPSHOT FILE|- --etcd URL --tls-dir DIR
//	torusblk import-diff FILE|- NAME --etcd URL --tls-dir DIR
//
// serve exports one volume over NBD: a local store (--store, --size) or a
// volume NAME of a Torus cluster (--etcd, default $TORUS_ETCD; --tls-dir,
// default $TORUS_TLS_DIR). attach makes it a local block device (ublk, or
// the kernel NBD client where ublk is missing).
// Both run in the foreground until signalled (SIGINT or SIGTERM), then drain
// in-flight requests, make every completed write durable and exit. detach
// signals the attaching process; recover re-attaches a ublk device whose
// server was killed, from the state attach keeps under /run/torus.
// --help prints a command's flags; usage errors exit 2, other failures 1
// (the conventions of internal/cli).
package main

import (
	"context"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/torus-storage/torus/internal/cli"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	return cli.Main(ctx, program(log), args, stdout, stderr)
}

// program is torusblk's command tree.
func program(log *slog.Logger) *cli.Command {
	return &cli.Command{
		Name:    "torusblk",
		Summary: "serve and attach Torus volumes",
		Help: `A volume is a local store (--store DIR --size SIZE) or a volume NAME of a
Torus cluster, reached through its etcd (--etcd, default $TORUS_ETCD) with
this client's certificate (--tls-dir, default $TORUS_TLS_DIR).`,
		Sub: []*cli.Command{
			serveCommand(log),
			attachCommand(log),
			detachCommand(log),
			recoverCommand(log),
			listCommand(),
			exportDiffCommand(log),
			importDiffCommand(log),
		},
	}
}
