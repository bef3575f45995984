package pinhole

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"testing"

	"github.com/pcpd/pcpd/internal/netlab"
	"golang.org/x/sys/unix"
)

// TestClassifyFlattened: the nftables library's reads format the netlink
// error with %v; classify finds the errno in the text again.
func TestClassifyFlattened(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want error
	}{
		{errors.New("receiveAckAware: netlink receive: no such file or directory"), ErrMissing},
		{fmt.Errorf("receiveAckAware: %v", fmt.Errorf("netlink receive: %w", unix.EBUSY)), ErrConflict},
		{fmt.Errorf("conn.Receive: %w", unix.ENOENT), ErrMissing},
		{errors.New("receiveAckAware: netlink receive: no buffer space available"), nil},
	} {
		got := classify(tc.err)
		if tc.want != nil && !errors.Is(got, tc.want) || tc.want == nil && (errors.Is(got, ErrMissing) || errors.Is(got, ErrConflict)) {
			t.Errorf("classify(%q) = %v, want %v", tc.err, got, tc.want)
		}
	}
}

// TestHealthySetGoneDuringRead: a protected set or owner map deleted
// between Healthy's listing of the sets and its read of the set (here:
// left out of the listing compared) is damage for a full repair: not
// ErrProtected or ErrOwnerMeter, whose repairs cannot re-create a set.
func TestHealthySetGoneDuringRead(t *testing.T) {
	ns := netlab.NewNS(t, "setgone")
	conn, err := ns.NftConn()
	if err != nil {
		t.Fatal(err)
	}
	b, err := New(conn, Config{Meter: Meter{Rate: 200, Ports: []uint16{5351}}})
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Setup(); err != nil {
		t.Fatal(err)
	}
	if err := b.SetProtected([]netip.Prefix{netip.MustParsePrefix("2001:db8::/48")}); err != nil {
		t.Fatal(err)
	}
	if err := b.SetOwners([]Owner{{ID: "x", Prefixes: []netip.Prefix{netip.MustParsePrefix("2001:db8::/48")}}}, nil); err != nil {
		t.Fatal(err)
	}
	// chains: every chain whose rules refer to the set (emptied first, so
	// that the kernel lets it go): guard6's reverse-path rule looks up
	// protected6 too, and local_out's forged-source drop (h/hunt4).
	for _, tc := range []struct {
		chains    []string
		set, kind string
	}{
		{[]string{"forward", "guard6", "local_out"}, "protected6", "set"},
		{[]string{"control_local"}, "owners6", "map"},
	} {
		for _, c := range tc.chains {
			ns.MustRun(t, "nft", "flush", "chain", "inet", "pcpd", c)
		}
		ns.MustRun(t, "nft", "delete", tc.kind, "inet", "pcpd", tc.set)
		b.mu.Lock()
		w := b.healthWantLocked()
		w.sets = slices.DeleteFunc(w.sets, func(s string) bool { return s == tc.set })
		for i := range w.layout {
			if slices.Contains(tc.chains, w.layout[i].name) {
				w.layout[i].rules = nil
			}
		}
		_, err := w.check(b.view())
		b.mu.Unlock()
		if !errors.Is(err, ErrUnhealthy) || errors.Is(err, ErrProtected) || errors.Is(err, ErrOwnerMeter) {
			t.Errorf("%s gone during the read: Healthy %v, want damage for a full repair", tc.set, err)
		}
		if err := b.Setup(); err != nil {
			t.Fatal(err)
		}
	}
}
