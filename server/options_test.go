package server

import (
	"context"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/policy"
	"github.com/pcpd/pcpd/server/servertest"
	"github.com/pcpd/pcpd/store"
)

// TestPF01to05PreferFailure.
func TestPF01to05PreferFailure(t *testing.T) {
	h := newHarness(t)
	pf := func(port, sugg uint16, lifetime time.Duration, n byte) *pcp.Request {
		r := mapReq(addrA, pcp.ProtoTCP, port, sugg, lifetime, n)
		r.Options.PreferFailure = true
		return r
	}
	t.Run("PF-01", func(t *testing.T) {
		resp := h.do(pf(443, 80, 600*time.Second, 1))
		h.expect(resp, pcp.Success)
		if resp.Map.ExternalPort != 80 || !resp.Options.PreferFailure {
			t.Fatalf("reply %+v", resp)
		}
	})
	t.Run("PF-02", func(t *testing.T) {
		h.expect(h.do(pf(443, 0, time.Hour, 1)), pcp.MalformedOption)
		h.expect(h.do(pf(443, 80, 0, 1)), pcp.MalformedOption)
		p := peerReq(addrA, pcp.ProtoTCP, 443, remote, time.Hour, 1)
		p.Options.PreferFailure = true
		h.expect(h.do(p), pcp.MalformedRequest)
	})
	t.Run("PF-03/PF-05", func(t *testing.T) {
		before := h.snap()
		resp := h.do(pf(443, 81, 600*time.Second, 1))
		h.expect(resp, pcp.CannotProvideExternal)
		if resp.Lifetime != 840*time.Second {
			t.Fatalf("lifetime %v, want 600+240 s", resp.Lifetime)
		}
		h.unchanged(before)
	})
	t.Run("PF-04", func(t *testing.T) {
		before := h.snap()
		// Port 80 on addrA is taken by the 443 mapping: a new mapping
		// insisting on it fails, with the conflict's remaining + 240 s.
		resp := h.do(pf(8080, 80, time.Hour, 2))
		h.expect(resp, pcp.CannotProvideExternal)
		if resp.Lifetime != 840*time.Second {
			t.Fatalf("lifetime %v", resp.Lifetime)
		}
		// Not ours as address: fails; unspecified address: port only.
		r := pf(8080, 8081, time.Hour, 2)
		r.Map.ExternalAddr = addrB
		resp = h.do(r)
		h.expect(resp, pcp.CannotProvideExternal)
		if resp.Lifetime != 30*time.Second {
			t.Fatalf("lifetime %v", resp.Lifetime)
		}
		h.unchanged(before)
		resp = h.do(pf(8080, 8081, time.Hour, 2))
		h.expect(resp, pcp.Success)
		if resp.Map.ExternalPort != 8081 {
			t.Fatalf("port %d", resp.Map.ExternalPort)
		}
	})
}

