package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/pcpd/pcpd/config"
	"github.com/pcpd/pcpd/control"
)

func addSocketFlag(cmd *cobra.Command, path *string) {
	cmd.Flags().StringVar(path, "socket", config.DefaultSocket, "the daemon's control socket `PATH` (pcpd serve --socket)")
}

// controlErr turns a control client error into an exit: a daemon that
// refused the request or cannot be reached is a failure, not a usage error.
func controlErr(err error) error { return failure(err) }

func newLeasesCmd() *cobra.Command {
	var (
		socket  string
		asJSON  bool
		timeout time.Duration
	)
	cmd := &cobra.Command{
		Use:   "leases [--socket PATH] [--json]",
		Short: "List every live lease held by the running daemon",
		Long: `List every live lease the running pcpd holds, read from its control socket.

The table shows, per lease: the client that holds it ("wg:" and a WireGuard
peer's public key as wg show prints it, or "static:" and a static client's
name), the kind (map, peer, natpmp), the
protocol, the internal address:port it opens, the external address:port
traffic arrives on (equal for IPv6 unless a port redirect was granted), and
when it expires.

--json prints a JSON array instead, one object per lease with the fields
client, kind, protocol, internal_address, internal_port, external_address,
external_port, expires_at and created_at (RFC 3339, UTC), and where they
apply remote (PEER), filters (FILTER), description and third_party. The
array is streamed, so even 100 000 leases print in well under 2 seconds.`,
		Example: `  pcpd leases
  pcpd leases --json | jq '.[] | select(.protocol == "tcp")'`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c := &control.Client{Path: socket, Timeout: timeout}
			out := bufio.NewWriterSize(cmd.OutOrStdout(), 256<<10)
			var err error
			if asJSON {
				err = printLeasesJSON(cmd, c, out)
			} else {
				err = printLeasesTable(cmd, c, out)
			}
			if ferr := out.Flush(); err == nil && ferr != nil {
				err = failure(ferr)
			}
			return err
		},
	}
	addSocketFlag(cmd, &socket)
	cmd.Flags().BoolVar(&asJSON, "json", false, "print a JSON array of lease objects")
	cmd.Flags().DurationVar(&timeout, "timeout", 30*time.Second, "give up if the daemon has not answered in full by then")
	return cmd
}

// printLeasesJSON prints the daemon's lease objects as they come, inside
// one JSON array: nothing is decoded or held, so 100 000 leases take a
// fraction of a second.
func printLeasesJSON(cmd *cobra.Command, c *control.Client, out *bufio.Writer) error {
	sep := "[\n  "
	n, err := c.LeasesJSON(cmd.Context(), func(line []byte) error {
		out.WriteString(sep)
		sep = ",\n  "
		_, err := out.Write(line)
		return err
	})
	if err != nil {
		return controlErr(err)
	}
	if n == 0 {
		out.WriteString("[]\n")
	} else {
		out.WriteString("\n]\n")
	}
	return nil
}

func printLeasesTable(cmd *cobra.Command, c *control.Client, out io.Writer) error {
	now := time.Now()
	tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "CLIENT\tKIND\tPROTO\tINTERNAL\tEXTERNAL\tEXPIRES\tLEFT\tNOTE")
	n, err := c.Leases(cmd.Context(), func(l control.Lease) error {
		var note []string
		if l.Remote != "" {
			note = append(note, "remote "+l.Remote)
		}
		if len(l.Filters) > 0 {
			note = append(note, "filters "+strings.Join(l.Filters, ","))
		}
		if l.ThirdParty {
			note = append(note, "third-party")
		}
		if l.Description != "" {
			note = append(note, fmt.Sprintf("%q", l.Description))
		}
		if len(note) == 0 {
			note = append(note, "-")
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n",
			l.Client, l.Kind, l.Protocol,
			hostPort(l.InternalAddress.String(), l.InternalPort),
			hostPort(l.ExternalAddress.String(), l.ExternalPort),
			l.ExpiresAt.Format(time.RFC3339),
			l.ExpiresAt.Sub(now).Round(time.Second),
			strings.Join(note, "; "))
		return nil
	})
	if err != nil {
		return controlErr(err)
	}
	if err := tw.Flush(); err != nil {
		return failure(err)
	}
	fmt.Fprintf(out, "%d lease(s)\n", n)
	return nil
}

func hostPort(host string, port uint16) string {
	if strings.Contains(host, ":") {
		return fmt.Sprintf("[%s]:%d", host, port)
	}
	return fmt.Sprintf("%s:%d", host, port)
}

