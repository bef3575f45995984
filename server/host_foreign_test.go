package server

import (
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/policy"
)

// fakeForeign is a ForeignDNATReader whose answer the test sets.
type fakeForeign struct {
	mu    sync.Mutex
	f     *pinhole.ForeignDNAT
	err   error
	reads atomic.Int32 // calls of ForeignDNAT
}

func (ff *fakeForeign) ForeignDNAT(ext netip.Addr, first, last uint16) (*pinhole.ForeignDNAT, error) {
	ff.reads.Add(1)
	ff.mu.Lock()
	defer ff.mu.Unlock()
	return ff.f, ff.err
}

func (ff *fakeForeign) set(f *pinhole.ForeignDNAT, err error) {
	ff.mu.Lock()
	defer ff.mu.Unlock()
	ff.f, ff.err = f, err
}

// forwardHarness is a harness whose server reads the host's DNAT rules
// from the returned fakeForeign (forwarding nothing until the test sets
// it), pcpd's IPv4 ports 400-65535.
func forwardHarness(t *testing.T) (*harness, *fakeForeign) {
	t.Helper()
	ff := &fakeForeign{}
	ff.set(&pinhole.ForeignDNAT{}, nil)
	h := newHarness(t, func(c *Config, _ *policy.Config) { c.IPv4Ports = PortRange{First: 400, Last: 65535} })
	h.startWith(nil, func(s *Server) { s.foreign = ff })
	return h, ff
}

// TestHostPortsForeignDNAT (h/adminports): a port the host's own DNAT
// rules forward on the external address (ForeignDNAT, pinhole/foreign.go)
// is reserved like a host service's: a MAP suggesting it gets another port
// (MAP-09), CANNOT_PROVIDE_EXTERNAL with PREFER_FAILURE (PF-04), NAT-PMP
// another port; the other protocol's same port is still granted. A first
// read that fails reserves none of them (logged; --reserved-ports is the
// operator's list), a failure after a good read keeps its ports. Catch-alls
// and undecoded rules are logged once each, not reserved. Without the
// reading (before h/adminports) the MAP was granted TCP 443: "MAP
// suggesting the forwarded 443: SUCCESS, external port 443".
func TestHostPortsForeignDNAT(t *testing.T) {
	ff := &fakeForeign{err: errors.New("injected: cannot read")}
	h := newHarness(t, func(c *Config, _ *policy.Config) { c.IPv4Ports = PortRange{First: 400, Last: 65535} })
	h.startWith(nil, func(s *Server) { s.foreign = ff })
	n := byte(0)
	pcpMap := func(proto pcp.Protocol, port, sugg uint16, pf bool) pcp.Response {
		n++
		r := mapReq(v4A, proto, port, sugg, time.Hour, n)
		r.Map.ExternalAddr = ext4
		r.Options.PreferFailure = pf
		return h.do(r)
	}
	// A first read that failed: nothing reserved, the failure logged.
	if r := pcpMap(pcp.ProtoTCP, 1443, 1443, false); r.Result != pcp.Success || r.Map.ExternalPort != 1443 {
		t.Fatalf("MAP suggesting 1443 before any read: %v, external port %d", r.Result, r.Map.ExternalPort)
	}
	if h.logs.FilterMessageSnippet("cannot read the host's DNAT rules; the ports they forward are not reserved").Len() != 1 {
		t.Fatalf("the first failed read was not logged: %v", h.logs.All())
	}

	var f pinhole.ForeignDNAT
	f.TCP.Add(443)
	f.TCP.Add(1443) // forwarded after the mapping above: it keeps it
	f.UDP.Add(5353)
	f.Rules = 4
	// A catch-all after pcpd's chain (one before it refuses every new
	// IPv4 mapping since h/left9: TestHostPortsDNATCatchAllRefuses).
	f.CatchAll = []pinhole.ForeignRule{{Family: "ip", Table: "admin", Chain: "pre", Base: "pre", Handle: 9, Priority: -98, TCP: true, UDP: true}}
	f.Undecoded = []pinhole.ForeignRule{{Family: "ip", Table: "admin", Chain: "pre", Base: "pre", Handle: 10, Priority: -100, Before: true, Why: "a destination port in a concatenation"}}
	ff.set(&f, nil)
	h.s.hostPorts.refresh()

	if r := pcpMap(pcp.ProtoTCP, 443, 443, false); r.Result != pcp.Success || r.Map.ExternalPort == 443 || r.Map.ExternalPort == 0 {
		t.Fatalf("MAP suggesting the forwarded 443: %v, external port %d", r.Result, r.Map.ExternalPort)
	}
	if r := pcpMap(pcp.ProtoTCP, 444, 443, true); r.Result != pcp.CannotProvideExternal {
		t.Fatalf("MAP + PREFER_FAILURE suggesting the forwarded 443: %v, external port %d", r.Result, r.Map.ExternalPort)
	}
	if r := h.pmp(v4A, pcp.PMPOpMapUDP, 5353, 5353, time.Hour); r.Result != pcp.PMPSuccess || r.ExternalPort == 5353 {
		t.Fatalf("NAT-PMP UDP suggesting the forwarded 5353: %v, external port %d", r.Result, r.ExternalPort)
	}
	if r := pcpMap(pcp.ProtoTCP, 5353, 5353, false); r.Result != pcp.Success || r.Map.ExternalPort != 5353 {
		t.Fatalf("MAP TCP 5353 (only UDP 5353 forwarded): %v, external port %d", r.Result, r.Map.ExternalPort)
	}
	for _, want := range []string{"after pcpd's chain: clients' mappings come first", "cannot read which ports a DNAT rule"} {
		if got := h.logs.FilterMessageSnippet(want).Len(); got != 1 {
			t.Fatalf("%d logs %q, want 1: %v", got, want, h.logs.All())
		}
	}

	// A failed read keeps the last good ports; the rules are not logged
	// again.
	ff.set(nil, errors.New("injected: cannot read"))
	h.s.hostPorts.refresh()
	if r := pcpMap(pcp.ProtoTCP, 445, 443, true); r.Result != pcp.CannotProvideExternal {
		t.Fatalf("MAP + PREFER_FAILURE suggesting 443 after a failed read: %v, external port %d", r.Result, r.Map.ExternalPort)
	}
	if h.logs.FilterMessageSnippet("keeping the last read's ports reserved").Len() != 1 {
		t.Fatalf("the failed read after a good one was not logged: %v", h.logs.All())
	}
	ff.set(&f, nil)
	h.s.hostPorts.refresh()
	if got := h.logs.FilterMessageSnippet("cannot read which ports a DNAT rule").Len(); got != 1 {
		t.Fatalf("the undecoded rule logged %d times, want once", got)
	}
}

