package server

import (
	"context"
	"encoding/hex"
	"net/netip"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/policy"
	"github.com/pcpd/pcpd/store"
)

// TestUpdateMessageGolden (UPD-02, UPD-03): the unsolicited response's
// octets: the mapping's opcode, the result, the error's lifetime, epoch 0
// (set at each send), the nonce, protocol, internal port, the assigned
// external (IPv4-mapped), PEER's remote, THIRD_PARTY when the mapping had
// it, the MAP's FILTERs, nothing else (PREFER_FAILURE and DESCRIPTION
// are not repeated).
func TestUpdateMessageGolden(t *testing.T) {
	nonce := [12]byte{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}
	tpAddr := netip.MustParseAddr("2001:db8:a::11")
	rows := []struct {
		name string
		l    store.Lease
		code pcp.ResultCode
		want string
	}{{
		name: "PREFER_FAILURE MAP, forwarded",
		l: store.Lease{Key: store.Key{Owner: "a", InternalAddr: v4A, InternalPort: 1445, Protocol: 6},
			ExternalAddr: ext4, ExternalPort: 1445, Kind: store.KindMap, Nonce: nonce, PreferFailure: true, Description: "web"},
		code: pcp.CannotProvideExternal,
		want: "0281000b" + "0000001e" + "00000000" + "000000000000000000000000" +
			"0102030405060708090a0b0c" + "06000000" + "05a5" + "05a5" + "00000000000000000000ffffc6336401",
	}, {
		name: "IPv4 PEER, forwarded",
		l: store.Lease{Key: store.Key{Owner: "a", InternalAddr: v4A, InternalPort: 5000, Protocol: 17,
			Remote: netip.MustParseAddrPort("203.0.113.9:6000")},
			ExternalAddr: ext4, ExternalPort: 5000, Kind: store.KindPeer, Nonce: nonce},
		code: pcp.CannotProvideExternal,
		want: "0282000b" + "0000001e" + "00000000" + "000000000000000000000000" +
			"0102030405060708090a0b0c" + "11000000" + "1388" + "1388" + "00000000000000000000ffffc6336401" +
			"1770" + "0000" + "00000000000000000000ffffcb007109",
	}, {
		name: "THIRD_PARTY MAP with a FILTER, revoked",
		l: store.Lease{Key: store.Key{Owner: "a", InternalAddr: tpAddr, InternalPort: 443, Protocol: 6},
			ExternalAddr: tpAddr, ExternalPort: 443, Kind: store.KindMap, Nonce: nonce, ThirdParty: true,
			Filters: []store.Filter{{Prefix: netip.MustParsePrefix("2001:db8:99::/48")}}},
		code: pcp.NotAuthorized,
		want: "02810002" + "00000708" + "00000000" + "000000000000000000000000" +
			"0102030405060708090a0b0c" + "06000000" + "01bb" + "01bb" + "20010db8000a00000000000000000011" +
			"01000010" + "20010db8000a00000000000000000011" +
			"03000014" + "00300000" + "20010db8009900000000000000000000",
	}}
	for _, r := range rows {
		t.Run(r.name, func(t *testing.T) {
			if got := hex.EncodeToString(updateMessage(&r.l, r.code)); got != r.want {
				t.Errorf("\n got %s\nwant %s", got, r.want)
			}
		})
	}
	// 64 FILTERs (--max-filters' most, gathered over renewals) do not fit
	// in one message: none are sent, the result stays (the encoder's
	// guard made it MALFORMED_REQUEST without options).
	l := rows[2].l
	l.Filters = nil
	for i := range 64 {
		l.Filters = append(l.Filters, store.Filter{Prefix: netip.PrefixFrom(netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0, 0x99, byte(i)}), 56)})
	}
	b := updateMessage(&l, pcp.NotAuthorized)
	var resp pcp.Response
	if err := pcp.ParseResponse(b, &resp); err != nil || resp.Result != pcp.NotAuthorized || len(resp.Options.Filters) != 0 ||
		resp.Options.ThirdParty != tpAddr || len(b) > pcp.MaxMessageSize {
		t.Errorf("64 FILTERs: %d octets, %v, %d filters, THIRD_PARTY %v (%v); want NOT_AUTHORIZED, none, %v", len(b), resp.Result, len(resp.Options.Filters), resp.Options.ThirdParty, err, tpAddr)
	}
}

