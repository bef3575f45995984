package main

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/pcpd/pcpd/pcp"
)

// clientFlags are the flags map and announce share.
type clientFlags struct {
	server   string
	clientIP string
	timeout  time.Duration
}

func (f *clientFlags) add(cmd *cobra.Command) {
	cmd.Flags().StringVar(&f.server, "server", "", "the PCP server `ADDR`: ADDRESS or [ADDRESS]:PORT (port 5351 if not given); required")
	cmd.Flags().StringVar(&f.clientIP, "client-ip", "", "send from local address `ADDR` and name it in the PCP Client IP field (default: the address the route to --server picks)")
	cmd.Flags().DurationVar(&f.timeout, "timeout", 15*time.Second, "give up after this long (PCP retransmits at 3 s, 6 s, 12 s)")
	cmd.MarkFlagRequired("server")
}

// exchange sends req (retransmitting as RFC 6887 §8.1.1 says) until an
// answer or --timeout, prints the answer, and fails the command when it
// is not SUCCESS. verb names the command in errors.
func (f *clientFlags) exchange(cmd *cobra.Command, c *pcp.Client, req *pcp.Request, verb string) error {
	ctx, cancel := context.WithTimeout(cmd.Context(), f.timeout)
	defer cancel()
	var resp pcp.Response
	if err := c.Do(ctx, req, &resp); err != nil {
		if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, pcp.ErrNoResponse) {
			err = fmt.Errorf("no answer from %s within %v", c.Server, f.timeout)
		}
		return failure(fmt.Errorf("%s: %w", verb, err))
	}
	printResponse(cmd.OutOrStdout(), req, &resp)
	if resp.Result != pcp.Success {
		return silent(exitFailure)
	}
	return nil
}

// dial opens the UDP socket a request goes out on: bound to --client-ip if
// given, else to the source address the kernel's route to the server picks
// (so the PCP Client IP field matches the packet's source, RFC 6887 §8.1).
func (f *clientFlags) dial() (*pcp.Client, netip.Addr, error) {
	server, err := parseServer(f.server)
	if err != nil {
		return nil, netip.Addr{}, usage(err)
	}
	// A connected UDP socket sends nothing; it only asks the routing
	// table which source address it would use.
	var local netip.Addr
	probe, perr := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(server))
	if perr == nil {
		local = probe.LocalAddr().(*net.UDPAddr).AddrPort().Addr().Unmap()
		probe.Close()
	}
	switch {
	case f.clientIP == "" && perr != nil:
		return nil, netip.Addr{}, failure(fmt.Errorf("no route to %s: %w", server, perr))
	case f.clientIP != "":
		// The source for a destination of this host's own is the
		// destination itself (RFC 6724 rule 1; IPv4's local routes):
		// the request goes through loopback.
		own := perr == nil && local.WithZone("") == server.Addr().WithZone("")
		if local, err = netip.ParseAddr(f.clientIP); err != nil {
			return nil, netip.Addr{}, usage(fmt.Errorf("--client-ip %q is not an IP address", f.clientIP))
		}
		local = local.Unmap()
		if own && local.WithZone("") != server.Addr().WithZone("") {
			return nil, netip.Addr{}, usage(hostOwnClientIP(local, server.Addr()))
		}
	}
	conn, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(local, 0)))
	if err != nil {
		return nil, netip.Addr{}, failure(fmt.Errorf("bind %s: %w", local, err))
	}
	return &pcp.Client{Conn: conn, Server: server}, local, nil
}

// hostOwnClientIP is the error of a --client-ip other than --server's
// address when that address is this host's own (issue 9, review h/revh3):
// such a request goes through loopback, where pcpd's serving sockets take
// only requests whose source is the served address itself (any local user
// can send from any address there: server.hostOwnFilter), so it was
// dropped without a word and the command timed out.
func hostOwnClientIP(client, server netip.Addr) error {
	return fmt.Errorf("--client-ip %s: the server address %s is this host's own, so the request would go through loopback, "+
		"where pcpd takes only requests sent from %s itself (any local user could send from any address there) and drops this one unanswered; "+
		"run the command on the client that has %s (or in its network namespace: ip netns exec NS pcpd map ...), "+
		"or leave --client-ip out to ask as this host", client, server, server, client)
}

// parseServer accepts ADDRESS, [ADDRESS]:PORT or a.b.c.d:PORT.
func parseServer(s string) (netip.AddrPort, error) {
	if a, err := netip.ParseAddr(strings.TrimSuffix(strings.TrimPrefix(s, "["), "]")); err == nil {
		return netip.AddrPortFrom(a.Unmap(), pcp.Port), nil
	}
	ap, err := netip.ParseAddrPort(s)
	if err != nil || ap.Port() == 0 {
		return netip.AddrPort{}, fmt.Errorf("--server %q: want ADDRESS or [ADDRESS]:PORT", s)
	}
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), nil
}