// TestFLT01to08Filter.
func TestFLT01to08Filter(t *testing.T) {
	pA := netip.MustParsePrefix("2001:db8:99::/48")
	pB := netip.MustParsePrefix("2001:db8:98::/48")
	withFilters := func(n byte, fs ...pcp.Filter) *pcp.Request {
		r := mapReq(addrA, pcp.ProtoTCP, 443, 0, time.Hour, n)
		r.Options.Filters = fs
		return r
	}
	filtered := func(h *harness, prefixes ...netip.Prefix) {
		t.Helper()
		holes := h.fw.Holes()
		if len(holes) != len(prefixes) {
			t.Fatalf("pinholes %v, want filters %v", holes, prefixes)
		}
		for _, p := range prefixes {
			ph := hole(6, addrA, 443, addrA, 443)
			ph.RemotePrefix = p
			if _, ok := holes[ph]; !ok {
				t.Fatalf("no pinhole from %v in %v", p, holes)
			}
		}
	}
	t.Run("FLT-01", func(t *testing.T) {
		h := newHarness(t)
		resp := h.do(withFilters(1, pcp.Filter{Remote: pA}, pcp.Filter{Remote: pB, RemotePort: 53}))
		h.expect(resp, pcp.Success)
		if len(resp.Options.Filters) != 2 {
			t.Fatalf("filters not echoed: %+v", resp.Options)
		}
		holes := h.fw.Holes()
		ph := hole(6, addrA, 443, addrA, 443)
		ph.RemotePrefix, ph.RemotePort = pB, 53
		if _, ok := holes[ph]; !ok || len(holes) != 2 {
			t.Fatalf("pinholes %v", holes)
		}
	})
	t.Run("FLT-03", func(t *testing.T) {
		h := newHarness(t)
		h.expect(h.do(withFilters(1, pcp.Filter{Remote: pA}, pcp.Filter{}, pcp.Filter{Remote: pB})), pcp.Success)
		filtered(h, pB)
		h.expect(h.do(withFilters(1, pcp.Filter{}, pcp.Filter{Remote: pA})), pcp.Success)
		filtered(h, pA)
	})
	t.Run("FLT-04", func(t *testing.T) {
		h := newHarness(t)
		h.expect(h.do(withFilters(1, pcp.Filter{Remote: pA})), pcp.Success)
		h.expect(h.do(withFilters(1, pcp.Filter{Remote: pB})), pcp.Success)
		filtered(h, pA, pB)
		h.expect(h.do(withFilters(1)), pcp.Success)
		filtered(h, pA, pB)
	})
	t.Run("FLT-05", func(t *testing.T) {
		h := newHarness(t)
		r := withFilters(1, pcp.Filter{Remote: pA})
		r.Lifetime = 0
		h.expect(h.do(r), pcp.MalformedOption)
	})
	t.Run("FLT-06", func(t *testing.T) {
		h := newHarness(t, func(c *Config, _ *policy.Config) { c.MaxFilters = 2 })
		h.expect(h.do(withFilters(1, pcp.Filter{Remote: pA})), pcp.Success)
		before := h.snap()
		three := []pcp.Filter{{Remote: pB}, {Remote: netip.MustParsePrefix("2001:db8:97::/48")}}
		h.expect(h.do(withFilters(1, three...)), pcp.ExcessiveRemotePeers)
		h.unchanged(before) // HDR-06
		h2 := newHarness(t, func(c *Config, _ *policy.Config) { c.MaxFilters = 2 })
		h2.expect(h2.do(withFilters(1, pcp.Filter{Remote: pA}, pcp.Filter{Remote: pB}, pcp.Filter{Remote: netip.MustParsePrefix("2001:db8:97::/48")})), pcp.ExcessiveRemotePeers)
		if len(h2.fw.Holes()) != 0 {
			t.Fatal("state after refusal")
		}
	})
	t.Run("FLT-08", func(t *testing.T) {
		h := newHarness(t)
		h.expect(h.do(withFilters(1, pcp.Filter{Remote: netip.MustParsePrefix("192.0.2.0/24")})), pcp.MalformedOption)
	})
	t.Run("FLT-02", func(t *testing.T) {
		h := newHarness(t)
		r := mapReq(v4A, pcp.ProtoTCP, 22, 0, time.Hour, 1)
		r.Options.Filters = []pcp.Filter{{Remote: netip.MustParsePrefix("192.0.2.0/24")}}
		h.expect(h.do(r), pcp.Success)
		ph := pinhole.Pinhole{Protocol: 6, InternalAddr: v4A, InternalPort: 22, ExternalAddr: ext4, ExternalPort: 1024,
			RemotePrefix: netip.MustParsePrefix("192.0.2.0/24")}
		if _, ok := h.fw.Holes()[ph]; !ok {
			t.Fatalf("pinholes %v", h.fw.Holes())
		}
	})
}