// sent is one datagram an update round handed over.
type sent struct {
	from, to netip.AddrPort
	resp     pcp.Response
	chunk    int // datagrams in its send call
}

// captureUpdates makes h's server hand its unsolicited updates to the
// returned recorder instead of sockets.
func captureUpdates(t *testing.T, h *harness) func() []sent {
	var mu sync.Mutex
	var got []sent
	h.s.updateSend = func(from netip.AddrPort, rs []reply) error {
		mu.Lock()
		defer mu.Unlock()
		for _, r := range rs {
			var resp pcp.Response
			if err := pcp.ParseResponse(r.b, &resp); err != nil {
				t.Errorf("unsolicited % x: %v", r.b, err)
			}
			got = append(got, sent{from: from, to: r.to, resp: resp, chunk: len(rs)})
		}
		return nil
	}
	return func() []sent {
		mu.Lock()
		defer mu.Unlock()
		out := got
		got = nil
		return out
	}
}

// TestForwardedEndSendsCannotProvideExternal (UPD-02): the PREFER_FAILURE
// MAP and the PEER that endForwarded ends (the admin forwarded their
// external port) are each told CANNOT_PROVIDE_EXTERNAL, unsolicited, to
// the address:port of their last reply from the serving address it left
// from: three sends, the second ≥ 250 ms after the first, the third ≥
// 500 ms after the second (the fake clock), then none. The plain MAP on a
// forwarded port is not ended (moved at its renewal) and gets nothing.
// Before h/upd nothing was sent (forwardend.go: "nothing is sent to the
// client").
func TestForwardedEndSendsCannotProvideExternal(t *testing.T) {
	h, ff := forwardHarness(t)
	got := captureUpdates(t, h)
	ctx := context.Background()
	rem := netip.MustParseAddrPort("203.0.113.9:5000")
	r := mapReq(v4A, pcp.ProtoTCP, 1445, 1445, time.Hour, 8)
	r.Map.ExternalAddr = ext4
	r.Options.PreferFailure = true
	h.expect(h.do(r), pcp.Success)
	p := peerReq(v4A, pcp.ProtoTCP, 1446, rem, time.Hour, 9)
	p.Map.ExternalAddr, p.Map.ExternalPort = ext4, 1446
	h.expect(h.do(p), pcp.Success)
	plain := mapReq(v4A, pcp.ProtoTCP, 1447, 1447, time.Hour, 10)
	h.expect(h.do(plain), pcp.Success)

	var f pinhole.ForeignDNAT
	for _, port := range []uint16{1445, 1446, 1447} {
		f.TCP.Add(port)
	}
	ff.set(&f, nil)
	h.s.hostPorts.refresh()
	h.s.endForwarded()

	client := netip.AddrPortFrom(v4A, 40000)
	check := func(step string, want int) {
		t.Helper()
		h.s.updateRound(ctx)
		out := got()
		if len(out) != want {
			t.Fatalf("%s: %d datagrams, want %d: %+v", step, len(out), want, out)
		}
		ports := map[uint16]pcp.Opcode{}
		for _, d := range out {
			ports[d.resp.Map.InternalPort] = d.resp.Opcode
			if d.from != local4 || d.to != client || d.resp.Result != pcp.CannotProvideExternal ||
				d.resp.Lifetime != 30*time.Second || d.resp.Map.ExternalAddr != ext4 || d.resp.Map.ExternalPort != d.resp.Map.InternalPort {
				t.Errorf("%s: %v → %v %v lifetime %v external %v:%d", step, d.from, d.to, d.resp.Result, d.resp.Lifetime, d.resp.Map.ExternalAddr, d.resp.Map.ExternalPort)
			}
			if d.resp.Options.PreferFailure || d.resp.Options.ThirdParty.IsValid() {
				t.Errorf("%s: options %+v, want none", step, d.resp.Options)
			}
		}
		if want > 0 && (ports[1445] != pcp.OpMap || ports[1446] != pcp.OpPeer || len(ports) != 2) {
			t.Errorf("%s: sent for internal ports %v, want MAP 1445 and PEER 1446", step, ports)
		}
	}
	check("at once", 2)
	check("again at once", 0)
	h.clock.Advance(249 * time.Millisecond)
	check("249 ms later", 0)
	h.clock.Advance(time.Millisecond)
	check("250 ms later", 2)
	h.clock.Advance(499 * time.Millisecond)
	check("499 ms after the second", 0)
	h.clock.Advance(time.Millisecond)
	check("500 ms after the second", 2)
	h.clock.Advance(time.Hour)
	check("an hour later", 0)
	if _, more := h.s.updateRound(ctx); more {
		t.Error("updates still queued after three sends")
	}
	if n := counterValue(t, h.s.m.updatesSent); n != 6 {
		t.Errorf("pcpd_mapping_updates_sent_total %v, want 6", n)
	}
}

