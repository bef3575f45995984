package pinhole_test

import (
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// TestDeleteCatchAll (h/catchall, issue 9, review h/revr6 finding 2): a
// catch-all element added by hand ('nft add element inet pcpd pin6 { *
// }', a map's '{ * : data }') to each pinhole set and map, beside a live
// element of pcpd's, is listed as an odd Pinhole whose Delete removes
// exactly it (deleteCatchAll's raw transaction: NFTA_SET_ELEM_FLAGS
// catch-all, no key); the live element stays; a second Delete (none
// there) succeeds. Standalone table and attached mode (the admin's
// table, prefixed sets). Before, every Delete failed: 'Apply: pinhole:
// op 0 ...: invalid argument' (google/nftables sends an empty key, no
// catch-all flag) and the catch-all stayed.
func TestDeleteCatchAll(t *testing.T) {
	c := netip.MustParseAddr("2001:db8:1:2::10")
	from6 := netip.MustParsePrefix("2001:db8:ffff::/48")
	c4, pub := netip.MustParseAddr("10.100.0.2"), netip.MustParseAddr("198.51.100.1")
	from4 := netip.MustParsePrefix("203.0.113.0/24")
	type kindSpec struct {
		set  string
		data string // a map's: the catch-all's data
		live pinhole.Pinhole
	}
	kinds := []kindSpec{
		{"pin6", "", pinhole.Pinhole{Protocol: 6, InternalAddr: c, InternalPort: 443}},
		{"pin6_proto", "", pinhole.Pinhole{Protocol: 17, InternalAddr: c}},
		{"pin6_addr", "", pinhole.Pinhole{InternalAddr: c}},
		{"pin6_filter", "", pinhole.Pinhole{Protocol: 6, InternalAddr: c, InternalPort: 443, RemotePrefix: from6}},
		{"pin6_addr_filter", "", pinhole.Pinhole{InternalAddr: c, RemotePrefix: from6}},
		{"redir6", " : 2001:db8:1:2::10 . 22", pinhole.Pinhole{Protocol: 6, InternalAddr: c, InternalPort: 22, ExternalPort: 8022}},
		{"redir6_filter", " : 2001:db8:1:2::10 . 22", pinhole.Pinhole{Protocol: 6, InternalAddr: c, InternalPort: 22, ExternalPort: 8022, RemotePrefix: from6}},
		{"napt4", " : 10.100.0.2 . 80", pinhole.Pinhole{Protocol: 6, InternalAddr: c4, InternalPort: 80, ExternalAddr: pub, ExternalPort: 8080}},
		{"napt4_filter", " : 10.100.0.2 . 80", pinhole.Pinhole{Protocol: 6, InternalAddr: c4, InternalPort: 80, ExternalAddr: pub, ExternalPort: 8080, RemotePrefix: from4}},
	}
	for _, mode := range bothModes {
		t.Run(mode.name, func(t *testing.T) {
			ns, b := backendIn(t, "catchall", mode)
			var live []pinhole.Pinhole
			for _, k := range kinds {
				p, err := k.live.Canonical()
				if err != nil {
					t.Fatal(err)
				}
				live = append(live, p)
				apply(t, b, install(p, time.Hour))
				ns.MustRun(t, "nft", "add", "element", "inet", mode.table, mode.prefix+k.set, "{ *"+k.data+" }")
			}
			es, err := b.List()
			if err != nil {
				t.Fatalf("List: %v", err)
			}
			var odd []pinhole.Pinhole
			for _, e := range es {
				if e.Pinhole.Odd() {
					odd = append(odd, e.Pinhole)
				}
			}
			if len(odd) != len(kinds) {
				t.Fatalf("List: %d odd entries %v, want a catch-all of each of %d sets", len(odd), odd, len(kinds))
			}
			for _, p := range odd {
				set := mode.prefix + strings.Fields(p.String())[0]
				what := "set"
				if i := slices.IndexFunc(kinds, func(k kindSpec) bool { return mode.prefix+k.set == set }); i >= 0 && kinds[i].data != "" {
					what = "map"
				}
				if err := b.Apply([]pinhole.Op{{Kind: pinhole.Delete, Pinhole: p}}); err != nil {
					t.Errorf("%s: Apply(Delete): %v", set, err)
					continue
				}
				if out := nftList(t, ns, what, "inet", mode.table, set); strings.Contains(out, "*") {
					t.Errorf("%s: the catch-all stayed after its Delete:\n%s", set, out)
				}
				if err := b.Apply([]pinhole.Op{{Kind: pinhole.Delete, Pinhole: p}}); err != nil {
					t.Errorf("%s: Apply(Delete) again, none there: %v", set, err)
				}
			}
			es, err = b.List()
			if err != nil {
				t.Fatalf("List after: %v", err)
			}
			var got []pinhole.Pinhole
			for _, e := range es {
				got = append(got, e.Pinhole)
			}
			for _, p := range live {
				if !slices.Contains(got, p) {
					t.Errorf("live %v gone (List: %v)", p, got)
				}
			}
			if len(got) != len(live) {
				t.Errorf("List after: %v, want exactly the live %v", got, live)
			}
		})
	}
}

// TestWatchSNATCatchAll (h/catchall): a catch-all added by hand to each
// SNAT map ('{ * : a . p }': every new outbound IPv4 flow no other element
// matches leaves from a:p), beside a live mapping's companion, is told by
// the watch as an odd Pinhole added, whose Delete removes exactly it
// (the live companion stays). Before, snatPinhole dropped it (no
// companion has no key): 'no event from the watcher', and it stayed.
func TestWatchSNATCatchAll(t *testing.T) {
	c4, pub := netip.MustParseAddr("10.100.0.2"), netip.MustParseAddr("198.51.100.1")
	ns := netlab.NewNS(t, "catchall")
	b := newBackend(t, ns, pinhole.Config{Routes: noRoutes{}})
	live := []pinhole.Pinhole{
		{Protocol: 6, InternalAddr: c4, InternalPort: 80, ExternalAddr: pub, ExternalPort: 8080},
		{Protocol: 6, InternalAddr: c4, InternalPort: 81, ExternalAddr: pub, ExternalPort: 8081, RemotePrefix: netip.MustParsePrefix("203.0.113.0/24")},
	}
	for _, p := range live {
		apply(t, b, install(p, time.Hour))
	}
	evs := watching(t, b)
	marker(t, ns, b, evs, 1000, "the start")
	for _, set := range []string{"snat4", "snat4_filter"} {
		ns.MustRun(t, "nft", "add", "element", "inet", "pcpd", set, "{ * : 198.51.100.9 . 9999 }")
		ev := nextEvent(t, evs, set+" catch-all added")
		if len(ev.Added) != 1 || !ev.Added[0].Pinhole.Odd() || !strings.HasPrefix(ev.Added[0].Pinhole.String(), set+" catch-all") {
			t.Fatalf("%s catch-all added: told %+v, want one odd catch-all of %s", set, ev, set)
		}
		apply(t, b, del(ev.Added[0].Pinhole))
		if out := nftList(t, ns, "map", "inet", "pcpd", set); strings.Contains(out, "*") || !strings.Contains(out, "10.100.0.2 . tcp . 8") {
			t.Errorf("%s after the catch-all's Delete: want the live companion alone:\n%s", set, out)
		}
	}
	es, err := b.List()
	if err != nil || len(es) != len(live) {
		t.Errorf("List: %v, %v; want the live %v", es, err, live)
	}
}
