package server

import (
	"bytes"
	"context"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/google/nftables"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/policy"
)

// noKeyEnd is the setup of TestE2EWatchUndoesNoKeyEnd and
// TestE2EAuditUndoesNoKeyEnd (review h/revr6): a live MAP (c:443), then
// an element added by hand to pin6_addr_filter without a key end (raw
// netlink: nft always sends one, the kernel does not need it): c . the
// internet's address, one remote admitted to every protocol and port of
// c. It returns the live pinhole and the element's key.
func noKeyEnd(t *testing.T, l *lab) (live pinhole.Pinhole, key []byte) {
	live = liveMAP443(t, l)
	c := live.InternalAddr
	ca, ia := c.As16(), l.topo.InternetV6.As16()
	key = append(ca[:], ia[:]...)
	conn, set := noKeyEndSet(t, l)
	if err := conn.SetAddElements(set, []nftables.SetElement{{Key: key}}); err != nil {
		t.Fatal(err)
	}
	if err := conn.Flush(); err != nil {
		t.Fatalf("add pin6_addr_filter element without a key end: %v", err)
	}
	if l.srv.cfg.NoFirewallWatch && !l.reach(netip.AddrPortFrom(c, 1500)) { // the watch may have undone it already
		t.Fatal("the element without a key end admits nothing: the test proves nothing")
	}
	return live, key
}

func noKeyEndSet(t *testing.T, l *lab) (*nftables.Conn, *nftables.Set) {
	conn, err := l.topo.Host.NftConn()
	if err != nil {
		t.Fatal(err)
	}
	set, err := conn.GetSetByName(&nftables.Table{Name: "pcpd", Family: nftables.TableFamilyINet}, "pin6_addr_filter")
	if err != nil {
		t.Fatal(err)
	}
	return conn, set
}

// noKeyEndLeft: the kernel still holds the element of key (nil: gone).
func noKeyEndLeft(t *testing.T, l *lab, key []byte) error {
	conn, set := noKeyEndSet(t, l)
	return keyLeft(conn, set, key)
}

// keyLeft: set holds an element of key (nil: not).
func keyLeft(conn *nftables.Conn, set *nftables.Set, key []byte) error {
	es, err := conn.GetSetElements(set)
	if err != nil {
		return err
	}
	for _, e := range es {
		if bytes.Equal(e.Key, key) {
			return fmt.Errorf("%s %x (no key end, no lease) still held", set.Name, key)
		}
	}
	return nil
}

// TestE2EWatchUndoesNoKeyEnd (review h/revr6): the watch removes
// noKeyEnd's element, the live MAP's kept, c:1500 refused. Before,
// 'pin6_addr_filter ... (no key end, no lease) still held' after 20s:
// decode failed on it, the watch did not tell it.
func TestE2EWatchUndoesNoKeyEnd(t *testing.T) {
	l := watchLab(t)
	live, key := noKeyEnd(t, l)
	l.marker(t, 7270)
	if err := netlab.Eventually(watchBound, func() error { return noKeyEndLeft(t, l, key) }); err != nil {
		t.Fatalf("element without a key end added by hand: %v after %v", err, watchBound)
	}
	if _, held := l.kernelElem(live); !held {
		t.Fatal("the live MAP's element gone (or List fails)")
	}
	if l.reach(netip.AddrPortFrom(live.InternalAddr, 1500)) {
		t.Fatal("c:1500 reachable from the internet after the undo")
	}
}

// TestE2EAuditUndoesNoKeyEnd (review h/revr6): with the watch off, and
// the live MAP's element deleted by hand as well, one audit removes
// noKeyEnd's element and puts the live one back. Before, the element
// stayed and the live one was missing: List failed ('set
// pin6_addr_filter holds an element pcpd did not write: pinhole: short
// element'), the audit fixed nothing.
func TestE2EAuditUndoesNoKeyEnd(t *testing.T) {
	l := watchLab(t, func(c *Config, _ *policy.Config) { c.NoFirewallWatch = true })
	live, key := noKeyEnd(t, l)
	l.topo.Host.MustRun(t, "nft", "delete", "element", "inet", "pcpd", "pin6", fmt.Sprintf("{ %s . tcp . 443 }", live.InternalAddr))
	l.srv.auditFirewall(context.Background())
	if err := noKeyEndLeft(t, l, key); err != nil {
		t.Errorf("audit: %v", err)
	}
	if _, err := l.fw.List(); err != nil {
		t.Errorf("audit: List after it: %v", err)
	}
	if left, held := l.kernelElem(live); !held || left > time.Hour {
		t.Errorf("audit: the live MAP's element held %v, %v left (want held, at most 1h)", held, left)
	}
	if l.reach(netip.AddrPortFrom(live.InternalAddr, 1500)) {
		t.Error("audit: c:1500 reachable from the internet")
	}
}

