package server

import (
	"net/netip"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/policy"
	"github.com/pcpd/pcpd/server/servertest"
	"github.com/pcpd/pcpd/store"
)

// absorbState is what the absorbed-renewal tests look at for lease
// (addrA, TCP, 443): the table's expiry (what the client was told), the
// stored one, the kernel element's, and the dirty mark.
type absorbState struct {
	table, stored, kernel time.Time
	dirty                 bool
	synced                time.Time
}

func (h *harness) absorbState() absorbState {
	h.t.Helper()
	key := store.Key{Owner: ownerA, Protocol: 6, InternalAddr: addrA, InternalPort: 443}
	var st absorbState
	now := h.clock.Now()
	h.s.mu.Lock()
	if l, ok := h.s.tab.get(key); ok {
		st.table = l.Expires
	}
	st.synced, st.dirty = h.s.dirty[key]
	h.s.mu.Unlock()
	if l, ok := h.st.Leases()[key]; ok {
		st.stored = l.Expires
	}
	if d, ok := h.fw.Holes()[hole(6, addrA, 443, addrA, 443)]; ok {
		st.kernel = now.Add(d)
	}
	return st
}

// commits counts the store commits and kernel transactions since the call.
func (h *harness) commits() func() (store, kernel int) {
	s0, k0 := h.st.Commits, h.fw.Applies
	return func() (int, int) { return h.st.Commits - s0, h.fw.Applies - k0 }
}

// TestAbsorbedRenewal: an early renewal of a committed lease with the same
// nonce (MAP, NAT-PMP, PEER) is answered without a store commit or a
// kernel transaction; the flush then brings the kernel element and the
// stored lease to the expiry the client was told. A due renewal (less
// than 5/8 of the grant left in the kernel and store) and a lease the same
// batch created are written through.
func TestAbsorbedRenewal(t *testing.T) {
	const grant = time.Hour
	for _, tc := range []struct {
		name    string
		after   time.Duration // from the first request to the renewal
		absorb  bool
		request func(h *harness) // the renewal; the first request is the same with nonce 1
	}{
		{"early MAP renewal", time.Minute, true, func(h *harness) {
			h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 443, 443, grant, 1)), pcp.Success)
		}},
		{"due MAP renewal (3/8 of the grant passed)", grant*3/8 + time.Second, false, func(h *harness) {
			h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 443, 443, grant, 1)), pcp.Success)
		}},
		{"MAP replacement with a new nonce, a bare pinhole", time.Minute, true, func(h *harness) {
			h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 443, 443, grant, 2)), pcp.Success)
		}},
		{"shortening MAP renewal", time.Minute, false, func(h *harness) {
			h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 443, 443, grant/2, 1)), pcp.Success)
		}},
		{"MAP renewal from another client port", time.Minute, true, func(h *harness) {
			b := pcp.AppendRequest(nil, mapReq(addrA, pcp.ProtoTCP, 443, 443, grant, 1))
			if out := h.s.Handle(local6, netip.AddrPortFrom(addrA, 40001), b); out == nil || out[3] != 0 {
				t.Fatalf("renewal: % x", out)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t)
			h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 443, 443, grant, 1)), pcp.Success)
			first := h.absorbState()
			h.clock.Advance(tc.after)
			absorbed := counterValue(t, h.s.m.absorbed)
			n := h.commits()
			tc.request(h)
			at := h.clock.Now()
			st := h.absorbState()
			stores, kernels := n()
			if !tc.absorb {
				if st.dirty || stores != 1 || counterValue(t, h.s.m.absorbed) != absorbed {
					t.Fatalf("not absorbable, yet absorbed: dirty %v, %d store commits", st.dirty, stores)
				}
				if !st.stored.Equal(st.table) {
					t.Fatalf("written through: stored expiry %v, table's %v", st.stored, st.table)
				}
				return
			}
			if stores != 0 || kernels != 0 {
				t.Fatalf("absorbed renewal made %d store commits and %d kernel transactions, want none", stores, kernels)
			}
			if got := counterValue(t, h.s.m.absorbed) - absorbed; got != 1 {
				t.Errorf("pcpd_renewals_absorbed_total rose by %v, want 1", got)
			}
			if !st.table.Equal(at.Add(grant)) || !st.dirty || !st.synced.Equal(first.stored) {
				t.Fatalf("table expiry %v (want %v), dirty %v synced %v (want %v)", st.table, at.Add(grant), st.dirty, st.synced, first.stored)
			}
			if !st.stored.Equal(first.stored) || !st.kernel.Equal(first.kernel) {
				t.Fatalf("store %v / kernel %v changed before the flush", st.stored, st.kernel)
			}
			if l := h.s.Leases(); len(l) != 1 || !l[0].Expires.Equal(at.Add(grant)) {
				t.Errorf("pcpd leases shows %+v, want the told expiry %v", l, at.Add(grant))
			}
			h.s.flushDirty("test")
			st = h.absorbState()
			if st.dirty || !st.stored.Equal(at.Add(grant)) || !st.kernel.Equal(at.Add(grant)) {
				t.Fatalf("after the flush: dirty %v, stored %v, kernel %v; want %v", st.dirty, st.stored, st.kernel, at.Add(grant))
			}
		})
	}
}

