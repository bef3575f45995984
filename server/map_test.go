package server

import (
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/policy"
	"github.com/pcpd/pcpd/server/servertest"
	"github.com/pcpd/pcpd/store"
)

// TestMapHappyPath_6887_11: the PROTOCOL.md example (TCP 443, suggest 80,
// 3600 s): SUCCESS only with the pinhole in the kernel and the lease in the
// store, lifetimes equal (LIFE-02), reply fields copied (MAP-02).
func TestMapHappyPath_6887_11(t *testing.T) {
	h := newHarness(t)
	req := mapReq(addrA, pcp.ProtoTCP, 443, 80, time.Hour, 7)
	resp := h.do(req)
	h.expect(resp, pcp.Success)
	t.Run("MAP-02", func(t *testing.T) {
		if resp.Map.Nonce != req.Map.Nonce || resp.Map.Protocol != pcp.ProtoTCP || resp.Map.InternalPort != 443 {
			t.Fatalf("nonce/protocol/port not copied: %+v", resp.Map)
		}
	})
	t.Run("MAP-11", func(t *testing.T) {
		if resp.Map.ExternalPort != 80 || resp.Map.ExternalAddr != addrA {
			t.Fatalf("assigned %v:%d, want the suggestion on the same address", resp.Map.ExternalAddr, resp.Map.ExternalPort)
		}
	})
	t.Run("LIFE-02", func(t *testing.T) {
		if resp.Lifetime != time.Hour {
			t.Fatalf("lifetime %v", resp.Lifetime)
		}
		got := h.fw.Holes()[hole(6, addrA, 443, addrA, 80)]
		if got != time.Hour {
			t.Fatalf("kernel timeout %v, want %v", got, time.Hour)
		}
		l, ok := h.lease(ownerA, 6, addrA, 443)
		if !ok || !l.Expires.Equal(h.clock.Now().Add(time.Hour)) || l.ExternalPort != 80 {
			t.Fatalf("stored lease %+v %v", l, ok)
		}
	})
	t.Run("EPO-01", func(t *testing.T) {
		if resp.Epoch != 0 {
			t.Fatalf("fresh server epoch %d", resp.Epoch)
		}
	})
}

// TestMAP07ExistingMapping: a renewal returns the existing external port
// whatever is suggested.
func TestMAP07ExistingMapping(t *testing.T) {
	h := newHarness(t)
	h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 443, 80, time.Hour, 1)), pcp.Success)
	resp := h.do(mapReq(addrA, pcp.ProtoTCP, 443, 8080, time.Hour, 1))
	h.expect(resp, pcp.Success)
	if resp.Map.ExternalPort != 80 {
		t.Fatalf("renewal assigned %d, want 80", resp.Map.ExternalPort)
	}
}

// TestMAP09SuggestionTaken: a taken suggested port never fails a MAP; the
// internal port (MAP-11), then the lowest free ≥ 1024, are used instead.
func TestMAP09SuggestionTaken(t *testing.T) {
	h := newHarness(t)
	h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 443, 80, time.Hour, 1)), pcp.Success)
	resp := h.do(mapReq(addrA, pcp.ProtoTCP, 8443, 80, time.Hour, 2))
	h.expect(resp, pcp.Success)
	if resp.Map.ExternalPort != 8443 {
		t.Fatalf("MAP-11: got %d, want the internal port 8443", resp.Map.ExternalPort)
	}
	// Internal port 80 is taken as an external port by the first mapping.
	resp = h.do(mapReq(addrA, pcp.ProtoTCP, 80, 80, time.Hour, 3))
	h.expect(resp, pcp.Success)
	if resp.Map.ExternalPort != 1024 {
		t.Fatalf("MAP-11: got %d, want the lowest free port 1024", resp.Map.ExternalPort)
	}
	// Another address of the same client: ports are per address.
	resp = h.do(mapReq(addrA2, pcp.ProtoTCP, 443, 80, time.Hour, 4))
	h.expect(resp, pcp.Success)
	if resp.Map.ExternalPort != 80 {
		t.Fatalf("other address: got %d, want 80", resp.Map.ExternalPort)
	}
	// A suggested address that is not ours is an unmet hint, not a failure.
	r := mapReq(addrA, pcp.ProtoUDP, 53, 53, time.Hour, 5)
	r.Map.ExternalAddr = addrB
	resp = h.do(r)
	h.expect(resp, pcp.Success)
	if resp.Map.ExternalAddr != addrA {
		t.Fatalf("assigned address %v", resp.Map.ExternalAddr)
	}
}

