package pinhole_test

import (
	"errors"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

var (
	c6  = netip.MustParseAddr("2001:db8:1:2::10")
	c6b = netip.MustParseAddr("2001:db8:1:2::11")
	c4  = netip.MustParseAddr("10.100.0.2")
	c4b = netip.MustParseAddr("10.100.0.3")
	pub = netip.MustParseAddr("198.51.100.1")
)

// everyShape has one Pinhole of each layout kind, in canonical form.
var everyShape = []pinhole.Pinhole{
	{Protocol: tcp, InternalAddr: c6, InternalPort: 22, ExternalAddr: c6, ExternalPort: 22},
	{Protocol: udp, InternalAddr: c6, ExternalAddr: c6},
	{InternalAddr: c6b, ExternalAddr: c6b},
	{Protocol: tcp, InternalAddr: c6, InternalPort: 25, ExternalAddr: c6, ExternalPort: 25,
		RemotePrefix: netip.MustParsePrefix("2001:db8:5::/48"), RemotePort: 1234},
	{Protocol: 132, InternalAddr: c6, ExternalAddr: c6, RemotePrefix: netip.MustParsePrefix("2001:db8:6::1/128")},
	{InternalAddr: c6, ExternalAddr: c6, RemotePrefix: netip.MustParsePrefix("2001:db8:7::/64")},
	{Protocol: tcp, InternalAddr: c6, InternalPort: 443, ExternalAddr: c6, ExternalPort: 80},
	{Protocol: udp, InternalAddr: c6, InternalPort: 443, ExternalAddr: c6, ExternalPort: 8443,
		RemotePrefix: netip.MustParsePrefix("2001:db8:8::/56")},
	{Protocol: tcp, InternalAddr: c4, InternalPort: 80, ExternalAddr: pub, ExternalPort: 8080},
	{Protocol: udp, InternalAddr: c4, InternalPort: 53, ExternalAddr: pub, ExternalPort: 5353,
		RemotePrefix: netip.MustParsePrefix("203.0.113.0/24"), RemotePort: 53},
}

func sortPinholes(a, b pinhole.Pinhole) int { return strings.Compare(a.String(), b.String()) }

func listPinholes(t *testing.T, b *pinhole.Backend) ([]pinhole.Pinhole, []pinhole.Entry) {
	t.Helper()
	entries, err := b.List()
	if err != nil {
		t.Fatalf("List: %v", err)
	}
	var ps []pinhole.Pinhole
	for _, e := range entries {
		ps = append(ps, e.Pinhole)
	}
	slices.SortFunc(ps, sortPinholes)
	return ps, entries
}

var cmpAddr = cmp.Comparer(func(a, b netip.Addr) bool { return a == b })
var cmpPrefix = cmp.Comparer(func(a, b netip.Prefix) bool { return a == b })
var cmpOdd = pinhole.CmpOdd

// TestListRoundTrip: every shape installed comes back from List unchanged,
// with a remaining time that the kernel is counting down.
func TestListRoundTrip(t *testing.T) {
	ns := netlab.NewNS(t, "list")
	b := newBackend(t, ns, pinhole.Config{})
	var ops []pinhole.Op
	for _, p := range everyShape {
		ops = append(ops, install(p, time.Minute))
	}
	apply(t, b, ops...)
	got, entries := listPinholes(t, b)
	want := slices.Clone(everyShape)
	slices.SortFunc(want, sortPinholes)
	if diff := cmp.Diff(want, got, cmpAddr, cmpPrefix, cmpOdd); diff != "" {
		t.Errorf("List (-want +got):\n%s", diff)
	}
	for _, e := range entries {
		if e.Remaining <= 50*time.Second || e.Remaining > time.Minute {
			t.Errorf("%s: remaining %v, want just under 1m", e.Pinhole, e.Remaining)
		}
	}
	t.Logf("layout with one element of each shape:\n%s", nftList(t, ns, "ruleset"))

	var dels []pinhole.Op
	for _, p := range everyShape {
		dels = append(dels, del(p))
	}
	apply(t, b, dels...)
	if got, _ := listPinholes(t, b); len(got) != 0 {
		t.Errorf("after deleting all: %v", got)
	}
}

// TestSetupIdempotent: Setup twice changes nothing, keeps installed
// pinholes and the protected prefixes, and leaves a Healthy ruleset.
func TestSetupIdempotent(t *testing.T) {
	ns := netlab.NewNS(t, "idem")
	b := newBackend(t, ns, pinhole.Config{})
	// Two adjacent prefixes read back as two (one's end and the other's
	// start share a key in the kernel's dump; the old sort, without the
	// end-first tie-break, happened to pass this too).
	prot := []netip.Prefix{netip.MustParsePrefix("2001:db8:1::/48"), netip.MustParsePrefix("2001:db8:2::/48"),
		netip.MustParsePrefix("10.100.0.0/24")}
	if err := b.SetProtected(prot); err != nil {
		t.Fatal(err)
	}
	apply(t, b, install(everyShape[0], time.Minute), install(everyShape[8], time.Minute))
	before := nftList(t, ns, "ruleset")
	if err := b.Setup(); err != nil {
		t.Fatalf("second Setup: %v", err)
	}
	// A fresh Backend, as after a daemon restart, also only confirms.
	conn, err := ns.NftConn()
	if err != nil {
		t.Fatal(err)
	}
	b2, err := pinhole.New(conn, pinhole.Config{})
	if err != nil {
		t.Fatal(err)
	}
	if err := b2.Setup(); err != nil {
		t.Fatalf("Setup after restart: %v", err)
	}
	after := nftList(t, ns, "ruleset")
	strip := func(s string) string { // expiry counts down between listings
		var out []string
		for _, l := range strings.Split(s, "\n") {
			if i := strings.Index(l, " expires "); i >= 0 {
				l = l[:i]
			}
			out = append(out, l)
		}
		return strings.Join(out, "\n")
	}
	if diff := cmp.Diff(strip(before), strip(after)); diff != "" {
		t.Errorf("ruleset changed by repeated Setup (-before +after):\n%s", diff)
	}
	if err := b2.Healthy(); err != nil {
		t.Errorf("Healthy: %v", err)
	}
	got, _ := listPinholes(t, b2)
	if len(got) != 2 {
		t.Errorf("pinholes after restart Setup: %v", got)
	}
	gotProt, err := b2.Protected()
	if err != nil {
		t.Fatal(err)
	}
	slices.SortFunc(gotProt, func(a, b netip.Prefix) int { return a.Addr().Compare(b.Addr()) })
	slices.SortFunc(prot, func(a, b netip.Prefix) int { return a.Addr().Compare(b.Addr()) })
	if diff := cmp.Diff(prot, gotProt, cmpPrefix); diff != "" {
		t.Errorf("Protected (-want +got):\n%s", diff)
	}
}

// TestApplyNamesFailingOp: a batch with a bad op fails as a whole, its
// error names the op, and the kernel keeps nothing of the batch.
func TestApplyNamesFailingOp(t *testing.T) {
	ns := netlab.NewNS(t, "blame")
	b := newBackend(t, ns, pinhole.Config{})
	taken := pinhole.Pinhole{Protocol: tcp, InternalAddr: c4, InternalPort: 80, ExternalAddr: pub, ExternalPort: 8080}
	apply(t, b, install(taken, time.Minute))
	clash := taken
	clash.InternalAddr = c4b // same public port, another client: the kernel refuses

	for _, tc := range []struct {
		name      string
		ops       []pinhole.Op
		wantIndex int
		wantErr   error
	}{
		{"kernel conflict last", []pinhole.Op{install(everyShape[0], time.Minute), install(everyShape[6], time.Minute), install(clash, time.Minute)}, 2, pinhole.ErrConflict},
		{"kernel conflict first", []pinhole.Op{install(clash, time.Minute), install(everyShape[0], time.Minute)}, 0, pinhole.ErrConflict},
		{"kernel conflict in the middle of many", func() []pinhole.Op {
			var ops []pinhole.Op
			for i := range 40 {
				p := everyShape[0]
				p.InternalPort = uint16(1000 + i)
				p.ExternalPort = p.InternalPort
				ops = append(ops, install(p, time.Minute))
			}
			ops[23] = pinhole.Op{Kind: pinhole.Delete, Pinhole: clash}
			return ops
		}(), 23, pinhole.ErrConflict},
		{"two installs of one public port", []pinhole.Op{install(everyShape[9], time.Minute), install(clash, time.Minute), install(clash, time.Minute)}, 1, pinhole.ErrConflict},
		{"validation", []pinhole.Op{install(everyShape[0], time.Minute), {Kind: pinhole.Install, Pinhole: everyShape[0]}}, 1, pinhole.ErrInvalid},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := b.Apply(tc.ops)
			var oe *pinhole.OpError
			if !errors.As(err, &oe) {
				t.Fatalf("Apply: %v, want *OpError", err)
			}
			if oe.Index != tc.wantIndex || !errors.Is(err, tc.wantErr) {
				t.Fatalf("Apply: index %d, err %v; want index %d, %v", oe.Index, err, tc.wantIndex, tc.wantErr)
			}
			t.Logf("error: %v", err)
			got, _ := listPinholes(t, b)
			if diff := cmp.Diff([]pinhole.Pinhole{taken}, got, cmpAddr, cmpPrefix, cmpOdd); diff != "" {
				t.Errorf("kernel state after failed batch (-want +got):\n%s", diff)
			}
		})
	}
}