// TestAbsorbedRenewalKinds: NAT-PMP (which shares mapInbound) and PEER
// renewals are absorbed too, and their flush writes the told expiry.
func TestAbsorbedRenewalKinds(t *testing.T) {
	for _, tc := range []struct {
		name string
		req  func(h *harness)
		key  store.Key
	}{
		{"NAT-PMP", func(h *harness) {
			if r := h.pmp(v4A, pcp.PMPOpMapTCP, 8080, 8080, time.Hour); r.Result != 0 {
				t.Fatalf("%+v", r)
			}
		}, store.Key{Owner: ownerA, Protocol: 6, InternalAddr: v4A, InternalPort: 8080}},
		{"PEER", func(h *harness) {
			h.expect(h.do(peerReq(addrA, pcp.ProtoTCP, 443, remote, time.Hour, 1)), pcp.Success)
		}, store.Key{Owner: ownerA, Protocol: 6, InternalAddr: addrA, InternalPort: 443, Remote: remote}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t)
			tc.req(h)
			h.clock.Advance(time.Minute)
			n := h.commits()
			tc.req(h)
			if stores, kernels := n(); stores != 0 || kernels != 0 {
				t.Fatalf("renewal made %d store commits and %d kernel transactions, want none", stores, kernels)
			}
			want := h.clock.Now().Add(time.Hour)
			h.s.flushDirty("test")
			if l := h.st.Leases()[tc.key]; !l.Expires.Equal(want) {
				t.Errorf("stored expiry after the flush %v, want %v", l.Expires, want)
			}
		})
	}
}

// TestAbsorbSameBatch: a renewal of a lease created in the same batch is
// not absorbed (the lease is not committed: the batch may roll back).
func TestAbsorbSameBatch(t *testing.T) {
	h := newHarness(t)
	b := pcp.AppendRequest(nil, mapReq(addrA, pcp.ProtoTCP, 443, 443, time.Hour, 1))
	src := netip.AddrPortFrom(addrA, 40000)
	out := h.s.HandleBatch([]Request{{Local: local6, Source: src, Data: b}, {Local: local6, Source: src, Data: b}})
	for i, r := range out {
		if r == nil || r[3] != 0 {
			t.Fatalf("reply %d: % x", i, r)
		}
	}
	if st := h.absorbState(); st.dirty || counterValue(t, h.s.m.absorbed) != 0 {
		t.Fatalf("a renewal of a lease staged in its own batch was absorbed (dirty %v)", st.dirty)
	}
	// The store has the lease: a failed commit would have rolled back
	// the creation, and the absorbed renewal with it.
	if _, ok := h.lease(ownerA, 6, addrA, 443); !ok {
		t.Fatal("lease not stored")
	}
}

