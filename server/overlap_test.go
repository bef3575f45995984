package server

import (
	"net/netip"
	"slices"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/policy"
	"github.com/pcpd/pcpd/server/servertest"
)

// overlapBed is a server on the real kernel (a namespace of its own)
// whose store survives restarts, with clients a (2001:db8:a::/48) and b
// (2001:db8:b::/48).
type overlapBed struct {
	t   *testing.T
	ns  *netlab.NS
	fw  *pinhole.Backend
	st  *servertest.Store
	pol *policy.Policy
	s   *Server
}

func newOverlapBed(t *testing.T, name string, pcfg policy.Config) *overlapBed {
	netlab.RequireRoot(t)
	b := &overlapBed{t: t, ns: netlab.NewNS(t, name), st: servertest.NewStore()}
	conn, err := b.ns.NftConn()
	if err != nil {
		t.Fatal(err)
	}
	if b.fw, err = pinhole.New(conn, pinhole.Config{}); err != nil {
		t.Fatal(err)
	}
	own, err := policy.NewStatic(map[string][]netip.Prefix{
		"a": {netip.MustParsePrefix("2001:db8:a::/48")}, "b": {netip.MustParsePrefix("2001:db8:b::/48")},
	})
	if err != nil {
		t.Fatal(err)
	}
	if b.pol, err = policy.New(pcfg, own); err != nil {
		t.Fatal(err)
	}
	b.start()
	return b
}

// start starts a server (again) on the bed's kernel and store.
func (b *overlapBed) start() {
	b.t.Helper()
	s, err := New(Config{Interfaces: []string{"lo"}}, Deps{Firewall: b.fw, Store: b.st, State: b.st.State(), Policy: b.pol}, zaptest.NewLogger(b.t))
	if err != nil {
		b.t.Fatal(err)
	}
	if err := s.Start(); err != nil {
		b.t.Fatal(err)
	}
	b.s = s
}

// do sends r from its Client IP, source port 40000+port, and returns the
// result.
func (b *overlapBed) do(r *pcp.Request) pcp.ResultCode {
	b.t.Helper()
	out := b.s.Handle(local6, netip.AddrPortFrom(r.ClientAddr, 40000+r.Map.InternalPort), pcp.AppendRequest(nil, r))
	var resp pcp.Response
	if err := pcp.ParseResponse(out, &resp); err != nil {
		b.t.Fatalf("reply % x: %v", out, err)
	}
	return resp.Result
}

// missing lists the live leases' pinholes the kernel lacks.
func (b *overlapBed) missing() (missing []pinhole.Pinhole, want int) {
	b.t.Helper()
	es, err := b.fw.List()
	if err != nil {
		b.t.Fatal(err)
	}
	have := make([]pinhole.Pinhole, len(es))
	for i, e := range es {
		have[i] = e.Pinhole
	}
	var all []pinhole.Pinhole
	for _, l := range b.s.Leases() {
		all = appendPinholes(all, &l)
	}
	all = slices.Compact(all)
	for _, p := range all {
		if !slices.Contains(have, p) {
			missing = append(missing, p)
		}
	}
	return missing, len(all)
}

// heldAt lists the kernel's elements for client a's port.
func (b *overlapBed) heldAt(port uint16) []pinhole.Pinhole {
	b.t.Helper()
	es, err := b.fw.List()
	if err != nil {
		b.t.Fatal(err)
	}
	var got []pinhole.Pinhole
	for _, e := range es {
		if e.Pinhole.InternalPort == port && e.Pinhole.InternalAddr == addrA {
			got = append(got, e.Pinhole)
		}
	}
	return got
}