// TestMAP10NeverPCPPorts: external UDP 5350/5351 are never mapped.
func TestMAP10NeverPCPPorts(t *testing.T) {
	h := newHarness(t)
	resp := h.do(mapReq(addrA, pcp.ProtoUDP, 5351, 5351, time.Hour, 1))
	h.expect(resp, pcp.Success)
	if resp.Map.ExternalPort == 5351 || resp.Map.ExternalPort == 5350 {
		t.Fatalf("mapped UDP %d", resp.Map.ExternalPort)
	}
	r := mapReq(addrA, pcp.ProtoUDP, 5350, 5350, time.Hour, 2)
	r.Options.PreferFailure = true
	before := h.snap()
	h.expect(h.do(r), pcp.CannotProvideExternal)
	h.unchanged(before)
	// TCP 5351 is fine.
	resp = h.do(mapReq(addrA, pcp.ProtoTCP, 5351, 5351, time.Hour, 3))
	if resp.Map.ExternalPort != 5351 {
		t.Fatalf("TCP 5351 → %d", resp.Map.ExternalPort)
	}
}

// TestMAP04UnsupportedProtocol and MAP-05 wildcards.
func TestMAP04UnsupportedProtocol(t *testing.T) {
	h := newHarness(t)
	before := h.snap()
	t.Run("MAP-04", func(t *testing.T) {
		h.expect(h.do(mapReq(addrA, pcp.ProtoSCTP, 80, 0, time.Hour, 1)), pcp.UnsuppProtocol)
		h.expect(h.do(mapReq(addrA, pcp.ProtoSCTP, 80, 0, 0, 1)), pcp.UnsuppProtocol)
		h.unchanged(before)
	})
	t.Run("MAP-05", func(t *testing.T) {
		h.expect(h.do(mapReq(addrA, pcp.ProtoUDP, 0, 0, time.Hour, 1)), pcp.UnsuppProtocol)
		h.expect(h.do(mapReq(addrA, pcp.ProtoAll, 0, 0, time.Hour, 1)), pcp.UnsuppProtocol)
		h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 0, 0, time.Hour, 1)), pcp.UnsuppProtocol)
		h.unchanged(before)
	})
	t.Run("MAP-03", func(t *testing.T) {
		h.expect(h.do(mapReq(addrA, pcp.ProtoAll, 80, 0, time.Hour, 1)), pcp.MalformedRequest)
		h.expect(h.do(mapReq(addrA, pcp.ProtoAll, 80, 0, 0, 1)), pcp.MalformedRequest)
	})
}

// TestMAP06OnlyRequestedProtocol: a TCP MAP opens TCP only.
func TestMAP06OnlyRequestedProtocol(t *testing.T) {
	h := newHarness(t)
	h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 443, 0, time.Hour, 1)), pcp.Success)
	for p := range h.fw.Holes() {
		if p.Protocol != 6 {
			t.Fatalf("pinhole for protocol %d", p.Protocol)
		}
	}
	if len(h.fw.Holes()) != 1 {
		t.Fatalf("pinholes %v", h.fw.Holes())
	}
}