func newRevokeCmd() *cobra.Command {
	var (
		socket string
		all    bool
		client string
	)
	cmd := &cobra.Command{
		Use:   "revoke [--socket PATH] (--all | --client NAME | PROTO/ADDRESS/PORT ...)",
		Short: "End a lease, every lease of a client, or all leases",
		Long: `End leases now: their pinholes leave the kernel and their records the state
directory before this command returns. The client is not told; a client that
still wants the mapping will ask again at its next renewal, and gets it again
if it still owns the address (revoking is not banning: to keep a client out,
remove its WireGuard peer or its --client entry).

Select exactly one of:
  --all                  every lease
  --client NAME          every lease of one client: a static client's name or a
                         WireGuard peer's public key, as pcpd leases shows it
  PROTO/ADDRESS/PORT...  the leases opening that protocol, internal address and
                         internal port (whoever holds them), e.g.
                         tcp/2001:db8:1:2::10/443

Exits 1 if nothing matched.`,
		Example: `  pcpd revoke tcp/2001:db8:1:2::10/443 udp/2001:db8:1:2::10/443
  pcpd revoke --client 'xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg='
  pcpd revoke --all`,
		RunE: func(cmd *cobra.Command, args []string) error {
			req := control.Request{All: all, Client: client}
			for _, a := range args {
				ref, err := control.ParseLeaseRef(a)
				if err != nil {
					return usage(err)
				}
				req.Leases = append(req.Leases, ref)
			}
			set := 0
			for _, on := range []bool{all, client != "", len(args) > 0} {
				if on {
					set++
				}
			}
			if set != 1 {
				return usage(errors.New("revoke: give exactly one of --all, --client NAME, or PROTO/ADDRESS/PORT arguments"))
			}
			c := &control.Client{Path: socket}
			n, err := c.Revoke(cmd.Context(), req)
			if err != nil {
				return controlErr(err)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "revoked %d lease(s)\n", n)
			if n == 0 {
				return silent(exitFailure)
			}
			return nil
		},
	}
	addSocketFlag(cmd, &socket)
	cmd.Flags().BoolVar(&all, "all", false, "revoke every lease")
	cmd.Flags().StringVar(&client, "client", "", "revoke every lease of client `NAME` (as pcpd leases shows it; the wg: or static: prefix may be left out)")
	return cmd
}

func newStatusCmd() *cobra.Command {
	var (
		socket string
		asJSON bool
	)
	cmd := &cobra.Command{
		Use:   "status [--socket PATH] [--json]",
		Short: "Show the daemon's epoch, lease and client counts, ownership source and listen addresses",
		Long: `Show the running daemon's state: its PCP epoch (seconds since the mapping
state was last lost; clients compare it to notice a server restart that lost
their mappings), how many leases are live and how many clients hold them, where
ownership comes from (wireguard:IFACE or static), the addresses it answers
on, its nftables table and state directory, and since when it runs.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c := &control.Client{Path: socket}
			st, err := c.Status(cmd.Context())
			if err != nil {
				return controlErr(err)
			}
			out := cmd.OutOrStdout()
			if asJSON {
				enc := json.NewEncoder(out)
				enc.SetIndent("", "  ")
				return enc.Encode(st)
			}
			tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
			fmt.Fprintf(tw, "pid\t%d\n", st.PID)
			if st.Version != "" {
				fmt.Fprintf(tw, "version\t%s\n", st.Version)
			}
			fmt.Fprintf(tw, "started\t%s (%s ago)\n", st.Started.Format(time.RFC3339), time.Since(st.Started).Round(time.Second))
			restarted := ""
			if st.Restarted {
				restarted = " (continued across a restart: leases were kept)"
			}
			fmt.Fprintf(tw, "epoch\t%d%s\n", st.Epoch, restarted)
			fmt.Fprintf(tw, "leases\t%d\n", st.Leases)
			fmt.Fprintf(tw, "clients\t%d holding leases\n", st.Owners)
			fmt.Fprintf(tw, "ownership\t%s\n", st.OwnershipSource)
			listen := strings.Join(st.Listen, " ")
			if listen == "" {
				listen = "(none yet: no address on the serving interfaces)"
			}
			fmt.Fprintf(tw, "listen\t%s\n", listen)
			if st.NftTable != "" {
				fmt.Fprintf(tw, "nft table\t%s\n", st.NftTable)
			}
			if st.StateDir != "" {
				fmt.Fprintf(tw, "state dir\t%s\n", st.StateDir)
			}
			return tw.Flush()
		},
	}
	addSocketFlag(cmd, &socket)
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the status as a JSON object")
	return cmd
}