// rangeOverMapping is the setup of TestE2EWatchUndoesRangeOverMapping
// and TestE2EAuditUndoesRangeOverMapping (review h/revr6): one
// transaction by hand deletes a live filtered mapping's napt4_filter
// element (pub:19090 from the internet's /24 -> c4:9090) and adds one
// pcpd never writes over it: external ports 19000-19100, same filter and
// target (permanent, no SNAT companion; an odd Pinhole). The live
// element's put-back starts inside it (refused). The odd element's
// Delete removes it alone, no companion; sharers still takes the live
// mapping for one whose SNAT companion meets it (snatMeets) and puts the
// live mapping's full Delete before, whose guard add starts inside the
// odd element: Apply leaves that Delete out (absentDelete: the live
// element is not there) and the rest goes. Coverage (passes on main): a
// port range pcpd never writes over a live mapping. It returns the live
// pinhole and the element added (nft's syntax).
func rangeOverMapping(t *testing.T, l *lab) (live pinhole.Pinhole, forged [][2]string) {
	c4, pub, inet4 := l.topo.ClientV4, l.topo.HostPublicV4, l.topo.InternetV4
	l.topo.Client.ServeTCP(t, netip.AddrPortFrom(c4, 9090).String())
	wide := netip.PrefixFrom(inet4, 24).Masked()
	if resp := l.pcp(mapFiltered(c4, 9090, 19090, wide, 1)); resp.Result != pcp.Success || resp.Map.ExternalPort != 19090 {
		t.Fatalf("filtered MAP IPv4: %+v", resp)
	}
	forged = [][2]string{{"napt4_filter", fmt.Sprintf("%s . tcp . 19000-19100 . %s . 0-65535 : %s . 9090", pub, wide, c4)}}
	l.topo.Host.MustRun(t, "sh", "-c", fmt.Sprintf("nft -f - <<'EOF'\ndelete element inet pcpd napt4_filter { %s . tcp . 19090 . %s . 0-65535 }\nadd element inet pcpd napt4_filter { %s }\nEOF\n",
		pub, wide, forged[0][1]))
	live = pinhole.Pinhole{Protocol: 6, InternalAddr: c4, InternalPort: 9090, ExternalAddr: pub, ExternalPort: 19090, RemotePrefix: wide}
	return live, forged
}

// rangeOverMappingLeft says what is wrong after rangeOverMapping's undo
// (nil: all as it should be).
func rangeOverMappingLeft(t *testing.T, l *lab, live pinhole.Pinhole, forged [][2]string) error {
	if err := byHandLeft(t, l, forged); err != nil {
		return err
	}
	if left, held := l.kernelElem(live); !held || left > time.Hour {
		return fmt.Errorf("the live filtered mapping held %v, %v left (want held, at most 1h)", held, left)
	}
	return nil
}

// TestE2EWatchUndoesRangeOverMapping (review h/revr6): the watch removes
// rangeOverMapping's element and puts the live one back; pub:19091 is
// refused, pub:19090 passes.
func TestE2EWatchUndoesRangeOverMapping(t *testing.T) {
	l := watchLab(t)
	live, forged := rangeOverMapping(t, l)
	l.marker(t, 7280)
	if err := netlab.Eventually(watchBound, func() error { return rangeOverMappingLeft(t, l, live, forged) }); err != nil {
		t.Fatalf("live filtered mapping replaced by hand by a port range over it: %v after %v", err, watchBound)
	}
	if l.reach(netip.AddrPortFrom(live.ExternalAddr, 19091)) {
		t.Fatal("pub:19091 reachable from the internet after the undo")
	}
	if !l.reach(netip.AddrPortFrom(live.ExternalAddr, live.ExternalPort)) {
		t.Fatal("the live filtered mapping passes no traffic after the undo")
	}
}

