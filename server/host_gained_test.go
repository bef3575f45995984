package server

import (
	"errors"
	"net"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/policy"
	"github.com/pcpd/pcpd/store"
)

// TestLeaseRevokedWhenHostGainsTarget: the host-address set is re-read at
// each address notification and every policy.HostSetRefresh (5 s), so a
// request in the window after the host gains an address (one the
// listener may already serve on) before the read (a notification lost,
// or before 2026-12-05 up to 5 s), or while reads fail after it, is
// judged by the old set: a client owning
// the host's LAN prefix (static mode) maps the host's new address, or its
// subnet's broadcast, and the NAPT mapping's DNAT carries the Internet's
// traffic to the host's own services. Once a read shows the address is
// the host's, renewals are refused (NOT_AUTHORIZED), but the lease, its
// pinhole and DNAT stayed until expiry (up to the max lifetime), as did
// a restored lease when the first read at start failed. The periodic
// sweep must revoke a lease whose target is now the host's, as it does
// one no longer owned; the others stay. Rows: the periodic steps alone,
// and the full walk (at start, at a reported ownership loss).
func TestLeaseRevokedWhenHostGainsTarget(t *testing.T) {
	for _, full := range []bool{false, true} {
		name := "periodic steps"
		if full {
			name = "full walk"
		}
		t.Run(name, func(t *testing.T) {
			var addrs atomic.Pointer[[]net.Addr]
			addrs.Store(&[]net.Addr{&net.IPNet{IP: net.ParseIP("2001:db8:ff::1"), Mask: net.CIDRMask(64, 128)}})
			host := &policy.HostSet{Addrs: func() ([]net.Addr, error) { return *addrs.Load(), nil }}
			if err := host.Refresh(); err != nil {
				t.Fatal(err)
			}
			h := newHarness(t, func(_ *Config, pc *policy.Config) {
				pc.HostAddrs, pc.HostAddrsRead, pc.HostAddrsGen = host.Contains, host.Read, host.Gen
			})
			hostV4 := netip.MustParseAddr("10.0.0.1")      // in client a's 10.0.0.0/28
			hostV6 := netip.MustParseAddr("2001:db8:a::1") // in client a's 2001:db8:a::/48
			bcast := netip.MustParseAddr("10.0.0.15")
			n := byte(0)
			mapTP := func(src, target netip.Addr, port uint16) pcp.Response {
				n++
				r := mapReq(src, pcp.ProtoTCP, port, 0, time.Hour, n)
				if target != src {
					r.Options.ThirdParty = target
				}
				return h.do(r)
			}
			// Before the host's next read: granted on the old set.
			for _, m := range []struct {
				src, target netip.Addr
				port        uint16
			}{{v4A, hostV4, 22}, {v4A, bcast, 80}, {addrA, hostV6, 22}, {v4A, v4A, 443}, {addrA, addrA, 443}} {
				if r := mapTP(m.src, m.target, m.port); r.Result != pcp.Success {
					t.Fatalf("MAP %v port %d before the host's read: %v", m.target, m.port, r.Result)
				}
			}
			// The host's addresses now: 10.0.0.1/28 and 2001:db8:a::1/64.
			addrs.Store(&[]net.Addr{
				&net.IPNet{IP: hostV4.AsSlice(), Mask: net.CIDRMask(28, 32)},
				&net.IPNet{IP: hostV6.AsSlice(), Mask: net.CIDRMask(64, 128)},
			})
			if err := host.Refresh(); err != nil {
				t.Fatal(err)
			}
			if r := mapTP(v4A, hostV4, 23); r.Result != pcp.NotAuthorized {
				t.Fatalf("MAP of the host's 10.0.0.1 after the read: %v, want NOT_AUTHORIZED", r.Result)
			}
			if full {
				h.s.sweepOwnership()
			} else {
				for range 3 {
					h.s.sweepStep()
				}
			}
			for _, m := range []struct {
				proto uint8
				addr  netip.Addr
				port  uint16
				kept  bool
			}{{protoTCP, hostV4, 22, false}, {protoTCP, bcast, 80, false}, {protoTCP, hostV6, 22, false},
				{protoTCP, v4A, 443, true}, {protoTCP, addrA, 443, true}} {
				h.s.mu.Lock()
				_, ok := h.s.tab.get(store.Key{Owner: "static:a", Protocol: m.proto, InternalAddr: m.addr, InternalPort: m.port})
				h.s.mu.Unlock()
				if ok != m.kept {
					t.Errorf("lease of %v port %d after the sweep: held %v, want %v", m.addr, m.port, ok, m.kept)
				}
			}
			for p := range h.fw.Holes() {
				if host.Contains(p.InternalAddr) {
					t.Errorf("pinhole %v to the host's own address left open", p)
				}
			}
		})
	}
}

