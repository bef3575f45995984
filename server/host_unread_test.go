package server

import (
	"bytes"
	"errors"
	"net"
	"net/netip"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/policy"
)

// TestMapRefusedUntilHostRead: the daemon's host-address set
// (policy.HostSet, as cmd/pcpd serve builds it) whose first read fails is
// empty, and fails closed: MAP, PEER and NAT-PMP requests the policy
// would grant, a MAP of the host's own address (inside client a's
// prefix) among them, are answered NO_RESOURCES (NAT-PMP: OUT_OF_RESOURCES),
// a short error, by the engine and the socket readers' early check alike,
// and change nothing; a delete is still answered SUCCESS. Once a read
// succeeds, the host's address is refused (NOT_AUTHORIZED) and the others
// granted; a later failed read keeps the last good set. Without
// HostAddrsRead's check the first step maps the host's 2001:db8:a::1
// (before, a failed first read failed open until a later read).
func TestMapRefusedUntilHostRead(t *testing.T) {
	hostAddr := netip.MustParseAddr("2001:db8:a::1")
	var fail atomic.Bool
	fail.Store(true)
	host := &policy.HostSet{Addrs: func() ([]net.Addr, error) {
		if fail.Load() {
			return nil, errors.New("netlink: injected failure")
		}
		return []net.Addr{&net.IPNet{IP: hostAddr.AsSlice(), Mask: net.CIDRMask(64, 128)},
			&net.IPNet{IP: net.IP{10, 0, 0, 1}, Mask: net.CIDRMask(28, 32)}}, nil
	}}
	if err := host.Refresh(); err == nil {
		t.Fatal("the injected failure did not fail the first read")
	}
	h := newHarness(t, func(_ *Config, pc *policy.Config) {
		pc.HostAddrs, pc.HostAddrsRead = host.Contains, host.Read
	})
	n := byte(0)
	tpMap := func(target netip.Addr, port uint16, life time.Duration) *pcp.Request {
		n++
		r := mapReq(addrA, pcp.ProtoTCP, port, 0, life, n)
		if target != addrA {
			r.Options.ThirdParty = target
		}
		return r
	}
	// pcpAnswer sends r through the early check and the engine; both
	// must answer want (the early check may leave an allowed request to
	// the engine).
	pcpAnswer := func(t *testing.T, what string, r *pcp.Request, want pcp.ResultCode) pcp.Response {
		t.Helper()
		b := pcp.AppendRequest(nil, r)
		src := netip.AddrPortFrom(addrA, 40000)
		early, handled := h.s.early(nil, b, src, h.clock.Now())
		resp := h.do(r)
		if resp.Result != want {
			t.Fatalf("%s: %v, want %v", what, resp.Result, want)
		}
		if handled && !bytes.Equal(early, h.s.Handle(local6, src, b)) {
			t.Fatalf("%s: the early check answered\n% x\nnot as the engine", what, early)
		}
		if want == pcp.NoResources && resp.Lifetime != pcp.NoResources.ErrorLifetime() {
			t.Fatalf("%s: NO_RESOURCES with lifetime %d, want the short error's", what, resp.Lifetime)
		}
		return resp
	}

	t.Run("first read failed", func(t *testing.T) {
		before := h.snap()
		pcpAnswer(t, "MAP of the host's address", tpMap(hostAddr, 80, time.Hour), pcp.NoResources)
		pcpAnswer(t, "MAP of the client's own address", tpMap(addrA, 443, time.Hour), pcp.NoResources)
		pcpAnswer(t, "PEER", peerReq(addrA, pcp.ProtoTCP, 444, remote, time.Hour, 99), pcp.NoResources)
		if r := h.pmp(v4A, pcp.PMPOpMapUDP, 5000, 5000, time.Hour); r.Result != pcp.PMPOutOfResources {
			t.Fatalf("NAT-PMP map: result %d, want OUT_OF_RESOURCES", r.Result)
		}
		pcpAnswer(t, "delete", tpMap(addrA, 443, 0), pcp.Success)
		h.unchanged(before)
		if host.Refresh() == nil {
			t.Fatal("the injected failure did not fail the read")
		}
		pcpAnswer(t, "MAP of the host's address, read failed again", tpMap(hostAddr, 80, time.Hour), pcp.NoResources)
	})
	fail.Store(false)
	if err := host.Refresh(); err != nil {
		t.Fatal(err)
	}
	t.Run("read succeeded", func(t *testing.T) {
		pcpAnswer(t, "MAP of the host's address", tpMap(hostAddr, 80, time.Hour), pcp.NotAuthorized)
		pcpAnswer(t, "MAP of the client's own address", tpMap(addrA, 443, time.Hour), pcp.Success)
		if r := h.pmp(v4A, pcp.PMPOpMapUDP, 5000, 5000, time.Hour); r.Result != pcp.PMPSuccess {
			t.Fatalf("NAT-PMP map: result %d, want SUCCESS", r.Result)
		}
	})
	fail.Store(true)
	if host.Refresh() == nil {
		t.Fatal("the injected failure did not fail the read")
	}
	t.Run("later read failed", func(t *testing.T) {
		pcpAnswer(t, "MAP of the host's address", tpMap(hostAddr, 80, time.Hour), pcp.NotAuthorized)
		pcpAnswer(t, "MAP of another port", tpMap(addrA, 445, time.Hour), pcp.Success)
	})
}