// TestRefreshAndDeleteRaceExpiry: Refresh resets the kernel's countdown
// (re-adding alone would not), puts back an entry that expired meanwhile,
// and Delete of an expired entry does not fail the batch.
func TestRefreshAndDeleteRaceExpiry(t *testing.T) {
	ns := netlab.NewNS(t, "race")
	b := newBackend(t, ns, pinhole.Config{})
	p, q := everyShape[0], everyShape[3] // a hash set and an interval set
	remaining := func(want pinhole.Pinhole) time.Duration {
		_, entries := listPinholes(t, b)
		for _, e := range entries {
			if e.Pinhole == want {
				return e.Remaining
			}
		}
		return 0
	}

	apply(t, b, install(p, 3*time.Second), install(q, 3*time.Second))
	time.Sleep(1200 * time.Millisecond)
	apply(t, b, pinhole.Op{Kind: pinhole.Refresh, Pinhole: p, Timeout: 3 * time.Second},
		pinhole.Op{Kind: pinhole.Refresh, Pinhole: q, Timeout: 3 * time.Second})
	for _, x := range []pinhole.Pinhole{p, q} {
		if r := remaining(x); r < 2500*time.Millisecond {
			t.Errorf("%s: remaining %v after refresh to 3s, want > 2.5s", x, r)
		}
	}

	apply(t, b, install(p, time.Second), install(q, time.Second))
	time.Sleep(1500 * time.Millisecond)
	if r := remaining(p); r != 0 {
		t.Fatalf("entry still listed %v after expiry", r)
	}
	apply(t, b, pinhole.Op{Kind: pinhole.Refresh, Pinhole: p, Timeout: time.Minute},
		pinhole.Op{Kind: pinhole.Refresh, Pinhole: q, Timeout: time.Minute})
	for _, x := range []pinhole.Pinhole{p, q} {
		if r := remaining(x); r < 55*time.Second {
			t.Errorf("%s: refresh after expiry: remaining %v", x, r)
		}
	}

	apply(t, b, install(p, time.Second), install(q, time.Second))
	time.Sleep(1500 * time.Millisecond)
	apply(t, b, del(p), del(q), del(everyShape[1])) // expired, expired, never there
	if got, _ := listPinholes(t, b); len(got) != 0 {
		t.Errorf("after deletes: %v", got)
	}
}

