package server

import (
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/policy"
	"github.com/pcpd/pcpd/store"
)

// BenchmarkOverlapsHeld (review h/revhunt) is overlapsHeld's cost, the
// check h/hunt added to every PEER and filtered MAP, under s.mu:
// peers=n is a new PEER on a tuple holding n PEERs (the default quota is
// 256 leases a client); allports/leases=n is a filtered all-ports MAP of
// a client whose leases were made after n others (--allow-all-ports:
// its candidates are read by table.leasesAt, a walk of the slots up to
// the owner's last on IPv6). The engine's whole request for comparison:
// peer-request/peers=n is a new PEER's request on such a tuple (b.N of them: run
// it with -benchtime 200x, the tuple grows by as many).
func BenchmarkOverlapsHeld(b *testing.B) {
	for _, n := range []int{16, 255, 4095} {
		b.Run("peers="+itoa(n), func(b *testing.B) {
			h := newHarness(b, func(_ *Config, p *policy.Config) { p.MaxLeasesPerClient = 1 << 20 })
			peers(b, h, n)
			now := h.clock.Now()
			next := store.Lease{
				Key:  store.Key{Owner: ownerA, Protocol: protoUDP, InternalAddr: addrA, InternalPort: 5000, Remote: netip.MustParseAddrPort("[2001:db8:98::1]:1")},
				Kind: store.KindPeer, ExternalAddr: addrA, ExternalPort: 5000, Expires: now.Add(time.Hour),
			}
			benchOverlapsHeld(b, h.s, now, &next)
		})
	}
	for _, n := range []int{16, 255, 4095} {
		b.Run("peer-request/peers="+itoa(n), func(b *testing.B) {
			h := newHarness(b, func(_ *Config, p *policy.Config) { p.MaxLeasesPerClient = 1 << 20 })
			peers(b, h, n)
			src := netip.AddrPortFrom(addrA, 40000)
			reqs := make([][]byte, b.N)
			for i := range reqs {
				rem := netip.AddrPortFrom(netip.MustParseAddr("2001:db8:98::1"), uint16(i+1))
				reqs[i] = pcp.AppendRequest(nil, peerReq(addrA, pcp.ProtoUDP, 5000, rem, time.Hour, 1))
			}
			b.ResetTimer()
			for i := range b.N {
				out := h.s.HandleBatch([]Request{{Local: local6, Source: src, Data: reqs[i], admitted: true}})
				var resp pcp.Response
				if err := pcp.ParseResponse(out[0], &resp); err != nil || resp.Result != pcp.Success {
					b.Fatalf("%v %v", resp.Result, err)
				}
			}
		})
	}
	for _, n := range []int{65536, 1 << 20} {
		b.Run("allports/leases="+itoa(n), func(b *testing.B) {
			h := newHarness(b, func(_ *Config, p *policy.Config) { p.MaxLeases = 1 << 22; p.AllowAllPorts = true })
			putAll(h.s, startLeases(n, h.clock.Now()))
			h.expect(h.do(filteredMap(443, pcp.Filter{Remote: other6})), pcp.Success)
			now := h.clock.Now()
			next := store.Lease{
				Key:  store.Key{Owner: ownerA, Protocol: protoTCP, InternalAddr: addrA},
				Kind: store.KindMap, ExternalAddr: addrA, Expires: now.Add(time.Hour),
				Filters: []store.Filter{{Prefix: wide6}},
			}
			benchOverlapsHeld(b, h.s, now, &next)
		})
	}
}

// peers makes n PEERs of client a from UDP port 5000 (admitted: no rate
// limit).
func peers(b *testing.B, h *harness, n int) {
	src := netip.AddrPortFrom(addrA, 40000)
	for i := range n {
		rem := netip.AddrPortFrom(netip.MustParseAddr("2001:db8:99::1"), uint16(1000+i))
		out := h.s.HandleBatch([]Request{{Local: local6, Source: src, Data: pcp.AppendRequest(nil, peerReq(addrA, pcp.ProtoUDP, 5000, rem, time.Hour, 1)), admitted: true}})
		var resp pcp.Response
		if err := pcp.ParseResponse(out[0], &resp); err != nil || resp.Result != pcp.Success {
			b.Fatalf("PEER %d: %v %v", i, resp.Result, err)
		}
	}
}

