package server

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/policy"
)

// mapFiltered is a MAP request with one FILTER (remote prefix, any port).
func mapFiltered(client netip.Addr, port, sugg uint16, remote netip.Prefix, n byte) *pcp.Request {
	r := mapReq(client, pcp.ProtoTCP, port, sugg, time.Hour, n)
	r.Options.Filters = []pcp.Filter{{Remote: remote}}
	return r
}

// kernelElem reports whether the kernel holds exactly p (all fields, the
// filter too) and its remaining time.
func (l *lab) kernelElem(p pinhole.Pinhole) (time.Duration, bool) {
	es, err := l.fw.List()
	if err != nil {
		return 0, false
	}
	for _, e := range es {
		if e.Pinhole == p {
			return e.Remaining, true
		}
	}
	return 0, false
}

// TestE2EWatchUndoesOverlappingFiltered (h/watchleft): a foreign element
// in a concatenated-range (pipapo) set whose range overlaps a live lease's
// element is undone, and the live element stays (or is put back), with no
// more than its lease; the kernel no longer holds the foreign range.
//
//   - NAPT, companion inside the live one's: a napt4_filter element added
//     by hand (pub:19091 from the internet's /32 -> c4:9090, permanent) on
//     the internal endpoint of a live filtered mapping (pub:19090 from the
//     /24 -> c4:9090). Its undo, a Delete, first adds its SNAT companion
//     (c4:9090 . /32), whose range starts inside the live mapping's
//     (c4:9090 . /24): the kernel refuses it (EEXIST), undoAdds left the
//     group out, and the audit's Delete is refused the same way: the hole
//     stayed for as long as the live mapping.
//   - IPv6, widened by hand: one transaction deletes a live lease's
//     pin6_filter element (c:443 from 2001:db8:ffff::/48) and adds the same
//     port from everywhere (::/0, 1 h). The live element's put-back starts
//     inside the foreign one: refused; undoAdds then deleted the foreign
//     element alone, leaving the live lease without its pinhole until the
//     hourly audit or its renewal.
func TestE2EWatchUndoesOverlappingFiltered(t *testing.T) {
	l := watchLab(t)
	c, c4, pub, inet4 := l.topo.ClientV6, l.topo.ClientV4, l.topo.HostPublicV4, l.topo.InternetV4
	t.Run("napt companion inside", func(t *testing.T) {
		l.topo.Client.ServeTCP(t, netip.AddrPortFrom(c4, 9090).String())
		live := netip.PrefixFrom(inet4, 24).Masked()
		if resp := l.pcp(mapFiltered(c4, 9090, 19090, live, 1)); resp.Result != pcp.Success || resp.Map.ExternalPort != 19090 {
			t.Fatalf("filtered MAP IPv4: %+v", resp)
		}
		if !l.reach(netip.AddrPortFrom(pub, 19090)) {
			t.Fatal("the live filtered mapping passes no traffic before any tampering")
		}
		l.topo.Host.MustRun(t, "nft", "add", "element", "inet", "pcpd", "napt4_filter",
			fmt.Sprintf("{ %s . tcp . 19091 . %s/32 . 0-65535 : %s . 9090 }", pub, inet4, c4))
		foreign := pinhole.Pinhole{Protocol: 6, InternalAddr: c4, InternalPort: 9090, ExternalAddr: pub, ExternalPort: 19091,
			RemotePrefix: netip.PrefixFrom(inet4, 32)}
		l.marker(t, 7200)
		if err := netlab.Eventually(watchBound, func() error {
			if _, held := l.kernelElem(foreign); held {
				return errors.New("pub:19091 from the internet -> c4:9090 (no lease) still in napt4_filter")
			}
			return nil
		}); err != nil {
			t.Fatalf("filtered NAPT hole added by hand on a live filtered mapping's endpoint: %v after %v", err, watchBound)
		}
		if l.reach(netip.AddrPortFrom(pub, 19091)) {
			t.Fatal("pub:19091 reachable from the internet after the undo")
		}
		p := pinhole.Pinhole{Protocol: 6, InternalAddr: c4, InternalPort: 9090, ExternalAddr: pub, ExternalPort: 19090, RemotePrefix: live}
		if left, held := l.kernelElem(p); !held || left > time.Hour {
			t.Fatalf("the live filtered mapping held %v with %v left, want at most the lease's 1h", held, left)
		}
		out := l.topo.Host.MustRun(t, "nft", "list", "map", "inet", "pcpd", "snat4_filter")
		if !strings.Contains(out, fmt.Sprintf("%s . tcp . 9090 . %s", c4, live)) || strings.Contains(out, ": "+pub.String()+" . 19091") {
			t.Fatalf("snat4_filter after the undo: want the live mapping's companion alone:\n%s", out)
		}
		if !l.reach(netip.AddrPortFrom(pub, 19090)) {
			t.Fatal("the live filtered mapping passes no traffic after the undo")
		}
	})
	t.Run("pin6_filter widened", func(t *testing.T) {
		l.topo.Client.ServeTCP(t, netip.AddrPortFrom(c, 443).String())
		live := netip.MustParsePrefix("2001:db8:ffff::/48")
		if resp := l.pcp(mapFiltered(c, 443, 0, live, 2)); resp.Result != pcp.Success {
			t.Fatalf("filtered MAP: %+v", resp)
		}
		p := pinhole.Pinhole{Protocol: 6, InternalAddr: c, InternalPort: 443, ExternalAddr: c, ExternalPort: 443, RemotePrefix: live}
		if _, held := l.kernelElem(p); !held || !l.reach(netip.AddrPortFrom(c, 443)) {
			t.Fatalf("the live filtered pinhole: held %v, or no traffic, before any tampering", held)
		}
		l.topo.Host.MustRun(t, "sh", "-c", fmt.Sprintf("nft -f - <<'EOF'\ndelete element inet pcpd pin6_filter { %s . tcp . 443 . %s . 0-65535 }\nadd element inet pcpd pin6_filter { %s . tcp . 443 . ::/0 . 0-65535 timeout 1h }\nEOF\n", c, live, c))
		foreign := p
		foreign.RemotePrefix = netip.MustParsePrefix("::/0")
		l.marker(t, 7201)
		if err := netlab.Eventually(watchBound, func() error {
			if _, held := l.kernelElem(foreign); held {
				return errors.New("c:443 from ::/0 (no lease) still in pin6_filter")
			}
			if left, held := l.kernelElem(p); !held || left > time.Hour {
				return fmt.Errorf("the live filtered pinhole held %v, %v left (want held, at most 1h)", held, left)
			}
			return nil
		}); err != nil {
			t.Fatalf("live filtered element replaced by a wider one by hand: %v after %v", err, watchBound)
		}
		if !l.reach(netip.AddrPortFrom(c, 443)) {
			t.Fatal("the live filtered pinhole passes no traffic after the undo")
		}
	})
}

