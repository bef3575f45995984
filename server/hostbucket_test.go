package server

import (
	"net/netip"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/policy"
)

// TestHostSourceOwnBuckets (issue 9, review h/revh3, LOW): a request from
// one of the host's own addresses that lies in an owner's prefix (the
// served 2001:db8:a::1 in client a's 2001:db8:a::/48, the served
// 10.0.0.1 in a's 10.0.0.0/28) is the host's, any local user's: it
// spends rate-limit buckets of the host's own, never a's. Each row
// floods from the host's address, then sends one request of a's own,
// which must get through where the flood spent the host's bucket:
//
//   - the per-source bucket (per /64 for IPv6): a's 2001:db8:a::10 and
//     the host's 2001:db8:a::1 share a /64 on one interface;
//   - the owner bucket (toEngine): NAT-PMP from the host's 10.0.0.1 was
//     taken as a's (Policy.Requester) and held to a's bucket while
//     another owner wanted the engine;
//   - the THIRD_PARTY queue's owner share (deferThirdParty).
//
// And the host's requests take no lease in a's name, so none counts
// against a's quota (--max-leases-per-client): a's own MAP is granted
// after them with a quota of one.
func TestHostSourceOwnBuckets(t *testing.T) {
	host6 := netip.MustParseAddr("2001:db8:a::1")
	host4 := local4.Addr() // 10.0.0.1, in a's 10.0.0.0/28
	served6 := netip.AddrPortFrom(host6, Port)
	isHost := func(a netip.Addr) bool { return a == host6 || a == host4 }
	const burst = 2
	newH := func(t *testing.T) *harness {
		return newHarness(t, func(c *Config, p *policy.Config) {
			c.RateLimit, c.RateBurst, c.QueueLen = 1, burst, 16
			p.HostAddrs, p.MaxLeasesPerClient = isHost, 1
		})
	}
	announce := pcp.AppendRequest(nil, &pcp.Request{Opcode: pcp.OpAnnounce, ClientAddr: host6})
	pmpMap := pcp.AppendPMPRequest(nil, &pcp.PMPRequest{Opcode: pcp.PMPOpMapTCP, InternalPort: 8080, Lifetime: time.Hour})
	mapA := pcp.AppendRequest(nil, mapReq(addrA, pcp.ProtoTCP, 80, 80, time.Hour, 1))

	t.Run("per-source bucket", func(t *testing.T) {
		h := newH(t)
		for range 20 {
			h.s.Handle(served6, netip.AddrPortFrom(host6, 40000), announce)
		}
		if r := h.s.Handle(served6, netip.AddrPortFrom(addrA, 5350), pcp.AppendRequest(nil, &pcp.Request{Opcode: pcp.OpAnnounce, ClientAddr: addrA})); r == nil {
			t.Errorf("after 20 ANNOUNCEs from the host's %v, client a's ANNOUNCE from %v (same /64) was dropped: 'rate-limit' drops %v; want it answered, the host's flood spending the host's bucket", host6, addrA, droppedFor(t, h, "rate-limit"))
		}
		// The host itself is still held to a bucket: of its 20, the
		// burst was answered.
		if d := droppedFor(t, h, "rate-limit"); d != 20-burst {
			t.Errorf("'rate-limit' drops %v, want %d (the host's flood beyond its burst)", d, 20-burst)
		}
	})

	t.Run("owner bucket", func(t *testing.T) {
		h := newH(t)
		now := h.clock.Now()
		// As the socket reader: sent to the serving address of its family.
		early := func(src netip.Addr, b []byte) (queued bool) {
			local := served6.Addr()
			if src.Is4() {
				local = host4
			}
			r, v := h.s.earlyRead(nil, nil, b, netip.AddrPortFrom(src, 5350), local, "", now)
			if v == earlyAnswered && r != nil {
				t.Fatalf("request from %v answered early: % x", src, r)
			}
			return v == earlyEngine
		}
		// Owner b wants the engine: the owner buckets bind.
		if !early(addrB, pcp.AppendRequest(nil, mapReq(addrB, pcp.ProtoTCP, 80, 80, time.Hour, 1))) {
			t.Fatal("b's MAP dropped")
		}
		n := 0
		for range 100 {
			if early(host4, pmpMap) {
				n++
			}
		}
		if n != ownerRateFactor*burst {
			t.Errorf("%d of the host's 100 NAT-PMP requests queued, want its owner burst %d", n, ownerRateFactor*burst)
		}
		if !early(addrA, mapA) {
			t.Errorf("after 100 NAT-PMP requests from the host's %v (in a's 10.0.0.0/28), client a's MAP was dropped: 'owner-rate-limit' drops %v; want it queued", host4, droppedFor(t, h, "owner-rate-limit"))
		}
	})

	t.Run("THIRD_PARTY queue share", func(t *testing.T) {
		h := newH(t)
		c := &udpConn{kname: "lo", local: served6}
		for range tpQueueOwnerCap + 10 {
			h.s.deferThirdParty(packet{conn: c, src: netip.AddrPortFrom(host6, 40000), b: announce})
		}
		h.s.deferThirdParty(packet{conn: c, src: netip.AddrPortFrom(addrA, 5350), b: mapA})
		if n := h.s.tpq.byOwner[h.s.orl.Key(ownerA)]; n != 1 {
			t.Errorf("after %d requests from the host's %v, client a's request: %d of a's queued, want 1 ('thirdparty-queue-full' drops %v)", tpQueueOwnerCap+10, host6, n, droppedFor(t, h, "thirdparty-queue-full"))
		}
		if d := droppedFor(t, h, "thirdparty-queue-full"); d != 10 {
			t.Errorf("'thirdparty-queue-full' drops %v, want 10 (the host's beyond its share)", d)
		}
	})

	t.Run("quota", func(t *testing.T) {
		h := newH(t)
		if r := h.s.Handle(local4, netip.AddrPortFrom(host4, 40000), pmpMap); len(r) < 4 || r[3] != 2 {
			t.Errorf("host's NAT-PMP map from %v: % x, want result 2 (NOT_AUTHORIZED)", host4, r)
		}
		tp := mapReq(host6, pcp.ProtoTCP, 81, 81, time.Hour, 2)
		tp.Options.ThirdParty = addrA2
		if resp := h.doFrom(host6, tp); resp.Result != pcp.NotAuthorized {
			t.Errorf("host's THIRD_PARTY MAP of a's %v: %v, want NOT_AUTHORIZED", addrA2, resp.Result)
		}
		if n := h.s.tab.byOwner[ownerA]; n != 0 {
			t.Fatalf("the host's requests left %d leases in a's name", n)
		}
		h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 80, 80, time.Hour, 1)), pcp.Success)
	})
}

