package server

import (
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	vnetlink "github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/policy"
)

// Review of h/ctleft (h/revctl, 2026-12-05).

// TestE2EEndpointRetakenEndsOldFlow (root, namespaces): an IPv6 PCP MAP
// of port 9800 is deleted and, in the same batch, the client maps its
// port 9801 with external port 9800: a redirect (the kernel now DNATs
// 9800 to 9801). The connection the deleted MAP admitted, to port 9800
// itself, is admitted by no live mapping: the redirect sends new packets
// to 9801. It used to survive: the redirect, live when the MAP ended,
// "admitted every flow to the endpoint" (pinhole.Pinhole.Admits looks
// at where a flow was sent, not where the kernel delivers it), so the
// flush dropped the filter. IPv4 NAT-PMP cannot do it this way (MAP-22:
// the freed port's quarantine lets only the same internal endpoint
// reclaim it). Fails that way without the fix: the flow is still
// tracked after the batch's flush.
func TestE2EEndpointRetakenEndsOldFlow(t *testing.T) {
	l := newLab(t, func(_ *Config, p *policy.Config) { p.MinLifetime = time.Second })
	const port = 9800
	conn, src, dst := l.inbound(t, "map6", port, time.Hour)
	serveEcho(t, l.topo.Client, netip.AddrPortFrom(l.topo.ClientV6, port+1))
	req := func(r *pcp.Request) Request {
		return Request{Local: l.server6(), Source: netip.AddrPortFrom(l.topo.ClientV6, 5351), Iface: l.topo.HostLANIf, Data: pcp.AppendRequest(nil, r)}
	}
	out := l.srv.HandleBatch([]Request{
		req(mapReq(l.topo.ClientV6, pcp.ProtoTCP, port, port, 0, 1)),
		req(mapReq(l.topo.ClientV6, pcp.ProtoTCP, port+1, port, time.Hour, 2)),
	})
	var r pcp.Response
	if err := pcp.ParseResponse(out[1], &r); err != nil || r.Result != pcp.Success {
		t.Fatalf("MAP of %d: %+v %v", port+1, r, err)
	}
	if r.Map.ExternalPort != port {
		t.Fatalf("MAP of %d got external port %d, want %d (the redirect)", port+1, r.Map.ExternalPort, port)
	}
	if n := len(l.srv.Leases()); n != 1 {
		t.Fatalf("%d leases, want the redirect only", n)
	}
	// HandleBatch returned without waiting for the walk (the ruleset
	// cut the IPv6 MAP's flows: mustWaitFlush); wait for it.
	l.srv.waitConntrack()
	if f := l.ctFlow(t, src, dst); f != nil {
		t.Errorf("the deleted MAP's connection is still tracked: %s", f)
	}
	if err := echoOnce(conn); err == nil {
		t.Error("the deleted MAP's connection still carries data")
	}
}