// TestMAP12IPv4 covers NAPT allocation and the refusal without an
// external IPv4.
func TestMAP12IPv4(t *testing.T) {
	h := newHarness(t, func(c *Config, _ *policy.Config) { c.IPv4Ports = PortRange{2000, 2002} })
	resp := h.do(mapReq(v4A, pcp.ProtoTCP, 22, 2001, time.Hour, 1))
	h.expect(resp, pcp.Success)
	if resp.Map.ExternalAddr != ext4 || resp.Map.ExternalPort != 2001 {
		t.Fatalf("assigned %v:%d", resp.Map.ExternalAddr, resp.Map.ExternalPort)
	}
	if _, ok := h.fw.Holes()[hole(6, v4A, 22, ext4, 2001)]; !ok {
		t.Fatalf("no NAPT pinhole: %v", h.fw.Holes())
	}
	// Suggestion outside the range (the host's own ports): lowest free.
	resp = h.do(mapReq(v4A, pcp.ProtoTCP, 23, 22, time.Hour, 2))
	if resp.Map.ExternalPort != 2000 {
		t.Fatalf("got %d, want 2000", resp.Map.ExternalPort)
	}
	h.expect(h.do(mapReq(v4A, pcp.ProtoTCP, 24, 0, time.Hour, 3)), pcp.Success)
	// Range exhausted.
	before := h.snap()
	h.expect(h.do(mapReq(v4A, pcp.ProtoTCP, 25, 0, time.Hour, 4)), pcp.NoResources)
	h.unchanged(before)

	t.Run("no external IPv4", func(t *testing.T) {
		h := newHarness(t, func(c *Config, _ *policy.Config) { c.ExternalIPv4 = netip.Addr{} })
		h.expect(h.do(mapReq(v4A, pcp.ProtoTCP, 22, 0, time.Hour, 1)), pcp.NotAuthorized)
		// A delete is still a harmless SUCCESS (MAP-18).
		h.expect(h.do(mapReq(v4A, pcp.ProtoTCP, 22, 0, 0, 1)), pcp.Success)
	})
}

// TestMAP13FamilyHint: the suggested address's family selects the mapping;
// other family = unmet hint.
func TestMAP13FamilyHint(t *testing.T) {
	h := newHarness(t)
	r := mapReq(addrA, pcp.ProtoTCP, 443, 443, time.Hour, 1)
	r.Map.ExternalAddr = netip.IPv4Unspecified()
	resp := h.do(r)
	h.expect(resp, pcp.Success)
	if resp.Map.ExternalAddr != addrA {
		t.Fatalf("IPv6 client got external %v", resp.Map.ExternalAddr)
	}
	r.Options.PreferFailure = true
	r.Map.Nonce = pcp.Nonce{2}
	r.Map.InternalPort = 444
	r.Map.ExternalPort = 444
	h.expect(h.do(r), pcp.CannotProvideExternal)
	// Delete in the other family: SUCCESS, nothing deleted.
	d := mapReq(addrA, pcp.ProtoTCP, 443, 0, 0, 1)
	d.Map.ExternalAddr = netip.IPv4Unspecified()
	h.expect(h.do(d), pcp.Success)
	if _, ok := h.lease(ownerA, 6, addrA, 443); !ok {
		t.Fatal("other-family delete removed the mapping")
	}
}

