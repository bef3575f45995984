package server

import (
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/policy"
)

// TestRestartRevokesUnownedBeforeInstall (h/restore9; issue 9, "no
// pinhole for an address its client does not own"; h/hunt6's window): a
// client's addresses change hands while pcpd is down (its owner removed,
// the prefix another owner's). The start must not put the old owner's
// leases (a PCP MAP, a NAT-PMP mapping) into the kernel at all: no
// install of them in any transaction of the start, none in the table or
// the store after it, before any sweep; they are revoked as the sweep
// revokes them (its log line, pcpd_revocations_total{cause="ownership"},
// the PCP one's client queued its NOT_AUTHORIZED update). A lease the
// ownership still gives its owner is restored, and one whose owner kept
// its address under a removed sibling's (an unchanged owner) too.
//
// On main (9c5b3e1) the start installed both and only Serve's sweep
// deleted them: 'the start installed the unowned leases' pinholes: ...'.
func TestRestartRevokesUnownedBeforeInstall(t *testing.T) {
	h := newHarness(t)
	own := &mutableOwnership{owners: map[policy.OwnerID][]netip.Prefix{
		ownerA: {netip.MustParsePrefix("2001:db8:a::/48"), netip.MustParsePrefix("10.0.0.0/28")},
		ownerB: {netip.MustParsePrefix("2001:db8:b::/48"), netip.MustParsePrefix("10.0.0.16/28")},
	}}
	h.own = own
	h.start()
	h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 443, 0, time.Hour, 1)), pcp.Success)
	if r := h.pmp(v4A, pcp.PMPOpMapTCP, 8080, 8080, time.Hour); r.Result != pcp.PMPSuccess {
		t.Fatalf("NAT-PMP: %v", r.Result)
	}
	h.expect(h.do(mapReq(addrB, pcp.ProtoTCP, 443, 0, time.Hour, 1)), pcp.Success)
	if n := len(h.fw.Holes()); n != 3 {
		t.Fatalf("pinholes before: %d, want 3", n)
	}
	// A's device swapped while pcpd is down: A removed, its prefixes C's.
	own.mu.Lock()
	delete(own.owners, ownerA)
	own.owners["static:c"] = []netip.Prefix{netip.MustParsePrefix("2001:db8:a::/48"), netip.MustParsePrefix("10.0.0.0/28")}
	own.mu.Unlock()
	var installed atomic.Int64
	var seen []pinhole.Pinhole
	h.fw.FailApply = func(ops []pinhole.Op) error {
		for _, op := range ops {
			if op.Kind != pinhole.Delete && (op.Pinhole.InternalAddr == addrA || op.Pinhole.InternalAddr == v4A) {
				installed.Add(1)
				seen = append(seen, op.Pinhole)
			}
		}
		return nil
	}
	h.start()
	h.fw.FailApply = nil
	if installed.Load() > 0 {
		t.Errorf("the start installed the unowned leases' pinholes: %v", seen)
	}
	for _, l := range h.s.Leases() {
		if l.Owner == ownerA {
			t.Errorf("unowned lease restored into the table: %v", l.Key)
		}
	}
	for k := range h.st.Leases() {
		if k.Owner == ownerA {
			t.Errorf("unowned lease kept in the store: %v", k)
		}
	}
	hs := h.fw.Holes()
	if _, ok := hs[hole(6, addrB, 443, addrB, 443)]; !ok || len(hs) != 1 {
		t.Errorf("pinholes after the start %v, want B's alone", hs)
	}
	if n := len(h.logs.FilterMessage("revoked: address no longer owned by the client").All()); n != 2 {
		t.Errorf("%d revocation log lines, want 2: %v", n, h.logs.All())
	}
	if v := counterValue(t, h.s.m.revocations.WithLabelValues("ownership")); v != 2 {
		t.Errorf(`pcpd_revocations_total{cause="ownership"} = %v, want 2`, v)
	}
	if v := counterValue(t, h.s.m.revocations.WithLabelValues("policy")); v != 0 {
		t.Errorf(`pcpd_revocations_total{cause="policy"} = %v, want 0`, v)
	}
	if n := len(h.s.upd.q); n != 1 || h.s.upd.q[0].key.Owner != ownerA {
		t.Errorf("updates queued %d, want the PCP MAP's (NAT-PMP has none)", n)
	}
	// The new owner maps the same port: granted, in its name.
	h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 443, 0, time.Hour, 2)), pcp.Success)
	if _, ok := h.lease("static:c", 6, addrA, 443); !ok {
		t.Errorf("the new owner's MAP not stored: %v", h.st.Leases())
	}
}

// lossOwnership answers as before until lost is set, then as after: the
// sweep tests' leases, owned when the start restores them and lost before
// Serve's sweep runs (a start revokes what is unowned already:
// restoring.owned).
type lossOwnership struct {
	before, after policy.Ownership
	lost          atomic.Bool
}

func (o *lossOwnership) now() policy.Ownership {
	if o.lost.Load() {
		return o.after
	}
	return o.before
}

func (o *lossOwnership) Lookup(a netip.Addr) (policy.Owner, bool) { return o.now().Lookup(a) }
func (o *lossOwnership) Owners() []policy.Owner                   { return o.now().Owners() }

// BenchmarkRestoreOwned is what the start's ownership check
// (restoring.owned) costs a stored lease, on 1 000 000 leases
// (startLeases: one address each, so a Lookup each) against a static
// ownership of 1 client, and of 7 813 clients (a /121 each, 128 leases on
// it: a WireGuard server's peers), all owned.
//
//	go test ./server -run '^$' -bench RestoreOwned
func BenchmarkRestoreOwned(b *testing.B) {
	const n = 1_000_000
	ls := startLeases(n, time.Now())
	for _, clients := range []int{1, (n + 127) >> 7} {
		m := map[string][]netip.Prefix{}
		if clients == 1 {
			m["bench"] = []netip.Prefix{netip.MustParsePrefix("2001:db8::/32")}
		} else {
			for i := range ls {
				c := "c" + itoa(i>>7)
				if i&127 == 0 {
					m[c] = []netip.Prefix{netip.PrefixFrom(ls[i].InternalAddr, 121)}
				}
				ls[i].Owner = "static:" + c
			}
		}
		own, err := policy.NewStatic(m)
		if err != nil {
			b.Fatal(err)
		}
		b.Run("clients="+itoa(clients), func(b *testing.B) {
			r := &restoring{own: own}
			for b.Loop() {
				r.last = netip.Addr{}
				for i := range ls {
					if !r.owned(&ls[i]) {
						b.Fatalf("lease %d not owned", i)
					}
				}
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*n), "ns/lease")
		})
	}
}
