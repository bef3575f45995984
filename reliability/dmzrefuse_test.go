package reliability

import (
	"context"
	"net/netip"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
)

// TestNAPTRefusedBesideAdminDMZHostFirst (h/left9, issue 9): the admin
// adds a "DMZ" rule, every port of the public IPv4 address to a LAN
// host (ip daddr P dnat to H), in a chain at the standard dstnat, before
// pcpd's DNAT chain (dstnat + 1). The kernel binds a new connection at
// the first NAT chain that translates it, so every new connection to P
// goes to H, the clients' mappings' too. pcpd reads the rule and, while
// it is there, refuses new IPv4 mappings: NAT-PMP OUT_OF_RESOURCES, PCP
// MAP NO_RESOURCES (RFC 6887 §7.4: temporary, system-wide), no element in
// the kernel. A mapping held from before the rule is kept (its
// connections go to H meanwhile, the kernel's choice, shown here); when
// the admin removes the rule, new mappings are granted again, and both
// the new and the held mapping carry their connections to the client.
// Before (pcpd only warned): "NAT-PMP TCP 40082 with the admin's
// catch-all at dstnat: SUCCESS (external 40082), want OUT_OF_RESOURCES;
// a connection to it reached the client 0 times, the DMZ host 1".
func TestNAPTRefusedBesideAdminDMZHostFirst(t *testing.T) {
	const held, next = 40081, 40082
	d := newDMZLab(t, held)
	l, c, pub, dmz, extHeld, dmzHeld, cliHeld := d.l, d.c, d.l.topo.HostPublicV4, d.dmz, d.extHeld, d.dmzHeld, d.cliHeld
	dmzNext := acceptCounter(t, l.topo.Client, netip.AddrPortFrom(dmz, next).String())
	cliNext := acceptCounter(t, l.topo.Client, netip.AddrPortFrom(l.topo.ClientV4, next).String())

	// The admin's DMZ rule; pcpd reads it within its 2 s background read
	// (allocations were asked in the last 10 s).
	logged := func(off int, what string) bool {
		_, ok := waitFor(10*time.Second, func() bool { return strings.Contains(l.log.since(off), what) })
		return ok
	}
	off := l.log.len()
	l.topo.Host.MustRun(t, "nft", "add rule ip admin pre ip daddr "+pub.String()+" dnat to "+dmz.String())
	if !logged(off, "before pcpd's chain") {
		t.Fatalf("pcpd logged no catch-all before its chain within 10s of the admin's rule; log:\n%s", l.log.since(off))
	}
	pmp := func(port uint16) pcp.PMPResponse {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		var r pcp.PMPResponse
		if err := c.DoPMP(ctx, &pcp.PMPRequest{Opcode: pcp.PMPOpMapTCP, InternalPort: port, SuggestedExternalPort: port, Lifetime: time.Hour}, &r); err != nil {
			t.Fatalf("NAT-PMP TCP %d: %v", port, err)
		}
		return r
	}
	if r := pmp(next); r.Result != pcp.PMPOutOfResources {
		if r.Result == pcp.PMPSuccess {
			l.topo.Internet.DialTCP(netip.AddrPortFrom(pub, r.ExternalPort).String(), time.Second)
		}
		t.Fatalf("NAT-PMP TCP %d with the admin's catch-all at dstnat: %v (external %d), want OUT_OF_RESOURCES; a connection to it reached the client %d times, the DMZ host %d",
			next, r.Result, r.ExternalPort, cliNext.Load(), dmzNext.Load())
	}
	if r, err := do(c, pcp.NewMap(l.topo.ClientV4, pcp.ProtoUDP, next, time.Hour)); err != nil || r.Result != pcp.NoResources {
		t.Fatalf("PCP MAP UDP %d over IPv4 with the admin's catch-all at dstnat: %v, %v; want NO_RESOURCES", next, r, err)
	}
	if l.kernelHas(l.topo.ClientV4, pcp.ProtoTCP, next) || l.kernelHas(l.topo.ClientV4, pcp.ProtoUDP, next) {
		t.Fatalf("the kernel holds a mapping of %d after the refusals: %v", next, l.kernel())
	}
	if !strings.Contains(l.log.since(off), "new IPv4 mappings (PCP MAP, NAT-PMP) of its protocols are refused (NO_RESOURCES)") {
		t.Fatalf("the warning does not say that new IPv4 mappings are refused; log:\n%s", l.log.since(off))
	}
	// The held mapping: kept (in pcpd and the kernel), its connections
	// the DMZ host's while the rule is there.
	if !l.kernelHas(l.topo.ClientV4, pcp.ProtoTCP, held) {
		t.Fatalf("the held mapping %v is gone from the kernel", extHeld)
	}
	l.topo.Internet.DialTCP(extHeld.String(), time.Second)
	t.Logf("with the rule: the held mapping %v kept; a connection to it reached the DMZ host %d, the client %d (the kernel's NAT order)", extHeld, dmzHeld.Load(), cliHeld.Load()-1)

	// The rule goes: granted again, and the traffic is the client's.
	off = l.log.len()
	l.topo.Host.MustRun(t, "nft", "flush chain ip admin pre")
	if !logged(off, "new IPv4 mappings are granted again") {
		t.Fatalf("pcpd did not log that new IPv4 mappings are granted again within 10s of the rule's removal; log:\n%s", l.log.since(off))
	}
	extNext := l.mustPMP(c, pcp.PMPOpMapTCP, next, time.Hour)
	for _, d := range []struct {
		ext  netip.AddrPort
		want int64
		got  func() int64
	}{{extNext, 1, cliNext.Load}, {extHeld, 2, cliHeld.Load}} {
		if err := l.topo.Internet.DialTCP(d.ext.String(), time.Second); err != nil || d.got() != d.want {
			t.Fatalf("after the rule's removal, the mapping %v: %v, the client accepted %d (want %d)", d.ext, err, d.got(), d.want)
		}
	}
	if dmzNext.Load() != 0 {
		t.Fatalf("the DMZ host accepted %d connections to %d, want 0", dmzNext.Load(), next)
	}
}

