package server

import (
	"context"
	"net/netip"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/policy"
	"github.com/pcpd/pcpd/store"
)

// Issue 9 (h/peerend): no pinhole outlives its lease by more than 1 s,
// PEERs' and narrowed FILTERs' included.

// TestE2EPeerEndEndsFlow (root, namespaces): a PEER's end (revoked here;
// expiry and expiry while stopped: TestE2EExpiryEndsConnections,
// TestE2EExpiryWhileStoppedEndsConnections) ends the inbound connection
// from its remote, IPv6 or IPv4 (DNAT-ed to the client), unless a lease
// live throughout admits it: a MAP of the endpoint, or one with a FILTER
// of the remote. A connection a MAP's delete spared because the PEER
// held it ends with the PEER. Before, a PEER's end flushed nothing: the
// "ended" rows fail with the flow still tracked and carrying data.
func TestE2EPeerEndEndsFlow(t *testing.T) {
	for i, c := range []struct {
		name string
		kind string // of the PEER (lab.inbound)
		// beside is a MAP made beside the PEER ("": none; "map": no
		// FILTER; "filter": FILTERed to the PEER's remote; "deleted":
		// none FILTERed, deleted before the PEER ends).
		beside string
		ended  bool
	}{
		{"PEER IPv6 ended", "peer6", "", true},
		{"PEER IPv4 (DNAT) ended", "peer4", "", true},
		{"PEER IPv6 ended, MAP live", "peer6", "map", false},
		{"PEER IPv4 ended, MAP live", "peer4", "map", false},
		{"PEER IPv6 ended, MAP with the remote's FILTER live", "peer6", "filter", false},
		{"PEER IPv6 ended after the MAP's delete spared it", "peer6", "deleted", true},
		{"PEER IPv4 ended after the MAP's delete spared it", "peer4", "deleted", true},
	} {
		t.Run(c.name, func(t *testing.T) {
			l := newLab(t, func(_ *Config, p *policy.Config) { p.MinLifetime = time.Second })
			port := uint16(9900 + i)
			conn, src, dst := l.inbound(t, c.kind, port, time.Hour)
			client := l.topo.ClientV6
			if c.kind == "peer4" {
				client = l.topo.ClientV4
			}
			if c.beside != "" {
				r := mapReq(client, pcp.ProtoTCP, port, 0, time.Hour, 2)
				if c.beside == "filter" {
					r.Options.Filters = []pcp.Filter{{Remote: netip.PrefixFrom(src.Addr(), src.Addr().BitLen()), RemotePort: src.Port()}}
				}
				if resp := l.pcp(r); resp.Result != pcp.Success ||
					netip.AddrPortFrom(resp.Map.ExternalAddr.Unmap(), resp.Map.ExternalPort) != dst {
					t.Fatalf("MAP beside the PEER: %+v, want external %v", resp, dst)
				}
			}
			if c.beside == "deleted" {
				if resp := l.pcp(mapReq(client, pcp.ProtoTCP, port, 0, 0, 2)); resp.Result != pcp.Success {
					t.Fatalf("MAP delete: %+v", resp)
				}
				l.srv.waitConntrack() // the reply need not have (mustWaitFlush)
				if l.ctFlow(t, src, dst) == nil {
					t.Fatal("the MAP's delete flushed the PEER's flow; nothing to test")
				}
			}
			var peer *store.Key
			for _, le := range l.srv.Leases() {
				if le.Kind == store.KindPeer {
					peer = &le.Key
				}
			}
			if peer == nil {
				t.Fatal("no PEER lease")
			}
			if n, err := l.srv.Revoke(context.Background(), RevokeFilter{Key: peer}); n != 1 || err != nil {
				t.Fatalf("revoke the PEER: %d %v", n, err)
			}
			l.srv.waitConntrack()
			f := l.ctFlow(t, src, dst)
			err := echoOnce(conn)
			t.Logf("flow tracked after the PEER's end: %v; carries data: %v", f != nil, err == nil)
			if c.ended {
				if f != nil {
					t.Errorf("the ended PEER's flow is still tracked: %s", f)
				}
				if err == nil {
					t.Error("the ended PEER's connection still carries data")
				}
				return
			}
			if f == nil {
				t.Error("a flow a live MAP admits was flushed with the PEER's end")
			}
			if err != nil {
				t.Errorf("a connection a live MAP admits ended with the PEER: %v", err)
			}
		})
	}
}