// TestMAP14StrictNonce and the default (c).
func TestMAP14StrictNonce(t *testing.T) {
	t.Run("strict", func(t *testing.T) {
		h := newHarness(t, func(c *Config, _ *policy.Config) { c.StrictNonce = true })
		h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 443, 80, time.Hour, 1)), pcp.Success)
		h.clock.Advance(10 * time.Minute)
		before := h.snap()
		resp := h.do(mapReq(addrA, pcp.ProtoTCP, 443, 80, time.Hour, 2))
		h.expect(resp, pcp.NotAuthorized)
		if resp.Lifetime != 50*time.Minute {
			t.Fatalf("lifetime %v, want the remaining 50m", resp.Lifetime)
		}
		h.unchanged(before)
		t.Run("MAP-19", func(t *testing.T) {
			resp := h.do(mapReq(addrA, pcp.ProtoTCP, 443, 0, 0, 2))
			h.expect(resp, pcp.NotAuthorized)
			if resp.Lifetime != 50*time.Minute {
				t.Fatalf("lifetime %v", resp.Lifetime)
			}
			h.unchanged(before)
		})
	})
	t.Run("default replaces", func(t *testing.T) {
		h := newHarness(t)
		h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 443, 80, time.Hour, 1)), pcp.Success)
		resp := h.do(mapReq(addrA, pcp.ProtoTCP, 443, 80, 2*time.Hour, 2))
		h.expect(resp, pcp.Success)
		if resp.Map.ExternalPort != 80 || resp.Lifetime != 2*time.Hour {
			t.Fatalf("replacement %+v", resp)
		}
		l, _ := h.lease(ownerA, 6, addrA, 443)
		if l.Nonce != (pcp.Nonce{2}) {
			t.Fatalf("nonce not replaced")
		}
		t.Run("MAP-19", func(t *testing.T) {
			h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 443, 0, 0, 9)), pcp.Success)
			if _, ok := h.lease(ownerA, 6, addrA, 443); ok {
				t.Fatal("delete with another nonce not honoured in default mode")
			}
		})
	})
}

// TestMAP15Quota: per-client limit on new mappings, renewals pass; the
// global limit gives NO_RESOURCES.
func TestMAP15Quota(t *testing.T) {
	h := newHarness(t, func(_ *Config, p *policy.Config) { p.MaxLeasesPerClient = 2; p.MaxLeases = 3 })
	h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 1, 0, time.Hour, 1)), pcp.Success)
	h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 2, 0, time.Hour, 1)), pcp.Success)
	before := h.snap()
	resp := h.do(mapReq(addrA, pcp.ProtoTCP, 3, 0, time.Hour, 1))
	h.expect(resp, pcp.UserExQuota)
	if resp.Lifetime != 30*time.Second {
		t.Fatalf("lifetime %v", resp.Lifetime)
	}
	h.unchanged(before)
	h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 2, 0, time.Hour, 1)), pcp.Success)
	h.expect(h.do(mapReq(addrB, pcp.ProtoTCP, 1, 0, time.Hour, 1)), pcp.Success)
	h.expect(h.do(mapReq(addrB, pcp.ProtoTCP, 2, 0, time.Hour, 1)), pcp.NoResources)
}

// TestMAP16to18Delete: deletes answer SUCCESS, lifetime 0, suggested
// fields copied, also for nothing; wildcard deletes are harmless.
func TestMAP16to18Delete(t *testing.T) {
	h := newHarness(t)
	h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 443, 80, time.Hour, 1)), pcp.Success)
	del := mapReq(addrA, pcp.ProtoTCP, 443, 1234, 0, 1)
	resp := h.do(del)
	t.Run("MAP-17", func(t *testing.T) {
		h.expect(resp, pcp.Success)
		if resp.Lifetime != 0 || resp.Map.ExternalPort != 1234 || resp.Map.ExternalAddr != netip.IPv6Unspecified() {
			t.Fatalf("delete reply %+v", resp)
		}
	})
	t.Run("MAP-16", func(t *testing.T) {
		if len(h.fw.Holes()) != 0 || len(h.st.Leases()) != 0 {
			t.Fatalf("delete left %v / %v", h.fw.Holes(), h.st.Leases())
		}
		h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 0, 0, 0, 1)), pcp.Success)
		h.expect(h.do(mapReq(addrA, pcp.ProtoAll, 0, 0, 0, 1)), pcp.Success)
	})
	t.Run("MAP-18", func(t *testing.T) {
		again := h.do(del)
		if again.Result != resp.Result || again.Lifetime != resp.Lifetime || again.Map != resp.Map {
			t.Fatalf("second delete %+v, first %+v", again, resp)
		}
	})
}