// TestCtAdmitsDelivery: a live pinhole spares a flow only if it admits
// the packet as sent (pinhole.Pinhole.Admits) and the kernel would deliver
// it where the flow goes (the reply tuple's source): an IPv4 NAPT or IPv6
// redirect to its internal endpoint, a plain IPv6 pinhole to the address
// and port it admits. Before, where the flow was delivered was not looked
// at: a mapping that took over the external endpoint (DNAT-ing it to
// another internal port or host) spared the flows of the one that ended.
func TestCtAdmitsDelivery(t *testing.T) {
	a4, b4 := netip.MustParseAddr("10.0.0.2"), netip.MustParseAddr("10.0.0.3")
	ext := netip.MustParseAddr("192.0.2.1")
	a6 := netip.MustParseAddr("2001:db8::2")
	rem := netip.MustParseAddrPort("198.51.100.7:40000")
	rem6 := netip.MustParseAddrPort("[2001:db8:9::7]:40000")
	ap := netip.AddrPortFrom
	napt := pinhole.Pinhole{Protocol: 6, InternalAddr: a4, InternalPort: 80, ExternalAddr: ext, ExternalPort: 5000}
	redir := pinhole.Pinhole{Protocol: 6, InternalAddr: a6, InternalPort: 443, ExternalAddr: a6, ExternalPort: 80}
	plain := pinhole.Pinhole{Protocol: 6, InternalAddr: a6, InternalPort: 80}
	all := pinhole.Pinhole{Protocol: 6, InternalAddr: a6}
	for _, c := range []struct {
		name    string
		p       pinhole.Pinhole
		src     netip.AddrPort
		dst, to netip.AddrPort
		want    bool
	}{
		{"NAPT, its internal endpoint", napt, rem, ap(ext, 5000), ap(a4, 80), true},
		{"NAPT, another internal port", napt, rem, ap(ext, 5000), ap(a4, 81), false},
		{"NAPT, another internal host", napt, rem, ap(ext, 5000), ap(b4, 80), false},
		{"NAPT, another external port", napt, rem, ap(ext, 5001), ap(a4, 80), false},
		{"redirect, its internal port", redir, rem6, ap(a6, 80), ap(a6, 443), true},
		{"redirect, another internal port", redir, rem6, ap(a6, 80), ap(a6, 8443), false},
		{"redirect, untranslated flow", redir, rem6, ap(a6, 80), ap(a6, 80), false},
		{"plain, untranslated", plain, rem6, ap(a6, 80), ap(a6, 80), true},
		{"plain, a flow an ended redirect DNAT-ed elsewhere", plain, rem6, ap(a6, 80), ap(a6, 443), false},
		{"all-ports, untranslated", all, rem6, ap(a6, 80), ap(a6, 80), true},
		{"all-ports, DNAT-ed to a port it admits", all, rem6, ap(a6, 80), ap(a6, 443), true},
	} {
		t.Run(c.name, func(t *testing.T) {
			a := ctAdmits{{addr: c.dst.Addr(), proto: 6, port: c.dst.Port()}: {c.p}}
			if got := a.admitted(ctTarget{addr: c.dst.Addr(), proto: 6, port: c.dst.Port()}, c.src, c.to); got != c.want {
				t.Errorf("admitted %v, want %v", got, c.want)
			}
		})
	}
}

// TestCtFlushClosedStopsRetrying: once the server stops (Serve returns:
// ctFlusher.close), a walk that fails is not retried and its waiters go;
// the flusher's goroutine ends. Before, it retried every 10 s for good
// after Serve returned, dialling conntrack in Config.NetNS, a descriptor
// its owner may have closed (and the number reused) by then.
func TestCtFlushClosedStopsRetrying(t *testing.T) {
	var mu sync.Mutex
	walks := 0
	walked := make(chan struct{}, 100)
	fl := &ctFlusher{retryFirst: time.Hour, retryMax: time.Hour,
		walk: func(fs []ctFilter) ([]ctFilter, error) {
			mu.Lock()
			walks++
			mu.Unlock()
			walked <- struct{}{}
			return fs, unix.EBUSY
		},
	}
	fl.add([]ctFilter{{t: ctTarget{port: 1}}})
	released := make(chan struct{})
	fl.after(fl.seq(), func() { close(released) })
	<-walked // failed; in its hour-long backoff
	fl.close()
	select {
	case <-released:
	case <-time.After(5 * time.Second):
		t.Fatal("waiter not released after close")
	}
	waitFor(t, func() bool {
		fl.mu.Lock()
		defer fl.mu.Unlock()
		return !fl.running
	})
	fl.mu.Lock()
	running := fl.running
	fl.mu.Unlock()
	if running {
		t.Fatal("flusher still retrying after close")
	}
	// After close a flush still runs once, without retries.
	fl.add([]ctFilter{{t: ctTarget{port: 2}}})
	<-walked
	waitFor(t, func() bool {
		fl.mu.Lock()
		defer fl.mu.Unlock()
		return !fl.running
	})
	mu.Lock()
	defer mu.Unlock()
	if walks != 2 {
		t.Errorf("%d walks, want 2 (one per flush, no retry)", walks)
	}
}