// TestAbsorbRollback: a write-through of a dirty lease that fails leaves
// it dirty with the same synced expiry and the table at the told expiry;
// a failed flush keeps it dirty and the next one writes it; a delete of a
// dirty lease removes its kernel element.
func TestAbsorbRollback(t *testing.T) {
	setup := func(t *testing.T) (*harness, absorbState) {
		h := newHarness(t)
		h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 443, 443, time.Hour, 1)), pcp.Success)
		h.clock.Advance(time.Minute)
		h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 443, 443, time.Hour, 1)), pcp.Success)
		st := h.absorbState()
		if !st.dirty {
			t.Fatal("renewal not absorbed")
		}
		return h, st
	}
	for _, tc := range []struct {
		name string
		fail func(h *harness) // installs the failure
		act  func(h *harness) // the change that fails
	}{
		{"filter change, kernel fails", func(h *harness) {
			h.fw.FailApply = func([]pinhole.Op) error { return servertest.ErrInjected }
		}, func(h *harness) {
			r := mapReq(addrA, pcp.ProtoTCP, 443, 443, time.Hour, 1)
			r.Options.Filters = append(r.Options.Filters, pcp.Filter{Remote: netip.MustParsePrefix("2001:db8:99::/48")})
			h.expect(h.do(r), pcp.NoResources)
		}},
		{"delete, store fails", func(h *harness) {
			h.st.FailCommit = func([]store.Lease, []store.Key) error { return servertest.ErrInjected }
		}, func(h *harness) {
			h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 443, 0, 0, 1)), pcp.NoResources)
		}},
		{"flush, kernel fails", func(h *harness) {
			h.fw.FailApply = func([]pinhole.Op) error { return servertest.ErrInjected }
		}, func(h *harness) { h.s.flushDirty("test") }},
		{"flush, store fails", func(h *harness) {
			h.st.FailCommit = func([]store.Lease, []store.Key) error { return servertest.ErrInjected }
		}, func(h *harness) { h.s.flushDirty("test") }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h, before := setup(t)
			tc.fail(h)
			tc.act(h)
			h.fw.FailApply, h.st.FailCommit = nil, nil
			after := h.absorbState()
			if !after.dirty || !after.synced.Equal(before.synced) || !after.table.Equal(before.table) {
				t.Fatalf("after the failure: dirty %v synced %v table %v; want dirty, synced %v, table %v",
					after.dirty, after.synced, after.table, before.synced, before.table)
			}
			if !after.kernel.Equal(before.kernel) {
				t.Fatalf("kernel element %v, want the synced %v", after.kernel, before.kernel)
			}
			h.s.flushDirty("test")
			if st := h.absorbState(); st.dirty || !st.stored.Equal(before.table) || !st.kernel.Equal(before.table) {
				t.Fatalf("after the next flush: dirty %v stored %v kernel %v, want %v", st.dirty, st.stored, st.kernel, before.table)
			}
		})
	}
	t.Run("delete of a dirty lease", func(t *testing.T) {
		h, _ := setup(t)
		h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 443, 0, 0, 1)), pcp.Success)
		if st := h.absorbState(); st.dirty || !st.kernel.IsZero() || !st.stored.IsZero() || !st.table.IsZero() {
			t.Fatalf("after the delete: %+v, want nothing left", st)
		}
		n := h.commits()
		h.s.flushDirty("test")
		if s, k := n(); s != 0 || k != 0 {
			t.Errorf("flush after the delete wrote %d commits, %d transactions", s, k)
		}
	})
	t.Run("expiry of a dirty lease", func(t *testing.T) {
		h, before := setup(t)
		h.clock.Advance(before.table.Sub(h.clock.Now()))
		h.s.flushDirty("test") // expires it first
		if st := h.absorbState(); st.dirty || !st.kernel.IsZero() || !st.stored.IsZero() || !st.table.IsZero() {
			t.Fatalf("after expiry: %+v, want nothing left", st)
		}
	})
}

