package pinhole_test

import (
	"net/netip"
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