// TestE2EAuditUndoesRangeOverMapping (review h/revr6): with the watch
// off, one audit does the same.
func TestE2EAuditUndoesRangeOverMapping(t *testing.T) {
	l := watchLab(t, func(c *Config, _ *policy.Config) { c.NoFirewallWatch = true })
	live, forged := rangeOverMapping(t, l)
	if !l.reach(netip.AddrPortFrom(live.ExternalAddr, 19091)) {
		t.Fatal("the port range added by hand admits nothing: the test proves nothing")
	}
	l.srv.auditFirewall(context.Background())
	if err := rangeOverMappingLeft(t, l, live, forged); err != nil {
		t.Fatalf("audit: %v", err)
	}
	if l.reach(netip.AddrPortFrom(live.ExternalAddr, 19091)) {
		t.Fatal("audit: pub:19091 reachable from the internet")
	}
	if !l.reach(netip.AddrPortFrom(live.ExternalAddr, live.ExternalPort)) {
		t.Fatal("audit: the live filtered mapping passes no traffic")
	}
}

// TestE2EWatchUndoesSNATNoKeyEnd (review h/revr6): a snat4_filter
// element added by hand without a key end (c4:9191 . the internet's
// address . its port 5555 -> pub:29175, no map element) is told as the
// NAPT mapping whose companion it would be and undone. Before, the watch
// could not read it ('short element') and left it.
func TestE2EWatchUndoesSNATNoKeyEnd(t *testing.T) {
	l := watchLab(t)
	c4, pub, inet4 := l.topo.ClientV4.As4(), l.topo.HostPublicV4.As4(), l.topo.InternetV4.As4()
	key := append(append(append(append(c4[:], 6, 0, 0, 0), 0x23, 0xe7, 0, 0), inet4[:]...), 0x15, 0xb3, 0, 0)
	val := append(pub[:], 0x71, 0xf7, 0, 0)
	conn, err := l.topo.Host.NftConn()
	if err != nil {
		t.Fatal(err)
	}
	set, err := conn.GetSetByName(&nftables.Table{Name: "pcpd", Family: nftables.TableFamilyINet}, "snat4_filter")
	if err != nil {
		t.Fatal(err)
	}
	if err := conn.SetAddElements(set, []nftables.SetElement{{Key: key, Val: val}}); err != nil {
		t.Fatal(err)
	}
	if err := conn.Flush(); err != nil {
		t.Fatalf("add snat4_filter element without a key end: %v", err)
	}
	l.marker(t, 7300)
	if err := netlab.Eventually(watchBound, func() error { return keyLeft(conn, set, key) }); err != nil {
		t.Fatalf("%v after %v", err, watchBound)
	}
}

// catchAll is the setup of TestE2EAuditRepairsBesideCatchAll and
// TestE2EUndoesCatchAll (review h/revr6): a live MAP (c:443), then a
// catch-all element added by hand to pin6 (nft add element inet pcpd
// pin6 '{ * }'), which admits the internet to every port of every IPv6
// client (c:1500 reached). It returns c.
func catchAll(t *testing.T, l *lab) netip.Addr {
	c := liveMAP443(t, l).InternalAddr
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
// catch-all stayed). Since h/catchall the audit removes the catch-all
// too (TestE2EUndoesCatchAll).
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

// TestE2EUndoesCatchAll (review h/revr6; h/catchall): the watch, and the
// audit, remove catchAll's element; c:1500 refused. Before h/catchall,
// 'pin6 still holds a catch-all element' after 20s and after the audit,
// c:1500 reachable from the internet: its Delete (an empty key through
// google/nftables, which cannot send NFTA_SET_ELEM_FLAGS
// NFT_SET_ELEM_CATCHALL) was refused. Now it goes on a raw transaction
// of its own (pinhole's deleteCatchAll).
func TestE2EUndoesCatchAll(t *testing.T) {
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
	t.Run("watch snat4", func(t *testing.T) {
		// h/catchall: a SNAT map's catch-all (every new outbound IPv4
		// flow leaves from pub:9999); the watch only (List reads no
		// SNAT map). Before, 'still holds a catch-all' after 20s.
		l := watchLab(t)
		liveMAP443(t, l)
		l.topo.Host.MustRun(t, "nft", "add", "element", "inet", "pcpd", "snat4", fmt.Sprintf("{ * : %s . 9999 }", l.topo.HostPublicV4))
		l.marker(t, 7291)
		err := netlab.Eventually(watchBound, func() error {
			if out := l.topo.Host.MustRun(t, "nft", "list", "map", "inet", "pcpd", "snat4"); strings.Contains(out, "*") {
				return fmt.Errorf("snat4 still holds a catch-all (no lease):\n%s", out)
			}
			return nil
		})
		if err != nil {
			t.Errorf("%v after %v", err, watchBound)
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
