package server

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/policy"
	"github.com/pcpd/pcpd/server/servertest"
	"github.com/pcpd/pcpd/store"
)

// TestResultCode maps every internal error and policy reason to its code,
// in one place.
func TestResultCode(t *testing.T) {
	for _, c := range []struct {
		err  error
		want pcp.ResultCode
	}{
		{nil, pcp.Success},
		{&policyError{policy.NoOwner}, pcp.NotAuthorized},
		{&policyError{policy.NotOwned}, pcp.NotAuthorized},
		{&policyError{policy.NeverOpenable}, pcp.NotAuthorized},
		{&policyError{policy.PortDenied}, pcp.NotAuthorized},
		{&policyError{policy.ThirdPartyDenied}, pcp.UnsuppOption},
		{&policyError{policy.ProtocolDenied}, pcp.UnsuppProtocol},
		{&policyError{policy.AllPortsDenied}, pcp.UnsuppProtocol},
		{&policyError{policy.AllProtocolsDenied}, pcp.UnsuppProtocol},
		{&policyError{policy.ClientQuota}, pcp.UserExQuota},
		{&policyError{policy.GlobalQuota}, pcp.NoResources},
		{&policyError{policy.HostUnread}, pcp.NoResources},
		{&policyError{policy.PeersUnread}, pcp.NoResources},
		{&policyError{policy.HostSourceUnread}, pcp.NoResources},
		{errHostPortsUnread, pcp.NoResources},
		{errDNATCatchAll, pcp.NoResources},
		{fmt.Errorf("x: %w", errDisabled), pcp.NotAuthorized},
		{errNoExternalIPv4, pcp.NotAuthorized},
		{errNonce, pcp.NotAuthorized},
		{errPeerOnly, pcp.NotAuthorized},
		{fmt.Errorf("x: %w", errCannotProvide), pcp.CannotProvideExternal},
		{errNoPorts, pcp.NoResources},
		{errTooManyFilters, pcp.ExcessiveRemotePeers},
		{errUnsuppProtocol, pcp.UnsuppProtocol},
		{errInternalPortZero, pcp.NotAuthorized},
		{errors.New("anything else"), pcp.NoResources},
	} {
		if got := resultCode(c.err); got != c.want {
			t.Errorf("resultCode(%v) = %v, want %v", c.err, got, c.want)
		}
	}
	for c, want := range map[pcp.ResultCode]pcp.PMPResultCode{
		pcp.Success: pcp.PMPSuccess, pcp.NotAuthorized: pcp.PMPNotAuthorized, pcp.NetworkFailure: pcp.PMPNetworkFailure,
		pcp.NoResources: pcp.PMPOutOfResources, pcp.UserExQuota: pcp.PMPOutOfResources, pcp.UnsuppProtocol: pcp.PMPNotAuthorized,
	} {
		if got := pmpResult(c); got != want {
			t.Errorf("pmpResult(%v) = %v, want %v", c, got, want)
		}
	}
}

// TestGroupCommit: requests that arrive together share one kernel
// transaction and one store commit; a failing one does not fail the
// others.
func TestGroupCommit(t *testing.T) {
	h := newHarness(t)
	var reqs []Request
	for i := range 50 {
		b := pcp.AppendRequest(nil, mapReq(addrA, pcp.ProtoTCP, uint16(1000+i), 0, time.Hour, 1))
		reqs = append(reqs, Request{Local: local6, Source: netip.AddrPortFrom(addrA, 5000), Data: b})
	}
	applies, commits := h.fw.Applies, h.st.Commits
	replies := h.s.HandleBatch(reqs)
	for i, r := range replies {
		if len(r) < 4 || r[3] != 0 {
			t.Fatalf("reply %d: % x", i, r)
		}
	}
	if h.fw.Applies-applies != 1 || h.st.Commits-commits != 1 {
		t.Fatalf("%d applies and %d commits for one batch", h.fw.Applies-applies, h.st.Commits-commits)
	}
	t.Run("isolation", func(t *testing.T) {
		h.fw.FailApply = failOnPinhole(hole(6, addrA, 2001, addrA, 2001))
		defer func() { h.fw.FailApply = nil }()
		var reqs []Request
		for i := range 3 {
			b := pcp.AppendRequest(nil, mapReq(addrA, pcp.ProtoTCP, uint16(2000+i), 0, time.Hour, 1))
			reqs = append(reqs, Request{Local: local6, Source: netip.AddrPortFrom(addrA, 5000), Data: b})
		}
		replies := h.s.HandleBatch(reqs)
		for i, want := range []pcp.ResultCode{pcp.Success, pcp.NoResources, pcp.Success} {
			if replies[i][3] != byte(want) {
				t.Fatalf("reply %d: % x, want %v", i, replies[i][:4], want)
			}
		}
		if _, ok := h.lease(ownerA, 6, addrA, 2001); ok {
			t.Fatal("failed request left a lease")
		}
	})
	t.Run("concurrent", func(t *testing.T) {
		var wg sync.WaitGroup
		for i := range 20 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				b := pcp.AppendRequest(nil, mapReq(addrB, pcp.ProtoUDP, uint16(3000+i), 0, time.Hour, 1))
				if r := h.s.Handle(local6, netip.AddrPortFrom(addrB, 5000), b); r[3] != 0 {
					t.Errorf("% x", r)
				}
			}()
		}
		wg.Wait()
	})
}