// TestRevokeSendsNotAuthorized (UPD-03): an operator's revoke tells the
// client NOT_AUTHORIZED for the mapping, unsolicited; once the client
// maps again (its answer came with its request) the other sends stop.
func TestRevokeSendsNotAuthorized(t *testing.T) {
	h := newHarness(t)
	h.start()
	got := captureUpdates(t, h)
	ctx := context.Background()
	h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 443, 0, time.Hour, 7)), pcp.Success)
	key := store.Key{Owner: ownerA, InternalAddr: addrA, InternalPort: 443, Protocol: 6}
	if n, err := h.s.Revoke(ctx, RevokeFilter{Key: &key}); n != 1 || err != nil {
		t.Fatalf("revoke: %d, %v", n, err)
	}
	h.s.updateRound(ctx)
	out := got()
	if len(out) != 1 || out[0].to != netip.AddrPortFrom(addrA, 40000) || out[0].from != local6 ||
		out[0].resp.Result != pcp.NotAuthorized || out[0].resp.Map.Nonce != (pcp.Nonce{7}) || out[0].resp.Map.InternalPort != 443 {
		t.Fatalf("after the revoke: %+v, want one NOT_AUTHORIZED for TCP 443 to [%v]:40000", out, addrA)
	}
	h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 443, 0, time.Hour, 7)), pcp.Success)
	h.clock.Advance(time.Second)
	h.s.updateRound(ctx)
	if out := got(); len(out) != 0 {
		t.Fatalf("after the client mapped again: %+v, want nothing", out)
	}
	if n := counterValue(t, h.s.m.updatesDropped.WithLabelValues("answered")); n != 1 {
		t.Errorf("dropped{answered} %v, want 1", n)
	}
}

