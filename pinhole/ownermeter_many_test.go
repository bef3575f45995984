package pinhole_test

import (
	"fmt"
	"net/netip"
	"testing"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// TestManyOwnersGone (review of the bug-4 fix): when many owners go at once (a
// WireGuard interface deleted, a config reload), writeOwners deletes every
// gone owner's chain in its one final transaction, two acked messages each.
// The kernel commits the transaction, but its acks overflow the netlink
// socket: SetOwners reports failure, so the Backend keeps the old owners
// while the kernel holds the new, and Healthy (which compares them) then
// fails every 5 s: a full Setup and re-install of every lease each time.
func TestManyOwnersGone(t *testing.T) {
	for _, n := range []int{100, 200, 400, 1000} {
		t.Run(fmt.Sprint(n), func(t *testing.T) {
			ns := netlab.NewNS(t, "gone")
			b := newBackend(t, ns, pinhole.Config{Meter: pinhole.Meter{Rate: 200}})
			mk := func(base, n int) []pinhole.Owner {
				var owners []pinhole.Owner
				for i := range n {
					j := base + 2*i
					p6 := netip.PrefixFrom(netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0, 1, byte(j >> 8), byte(j)}), 64)
					owners = append(owners, pinhole.Owner{ID: fmt.Sprintf("wg:peer%d", j), Prefixes: []netip.Prefix{p6}})
				}
				return owners
			}
			if err := b.SetOwners(mk(0, n), nil); err != nil {
				t.Fatalf("SetOwners of %d owners: %v", n, err)
			}
			if err := b.Healthy(); err != nil {
				t.Fatalf("Healthy: %v", err)
			}
			// All of them replaced by as many others.
			err := b.SetOwners(mk(1, n), nil)
			got, _ := b.Owners()
			t.Logf("replacing %d owners: SetOwners: %v; kernel holds %d ranges", n, err, len(got))
			if err != nil {
				t.Errorf("SetOwners replacing %d owners: %v", n, err)
			}
			if err := b.Healthy(); err != nil {
				t.Errorf("Healthy after the replacement: %v", err)
			}
			err = b.SetOwners(nil, nil)
			got, _ = b.Owners()
			t.Logf("removing %d owners: SetOwners: %v; kernel holds %d ranges", n, err, len(got))
			if err != nil {
				t.Errorf("SetOwners removing %d owners: %v", n, err)
			}
			if err := b.Healthy(); err != nil {
				t.Errorf("Healthy after the removal: %v", err)
			}
			// What checkFirewall does next, three times: Healthy fails,
			// Setup repairs (writing the old owners back), and the server
			// gives the owners again (updateProtected with meterOwners nil).
			for i := range 3 {
				herr := b.Healthy()
				if herr == nil {
					break
				}
				serr := b.Setup()
				oerr := b.SetOwners(nil, nil)
				t.Errorf("repair round %d: Healthy %v; Setup %v; SetOwners %v", i, herr, serr, oerr)
			}
		})
	}
}

// TestProtectedFlushedNoticed: a flushed or edited protected set turns
// the inbound guard off for the prefixes it lost (their forwarded traffic
// no longer reaches guard6/guard4), so Healthy must report it and Setup
// must put the prefixes back. Found in the review of the bug-4 fix: before,
// nothing restored the set until the ownership changed.
func TestProtectedFlushedNoticed(t *testing.T) {
	ns := netlab.NewNS(t, "protflush")
	b := newBackend(t, ns, pinhole.Config{Meter: pinhole.Meter{Rate: 200}})
	given := []netip.Prefix{
		netip.MustParsePrefix("2001:db8:1:2::/64"),
		netip.MustParsePrefix("2001:db8:1:3::/64"), // adjacent: merged into one range
		netip.MustParsePrefix("2001:db8:9::/48"),
		netip.MustParsePrefix("192.0.2.0/28"),
		netip.MustParsePrefix("::ffff:198.51.100.0/120"), // IPv4-mapped: held as IPv4
	}
	if err := b.SetProtected(given); err != nil {
		t.Fatal(err)
	}
	if err := b.Healthy(); err != nil {
		t.Fatalf("Healthy right after SetProtected: %v", err)
	}
	for _, tamper := range [][]string{
		{"flush", "set", "inet", "pcpd", "protected6"},
		{"flush", "set", "inet", "pcpd", "protected4"},
		{"delete", "element", "inet", "pcpd", "protected6", "{ 2001:db8:9::/48 }"},
		{"add", "element", "inet", "pcpd", "protected4", "{ 203.0.113.0/24 }"},
	} {
		before, _ := b.Protected()
		ns.MustRun(t, append([]string{"nft"}, tamper...)...)
		if err := b.Healthy(); err == nil {
			t.Errorf("nft %v: Healthy passes (set now %v)", tamper, mustProtected(t, b))
			continue
		}
		if err := b.Setup(); err != nil {
			t.Fatalf("Setup after nft %v: %v", tamper, err)
		}
		if err := b.Healthy(); err != nil {
			t.Errorf("Healthy after repairing nft %v: %v", tamper, err)
		}
		if after := mustProtected(t, b); fmt.Sprint(after) != fmt.Sprint(before) {
			t.Errorf("after repairing nft %v: protected %v, want %v", tamper, after, before)
		}
	}
}