// TestMAP20MapCannotDeletePeer.
func TestMAP20MapCannotDeletePeer(t *testing.T) {
	h := newHarness(t)
	h.expect(h.do(peerReq(addrA, pcp.ProtoTCP, 5000, remote, time.Hour, 1)), pcp.Success)
	before := h.snap()
	h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 5000, 0, 0, 1)), pcp.NotAuthorized)
	h.unchanged(before)
	t.Run("TP delete", func(t *testing.T) {
		h.expect(h.do(mapReq(addrA2, pcp.ProtoUDP, 53, 0, time.Hour, 1)), pcp.Success)
		d := mapReq(addrA, pcp.ProtoUDP, 53, 0, 0, 1)
		d.Options.ThirdParty = addrA2
		h.expect(h.do(d), pcp.Success)
		if _, ok := h.lease(ownerA, 17, addrA2, 53); ok {
			t.Fatal("authorised THIRD_PARTY delete did not delete")
		}
	})
}

// TestMAP08MapNextToPeer: MAP on a tuple with a PEER copies its external,
// and the PEER lives on.
func TestMAP08MapNextToPeer(t *testing.T) {
	h := newHarness(t)
	h.expect(h.do(peerReq(v4A, pcp.ProtoTCP, 5000, netip.MustParseAddrPort("192.0.2.7:80"), time.Hour, 1)), pcp.Success)
	var peerExt uint16
	for _, l := range h.st.Leases() {
		peerExt = l.ExternalPort
	}
	resp := h.do(mapReq(v4A, pcp.ProtoTCP, 5000, 0, time.Hour, 2))
	h.expect(resp, pcp.Success)
	if resp.Map.ExternalPort != peerExt {
		t.Fatalf("MAP got %d, PEER has %d", resp.Map.ExternalPort, peerExt)
	}
	if len(h.st.Leases()) != 2 {
		t.Fatalf("leases %v", h.st.Leases())
	}
}

// TestMAP22Quarantine: a freed IPv4 port is kept from other clients for the
// idle time; the same client reclaims it.
func TestMAP22Quarantine(t *testing.T) {
	h := newHarness(t)
	h.expect(h.do(mapReq(v4A, pcp.ProtoUDP, 5000, 6000, time.Hour, 1)), pcp.Success)
	h.expect(h.do(mapReq(v4A, pcp.ProtoUDP, 5000, 0, 0, 1)), pcp.Success)
	resp := h.do(mapReq(v4B, pcp.ProtoUDP, 5000, 6000, time.Hour, 2))
	if resp.Map.ExternalPort == 6000 {
		t.Fatal("another client got a quarantined port")
	}
	h.expect(h.do(mapReq(v4B, pcp.ProtoUDP, 5000, 0, 0, 2)), pcp.Success)
	resp = h.do(mapReq(v4A, pcp.ProtoUDP, 5000, 6000, time.Hour, 1))
	if resp.Map.ExternalPort != 6000 {
		t.Fatalf("same client could not reclaim: %d", resp.Map.ExternalPort)
	}
	h.expect(h.do(mapReq(v4A, pcp.ProtoUDP, 5000, 0, 0, 1)), pcp.Success)
	h.clock.Advance(2*time.Minute + time.Second)
	resp = h.do(mapReq(v4B, pcp.ProtoUDP, 5001, 6000, time.Hour, 2))
	if resp.Map.ExternalPort != 6000 {
		t.Fatalf("after the idle time: %d", resp.Map.ExternalPort)
	}
}

// TestMAP23Disabled: MAP and PEER switched off.
func TestMAP23Disabled(t *testing.T) {
	h := newHarness(t, func(c *Config, _ *policy.Config) { c.DisableMap, c.DisablePeer = true, true })
	h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 443, 0, time.Hour, 1)), pcp.NotAuthorized)
	t.Run("PEER-08", func(t *testing.T) {
		h.expect(h.do(peerReq(addrA, pcp.ProtoTCP, 443, remote, time.Hour, 1)), pcp.NotAuthorized)
	})
}

