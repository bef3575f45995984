package fuzz

import (
	"encoding/binary"
	"encoding/hex"
	"maps"
	"net/netip"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/policy"
	"github.com/pcpd/pcpd/server"
	"github.com/pcpd/pcpd/server/servertest"
	"github.com/pcpd/pcpd/store"
)

// serverSeeds are requests that reach every engine path: MAP (IPv6,
// IPv4, delete, PREFER_FAILURE, FILTER, DESCRIPTION, THIRD_PARTY), PEER,
// ANNOUNCE and NAT-PMP, all from the fuzz sources below.
var serverSeeds = []string{
	"02010000" + "00000e10" + "20010db8000100000000000000000010" + "0102030405060708090a0b0c" + "06000000" + "01bb0050" + "00000000000000000000000000000000",
	"02010000" + "00000e10" + "00000000000000000000ffff0a000005" + "0102030405060708090a0b0c" + "11000000" + "13881388" + "00000000000000000000ffff00000000",
	"02010000" + "00000000" + "20010db8000100000000000000000010" + "0102030405060708090a0b0c" + "06000000" + "01bb04d2" + "00000000000000000000000000000000",
	"02020000" + "00000e10" + "20010db8000100000000000000000010" + "0102030405060708090a0b0c" + "11000000" + "13880000" + "00000000000000000000000000000000" + "00350000" + "20010db8009900000000000000000001",
	"02000000" + "00000063" + "00000000000000000000ffff0a000005",
	"02010000" + "00000e10" + "20010db8000100000000000000000010" + "0102030405060708090a0b0c" + "06000000" + "01bb0050" + "00000000000000000000000000000000" +
		"02000000" + "0300001400300000" + "20010db8009900000000000000000000" + "80000003776562ff",
	"02010000" + "00000e10" + "20010db8000100000000000000000010" + "0102030405060708090a0b0c" + "06000000" + "01bb0050" + "00000000000000000000000000000000" + "01000010" + "20010db8000100000000000000000011",
	"0000",
	"000200001f901f9000001c20",
	"000100001f901f9000000000",
	"000100000000000000000000",
	"0007000000",
	"0100",
	"0301000000000000",
}

var (
	fuzzSrc6 = netip.MustParseAddrPort("[2001:db8:1::10]:40000")
	fuzzSrc4 = netip.MustParseAddrPort("10.0.0.5:40000")
	local6   = netip.MustParseAddrPort("[2001:db8:1::1]:5351")
	local4   = netip.MustParseAddrPort("10.0.0.1:5351")
)

// newFuzzServer builds an engine over in-memory kernel and store, owning
// the fuzz sources, on a clock that never moves (no expiry mid-run).
func newFuzzServer(tb testing.TB) (*server.Server, *servertest.Firewall, *servertest.Store) {
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	clock := func() time.Time { return now }
	fw, st := servertest.NewFirewall(clock), servertest.NewStore()
	own, err := policy.NewStatic(map[string][]netip.Prefix{
		"fuzz":  {netip.MustParsePrefix("2001:db8:1::/48"), netip.MustParsePrefix("10.0.0.0/24")},
		"other": {netip.MustParsePrefix("2001:db8:2::/48")},
	})
	if err != nil {
		tb.Fatal(err)
	}
	pol, err := policy.New(policy.Config{}, own)
	if err != nil {
		tb.Fatal(err)
	}
	s, err := server.New(server.Config{
		ExternalIPv4: netip.MustParseAddr("198.51.100.1"),
		RateLimit:    1e9, RateBurst: 1 << 30,
		// No conntrack flushes: the fuzzer runs in the machine's namespace.
		KeepConnections: true,
	}, server.Deps{Firewall: fw, Store: st, State: st.State(), Policy: pol, Now: clock}, nil)
	if err != nil {
		tb.Fatal(err)
	}
	if err := s.Start(); err != nil {
		tb.Fatal(err)
	}
	return s, fw, st
}

// FuzzServerHandle drives the engine's request path with arbitrary bytes
// from a fixed, owned source and checks the promises of PROTOCOL.md: no
// panic; no reply over 1100 octets; no reply longer than its request
// except the cases choice (f) lists (error padding to ×4, NAT-PMP 2 → 12,
// 12 → 16, 2–3 → 4); and no state change — kernel, store or lease table —
// when the reply is an error or there is none (HDR-06).
func FuzzServerHandle(f *testing.F) {
	for _, s := range serverSeeds {
		b, err := hex.DecodeString(s)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b, false)
		f.Add(b, true)
	}
	s, fw, st := newFuzzServer(f)
	f.Fuzz(func(t *testing.T, b []byte, v4 bool) {
		src, local := fuzzSrc6, local6
		if v4 {
			src, local = fuzzSrc4, local4
		}
		leases, holes, n := st.Leases(), fw.Holes(), len(s.Leases())
		reply := s.Handle(local, src, b)

		if len(reply) > pcp.MaxMessageSize {
			t.Fatalf("reply of %d octets", len(reply))
		}
		allowed := (min(len(b), pcp.MaxMessageSize) + 3) &^ 3 // PCP error padding, VER-04
		natpmp := v4 && len(b) >= 2 && b[0] == pcp.PMPVersion
		if natpmp {
			allowed = max(allowed, pcp.PMPMapResponseSize) // 2 → 12, 12 → 16
		}
		if len(reply) > allowed {
			t.Fatalf("reply %d octets to a %d-octet request (allowed %d): amplification", len(reply), len(b), allowed)
		}
		success := false
		switch {
		case len(reply) >= 4 && reply[0] == pcp.Version:
			success = reply[3] == byte(pcp.Success)
			if success && len(reply) > len(b) {
				t.Fatalf("success reply %d octets to a %d-octet request", len(reply), len(b))
			}
		case len(reply) >= 4 && reply[0] == pcp.PMPVersion:
			success = binary.BigEndian.Uint16(reply[2:4]) == uint16(pcp.PMPSuccess)
		}
		if !success {
			if !maps.EqualFunc(leases, st.Leases(), sameLease) {
				t.Fatalf("store changed by a refused request: % x → % x", b, reply)
			}
			if !maps.Equal(holes, fw.Holes()) {
				t.Fatalf("kernel changed by a refused request: % x → % x", b, reply)
			}
			if len(s.Leases()) != n {
				t.Fatalf("lease table changed by a refused request: % x → % x", b, reply)
			}
		}
	})
}

func sameLease(a, b store.Lease) bool {
	return a.Kind == b.Kind && a.Nonce == b.Nonce && a.ExternalAddr == b.ExternalAddr && a.ExternalPort == b.ExternalPort &&
		a.Expires.Equal(b.Expires) && len(a.Filters) == len(b.Filters) && a.Description == b.Description && a.ClientAddr == b.ClientAddr
}