// TestRestoredLeaseRevokedOnceHostRead: a lease on what is now the host's
// address, restored while the first read of the host's addresses fails
// (Policy.Rules keeps it: nothing to judge it by), is revoked by the
// sweep once a read succeeds; the client's own lease stays.
func TestRestoredLeaseRevokedOnceHostRead(t *testing.T) {
	hostV4 := netip.MustParseAddr("10.0.0.1")
	h := newHarness(t)
	if r := h.do(func() *pcp.Request {
		r := mapReq(v4A, pcp.ProtoTCP, 22, 0, time.Hour, 1)
		r.Options.ThirdParty = hostV4
		return r
	}()); r.Result != pcp.Success {
		t.Fatalf("MAP of 10.0.0.1 before it was the host's: %v", r.Result)
	}
	h.expect(h.do(mapReq(v4A, pcp.ProtoTCP, 443, 0, time.Hour, 2)), pcp.Success)
	h.s.payStoreDebt()

	var fail atomic.Bool
	fail.Store(true)
	host := &policy.HostSet{Addrs: func() ([]net.Addr, error) {
		if fail.Load() {
			return nil, errors.New("injected")
		}
		return []net.Addr{&net.IPNet{IP: hostV4.AsSlice(), Mask: net.CIDRMask(28, 32)}}, nil
	}}
	host.Refresh()
	h.pcfg.HostAddrs, h.pcfg.HostAddrsRead, h.pcfg.HostAddrsGen = host.Contains, host.Read, host.Gen
	h.start() // restart: the first read failed
	held := func(port uint16) bool {
		h.s.mu.Lock()
		defer h.s.mu.Unlock()
		_, ok := h.s.tab.get(store.Key{Owner: "static:a", Protocol: protoTCP, InternalAddr: v4A, InternalPort: port})
		if port == 22 {
			_, ok = h.s.tab.get(store.Key{Owner: "static:a", Protocol: protoTCP, InternalAddr: hostV4, InternalPort: port})
		}
		return ok
	}
	h.runPeriodic(1, 3)
	if !held(22) || !held(443) {
		t.Fatalf("restored leases while unread: 10.0.0.1:22 %v, 10.0.0.2:443 %v; want both kept", held(22), held(443))
	}
	fail.Store(false)
	if err := host.Refresh(); err != nil {
		t.Fatal(err)
	}
	h.runPeriodic(1, 3)
	if held(22) || !held(443) {
		t.Fatalf("after the first good read: 10.0.0.1:22 held %v (want revoked), 10.0.0.2:443 held %v (want kept)", held(22), held(443))
	}
}

// BenchmarkSweepStepNeverOpenable is BenchmarkSweepStep with the sweep's
// ownership as the server builds it (sweptOwnership): each address run
// also asks Policy.NeverOpenable, over a host-address set of a host with
// four interface addresses.
func BenchmarkSweepStepNeverOpenable(b *testing.B) {
	for _, check := range []bool{false, true} {
		name := "ownership only"
		if check {
			name = "with NeverOpenable"
		}
		b.Run(name, func(b *testing.B) {
			tab, gen := benchTable(1_000_000)
			ids := make([]policy.OwnerID, 4096)
			for i := range ids {
				ids[i] = policy.OwnerID(gen(i).Owner)
			}
			var own policy.Ownership = ownershipFunc(func(a netip.Addr) (policy.Owner, bool) {
				b := a.As16()
				return policy.Owner{ID: ids[(int(b[7])<<16|int(b[13])<<8|int(b[14]))%len(ids)]}, true
			})
			if check {
				host := &policy.HostSet{Addrs: func() ([]net.Addr, error) {
					return []net.Addr{
						&net.IPNet{IP: net.ParseIP("127.0.0.1"), Mask: net.CIDRMask(8, 32)},
						&net.IPNet{IP: net.ParseIP("::1"), Mask: net.CIDRMask(128, 128)},
						&net.IPNet{IP: net.ParseIP("192.0.2.1"), Mask: net.CIDRMask(24, 32)},
						&net.IPNet{IP: net.ParseIP("2001:db8:ffff::1"), Mask: net.CIDRMask(64, 128)},
					}, nil
				}}
				if err := host.Refresh(); err != nil {
					b.Fatal(err)
				}
				pol, err := policy.New(policy.Config{HostAddrs: host.Contains, HostAddrsRead: host.Read}, own)
				if err != nil {
					b.Fatal(err)
				}
				own = sweptOwnership{Ownership: own, never: pol.NeverOpenable}
			}
			var keys []store.Key
			at := uint32(0)
			for b.Loop() {
				keys, at = tab.unowned(at, sweepSlots, own, keys[:0])
			}
			if len(keys) != 0 {
				b.Fatalf("%d leases found unowned", len(keys))
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*sweepSlots), "ns/slot")
		})
	}
}