// TestAbsorbCrash: pcpd stops without a flush (a crash); the restored
// lease's expiry still covers 5/8 of the grant from the last renewal, the
// latest time an RFC client renews again (RFC 6887 §11.2.1: at 1/2 to 5/8
// of the lifetime, uniformly at random), and the kernel never holds more
// than the client was told.
func TestAbsorbCrash(t *testing.T) {
	const grant = time.Hour
	h := newHarness(t)
	h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 443, 443, grant, 1)), pcp.Success)
	var last time.Time
	for range 40 { // renewals every minute; the later ones are due
		h.clock.Advance(time.Minute)
		last = h.clock.Now()
		h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 443, 443, grant, 1)), pcp.Success)
		st := h.absorbState()
		if st.kernel.After(st.table) {
			t.Fatalf("kernel element %v outlives the told expiry %v", st.kernel, st.table)
		}
		if st.stored.Before(last.Add(grant * 5 / 8)) {
			t.Fatalf("at %v the store holds %v: a crash now loses the lease before the client's next renewal (as late as %v)",
				last, st.stored, last.Add(grant*5/8))
		}
	}
	h.start() // no Close, no flush: a crash
	l, ok := h.s.tab.get(store.Key{Owner: ownerA, Protocol: 6, InternalAddr: addrA, InternalPort: 443})
	if !ok || l.Expires.Before(last.Add(grant*5/8)) {
		t.Fatalf("restored lease %+v, want an expiry ≥ %v", l, last.Add(grant*5/8))
	}
}

// TestAbsorbSharedElement: a lease written through next to a dirty lease
// sharing its kernel element (a PEER and a filtered MAP) computes the
// element's timeout from what the kernel holds for the dirty one, so the
// element never lapses before the new lease's expiry.
func TestAbsorbSharedElement(t *testing.T) {
	h := newHarness(t)
	filtered := mapReq(addrA, pcp.ProtoTCP, 443, 443, time.Hour, 2)
	filtered.Options.Filters = append(filtered.Options.Filters, pcp.Filter{Remote: netip.PrefixFrom(remote.Addr(), 128), RemotePort: remote.Port()})
	h.expect(h.do(filtered), pcp.Success)
	h.clock.Advance(time.Minute)
	h.expect(h.do(filtered), pcp.Success) // absorbed: kernel at 60 min, table at 61
	if st := h.absorbState(); !st.dirty {
		t.Fatal("renewal not absorbed")
	}
	// A PEER on the element, ending between the two.
	peer := peerReq(addrA, pcp.ProtoTCP, 443, remote, time.Hour-30*time.Second, 1)
	h.expect(h.do(peer), pcp.Success)
	want := h.clock.Now().Add(time.Hour - 30*time.Second)
	p := pinhole.Pinhole{Protocol: 6, InternalAddr: addrA, InternalPort: 443, ExternalAddr: addrA, ExternalPort: 443,
		RemotePrefix: netip.PrefixFrom(remote.Addr(), 128), RemotePort: remote.Port()}
	d, ok := h.fw.Holes()[p]
	if !ok || h.clock.Now().Add(d).Before(want) {
		t.Fatalf("shared element ends at %v, before the PEER's expiry %v", h.clock.Now().Add(d), want)
	}
	h.s.flushDirty("test")
	if d := h.fw.Holes()[p]; d != time.Hour {
		t.Errorf("after the flush the element has %v, want the MAP's told hour", d)
	}
}