// TestSEC02Ownership: a client cannot open another's address, directly or
// through THIRD_PARTY; never-openable addresses are refused (TP-03).
func TestSEC02Ownership(t *testing.T) {
	h := newHarness(t)
	before := h.snap()
	r := mapReq(addrA, pcp.ProtoTCP, 443, 0, time.Hour, 1)
	r.Options.ThirdParty = addrB
	h.expect(h.do(r), pcp.NotAuthorized)
	t.Run("TP-03", func(t *testing.T) {
		for _, a := range []string{"::1", "ff02::1", "fe80::1", "::"} {
			r.Options.ThirdParty = netip.MustParseAddr(a)
			resp := h.do(r)
			if resp.Result != pcp.NotAuthorized && resp.Result != pcp.MalformedOption {
				t.Fatalf("TP %s → %v", a, resp.Result)
			}
		}
	})
	// A source nobody owns.
	stranger := netip.MustParseAddr("2001:db8:c::1")
	h.expect(h.do(mapReq(stranger, pcp.ProtoTCP, 443, 0, time.Hour, 1)), pcp.NotAuthorized)
	h.unchanged(before)
	t.Run("ADDR-01", func(t *testing.T) {
		resp := h.doFrom(addrB, mapReq(addrA, pcp.ProtoTCP, 443, 0, time.Hour, 1))
		h.expect(resp, pcp.AddressMismatch)
		h.unchanged(before)
	})
	t.Run("ADDR-03", func(t *testing.T) {
		r := mapReq(addrA, pcp.ProtoTCP, 443, 0, time.Hour, 1)
		r.Options.ThirdParty = addrA2
		h.expect(h.doFrom(addrA2, r), pcp.AddressMismatch)
	})
}

// TestTP01to04ThirdParty.
func TestTP01to04ThirdParty(t *testing.T) {
	h := newHarness(t)
	t.Run("TP-01", func(t *testing.T) {
		r := mapReq(addrA, pcp.ProtoTCP, 443, 0, time.Hour, 1)
		r.Options.ThirdParty = addrA
		h.expect(h.do(r), pcp.MalformedRequest)
	})
	t.Run("TP-04", func(t *testing.T) {
		r := mapReq(addrA, pcp.ProtoTCP, 443, 0, time.Hour, 1)
		r.Options.ThirdParty = addrA2
		resp := h.do(r)
		h.expect(resp, pcp.Success)
		if resp.Options.ThirdParty != addrA2 || resp.Map.ExternalAddr != addrA2 {
			t.Fatalf("reply %+v", resp)
		}
		l, ok := h.lease(ownerA, 6, addrA2, 443)
		if !ok || !l.ThirdParty || l.ClientAddr.Addr() != addrA {
			t.Fatalf("lease %+v", l)
		}
		if _, ok := h.fw.Holes()[hole(6, addrA2, 443, addrA2, 443)]; !ok {
			t.Fatal("no pinhole for the third party")
		}
		p := peerReq(addrA, pcp.ProtoTCP, 8000, remote, time.Hour, 1)
		p.Options.ThirdParty = addrA2
		h.expect(h.do(p), pcp.Success)
	})
	t.Run("TP-02", func(t *testing.T) {
		h := newHarness(t, func(_ *Config, p *policy.Config) { p.ThirdParty = policy.ThirdPartyOff })
		r := mapReq(addrA, pcp.ProtoTCP, 443, 0, time.Hour, 1)
		r.Options.ThirdParty = addrA2
		h.expect(h.do(r), pcp.UnsuppOption)
	})
}