// TestE2EAuditOverlappingFiltered (h/watchleft): with the watch off, the
// audit's fixes for the two cases of TestE2EWatchUndoesOverlappingFiltered:
// a napt4_filter element by hand whose SNAT companion would start inside a
// live filtered mapping's is removed (before, its Delete was refused at
// every audit: the hole stayed for as long as the live mapping), and a
// live pin6_filter element replaced by hand with a wider one (::/0) is
// back, the wider one gone (before, the put-back was refused in the same
// transaction as the orphan's delete: missing until the next audit).
func TestE2EAuditOverlappingFiltered(t *testing.T) {
	l := watchLab(t, func(c *Config, _ *policy.Config) { c.NoFirewallWatch = true })
	c, c4, pub, inet4 := l.topo.ClientV6, l.topo.ClientV4, l.topo.HostPublicV4, l.topo.InternetV4
	l.topo.Client.ServeTCP(t, netip.AddrPortFrom(c4, 9090).String())
	l.topo.Client.ServeTCP(t, netip.AddrPortFrom(c, 443).String())
	live4, live6 := netip.PrefixFrom(inet4, 24).Masked(), netip.MustParsePrefix("2001:db8:ffff::/48")
	if resp := l.pcp(mapFiltered(c4, 9090, 19090, live4, 1)); resp.Result != pcp.Success || resp.Map.ExternalPort != 19090 {
		t.Fatalf("filtered MAP IPv4: %+v", resp)
	}
	if resp := l.pcp(mapFiltered(c, 443, 0, live6, 2)); resp.Result != pcp.Success {
		t.Fatalf("filtered MAP: %+v", resp)
	}
	l.topo.Host.MustRun(t, "nft", "add", "element", "inet", "pcpd", "napt4_filter",
		fmt.Sprintf("{ %s . tcp . 19091 . %s/32 . 0-65535 : %s . 9090 }", pub, inet4, c4))
	l.topo.Host.MustRun(t, "sh", "-c", fmt.Sprintf("nft -f - <<'EOF'\ndelete element inet pcpd pin6_filter { %s . tcp . 443 . %s . 0-65535 }\nadd element inet pcpd pin6_filter { %s . tcp . 443 . ::/0 . 0-65535 timeout 1h }\nEOF\n", c, live6, c))
	foreign4 := pinhole.Pinhole{Protocol: 6, InternalAddr: c4, InternalPort: 9090, ExternalAddr: pub, ExternalPort: 19091,
		RemotePrefix: netip.PrefixFrom(inet4, 32)}
	p4 := foreign4
	p4.ExternalPort, p4.RemotePrefix = 19090, live4
	p6 := pinhole.Pinhole{Protocol: 6, InternalAddr: c, InternalPort: 443, ExternalAddr: c, ExternalPort: 443, RemotePrefix: live6}
	foreign6 := p6
	foreign6.RemotePrefix = netip.MustParsePrefix("::/0")
	l.srv.auditFirewall(context.Background())
	if _, held := l.kernelElem(foreign4); held {
		t.Error("audit: pub:19091 from the internet -> c4:9090 (no lease) still in napt4_filter")
	}
	if _, held := l.kernelElem(foreign6); held {
		t.Error("audit: c:443 from ::/0 (no lease) still in pin6_filter")
	}
	if left, held := l.kernelElem(p6); !held || left > time.Hour {
		t.Errorf("audit: the live filtered pinhole held %v, %v left (want held, at most 1h)", held, left)
	}
	if left, held := l.kernelElem(p4); !held || left > time.Hour || !l.reach(netip.AddrPortFrom(pub, 19090)) {
		t.Errorf("audit: the live filtered mapping held %v, %v left, or passes no traffic", held, left)
	}
	if l.reach(netip.AddrPortFrom(pub, 19091)) {
		t.Error("audit: pub:19091 reachable from the internet")
	}
	if !l.reach(netip.AddrPortFrom(c, 443)) {
		t.Error("audit: the live filtered pinhole passes no traffic")
	}
}