// TestFlushDue: a dirty lease is written when its synced expiry comes
// within flushLead, not before (nothing depends on the write until then),
// and only those: a lease made later stays dirty until its own deadline.
// Due leases are written at most flushChunk a step, and flushDue says
// when more are due. Beyond maxDirty dirty leases, renewals are written
// through.
func TestFlushDue(t *testing.T) {
	const grant = time.Hour
	defer func(c, m int) { flushChunk, maxDirty = c, m }(flushChunk, maxDirty)
	flushChunk, maxDirty = 3, 5
	h := newHarness(t)
	early, late := []uint16{441, 442, 443, 444}, []uint16{450, 451}
	for _, p := range early {
		h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, p, p, grant, 1)), pcp.Success)
	}
	synced := h.absorbState().stored // port 443's, as every early lease's
	h.clock.Advance(10 * time.Minute)
	for _, p := range late {
		h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, p, p, grant, 1)), pcp.Success)
	}
	h.clock.Advance(time.Second)
	n := h.commits()
	for _, p := range append(early, late...) { // 451 last: the one over maxDirty
		h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, p, p, grant, 1)), pcp.Success)
	}
	if stores, _ := n(); stores != 1 || len(h.s.dirty) != maxDirty {
		t.Fatalf("6 renewals with room for %d dirty: %d store commits, %d dirty; want 1 written through, %d dirty",
			maxDirty, stores, len(h.s.dirty), maxDirty)
	}
	told := h.clock.Now().Add(grant)
	if st := h.absorbState(); !st.dirty || !st.table.Equal(told) {
		t.Fatalf("port 443: dirty %v, table expiry %v; want absorbed, %v", st.dirty, st.table, told)
	}
	step := func(wantMore bool, wantStores, wantDirty int) {
		t.Helper()
		n := h.commits()
		if more := h.s.flushDue(); more != wantMore {
			t.Fatalf("flushDue: more %v, want %v", more, wantMore)
		}
		if stores, _ := n(); stores != wantStores || len(h.s.dirty) != wantDirty {
			t.Fatalf("flush step: %d store commits, %d left dirty; want %d, %d", stores, len(h.s.dirty), wantStores, wantDirty)
		}
	}

	// Not due: the synced expiry is more than flushLead away.
	h.clock.Advance(synced.Sub(h.clock.Now()) - flushLead - time.Millisecond)
	step(false, 0, maxDirty)
	// The 4 early leases are due: a step of flushChunk (3), then one of
	// the last; 450 is not due and stays dirty.
	h.clock.Advance(2 * time.Millisecond)
	step(true, 1, maxDirty-flushChunk)
	step(false, 1, 1)
	if _, ok := h.s.dirty[store.Key{Owner: ownerA, Protocol: 6, InternalAddr: addrA, InternalPort: 450}]; !ok {
		t.Fatal("the lease not yet due was written")
	}
	if st := h.absorbState(); st.dirty || !st.stored.Equal(told) || !st.kernel.Equal(told) {
		t.Fatalf("after the steps: dirty %v, stored %v, kernel %v; want %v", st.dirty, st.stored, st.kernel, told)
	}
	step(false, 0, 1)
	// 450's deadline, 10 minutes later.
	h.clock.Advance(10 * time.Minute)
	step(false, 1, 0)
	step(false, 0, 0)
}

// TestAbsorbBatchRetry: a renewal absorbed in a batch whose commit fails
// (another request's change) keeps its SUCCESS: it never depended on the
// commit, and the table keeps what it was told. Handled again alone, at a
// later time, it could find its lease due and be written through, and a
// failure then answered it NO_RESOURCES while the table kept the first
// pass's expiry: a state change on an error (HDR-06).
func TestAbsorbBatchRetry(t *testing.T) {
	const grant = time.Hour
	h := newHarness(t)
	h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 443, 443, grant, 1)), pcp.Success)
	before := h.absorbState()
	// Just absorbable: the synced expiry is absorbLeft(grant) + 50 ms away.
	h.clock.Advance(grant - absorbLeft(grant) - 50*time.Millisecond)
	told := h.clock.Now().Add(grant)
	// The kernel fails from now on, and the failed transaction takes
	// 100 ms: a retry alone finds the lease due.
	h.fw.FailApply = func([]pinhole.Op) error {
		h.clock.Advance(100 * time.Millisecond)
		return servertest.ErrInjected
	}
	renew := pcp.AppendRequest(nil, mapReq(addrA, pcp.ProtoTCP, 443, 443, grant, 1))
	other := pcp.AppendRequest(nil, mapReq(addrB, pcp.ProtoTCP, 80, 80, grant, 1))
	out := h.s.HandleBatch([]Request{
		{Local: local6, Source: netip.AddrPortFrom(addrA, 40000), Data: renew},
		{Local: local6, Source: netip.AddrPortFrom(addrB, 40000), Data: other},
	})
	var r0, r1 pcp.Response
	if err := pcp.ParseResponse(out[0], &r0); err != nil {
		t.Fatal(err)
	}
	if err := pcp.ParseResponse(out[1], &r1); err != nil {
		t.Fatal(err)
	}
	if r1.Result != pcp.NoResources {
		t.Fatalf("the failing request: %v, want NO_RESOURCES", r1.Result)
	}
	h.fw.FailApply = nil
	st := h.absorbState()
	switch {
	case r0.Result == pcp.Success:
		if !st.table.Equal(told) || !st.dirty || !st.synced.Equal(before.stored) {
			t.Fatalf("renewal answered SUCCESS: table %v (want %v), dirty %v synced %v (want %v)", st.table, told, st.dirty, st.synced, before.stored)
		}
	case !st.table.Equal(before.table) || st.dirty:
		t.Fatalf("renewal answered %v, yet the table's expiry moved %v → %v (dirty %v): HDR-06", r0.Result, before.table, st.table, st.dirty)
	}
	h.s.flushDirty("test")
	if st := h.absorbState(); st.dirty || !st.stored.Equal(st.table) || !st.kernel.Equal(st.table) {
		t.Fatalf("after the flush: %+v", st)
	}
}

