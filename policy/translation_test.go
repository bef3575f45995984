package policy

import (
	"context"
	"errors"
	"net/netip"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
)

// TestAuthorizeTranslationPrefixes (h/pol64): an address inside an
// IPv6-to-IPv4 translation prefix stands for the IPv4 host it embeds
// (64:ff9b::c000:201 is 192.0.2.1 through a NAT64), so a pinhole there
// opens someone else's IPv4 host through the translator, whoever owns
// the IPv6 prefix: never openable (NOT_AUTHORIZED, TP-03), as the
// source's own address (MAP), a THIRD_PARTY target, or a restored
// lease's (Rules). The well-known prefix 64:ff9b::/96 (RFC 6052), the
// local-use 64:ff9b:1::/48 (RFC 8215) and the IPv4-compatible ::/96
// always; an operator's network-specific prefix (RFC 6052 §2.2) when
// configured. Addresses next to them stay openable by their owner.
func TestAuthorizeTranslationPrefixes(t *testing.T) {
	st, err := NewStatic(map[string][]netip.Prefix{
		// A client given the translation prefixes (or prefixes around
		// them) by its operator, besides its own /48.
		"gw": {pfx("2001:db8:a::/48"), pfx("64:ff9b::/64"), pfx("64:ff9b:1::/48"), pfx("64:ff9b:2::/48"), pfx("::/96"), pfx("2001:db8:64::/64")},
	})
	if err != nil {
		t.Fatal(err)
	}
	const gw = OwnerID("static:gw")
	nsp := pfx("2001:db8:64::/96") // the operator's network-specific prefix
	for _, tc := range []struct {
		target string
		nsp    bool // configured with nsp
		want   Reason
	}{
		{"64:ff9b::c000:201", false, NeverOpenable},        // 192.0.2.1 through the well-known prefix
		{"64:ff9b::a00:2", false, NeverOpenable},           // 10.0.0.2
		{"64:ff9b::ffff:ffff", false, NeverOpenable},       // the /96's last
		{"64:ff9b:1::a00:2", false, NeverOpenable},         // local-use, RFC 8215 (/96 inside the /48)
		{"64:ff9b:1:abcd:0:a:a00:2", false, NeverOpenable}, // local-use, a /64 NSP's form
		{"64:ff9b:1:ffff:ffff:ffff:ffff:ffff", false, NeverOpenable},
		{"::a00:2", false, NeverOpenable},           // IPv4-compatible 10.0.0.2
		{"::c000:201", false, NeverOpenable},        // IPv4-compatible 192.0.2.1
		{"2001:db8:64::a00:2", true, NeverOpenable}, // the operator's NSP
		{"2001:db8:64::a00:2", false, Allowed},      // not configured: an ordinary IPv6 address
		{"64:ff9b::1:0:a00:2", false, Allowed},      // beside the /96: not a NAT64 address
		{"64:ff9b:2::1", false, Allowed},            // beside the local-use /48
		{"2001:db8:64::1:a00:2", true, Allowed},     // beside the NSP
		{"2001:db8:a::10", true, Allowed},           // the client's own /48
	} {
		var cfg Config
		if tc.nsp {
			cfg.TranslationPrefixes = []netip.Prefix{nsp}
		}
		for _, own := range bothPaths(st) {
			p, err := New(cfg, own.o)
			if err != nil {
				t.Fatal(err)
			}
			name := own.name + "/" + tc.target
			if tc.nsp {
				name += "/nsp"
			}
			t.Run(name, func(t *testing.T) {
				a := addr(tc.target)
				for _, r := range []Request{
					{Source: a, Target: a, Protocol: 6, InternalPort: 443},                                                      // MAP from it
					{Source: addr("2001:db8:a::10"), Target: a, ThirdParty: true, Protocol: 6, InternalPort: 443},               // THIRD_PARTY
					{Source: addr("2001:db8:a::10"), Target: a, ThirdParty: true, Protocol: 17, InternalPort: 53},               // PEER/UDP
					{Source: addr("2001:db8:a::10"), Target: a, ThirdParty: true, Delete: true, Protocol: 6, InternalPort: 443}, // a delete too
				} {
					want, wantID := tc.want, gw
					if r.Source == a && tc.want == NeverOpenable {
						// From a translated address: nobody's (review
						// h/revp64, TestAuthorizeTranslatedSource).
						want, wantID = NoOwner, ""
					}
					if o, got := p.Authorize(r); got != want || o.ID != wantID {
						t.Errorf("Authorize(%v → %v, TP %v) = %q, %v; want %q, %v", r.Source, r.Target, r.ThirdParty, o.ID, got, wantID, want)
					}
					if got := p.Rules(r); got != tc.want {
						t.Errorf("Rules(%v) = %v, want %v (a restored lease's check)", r.Target, got, tc.want)
					}
				}
				if got := p.NeverOpenable(a); got != (tc.want == NeverOpenable) {
					t.Errorf("NeverOpenable(%v) = %v (the sweep's check)", a, got)
				}
			})
		}
	}
}