// BenchmarkMapPastForwardedRange (review h/revadmin): a MAP whose
// internal port the admin forwards, with the admin forwarding TCP
// 1024-60000 (not a catch-all: 60001-65535 of pcpd's range are left), so
// the search tries every forwarded port before 60001, each through
// usable and hostPorts.reserved. Each MAP takes a new internal port (the
// same grant otherwise) and is deleted after (the pool stays as it was).
func BenchmarkMapPastForwardedRange(b *testing.B) {
	for _, fwd := range []bool{false, true} {
		b.Run(fmt.Sprintf("forwarded=%v", fwd), func(b *testing.B) {
			ff := &fakeForeign{}
			var f pinhole.ForeignDNAT
			if fwd {
				for p := 1024; p <= 60000; p++ {
					f.TCP.Add(uint16(p))
				}
			}
			ff.set(&f, nil)
			h := newHarness(b)
			h.startWith(nil, func(s *Server) { s.foreign = ff })
			n := byte(0)
			for b.Loop() {
				n++
				r := h.do(mapReq(v4A, pcp.ProtoTCP, 2000, 0, time.Hour, n))
				if r.Result != pcp.Success || (fwd && r.Map.ExternalPort <= 60000) {
					b.Fatalf("MAP: %v, external port %d", r.Result, r.Map.ExternalPort)
				}
				if r := h.do(mapReq(v4A, pcp.ProtoTCP, 2000, 0, 0, n)); r.Result != pcp.Success {
					b.Fatalf("delete: %v", r.Result)
				}
			}
		})
	}
}

// TestHostPortsForeignLogBounded (review h/revadmin): more undecoded
// rules than dnatLoggedMax are logged once each up to the bound, then
// one line, and not again at the next read. Before, the map of logged
// rules was emptied past the bound, so every read logged them all again:
// "second read of the same 5000 undecoded rules: 5000 warnings, want 0".
func TestHostPortsForeignLogBounded(t *testing.T) {
	h := newHarness(t)
	h.startWith(nil, nil)
	var f pinhole.ForeignDNAT
	for i := range dnatLoggedMax + 904 {
		f.Undecoded = append(f.Undecoded, pinhole.ForeignRule{Family: "ip", Table: "admin", Chain: "pre", Base: "pre", Handle: uint64(i), Why: "a destination port in a concatenation"})
	}
	warned := func() int { return h.logs.FilterMessageSnippet("cannot read which ports a DNAT rule").Len() }
	h.s.hostPorts.mu.Lock()
	h.s.hostPorts.storeDNAT(&f, nil)
	first := warned()
	h.s.hostPorts.storeDNAT(&f, nil)
	h.s.hostPorts.mu.Unlock()
	if again := warned() - first; again != 0 {
		t.Fatalf("second read of the same %d undecoded rules: %d warnings, want 0", len(f.Undecoded), again)
	}
	if first != dnatLoggedMax || h.logs.FilterMessageSnippet("not logging the rest").Len() != 1 {
		t.Fatalf("first read: %d warnings, want %d and one line for the rest", first, dnatLoggedMax)
	}
}