// TestPEER01to08.
func TestPEER01to08(t *testing.T) {
	h := newHarness(t)
	req := peerReq(addrA, pcp.ProtoTCP, 5000, remote, time.Hour, 1)
	resp := h.do(req)
	h.expect(resp, pcp.Success)
	t.Run("PEER-01", func(t *testing.T) {
		if resp.Map.Nonce != req.Map.Nonce || resp.Map.InternalPort != 5000 || resp.Peer.RemotePort != remote.Port() || resp.Peer.RemoteAddr != remote.Addr() {
			t.Fatalf("reply %+v", resp)
		}
	})
	t.Run("PEER-08", func(t *testing.T) {
		if resp.Map.ExternalAddr != addrA || resp.Map.ExternalPort != 5000 {
			t.Fatalf("external %v:%d", resp.Map.ExternalAddr, resp.Map.ExternalPort)
		}
		ph := hole(6, addrA, 5000, addrA, 5000)
		ph.RemotePrefix = netip.PrefixFrom(remote.Addr(), 128)
		ph.RemotePort = remote.Port()
		if _, ok := h.fw.Holes()[ph]; !ok || len(h.fw.Holes()) != 1 {
			t.Fatalf("pinholes %v", h.fw.Holes())
		}
	})
	t.Run("PEER-02", func(t *testing.T) {
		h.expect(h.do(peerReq(addrA, pcp.ProtoTCP, 0, remote, time.Hour, 1)), pcp.MalformedRequest)
		h.expect(h.do(peerReq(addrA, pcp.ProtoTCP, 1, netip.AddrPortFrom(remote.Addr(), 0), time.Hour, 1)), pcp.MalformedRequest)
	})
	t.Run("PEER-03", func(t *testing.T) {
		for _, a := range []string{"[::1]:1", "[ff02::1]:1", "[::]:1", "192.0.2.1:1"} {
			h.expect(h.do(peerReq(addrA, pcp.ProtoTCP, 1, netip.MustParseAddrPort(a), time.Hour, 1)), pcp.MalformedRequest)
		}
	})
	t.Run("PEER-04", func(t *testing.T) {
		before := h.snap()
		r := peerReq(addrA, pcp.ProtoTCP, 6000, remote, time.Hour, 1)
		r.Map.ExternalPort = 7000
		h.expect(h.do(r), pcp.CannotProvideExternal)
		h.unchanged(before)
		r.Map.ExternalPort = 6000
		h.expect(h.do(r), pcp.Success)
	})
	t.Run("PEER-07", func(t *testing.T) {
		h.clock.Advance(time.Second)
		r := peerReq(addrA, pcp.ProtoTCP, 5000, remote, 0, 1)
		resp := h.do(r)
		h.expect(resp, pcp.Success)
		if resp.Lifetime != 3599*time.Second {
			t.Fatalf("query lifetime %v", resp.Lifetime)
		}
		r.Lifetime = 600 * time.Second
		if resp := h.do(r); resp.Lifetime != 3599*time.Second {
			t.Fatalf("PEER shortened to %v", resp.Lifetime)
		}
	})
	t.Run("PEER-06", func(t *testing.T) {
		// Default (c): a new nonce takes the PEER over.
		r := peerReq(addrA, pcp.ProtoTCP, 5000, remote, time.Hour, 9)
		h.expect(h.do(r), pcp.Success)
		hs := newHarness(t, func(c *Config, _ *policy.Config) { c.StrictNonce = true })
		hs.expect(hs.do(peerReq(addrA, pcp.ProtoTCP, 5000, remote, time.Hour, 1)), pcp.Success)
		resp := hs.do(peerReq(addrA, pcp.ProtoTCP, 5000, remote, time.Hour, 2))
		hs.expect(resp, pcp.NotAuthorized)
		if resp.Lifetime != time.Hour {
			t.Fatalf("lifetime %v", resp.Lifetime)
		}
	})
	t.Run("MAP-21", func(t *testing.T) {
		// Pinholes end only with their lease: nothing in the engine reacts
		// to connection state, so the only removals are deletes, expiry
		// and revocation (the kernel side is checked end to end).
		if len(h.fw.Holes()) != 2 {
			t.Fatalf("pinholes %v", h.fw.Holes())
		}
	})
}