func newMapCmd() *cobra.Command {
	var (
		cf            clientFlags
		proto         string
		port          uint16
		extPort       uint16
		extAddr       string
		lifetime      time.Duration
		thirdParty    string
		preferFailure bool
		filters       []string
		description   string
		nonceHex      string
		peer          string
		del           bool
	)
	cmd := &cobra.Command{
		Use:   "map --server ADDR --proto tcp|udp --port N [--lifetime 2h] [--delete] [flags]",
		Short: "Ask a PCP server to open (or, with --delete, close) a mapping, as a client would",
		Long: `Send one PCP MAP request (RFC 6887 §11) to --server and print the answer: the
result code, the granted lifetime, the external address and port, and the
server's epoch. Run it on a client machine to test a pcpd (or any PCP server)
the way a real client would: it retransmits like one (3 s, 6 s, 12 s) and
accepts only the reply that carries its nonce.

--delete sends lifetime 0, which closes the mapping (deleting a mapping that
does not exist also answers SUCCESS, as RFC 6887 §15.1 requires).

A request carries a fresh random nonce, printed with the result. pcpd lets a
mapping's owner renew or delete it with another nonce by default; a server
running with --strict-nonce insists on the original: pass it with --nonce.

--peer [ADDR]:PORT sends a PEER request (§12) for the connection to that
remote peer instead of a MAP.

Exits 0 on SUCCESS, 1 on any other result or when the server does not answer.`,
		Example: `  pcpd map --server 2001:db8:1::1 --proto tcp --port 443 --lifetime 2h
  pcpd map --server 2001:db8:1::1 --proto tcp --port 443 --external-port 80
  pcpd map --server 2001:db8:1::1 --proto tcp --port 443 --delete
  pcpd map --server 10.100.0.1 --proto udp --port 51413     # IPv4 NAPT mapping`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			p, err := parseProto(proto)
			if err != nil {
				return usage(err)
			}
			if !cmd.Flags().Changed("port") {
				return usage(errors.New("map: --port is required"))
			}
			if del {
				lifetime = 0
			} else if lifetime < time.Second {
				return usage(fmt.Errorf("map: --lifetime %v: at least 1s (use --delete to delete)", lifetime))
			}
			c, local, err := cf.dial()
			if err != nil {
				return err
			}
			defer c.Conn.Close()
			var req *pcp.Request
			if peer != "" {
				remote, err := parseServer(peer)
				if err != nil {
					return usage(fmt.Errorf("map: --peer %q: want [ADDRESS]:PORT", peer))
				}
				req = pcp.NewPeer(local, p, port, remote, lifetime)
			} else {
				req = pcp.NewMap(local, p, port, lifetime)
			}
			req.Map.ExternalPort = extPort
			if extAddr != "" {
				a, err := netip.ParseAddr(extAddr)
				if err != nil {
					return usage(fmt.Errorf("map: --external-address %q is not an IP address", extAddr))
				}
				req.Map.ExternalAddr = a.Unmap()
			}
			if nonceHex != "" {
				b, err := hex.DecodeString(nonceHex)
				if err != nil || len(b) != len(req.Map.Nonce) {
					return usage(fmt.Errorf("map: --nonce %q: want %d hex octets", nonceHex, len(req.Map.Nonce)))
				}
				copy(req.Map.Nonce[:], b)
			}
			if thirdParty != "" {
				a, err := netip.ParseAddr(thirdParty)
				if err != nil {
					return usage(fmt.Errorf("map: --third-party %q is not an IP address", thirdParty))
				}
				req.Options.ThirdParty = a.Unmap()
			}
			req.Options.PreferFailure = preferFailure
			for _, f := range filters {
				flt, err := parseFilter(f)
				if err != nil {
					return usage(err)
				}
				req.Options.Filters = append(req.Options.Filters, flt)
			}
			if cmd.Flags().Changed("description") {
				req.Options.Description = []byte(description)
				req.Options.HasDescription = true
			}
			return cf.exchange(cmd, c, req, "map")
		},
	}
	cf.add(cmd)
	f := cmd.Flags()
	f.StringVar(&proto, "proto", "tcp", "`PROTO`: tcp, udp, or an IANA protocol number")
	f.Uint16Var(&port, "port", 0, "internal port `N` to open; required")
	f.Uint16Var(&extPort, "external-port", 0, "suggested external port `N` (0: no preference; pcpd then grants the internal port)")
	f.StringVar(&extAddr, "external-address", "", "suggested external address `ADDR` (default: all-zeros of the client's family; ::ffff:0.0.0.0 from an IPv6 client asks for an IPv4 mapping)")
	f.DurationVar(&lifetime, "lifetime", 2*time.Hour, "requested lifetime; the server clamps it to its own limits")
	f.BoolVar(&del, "delete", false, "delete the mapping (lifetime 0)")
	f.StringVar(&thirdParty, "third-party", "", "THIRD_PARTY option: open address `ADDR` instead of the sender's (§13.1)")
	f.BoolVar(&preferFailure, "prefer-failure", false, "PREFER_FAILURE option: fail rather than grant another external port (§13.2)")
	f.StringArrayVar(&filters, "filter", nil, "FILTER option: admit only this remote `PREFIX` or [PREFIX]:PORT (repeatable, §13.3)")
	f.StringVar(&description, "description", "", "DESCRIPTION option (RFC 7220) carrying `TEXT`")
	f.StringVar(&nonceHex, "nonce", "", "use mapping nonce `HEX` (24 hex digits) instead of a fresh one")
	f.StringVar(&peer, "peer", "", "send PEER for the connection to remote `[ADDR]:PORT` instead of MAP")
	return cmd
}