// TestMapRefusedUntilHostPortsRead: the scan of the host's own ports
// (sock_diag and the WireGuard listen ports: hostPorts) fails closed.
// While its first dump fails (sock_diag failing, injected), new IPv4
// mappings (PCP MAP and PEER, NAT-PMP) are refused with NO_RESOURCES
// (NAT-PMP: OUT_OF_RESOURCES) and the failure is logged once; IPv6
// pinholes, which take no host port, are granted. After a good scan, a
// MAP suggesting a port a host service listens on gets another port; a
// later failed scan keeps that port reserved. Without the fix
// (hostPorts.ready true, an empty set after a failed first dump) the
// first step maps the host service's TCP port.
func TestMapRefusedUntilHostPortsRead(t *testing.T) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	svc := uint16(ln.Addr().(*net.TCPAddr).Port)
	oldTCP, oldUDP := socketDiagTCP, socketDiagUDP
	t.Cleanup(func() { socketDiagTCP, socketDiagUDP = oldTCP, oldUDP })
	var fail atomic.Bool
	socketDiagTCP = func(fam uint8) ([]*netlink.Socket, error) {
		if fail.Load() {
			return nil, syscall.ENOBUFS
		}
		return oldTCP(fam)
	}
	socketDiagUDP = func(fam uint8) ([]*netlink.Socket, error) {
		if fail.Load() {
			return nil, syscall.ENOBUFS
		}
		return oldUDP(fam)
	}
	fail.Store(true)
	h := newHarness(t)
	logs := h.logs
	hp := &h.s.hostPorts
	// Each step scans again at once, not after hostPortsTTL.
	stale := func() {
		hp.mu.Lock()
		hp.at = time.Time{}
		hp.mu.Unlock()
	}
	n := byte(0)
	mapV4 := func(port, sugg uint16) pcp.Response {
		n++
		return h.do(mapReq(v4A, pcp.ProtoTCP, port, sugg, time.Hour, n))
	}

	t.Run("first scan failed", func(t *testing.T) {
		before := h.snap()
		r := mapV4(svc, svc)
		if logs.FilterMessageSnippet("cannot list the host's sockets").Len() != 1 {
			t.Fatal("the injected failure did not fail the scan")
		}
		if r.Result != pcp.NoResources {
			t.Fatalf("MAP TCP suggesting the host service's %d: %v, external port %d, want NO_RESOURCES", svc, r.Result, r.Map.ExternalPort)
		}
		stale()
		if r := h.do(peerReq(v4A, pcp.ProtoTCP, 2000, netip.MustParseAddrPort("198.51.100.9:80"), time.Hour, 200)); r.Result != pcp.NoResources {
			t.Fatalf("PEER: %v, want NO_RESOURCES", r.Result)
		}
		if r := h.pmp(v4A, pcp.PMPOpMapTCP, svc, svc, time.Hour); r.Result != pcp.PMPOutOfResources {
			t.Fatalf("NAT-PMP map: result %d, external port %d, want OUT_OF_RESOURCES", r.Result, r.ExternalPort)
		}
		h.unchanged(before)
		if r := h.do(mapReq(addrA, pcp.ProtoTCP, svc, 0, time.Hour, 201)); r.Result != pcp.Success {
			t.Fatalf("IPv6 MAP: %v, want SUCCESS (no host port involved)", r.Result)
		}
		if n := logs.FilterMessageSnippet("cannot list the host's sockets").Len(); n != 1 {
			t.Fatalf("%d warnings of the failed scans, want 1", n)
		}
	})
	fail.Store(false)
	stale()
	t.Run("scan succeeded", func(t *testing.T) {
		r := mapV4(svc, svc)
		if r.Result != pcp.Success || r.Map.ExternalPort == svc || r.Map.ExternalPort == 0 {
			t.Fatalf("MAP TCP suggesting the host service's %d: %v, external port %d", svc, r.Result, r.Map.ExternalPort)
		}
		if logs.FilterMessageSnippet("new IPv4 mappings are served again").Len() != 1 {
			t.Error("the first good scan after failures was not logged")
		}
	})
	fail.Store(true)
	stale()
	t.Run("later scan failed", func(t *testing.T) {
		r := mapV4(svc+1, svc)
		if r.Result != pcp.Success || r.Map.ExternalPort == svc || r.Map.ExternalPort == 0 {
			t.Fatalf("MAP TCP suggesting the host service's %d: %v, external port %d (the last good scan's ports not kept)", svc, r.Result, r.Map.ExternalPort)
		}
		if !hp.ready(protoTCP) || !hp.ready(protoUDP) {
			t.Error("not ready after a good scan and a failed one")
		}
	})
}