// TestAbsorbedReplacement: a replacement (the owner's new nonce, choice
// (c)) is absorbed only where a replacement after a crash would end the
// same: a plain pinhole with no FILTER and no DESCRIPTION, lenient
// nonces. The flush then stores the new nonce. Filtered, described and
// NAPT mappings are written through; strict nonces refuse it (MAP-14).
func TestAbsorbedReplacement(t *testing.T) {
	filtered := func(r *pcp.Request) *pcp.Request {
		r.Options.Filters = []pcp.Filter{{Remote: netip.MustParsePrefix("2001:db8:99::/48")}}
		return r
	}
	described := func(r *pcp.Request) *pcp.Request {
		r.Options.HasDescription, r.Options.Description = true, []byte("web")
		return r
	}
	same := func(r *pcp.Request) *pcp.Request { return r }
	for _, tc := range []struct {
		name   string
		client netip.Addr
		with   func(*pcp.Request) *pcp.Request // both requests
		strict bool
		code   pcp.ResultCode
		absorb bool
	}{
		{"bare IPv6 pinhole", addrA, same, false, pcp.Success, true},
		{"with FILTER", addrA, filtered, false, pcp.Success, false},
		{"with DESCRIPTION", addrA, described, false, pcp.Success, false},
		{"IPv4 NAPT mapping", v4A, same, false, pcp.Success, false},
		{"strict nonces", addrA, same, true, pcp.NotAuthorized, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, func(c *Config, _ *policy.Config) { c.StrictNonce = tc.strict })
			key := store.Key{Owner: ownerA, Protocol: 6, InternalAddr: tc.client, InternalPort: 443}
			h.expect(h.do(tc.with(mapReq(tc.client, pcp.ProtoTCP, 443, 443, time.Hour, 1))), pcp.Success)
			h.clock.Advance(time.Minute)
			n := h.commits()
			h.expect(h.do(tc.with(mapReq(tc.client, pcp.ProtoTCP, 443, 443, time.Hour, 2))), tc.code)
			stores, kernels := n()
			_, dirty := h.s.dirty[key]
			written := stores > 0 || kernels > 0
			if tc.absorb != dirty || written != (!tc.absorb && tc.code == pcp.Success) {
				t.Fatalf("absorbed: want %v; dirty %v, %d store commits, %d kernel transactions", tc.absorb, dirty, stores, kernels)
			}
			if tc.code != pcp.Success {
				return
			}
			h.s.flushDirty("test")
			if l := h.st.Leases()[key]; l.Nonce != (pcp.Nonce{2}) || !l.Created.Equal(h.clock.Now()) && tc.absorb {
				t.Fatalf("stored after the flush: nonce %x created %v; want the replacement's", l.Nonce, l.Created)
			}
		})
	}
}

