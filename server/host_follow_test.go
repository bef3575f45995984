package server

import (
	"context"
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/policy"
)

// TestMapRefusedOnceHostTakesAddress: the daemon's host-address set
// (policy.HostSet.Run, as cmd/pcpd serve runs it) follows the host's
// address notifications: in a namespace whose periodic read is an hour
// away, an address added to the host's interface (inside client a's
// prefix: its own, or its IPv4 subnet's broadcast) is refused as a MAP
// target within a bound the periodic read cannot meet, and granted again
// once removed. Before, the set was re-read only every 5 s, and a MAP in
// between was granted (until the sweep revoked it:
// TestLeaseRevokedWhenHostGainsTarget); without the notifications (Run's
// subscription failing) the first row times out still granted.
func TestMapRefusedOnceHostTakesAddress(t *testing.T) {
	ns := netlab.NewNS(t, "hostev")
	ns.MustRun(t, "ip", "link", "add", "hostev0", "type", "veth", "peer", "name", "hostev1")
	ns.MustRun(t, "ip", "link", "set", "hostev0", "up")
	ns.MustRun(t, "ip", "link", "set", "hostev1", "up")
	host := &policy.HostSet{Every: time.Hour}
	if err := ns.Do(host.Refresh); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ran := make(chan error, 1)
	go func() { ran <- ns.Do(func() error { return host.Run(ctx) }) }()
	defer func() { cancel(); <-ran }()
	h := newHarness(t, func(_ *Config, pc *policy.Config) {
		pc.HostAddrs, pc.HostAddrsRead, pc.HostAddrsGen = host.Contains, host.Read, host.Gen
	})
	n := byte(0)
	mapTP := func(src, target netip.Addr) pcp.ResultCode {
		n++
		r := mapReq(src, pcp.ProtoTCP, 1000+uint16(n), 0, time.Hour, n)
		r.Options.ThirdParty = target
		return h.do(r).Result
	}
	// until polls a MAP of target until it is answered want, for at most
	// 2 s: a bound, not a speed (the periodic read is an hour away).
	until := func(t *testing.T, what string, src, target netip.Addr, want pcp.ResultCode) {
		t.Helper()
		var got pcp.ResultCode
		if err := netlab.Eventually(2*time.Second, func() error {
			if got = mapTP(src, target); got != want {
				return fmt.Errorf("%v", got)
			}
			return nil
		}); err != nil {
			t.Fatalf("%s: MAP of %v still %v after 2 s, want %v", what, target, got, want)
		}
	}
	for _, c := range []struct {
		name   string
		prefix string // added to the host's interface
		src    netip.Addr
		target netip.Addr
	}{
		{"IPv6 address", "2001:db8:a::7/64", addrA, netip.MustParseAddr("2001:db8:a::7")},
		{"IPv4 address", "10.0.0.9/28", v4A, netip.MustParseAddr("10.0.0.9")},
		{"IPv4 subnet broadcast", "10.0.0.9/28", v4A, netip.MustParseAddr("10.0.0.15")},
	} {
		t.Run(c.name, func(t *testing.T) {
			if r := mapTP(c.src, c.target); r != pcp.Success {
				t.Fatalf("MAP of %v before the host has it: %v", c.target, r)
			}
			ns.MustRun(t, "ip", "addr", "add", c.prefix, "dev", "hostev0")
			defer ns.Run("ip", "addr", "flush", "dev", "hostev0", "scope", "global") // a failed row leaves none
			until(t, "host took "+c.prefix, c.src, c.target, pcp.NotAuthorized)
			ns.MustRun(t, "ip", "addr", "del", c.prefix, "dev", "hostev0")
			until(t, "host gave up "+c.prefix, c.src, c.target, pcp.Success)
		})
	}
}
