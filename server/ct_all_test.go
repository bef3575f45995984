package server

import (
	"fmt"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/policy"
	"github.com/pcpd/pcpd/server/servertest"
)

// The end of an IPv6 all-ports (and all-protocols) mapping ends its
// inbound flows (h/ctall): it made no flush filter at all (the external
// port is 0), so the flows it admitted outlived it through the guard's
// "ct state established accept".

// TestE2EAllPortsMapEndEndsFlows (root, namespaces): an IPv6 TCP all-ports
// MAP (MAP-05) admits a connection to a port of its address no other
// mapping opens; its delete or its expiry ends that connection (its
// conntrack entry is flushed). A connection that a specific-port MAP of
// the same address, live throughout, admits too is kept, and still
// carries data.
//
// Fails without the fix: the all-ports MAP's flow is still tracked
// ctFlushBound after its delete (or expiry).
func TestE2EAllPortsMapEndEndsFlows(t *testing.T) {
	for i, c := range []struct {
		name   string
		expire bool // the all-ports MAP expires (else: deleted)
		other  bool // a specific-port MAP of the address, with its own connection, lives on
	}{
		{"delete", false, false},
		{"expiry", true, false},
		{"delete, a port MAP lives on", false, true},
		{"expiry, a port MAP lives on", true, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			l := newLab(t, func(_ *Config, p *policy.Config) {
				p.MinLifetime = time.Second
				p.AllowAllPorts = true
			})
			port := uint16(9800 + 2*i) // only the all-ports MAP opens it
			var kept net.Conn
			var keptSrc, keptDst netip.AddrPort
			if c.other {
				kept, keptSrc, keptDst = l.inbound(t, "map6", port+1, time.Hour)
			}
			lifetime := time.Hour
			if c.expire {
				lifetime = 2 * time.Second
			}
			if resp := l.pcp(mapReq(l.topo.ClientV6, pcp.ProtoTCP, 0, 0, lifetime, 2)); resp.Result != pcp.Success {
				t.Fatalf("all-ports MAP: %+v", resp)
			}
			serveEcho(t, l.topo.Client, netip.AddrPortFrom(l.topo.ClientV6, port))
			src, dst := netip.AddrPortFrom(l.topo.InternetV6, port+40000), netip.AddrPortFrom(l.topo.ClientV6, port)
			conn := dialIn(t, l.topo.Internet, src, dst)
			if err := echoOnce(conn); err != nil {
				t.Fatalf("through the all-ports MAP: %v", err)
			}
			if l.ctFlow(t, src, dst) == nil {
				t.Fatalf("no conntrack entry %v → %v", src, dst)
			}
			if c.expire {
				l.waitLeases(t, len(l.srv.Leases())-1, 5*time.Second)
			} else if resp := l.pcp(mapReq(l.topo.ClientV6, pcp.ProtoTCP, 0, 0, 0, 2)); resp.Result != pcp.Success {
				t.Fatalf("all-ports MAP delete: %+v", resp)
			}
			d := l.waitFlowGone(t, src, dst)
			t.Logf("all-ports MAP's flow gone %v after its end", d)
			if !c.other {
				return
			}
			if l.ctFlow(t, keptSrc, keptDst) == nil {
				t.Error("the port MAP's flow was flushed with the all-ports MAP's")
			}
			if err := echoOnce(kept); err != nil {
				t.Errorf("the port MAP's connection ended: %v", err)
			}
		})
	}
}