// TestThirdPartyDeleteFromHostUntilHostRead (issue 9, h/hunt3's window):
// a THIRD_PARTY request whose source is one of the host's own addresses
// comes from a local user, and is nobody's (b5f494b), even where the
// address lies inside an owner's prefix (the host's 2001:db8:a::1 in
// client a's 2001:db8:a::/48). While the host's addresses have not been
// read (HostAddrsRead false: the set is empty) that source could not be
// told from the owner's, and the server's leniency for deletes while
// unread (HostUnread: a delete opens nothing) let the local user delete
// a's lease: SUCCESS, the pinhole gone. Now every THIRD_PARTY request is
// refused until the read (HostSourceUnread, NO_RESOURCES: a short error,
// the client retries), by the socket readers' early check and the
// engine alike, and nothing changes; a's own delete is still answered
// SUCCESS. After the read, the host's delete is NOT_AUTHORIZED.
func TestThirdPartyDeleteFromHostUntilHostRead(t *testing.T) {
	hostAddr := netip.MustParseAddr("2001:db8:a::1")
	var unread atomic.Bool
	h := newHarness(t, func(_ *Config, pc *policy.Config) {
		pc.HostAddrs = func(a netip.Addr) bool { return !unread.Load() && a == hostAddr }
		pc.HostAddrsRead = func() bool { return !unread.Load() }
	})
	if r := h.do(mapReq(addrA, pcp.ProtoTCP, 443, 0, time.Hour, 1)); r.Result != pcp.Success {
		t.Fatalf("a's MAP: %v", r.Result)
	}
	tp := func(src, target netip.Addr, port uint16, life time.Duration, n byte) *pcp.Request {
		r := mapReq(src, pcp.ProtoTCP, port, 0, life, n)
		r.Options.ThirdParty = target
		return r
	}
	type row struct {
		what string
		r    *pcp.Request
		want pcp.ResultCode
	}
	for _, step := range []struct {
		name   string
		unread bool
		rows   []row
	}{
		{"host addresses unread", true, []row{
			{"THIRD_PARTY delete of a's lease from the host's address", tp(hostAddr, addrA, 443, 0, 2), pcp.NoResources},
			{"THIRD_PARTY delete of a's lease from the host's address, a's nonce", tp(hostAddr, addrA, 443, 0, 1), pcp.NoResources},
			{"THIRD_PARTY MAP of a's address from the host's address", tp(hostAddr, addrA, 8080, time.Hour, 3), pcp.NoResources},
		}},
		{"host addresses read", false, []row{
			{"THIRD_PARTY delete of a's lease from the host's address", tp(hostAddr, addrA, 443, 0, 2), pcp.NotAuthorized},
		}},
	} {
		unread.Store(step.unread)
		for _, c := range step.rows {
			before := h.snap()
			b := pcp.AppendRequest(nil, c.r)
			early, handled := h.s.early(nil, b, netip.AddrPortFrom(hostAddr, 40000), h.clock.Now())
			if handled {
				var er pcp.Response
				if err := pcp.ParseResponse(early, &er); err != nil || er.Result != c.want {
					t.Errorf("%s, %s: the early check answered %v (%v), want %v", step.name, c.what, er.Result, err, c.want)
				}
			}
			resp := h.doFrom(hostAddr, c.r)
			after := h.snap()
			if resp.Result != c.want || len(after.leases) != len(before.leases) || len(after.holes) != len(before.holes) {
				t.Errorf("%s, %s: %v, a's leases %d, pinholes %d (were %d, %d); want %v, nothing changed", step.name, c.what, resp.Result,
					len(after.leases), len(after.holes), len(before.leases), len(before.holes), c.want)
			}
		}
	}
	unread.Store(true)
	if r := h.do(mapReq(addrA, pcp.ProtoTCP, 443, 0, 0, 1)); r.Result != pcp.Success || len(h.fw.Holes()) != 0 {
		t.Errorf("a's own delete while unread: %v, pinholes %d; want SUCCESS, 0", r.Result, len(h.fw.Holes()))
	}
}