// TestCtFlushExpiredAtStartSparesOnlyAdmitted: a MAP that expired while
// pcpd was down shares its endpoint with a PEER restored live (its
// remote only). At the start, the MAP's flows are flushed but for those
// the PEER admits (spareLive), as at an expiry with pcpd running. Before,
// flushExpired (and retryUndeleted) dropped the filters of every
// endpoint a restored lease held: the MAP's connections from every other
// remote lasted their conntrack timeout (TCP established: 5 days).
// Fails without the fix: no filter of the endpoint reaches the walk.
func TestCtFlushExpiredAtStartSparesOnlyAdmitted(t *testing.T) {
	h := newHarness(t)
	r := &ctRecorder{}
	h.startCt(t, r)
	h.expect(h.do(peerReq(addrA, pcp.ProtoTCP, 80, remote, time.Hour, 1)), pcp.Success)
	resp := h.do(mapReq(addrA, pcp.ProtoTCP, 80, 80, time.Minute, 2))
	h.expect(resp, pcp.Success)
	ext := netip.AddrPortFrom(resp.Map.ExternalAddr, resp.Map.ExternalPort)
	h.clock.Advance(2 * time.Minute) // the MAP expires while pcpd is down
	h.startCt(t, r)
	if n := h.s.tab.len(); n != 1 {
		t.Fatalf("%d leases restored, want the PEER", n)
	}
	h.ctDrain(t)
	if !r.has(ext.Addr(), ext.Port(), false) {
		t.Fatalf("no flush of the expired MAP's endpoint %v", ext)
	}
	// The walk asks the live leases: the PEER keeps its remote's flow.
	tg := ctTarget{addr: ext.Addr(), proto: protoTCP, port: ext.Port()}
	other := netip.AddrPortFrom(remote.Addr(), remote.Port()+1)
	hs := []ctHit{{t: tg, src: remote, to: ext}, {t: tg, src: other, to: ext}}
	h.s.spareLive(hs)
	if !hs[0].keep || hs[1].keep {
		t.Errorf("kept the PEER's remote's flow %v, another's %v; want true, false", hs[0].keep, hs[1].keep)
	}
}

// TestCtKeepAdmittedGeneric: the generic walk's filter (kernels without
// CTA_FILTER) spares a flow as the kernel-filtered walk does: only if a
// live pinhole admits it where the kernel delivered it (the reply's
// source). Without the fix a redirect that took the endpoint spared the
// flows DNAT-ed to the old port (row 2 fails).
func TestCtKeepAdmittedGeneric(t *testing.T) {
	a6 := netip.MustParseAddr("2001:db8::2")
	rem6 := netip.MustParseAddrPort("[2001:db8:9::7]:40000")
	tg := ctTarget{addr: a6, proto: protoTCP, port: 80}
	redir := pinhole.Pinhole{Protocol: protoTCP, InternalAddr: a6, InternalPort: 443, ExternalAddr: a6, ExternalPort: 80}
	k := keepAdmitted{nf: ctFilter{t: tg}.netlinkFilter(), t: tg, admits: ctAdmits{tg: {redir}}}
	for _, c := range []struct {
		to    uint16 // where the flow was delivered
		ended bool
	}{{443, false}, {8443, true}, {80, true}} {
		fl := &vnetlink.ConntrackFlow{FamilyType: unix.AF_INET6}
		fl.Forward = vnetlink.IPTuple{Protocol: protoTCP, SrcIP: rem6.Addr().AsSlice(), SrcPort: rem6.Port(), DstIP: a6.AsSlice(), DstPort: 80}
		fl.Reverse = vnetlink.IPTuple{Protocol: protoTCP, SrcIP: a6.AsSlice(), SrcPort: c.to, DstIP: rem6.Addr().AsSlice(), DstPort: rem6.Port()}
		if got := k.MatchConntrackFlow(fl); got != c.ended {
			t.Errorf("flow delivered at port %d: ended %v, want %v", c.to, got, c.ended)
		}
	}
}

// TestCtEnd: a generic walk's flow tuple read as an endpoint, IPv4-mapped
// addresses unmapped as the kernel-filtered walk's (ctnl) are, a missing
// address the zero one.
func TestCtEnd(t *testing.T) {
	for _, c := range []struct {
		ip   net.IP
		port uint16
		want netip.AddrPort
	}{
		{net.IP{192, 0, 2, 7}, 80, netip.MustParseAddrPort("192.0.2.7:80")},
		{net.ParseIP("192.0.2.7"), 443, netip.MustParseAddrPort("192.0.2.7:443")}, // 16-octet form
		{net.ParseIP("2001:db8::2"), 8080, netip.MustParseAddrPort("[2001:db8::2]:8080")},
		{nil, 53, netip.AddrPortFrom(netip.Addr{}, 53)},
	} {
		if got := ctEnd(c.ip, c.port); got != c.want {
			t.Errorf("ctEnd(%v, %d) = %v, want %v", c.ip, c.port, got, c.want)
		}
	}
}
