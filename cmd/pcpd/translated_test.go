package main

import (
	"net/netip"
	"testing"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
)

// TestWarnTranslated (h/pol64): a static client given a prefix that
// overlaps an IPv6-to-IPv4 translation prefix keeps it, but the operator
// hears at start, once per client and prefix, that no address there is
// opened: the fixed 64:ff9b::/96, 64:ff9b:1::/48 and ::/96, and the
// --nat64-prefix ones. Others are not mentioned.
func TestWarnTranslated(t *testing.T) {
	pfx := netip.MustParsePrefix
	core, logs := observer.New(zap.WarnLevel)
	warnTranslated(zap.New(core), map[string][]netip.Prefix{
		"gw":   {pfx("2001:db8:a::/48"), pfx("64:ff9b::/96"), pfx("64:ff9b:1:2::/64")},
		"siit": {pfx("2001:db8:64::/48")},
		"lan":  {pfx("2001:db8:b::/48"), pfx("10.0.0.0/24"), pfx("64:ff9b::1:0:0/96")},
	}, []netip.Prefix{pfx("2001:db8:64:1::/96")})
	want := []string{"gw 64:ff9b::/96 64:ff9b::/96", "gw 64:ff9b:1:2::/64 64:ff9b:1::/48", "siit 2001:db8:64::/48 2001:db8:64:1::/96"}
	var got []string
	for _, e := range logs.All() {
		m := e.ContextMap()
		got = append(got, m["client"].(string)+" "+m["prefix"].(string)+" "+m["translation"].(string))
	}
	if len(got) != len(want) {
		t.Fatalf("warnings %q, want %q", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("warning %d: %q, want %q", i, got[i], want[i])
		}
	}
}
