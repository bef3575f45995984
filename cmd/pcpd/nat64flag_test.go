package main

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/internal/pcpdtest"
	"github.com/pcpd/pcpd/pcp"
)

// TestServeNAT64PrefixFlag (review h/revp64): --nat64-prefix reaches the
// policy and the start-up warning. The client owns its /64 and the
// operator names a /96 inside it as the network's NAT64 prefix: a
// THIRD_PARTY MAP for an address there is NOT_AUTHORIZED and puts
// nothing in the kernel, one for an address beside it is granted, and
// the overlap is warned of once. The policy and config tests alone
// passed with the flag parsed but not handed to policy.New (serve.go).
// The kernel's owner meter gets the prefix too (h/meter64): a source
// inside it misses owners6 (the unowned bucket), one beside it maps to
// the client's chain.
func TestServeNAT64PrefixFlag(t *testing.T) {
	netlab.RequireRoot(t)
	topo := netlab.NewTopology(t, netlab.TopologyOptions{})
	b := topo.ClientPrefix6.Addr().As16()
	b[11] = 0x64
	nsp := netip.PrefixFrom(netip.AddrFrom16(b), 96)
	copy(b[12:], []byte{198, 51, 100, 2})
	inside := netip.AddrFrom16(b)                     // 198.51.100.2 through the NSP
	beside := netip.MustParseAddr("2001:db8:1:2::20") // the client's /64, outside the NSP
	if !topo.ClientPrefix6.Contains(inside) || !topo.ClientPrefix6.Contains(beside) || nsp.Contains(beside) {
		t.Fatalf("topology changed: %v, %v, %v", topo.ClientPrefix6, inside, beside)
	}
	dir := t.TempDir()
	d := pcpdtest.Start(t, pcpdtest.Config{
		NS: topo.Host,
		Args: []string{"serve", "--interface", topo.HostLANIf,
			"--client", "home=" + topo.ClientPrefix6.String(),
			"--nat64-prefix", nsp.String(),
			"--state-dir", filepath.Join(dir, "state"), "--socket", filepath.Join(dir, "pcpd.sock"),
		},
		Ready: pcpdtest.Announce(topo.Client, topo.ClientV6, netip.AddrPortFrom(topo.HostTunnelV6, pcp.Port)),
	})
	defer d.Stop()
	var conn *net.UDPConn
	if err := topo.Client.Do(func() (err error) {
		conn, err = net.ListenUDP("udp6", net.UDPAddrFromAddrPort(netip.AddrPortFrom(topo.ClientV6, 0)))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	c := &pcp.Client{Conn: conn, Server: netip.AddrPortFrom(topo.HostTunnelV6, pcp.Port)}
	for _, tc := range []struct {
		target netip.Addr
		want   pcp.ResultCode
	}{{inside, pcp.NotAuthorized}, {beside, pcp.Success}} {
		req := pcp.NewMap(topo.ClientV6, pcp.ProtoTCP, 2222, time.Hour)
		req.Map.Nonce = pcp.Nonce{1, byte(tc.want)}
		req.Options.ThirdParty = tc.target
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		var resp pcp.Response
		err := c.Do(ctx, req, &resp)
		cancel()
		if err != nil || resp.Result != tc.want {
			t.Errorf("THIRD_PARTY MAP %v:2222 with --nat64-prefix %v: %v, %v; want %v", tc.target, nsp, resp.Result, err, tc.want)
		}
	}
	rules := topo.Host.MustRun(t, "nft", "list", "table", "inet", "pcpd")
	if strings.Contains(rules, inside.String()) || !strings.Contains(rules, beside.String()) {
		t.Errorf("kernel: want %v's pinhole and none for %v:\n%s", beside, inside, rules)
	}
	// The kernel's owner meter (serve: pinhole.Meter.Unowned, the
	// policy's translation prefixes): a source inside the NSP misses
	// owners6, so it draws on the unowned bucket, not home's; one beside
	// maps to home's chain.
	if err := netlab.Eventually(5*time.Second, func() error {
		if out, err := topo.Host.Run("nft", "get", "element", "inet", "pcpd", "owners6", "{", beside.String(), "}"); err != nil || !strings.Contains(out, "jump owner_") {
			return fmt.Errorf("owners6 lookup of %v: want home's chain, got %v:\n%s", beside, err, out)
		}
		return nil
	}); err != nil {
		t.Error(err)
	}
	if out, err := topo.Host.Run("nft", "get", "element", "inet", "pcpd", "owners6", "{", inside.String(), "}"); err == nil {
		t.Errorf("owners6 holds %v, inside --nat64-prefix %v (want a miss: the unowned bucket):\n%s", inside, nsp, out)
	}
	if err := netlab.Eventually(5*time.Second, func() error {
		if n := strings.Count(d.Log().String(), "client prefix overlaps an IPv6-to-IPv4 translation prefix"); n != 1 {
			return fmt.Errorf("%d overlap warnings, want 1", n)
		}
		return nil
	}); err != nil {
		t.Errorf("%v:\n%s", err, d.Log().Tail(20))
	}
}
