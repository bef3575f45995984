package server

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/policy"
)

// catchAll is the setup of TestE2EAuditRepairsBesideCatchAll and
// TestE2EUndoesCatchAll (review h/revr6): a live MAP (c:443), then a
// catch-all element added by hand to pin6 (nft add element inet pcpd
// pin6 '{ * }'), which admits the internet to every port of every IPv6
// client (c:1500 reached). It returns c.
func catchAll(t *testing.T, l *lab) netip.Addr {
	c := l.topo.ClientV6
	for _, port := range []uint16{443, 1500} {
		l.topo.Client.ServeTCP(t, netip.AddrPortFrom(c, port).String())
	}
	if resp := l.pcp(mapReq(c, pcp.ProtoTCP, 443, 0, time.Hour, 1)); resp.Result != pcp.Success {
		t.Fatalf("MAP: %+v", resp)
	}
	if l.reach(netip.AddrPortFrom(c, 1500)) {
		t.Fatal("c:1500 reachable from the internet before any tampering")
	}
	l.topo.Host.MustRun(t, "nft", "add", "element", "inet", "pcpd", "pin6", "{ * }")
	return c
}

// catchAllLeft: pin6 still holds a catch-all element (nil: not).
func catchAllLeft(t *testing.T, l *lab) error {
	if out := l.topo.Host.MustRun(t, "nft", "list", "set", "inet", "pcpd", "pin6"); strings.Contains(out, "*") {
		return fmt.Errorf("pin6 still holds a catch-all element (no lease):\n%s", out)
	}
	return nil
}

// TestE2EAuditRepairsBesideCatchAll (review h/revr6): with the watch
// off, a catch-all element in pin6 and the live MAP's element deleted by
// hand, one audit puts the live element back. Before, List failed ('set
// pin6 holds an element pcpd did not write: pinhole: short element'):
// 'the live MAP's element held false' (no audit fixed anything while the
// catch-all stayed). The catch-all itself stays (TestE2EUndoesCatchAll).
func TestE2EAuditRepairsBesideCatchAll(t *testing.T) {
	l := watchLab(t, func(c *Config, _ *policy.Config) { c.NoFirewallWatch = true })
	c := catchAll(t, l)
	if !l.reach(netip.AddrPortFrom(c, 1500)) {
		t.Fatal("the catch-all element admits nothing: the test proves nothing")
	}
	l.topo.Host.MustRun(t, "nft", "delete", "element", "inet", "pcpd", "pin6", fmt.Sprintf("{ %s . tcp . 443 }", c))
	l.srv.auditFirewall(context.Background())
	if _, err := l.fw.List(); err != nil {
		t.Errorf("audit: List: %v", err)
	}
	live := pinhole.Pinhole{Protocol: 6, InternalAddr: c, InternalPort: 443, ExternalAddr: c, ExternalPort: 443}
	if left, held := l.kernelElem(live); !held || left > time.Hour {
		t.Errorf("audit: the live MAP's element held %v, %v left (want held, at most 1h)", held, left)
	}
}

// TestE2EUndoesCatchAll (review h/revr6, a known gap: PCPD_KNOWN_BUGS=1
// to run): the watch, and the audit, remove catchAll's element. Fails:
// 'pin6 still holds a catch-all element' after 20s and after the audit,
// c:1500 reachable from the internet. A catch-all is deleted by an
// element with NFTA_SET_ELEM_FLAGS NFT_SET_ELEM_CATCHALL and no key,
// which google/nftables v0.3.0 cannot send (makeElemList always sends a
// key, and only the interval-end flag); pcpd's Delete of it (an empty
// key) is refused.
func TestE2EUndoesCatchAll(t *testing.T) {
	if os.Getenv("PCPD_KNOWN_BUGS") == "" {
		t.Skip("known gap: a catch-all element by hand stays (RELIABILITY.md, review h/revr6); PCPD_KNOWN_BUGS=1 to run (fails)")
	}
	t.Run("watch", func(t *testing.T) {
		l := watchLab(t)
		c := catchAll(t, l)
		l.marker(t, 7290)
		if err := netlab.Eventually(watchBound, func() error { return catchAllLeft(t, l) }); err != nil {
			t.Errorf("%v after %v", err, watchBound)
		}
		if l.reach(netip.AddrPortFrom(c, 1500)) {
			t.Error("c:1500 reachable from the internet after the undo")
		}
	})
	t.Run("audit", func(t *testing.T) {
		l := watchLab(t, func(c *Config, _ *policy.Config) { c.NoFirewallWatch = true })
		c := catchAll(t, l)
		l.srv.auditFirewall(context.Background())
		if err := catchAllLeft(t, l); err != nil {
			t.Error(err)
		}
		if l.reach(netip.AddrPortFrom(c, 1500)) {
			t.Error("c:1500 reachable from the internet after the audit")
		}
	})
}