// TestFilterPeerOverlapReinstall (issue 9, h/hunt): a client cannot hold
// two elements of one address that the kernel takes in one order only
// (pinhole.Conflicts), whichever it asks for first. Before, a PEER to
// [2001:db8:5::]:4000 then a MAP with FILTER 2001:db8:5::/48 on the same
// port were both granted; once the PEER was renewed, every re-install of
// all leases met them in the refused order: after `nft delete table inet
// pcpd` the repair put back none of the 41 pinholes (client b's 40
// included), at every retry, and a start on the empty kernel dropped the
// PEER and reset the epoch for every client. The all-ports row is the
// same through an all-ports MAP's element spanning every port.
func TestFilterPeerOverlapReinstall(t *testing.T) {
	for _, tc := range []struct {
		name  string
		pcfg  policy.Config
		first *pcp.Request // granted
		then  *pcp.Request // refused now: NO_RESOURCES
		renew *pcp.Request // the first renewed (granted)
	}{
		{
			name:  "PEER then FILTER",
			first: peerReq(addrA, pcp.ProtoTCP, 443, netip.MustParseAddrPort("[2001:db8:5::]:4000"), time.Hour, 1),
			then:  filteredMap(443, pcp.Filter{Remote: wide6}),
			renew: peerReq(addrA, pcp.ProtoTCP, 443, netip.MustParseAddrPort("[2001:db8:5::]:4000"), 2*time.Hour, 1),
		},
		{
			name:  "FILTER then PEER",
			first: filteredMap(443, pcp.Filter{Remote: wide6}),
			then:  peerReq(addrA, pcp.ProtoTCP, 443, netip.MustParseAddrPort("[2001:db8:5::]:4000"), time.Hour, 1),
			renew: filteredMap(443, pcp.Filter{Remote: wide6}),
		},
		{
			name:  "one port then all ports",
			pcfg:  policy.Config{AllowAllPorts: true},
			first: filteredMap(443, pcp.Filter{Remote: netip.MustParsePrefix("2001:db8:5::/64"), RemotePort: 80}),
			then:  filteredMap(0, pcp.Filter{Remote: wide6}),
			renew: func() *pcp.Request {
				r := filteredMap(443, pcp.Filter{Remote: netip.MustParsePrefix("2001:db8:5::/64"), RemotePort: 80})
				r.Lifetime = 2 * time.Hour
				return r
			}(),
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := newOverlapBed(t, "ovl", tc.pcfg)
			for i := range 40 {
				r := mapReq(addrB.Next(), pcp.ProtoTCP, uint16(1000+i), 0, time.Hour, 1)
				if got := b.do(r); got != pcp.Success {
					t.Fatalf("client b's MAP %d: %v", i, got)
				}
			}
			// A lease to free, so the next one takes a slot before the
			// first's.
			if got := b.do(mapReq(addrA, pcp.ProtoTCP, 22, 0, time.Hour, 1)); got != pcp.Success {
				t.Fatalf("MAP 22: %v", got)
			}
			if got := b.do(tc.first); got != pcp.Success {
				t.Fatalf("first: %v, want SUCCESS", got)
			}
			b.do(mapReq(addrA, pcp.ProtoTCP, 22, 0, 0, 1))
			if got := b.do(tc.then); got != pcp.NoResources {
				t.Errorf("second, overlapping the first in part: %v, want NO_RESOURCES", got)
			}
			if got := b.do(tc.renew); got != pcp.Success {
				t.Errorf("the first renewed: %v, want SUCCESS", got)
			}
			if m, n := b.missing(); len(m) != 0 {
				t.Fatalf("before the damage the kernel lacks %d of %d pinholes: %v", len(m), n, m)
			}
			b.ns.MustRun(t, "nft", "delete", "table", "inet", "pcpd")
			b.s.checkFirewall()
			if m, n := b.missing(); len(m) != 0 {
				t.Errorf("after the table was deleted and repaired the kernel lacks %d of %d pinholes: %v", len(m), n, m)
			}
			// A start on an empty kernel (a reboot's) restores every lease
			// and keeps the epoch.
			b.ns.MustRun(t, "nft", "delete", "table", "inet", "pcpd")
			origin, leases := b.st.State().EpochOrigin, len(b.st.Leases())
			b.start()
			if o := b.st.State().EpochOrigin; !o.Equal(origin) {
				t.Errorf("start on an empty kernel reset the epoch (origin %v, was %v)", o, origin)
			}
			if n := len(b.st.Leases()); n != leases {
				t.Errorf("start on an empty kernel kept %d of %d leases", n, leases)
			}
			if m, n := b.missing(); len(m) != 0 {
				t.Errorf("after the start the kernel lacks %d of %d pinholes: %v", len(m), n, m)
			}
		})
	}
}

// TestFilterNarrowedKernel (h/hunt): replacing a mapping's FILTER by one
// inside it (FLT-03's [0, new]) is granted and leaves the new element
// alone in the kernel. Before, the new element went in before the old
// one's delete (Apply sends a phase's adds first), inside it: the kernel
// refused it and the client got NO_RESOURCES for a legitimate request.
func TestFilterNarrowedKernel(t *testing.T) {
	b := newOverlapBed(t, "narrow", policy.Config{})
	pf := netip.MustParsePrefix
	for i, tc := range []struct {
		name     string
		from, to pcp.Filter
	}{
		{"/48 to a /64 inside", pcp.Filter{Remote: wide6}, pcp.Filter{Remote: narrow6}},
		{"/48 to its first /64", pcp.Filter{Remote: wide6}, pcp.Filter{Remote: pf("2001:db8:5::/64")}},
		{"any port to one", pcp.Filter{Remote: wide6}, pcp.Filter{Remote: wide6, RemotePort: 80}},
		{"/64 to the /48 around it", pcp.Filter{Remote: narrow6}, pcp.Filter{Remote: wide6}},
	} {
		port := uint16(8000 + i)
		if got := b.do(filteredMap(port, tc.from)); got != pcp.Success {
			t.Fatalf("%s: MAP with FILTER %v: %v", tc.name, tc.from.Remote, got)
		}
		if got := b.do(filteredMap(port, pcp.Filter{}, tc.to)); got != pcp.Success {
			t.Errorf("%s: FILTER replaced by %v/%d: %v, want SUCCESS", tc.name, tc.to.Remote, tc.to.RemotePort, got)
			continue
		}
		want := hole(protoTCP, addrA, port, addrA, port)
		want.RemotePrefix, want.RemotePort = tc.to.Remote, tc.to.RemotePort
		if got := b.heldAt(port); len(got) != 1 || got[0] != want {
			t.Errorf("%s: kernel holds %v for the mapping, want only %v", tc.name, got, want)
		}
	}
}
