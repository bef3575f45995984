package server

import (
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/policy"
	"github.com/pcpd/pcpd/server/servertest"
	"github.com/pcpd/pcpd/store"
)

var (
	wide6   = netip.MustParsePrefix("2001:db8:5::/48")
	narrow6 = netip.MustParsePrefix("2001:db8:5:1::/64")
	other6  = netip.MustParsePrefix("2001:db8:6::/48")
)

func filteredMap(port uint16, fs ...pcp.Filter) *pcp.Request {
	r := mapReq(addrA, pcp.ProtoTCP, port, 0, time.Hour, 1)
	r.Options.Filters = fs
	return r
}

// TestFilterCovered: a filter another one of the lease covers (broader or
// equal prefix, same port or any) gets no kernel element; filters that
// only partly share remotes keep theirs.
func TestFilterCovered(t *testing.T) {
	f := func(p netip.Prefix, port uint16) store.Filter { return store.Filter{Prefix: p, Port: port} }
	for _, tc := range []struct {
		name string
		fs   []store.Filter
		want []bool // covered, per filter
	}{
		{"nested, same port", []store.Filter{f(wide6, 0), f(narrow6, 0)}, []bool{false, true}},
		{"nested, narrower first", []store.Filter{f(narrow6, 80), f(wide6, 80)}, []bool{true, false}},
		{"broader any port", []store.Filter{f(narrow6, 80), f(wide6, 0)}, []bool{true, false}},
		{"broader one port, narrower any", []store.Filter{f(wide6, 80), f(narrow6, 0)}, []bool{false, false}},
		{"nested, other ports", []store.Filter{f(wide6, 80), f(narrow6, 443)}, []bool{false, false}},
		{"disjoint", []store.Filter{f(wide6, 0), f(other6, 0)}, []bool{false, false}},
		{"equal, first stays", []store.Filter{f(wide6, 80), f(wide6, 80)}, []bool{false, true}},
		{"same prefix, port and any", []store.Filter{f(wide6, 80), f(wide6, 0)}, []bool{true, false}},
		{"IPv4", []store.Filter{f(netip.MustParsePrefix("192.0.2.0/24"), 0), f(netip.MustParsePrefix("192.0.2.128/25"), 0)}, []bool{false, true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for i := range tc.fs {
				if got := filterCovered(tc.fs, i); got != tc.want[i] {
					t.Errorf("filter %d (%v): covered %v, want %v", i, tc.fs[i], got, tc.want[i])
				}
			}
		})
	}
}

// TestNestedFiltersOneElement: a MAP whose FILTERs nest is granted with
// both FILTERs echoed and stored (FLT-04), but only the broader one
// becomes a kernel element; adding the narrower one to an existing
// mapping by a renewal changes nothing in the kernel.
func TestNestedFiltersOneElement(t *testing.T) {
	h := newHarness(t)
	resp := h.do(filteredMap(443, pcp.Filter{Remote: wide6}, pcp.Filter{Remote: narrow6}))
	h.expect(resp, pcp.Success)
	if n := len(resp.Options.Filters); n != 2 {
		t.Errorf("reply echoes %d FILTERs, want 2", n)
	}
	l, ok := h.lease(ownerA, 6, addrA, 443)
	if !ok || len(l.Filters) != 2 {
		t.Fatalf("stored lease %+v (%v), want both filters", l, ok)
	}
	want := hole(6, addrA, 443, addrA, 443)
	want.RemotePrefix = wide6
	holes := h.fw.Holes()
	if _, ok := holes[want]; !ok || len(holes) != 1 {
		t.Fatalf("pinholes %v, want only %v", holes, want)
	}
	// A renewal adding the narrower filter to a mapping with the broader.
	h.expect(h.do(filteredMap(80, pcp.Filter{Remote: wide6})), pcp.Success)
	h.expect(h.do(filteredMap(80, pcp.Filter{Remote: narrow6})), pcp.Success)
	if l, _ := h.lease(ownerA, 6, addrA, 80); len(l.Filters) != 2 {
		t.Errorf("renewed lease filters %v, want both", l.Filters)
	}
	if n := len(h.fw.Holes()); n != 2 {
		t.Errorf("%d pinholes after the renewal, want 2 (one per mapping): %v", n, h.fw.Holes())
	}
}