// mutableOwnership lets a test take addresses away (LIFE-05). holes are
// what it reports as policy.Holes (Lookup ignores them).
type mutableOwnership struct {
	mu     sync.Mutex
	owners map[policy.OwnerID][]netip.Prefix
	holes  []netip.Prefix
}

func (m *mutableOwnership) Holes() []netip.Prefix {
	m.mu.Lock()
	defer m.mu.Unlock()
	return slices.Clone(m.holes)
}

func (m *mutableOwnership) Lookup(a netip.Addr) (policy.Owner, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	best, bits := policy.Owner{}, -1
	for id, ps := range m.owners {
		for _, p := range ps {
			if p.Contains(a) && p.Bits() > bits {
				best, bits = policy.Owner{ID: id, Prefixes: ps}, p.Bits()
			}
		}
	}
	return best, bits >= 0
}

func (m *mutableOwnership) Owners() []policy.Owner {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []policy.Owner
	for id, ps := range m.owners {
		out = append(out, policy.Owner{ID: id, Prefixes: ps})
	}
	return out
}

// ownershipSweeps are the two ways the engine revokes what is no longer
// owned: the full walk (at start, on a change report) and the periodic
// step (the safety net); ownership tests run under both.
var ownershipSweeps = []struct {
	name string
	run  func(*Server)
}{{"full", (*Server).sweepOwnership}, {"periodic step", (*Server).sweepStep}}

// TestLIFE05Revocation: when a peer loses an address its leases go, with a
// log line naming peer, address and port: at once on a full sweep (start,
// a change report), and at the periodic step without one (a table this
// small is one step long). The periodic step also makes the firewall guard
// an owner added since the last pass.
func TestLIFE05Revocation(t *testing.T) {
	for _, sweep := range ownershipSweeps {
		t.Run(sweep.name, func(t *testing.T) {
			h := newHarness(t)
			own := &mutableOwnership{owners: map[policy.OwnerID][]netip.Prefix{
				"wg:A": {netip.MustParsePrefix("2001:db8:a::/48")},
				"wg:B": {netip.MustParsePrefix("2001:db8:b::/48")},
			}}
			h.own = own
			h.start()
			h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 443, 0, time.Hour, 1)), pcp.Success)
			h.expect(h.do(mapReq(addrA2, pcp.ProtoTCP, 443, 0, time.Hour, 1)), pcp.Success)
			h.expect(h.do(mapReq(addrB, pcp.ProtoTCP, 443, 0, time.Hour, 1)), pcp.Success)
			own.mu.Lock()
			own.owners["wg:A"] = []netip.Prefix{netip.MustParsePrefix("2001:db8:a::11/128")}
			own.mu.Unlock()
			sweep.run(h.s)
			if len(h.s.Leases()) != 2 || len(h.fw.Holes()) != 2 || len(h.st.Leases()) != 2 {
				t.Fatalf("after shrink: %v", h.s.Leases())
			}
			if _, ok := h.fw.Holes()[hole(6, addrA, 443, addrA, 443)]; ok {
				t.Fatal("revoked pinhole still in the kernel")
			}
			logs := h.logs.FilterMessageSnippet("revoked").All()
			if len(logs) != 1 {
				t.Fatalf("log lines %v", logs)
			}
			f := logs[0].ContextMap()
			if f["peer"] != "wg:A" || f["address"] != addrA.String() || fmt.Sprint(f["port"]) != "443" {
				t.Fatalf("log fields %v", f)
			}
			own.mu.Lock()
			delete(own.owners, "wg:B")
			own.owners["wg:C"] = []netip.Prefix{netip.MustParsePrefix("2001:db8:c::/48")}
			own.mu.Unlock()
			sweep.run(h.s)
			if len(h.s.Leases()) != 1 {
				t.Fatalf("after peer removal: %v", h.s.Leases())
			}
			if !slices.Contains(h.fw.Protected, "2001:db8:c::/48") {
				t.Fatalf("guarded prefixes %v lack the added owner's", h.fw.Protected)
			}
			// The owner meter follows: B gone, C added, A shrunk; and
			// is not rewritten while nothing changes.
			h.s.sweepAt = 0 // a periodic pass starts over
			if want := []string{"wg:A=2001:db8:a::11/128", "wg:C=2001:db8:c::/48"}; !slices.Equal(h.fw.Owners, want) {
				t.Fatalf("owner meter holds %v, want %v", h.fw.Owners, want)
			}
			n := h.fw.OwnerSets
			sweep.run(h.s)
			if h.fw.OwnerSets != n {
				t.Fatalf("owner meter set again (%d times, was %d) with no change", h.fw.OwnerSets, n)
			}
			// A hole appears (an overlap across WireGuard interfaces):
			// the meter gets it, though no owner's prefixes changed.
			own.mu.Lock()
			own.holes = []netip.Prefix{netip.MustParsePrefix("2001:db8:c:1::/64")}
			own.mu.Unlock()
			h.s.sweepAt = 0
			sweep.run(h.s)
			if want := []string{"2001:db8:c:1::/64"}; !slices.Equal(h.fw.OwnerHoles, want) || h.fw.OwnerSets != n+1 {
				t.Fatalf("owner meter holes %v after %d sets (was %d), want %v after one more", h.fw.OwnerHoles, h.fw.OwnerSets, n, want)
			}
		})
	}
}

