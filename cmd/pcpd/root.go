package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"runtime/debug"

	"github.com/spf13/cobra"
)

// Exit codes.
const (
	exitOK      = 0
	exitFailure = 1 // the command ran and failed (no daemon, PCP error result, lab step failed)
	exitUsage   = 2 // bad command line or configuration: nothing was touched
)

// exitError carries an exit code through cobra.
type exitError struct {
	code int
	err  error
}

func (e *exitError) Error() string { return e.err.Error() }
func (e *exitError) Unwrap() error { return e.err }

// failure marks err as a runtime failure (exit 1).
func failure(err error) error { return &exitError{code: exitFailure, err: err} }

// usage marks err as a usage or configuration mistake (exit 2).
func usage(err error) error { return &exitError{code: exitUsage, err: err} }

// silent is an exit code whose message has already been printed.
type silent int

func (s silent) Error() string { return fmt.Sprintf("exit status %d", int(s)) }

// run is the whole program: it parses args, runs the command and returns
// the process exit code. Everything it prints goes to stdout or stderr.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	root := newRoot(stdout, stderr)
	root.SetArgs(args)
	cmd, err := root.ExecuteContextC(ctx)
	if err == nil {
		return exitOK
	}
	var s silent
	if errors.As(err, &s) {
		return int(s)
	}
	var ee *exitError
	if errors.As(err, &ee) {
		fmt.Fprintf(stderr, "pcpd: %v\n", ee.err)
		return ee.code
	}
	// Anything else comes from cobra itself: an unknown command or flag, a
	// bad flag value, wrong arguments.
	fmt.Fprintf(stderr, "pcpd: %v\nRun '%s --help' for usage.\n", err, cmd.CommandPath())
	return exitUsage
}

func newRoot(stdout, stderr io.Writer) *cobra.Command {
	root := &cobra.Command{
		Use:   "pcpd",
		Short: "PCP and NAT-PMP server that opens WireGuard clients' firewall pinholes",
		Long: `pcpd is a PCP (RFC 6887) and NAT-PMP (RFC 6886) server for a tunnel host: a
VPS or router that gives clients behind CGNAT public addresses over WireGuard.

A client asks pcpd over the tunnel (UDP port 5351) to open an inbound
pinhole for an address it owns. pcpd checks that the client really owns it
(the address lies in the AllowedIPs of the WireGuard peer the request came
from, or in a statically configured client's prefixes), installs an expiring
nftables accept rule (IPv6) or port mapping (IPv4), makes the lease durable,
and only then answers SUCCESS. The kernel removes every pinhole when its
lease ends, even if pcpd is not running.

Exit codes: 0 success; 1 failure (daemon unreachable, PCP error result,
lab step failed); 2 bad command line or configuration.`,
		SilenceErrors: true,
		SilenceUsage:  true,
		Version:       version(),
		// No Run: "pcpd" alone prints help.
	}
	root.SetOut(stdout)
	root.SetErr(stderr)
	root.SetFlagErrorFunc(func(c *cobra.Command, err error) error { return err })
	root.CompletionOptions.HiddenDefaultCmd = true
	root.AddCommand(
		newServeCmd(),
		newLeasesCmd(),
		newRevokeCmd(),
		newStatusCmd(),
		newMapCmd(),
		newAnnounceCmd(),
		newLabCmd(),
		newWireGuardDeviceCmd(),
	)
	return root
}

// version is the module version when built from a tagged module, else the
// VCS revision, else "devel".
func version() string {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return "devel"
	}
	if v := bi.Main.Version; v != "" && v != "(devel)" {
		return v
	}
	for _, s := range bi.Settings {
		if s.Key == "vcs.revision" && len(s.Value) >= 12 {
			return "devel-" + s.Value[:12]
		}
	}
	return "devel"
}