// TestRevokedUpdateOnlyToOwnedAddress (UPD-03, SEC-01): the ownership
// sweep's NOT_AUTHORIZED goes only to an address its mapping's owner
// still owns: not to an address the owner lost (its peer's AllowedIPs no
// longer hold it: WireGuard would route it to nobody, or to the peer now
// holding it), whatever sweep ends it. A THIRD_PARTY mapping whose
// target the owner lost, requested from an address it keeps, is told,
// THIRD_PARTY included.
func TestRevokedUpdateOnlyToOwnedAddress(t *testing.T) {
	rows := []struct {
		name   string
		src    netip.Addr
		tp     bool
		shrink func(o map[policy.OwnerID][]netip.Prefix)
		told   bool
	}{
		{"source lost", addrA, false, func(o map[policy.OwnerID][]netip.Prefix) {
			o["wg:A"] = []netip.Prefix{netip.MustParsePrefix("2001:db8:a::11/128")}
		}, false},
		{"source moved to another peer", addrA, false, func(o map[policy.OwnerID][]netip.Prefix) {
			o["wg:A"] = []netip.Prefix{netip.MustParsePrefix("2001:db8:a::11/128")}
			o["wg:B"] = append(o["wg:B"], netip.MustParsePrefix("2001:db8:a::10/128"))
		}, false},
		{"THIRD_PARTY target lost, source kept", addrA2, true, func(o map[policy.OwnerID][]netip.Prefix) {
			o["wg:A"] = []netip.Prefix{netip.MustParsePrefix("2001:db8:a::11/128")}
		}, true},
	}
	for _, sweep := range ownershipSweeps {
		for _, r := range rows {
			t.Run(sweep.name+"/"+r.name, func(t *testing.T) {
				h := newHarness(t)
				own := &mutableOwnership{owners: map[policy.OwnerID][]netip.Prefix{
					"wg:A": {netip.MustParsePrefix("2001:db8:a::/48")},
					"wg:B": {netip.MustParsePrefix("2001:db8:b::/48")},
				}}
				h.own = own
				h.start()
				got := captureUpdates(t, h)
				req := mapReq(r.src, pcp.ProtoTCP, 443, 0, time.Hour, 3)
				if r.tp {
					req.Options.ThirdParty = addrA
				}
				h.expect(h.do(req), pcp.Success)
				own.mu.Lock()
				r.shrink(own.owners)
				own.mu.Unlock()
				sweep.run(h.s)
				if len(h.s.Leases()) != 0 {
					t.Fatalf("lease not revoked: %v", h.s.Leases())
				}
				h.s.updateRound(context.Background())
				out := got()
				if !r.told {
					if len(out) != 0 {
						t.Fatalf("sent %+v to an address its owner lost", out)
					}
					if n := counterValue(t, h.s.m.updatesDropped.WithLabelValues("unserved")); n != 1 {
						t.Errorf("dropped{unserved} %v, want 1", n)
					}
					return
				}
				if len(out) != 1 || out[0].to != netip.AddrPortFrom(r.src, 40000) || out[0].resp.Result != pcp.NotAuthorized ||
					out[0].resp.Options.ThirdParty != addrA {
					t.Fatalf("sent %+v, want one NOT_AUTHORIZED with THIRD_PARTY %v to [%v]:40000", out, addrA, r.src)
				}
			})
		}
	}
}

// TestUpdateQueueBounded (PROTOCOL.md (f)): ends beyond maxUpdates
// waiting are not queued, counted as dropped{queue_full}; a round sends
// at most updateChunk datagrams per send call.
func TestUpdateQueueBounded(t *testing.T) {
	h := newHarness(t)
	h.start()
	got := captureUpdates(t, h)
	const n = maxUpdates + 904
	gone := make([]store.Lease, n)
	for i := range gone {
		gone[i] = store.Lease{Key: store.Key{Owner: ownerA, InternalAddr: addrA, InternalPort: uint16(1024 + i), Protocol: 6},
			ExternalAddr: addrA, ExternalPort: uint16(1024 + i), Kind: store.KindMap,
			ClientAddr: netip.AddrPortFrom(addrA, 40000), ServerAddr: local6}
	}
	h.s.mu.Lock()
	h.s.queueUpdates(gone, pcp.NotAuthorized)
	h.s.mu.Unlock()
	if n := counterValue(t, h.s.m.updatesDropped.WithLabelValues("queue_full")); n != 904 {
		t.Errorf("dropped{queue_full} %v, want 904", n)
	}
	h.s.updateRound(context.Background())
	out := got()
	if len(out) != maxUpdates {
		t.Errorf("first round sent %d, want %d", len(out), maxUpdates)
	}
	for _, d := range out {
		if d.chunk > updateChunk {
			t.Fatalf("a send call of %d datagrams, want ≤ %d", d.chunk, updateChunk)
		}
		if d.resp.Map.InternalPort >= 1024+maxUpdates {
			t.Fatalf("sent for port %d, dropped beyond the cap", d.resp.Map.InternalPort)
		}
	}
}