// dmzLab is a lab with the admin's empty nat chain at dstnat (table ip
// admin, chain pre) and a NAT-PMP TCP mapping of port held made and
// reached from the Internet before any rule of the admin's; dmz is the
// DMZ host's address (on Client), dmzHeld and cliHeld count the
// connections to held each accepted.
type dmzLab struct {
	l                *lab
	c                *pcp.Client
	dmz              netip.Addr
	extHeld          netip.AddrPort
	dmzHeld, cliHeld *atomic.Int64
}

func newDMZLab(t *testing.T, held uint16) *dmzLab {
	l := newLab(t, labOptions{})
	d := &dmzLab{l: l, dmz: netip.MustParseAddr("10.100.2.7")}
	l.topo.Host.MustRun(t, "nft", "add table ip admin")
	l.topo.Host.MustRun(t, "nft", "add chain ip admin pre { type nat hook prerouting priority dstnat; }")
	l.start()
	d.c = l.pcpClient(l.topo.ClientV4)
	d.dmzHeld = acceptCounter(t, l.topo.Client, netip.AddrPortFrom(d.dmz, held).String())
	d.cliHeld = acceptCounter(t, l.topo.Client, netip.AddrPortFrom(l.topo.ClientV4, held).String())
	d.extHeld = l.mustPMP(d.c, pcp.PMPOpMapTCP, held, time.Hour)
	if err := l.topo.Internet.DialTCP(d.extHeld.String(), time.Second); err != nil || d.cliHeld.Load() != 1 {
		t.Fatalf("the held mapping %v before any rule: %v, the client accepted %d", d.extHeld, err, d.cliHeld.Load())
	}
	return d
}