// TestANN01ANN02Announce: ANNOUNCE is a stateless 24-octet SUCCESS.
func TestANN01ANN02Announce(t *testing.T) {
	h := newHarness(t)
	h.clock.Advance(5 * time.Second)
	r := pcp.NewAnnounce(addrA)
	r.Lifetime = 99 * time.Second
	b := pcp.AppendRequest(nil, r)
	out := h.raw(addrA, b)
	want := []byte{2, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}
	if string(out) != string(want) {
		t.Fatalf("got  % x\nwant % x", out, want)
	}
	// Any source on a serving interface, owned or not.
	stranger := netip.MustParseAddr("2001:db8:c::1")
	if out := h.raw(stranger, pcp.AppendRequest(nil, pcp.NewAnnounce(stranger))); len(out) != 24 || out[3] != 0 {
		t.Fatalf("stranger: % x", out)
	}
	if h.s.tab.len() != 0 {
		t.Fatal("ANNOUNCE changed state")
	}
	// ADDR-01 applies to ANNOUNCE too.
	if out := h.raw(addrB, b); len(out) < 4 || out[3] != byte(pcp.AddressMismatch) {
		t.Fatalf("mismatch: % x", out)
	}
}

// TestEPO02EpochCounts: +1 per second, shared by all replies.
func TestEPO02EpochCounts(t *testing.T) {
	h := newHarness(t)
	a := h.do(pcp.NewAnnounce(addrA))
	h.clock.Advance(10 * time.Second)
	b := h.do(pcp.NewAnnounce(addrB))
	if d := b.Epoch - a.Epoch; d < 9 || d > 11 {
		t.Fatalf("epoch moved %d in 10 s", d)
	}
	// EPO-01: errors carry it too.
	e := h.do(mapReq(addrA, pcp.ProtoSCTP, 1, 0, time.Hour, 1))
	if e.Epoch != b.Epoch {
		t.Fatalf("error epoch %d, want %d", e.Epoch, b.Epoch)
	}
}

// TestEPO03EPO04Restart: a restart with state intact continues the epoch
// and keeps every lease; lost state resets it.
func TestEPO03EPO04Restart(t *testing.T) {
	h := newHarness(t)
	h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 443, 80, time.Hour, 1)), pcp.Success)
	h.clock.Advance(100 * time.Second)
	before := h.do(pcp.NewAnnounce(addrA)).Epoch
	t.Run("EPO-04", func(t *testing.T) {
		h.clock.Advance(30 * time.Second)
		h.start()
		got := h.do(pcp.NewAnnounce(addrA)).Epoch
		if got < before+28 || got > before+32 {
			t.Fatalf("epoch after restart %d, before %d + 30 s", got, before)
		}
		if len(h.s.Leases()) != 1 || len(h.fw.Holes()) != 1 {
			t.Fatal("lease lost across restart")
		}
		if !h.s.Status().Restarted {
			t.Fatal("not reported as restarted")
		}
	})
	t.Run("EPO-03", func(t *testing.T) {
		// The kernel refuses to restore the lease: state lost, reset.
		h.fw.FailApply = func([]pinhole.Op) error { return servertest.ErrInjected }
		h.start()
		h.fw.FailApply = nil
		if got := h.do(pcp.NewAnnounce(addrA)).Epoch; got != 0 {
			t.Fatalf("epoch %d after losing state", got)
		}
		if len(h.s.Leases()) != 0 || len(h.st.Leases()) != 0 {
			t.Fatal("unrestorable lease kept")
		}
	})
}