// TestE2EFilterNarrowedEndsFlows (root, namespaces): a MAP admits two
// remotes (ports p and p+1 of the Internet host); a renewal or a
// replacement narrows its FILTER to the first. The second remote's
// connection ends with the reply (its entry gone, no more data), the
// first's stays; unless a PEER of the second remote, live throughout,
// admits it. Before, a FILTER change flushed nothing: the "narrowed"
// rows fail with the second flow tracked and carrying data.
func TestE2EFilterNarrowedEndsFlows(t *testing.T) {
	for i, c := range []struct {
		name      string
		kind      string // "map6", "map4"
		before    bool   // FILTERs of both remotes before (else none: any remote)
		nonce     byte   // of the narrowing request (1: a renewal)
		clear     bool   // it clears the FILTERs first (FLT-03), then FILTERs the first remote
		peer2     bool   // a PEER of the second remote
		want2Kept bool
	}{
		{"IPv6 FILTER added by a renewal", "map6", false, 1, false, false, false},
		{"IPv4 FILTER added by a renewal", "map4", false, 1, false, false, false},
		{"IPv6 FILTER replaced by a renewal", "map6", true, 1, true, false, false},
		{"IPv4 FILTER replaced by a renewal", "map4", true, 1, true, false, false},
		{"IPv6 FILTER narrowed by a replacement", "map6", false, 3, false, false, false},
		{"IPv6 narrowed, the second remote's PEER live", "map6", false, 1, false, true, true},
		{"IPv4 narrowed, the second remote's PEER live", "map4", false, 1, false, true, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			l := newLab(t, func(_ *Config, p *policy.Config) { p.MinLifetime = time.Second })
			port := uint16(9950 + i)
			conn1, src1, dst := l.inbound(t, c.kind, port, time.Hour)
			src2 := netip.AddrPortFrom(src1.Addr(), src1.Port()+1)
			client := l.topo.ClientV6
			if c.kind == "map4" {
				client = l.topo.ClientV4
			}
			only := func(src netip.AddrPort) pcp.Filter {
				return pcp.Filter{Remote: netip.PrefixFrom(src.Addr(), src.Addr().BitLen()), RemotePort: src.Port()}
			}
			req := func(nonce byte, fs ...pcp.Filter) {
				t.Helper()
				r := mapReq(client, pcp.ProtoTCP, port, dst.Port(), time.Hour, nonce)
				r.Options.Filters = fs
				if resp := l.pcp(r); resp.Result != pcp.Success ||
					netip.AddrPortFrom(resp.Map.ExternalAddr.Unmap(), resp.Map.ExternalPort) != dst {
					t.Fatalf("MAP %v: %+v, want external %v", fs, resp, dst)
				}
			}
			if c.before {
				req(1, only(src1), only(src2))
			}
			if c.peer2 {
				if resp := l.pcp(peerReq(client, pcp.ProtoTCP, port, src2, time.Hour, 2)); resp.Result != pcp.Success {
					t.Fatalf("PEER of the second remote: %+v", resp)
				}
			}
			conn2 := dialIn(t, l.topo.Internet, src2, dst)
			if err := echoOnce(conn2); err != nil {
				t.Fatalf("second connection: %v", err)
			}
			if c.clear {
				req(c.nonce, pcp.Filter{}, only(src1))
			} else {
				req(c.nonce, only(src1))
			}
			// The reply did not wait for the walk (the ruleset cuts the
			// IPv6 flows: mustWaitFlush); wait for it.
			l.srv.waitConntrack()
			for _, f := range []struct {
				src  netip.AddrPort
				want bool
			}{{src1, true}, {src2, c.want2Kept}} {
				kept := l.ctFlow(t, f.src, dst) != nil
				t.Logf("flow from %v kept: %v", f.src, kept)
				if kept != f.want {
					t.Errorf("flow from %v kept %v, want %v", f.src, kept, f.want)
				}
			}
			if err := echoOnce(conn1); err != nil {
				t.Errorf("the connection the FILTER still admits ended: %v", err)
			}
			if err := echoOnce(conn2); (err == nil) != c.want2Kept {
				t.Errorf("second remote's connection carries data: %v, want %v", err == nil, c.want2Kept)
			}
		})
	}
}

// TestFiltersNarrowed: a FILTER change narrows (its flows must be
// flushed) iff the new FILTERs drop a remote the old ones admitted.
func TestFiltersNarrowed(t *testing.T) {
	f := func(p string, port uint16) store.Filter {
		return store.Filter{Prefix: netip.MustParsePrefix(p), Port: port}
	}
	a, a80 := f("2001:db8:1::/48", 0), f("2001:db8:1::/48", 80)
	b, a1 := f("2001:db8:2::/48", 0), f("2001:db8:1:1::/64", 0)
	for _, c := range []struct {
		name       string
		prev, next []store.Filter
		want       bool
	}{
		{"none to none", nil, nil, false},
		{"none to one", nil, []store.Filter{a}, true},
		{"one to none (any remote)", []store.Filter{a}, nil, false},
		{"same", []store.Filter{a, b}, []store.Filter{b, a}, false},
		{"one added", []store.Filter{a}, []store.Filter{a, b}, false},
		{"one dropped", []store.Filter{a, b}, []store.Filter{a}, true},
		{"replaced", []store.Filter{a}, []store.Filter{b}, true},
		{"prefix narrowed", []store.Filter{a}, []store.Filter{a1}, true},
		{"prefix widened", []store.Filter{a1}, []store.Filter{a}, false},
		{"port added", []store.Filter{a}, []store.Filter{a80}, true},
		{"port dropped", []store.Filter{a80}, []store.Filter{a}, false},
	} {
		if got := filtersNarrowed(c.prev, c.next); got != c.want {
			t.Errorf("%s: narrowed %v, want %v", c.name, got, c.want)
		}
	}
}
