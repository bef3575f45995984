package pinhole_test

import (
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// TestApplyFullBatchOneSet: a full batch (MaxBatch ops) whose elements all
// fall in one set, of the largest element shape (redir6_filter: key, key
// end, data, timeout), installs every one of them. A set's element list is
// one netlink attribute, whose length is 16 bits: a message listing more
// than 64 KiB of elements is cut short (mdlayher/netlink wraps the length
// without an error), and the kernel would read only part of it.
func TestApplyFullBatchOneSet(t *testing.T) {
	netlab.RequireRoot(t)
	for _, tc := range []struct {
		name    string
		inPlace bool
	}{{"in place", true}, {"re-created", false}} {
		t.Run(tc.name, func(t *testing.T) {
			ns := netlab.NewNS(t, "bigphase")
			b := newBackend(t, ns, pinhole.Config{})
			pinhole.SetUpdatesInPlace(b, tc.inPlace)
			var ops []pinhole.Op
			var want []pinhole.Pinhole
			for i := range pinhole.MaxBatch {
				p := pinhole.Pinhole{Protocol: udp, InternalAddr: c6, InternalPort: 443, ExternalAddr: c6, ExternalPort: uint16(10000 + i),
					RemotePrefix: netip.MustParsePrefix("2001:db8:8::/56")}
				ops = append(ops, install(p, time.Hour))
				want = append(want, p)
			}
			if err := b.Apply(ops); err != nil {
				t.Fatalf("Apply: %v", err)
			}
			got, _ := listPinholes(t, b)
			slices.SortFunc(want, sortPinholes)
			if diff := cmp.Diff(want, got, cmpAddr, cmpPrefix, cmpOdd); diff != "" {
				t.Fatalf("%d pinholes, want %d (-want +got):\n%.2000s", len(got), len(want), diff)
			}
			for _, d := range expiries(t, ns) {
				if d < 59*time.Minute {
					t.Fatalf("an element expires in %v, want about 1h", d)
				}
			}
		})
	}
}

// TestApplyFullBatchShorten: a full batch of Refreshes in one set that
// shortens every element leaves none of them with its old, longer timeout
// (a pinhole must not outlive its lease, LIFE-04).
func TestApplyFullBatchShorten(t *testing.T) {
	netlab.RequireRoot(t)
	ns := netlab.NewNS(t, "bigshort")
	b := newBackend(t, ns, pinhole.Config{})
	var ops []pinhole.Op
	for i := range pinhole.MaxBatch {
		p := pinhole.Pinhole{Protocol: udp, InternalAddr: c6, InternalPort: 443, ExternalAddr: c6, ExternalPort: uint16(10000 + i),
			RemotePrefix: netip.MustParsePrefix("2001:db8:8::/56")}
		ops = append(ops, install(p, time.Hour))
	}
	apply(t, b, ops[:len(ops)/2]...)
	apply(t, b, ops[len(ops)/2:]...)
	for i := range ops {
		ops[i] = pinhole.Op{Kind: pinhole.Refresh, Pinhole: ops[i].Pinhole, Timeout: 30 * time.Second}
	}
	apply(t, b, ops...)
	long := 0
	for _, d := range expiries(t, ns) {
		if d > 30*time.Second {
			long++
		}
	}
	if long > 0 {
		t.Fatalf("%d of %d elements kept a timeout over 30s after a Refresh to 30s", long, len(ops))
	}
}