// TestRestoreReconcile: start-up drops expired leases, re-adds missing
// pinholes and refreshes timeouts; the audit that follows in the
// background removes orphans of ours.
func TestRestoreReconcile(t *testing.T) {
	h := newHarness(t)
	h.do(mapReq(addrA, pcp.ProtoTCP, 1, 0, time.Hour, 1))
	h.do(mapReq(addrA, pcp.ProtoTCP, 2, 0, 200*time.Second, 1))
	orphan := hole(6, addrB, 9, addrB, 9)
	h.fw.Apply([]pinhole.Op{
		{Kind: pinhole.Delete, Pinhole: hole(6, addrA, 1, addrA, 1)},
		{Kind: pinhole.Install, Pinhole: orphan, Timeout: time.Hour},
	})
	h.clock.Advance(300 * time.Second)
	h.start()
	if holes := h.fw.Holes(); len(holes) != 2 || holes[orphan] == 0 {
		t.Fatalf("before the audit: %v", holes)
	}
	h.s.auditFirewall(context.Background())
	if !slices.Contains(h.s.orphans, addrB) {
		t.Fatalf("orphan's client not among the announce targets: %v", h.s.orphans)
	}
	holes := h.fw.Holes()
	if len(holes) != 1 || holes[hole(6, addrA, 1, addrA, 1)] != time.Hour-300*time.Second {
		t.Fatalf("after restore: %v", holes)
	}
	if len(h.st.Leases()) != 1 {
		t.Fatalf("store %v", h.st.Leases())
	}
}

// TestPF06ProbeThrottle: failed PREFER_FAILURE requests use up a client's
// rate budget faster than ordinary ones, on the bucket the request is
// admitted by: the per-source bucket is the source's on its arrival
// interface (admit, AllowOn), and the penalty spent the interface-0 one,
// which no request that names its interface (every one of the network
// path, the readers' socket index) is ever admitted by: with an interface,
// 19 of 40 probes were answered (review h/revreq). The row "socket"
// is the readers' path: admitted already, by the socket's index.
func TestPF06ProbeThrottle(t *testing.T) {
	for _, tc := range []struct {
		name  string
		iface string
		index int // the reader's socket's interface index; 0: none
	}{
		{"no interface", "", 0},
		{"interface by name", "wg0", 0},
		{"socket", "wg0", 7},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, func(c *Config, _ *policy.Config) { c.RateLimit, c.RateBurst = 0.001, 20 })
			h.own = boundOwnership{own: h.own.(*policy.Static), on: map[policy.OwnerID]string{"static:a": tc.iface, "static:b": "wg1"}}
			h.start()
			send := func(b []byte) []byte {
				src := netip.AddrPortFrom(addrA, 40000)
				r := Request{Local: local6, Source: src, Iface: tc.iface, Data: b}
				if tc.index != 0 {
					// As the readers do: admit first, then the engine.
					ifk := ifaceKey(tc.index, tc.iface)
					if h.s.admit(b, src, ifk, h.s.steadyAt(h.clock.Now())) != "" {
						return nil
					}
					r.admitted, r.ifk = true, ifk
				}
				return h.s.HandleBatch([]Request{r})[0]
			}
			var first pcp.Response
			if err := pcp.ParseResponse(send(pcp.AppendRequest(nil, mapReq(addrA, pcp.ProtoTCP, 443, 80, time.Hour, 1))), &first); err != nil || first.Result != pcp.Success {
				t.Fatalf("first MAP: %+v %v", first, err)
			}
			r := mapReq(addrA, pcp.ProtoTCP, 444, 80, time.Hour, 2)
			r.Options.PreferFailure = true
			b := pcp.AppendRequest(nil, r)
			answered := 0
			for range 40 {
				if send(b) != nil {
					answered++
				}
			}
			if answered > 5 {
				t.Fatalf("%d failed PREFER_FAILURE probes answered from a budget of 19", answered)
			}
		})
	}
}

// TestEPO03ExternalIPv4Changed: a restart with another external IPv4
// drops the IPv4 mappings and resets the epoch; IPv6 mappings stay.
func TestEPO03ExternalIPv4Changed(t *testing.T) {
	h := newHarness(t)
	h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 443, 0, time.Hour, 1)), pcp.Success)
	h.expect(h.do(mapReq(v4A, pcp.ProtoTCP, 22, 2222, time.Hour, 1)), pcp.Success)
	h.clock.Advance(time.Minute)
	h.cfg.ExternalIPv4 = netip.MustParseAddr("203.0.113.9")
	h.start()
	if e := h.do(pcp.NewAnnounce(addrA)).Epoch; e != 0 {
		t.Fatalf("epoch %d", e)
	}
	ls := h.s.Leases()
	if len(ls) != 1 || ls[0].InternalAddr != addrA || len(h.fw.Holes()) != 1 {
		t.Fatalf("leases %v, pinholes %v", ls, h.fw.Holes())
	}
}