// TestE2EWatchRestoreGap (h/watchleft): deletions told within
// watchCheckGap of the last put-back wait for the gap's end, gathered, as
// adds do (TestE2EWatchAddGap): a tool deleting a live lease's element in
// a loop for 3 s gets at most a put-back a gap (the passes are at least a
// gap apart: at most elapsed/gap + 2 of them, elapsed from the loop's
// start until the element is back), and the element is back once the loop
// stops, with no more than the lease. Before, every notification burst
// was put back at once: one transaction per deletion, as fast as the tool
// deletes.
func TestE2EWatchRestoreGap(t *testing.T) {
	l := watchLab(t)
	c := l.topo.ClientV6
	if r := l.pcp(mapReq(c, pcp.ProtoTCP, 443, 0, time.Hour, 1)); r.Result != pcp.Success {
		t.Fatalf("%+v", r)
	}
	start := time.Now()
	out := l.topo.Host.MustRun(t, "sh", "-c", fmt.Sprintf(`n=0; end=$(( $(date +%%s) + 3 )); while [ $(date +%%s) -lt $end ]; do nft delete element inet pcpd pin6 '{ %s . tcp . 443 }' 2>/dev/null && n=$((n+1)); done; echo $n`, c))
	left := l.waitHolds(t, "after the loop", 6, c, 443)
	elapsed := time.Since(start)
	if left > time.Hour {
		t.Fatalf("put back with %v, beyond the lease", left)
	}
	var deletes int
	if _, err := fmt.Sscan(out, &deletes); err != nil || deletes < 2 {
		t.Fatalf("the loop deleted %q times, want at least 2 (else it shows nothing)", strings.TrimSpace(out))
	}
	restored := counterValue(t, l.srv.m.watchRestored)
	if most := float64(elapsed/watchCheckGap) + 2; restored > most {
		t.Fatalf("%d deletions by hand in %v: %v put-backs (pcpd_firewall_watch_restored_total), want at most %v (one a %v gap)",
			deletes, elapsed.Round(time.Millisecond), restored, most, watchCheckGap)
	}
	t.Logf("%d deletions by hand, %v put-backs in %v", deletes, restored, elapsed.Round(time.Millisecond))
}
