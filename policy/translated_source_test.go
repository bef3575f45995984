package policy

import (
	"net/netip"
	"slices"
	"testing"
)

// TestAuthorizeTranslatedSource (review h/revp64): a source inside an
// IPv6-to-IPv4 translation prefix is an IPv4 host on the far side of the
// translator (64:ff9b::c633:6402 is 198.51.100.2 through a NAT64), not
// the client that holds the prefix (a static client given 64:ff9b::/96,
// the WireGuard peer that is the NAT64 gateway). Its request is nobody's
// (NoOwner), as an IPv4-mapped source is dropped (review h/revreq): taken
// as the holder's, it opened pinholes to the holder's own addresses
// (THIRD_PARTY MAP or PEER) and deleted the holder's mappings, while a
// MAP of its own address was refused only because that address is never
// openable. The holder's own sources are still its own.
func TestAuthorizeTranslatedSource(t *testing.T) {
	st, err := NewStatic(map[string][]netip.Prefix{
		"gw": {pfx("2001:db8:a::/48"), pfx("64:ff9b::/96"), pfx("64:ff9b:1::/48"), pfx("::/96"), pfx("2001:db8:64::/64")},
	})
	if err != nil {
		t.Fatal(err)
	}
	cfg := Config{TranslationPrefixes: []netip.Prefix{pfx("2001:db8:64::/96")}}
	own := addr("2001:db8:a::10") // the holder's own host
	for _, o := range bothPaths(st) {
		p, err := New(cfg, o.o)
		if err != nil {
			t.Fatal(err)
		}
		for _, src := range []string{"64:ff9b::c633:6402", "64:ff9b:1:2::c633:6402", "::c633:6402", "2001:db8:64::c633:6402"} {
			s := addr(src)
			for _, r := range []Request{
				{Source: s, Target: own, ThirdParty: true, Protocol: 6, InternalPort: 22},               // THIRD_PARTY MAP / PEER
				{Source: s, Target: own, ThirdParty: true, Delete: true, Protocol: 6, InternalPort: 22}, // delete the holder's
				{Source: s, Target: s, Protocol: 6, InternalPort: 22},                                   // its own
			} {
				if id, got := p.Authorize(r); got != NoOwner || id.ID != "" {
					t.Errorf("%s: Authorize(%v → %v, TP %v, delete %v) = %q, %v; want no owner", o.name, r.Source, r.Target, r.ThirdParty, r.Delete, id.ID, got)
				}
			}
			if id, ok := p.Requester(s, ""); ok {
				t.Errorf("%s: Requester(%v) = %q, want none", o.name, s, id.ID)
			}
		}
		// Not vacuous: the holder's own host and an address beside the
		// operator's prefix are served.
		for _, src := range []string{"2001:db8:a::10", "2001:db8:64::1:c633:6402"} {
			if id, got := p.Authorize(Request{Source: addr(src), Target: own, ThirdParty: true, Protocol: 6, InternalPort: 22}); got != Allowed || id.ID != "static:gw" {
				t.Errorf("%s: Authorize(%v → %v) = %q, %v; want static:gw, allowed", o.name, src, own, id.ID, got)
			}
		}
	}
}

// TestTranslationPrefixesExposed: TranslationPrefixes (what pcpd gives
// the kernel's owner meter, pinhole.Meter.Unowned) lists the fixed
// prefixes and the configured ones, masked, and every address inside
// them is a source Requester makes nobody's, though an owner holds a prefix
// around each; a copy: changing it changes nothing.
func TestTranslationPrefixesExposed(t *testing.T) {
	st, err := NewStatic(map[string][]netip.Prefix{"all": {pfx("::/88"), pfx("64:ff9b::/32"), pfx("2001:db8::/32")}})
	if err != nil {
		t.Fatal(err)
	}
	p, err := New(Config{TranslationPrefixes: []netip.Prefix{pfx("2001:db8:64::1/96")}}, st)
	if err != nil {
		t.Fatal(err)
	}
	got := p.TranslationPrefixes()
	want := []netip.Prefix{pfx("64:ff9b::/96"), pfx("64:ff9b:1::/48"), pfx("::/96"), pfx("2001:db8:64::/96")}
	if !slices.Equal(got, want) {
		t.Fatalf("TranslationPrefixes() = %v, want %v", got, want)
	}
	for _, t6 := range got {
		last := t6.Addr().As16()
		for i := t6.Bits() / 8; i < 16; i++ {
			last[i] |= 0xff >> max(0, t6.Bits()-8*i)
		}
		for _, a := range []netip.Addr{t6.Addr(), t6.Addr().Next(), netip.AddrFrom16(last)} {
			if id, ok := p.Requester(a, ""); ok {
				t.Errorf("Requester(%v) = %q, but %v is listed as a translation prefix", a, id.ID, t6)
			}
		}
		// Just past it: the /32's owner's, unless listed.
		if a := netip.AddrFrom16(last).Next(); a.IsValid() {
			if _, ok := p.Requester(a, ""); !ok && !slices.ContainsFunc(got, func(q netip.Prefix) bool { return q.Contains(a) }) {
				t.Errorf("Requester(%v): no owner, but it is in no listed prefix", a)
			}
		}
	}
	got[0] = pfx("2001:db8::/32")
	if p.TranslationPrefixes()[0] != want[0] {
		t.Errorf("TranslationPrefixes shares its slice")
	}
}
