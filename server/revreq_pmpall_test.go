package server

import (
	"net/netip"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/policy"
)

// BenchmarkPMPDeleteAll (review h/revreq): a NAT-PMP delete of every TCP
// mapping (internal port 0, lifetime 0, PMP-08) from a client beside n
// leases of another client: what one such request costs the engine
// (ns/op). own=0: the client has no lease; own=1: one UDP lease, made
// after the others (its slot last: the walk reads every slot).
func BenchmarkPMPDeleteAll(b *testing.B) {
	for _, n := range []int{1000, 65536, 262144} {
		for _, own := range []int{0, 1} {
			b.Run("leases="+itoa(n)+"/own="+itoa(own), func(b *testing.B) {
				benchPMPDeleteAll(b, n, own)
			})
		}
	}
}

func benchPMPDeleteAll(b *testing.B, n, own int) {
	{
		{
			h := newHarness(b, func(_ *Config, p *policy.Config) { p.MaxLeases = 1 << 22 })
			putAll(h.s, startLeases(n, h.clock.Now()))
			if own > 0 {
				h.expect(h.do(mapReq(v4A, pcp.ProtoUDP, 8082, 0, time.Hour, 1)), pcp.Success)
			}
			req := pcp.AppendPMPRequest(nil, &pcp.PMPRequest{Opcode: pcp.PMPOpMapTCP})
			src := netip.AddrPortFrom(v4A, 40000)
			b.ResetTimer()
			for range b.N {
				h.s.HandleBatch([]Request{{Local: local4, Source: src, Data: req, admitted: true}})
			}
		}
	}
}

// TestPMPDeleteAllDecodesOwnOnly (review h/revreq, MEDIUM): a NAT-PMP
// delete of every TCP mapping of a client (PMP-08) ends its TCP MAP and
// NAT-PMP leases on its address and nothing else (its UDP one, its PEER,
// its owner's other address, other clients' leases stay), and reads no
// lease but its owner's: it decoded every lease of the table (all()), so
// a client repeating it at its rate limit held the engine for 15 ms a
// request at 65 536 leases (BenchmarkPMPDeleteAll). Before: "decoded
// 10007 leases". Untimed: decode calls are counted.
func TestPMPDeleteAllDecodesOwnOnly(t *testing.T) {
	h := newHarness(t, func(_ *Config, p *policy.Config) { p.MaxLeases = 1 << 20 })
	putAll(h.s, startLeases(10000, h.clock.Now()))
	other4 := netip.MustParseAddr("10.0.0.3") // owner a's too
	pmp := func(src netip.Addr, op pcp.PMPOpcode, port uint16, lifetime time.Duration) {
		t.Helper()
		out := h.raw(src, pcp.AppendPMPRequest(nil, &pcp.PMPRequest{Opcode: op, InternalPort: port, Lifetime: lifetime}))
		var r pcp.PMPResponse
		if err := pcp.ParsePMPResponse(out, &r); err != nil || r.Result != pcp.PMPSuccess {
			t.Fatalf("NAT-PMP %v %d from %v: %+v %v", op, port, src, r, err)
		}
	}
	pmp(v4A, pcp.PMPOpMapTCP, 8080, time.Hour)
	h.expect(h.do(mapReq(v4A, pcp.ProtoTCP, 8081, 0, time.Hour, 1)), pcp.Success)
	h.expect(h.do(mapReq(v4A, pcp.ProtoUDP, 8082, 0, time.Hour, 1)), pcp.Success)
	h.expect(h.do(peerReq(v4A, pcp.ProtoTCP, 8083, netip.MustParseAddrPort("192.0.2.1:80"), time.Hour, 1)), pcp.Success)
	h.expect(h.do(mapReq(other4, pcp.ProtoTCP, 8084, 0, time.Hour, 1)), pcp.Success)

	h.s.mu.Lock()
	before := h.s.tab.decodes
	h.s.mu.Unlock()
	pmp(v4A, pcp.PMPOpMapTCP, 0, 0)
	h.s.mu.Lock()
	decoded := h.s.tab.decodes - before
	h.s.mu.Unlock()

	left := map[uint16]bool{}
	n := 0
	for _, l := range h.s.Leases() {
		if l.Owner == "static:bench" {
			n++
			continue
		}
		left[l.InternalPort] = true
	}
	if n != 10000 || len(left) != 3 || !left[8082] || !left[8083] || !left[8084] {
		t.Errorf("after the delete: %d other client's leases, own ports %v; want 10000 and 8082 (UDP), 8083 (PEER), 8084 (other address)", n, left)
	}
	if decoded > 50 {
		t.Errorf("decoded %d leases for one client's delete of its mappings (its owner holds 5)", decoded)
	}
}