// TestPEER05NextToMap: a PEER on a tuple that has a MAP succeeds and
// reports the MAP's external endpoint (RFC 6887 §12.3 "returns the current
// values"), on IPv6 even when the MAP redirects a port; for IPv4 it shares
// the MAP's external port (one external endpoint per tuple).
func TestPEER05NextToMap(t *testing.T) {
	h := newHarness(t)
	h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 443, 80, time.Hour, 1)), pcp.Success)
	resp := h.do(peerReq(addrA, pcp.ProtoTCP, 443, remote, time.Hour, 1))
	h.expect(resp, pcp.Success)
	if resp.Map.ExternalPort != 80 {
		t.Fatalf("IPv6 PEER external port %d, the MAP's is 80", resp.Map.ExternalPort)
	}
	m := h.do(mapReq(v4A, pcp.ProtoUDP, 5000, 6000, time.Hour, 1))
	p := h.do(peerReq(v4A, pcp.ProtoUDP, 5000, netip.MustParseAddrPort("192.0.2.1:53"), time.Hour, 1))
	h.expect(p, pcp.Success)
	if p.Map.ExternalPort != m.Map.ExternalPort || p.Map.ExternalAddr != ext4 {
		t.Fatalf("IPv4 PEER %v:%d, MAP %d", p.Map.ExternalAddr, p.Map.ExternalPort, m.Map.ExternalPort)
	}
}

// TestPEER05PeerOnMapMapping: a PEER for a tuple that already has a MAP
// mapping returns that mapping's external address and port, whatever was
// suggested (RFC 6887 §12.3), on IPv6 (also when the MAP redirects) and
// IPv4 alike.
func TestPEER05PeerOnMapMapping(t *testing.T) {
	for _, tc := range []struct {
		name       string
		client     netip.Addr
		port, sugg uint16
		remote     netip.AddrPort
	}{
		{"IPv6", addrA, 24036, 24036, netip.MustParseAddrPort("[2001:db8:ffff::2]:443")},
		{"IPv6 redirect", addrA, 443, 8443, netip.MustParseAddrPort("[2001:db8:ffff::2]:443")},
		{"IPv4", v4A, 24036, 30000, netip.MustParseAddrPort("192.0.2.9:443")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t)
			m := mapReq(tc.client, pcp.ProtoTCP, tc.port, tc.sugg, time.Hour, 1)
			if tc.client.Is4() {
				m.Map.ExternalAddr = ext4
			}
			mr := h.do(m)
			h.expect(mr, pcp.Success)
			p := peerReq(tc.client, pcp.ProtoTCP, tc.port, tc.remote, 600*time.Second, 2)
			p.Map.ExternalPort = mr.Map.ExternalPort + 3
			p.Map.ExternalAddr = mr.Map.ExternalAddr
			pr := h.do(p)
			h.expect(pr, pcp.Success)
			if pr.Map.ExternalAddr != mr.Map.ExternalAddr || pr.Map.ExternalPort != mr.Map.ExternalPort {
				t.Fatalf("MAP external %v:%d, PEER got %v:%d", mr.Map.ExternalAddr, mr.Map.ExternalPort, pr.Map.ExternalAddr, pr.Map.ExternalPort)
			}
			if len(h.st.Leases()) != 2 {
				t.Fatalf("leases %v", h.st.Leases())
			}
			for k, l := range h.st.Leases() {
				if l.Kind == store.KindPeer && k.Remote != tc.remote {
					t.Fatalf("PEER lease key remote %v, want %v", k.Remote, tc.remote)
				}
			}
		})
	}
}
