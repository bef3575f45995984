package server

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/pinhole"
)

// TestE2EWatchUndoesNarrowerOnLiveMapping (review h/revwl): one
// transaction by hand deletes a live filtered mapping's napt4_filter
// element (pub:19090 from a /24 -> c4:9090) and adds a narrower one on the
// same external and internal endpoint (pub:19090 from a /26 strictly
// inside the /24, permanent, no SNAT companion). The live element goes
// back around it (restoreDeleted: a wider element is accepted). The
// foreign one overlaps the live one's map element (mapMeets) AND its
// would-be SNAT companion (c4:9090 . /26) starts inside the live
// companion (c4:9090 . /24): h/watchleft's sharers took the live one out
// before the Delete only when the map elements did not meet, so the
// Delete's guard add of the companion was refused (EEXIST), by undoAdds
// and by every audit alike: the element no lease holds stayed for as long
// as the live mapping, and after it (the engine's delete of the live
// mapping leaves it) until an audit. Now the live mapping is taken out
// before whenever the companions meet with distinct keys.
func TestE2EWatchUndoesNarrowerOnLiveMapping(t *testing.T) {
	l := watchLab(t)
	c4, pub, inet4 := l.topo.ClientV4, l.topo.HostPublicV4, l.topo.InternetV4
	l.topo.Client.ServeTCP(t, netip.AddrPortFrom(c4, 9090).String())
	live := netip.PrefixFrom(inet4, 24).Masked()
	if resp := l.pcp(mapFiltered(c4, 9090, 19090, live, 1)); resp.Result != pcp.Success || resp.Map.ExternalPort != 19090 {
		t.Fatalf("filtered MAP IPv4: %+v", resp)
	}
	a := live.Addr().As4()
	a[3] = 64
	narrow := netip.PrefixFrom(netip.AddrFrom4(a), 26)
	l.topo.Host.MustRun(t, "sh", "-c", fmt.Sprintf("nft -f - <<'EOF'\ndelete element inet pcpd napt4_filter { %s . tcp . 19090 . %s . 0-65535 }\nadd element inet pcpd napt4_filter { %s . tcp . 19090 . %s . 0-65535 : %s . 9090 }\nEOF\n",
		pub, live, pub, narrow, c4))
	p := pinhole.Pinhole{Protocol: 6, InternalAddr: c4, InternalPort: 9090, ExternalAddr: pub, ExternalPort: 19090, RemotePrefix: live}
	foreign := p
	foreign.RemotePrefix = narrow
	l.marker(t, 7210)
	if err := netlab.Eventually(watchBound, func() error {
		if _, held := l.kernelElem(foreign); held {
			return fmt.Errorf("pub:19090 from %s -> c4:9090 (no lease) still in napt4_filter", narrow)
		}
		if left, held := l.kernelElem(p); !held || left > time.Hour {
			return fmt.Errorf("the live filtered mapping held %v, %v left (want held, at most 1h)", held, left)
		}
		return nil
	}); err != nil {
		t.Fatalf("live filtered mapping replaced by hand by a narrower one: %v after %v", err, watchBound)
	}
	out := l.topo.Host.MustRun(t, "nft", "list", "map", "inet", "pcpd", "snat4_filter")
	if !strings.Contains(out, fmt.Sprintf("%s . tcp . 9090 . %s", c4, live)) || strings.Contains(out, narrow.String()) {
		t.Fatalf("snat4_filter after the undo: want the live mapping's companion alone:\n%s", out)
	}
	if !l.reach(netip.AddrPortFrom(pub, 19090)) {
		t.Fatal("the live filtered mapping passes no traffic after the undo")
	}
	// The same endpoints, a wider foreign filter (a /16 around the live
	// /24, added while the live one is there: it wraps it): the live
	// mapping is not taken out before (its guard add would start inside
	// the foreign one); the foreign one's Delete wraps the companion.
	l.topo.Client.ServeTCP(t, netip.AddrPortFrom(c4, 9091).String())
	if resp := l.pcp(mapFiltered(c4, 9091, 19092, live, 2)); resp.Result != pcp.Success || resp.Map.ExternalPort != 19092 {
		t.Fatalf("filtered MAP IPv4: %+v", resp)
	}
	wide := netip.PrefixFrom(inet4, 16).Masked()
	l.topo.Host.MustRun(t, "nft", "add", "element", "inet", "pcpd", "napt4_filter",
		fmt.Sprintf("{ %s . tcp . 19092 . %s . 0-65535 : %s . 9091 }", pub, wide, c4))
	p2 := p
	p2.InternalPort, p2.ExternalPort = 9091, 19092
	foreign2 := p2
	foreign2.RemotePrefix = wide
	l.marker(t, 7211)
	if err := netlab.Eventually(watchBound, func() error {
		if _, held := l.kernelElem(foreign2); held {
			return fmt.Errorf("pub:19092 from %s -> c4:9091 (no lease) still in napt4_filter", wide)
		}
		if left, held := l.kernelElem(p2); !held || left > time.Hour {
			return fmt.Errorf("the live filtered mapping held %v, %v left (want held, at most 1h)", held, left)
		}
		return nil
	}); err != nil {
		t.Fatalf("a wider mapping by hand around a live filtered one: %v after %v", err, watchBound)
	}
	if !l.reach(netip.AddrPortFrom(pub, 19092)) {
		t.Fatal("the live filtered mapping on 19092 passes no traffic after the undo")
	}
}

