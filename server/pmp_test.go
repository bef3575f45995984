package server

import (
	"encoding/binary"
	"net/netip"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/policy"
)

func (h *harness) pmp(src netip.Addr, op pcp.PMPOpcode, port, sugg uint16, lifetime time.Duration) pcp.PMPResponse {
	h.t.Helper()
	b := pcp.AppendPMPRequest(nil, &pcp.PMPRequest{Opcode: op, InternalPort: port, SuggestedExternalPort: sugg, Lifetime: lifetime})
	out := h.raw(src, b)
	var r pcp.PMPResponse
	if err := pcp.ParsePMPResponse(out, &r); err != nil {
		h.t.Fatalf("reply % x: %v", out, err)
	}
	return r
}

// TestPMP01to10NATPMP covers NAT-PMP v0 mapping rules.
func TestPMP01to10NATPMP(t *testing.T) {
	h := newHarness(t)
	t.Run("PMP-03 address", func(t *testing.T) {
		out := h.raw(v4A, []byte{0, 0})
		if len(out) != 12 || out[1] != 0x80 || netip.AddrFrom4([4]byte(out[8:12])) != ext4 {
			t.Fatalf("% x", out)
		}
	})
	t.Run("PMP-02", func(t *testing.T) {
		out := h.raw(v4A, []byte{0, 7, 0, 0, 0xaa, 0xbb})
		if string(out) != string([]byte{0, 0x87, 0, 5, 0xaa, 0xbb}) {
			t.Fatalf("% x", out)
		}
	})
	t.Run("PMP-04", func(t *testing.T) {
		r := h.pmp(v4A, pcp.PMPOpMapTCP, 8080, 8080, time.Hour)
		if r.Result != 0 || r.ExternalPort != 8080 || r.InternalPort != 8080 || r.Lifetime != time.Hour {
			t.Fatalf("%+v", r)
		}
		if _, ok := h.fw.Holes()[hole(6, v4A, 8080, ext4, 8080)]; !ok {
			t.Fatalf("pinholes %v", h.fw.Holes())
		}
		// A source nobody owns.
		if r := h.pmp(netip.MustParseAddr("10.0.0.99"), pcp.PMPOpMapTCP, 1, 0, time.Hour); r.Result != pcp.PMPNotAuthorized {
			t.Fatalf("stranger %+v", r)
		}
	})
	t.Run("PMP-05", func(t *testing.T) {
		h.clock.Advance(time.Minute)
		r := h.pmp(v4A, pcp.PMPOpMapTCP, 8080, 9999, time.Hour)
		// An early renewal is absorbed; the kernel follows at the flush.
		h.s.flushDirty("test")
		if r.ExternalPort != 8080 || h.fw.Holes()[hole(6, v4A, 8080, ext4, 8080)] != time.Hour {
			t.Fatalf("renewal %+v", r)
		}
		// One table with PCP: a PCP MAP for the same tuple renews it.
		resp := h.do(mapReq(v4A, pcp.ProtoTCP, 8080, 0, time.Hour, 1))
		if resp.Map.ExternalPort != 8080 || len(h.st.Leases()) != 1 {
			t.Fatalf("PCP over NAT-PMP lease: %+v, %d leases", resp.Map, len(h.st.Leases()))
		}
	})
	t.Run("PMP-06", func(t *testing.T) {
		r := h.pmp(v4B, pcp.PMPOpMapUDP, 8080, 8080, time.Hour)
		if r.Result != 0 || r.ExternalPort == 8080 {
			t.Fatalf("B got A's reserved UDP port: %+v", r)
		}
		if r := h.pmp(v4A, pcp.PMPOpMapUDP, 8080, 8080, time.Hour); r.ExternalPort != 8080 {
			t.Fatalf("A: %+v", r)
		}
	})
	t.Run("PMP-07", func(t *testing.T) {
		r := h.pmp(v4A, pcp.PMPOpMapUDP, 8080, 1234, 0)
		if r.Result != 0 || r.InternalPort != 8080 || r.ExternalPort != 0 || r.Lifetime != 0 {
			t.Fatalf("%+v", r)
		}
		if r2 := h.pmp(v4A, pcp.PMPOpMapUDP, 8080, 1234, 0); r2 != r {
			t.Fatalf("nonexistent delete %+v", r2)
		}
	})
	t.Run("PMP-08", func(t *testing.T) {
		h.pmp(v4A, pcp.PMPOpMapUDP, 1000, 0, time.Hour)
		h.pmp(v4A, pcp.PMPOpMapUDP, 1001, 0, time.Hour)
		h.pmp(v4A2, pcp.PMPOpMapUDP, 1002, 0, time.Hour)
		r := h.pmp(v4A, pcp.PMPOpMapUDP, 0, 0, 0)
		if r.Result != 0 || r.InternalPort != 0 {
			t.Fatalf("%+v", r)
		}
		for _, l := range h.s.Leases() {
			if l.InternalAddr == v4A && l.Protocol == 17 {
				t.Fatalf("left %+v", l)
			}
		}
		if _, ok := h.lease(ownerA, 17, v4A2, 1002); !ok {
			t.Fatal("deleted another address's mapping")
		}
		if _, ok := h.lease(ownerA, 6, v4A, 8080); !ok {
			t.Fatal("deleted the other protocol's mapping")
		}
	})
	t.Run("PMP-10", func(t *testing.T) {
		if r := h.pmp(v4A, pcp.PMPOpMapTCP, 0, 0, time.Hour); r.Result != pcp.PMPNotAuthorized || r.Lifetime != 0 {
			t.Fatalf("%+v", r)
		}
		if r := h.pmp(v4A, pcp.PMPOpMapTCP, 7000, 0, time.Second); r.Lifetime != 120*time.Second {
			t.Fatalf("clamp (e): %+v", r)
		}
	})
	t.Run("PMP-09", func(t *testing.T) {
		hq := newHarness(t, func(_ *Config, p *policy.Config) { p.MaxLeasesPerClient = 1 })
		hq.pmp(v4A, pcp.PMPOpMapTCP, 1, 0, time.Hour)
		r := hq.pmp(v4A, pcp.PMPOpMapTCP, 2, 0, time.Hour)
		if r.Result != pcp.PMPOutOfResources || r.InternalPort != 2 || r.ExternalPort != 0 || r.Lifetime != 0 {
			t.Fatalf("%+v", r)
		}
	})
}

