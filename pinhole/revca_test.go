package pinhole_test

import (
	"errors"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// TestCatchAllDeleteOwnAndRawShared (review h/revca): pcpd's own Delete of
// a catch-all (deleteCatchAll's transaction on b.raw) is not told by the
// watcher (the raw socket's port is pcpd's own): the next event is the
// marker's; and the raw socket it shares with getRules holds no reply
// left over, after a catch-all deleted and after one absent (ENOENT):
// the next getRules on it reads the chain and keeps the socket (same
// port, not closed and redialled).
func TestCatchAllDeleteOwnAndRawShared(t *testing.T) {
	c4, pub := netip.MustParseAddr("10.100.0.2"), netip.MustParseAddr("198.51.100.1")
	ns := netlab.NewNS(t, "revca")
	b := newBackend(t, ns, pinhole.Config{Routes: noRoutes{}})
	apply(t, b, install(pinhole.Pinhole{Protocol: 6, InternalAddr: c4, InternalPort: 80, ExternalAddr: pub, ExternalPort: 8080}, time.Hour))
	n, _, err := b.RawRulesForTest("forward")
	if err != nil || n == 0 {
		t.Fatalf("getRules(forward) before: %d rules, %v", n, err)
	}
	evs := watching(t, b)
	marker(t, ns, b, evs, 1000, "the start")
	for i, set := range []string{"pin6", "snat4"} {
		data := ""
		if set == "snat4" {
			data = " : 198.51.100.9 . 9999"
		}
		ns.MustRun(t, "nft", "add", "element", "inet", "pcpd", set, "{ *"+data+" }")
		ev := nextEvent(t, evs, set+" catch-all added")
		if len(ev.Added) != 1 || !ev.Added[0].Pinhole.Odd() {
			t.Fatalf("%s catch-all added: told %+v", set, ev)
		}
		p := ev.Added[0].Pinhole
		var port uint32
		for _, what := range []string{"deleted", "absent"} {
			apply(t, b, del(p))
			m, pt, err := b.RawRulesForTest("forward")
			if err != nil || m != n {
				t.Errorf("%s catch-all %s: getRules(forward) on the shared raw socket: %d rules, %v; want %d, nil", set, what, m, err, n)
			}
			if port != 0 && pt != port {
				t.Errorf("%s catch-all %s: raw socket port %d, was %d (closed and redialled)", set, what, pt, port)
			}
			port = pt
		}
		marker(t, ns, b, evs, uint16(1001+i), "pcpd's own "+set+" catch-all delete")
	}
}

// TestApplyCatchAllMixedBatchBlame (review h/revca): a batch holding a
// catch-all Delete beside ops the kernel refuses names the refused op by
// its index in the caller's batch (the catch-all taken out of the rest
// shifts nothing): op 2 ErrConflict, the catch-all at 0 or at 1; the
// catch-all is gone (its own transaction) and nothing of the rest
// applied; the batch again, the put-back After, succeeds (no catch-all
// there: nothing to do).
func TestApplyCatchAllMixedBatchBlame(t *testing.T) {
	ns := netlab.NewNS(t, "revca")
	b := newBackend(t, ns, pinhole.Config{})
	live, foreign := filtered22("2001:db8:5::/48"), filtered22("::/0")
	for _, at := range []int{0, 1} {
		apply(t, b, install(foreign, time.Minute))
		ns.MustRun(t, "nft", "add", "element", "inet", "pcpd", "pin6", "{ * }")
		es, err := b.List()
		if err != nil {
			t.Fatal(err)
		}
		var ca pinhole.Pinhole
		for _, e := range es {
			if e.Pinhole.Odd() {
				ca = e.Pinhole
			}
		}
		if !ca.Odd() {
			t.Fatalf("List: no catch-all in %v", es)
		}
		ops := []pinhole.Op{del(foreign), install(live, time.Minute)}
		ops = slices.Insert(ops, at, del(ca))
		err = b.Apply(ops)
		var oe *pinhole.OpError
		if !errors.As(err, &oe) || oe.Index != 2 || oe.Op != ops[2] || !errors.Is(err, pinhole.ErrConflict) {
			t.Fatalf("catch-all at %d: Apply: %v, want op 2 (the put-back) ErrConflict", at, err)
		}
		if out := nftList(t, ns, "set", "inet", "pcpd", "pin6"); strings.Contains(out, "*") {
			t.Errorf("catch-all at %d: the catch-all stayed:\n%s", at, out)
		}
		got, _ := listPinholes(t, b)
		if !slices.Contains(got, foreign) || slices.Contains(got, live) {
			t.Errorf("catch-all at %d: after the refused batch %v, want the foreign one alone (nothing of the rest applied)", at, got)
		}
		ops[2].After = true
		if err := b.Apply(ops); err != nil {
			t.Fatalf("catch-all at %d: the batch again, put-back After: %v", at, err)
		}
		got, _ = listPinholes(t, b)
		if !slices.Equal(got, []pinhole.Pinhole{live}) {
			t.Errorf("catch-all at %d: after: %v, want the live one alone", at, got)
		}
		apply(t, b, del(live))
	}
}

// TestWatchSNATCatchAllAttached (review h/revca): TestWatchSNATCatchAll in
// attached mode (the admin's table, prefixed maps): the catch-all of
// pcpd_snat4 and pcpd_snat4_filter is told and its Delete removes it
// from the prefixed map of the admin's table, not told back as someone's;
// the live companions stay.
func TestWatchSNATCatchAllAttached(t *testing.T) {
	c4, pub := netip.MustParseAddr("10.100.0.2"), netip.MustParseAddr("198.51.100.1")
	ns := netlab.NewNS(t, "revca")
	loadNft(t, ns, adminRuleset)
	b := newBackend(t, ns, pinhole.Config{Routes: noRoutes{}, Table: "filter", Attached: true, Chain: "pcpd"})
	live := []pinhole.Pinhole{
		{Protocol: 6, InternalAddr: c4, InternalPort: 80, ExternalAddr: pub, ExternalPort: 8080},
		{Protocol: 6, InternalAddr: c4, InternalPort: 81, ExternalAddr: pub, ExternalPort: 8081, RemotePrefix: netip.MustParsePrefix("203.0.113.0/24")},
	}
	for _, p := range live {
		apply(t, b, install(p, time.Hour))
	}
	evs := watching(t, b)
	markerIn(t, ns, b, evs, "filter", "pcpd_pin6", 1000, "the start")
	for i, set := range []string{"pcpd_snat4", "pcpd_snat4_filter"} {
		ns.MustRun(t, "nft", "add", "element", "inet", "filter", set, "{ * : 198.51.100.9 . 9999 }")
		ev := nextEvent(t, evs, set+" catch-all added")
		if len(ev.Added) != 1 || !ev.Added[0].Pinhole.Odd() {
			t.Fatalf("%s catch-all added: told %+v, want one odd catch-all", set, ev)
		}
		apply(t, b, del(ev.Added[0].Pinhole))
		if out := nftList(t, ns, "map", "inet", "filter", set); strings.Contains(out, "*") || !strings.Contains(out, "10.100.0.2 . tcp . 8") {
			t.Errorf("%s after the catch-all's Delete: want the live companion alone:\n%s", set, out)
		}
		markerIn(t, ns, b, evs, "filter", "pcpd_pin6", uint16(1001+i), "pcpd's own "+set+" catch-all delete")
	}
}