// TestRetryKernelFirst: after a failed batch, each request is retried
// alone with the kernel first and the store second, so a request the
// kernel refuses again costs no store commit (nor a write-back).
func TestRetryKernelFirst(t *testing.T) {
	h := newHarness(t)
	h.fw.FailApply = failOnPinhole(hole(6, addrA, 22, addrA, 22))
	var commits atomic.Int32
	h.st.FailCommit = func([]store.Lease, []store.Key) error { commits.Add(1); return nil }
	replies := h.s.HandleBatch(batchOf(
		mapReq(addrA, pcp.ProtoTCP, 22, 0, time.Hour, 1),
		mapReq(addrA, pcp.ProtoTCP, 443, 0, time.Hour, 1),
	))
	h.fw.FailApply, h.st.FailCommit = nil, nil
	for i, want := range []pcp.ResultCode{pcp.NoResources, pcp.Success} {
		var resp pcp.Response
		if err := pcp.ParseResponse(replies[i], &resp); err != nil || resp.Result != want {
			t.Fatalf("reply %d: %v %v, want %v", i, resp.Result, err, want)
		}
	}
	// The batch (1) and its write-back (1), then only the good retry (1).
	if n := commits.Load(); n != 3 {
		t.Errorf("%d store commits, want 3 (batch, its write-back, the good retry)", n)
	}
	if _, ok := h.lease(ownerA, 6, addrA, 22); ok {
		t.Error("the refused request's lease is stored")
	}
}

// TestNestedFiltersKernel: on the real kernel, a MAP whose FILTERs nest
// is granted (the kernel's concatenated-range set refuses nested
// elements: it was NO_RESOURCES) and holds one element, the broader one.
func TestNestedFiltersKernel(t *testing.T) {
	netlab.RequireRoot(t)
	ns := netlab.NewNS(t, "fltnest")
	conn, err := ns.NftConn()
	if err != nil {
		t.Fatal(err)
	}
	fw, err := pinhole.New(conn, pinhole.Config{})
	if err != nil {
		t.Fatal(err)
	}
	own, err := policy.NewStatic(map[string][]netip.Prefix{"a": {netip.MustParsePrefix("2001:db8:a::/48")}})
	if err != nil {
		t.Fatal(err)
	}
	pol, err := policy.New(policy.Config{}, own)
	if err != nil {
		t.Fatal(err)
	}
	st := servertest.NewStore()
	s, err := New(Config{Interfaces: []string{"lo"}}, Deps{Firewall: fw, Store: st, State: st.State(), Policy: pol}, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	r := filteredMap(443, pcp.Filter{Remote: wide6}, pcp.Filter{Remote: narrow6, RemotePort: 0})
	out := s.Handle(local6, netip.AddrPortFrom(addrA, 40000), pcp.AppendRequest(nil, r))
	var resp pcp.Response
	if err := pcp.ParseResponse(out, &resp); err != nil {
		t.Fatal(err)
	}
	if resp.Result != pcp.Success {
		t.Fatalf("MAP with nested FILTERs: %v, want SUCCESS", resp.Result)
	}
	es, err := fw.List()
	if err != nil {
		t.Fatal(err)
	}
	if len(es) != 1 || es[0].Pinhole.RemotePrefix != wide6 {
		t.Fatalf("kernel holds %+v, want one element for %v", es, wide6)
	}
	// Narrower filter first, broader second: the same one element.
	r = filteredMap(80, pcp.Filter{Remote: narrow6, RemotePort: 8080}, pcp.Filter{Remote: wide6})
	out = s.Handle(local6, netip.AddrPortFrom(addrA, 40000), pcp.AppendRequest(nil, r))
	if err := pcp.ParseResponse(out, &resp); err != nil || resp.Result != pcp.Success {
		t.Fatalf("MAP with nested FILTERs, narrower first: %v %v", resp.Result, err)
	}
	if es, _ := fw.List(); len(es) != 2 {
		t.Errorf("kernel holds %+v, want two elements (one per mapping)", es)
	}
}