// TestOverlapsHeldAmongPeers (review h/revhunt): overlapsHeld passes a
// tuple's PEERs over undecoded only when every new element is one key;
// a FILTER among them is still found, whichever is asked for last.
func TestOverlapsHeldAmongPeers(t *testing.T) {
	h := newHarness(t)
	src := netip.AddrPortFrom(addrA, 40000)
	do := func(r *pcp.Request) pcp.ResultCode {
		t.Helper()
		out := h.s.HandleBatch([]Request{{Local: local6, Source: src, Data: pcp.AppendRequest(nil, r), admitted: true}})
		var resp pcp.Response
		if err := pcp.ParseResponse(out[0], &resp); err != nil {
			t.Fatal(err)
		}
		return resp.Result
	}
	outside := netip.MustParseAddr("2001:db8:99::1")
	for i := range 10 {
		if got := do(peerReq(addrA, pcp.ProtoTCP, 443, netip.AddrPortFrom(outside, uint16(1000+i)), time.Hour, 1)); got != pcp.Success {
			t.Fatalf("PEER %d: %v", i, got)
		}
	}
	if got := do(filteredMap(443, pcp.Filter{Remote: wide6})); got != pcp.Success {
		t.Fatalf("MAP with FILTER %v beside the PEERs: %v, want SUCCESS", wide6, got)
	}
	for _, tc := range []struct {
		name string
		r    *pcp.Request
		want pcp.ResultCode
	}{
		{"PEER inside the FILTER, after 10 PEERs", peerReq(addrA, pcp.ProtoTCP, 443, netip.MustParseAddrPort("[2001:db8:5::]:4000"), time.Hour, 1), pcp.NoResources},
		{"PEER outside it", peerReq(addrA, pcp.ProtoTCP, 443, netip.AddrPortFrom(outside, 2000), time.Hour, 1), pcp.Success},
		{"a FILTER of one PEER's remote and port added", filteredMap(443, pcp.Filter{Remote: wide6}, pcp.Filter{Remote: netip.PrefixFrom(outside, 128), RemotePort: 1000}), pcp.Success},
		{"a FILTER around the PEERs added", filteredMap(443, pcp.Filter{Remote: wide6}, pcp.Filter{Remote: netip.MustParsePrefix("2001:db8:99::/48")}), pcp.NoResources},
	} {
		if got := do(tc.r); got != tc.want {
			t.Errorf("%s: %v, want %v", tc.name, got, tc.want)
		}
	}
}

// benchOverlapsHeld times s.overlapsHeld(now, nil, next), granted, under
// s.mu.
func benchOverlapsHeld(b *testing.B, s *Server, now time.Time, next *store.Lease) {
	s.mu.Lock()
	defer s.mu.Unlock()
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		if s.overlapsHeld(now, nil, next) {
			b.Fatal("refused")
		}
	}
}

// TestIvalAtMatchesWalk (review h/revhunt): ivalAt gives what a walk of
// the owner's leases on the address (leasesAt) gives but its plain MAPs,
// through makes, renewals that add or drop FILTERs, and deletes.
func TestIvalAtMatchesWalk(t *testing.T) {
	tab := newTable()
	now := time.Date(2026, 12, 7, 13, 0, 0, 0, time.UTC)
	lease := func(owner string, a netip.Addr, port uint16, peer, filtered bool) store.Lease {
		l := store.Lease{Key: store.Key{Owner: owner, Protocol: protoTCP, InternalAddr: a, InternalPort: port},
			Kind: store.KindMap, ExternalAddr: a, ExternalPort: port, Expires: now.Add(time.Hour)}
		if peer {
			l.Kind, l.Key.Remote = store.KindPeer, netip.AddrPortFrom(netip.MustParseAddr("2001:db8:99::1"), port)
		}
		if filtered {
			l.Filters = []store.Filter{{Prefix: wide6}}
		}
		return l
	}
	addrs := []netip.Addr{addrA, addrA2, addrB, v4A}
	var keys []store.Key
	for i := range 300 {
		a := addrs[i%len(addrs)]
		owner := ownerA
		if a == addrB {
			owner = ownerB
		}
		l := lease(owner, a, uint16(1000+i%37), i%5 == 0, i%3 == 0)
		tab.put(l)
		keys = append(keys, l.Key)
		if i%7 == 0 { // a renewal that drops or adds the FILTERs
			l.Filters = map[bool][]store.Filter{true: nil, false: {{Prefix: narrow6}}}[len(l.Filters) > 0]
			tab.put(l)
		}
		if i%4 == 1 {
			tab.del(keys[i/2])
		}
		for _, a := range addrs[:3] {
			for _, o := range []string{ownerA, ownerB} {
				var want []store.Key
				for _, l := range tab.leasesAt(o, a, protoTCP, true, nil) {
					if l.Kind == store.KindPeer || len(l.Filters) > 0 {
						want = append(want, l.Key)
					}
				}
				var got []store.Key
				for _, l := range tab.ivalAt(o, a, protoTCP, nil) {
					got = append(got, l.Key)
				}
				slices.SortFunc(want, compareKeys)
				slices.SortFunc(got, compareKeys)
				if !slices.Equal(got, want) {
					t.Fatalf("step %d, %s on %v: ivalAt %v, the walk %v", i, o, a, got, want)
				}
			}
		}
	}
}