// TestVER02NATPMPOff: without an external IPv4 (or from IPv6, or switched
// off) version 0 gets PCP UNSUPP_VERSION.
func TestVER02NATPMPOff(t *testing.T) {
	req := []byte{0, 1, 0, 0, 0x1f, 0x90, 0x1f, 0x90, 0, 0, 0x1c, 0x20}
	for name, opt := range map[string]option{
		"no external IPv4": func(c *Config, _ *policy.Config) { c.ExternalIPv4 = netip.Addr{} },
		"switched off":     func(c *Config, _ *policy.Config) { c.DisableNATPMP = true },
	} {
		t.Run(name, func(t *testing.T) {
			h := newHarness(t, opt)
			out := h.raw(v4A, req)
			if len(out) < 12 || out[0] != 2 || out[1] != 0x81 || out[3] != 1 || binary.BigEndian.Uint32(out[4:8]) != 1800 {
				t.Fatalf("% x", out)
			}
			if len(out) > len(req) {
				t.Fatalf("reply longer than request")
			}
		})
	}
	t.Run("PMP-01 IPv6 source", func(t *testing.T) {
		h := newHarness(t)
		if out := h.raw(addrA, req); len(out) < 4 || out[0] != 2 || out[3] != 1 {
			t.Fatalf("% x", out)
		}
	})
}

// TestPKT08RateLimit: a flooding source is dropped, others are served.
func TestPKT08RateLimit(t *testing.T) {
	h := newHarness(t, func(c *Config, _ *policy.Config) { c.RateLimit, c.RateBurst = 10, 20 })
	b := pcp.AppendRequest(nil, pcp.NewAnnounce(addrA))
	answered := 0
	for range 1000 {
		if h.raw(addrA, b) != nil {
			answered++
		}
	}
	if answered > 21 {
		t.Fatalf("flooder answered %d times", answered)
	}
	if h.raw(addrB, pcp.AppendRequest(nil, pcp.NewAnnounce(addrB))) == nil {
		t.Fatal("other client starved")
	}
	h.clock.Advance(time.Second)
	if h.raw(addrA, b) == nil {
		t.Fatal("flooder not served after refill")
	}
}

// TestPKT01to03Drop: short (PKT-01, PKT-03) and response (PKT-02) packets
// get nothing, NAT-PMP included.
func TestPKT01to03Drop(t *testing.T) {
	h := newHarness(t)
	for _, b := range [][]byte{{}, {2}, {0}, append([]byte{2, 0x81}, make([]byte, 22)...), {0, 0x80}, append([]byte{2, 1}, make([]byte, 18)...)} {
		if out := h.raw(v4A, b); out != nil {
			t.Fatalf("% x → % x", b, out)
		}
	}
}
