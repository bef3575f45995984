package server

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pcp"
)

// napt4Lab is a watch lab with a live IPv4 NAPT mapping c4:9090 <- pub:19090
// (1 h) serving TCP, reachable from the internet.
func napt4Lab(t *testing.T) (*lab, netip.Addr, netip.Addr) {
	l := watchLab(t)
	c4, pub := l.topo.ClientV4, l.topo.HostPublicV4
	l.topo.Client.ServeTCP(t, netip.AddrPortFrom(c4, 9090).String())
	if resp := l.pcp(mapReq(c4, pcp.ProtoTCP, 9090, 19090, time.Hour, 1)); resp.Result != pcp.Success || resp.Map.ExternalPort != 19090 {
		t.Fatalf("MAP IPv4: %+v", resp)
	}
	if !l.reach(netip.AddrPortFrom(pub, 19090)) {
		t.Fatal("the mapping passes no traffic before any tampering")
	}
	return l, c4, pub
}

// marker adds a pin6 hole by hand for a port no lease holds and waits until
// it is undone: the watch's passes come in commit order, so what was told
// before it has been handled.
func (l *lab) marker(t *testing.T, port uint16) {
	t.Helper()
	l.addByHand(t, port)
	if err := netlab.Eventually(watchBound, func() error {
		if _, held := l.holds(6, l.topo.ClientV6, port); held {
			return fmt.Errorf("marker port %d still in the kernel", port)
		}
		return nil
	}); err != nil {
		t.Fatalf("%v after %v", err, watchBound)
	}
}

// napt4Has reports whether napt4 holds an element for pub:port.
func (l *lab) napt4Has(t *testing.T, pub netip.Addr, port uint16) bool {
	out := l.topo.Host.MustRun(t, "nft", "list", "map", "inet", "pcpd", "napt4")
	return strings.Contains(out, fmt.Sprintf("%s . tcp . %d ", pub, port))
}

// TestE2EWatchUndoesNAPTOnLiveEndpoint (review h/revfwadd): a NAPT mapping
// added by hand (permanent) for the internal endpoint of a live lease's
// mapping, on another external port, opens that endpoint on a port no lease
// explains. Its undo is a Delete, whose SNAT companion (keyed by the
// internal endpoint) clashes with the live mapping's: the kernel refused
// it, undoAdds left it out, and the hole stayed (the audit's own Delete is
// refused the same way, failing its whole batch). Now the live mapping's
// elements are taken out and put back around the Delete in the same
// transaction: the hole is gone, the live mapping and its SNAT companion
// stay, with no more than the lease's lifetime.
func TestE2EWatchUndoesNAPTOnLiveEndpoint(t *testing.T) {
	l, c4, pub := napt4Lab(t)
	l.topo.Host.MustRun(t, "nft", "add", "element", "inet", "pcpd", "napt4", fmt.Sprintf("{ %s . tcp . 19091 : %s . 9090 }", pub, c4))
	l.marker(t, 7100)
	if err := netlab.Eventually(watchBound, func() error {
		if l.napt4Has(t, pub, 19091) {
			return errors.New("pub:19091 -> c4:9090 (no lease) still in napt4")
		}
		return nil
	}); err != nil {
		t.Fatalf("NAPT hole added by hand on a live mapping's endpoint: %v after %v", err, watchBound)
	}
	if l.reach(netip.AddrPortFrom(pub, 19091)) {
		t.Fatal("pub:19091 reachable from the internet after the undo")
	}
	if !l.napt4Has(t, pub, 19090) || !l.reach(netip.AddrPortFrom(pub, 19090)) {
		t.Fatal("the live mapping pub:19090 lost by the undo")
	}
	out := l.topo.Host.MustRun(t, "nft", "list", "map", "inet", "pcpd", "snat4")
	if !strings.Contains(out, fmt.Sprintf("%s . tcp . 9090", c4)) || !strings.Contains(out, fmt.Sprintf(": %s . 19090", pub)) {
		t.Fatalf("the live mapping's SNAT companion lost by the undo:\n%s", out)
	}
	if left, held := l.holds(6, c4, 9090); !held || left > time.Hour {
		t.Fatalf("live mapping held %v with %v left, want at most the lease's 1h", held, left)
	}
}

// TestE2EWatchUndoesReplacedMapping (review h/revfwadd): one transaction
// by hand replaces a live lease's NAPT element (pub:19090 -> c4:9090) with
// another target (-> c4:9091, no lease). The watch tells the delete and
// the add in one pass: restoreDeleted's Install of the live mapping was
// refused (the key is taken by the foreign element) and, its whole batch
// failed, waited for the audit; undoAdds then deleted the foreign element,
// so the live lease was left with no DNAT until the audit or its renewal.
// Another live lease's pin6 element deleted in the same transaction
// waited for the audit too (the refused install failed restoreDeleted's
// whole batch). Now both are back, the mapping passes traffic, the
// foreign element is gone.
func TestE2EWatchUndoesReplacedMapping(t *testing.T) {
	l, c4, pub := napt4Lab(t)
	c := l.topo.ClientV6
	if resp := l.pcp(mapReq(c, pcp.ProtoTCP, 443, 0, time.Hour, 1)); resp.Result != pcp.Success {
		t.Fatalf("MAP: %+v", resp)
	}
	l.topo.Host.MustRun(t, "sh", "-c", fmt.Sprintf("nft -f - <<'EOF'\ndelete element inet pcpd pin6 { %s . tcp . 443 }\ndelete element inet pcpd napt4 { %s . tcp . 19090 }\nadd element inet pcpd napt4 { %s . tcp . 19090 timeout 1h : %s . 9091 }\nEOF\n", c, pub, pub, c4))
	l.marker(t, 7101)
	if err := netlab.Eventually(watchBound, func() error {
		if _, held := l.holds(6, c, 443); !held {
			return errors.New("the other live lease's pin6 element, deleted in the same transaction, not back")
		}
		if _, held := l.holds(6, c4, 9091); held {
			return errors.New("foreign c4:9091 still in napt4")
		}
		if left, held := l.holds(6, c4, 9090); !held || left > time.Hour {
			return fmt.Errorf("live mapping held %v, %v left", held, left)
		}
		return nil
	}); err != nil {
		t.Fatalf("live NAPT element replaced by hand: %v after %v", err, watchBound)
	}
	if !l.reach(netip.AddrPortFrom(pub, 19090)) {
		t.Fatal("the live mapping passes no traffic after the undo")
	}
}
