// Command torusblk serves and attaches Torus volumes.
//
//	torusblk serve   --store DIR --size SIZE --listen unix:PATH|tcp:HOST:PORT
//	torusblk attach  --store DIR --size SIZE [--mode ublk|nbd|auto]
//	torusblk detach  DEVICE
//	torusblk recover /dev/ublkbN
//	torusblk list
//
// serve exports one volume kept in a local store over NBD; attach makes it a
// local block device (ublk, or the kernel NBD client where ublk is missing).
// Both run in the foreground until signalled (SIGINT or SIGTERM), then drain
// in-flight requests, make every completed write durable and exit. detach
// signals the attaching process; recover re-attaches a ublk device whose
// server was killed, from the state attach keeps under /run/torus.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
)

const usage = `torusblk: serve and attach Torus volumes

Usage:
  torusblk serve   --store DIR --size SIZE --listen unix:PATH|tcp:HOST:PORT
  torusblk attach  --store DIR --size SIZE [--mode ublk|nbd|auto]
  torusblk detach  DEVICE
  torusblk recover /dev/ublkbN
  torusblk list

Run 'torusblk COMMAND --help' for a command's flags.
`

// errUsage marks errors caused by how the command was called; they exit 2.
var errUsage = errors.New("usage")

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	var err error
	switch args[0] {
	case "serve":
		err = cmdServe(ctx, args[1:], stdout, stderr, log)
	case "attach":
		err = cmdAttach(ctx, args[1:], stdout, stderr, log)
	case "detach":
		err = cmdDetach(ctx, args[1:], stdout, stderr, log)
	case "recover":
		err = cmdRecover(ctx, args[1:], stdout, stderr, log)
	case "list":
		err = cmdList(ctx, args[1:], stdout, stderr, log)
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return 0
	default:
		fmt.Fprintf(stderr, "torusblk: unknown command %q\n\n%s", args[0], usage)
		return 2
	}
	switch {
	case err == nil:
		return 0
	case errors.Is(err, errUsage):
		fmt.Fprintf(stderr, "torusblk %s: %v\n", args[0], err)
		return 2
	default:
		fmt.Fprintf(stderr, "torusblk %s: %v\n", args[0], err)
		return 1
	}
}
