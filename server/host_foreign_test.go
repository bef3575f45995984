package server

import (
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/policy"
)

// fakeForeign is a ForeignDNATReader whose answer the test sets.
type fakeForeign struct {
	mu  sync.Mutex
	f   *pinhole.ForeignDNAT
	err error
}

func (ff *fakeForeign) ForeignDNAT(ext netip.Addr, first, last uint16) (*pinhole.ForeignDNAT, error) {
	ff.mu.Lock()
	defer ff.mu.Unlock()
	return ff.f, ff.err
}

func (ff *fakeForeign) set(f *pinhole.ForeignDNAT, err error) {
	ff.mu.Lock()
	defer ff.mu.Unlock()
	ff.f, ff.err = f, err
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
	f.CatchAll = []pinhole.ForeignRule{{Family: "ip", Table: "admin", Chain: "pre", Base: "pre", Handle: 9, Priority: -100, Before: true}}
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
	for _, want := range []string{"before pcpd's chain: it takes the connections of every client's IPv4 mapping", "cannot read which ports a DNAT rule"} {
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