// TestLIFE01Clamp and LIFE-03 renewal.
func TestLIFE01Clamp(t *testing.T) {
	h := newHarness(t)
	for _, c := range []struct{ ask, want time.Duration }{
		{time.Second, 120 * time.Second},
		{time.Duration(1<<32-1) * time.Second, 24 * time.Hour},
		{time.Hour, time.Hour},
	} {
		resp := h.do(mapReq(addrA, pcp.ProtoTCP, 443, 0, c.ask, 1))
		if resp.Lifetime != c.want {
			t.Fatalf("asked %v, granted %v, want %v", c.ask, resp.Lifetime, c.want)
		}
		if got := h.fw.Holes()[hole(6, addrA, 443, addrA, 443)]; got != c.want {
			t.Fatalf("kernel %v", got)
		}
	}
	t.Run("LIFE-03", func(t *testing.T) {
		h.do(mapReq(addrA, pcp.ProtoTCP, 443, 0, time.Hour, 1))
		h.clock.Advance(time.Minute)
		resp := h.do(mapReq(addrA, pcp.ProtoTCP, 443, 0, 600*time.Second, 1))
		if resp.Lifetime != 600*time.Second || h.fw.Holes()[hole(6, addrA, 443, addrA, 443)] != 600*time.Second {
			t.Fatalf("shortening renewal: %v", resp.Lifetime)
		}
	})
}

// TestLIFE04Expiry: at expiry the lease goes from table and store; the
// kernel drops the pinhole by itself.
func TestLIFE04Expiry(t *testing.T) {
	h := newHarness(t)
	h.do(mapReq(addrA, pcp.ProtoTCP, 443, 0, 120*time.Second, 1))
	h.clock.Advance(119 * time.Second)
	if len(h.s.Leases()) != 1 || len(h.fw.Holes()) != 1 {
		t.Fatal("gone early")
	}
	h.clock.Advance(time.Second)
	h.s.expire()
	if len(h.s.Leases()) != 0 || len(h.st.Leases()) != 0 || len(h.fw.Holes()) != 0 {
		t.Fatalf("after expiry: %v %v %v", h.s.Leases(), h.st.Leases(), h.fw.Holes())
	}
}

// TestHDR06RollbackOnFailure: choice (g): a kernel or store failure rolls
// everything back and answers NO_RESOURCES; FLT-06 refusals change nothing.
func TestHDR06RollbackOnFailure(t *testing.T) {
	h := newHarness(t)
	h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 443, 80, time.Hour, 1)), pcp.Success)
	before := h.snap()
	h.fw.FailApply = func([]pinhole.Op) error { return servertest.ErrInjected }
	resp := h.do(mapReq(addrA, pcp.ProtoTCP, 22, 0, time.Hour, 1))
	h.expect(resp, pcp.NoResources)
	h.unchanged(before)
	h.fw.FailApply = nil
	h.st.FailCommit = func([]store.Lease, []store.Key) error { return servertest.ErrInjected }
	h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 22, 0, time.Hour, 1)), pcp.NoResources)
	h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 443, 0, 0, 1)), pcp.NoResources)
	h.unchanged(before)
	h.st.FailCommit = nil
	h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 22, 0, time.Hour, 1)), pcp.Success)
}

// TestHDR09Idempotent: the same request twice gets the same reply.
func TestHDR09Idempotent(t *testing.T) {
	h := newHarness(t)
	b := pcp.AppendRequest(nil, mapReq(addrA, pcp.ProtoTCP, 443, 80, time.Hour, 1))
	r1, r2 := h.raw(addrA, b), h.raw(addrA, b)
	if string(r1) != string(r2) {
		t.Fatalf("\n% x\n% x", r1, r2)
	}
	d := pcp.AppendRequest(nil, mapReq(addrA, pcp.ProtoTCP, 443, 80, 0, 1))
	if d1, d2 := h.raw(addrA, d), h.raw(addrA, d); string(d1) != string(d2) {
		t.Fatalf("delete\n% x\n% x", d1, d2)
	}
}