// TestTranslationPrefixConfig: a configured translation prefix must be
// IPv6 (an IPv4 one would make no sense of "embeds an IPv4 address"), and
// is masked.
func TestTranslationPrefixConfig(t *testing.T) {
	st := mustStatic(t)
	for _, bad := range []netip.Prefix{{}, pfx("10.0.0.0/8"), pfx("::ffff:10.0.0.0/104")} {
		if _, err := New(Config{TranslationPrefixes: []netip.Prefix{bad}}, st); !errors.Is(err, ErrInvalidConfig) {
			t.Errorf("translation prefix %v: err = %v, want ErrInvalidConfig", bad, err)
		}
	}
	p, err := New(Config{TranslationPrefixes: []netip.Prefix{netip.PrefixFrom(addr("2001:db8:64::1"), 96)}}, st)
	if err != nil {
		t.Fatal(err)
	}
	if !p.NeverOpenable(addr("2001:db8:64::a00:2")) {
		t.Error("2001:db8:64::1/96 (unmasked) not applied as 2001:db8:64::/96")
	}
}

// TestOverlapsTranslation: the warning's test, for prefixes inside,
// around, equal to and beside the translation prefixes.
func TestOverlapsTranslation(t *testing.T) {
	extra := []netip.Prefix{pfx("2001:db8:64::/96")}
	for _, tc := range []struct {
		p    string
		want string // "" = none
	}{
		{"64:ff9b::/96", "64:ff9b::/96"},
		{"64:ff9b::/32", "64:ff9b::/96"},
		{"64:ff9b::a00:0/120", "64:ff9b::/96"},
		{"64:ff9b:1:2::/64", "64:ff9b:1::/48"},
		{"::/64", "::/96"},
		{"2001:db8:64::/48", "2001:db8:64::/96"},
		{"64:ff9b::1:0:0/96", ""},
		{"64:ff9b:2::/48", ""},
		{"2001:db8:a::/48", ""},
		{"10.0.0.0/8", ""},
	} {
		got, ok := OverlapsTranslation(pfx(tc.p), extra)
		if ok != (tc.want != "") || ok && got.String() != tc.want {
			t.Errorf("OverlapsTranslation(%s) = %v, %v; want %q", tc.p, got, ok, tc.want)
		}
	}
}

// TestWireGuardWarnsTranslationOverlap: a peer whose AllowedIPs overlap a
// translation prefix (a NAT64 gateway peer holding 64:ff9b::/96) keeps
// them, but the operator is told once per peer and prefix, however often
// the peers are read, that no target there is openable.
func TestWireGuardWarnsTranslationOverlap(t *testing.T) {
	d := &devices{}
	d.set("wg0",
		peer(1, "2001:db8:a::/48", "64:ff9b::/96", "2001:db8:64::/64"),
		peer(2, "2001:db8:b::/48", "64:ff9b:1::/48"))
	core, logs := observer.New(zap.WarnLevel)
	w, err := newWireGuard(d, []string{"wg0"}, time.Hour, zap.New(core), WithTranslationPrefixes([]netip.Prefix{pfx("2001:db8:64::/96")}))
	if err != nil {
		t.Fatal(err)
	}
	for range 3 {
		if err := w.Refresh(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	const msg = "AllowedIP overlaps an IPv6-to-IPv4 translation prefix; its addresses there are never openable"
	if n := logs.FilterMessage(msg).Len(); n != 3 {
		t.Errorf("%d translation warnings, want 3 (one per peer and prefix): %v", n, logs.All())
	}
	if o, ok := w.Lookup(addr("64:ff9b::a00:2")); !ok || o.ID != wgID(1) {
		t.Errorf("64:ff9b::a00:2 is %v %v: the peer still owns its AllowedIPs", o.ID, ok)
	}
	p, err := New(Config{TranslationPrefixes: []netip.Prefix{pfx("2001:db8:64::/96")}}, w)
	if err != nil {
		t.Fatal(err)
	}
	if _, r := p.Authorize(Request{Source: addr("2001:db8:a::5"), Iface: "wg0", Target: addr("64:ff9b::a00:2"), ThirdParty: true, Protocol: 6, InternalPort: 22}); r != NeverOpenable {
		t.Errorf("THIRD_PARTY 64:ff9b::a00:2 from its peer: %v, want %v", r, NeverOpenable)
	}
}
