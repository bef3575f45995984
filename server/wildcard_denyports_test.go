package server

import (
	"net/netip"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/policy"
)

// TestE2EWildcardKeepsDeniedPorts: --deny-ports says "these internal ports
// are never opened, even if allowed", and --allow-ports lists "the only
// ports that may be opened". A TCP all-ports MAP (MAP-05, allowed with
// --allow-all-ports) must not open, in the kernel, a port either rule
// keeps closed: it is either refused or leaves that port dropped. Checked
// with real TCP from the Internet namespace; a port the rules allow shows
// that the wildcard itself was installed.
func TestE2EWildcardKeepsDeniedPorts(t *testing.T) {
	for _, tc := range []struct {
		name         string
		allow, deny  []policy.PortRange
		closed, open uint16
	}{
		{name: "deny-ports 2222", deny: []policy.PortRange{{First: 2222, Last: 2222}}, closed: 2222, open: 3333},
		{name: "allow-ports 3000-65535", allow: []policy.PortRange{{First: 3000, Last: 65535}}, closed: 2222, open: 3333},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l := newLab(t, func(_ *Config, p *policy.Config) {
				p.AllowAllPorts = true
				p.AllowPorts, p.DenyPorts = tc.allow, tc.deny
			})
			c := l.topo.ClientV6
			closed, open := netip.AddrPortFrom(c, tc.closed), netip.AddrPortFrom(c, tc.open)
			l.topo.Client.ServeTCP(t, closed.String())
			l.topo.Client.ServeTCP(t, open.String())
			if l.reach(closed) || l.reach(open) {
				t.Fatal("open before any MAP")
			}
			// The same rules refuse the port asked for by itself.
			if resp := l.pcp(mapReq(c, pcp.ProtoTCP, tc.closed, 0, time.Hour, 1)); resp.Result != pcp.NotAuthorized {
				t.Fatalf("MAP of port %d alone: %v, want NOT_AUTHORIZED", tc.closed, resp.Result)
			}
			resp := l.pcp(mapReq(c, pcp.ProtoTCP, 0, 0, time.Hour, 2))
			if resp.Result != pcp.Success {
				return // refused whole: nothing opened (checked below in the kernel anyway)
			}
			if !l.reach(open) {
				t.Fatalf("all-ports mapping granted but port %d not open", tc.open)
			}
			if l.reach(closed) {
				t.Fatalf("all-ports mapping opened port %d, which the port rules never open (kernel: %v)", tc.closed, l.kernelHoles())
			}
		})
	}
}