func parseProto(s string) (pcp.Protocol, error) {
	switch strings.ToLower(s) {
	case "tcp":
		return pcp.ProtoTCP, nil
	case "udp":
		return pcp.ProtoUDP, nil
	}
	n, err := strconv.ParseUint(s, 10, 8)
	if err != nil {
		return 0, fmt.Errorf("--proto %q: want tcp, udp or a protocol number", s)
	}
	return pcp.Protocol(n), nil
}

// parseFilter accepts PREFIX, ADDRESS, or [PREFIX]:PORT.
func parseFilter(s string) (pcp.Filter, error) {
	bad := fmt.Errorf("--filter %q: want PREFIX or [PREFIX]:PORT, e.g. [2001:db8:99::/48]:443", s)
	var port uint16
	body := s
	if strings.HasPrefix(s, "[") {
		end := strings.LastIndex(s, "]:")
		if end < 0 {
			return pcp.Filter{}, bad
		}
		n, err := strconv.ParseUint(s[end+2:], 10, 16)
		if err != nil {
			return pcp.Filter{}, bad
		}
		body, port = s[1:end], uint16(n)
	}
	p, err := netip.ParsePrefix(body)
	if err != nil {
		a, err := netip.ParseAddr(body)
		if err != nil {
			return pcp.Filter{}, bad
		}
		p = netip.PrefixFrom(a, a.BitLen())
	}
	return pcp.Filter{Remote: p, RemotePort: port}, nil
}

func printResponse(w io.Writer, req *pcp.Request, resp *pcp.Response) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "result\t%s\n", resp.Result)
	fmt.Fprintf(tw, "opcode\t%s\n", resp.Opcode)
	if resp.Opcode != pcp.OpAnnounce {
		fmt.Fprintf(tw, "lifetime\t%v\n", resp.Lifetime)
		internal := req.ClientAddr
		if req.Options.ThirdParty.IsValid() {
			internal = req.Options.ThirdParty
		}
		fmt.Fprintf(tw, "internal\t%s %s\n", netip.AddrPortFrom(internal, resp.Map.InternalPort), resp.Map.Protocol)
		if resp.Result == pcp.Success && req.Lifetime != 0 {
			fmt.Fprintf(tw, "external\t%s\n", netip.AddrPortFrom(resp.Map.ExternalAddr, resp.Map.ExternalPort))
		}
		if resp.Opcode == pcp.OpPeer {
			fmt.Fprintf(tw, "remote\t%s\n", netip.AddrPortFrom(resp.Peer.RemoteAddr, resp.Peer.RemotePort))
		}
		fmt.Fprintf(tw, "nonce\t%s\n", hex.EncodeToString(resp.Map.Nonce[:]))
	}
	fmt.Fprintf(tw, "epoch\t%d\n", resp.Epoch)
	tw.Flush()
}

func newAnnounceCmd() *cobra.Command {
	var cf clientFlags
	cmd := &cobra.Command{
		Use:   "announce --server ADDR [--client-ip ADDR]",
		Short: "Send a PCP ANNOUNCE to a server and print its result and epoch",
		Long: `Send one PCP ANNOUNCE request (RFC 6887 §14.1) to --server and print the
result and the server's epoch. ANNOUNCE changes nothing on the server; it is
the cheapest way to check that a PCP server answers on an address, and two
announces some seconds apart show its epoch counting.

Exits 0 on SUCCESS, 1 on any other result or when the server does not answer.`,
		Example: `  pcpd announce --server 2001:db8:1::1`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, local, err := cf.dial()
			if err != nil {
				return err
			}
			defer c.Conn.Close()
			req := pcp.NewAnnounce(local)
			return cf.exchange(cmd, c, req, "announce")
		},
	}
	cf.add(cmd)
	return cmd
}