// TestLinkSourceHostAddressOwnersBucket (issue 9, review h/revl9): a
// request that came from a link, not through loopback, is its sender's,
// whatever its source: the serving sockets' filter (hostOwnFilter) takes
// a loopback datagram only from the address it was sent to, so a source
// that is one of the host's addresses but not the serving address
// (hostOther: the host's address on another interface, or one it held a
// moment ago, or has not been read to hold yet) was sent by a client
// from the link: client a, whose 2001:db8:a::/48 holds it, or a
// WireGuard peer whose AllowedIPs do (IPv6 has no martian-source check).
// It spends a's buckets, not the host's: otherwise a escapes its own
// owner bucket and THIRD_PARTY queue share by sending from that address,
// and its flood spends the bucket of the host's own requests (the
// served address's, through loopback).
func TestLinkSourceHostAddressOwnersBucket(t *testing.T) {
	served := netip.MustParseAddr("2001:db8:a::1")     // the host's, served: its own requests come from it
	hostOther := netip.MustParseAddr("2001:db8:a::ff") // the host's too, not the serving address
	host4 := local4.Addr()                             // 10.0.0.1, in a's 10.0.0.0/28, served: the host's NAT-PMP comes from it
	isHost := func(a netip.Addr) bool { return a == served || a == hostOther || a == host4 }
	const burst = 2
	newH := func(t *testing.T) *harness {
		return newHarness(t, func(c *Config, p *policy.Config) {
			c.RateLimit, c.RateBurst, c.QueueLen = 1, burst, 16
			c.DisablePeer = true
			p.HostAddrs = isHost
		})
	}
	pcpMap := func(src netip.Addr) []byte {
		return pcp.AppendRequest(nil, mapReq(src, pcp.ProtoTCP, 80, 80, time.Hour, 1))
	}
	// A PEER with --disable-peer: the engine answers it, so it spends
	// its sender's owner token (toEngine, Requester's); a MAP or an
	// allowed PEER from a host address is refused before (never
	// openable), and NAT-PMP from the link is IPv4, whose martian check
	// drops a local source.
	disabledPeer := func(src netip.Addr) []byte {
		return pcp.AppendRequest(nil, peerReq(src, pcp.ProtoTCP, 80, netip.MustParseAddrPort("[2001:db8:ffff::1]:443"), time.Hour, 1))
	}
	hostPMP := pcp.AppendPMPRequest(nil, &pcp.PMPRequest{Opcode: pcp.PMPOpMapTCP, InternalPort: 8080, Lifetime: time.Hour})

	for _, tc := range []struct {
		name        string
		flood       netip.Addr // a's 50 requests, from the link
		probe       netip.Addr
		probeTo     netip.AddrPort // the serving address the probe was sent to
		probeB      []byte
		probeQueued bool
	}{
		// a spent its owner bucket from its own address: its requests
		// from the host's other address are a's too.
		{"a's bucket spent, then a from the host's other address", addrA, hostOther, netip.AddrPortFrom(served, Port), disabledPeer(hostOther), false},
		// a's flood from the host's other address spent a's bucket,
		// not the host's: the host's own NAT-PMP request is queued.
		{"a's flood from the host's other address, then the host's own NAT-PMP", hostOther, host4, local4, hostPMP, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newH(t)
			now := h.clock.Now()
			early := func(src netip.Addr, local netip.AddrPort, b []byte) (queued bool) {
				r, v := h.s.earlyRead(nil, nil, b, netip.AddrPortFrom(src, 5350), local.Addr(), "", now)
				if v == earlyAnswered && r != nil {
					t.Fatalf("request from %v answered early: % x", src, r)
				}
				return v == earlyEngine
			}
			// Owner b wants the engine: the owner buckets bind.
			if !early(addrB, netip.AddrPortFrom(served, Port), pcpMap(addrB)) {
				t.Fatal("b's MAP dropped")
			}
			n := 0
			for range 50 {
				if early(tc.flood, netip.AddrPortFrom(served, Port), disabledPeer(tc.flood)) {
					n++
				}
			}
			before := droppedFor(t, h, "owner-rate-limit")
			got := early(tc.probe, tc.probeTo, tc.probeB)
			if !got && droppedFor(t, h, "owner-rate-limit") != before+1 {
				t.Errorf("the probe from %v was not queued, nor dropped 'owner-rate-limit'", tc.probe)
			}
			if got != tc.probeQueued {
				t.Errorf("after 50 requests from %v (in a's prefix, %d queued) arriving from the link, a request from %v: queued %v, want %v ('owner-rate-limit' drops %v)",
					tc.flood, n, tc.probe, got, tc.probeQueued, droppedFor(t, h, "owner-rate-limit"))
			}
		})
	}

	t.Run("THIRD_PARTY queue share", func(t *testing.T) {
		h := newH(t)
		c := &udpConn{kname: "lan0", local: netip.AddrPortFrom(served, Port)}
		for range tpQueueOwnerCap {
			h.s.deferThirdParty(packet{conn: c, src: netip.AddrPortFrom(addrA, 5350), b: pcpMap(addrA)})
		}
		h.s.deferThirdParty(packet{conn: c, src: netip.AddrPortFrom(hostOther, 5350), b: pcpMap(hostOther)})
		if d := droppedFor(t, h, "thirdparty-queue-full"); d != 1 {
			t.Errorf("a filled its share (%d), then a request from the host's %v from the link: 'thirdparty-queue-full' drops %v, want 1 (a's share, not the host's)", tpQueueOwnerCap, hostOther, d)
		}
	})
}

// droppedFor is the server's count of requests dropped for reason.
func droppedFor(t *testing.T, h *harness, reason string) float64 {
	t.Helper()
	var m dto.Metric
	if err := h.s.m.dropped.WithLabelValues(reason).Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetCounter().GetValue()
}