// TestHealthyAndRepair: tampering with pcpd's objects is noticed, and
// Setup repairs it without losing the other sets' pinholes.
func TestHealthyAndRepair(t *testing.T) {
	for _, tc := range []struct{ name, cmd string }{
		{"set deleted", "flush chain inet pcpd guard6; flush chain inet pcpd recheck6; delete set inet pcpd pin6_proto"},
		{"chain flushed", "flush chain inet pcpd guard6"},
		{"rule added", "add rule inet pcpd guard4 accept"},
		{"table deleted", "delete table inet pcpd"},
		// The raw chains that keep pcpd's own datagrams out of conntrack.
		{"control chain deleted", "delete chain inet pcpd control_in"},
		{"control chain flushed", "flush chain inet pcpd control_local"},
		{"notrack chain flushed", "flush chain inet pcpd notrack_out"},
		// Noticed by the set's sentinel element, without a dump.
		{"map flushed", "flush map inet pcpd napt4"},
		{"SNAT map flushed", "flush map inet pcpd snat4"},
		{"filtered set flushed", "flush set inet pcpd pin6_filter"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ns := netlab.NewNS(t, "heal")
			b := newBackend(t, ns, pinhole.Config{})
			apply(t, b, install(everyShape[0], time.Minute))
			if err := b.Healthy(); err != nil {
				t.Fatalf("Healthy before tampering: %v", err)
			}
			ns.MustRun(t, "nft", tc.cmd)
			if err := b.Healthy(); !errors.Is(err, pinhole.ErrUnhealthy) {
				t.Fatalf("Healthy after %q: %v, want ErrUnhealthy", tc.cmd, err)
			}
			if err := b.Setup(); err != nil {
				t.Fatalf("Setup (repair): %v", err)
			}
			if err := b.Healthy(); err != nil {
				t.Fatalf("Healthy after repair: %v", err)
			}
			got, _ := listPinholes(t, b)
			if tc.name != "table deleted" && len(got) != 1 {
				t.Errorf("pinholes after repair: %v", got)
			}
		})
	}
}