// TestAbsorbClientPort: a renewal from another source port of the same
// client address (a new socket; pcpload's open loop after its prefill,
// BENCHMARKS.md item 61) is absorbed: the table takes the new port at
// once, the store keeps the old one and the synced expiry until the
// flush, which writes both; after a crash before the flush the lease is
// restored whole with the old port and an expiry that covers the client's
// next renewal (absorb.go). A renewal from another client address (a
// third party's, same owner) is still written through. Fails before
// item 61's change: the new port was written through.
func TestAbsorbClientPort(t *testing.T) {
	const grant = time.Hour
	key := store.Key{Owner: ownerA, Protocol: 6, InternalAddr: addrA, InternalPort: 443}
	renew := func(h *harness, port uint16) {
		h.t.Helper()
		b := pcp.AppendRequest(nil, mapReq(addrA, pcp.ProtoTCP, 443, 443, grant, 1))
		if out := h.s.Handle(local6, netip.AddrPortFrom(addrA, port), b); out == nil || out[3] != 0 {
			h.t.Fatalf("renewal from port %d: % x", port, out)
		}
	}
	setup := func(t *testing.T) (*harness, time.Time) {
		h := newHarness(t)
		h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 443, 443, grant, 1)), pcp.Success) // from port 40000
		first := h.st.Leases()[key]
		h.clock.Advance(time.Minute)
		n := h.commits()
		renew(h, 40001)
		if stores, kernels := n(); stores != 0 || kernels != 0 {
			t.Fatalf("renewal from a new port made %d store commits and %d kernel transactions, want none", stores, kernels)
		}
		h.s.mu.Lock()
		l, _ := h.s.tab.get(key)
		synced, dirty := h.s.dirty[key]
		h.s.mu.Unlock()
		if l.ClientAddr != netip.AddrPortFrom(addrA, 40001) || !l.Expires.Equal(h.clock.Now().Add(grant)) {
			t.Fatalf("table holds client %v expiry %v, want [%v]:40001, %v", l.ClientAddr, l.Expires, addrA, h.clock.Now().Add(grant))
		}
		if !dirty || !synced.Equal(first.Expires) {
			t.Fatalf("dirty %v synced %v, want dirty with %v", dirty, synced, first.Expires)
		}
		if st := h.st.Leases()[key]; st.ClientAddr.Port() != 40000 || !st.Expires.Equal(first.Expires) {
			t.Fatalf("store changed before the flush: %v, %v", st.ClientAddr, st.Expires)
		}
		return h, first.Expires
	}
	t.Run("flush writes the port", func(t *testing.T) {
		h, _ := setup(t)
		told := h.clock.Now().Add(grant)
		h.s.flushDirty("test")
		if st := h.st.Leases()[key]; st.ClientAddr != netip.AddrPortFrom(addrA, 40001) || !st.Expires.Equal(told) {
			t.Fatalf("stored after the flush: %v, %v; want [%v]:40001, %v", st.ClientAddr, st.Expires, addrA, told)
		}
	})
	t.Run("crash before the flush", func(t *testing.T) {
		h, _ := setup(t)
		last := h.clock.Now()
		h.start() // no Close, no flush: a crash
		l, ok := h.s.tab.get(key)
		if !ok || l.Expires.Before(last.Add(grant*5/8)) {
			t.Fatalf("restored lease %+v, want an expiry ≥ %v", l, last.Add(grant*5/8))
		}
		if l.ClientAddr.Addr() != addrA {
			t.Fatalf("restored client %v", l.ClientAddr)
		}
	})
	t.Run("another client address", func(t *testing.T) {
		h := newHarness(t)
		tpKey := store.Key{Owner: ownerA, Protocol: 6, InternalAddr: addrA2, InternalPort: 443}
		r := mapReq(addrA, pcp.ProtoTCP, 443, 443, grant, 1)
		r.Options.ThirdParty = addrA2
		h.expect(h.do(r), pcp.Success)
		h.clock.Advance(time.Minute)
		other := netip.MustParseAddr("2001:db8:a::12")
		r.ClientAddr = other
		n := h.commits()
		h.expect(h.doFrom(other, r), pcp.Success)
		if stores, _ := n(); stores != 1 {
			t.Fatalf("renewal from another client address made %d store commits, want 1 (written through)", stores)
		}
		if st := h.st.Leases()[tpKey]; st.ClientAddr.Addr() != other {
			t.Fatalf("stored client %v, want %v", st.ClientAddr, other)
		}
	})
}
