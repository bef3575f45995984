package server

import (
	"context"
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/policy"
)

// TestE2EAuditNAPTOnLiveEndpoint (review h/revfwadd): with the watch off,
// a NAPT mapping added by hand for a live mapping's internal endpoint on
// another external port, and another live lease's pin6 element deleted by
// hand: the audit removes the first and puts back the second, the live
// mapping intact. Before, the orphan's Delete was refused (its SNAT
// companion clashes with the live mapping's) and failed the audit's whole
// batch: neither fixed, at every audit, for as long as the foreign
// element lived (h/fwadd's Left said this one "waits for the audit").
func TestE2EAuditNAPTOnLiveEndpoint(t *testing.T) {
	l := watchLab(t, func(c *Config, _ *policy.Config) { c.NoFirewallWatch = true })
	c, c4, pub := l.topo.ClientV6, l.topo.ClientV4, l.topo.HostPublicV4
	l.topo.Client.ServeTCP(t, netip.AddrPortFrom(c4, 9090).String())
	if resp := l.pcp(mapReq(c4, pcp.ProtoTCP, 9090, 19090, time.Hour, 1)); resp.Result != pcp.Success || resp.Map.ExternalPort != 19090 {
		t.Fatalf("MAP IPv4: %+v", resp)
	}
	if resp := l.pcp(mapReq(c, pcp.ProtoTCP, 443, 0, time.Hour, 1)); resp.Result != pcp.Success {
		t.Fatalf("MAP: %+v", resp)
	}
	l.topo.Host.MustRun(t, "nft", "add", "element", "inet", "pcpd", "napt4", fmt.Sprintf("{ %s . tcp . 19091 : %s . 9090 }", pub, c4))
	l.topo.Host.MustRun(t, "nft", "delete", "element", "inet", "pcpd", "pin6", fmt.Sprintf("{ %s . tcp . 443 }", c))
	l.srv.auditFirewall(context.Background())
	if l.napt4Has(t, pub, 19091) {
		t.Error("audit: pub:19091 -> c4:9090 (no lease) still in napt4")
	}
	if _, held := l.holds(6, c, 443); !held {
		t.Error("audit: the live lease's pin6 element not put back")
	}
	if !l.napt4Has(t, pub, 19090) || !l.reach(netip.AddrPortFrom(pub, 19090)) {
		t.Error("audit: the live mapping lost")
	}
}