// TestHostPortsDNATCatchAllRefuses_6887_7_4 (h/left9, issue 9): while a
// catch-all DNAT of the host's runs before pcpd's chain and takes every
// new connection of a protocol to the external address (every condition
// on its path read), a new IPv4 mapping of that protocol could carry
// nothing: PCP MAP gets NO_RESOURCES (RFC 6887 §7.4: a temporary,
// system-wide condition; CANNOT_PROVIDE_EXTERNAL is only for
// PREFER_FAILURE, SCTP and PEER), NAT-PMP "out of resources" (RFC 6886
// §3.5), and nothing is staged. The other protocol, IPv6, PEER (the
// client's own outbound flow) and renewals of mappings held are served.
// A catch-all with a condition not read (here a source address) only
// warns; one after pcpd's chain changes nothing. When the rule goes, new
// mappings are granted again, said in the log. Before: "MAP TCP with the
// catch-all before pcpd's chain: SUCCESS, want NO_RESOURCES".
func TestHostPortsDNATCatchAllRefuses_6887_7_4(t *testing.T) {
	ff := &fakeForeign{f: &pinhole.ForeignDNAT{}}
	h := newHarness(t, func(*Config, *policy.Config) {})
	h.startWith(nil, func(s *Server) { s.foreign = ff })
	n := byte(0)
	pcpMap := func(src netip.Addr, proto pcp.Protocol, port uint16) pcp.Response {
		n++
		return h.do(mapReq(src, proto, port, 0, time.Hour, n))
	}
	h.expect(pcpMap(v4A, pcp.ProtoTCP, 2000), pcp.Success) // held before the rule
	held := len(h.fw.Holes())

	rule := pinhole.ForeignRule{Family: "ip", Table: "admin", Chain: "pre", Base: "pre", Handle: 4, Priority: -100, Before: true, TCP: true}
	ff.set(&pinhole.ForeignDNAT{Rules: 1, CatchAll: []pinhole.ForeignRule{rule}}, nil)
	h.s.hostPorts.refresh()
	if r := pcpMap(v4A, pcp.ProtoTCP, 2001); r.Result != pcp.NoResources {
		t.Fatalf("MAP TCP with the catch-all before pcpd's chain: %v (external %v:%d), want NO_RESOURCES", r.Result, r.Map.ExternalAddr, r.Map.ExternalPort)
	}
	if r := h.pmp(v4A, pcp.PMPOpMapTCP, 2002, 2002, time.Hour); r.Result != pcp.PMPOutOfResources {
		t.Fatalf("NAT-PMP TCP with the catch-all before pcpd's chain: %v (external %d), want OUT_OF_RESOURCES", r.Result, r.ExternalPort)
	}
	if got := len(h.fw.Holes()); got != held {
		t.Fatalf("the refusals staged pinholes: %d, want %d", got, held)
	}
	h.expect(pcpMap(v4A, pcp.ProtoUDP, 2003), pcp.Success)   // a TCP-only rule
	h.expect(pcpMap(addrA, pcp.ProtoTCP, 2004), pcp.Success) // IPv6: no NAT
	h.expect(h.do(peerReq(v4A, pcp.ProtoTCP, 2005, netip.MustParseAddrPort("203.0.113.5:80"), time.Hour, 99)), pcp.Success)
	n = 0
	h.expect(pcpMap(v4A, pcp.ProtoTCP, 2000), pcp.Success) // the held mapping renewed (same nonce)
	if got := h.logs.FilterMessageSnippet("new IPv4 mappings (PCP MAP, NAT-PMP) of its protocols are refused (NO_RESOURCES) while it is there").Len(); got != 1 {
		t.Fatalf("%d warnings of the refusal, want 1: %v", got, h.logs.All())
	}
	n = 10

	// A condition not read, or after pcpd's chain: served, warned.
	unsure := rule
	unsure.Handle, unsure.Why = 5, "a condition not read: a source address"
	after := rule
	after.Handle, after.Before, after.Priority = 6, false, -98
	ff.set(&pinhole.ForeignDNAT{Rules: 2, CatchAll: []pinhole.ForeignRule{unsure, after}}, nil)
	h.s.hostPorts.refresh()
	h.expect(pcpMap(v4A, pcp.ProtoTCP, 2011), pcp.Success)
	for _, want := range []string{"new IPv4 mappings are granted again", "may forward every port of the external address before pcpd's chain", "after pcpd's chain"} {
		if got := h.logs.FilterMessageSnippet(want).Len(); got != 1 {
			t.Fatalf("%d logs %q, want 1: %v", got, want, h.logs.All())
		}
	}
	// The rule back: refused again, warned again; a failed read keeps it.
	ff.set(&pinhole.ForeignDNAT{Rules: 1, CatchAll: []pinhole.ForeignRule{rule}}, nil)
	h.s.hostPorts.refresh()
	ff.set(nil, errors.New("injected: cannot read"))
	h.s.hostPorts.refresh()
	if r := pcpMap(v4A, pcp.ProtoTCP, 2012); r.Result != pcp.NoResources {
		t.Fatalf("MAP TCP with the rule back, after a failed read: %v, want NO_RESOURCES", r.Result)
	}
	if got := h.logs.FilterMessageSnippet("of its protocols are refused (NO_RESOURCES)").Len(); got != 2 {
		t.Fatalf("%d warnings of the refusal, want 2", got)
	}
}
