package server

import (
	"context"
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/policy"
)

// TestE2EAuditPutsBackDeletedCompanion (review h/revsnat, finding 1):
// with the watch off (as when it is deaf), the SNAT companions of two
// live mappings of c4 are deleted by hand, their map elements kept:
// 9090's (snat4) alone, and 1500's (snat4_filter) in one transaction
// with a port range by hand over it (c4:1000-2000 from everywhere ->
// pub:29999). One audit must put both companions back (and remove the
// range). Before, List skipped every companion of a mapping read, and
// said nothing of a mapping whose companion it did not read: the audit
// saw both mappings in place, and the clients' new outbound flows left
// from wherever masquerade sent them, for ever ('SNAT companion ... not
// held' after the audit).
func TestE2EAuditPutsBackDeletedCompanion(t *testing.T) {
	l := watchLab(t, func(c *Config, _ *policy.Config) { c.NoFirewallWatch = true })
	c4, pub, inet4 := l.topo.ClientV4, l.topo.HostPublicV4, l.topo.InternetV4
	wide := netip.PrefixFrom(inet4, 24).Masked()
	var lives []liveSNAT
	for i, r := range []*pcp.Request{
		mapReq(c4, pcp.ProtoTCP, 9090, 29090, time.Hour, 1),
		mapFiltered(c4, 1500, 21500, wide, 2),
	} {
		resp := l.pcp(r)
		if resp.Result != pcp.Success {
			t.Fatalf("MAP %d: %+v", i, resp)
		}
		p := pinhole.Pinhole{Protocol: 6, InternalAddr: c4, InternalPort: r.Map.InternalPort,
			ExternalAddr: pub, ExternalPort: resp.Map.ExternalPort}
		ls := liveSNAT{p: p, set: "snat4", key: fmt.Sprintf("%s . tcp . %d ", c4, p.InternalPort)}
		if len(r.Options.Filters) > 0 {
			p.RemotePrefix = wide
			ls.p, ls.set, ls.key = p, "snat4_filter", fmt.Sprintf("%s . tcp . %d . %s . 0-65535 ", c4, p.InternalPort, wide)
		}
		ls.data = fmt.Sprintf(": %s . %d", pub, p.ExternalPort)
		lives = append(lives, ls)
	}
	forged := [][2]string{{"snat4_filter", fmt.Sprintf("%s . tcp . 1000-2000 . 0.0.0.0/0 . 0-65535 : %s . 29999", c4, pub)}}
	script := fmt.Sprintf("delete element inet pcpd snat4 { %s . tcp . 9090 }\n", c4) +
		fmt.Sprintf("delete element inet pcpd snat4_filter { %s . tcp . 1500 . %s . 0-65535 }\n", c4, wide) +
		fmt.Sprintf("add element inet pcpd %s { %s }\n", forged[0][0], forged[0][1])
	l.topo.Host.MustRun(t, "sh", "-c", "nft -f - <<'EOF'\n"+script+"EOF\n")
	for _, ls := range lives {
		if companionHeld(t, l, ls) {
			t.Fatalf("%s: companion not deleted: the test proves nothing", ls.p)
		}
	}
	l.srv.auditFirewall(context.Background())
	if err := oddSNATLeft(t, l, lives, forged); err != nil {
		t.Errorf("audit: %v", err)
	}
	l.srv.auditFirewall(context.Background()) // a second audit changes nothing
	if err := oddSNATLeft(t, l, lives, forged); err != nil {
		t.Errorf("second audit: %v", err)
	}
}