// TestOPT09Description: stored up to the cap at a UTF-8 boundary, echoed
// only if sent, cleared by length 0.
func TestOPT09Description(t *testing.T) {
	h := newHarness(t, func(c *Config, _ *policy.Config) { c.DescriptionCap = 128 })
	r := mapReq(addrA, pcp.ProtoTCP, 443, 0, time.Hour, 1)
	r.Options.HasDescription = true
	r.Options.Description = []byte(strings.Repeat("é", 100)) // 200 octets
	resp := h.do(r)
	h.expect(resp, pcp.Success)
	if len(resp.Options.Description) != 128 || !resp.Options.HasDescription {
		t.Fatalf("echoed %d octets", len(resp.Options.Description))
	}
	l, _ := h.lease(ownerA, 6, addrA, 443)
	if len(l.Description) != 128 {
		t.Fatalf("stored %d", len(l.Description))
	}
	plain := h.do(mapReq(addrA, pcp.ProtoTCP, 443, 0, time.Hour, 1))
	if plain.Options.HasDescription {
		t.Fatal("echoed a description that was not sent")
	}
	r.Options.Description = nil
	h.do(r)
	if l, _ := h.lease(ownerA, 6, addrA, 443); l.Description != "" {
		t.Fatal("length 0 did not clear")
	}
}

// TestMAP05Wildcard: with all ports allowed by policy, a TCP all-ports MAP
// on IPv6 is granted whole and deleted by its port-0 delete (MAP-16); UDP,
// all-protocol and IPv4 wildcards stay UNSUPP_PROTOCOL.
func TestMAP05Wildcard(t *testing.T) {
	h := newHarness(t, func(_ *Config, p *policy.Config) { p.AllowAllPorts = true })
	resp := h.do(mapReq(addrA, pcp.ProtoTCP, 0, 0, time.Hour, 1))
	h.expect(resp, pcp.Success)
	if resp.Map.ExternalPort != 0 || resp.Map.ExternalAddr != addrA {
		t.Fatalf("%+v", resp.Map)
	}
	if _, ok := h.fw.Holes()[hole(6, addrA, 0, addrA, 0)]; !ok {
		t.Fatalf("pinholes %v", h.fw.Holes())
	}
	// Ordinary TCP mappings on the same address coexist.
	h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 443, 80, time.Hour, 1)), pcp.Success)
	h.expect(h.do(mapReq(addrA, pcp.ProtoUDP, 0, 0, time.Hour, 1)), pcp.UnsuppProtocol)
	h.expect(h.do(mapReq(v4A, pcp.ProtoTCP, 0, 0, time.Hour, 1)), pcp.UnsuppProtocol)
	t.Run("MAP-16", func(t *testing.T) {
		h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 0, 0, 0, 1)), pcp.Success)
		if _, ok := h.fw.Holes()[hole(6, addrA, 0, addrA, 0)]; ok || len(h.fw.Holes()) != 1 {
			t.Fatalf("pinholes %v", h.fw.Holes())
		}
	})
}

// TestRequestInternal: a MAP or PEER is for its THIRD_PARTY address,
// unmapped (TP-04), when it has one; else for its source's address.
func TestRequestInternal(t *testing.T) {
	src := netip.MustParseAddrPort("[2001:db8::2]:5350")
	for _, c := range []struct {
		tp     netip.Addr
		want   netip.Addr
		wantTP bool
	}{
		{netip.Addr{}, src.Addr(), false},
		{netip.MustParseAddr("2001:db8::9"), netip.MustParseAddr("2001:db8::9"), true},
		{netip.MustParseAddr("::ffff:192.0.2.9"), netip.MustParseAddr("192.0.2.9"), true},
	} {
		req := &pcp.Request{}
		req.Options.ThirdParty = c.tp
		if got, tp := requestInternal(src, req); got != c.want || tp != c.wantTP {
			t.Errorf("THIRD_PARTY %v: requestInternal = %v, %v; want %v, %v", c.tp, got, tp, c.want, c.wantTP)
		}
	}
}