// TestTamperRestore: a deleted table is noticed and every live lease's
// pinhole comes back.
func TestTamperRestore(t *testing.T) {
	h := newHarness(t)
	h.do(mapReq(addrA, pcp.ProtoTCP, 443, 80, time.Hour, 1))
	h.do(mapReq(v4A, pcp.ProtoUDP, 53, 0, time.Hour, 1))
	h.fw.Tamper()
	h.clock.Advance(time.Minute)
	h.s.checkFirewall()
	holes := h.fw.Holes()
	if len(holes) != 2 || holes[hole(6, addrA, 443, addrA, 80)] != 59*time.Minute {
		t.Fatalf("after restore: %v", holes)
	}
	if len(h.logs.FilterMessageSnippet("restoring").All()) == 0 {
		t.Fatal("restore not logged")
	}
}

// TestOperatorAPI: Leases, Revoke, Status.
func TestOperatorAPI(t *testing.T) {
	h := newHarness(t)
	h.do(mapReq(addrA, pcp.ProtoTCP, 443, 80, time.Hour, 1))
	h.do(mapReq(addrA, pcp.ProtoUDP, 53, 0, time.Hour, 1))
	h.do(mapReq(addrB, pcp.ProtoTCP, 22, 0, time.Hour, 1))
	ls := h.s.Leases()
	if len(ls) != 3 || ls[0].Owner != ownerA || ls[2].Owner != ownerB {
		t.Fatalf("leases %v", ls)
	}
	st := h.s.Status()
	if st.Leases != 3 || st.Owners != 2 {
		t.Fatalf("status %+v", st)
	}
	k := store.Key{Owner: ownerA, Protocol: 17, InternalAddr: addrA, InternalPort: 53}
	if n, err := h.s.Revoke(context.Background(), RevokeFilter{Key: &k}); n != 1 || err != nil {
		t.Fatalf("revoke key: %d %v", n, err)
	}
	if n, err := h.s.Revoke(context.Background(), RevokeFilter{Owner: ownerA}); n != 1 || err != nil {
		t.Fatalf("revoke owner: %d %v", n, err)
	}
	if n, err := h.s.Revoke(context.Background(), RevokeFilter{All: true}); n != 1 || err != nil {
		t.Fatalf("revoke all: %d %v", n, err)
	}
	if len(h.fw.Holes()) != 0 || len(h.st.Leases()) != 0 {
		t.Fatal("revoked state left behind")
	}
	if _, err := h.s.Revoke(context.Background(), RevokeFilter{}); err == nil {
		t.Fatal("empty filter accepted")
	}
}

// TestLargeBatches: batches whose kernel changes exceed one transaction are
// cut so that each SUCCESS still rests on one atomic kernel change; bulk
// revocation goes in several transactions.
func TestLargeBatches(t *testing.T) {
	h := newHarness(t, func(c *Config, p *policy.Config) { p.MaxLeasesPerClient, c.RateBurst = 1000, 10000 })
	var reqs []Request
	for i := range 256 {
		r := mapReq(addrA, pcp.ProtoTCP, uint16(1000+i), 0, time.Hour, 1)
		for j := range 4 {
			r.Options.Filters = append(r.Options.Filters, pcp.Filter{Remote: netip.PrefixFrom(netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0x99, byte(j)}), 48)})
		}
		reqs = append(reqs, Request{Local: local6, Source: netip.AddrPortFrom(addrA, 5000), Data: pcp.AppendRequest(nil, r)})
	}
	applies := h.fw.Applies
	for i, r := range h.s.HandleBatch(reqs) {
		if len(r) < 4 || r[3] != 0 {
			t.Fatalf("reply %d: % x", i, r)
		}
	}
	if n := h.fw.Applies - applies; n < 4 || n > 6 {
		t.Fatalf("%d transactions for 1024 ops", n)
	}
	if len(h.fw.Holes()) != 1024 {
		t.Fatalf("%d pinholes", len(h.fw.Holes()))
	}
	if n, err := h.s.Revoke(context.Background(), RevokeFilter{All: true}); n != 256 || err != nil {
		t.Fatalf("revoke: %d %v", n, err)
	}
	if len(h.fw.Holes()) != 0 || len(h.st.Leases()) != 0 {
		t.Fatal("revocation incomplete")
	}
	t.Run("restart", func(t *testing.T) {
		h.s.HandleBatch(reqs)
		h.fw.Tamper()
		h.fw.Setup()
		h.start()
		if len(h.fw.Holes()) != 1024 {
			t.Fatalf("restored %d pinholes", len(h.fw.Holes()))
		}
	})
}

