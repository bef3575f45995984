package server

import (
	"fmt"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/policy"
)

// TestE2EWatchReadsDMZRuleNow (root, namespaces; h/prio, issue 9, left of
// h/left9): a DMZ rule the admin adds (another table's, before pcpd's
// chain) is read when the firewall watch tells the commit, not at the
// next background read of the host's DNAT rules (every hostPortsTTL, 2 s
// + 0.5 s slack: the ~2.5 s before new mappings were refused). Here the
// background read never comes (Config.HostPortsTTL an hour): only the watch's
// kick can make pcpd refuse. Before: "a MAP after the admin's DMZ rule:
// SUCCESS, want NO_RESOURCES" for the whole 10 s.
func TestE2EWatchReadsDMZRuleNow(t *testing.T) {
	l := watchLab(t, func(c *Config, _ *policy.Config) { c.HostPortsTTL = time.Hour })
	n := byte(1)
	if r := l.pcp(mapReq(l.topo.ClientV4, pcp.ProtoTCP, 9480, 19480, time.Hour, n)); r.Result != pcp.Success {
		t.Fatalf("a MAP before any rule: %v", r.Result)
	}
	l.topo.Host.MustRun(t, "nft", "add table ip admin")
	l.topo.Host.MustRun(t, "nft", "add chain ip admin pre { type nat hook prerouting priority dstnat; }")
	added := time.Now()
	l.topo.Host.MustRun(t, "nft", "add rule ip admin pre ip daddr "+l.topo.HostPublicV4.String()+" dnat to 10.100.2.7")
	tries := 0
	err := netlab.Eventually(10*time.Second, func() error {
		n++
		tries++
		if r := l.pcp(mapReq(l.topo.ClientV4, pcp.ProtoTCP, 9480+uint16(n), 19480+uint16(n), time.Hour, n)); r.Result != pcp.NoResources {
			return fmt.Errorf("a MAP after the admin's DMZ rule: %v, want NO_RESOURCES", r.Result)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("refused %v after the rule's nft command began, at MAP %d (a figure: nft's own run included)", time.Since(added), tries)
	// And back when it goes.
	l.topo.Host.MustRun(t, "nft", "flush chain ip admin pre")
	if err := netlab.Eventually(10*time.Second, func() error {
		n++
		if r := l.pcp(mapReq(l.topo.ClientV4, pcp.ProtoTCP, 9480+uint16(n), 19480+uint16(n), time.Hour, n)); r.Result != pcp.Success {
			return fmt.Errorf("a MAP after the rule's removal: %v, want SUCCESS", r.Result)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
}
