// Command pcpd is a PCP (RFC 6887) and NAT-PMP (RFC 6886) server for
// WireGuard tunnel hosts, with its own admin and client commands and a
// self-contained lab. Run `pcpd --help`.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"
)

// main only wires the process to run: arguments, standard streams, and a
// context that ends on SIGINT or SIGTERM.
func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}