// waitLeases waits until n leases are left in the table.
func (l *lab) waitLeases(t *testing.T, n int, within time.Duration) {
	t.Helper()
	if err := netlab.Eventually(within, func() error {
		if k := len(l.srv.Leases()); k != n {
			return fmt.Errorf("%d leases, want %d", k, n)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
}

// TestCtDeleteWildcard (root): a wildcard filter (ctTarget.wild) ends
// every inbound flow to its IPv6 address of its protocol (all-ports) or
// of any protocol (protocol 0: the dump is unfiltered, flows without
// ports included), and none to another address; the flows spare marks
// stay. Without the all-protocols group's unfiltered dump and the
// port-less tuples, the UDP and protocol-253 flows were left.
func TestCtDeleteWildcard(t *testing.T) {
	a, b := netip.MustParseAddr("2001:db8::a"), netip.MustParseAddr("2001:db8::b")
	r1, r2 := netip.MustParseAddr("2001:db8:1::1"), netip.MustParseAddr("2001:db8:1::2")
	type flow struct {
		proto    uint8
		src, dst netip.AddrPort
		to       netip.AddrPort // where delivered (the reply's source), if not dst
	}
	flows := []flow{
		{proto: protoTCP, src: netip.AddrPortFrom(r1, 1000), dst: netip.AddrPortFrom(a, 80)},
		{proto: protoTCP, src: netip.AddrPortFrom(r2, 1001), dst: netip.AddrPortFrom(a, 443)},
		{proto: unix.IPPROTO_UDP, src: netip.AddrPortFrom(r1, 1002), dst: netip.AddrPortFrom(a, 53)},
		{proto: 253, src: netip.AddrPortFrom(r1, 0), dst: netip.AddrPortFrom(a, 0)}, // no ports (generic)
		{proto: protoTCP, src: netip.AddrPortFrom(r1, 1003), dst: netip.AddrPortFrom(b, 80)},
		{proto: unix.IPPROTO_UDP, src: netip.AddrPortFrom(r1, 1004), dst: netip.AddrPortFrom(b, 53)},
		{proto: protoTCP, src: netip.AddrPortFrom(r1, 1005), dst: netip.AddrPortFrom(a, 8080), to: netip.AddrPortFrom(a, 8443)}, // DNAT-ed
	}
	for _, c := range []struct {
		name  string
		proto uint8
		spare func(ctHit) bool
		gone  []int      // indexes of flows ended
		host  netip.Addr // one of the host's addresses (ctDeleter.host), if valid
	}{
		{"all-ports TCP", protoTCP, nil, []int{0, 1, 6}, netip.Addr{}},
		{"all-protocols", 0, nil, []int{0, 1, 2, 3, 6}, netip.Addr{}},
		{"all-protocols, one spared", 0, func(h ctHit) bool { return h.src.Addr() == r2 }, []int{0, 2, 3, 6}, netip.Addr{}},
		// The hit carries where the flow was delivered (review h/revall).
		{"all-ports TCP, the one delivered at 8443 spared", protoTCP, func(h ctHit) bool { return h.to == netip.AddrPortFrom(a, 8443) }, []int{0, 1}, netip.Addr{}},
		{"all-ports TCP, those delivered where sent spared", protoTCP, func(h ctHit) bool { return h.to == h.t.dst() }, []int{6}, netip.Addr{}},
		// The host's own flows stay, whatever spare says; another
		// source's (the Internet's, another client's) end (h/hostflow).
		{"all-protocols, the host's own spared", 0, func(ctHit) bool { return false }, []int{0, 2, 3, 6}, r2},
	} {
		t.Run(c.name, func(t *testing.T) {
			ns := netlab.NewNS(t, "ctallw")
			h, nh := nsHandles(t, ns)
			for _, f := range flows {
				to := f.to
				if !to.IsValid() {
					to = f.dst
				}
				cf := &netlink.ConntrackFlow{FamilyType: unix.AF_INET6, TimeOut: 600}
				cf.Forward = netlink.IPTuple{Protocol: f.proto, SrcIP: net.IP(f.src.Addr().AsSlice()), SrcPort: f.src.Port(), DstIP: net.IP(f.dst.Addr().AsSlice()), DstPort: f.dst.Port()}
				cf.Reverse = netlink.IPTuple{Protocol: f.proto, SrcIP: net.IP(to.Addr().AsSlice()), SrcPort: to.Port(), DstIP: net.IP(f.src.Addr().AsSlice()), DstPort: f.src.Port()}
				if err := nh.ConntrackCreate(netlink.ConntrackTable, netlink.FAMILY_V6, cf); err != nil {
					t.Fatalf("create %+v: %v", f, err)
				}
			}
			d, err := dialConntrack(int(h))
			if err != nil {
				t.Fatal(err)
			}
			defer d.close()
			if c.spare != nil {
				d.spare = func(hs []ctHit) {
					for i := range hs {
						hs[i].keep = c.spare(hs[i])
					}
				}
			}
			if c.host.IsValid() {
				d.host = hostAddrs{c.host: {}}
			}
			f := ctFilter{t: ctTarget{addr: a, proto: c.proto}}
			n, err := d.end(f.group(), []ctFilter{f})
			if err != nil || n != len(c.gone) {
				t.Errorf("ended %d flows (%v), want %d", n, err, len(c.gone))
			}
			left, err := nh.ConntrackTableList(netlink.ConntrackTable, netlink.FAMILY_V6)
			if err != nil {
				t.Fatal(err)
			}
			for i, f := range flows {
				found := false
				for _, l := range left {
					s, _ := netip.AddrFromSlice(l.Forward.SrcIP)
					dd, _ := netip.AddrFromSlice(l.Forward.DstIP)
					found = found || l.Forward.Protocol == f.proto && s == f.src.Addr() && dd == f.dst.Addr() && l.Forward.DstPort == f.dst.Port()
				}
				if want := !contains(c.gone, i); found != want {
					t.Errorf("flow %d (proto %d %v → %v) kept %v, want %v", i, f.proto, f.src, f.dst, found, want)
				}
			}
		})
	}
}

// TestCtRestartPathsSparePeerOnly: the flushes of the restart paths —
// leases that expired while pcpd was down (flushExpired) and refused
// leases whose pinhole deletion failed at start, flushed once a firewall
// check deletes it (retryUndeleted) — dropped a filter outright when any
// live lease held its endpoint, a PEER included, so the ended MAP's flows
// from every other remote outlived it. Now the filter reaches the walk
// with the PEER's pinhole to spare (ctAdmits), as flushConntrack's do.
//
// Fails without the fix: no filter of the MAP's endpoint is handed to
// the walk.
func TestCtRestartPathsSparePeerOnly(t *testing.T) {
	for _, c := range []struct {
		name  string
		setup func(h *harness)               // before the restart
		after func(t *testing.T, h *harness) // after it, before the walk is looked at
	}{
		{"expired while down", func(h *harness) {
			h.clock.Advance(2 * time.Minute) // the MAP's minute is over, not the PEER's hour
		}, nil},
		{"refused, deletion retried", func(h *harness) {
			h.cfg.DisableMap = true // the MAP is refused at start, the PEER kept
			failing := true
			h.fw.FailApply = func(ops []pinhole.Op) error {
				for _, op := range ops {
					if failing && op.Kind == pinhole.Delete {
						failing = false // once: the retry goes through
						return servertest.ErrInjected
					}
				}
				return nil
			}
		}, func(t *testing.T, h *harness) {
			if len(h.s.undeleted) == 0 {
				t.Fatal("the MAP's pinhole deletion did not fail; nothing to test")
			}
			h.s.checkFirewall()
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			h := newHarness(t)
			h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 80, 80, time.Minute, 1)), pcp.Success)
			h.expect(h.do(peerReq(addrA, pcp.ProtoTCP, 80, remote, time.Hour, 2)), pcp.Success)
			c.setup(h)
			r := &ctRecorder{}
			h.startCt(t, r)
			if n := h.s.tab.len(); n != 1 {
				t.Fatalf("%d leases restored, want the PEER", n)
			}
			if c.after != nil {
				c.after(t, h)
			}
			h.ctDrain(t)
			if !r.has(addrA, 80, false) {
				t.Fatalf("no filter of [%v]:80 handed to the walk", addrA)
			}
			// The walk asks the live leases (spareLive): the PEER keeps
			// its remote's flow only.
			tg := ctTarget{addr: addrA, proto: protoTCP, port: 80}
			other := netip.AddrPortFrom(remote.Addr(), remote.Port()+1)
			hs := []ctHit{{t: tg, src: remote, to: tg.dst()}, {t: tg, src: other, to: tg.dst()}}
			h.s.spareLive(hs)
			if !hs[0].keep || hs[1].keep {
				t.Errorf("kept the PEER's remote's flow %v, another's %v; want true, false", hs[0].keep, hs[1].keep)
			}
		})
	}
}

