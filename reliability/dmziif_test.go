package reliability

import (
	"context"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
)

// TestNAPTDMZByInputInterface (h/prio, issue 9): a DMZ rule of the
// admin's limited to an input interface ("iifname "wan0" ip daddr P dnat
// to H", at dstnat, before pcpd's chain) takes every new connection to P
// that arrives on that interface. pcpd's mapped connections arrive on the
// interface holding P (wan0 here), so a rule limited to it, by name, by
// a wildcard ("wa*"), by a set, by index (iif) or by "!=" another
// interface, takes them all and refuses new IPv4 mappings as an
// unconditional one does; one limited to another interface (lan0) takes
// none of the Internet's (only the LAN's hairpinned ones: warned about,
// review h/revpr): granted, and the Internet's connection reaches the
// client. Each row is judged by where a real connection from the
// Internet lands. Before, every interface condition was only warned
// about ("a condition on its path is not read") and mappings were
// granted beside the rule: see RELIABILITY.md.
func TestNAPTDMZByInputInterface(t *testing.T) {
	d := newDMZLab(t, 40181)
	l, c, pub, dmz, extHeld, dmzHeld := d.l, d.c, d.l.topo.HostPublicV4, d.dmz, d.extHeld, d.dmzHeld
	wan := l.topo.HostWANIf
	for i, tc := range []struct {
		cond   string
		refuse bool
	}{
		{`iifname "` + wan + `"`, true},
		{`iifname "` + wan[:2] + `*"`, true},
		{`iifname { "ppp0", "` + wan[:3] + `*" }`, true},
		{`iif "` + wan + `"`, true},
		{`iifname != "` + l.topo.HostLANIf + `"`, true},
		{`iifname "` + l.topo.HostLANIf + `"`, false},
		{`iifname { "ppp0", "` + l.topo.HostLANIf + `" }`, false},
	} {
		marker := 40300 + i
		port := uint16(40200 + i)
		dmzPort := acceptCounter(t, l.topo.Client, netip.AddrPortFrom(dmz, port).String())
		cliPort := acceptCounter(t, l.topo.Client, netip.AddrPortFrom(l.topo.ClientV4, port).String())
		off := l.log.len()
		// A forward of a marker port in the same commit: once pcpd
		// logs it reserved, it has read the DMZ rule too.
		l.topo.Host.MustRun(t, "sh", "-c", fmt.Sprintf("nft flush chain ip admin pre && nft -f - <<'E'\nadd rule ip admin pre ip daddr %s tcp dport %d dnat to %s\nadd rule ip admin pre %s ip daddr %s dnat to %s\nE",
			pub, marker, dmz, tc.cond, pub, dmz))
		if _, ok := waitFor(10*time.Second, func() bool { return strings.Contains(l.log.since(off), fmt.Sprint(marker)) }); !ok {
			t.Fatalf("%s: pcpd did not read the rules within 10s; log:\n%s", tc.cond, l.log.since(off))
		}
		before := dmzHeld.Load()
		l.topo.Internet.DialTCP(extHeld.String(), time.Second)
		if took := dmzHeld.Load() > before; took != tc.refuse {
			t.Fatalf("%s: the rule took the Internet's connection to the held mapping: %v, want %v (the kernel's answer; the test's premise)", tc.cond, took, tc.refuse)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		var r pcp.PMPResponse
		err := c.DoPMP(ctx, &pcp.PMPRequest{Opcode: pcp.PMPOpMapTCP, InternalPort: port, SuggestedExternalPort: port, Lifetime: time.Hour}, &r)
		cancel()
		if err != nil {
			t.Fatalf("%s: NAT-PMP TCP %d: %v", tc.cond, port, err)
		}
		if tc.refuse {
			if r.Result != pcp.PMPOutOfResources {
				if r.Result == pcp.PMPSuccess {
					l.topo.Internet.DialTCP(netip.AddrPortFrom(pub, r.ExternalPort).String(), time.Second)
				}
				t.Errorf("%s: NAT-PMP TCP %d: %v (external %d), want OUT_OF_RESOURCES; a connection to it reached the client %d times, the DMZ host %d",
					tc.cond, port, r.Result, r.ExternalPort, cliPort.Load(), dmzPort.Load())
			}
			continue
		}
		if r.Result != pcp.PMPSuccess {
			t.Errorf("%s: NAT-PMP TCP %d: %v, want SUCCESS (the rule takes no connection arriving on %s)", tc.cond, port, r.Result, wan)
			continue
		}
		ext := netip.AddrPortFrom(pub, r.ExternalPort)
		if err := l.topo.Internet.DialTCP(ext.String(), time.Second); err != nil || cliPort.Load() != 1 || dmzPort.Load() != 0 {
			t.Errorf("%s: the granted mapping %v: %v, the client accepted %d, the DMZ host %d; want 1, 0", tc.cond, ext, err, cliPort.Load(), dmzPort.Load())
		}
	}
}
