package server

import (
	"bytes"
	"context"
	"fmt"
	"net/netip"
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
	return pinhole.Pinhole{Protocol: 6, InternalAddr: c, InternalPort: 443, ExternalAddr: c, ExternalPort: 443}, key
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
	es, err := conn.GetSetElements(set)
	if err != nil {
		return err
	}
	for _, e := range es {
		if bytes.Equal(e.Key, key) {
			return fmt.Errorf("pin6_addr_filter %x (no key end, no lease) still held", key)
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