// TestTeardownLeavesOthersAlone: Teardown removes pcpd's table and nothing
// else; a second Teardown is a no-op.
func TestTeardownLeavesOthersAlone(t *testing.T) {
	ns := netlab.NewNS(t, "tear")
	foreign := `table inet admin {
	set keep { type ipv6_addr; elements = { 2001:db8::1 } }
	chain fw { type filter hook forward priority 0; policy accept; ip6 daddr @keep counter accept; }
}
table ip legacy {
	chain pre { type nat hook prerouting priority -100; }
}
`
	loadNft(t, ns, foreign)
	before := nftList(t, ns, "ruleset")
	b := newBackend(t, ns, pinhole.Config{})
	apply(t, b, install(everyShape[0], time.Minute))
	if err := b.Teardown(); err != nil {
		t.Fatalf("Teardown: %v", err)
	}
	if err := b.Teardown(); err != nil {
		t.Fatalf("second Teardown: %v", err)
	}
	if diff := cmp.Diff(before, nftList(t, ns, "ruleset")); diff != "" {
		t.Errorf("ruleset after Teardown differs from before Setup (-before +after):\n%s", diff)
	}
}

// loadNft loads a ruleset fragment with nft -f (test scaffolding only).
func loadNft(t testing.TB, ns *netlab.NS, ruleset string) {
	t.Helper()
	out, err := ns.Run("sh", "-c", "nft -f - <<'EOF'\n"+ruleset+"EOF\n")
	if err != nil {
		t.Fatalf("nft -f: %v\n%s", err, out)
	}
}

// TestMaxBatchFits: a full batch of the largest shape (filtered IPv4
// mappings: key, key end and data per element) fits one transaction, and
// then installs and deletes as one.
func TestMaxBatchFits(t *testing.T) {
	ns := netlab.NewNS(t, "max")
	b := newBackend(t, ns, pinhole.Config{})
	var ins, dels []pinhole.Op
	for i := range pinhole.MaxBatch {
		p := pinhole.Pinhole{Protocol: udp, InternalAddr: c4, InternalPort: uint16(10000 + i), ExternalAddr: pub,
			ExternalPort: uint16(20000 + i), RemotePrefix: netip.MustParsePrefix("203.0.113.0/24"), RemotePort: 53}
		ins, dels = append(ins, install(p, time.Minute)), append(dels, del(p))
	}
	apply(t, b, ins...)
	if got, _ := listPinholes(t, b); len(got) != pinhole.MaxBatch {
		t.Fatalf("listed %d, want %d", len(got), pinhole.MaxBatch)
	}
	apply(t, b, ins...) // again: resets timeouts, no error
	apply(t, b, dels...)
	if got, _ := listPinholes(t, b); len(got) != 0 {
		t.Fatalf("listed %d after delete", len(got))
	}
	if err := b.Apply(append(ins, ins[0])); !errors.Is(err, pinhole.ErrInvalid) {
		t.Fatalf("Apply of MaxBatch+1 ops: %v, want ErrInvalid", err)
	}
}

// TestOverlappingFilters: the kernel's concatenated-range set refuses a
// filtered pinhole whose remote range starts inside another one of the same
// mapping (ErrConflict: the engine must not send nested FILTER prefixes),
// while deleting such a never-installed pinhole is still a no-op that does
// not fail the rest of its batch.
func TestOverlappingFilters(t *testing.T) {
	ns := netlab.NewNS(t, "ovl")
	b := newBackend(t, ns, pinhole.Config{})
	outer, inner := filtered22("2001:db8:5::/48"), filtered22("2001:db8:5:1::/64")
	apply(t, b, install(outer, time.Minute))
	if err := b.Apply([]pinhole.Op{install(inner, time.Minute)}); !errors.Is(err, pinhole.ErrConflict) {
		t.Fatalf("nested filter install: %v, want ErrConflict", err)
	}
	plain := everyShape[0]
	apply(t, b, del(inner), install(plain, time.Minute), del(inner))
	got, _ := listPinholes(t, b)
	want := []pinhole.Pinhole{outer, plain}
	slices.SortFunc(want, sortPinholes)
	if diff := cmp.Diff(want, got, cmpAddr, cmpPrefix, cmpOdd); diff != "" {
		t.Errorf("after deleting the absent nested filter (-want +got):\n%s", diff)
	}
	// A present filtered mapping with other internal data is still a conflict.
	m := pinhole.Pinhole{Protocol: tcp, InternalAddr: c4, InternalPort: 80, ExternalAddr: pub, ExternalPort: 8080,
		RemotePrefix: netip.MustParsePrefix("203.0.113.0/24")}
	apply(t, b, install(m, time.Minute))
	other := m
	other.InternalAddr = c4b
	err := b.Apply([]pinhole.Op{install(plain, time.Minute), del(other)})
	var oe *pinhole.OpError
	if !errors.As(err, &oe) || oe.Index != 1 || !errors.Is(err, pinhole.ErrConflict) {
		t.Fatalf("delete with other mapping data: %v, want op 1 ErrConflict", err)
	}
}