// TestUpdateNotForNATPMP: NAT-PMP has no per-mapping unsolicited message;
// a revoked NAT-PMP lease queues nothing.
func TestUpdateNotForNATPMP(t *testing.T) {
	h := newHarness(t)
	h.start()
	l := store.Lease{Key: store.Key{Owner: ownerA, InternalAddr: v4A, InternalPort: 80, Protocol: 6}, Kind: store.KindNATPMP,
		ClientAddr: netip.AddrPortFrom(v4A, 40000), ServerAddr: local4}
	h.s.mu.Lock()
	h.s.queueUpdates([]store.Lease{l}, pcp.NotAuthorized)
	q := len(h.s.upd.q)
	h.s.mu.Unlock()
	if q != 0 {
		t.Errorf("%d updates queued for a NAT-PMP lease", q)
	}
}

// BenchmarkQueueUpdates is what queueing a revocation chunk's updates
// (revokeChunk leases, under the engine lock) adds to its hold: with room
// in the queue, and with the queue full (each lease only counted).
func BenchmarkQueueUpdates(b *testing.B) {
	for _, full := range []bool{false, true} {
		name := "room"
		if full {
			name = "full"
		}
		b.Run(name, func(b *testing.B) {
			s := &Server{m: newMetrics(func() float64 { return 0 }), steady: time.Now}
			gone := make([]store.Lease, revokeChunk)
			for i := range gone {
				gone[i] = store.Lease{Key: store.Key{Owner: ownerA, InternalAddr: addrA, InternalPort: uint16(1024 + i), Protocol: 6},
					ExternalAddr: addrA, ExternalPort: uint16(1024 + i), Kind: store.KindMap, Nonce: [12]byte{1},
					ClientAddr: netip.AddrPortFrom(addrA, 40000), ServerAddr: local6}
			}
			fill := make([]*update, maxUpdates)
			b.ReportAllocs()
			for b.Loop() {
				s.upd = updates{}
				if full {
					s.upd.q = fill
				}
				s.queueUpdates(gone, pcp.NotAuthorized)
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/1000, "µs/chunk")
		})
	}
}

// TestUpdateEndedAgainWhileSending: a mapping ended again while its
// update's send is in flight (queueUpdates' "ended again" branch runs
// between updateRound's check and its send, the engine lock free then)
// restarts its three sends; the round's bookkeeping after the send must
// not take the restarted count for a sent one. Before h/revsu it
// computed the next gap as updateFirstGap << (sent-1) with sent 0: a
// negative shift, a runtime panic on the update goroutine, which ends
// pcpd.
func TestUpdateEndedAgainWhileSending(t *testing.T) {
	h := newHarness(t)
	h.start()
	l := store.Lease{Key: store.Key{Owner: ownerA, InternalAddr: addrA, InternalPort: 443, Protocol: 6},
		ExternalAddr: addrA, ExternalPort: 443, Kind: store.KindMap, Nonce: [12]byte{7},
		ClientAddr: netip.AddrPortFrom(addrA, 40000), ServerAddr: local6}
	var sends []pcp.ResultCode
	h.s.updateSend = func(from netip.AddrPort, rs []reply) error {
		for _, r := range rs {
			var resp pcp.Response
			if err := pcp.ParseResponse(r.b, &resp); err != nil {
				t.Fatalf("unsolicited % x: %v", r.b, err)
			}
			sends = append(sends, resp.Result)
		}
		if len(sends) == 1 {
			// Ended again, its first send leaving.
			h.s.mu.Lock()
			h.s.queueUpdates([]store.Lease{l}, pcp.CannotProvideExternal)
			h.s.mu.Unlock()
		}
		return nil
	}
	h.s.mu.Lock()
	h.s.queueUpdates([]store.Lease{l}, pcp.NotAuthorized)
	h.s.mu.Unlock()
	func() {
		defer func() {
			if r := recover(); r != nil {
				t.Fatalf("updateRound with the mapping ended again during its send: panic %v", r)
			}
		}()
		ctx := context.Background()
		for range 8 {
			h.s.updateRound(ctx)
			h.clock.Advance(time.Second)
		}
	}()
	want := []pcp.ResultCode{pcp.NotAuthorized, pcp.CannotProvideExternal, pcp.CannotProvideExternal, pcp.CannotProvideExternal}
	if !slices.Equal(sends, want) {
		t.Errorf("sent %v, want %v (the first end's first send, then the second end's three)", sends, want)
	}
}