// TestE2EWatchUndoesSplitFiltered (review h/revwl): one transaction by
// hand deletes a live lease's pin6_filter element (c:443 from
// 2001:db8:ffff::/48) and adds its two halves (the /49s, 1 h). Each half's
// undo is its Delete with the live element put back After: the put-back
// starts or ends inside the other half, still there, so the kernel
// refused each group whole, at every undo and audit alike (each group
// refused while the other's element stays): both foreign elements stayed,
// the live one missing, until they ended. Now a refused put-back is left
// out of its group (with its take-out) and the rest of the group tried
// again: the first half goes, then the second with the put-back.
func TestE2EWatchUndoesSplitFiltered(t *testing.T) {
	l := watchLab(t)
	c := l.topo.ClientV6
	l.topo.Client.ServeTCP(t, netip.AddrPortFrom(c, 443).String())
	live := netip.MustParsePrefix("2001:db8:ffff::/48")
	if resp := l.pcp(mapFiltered(c, 443, 0, live, 1)); resp.Result != pcp.Success {
		t.Fatalf("filtered MAP: %+v", resp)
	}
	p := pinhole.Pinhole{Protocol: 6, InternalAddr: c, InternalPort: 443, ExternalAddr: c, ExternalPort: 443, RemotePrefix: live}
	halves := []netip.Prefix{netip.MustParsePrefix("2001:db8:ffff::/49"), netip.MustParsePrefix("2001:db8:ffff:8000::/49")}
	l.topo.Host.MustRun(t, "sh", "-c", fmt.Sprintf("nft -f - <<'EOF'\ndelete element inet pcpd pin6_filter { %s . tcp . 443 . %s . 0-65535 }\nadd element inet pcpd pin6_filter { %s . tcp . 443 . %s . 0-65535 timeout 1h, %s . tcp . 443 . %s . 0-65535 timeout 1h }\nEOF\n",
		c, live, c, halves[0], c, halves[1]))
	l.marker(t, 7212)
	if err := netlab.Eventually(watchBound, func() error {
		for _, h := range halves {
			q := p
			q.RemotePrefix = h
			if _, held := l.kernelElem(q); held {
				return fmt.Errorf("c:443 from %s (no lease) still in pin6_filter", h)
			}
		}
		if left, held := l.kernelElem(p); !held || left > time.Hour {
			return fmt.Errorf("the live filtered pinhole held %v, %v left (want held, at most 1h)", held, left)
		}
		return nil
	}); err != nil {
		t.Fatalf("live filtered element split by hand into its two halves: %v after %v", err, watchBound)
	}
}