// TestMAP01Order: several faults in one request: the step that comes first
// in MAP-01's order decides (HDR-07 "most specific", made deterministic).
func TestMAP01Order(t *testing.T) {
	h := newHarness(t, func(c *Config, p *policy.Config) { p.MaxLeasesPerClient = 1; c.MaxFilters = 1 })
	// TP to another client's address + unsupported protocol: ownership
	// comes before protocol.
	r := mapReq(addrA, pcp.ProtoSCTP, 80, 0, time.Hour, 1)
	r.Options.ThirdParty = addrB
	h.expect(h.do(r), pcp.NotAuthorized)
	// Unsupported protocol + PREFER_FAILURE with port 0: protocol before
	// option semantics.
	r = mapReq(addrA, pcp.ProtoSCTP, 80, 0, time.Hour, 1)
	r.Options.PreferFailure = true
	h.expect(h.do(r), pcp.UnsuppProtocol)
	// Quota before the filter limit.
	h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 1, 0, time.Hour, 1)), pcp.Success)
	r = mapReq(addrA, pcp.ProtoTCP, 2, 0, time.Hour, 1)
	r.Options.Filters = []pcp.Filter{{Remote: netip.MustParsePrefix("2001:db8:99::/48")}, {Remote: netip.MustParsePrefix("2001:db8:98::/48")}}
	h.expect(h.do(r), pcp.UserExQuota)
	// Delete before existence: deleting what is not there is SUCCESS
	// even with a PREFER_FAILURE-free, FILTER-free request of another nonce.
	h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 3, 0, 0, 9)), pcp.Success)
}

// TestHDR08LargestReply: a MAP filling 1100 octets with FILTERs is granted
// and its reply, echoing them all, is exactly as long: never more.
func TestHDR08LargestReply(t *testing.T) {
	h := newHarness(t, func(c *Config, _ *policy.Config) { c.MaxFilters = 64 })
	r := mapReq(addrA, pcp.ProtoTCP, 443, 0, time.Hour, 1)
	for i := range pcp.MaxFilters {
		r.Options.Filters = append(r.Options.Filters, pcp.Filter{Remote: netip.PrefixFrom(netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0x99, byte(i)}), 48)})
	}
	b := pcp.AppendRequest(nil, r)
	out := h.raw(addrA, b)
	if len(out) < 4 || out[3] != 0 || len(out) != len(b) || len(out) > pcp.MaxMessageSize {
		t.Fatalf("request %d octets, reply %d: % x", len(b), len(out), out[:min(len(out), 4)])
	}
}

// TestSEC04BoundedState: per-source rate state stays bounded whatever the
// number of sources (and the other bounds: quotas MAP-15, filters FLT-06,
// descriptions OPT-09, PF probes PF-06, off-switches MAP-23).
func TestSEC04BoundedState(t *testing.T) {
	h := newHarness(t, func(c *Config, _ *policy.Config) { c.RateSources = 1000 })
	for i := range 100000 {
		src := netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0xc0, 0, byte(i >> 16), byte(i >> 8), byte(i), 0, 0, 0, 0, 0, 0, 1})
		h.raw(src, pcp.AppendRequest(nil, pcp.NewAnnounce(src)))
	}
	if n := h.s.rl.Len(); n > 1000 {
		t.Fatalf("rate limiter holds %d sources", n)
	}
	if h.s.tab.len() != 0 || len(h.s.quar) != 0 {
		t.Fatal("ANNOUNCE flood left state")
	}
}

// failOnPinhole makes a fake firewall refuse every transaction that
// touches p (and only those).
func failOnPinhole(p pinhole.Pinhole) func([]pinhole.Op) error {
	return func(ops []pinhole.Op) error {
		for _, op := range ops {
			if op.Pinhole == p {
				return servertest.ErrInjected
			}
		}
		return nil
	}
}