// TestSpareLive: of the flows a filter matched, those spared are those a
// lease live as the walk decides admits where they were delivered. A port
// MAP or a PEER spares its own flows (the PEER only its remote's), a port
// MAP made after the mapping whose flows these are ended too (issue 9,
// h/holder: before, a wildcard's flows were spared only by leases made by
// its end, so a mapping made again before the walk lost its flows); a
// port no lease opens is not spared, nor another protocol's. An IPv4
// NAPT mapping's SNAT-ed outbound flows are spared only by a live lease
// of the same internal endpoint whose companion covers the remote.
func TestSpareLive(t *testing.T) {
	h := newHarness(t, func(_ *Config, p *policy.Config) { p.AllowAllPorts = true })
	h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 80, 80, time.Hour, 1)), pcp.Success)
	h.expect(h.do(peerReq(addrA, pcp.ProtoTCP, 81, remote, time.Hour, 2)), pcp.Success)
	h.clock.Advance(time.Second)
	h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 82, 82, time.Hour, 3)), pcp.Success)
	resp := h.do(mapReq(v4A, pcp.ProtoTCP, 80, 5000, time.Hour, 4))
	h.expect(resp, pcp.Success)
	ext4 := ctTarget{addr: resp.Map.ExternalAddr.Unmap(), proto: protoTCP, port: resp.Map.ExternalPort}
	other := netip.AddrPortFrom(remote.Addr(), remote.Port()+1)
	rem4 := netip.MustParseAddrPort("198.51.100.7:4000")
	hit := func(port uint16, src netip.AddrPort) ctHit {
		return ctHit{t: ctTarget{addr: addrA, proto: protoTCP, port: port}, src: src, to: netip.AddrPortFrom(addrA, port)}
	}
	for _, c := range []struct {
		name string
		h    ctHit
		keep bool
	}{
		{"port MAP", hit(80, other), true},
		{"PEER, its remote", hit(81, remote), true},
		{"PEER, another remote", hit(81, other), false},
		{"port MAP made later", hit(82, other), true},
		{"port no lease opens", hit(83, other), false},
		{"port MAP's port, UDP", ctHit{t: ctTarget{addr: addrA, proto: 17, port: 80}, src: other, to: netip.AddrPortFrom(addrA, 80)}, false},
		{"port MAP's port, delivered elsewhere", ctHit{t: ctTarget{addr: addrA, proto: protoTCP, port: 80}, src: other, to: netip.AddrPortFrom(addrA, 8443)}, false},
		{"NAPT, inbound to its internal endpoint", ctHit{t: ext4, src: rem4, to: netip.AddrPortFrom(v4A, 80)}, true},
		{"NAPT, inbound delivered to another internal port", ctHit{t: ext4, src: rem4, to: netip.AddrPortFrom(v4A, 81)}, false},
		{"NAPT, SNAT-ed from its internal endpoint", ctHit{t: ext4, nat: true, src: netip.AddrPortFrom(v4A, 80), to: rem4}, true},
		{"NAPT, SNAT-ed from another internal port", ctHit{t: ext4, nat: true, src: netip.AddrPortFrom(v4A, 81), to: rem4}, false},
	} {
		hs := []ctHit{c.h}
		h.s.spareLive(hs)
		if hs[0].keep != c.keep {
			t.Errorf("%s: kept %v, want %v", c.name, hs[0].keep, c.keep)
		}
	}
}