func mustProtected(t *testing.T, b *pinhole.Backend) []netip.Prefix {
	t.Helper()
	got, err := b.Protected()
	if err != nil {
		t.Fatal(err)
	}
	return got
}

// TestManyOwnersAndPrefixes: SetOwners and SetProtected with as many
// owners and prefixes as a large WireGuard host has, each read back whole,
// and Healthy (which compares the owner maps) passes. Before, SetOwners
// failed with ENOBUFS past about 75 owners (every added rule is echoed,
// and one transaction's echoes overflowed the netlink socket; 50 with two
// rules per owner chain), and one set-element message past 64 KiB wrapped
// its 16-bit attribute length, so the kernel silently kept part of the
// list: 976 of 2 000 protected prefixes, 345 of 1 000 owners' ranges.
// Healthy's map comparison would then have failed, and repaired, forever.
// And one transaction of all the owner maps' elements exceeded the
// netlink send buffer (EMSGSIZE) at 2 000 owners.
//
// Setup's repair ran for 2 000 owners too once Setup wrote the protected
// prefixes in transactions of their own (TestSetupManyProtected): its one
// transaction had exceeded the send buffer at 4 000 prefixes.
func TestManyOwnersAndPrefixes(t *testing.T) {
	for _, n := range []int{100, 1000, 2000} {
		t.Run(fmt.Sprint(n), func(t *testing.T) {
			ns := netlab.NewNS(t, "many")
			b := newBackend(t, ns, pinhole.Config{Meter: pinhole.Meter{Rate: 200}})
			var (
				owners    []pinhole.Owner
				holes     []netip.Prefix
				protected []netip.Prefix
			)
			for i := range n {
				// Every other /64, so that no two merge; an IPv4 /32
				// each; a hole at the start of every tenth /64.
				p6 := netip.PrefixFrom(netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0, 1, byte(2 * i >> 8), byte(2 * i)}), 64)
				p4 := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 1, byte(2 * i >> 8), byte(2 * i)}), 32)
				owners = append(owners, pinhole.Owner{ID: fmt.Sprintf("wg:peer%d", i), Prefixes: []netip.Prefix{p6, p4}})
				protected = append(protected, p6, p4)
				if i%10 == 0 {
					holes = append(holes, netip.PrefixFrom(p6.Addr(), 80))
				}
			}
			if err := b.SetProtected(protected); err != nil {
				t.Fatalf("SetProtected of %d prefixes: %v", len(protected), err)
			}
			if got, err := b.Protected(); err != nil || len(got) != len(protected) {
				t.Errorf("kernel holds %d protected prefixes (%v), want %d", len(got), err, len(protected))
			}
			if err := b.SetOwners(owners, holes); err != nil {
				t.Fatalf("SetOwners of %d owners: %v", n, err)
			}
			// Each owner's /64 less the hole at its start, if any,
			// which takes several prefixes to list; its /32.
			got, err := b.Owners()
			if err != nil {
				t.Fatal(err)
			}
			ranges := map[string]bool{}
			for _, r := range got {
				ranges[r.Chain+" "+fmt.Sprint(r.Prefix.Addr().Is4())] = true
			}
			if len(ranges) != 2*n {
				t.Errorf("owner maps jump to %d owner chains per family, want %d and %d (%d prefixes read)", len(ranges), n, n, len(got))
			}
			if err := b.Healthy(); err != nil {
				t.Errorf("Healthy: %v", err)
			}
			if err := b.Setup(); err != nil { // the repair path rewrites every owner chain
				t.Fatalf("Setup: %v", err)
			}
			if err := b.Healthy(); err != nil {
				t.Errorf("Healthy after Setup: %v", err)
			}
		})
	}
}
