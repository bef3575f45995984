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
	dropped := func(t *testing.T, h *harness, reason string) float64 {
		var m dto.Metric
		if err := h.s.m.dropped.WithLabelValues(reason).Write(&m); err != nil {
			t.Fatal(err)
		}
		return m.GetCounter().GetValue()
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
			t.Errorf("after 20 ANNOUNCEs from the host's %v, client a's ANNOUNCE from %v (same /64) was dropped: 'rate-limit' drops %v; want it answered, the host's flood spending the host's bucket", host6, addrA, dropped(t, h, "rate-limit"))
		}
		// The host itself is still held to a bucket: of its 20, the
		// burst was answered.
		if d := dropped(t, h, "rate-limit"); d != 20-burst {
			t.Errorf("'rate-limit' drops %v, want %d (the host's flood beyond its burst)", d, 20-burst)
		}
	})

	t.Run("owner bucket", func(t *testing.T) {
		h := newH(t)
		now := h.clock.Now()
		early := func(src netip.Addr, b []byte) (queued bool) {
			r, handled := h.s.early(nil, b, netip.AddrPortFrom(src, 5350), now)
			if handled && r != nil {
				t.Fatalf("request from %v answered early: % x", src, r)
			}
			return !handled
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
			t.Errorf("after 100 NAT-PMP requests from the host's %v (in a's 10.0.0.0/28), client a's MAP was dropped: 'owner-rate-limit' drops %v; want it queued", host4, dropped(t, h, "owner-rate-limit"))
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
			t.Errorf("after %d requests from the host's %v, client a's request: %d of a's queued, want 1 ('thirdparty-queue-full' drops %v)", tpQueueOwnerCap+10, host6, n, dropped(t, h, "thirdparty-queue-full"))
		}
		if d := dropped(t, h, "thirdparty-queue-full"); d != 10 {
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
