package pinhole_test

import (
	"context"
	"errors"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// watching runs b.Watch until the end of t; its events arrive on the
// returned channel. It returns once the watcher's socket has joined the
// notification group: a change committed before is told to no one.
// Before (review h/revsnat), it returned at once, and a test's first
// change could commit before the goroutine had joined (late under
// load): 'no event from the watcher' after 30 s (TestWatchSNATCatchAll,
// TestWatchWithoutOwnConn, TestWatchTellsRangeElements; reproduced with
// the goroutine's start delayed by 200 ms).
func watching(t *testing.T, b *pinhole.Backend) <-chan pinhole.WatchEvent {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	evs := make(chan pinhole.WatchEvent, 1024)
	done := make(chan error, 1)
	open := b.WatchersOpen()
	go func() { done <- b.Watch(ctx, func(ev pinhole.WatchEvent) { evs <- ev }) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; !errors.Is(err, context.Canceled) {
			t.Errorf("Watch: %v", err)
		}
	})
	// A bound only so that a broken watcher cannot hang the test.
	for deadline := time.Now().Add(30 * time.Second); b.WatchersOpen() <= open; time.Sleep(time.Millisecond) {
		select {
		case err := <-done:
			done <- err
			t.Fatalf("Watch ended before joining: %v", err)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatal("the watcher's socket never joined the notification group")
		}
	}
	return evs
}

// nextEvent is the next event, failing after a long wait (the kernel
// tells within milliseconds; the bound only keeps a broken watcher from
// hanging the test).
func nextEvent(t *testing.T, evs <-chan pinhole.WatchEvent, what string) pinhole.WatchEvent {
	t.Helper()
	select {
	case ev := <-evs:
		return ev
	case <-time.After(30 * time.Second):
		t.Fatalf("%s: no event from the watcher", what)
	}
	return pinhole.WatchEvent{}
}

// marker deletes, as someone else, the element of a pinhole installed for
// the purpose, and checks that the next event is exactly that deletion:
// notifications come in commit order, so nothing pcpd did before it
// reached the watcher.
func marker(t *testing.T, ns *netlab.NS, b *pinhole.Backend, evs <-chan pinhole.WatchEvent, port uint16, after string) {
	t.Helper()
	markerIn(t, ns, b, evs, "pcpd", "pin6", port, after)
}

func markerIn(t *testing.T, ns *netlab.NS, b *pinhole.Backend, evs <-chan pinhole.WatchEvent, table, set string, port uint16, after string) {
	t.Helper()
	p := pinhole.Pinhole{Protocol: tcp, InternalAddr: netip.MustParseAddr("2001:db8::99"), InternalPort: port}
	apply(t, b, install(p, time.Hour))
	ns.MustRun(t, "nft", "delete", "element", "inet", table, set, "{ 2001:db8::99 . tcp . "+itoa(port)+" }")
	ev := nextEvent(t, evs, after)
	want, _ := p.Canonical()
	if ev.Damage != "" || ev.Lost != nil || !slices.Equal(ev.Deleted, []pinhole.Pinhole{want}) {
		t.Fatalf("after %s: first event %+v, want only the marker's deletion %v (pcpd's own changes must not be told)", after, ev, want)
	}
}

func itoa(n uint16) string { return strconv.Itoa(int(n)) }

// TestWatchTellsOthersChanges: the watcher tells of elements someone else
// deletes from pcpd's sets (pinholes, SNAT companions as their NAPT
// pinhole), of a flushed set and a deleted table as damage, and of none
// of pcpd's own writes (installs, deletes, Healthy's sentinel
// transaction, Setup); nor of elements the kernel's timeouts removed,
// from a hash set or a concatenated-range one (the kernel sends nothing
// for them: checked here, as the server relies on it).
func TestWatchTellsOthersChanges(t *testing.T) {
	ns := netlab.NewNS(t, "watch")
	b := newBackend(t, ns, pinhole.Config{})
	evs := watching(t, b)
	a := netip.MustParseAddr("2001:db8::5")
	filtered := pinhole.Pinhole{Protocol: tcp, InternalAddr: a, InternalPort: 81, RemotePrefix: netip.MustParsePrefix("2001:db8:9::/48")}
	apply(t, b, install(pinhole.Pinhole{Protocol: tcp, InternalAddr: a, InternalPort: 80}, 1200*time.Millisecond),
		install(filtered, 1200*time.Millisecond))
	time.Sleep(3 * time.Second) // both time out; then a commit on the range set (its GC runs at commits)
	apply(t, b, install(pinhole.Pinhole{Protocol: tcp, InternalAddr: a, InternalPort: 82, RemotePrefix: netip.MustParsePrefix("2001:db8:9::/48")}, time.Hour))
	apply(t, b, del(pinhole.Pinhole{Protocol: tcp, InternalAddr: a, InternalPort: 82, RemotePrefix: netip.MustParsePrefix("2001:db8:9::/48")}))
	if err := b.Healthy(); err != nil {
		t.Fatal(err)
	}
	if err := b.Setup(); err != nil {
		t.Fatal(err)
	}
	marker(t, ns, b, evs, 1000, "own writes and timeouts")

	// A NAPT mapping's SNAT companion deleted: told as the mapping.
	napt := pinhole.Pinhole{Protocol: udp, InternalAddr: netip.MustParseAddr("10.0.0.2"), InternalPort: 5000,
		ExternalAddr: netip.MustParseAddr("192.0.2.1"), ExternalPort: 6000}
	apply(t, b, install(napt, time.Hour))
	ns.MustRun(t, "nft", "delete", "element", "inet", "pcpd", "snat4", "{ 10.0.0.2 . udp . 5000 }")
	ev := nextEvent(t, evs, "snat4 element deleted")
	if want, _ := napt.Canonical(); !slices.Equal(ev.Deleted, []pinhole.Pinhole{want}) || ev.Damage != "" {
		t.Fatalf("snat4 element deleted: %+v, want %v", ev, want)
	}
	ns.MustRun(t, "nft", "delete", "element", "inet", "pcpd", "napt4", "{ 192.0.2.1 . udp . 6000 }")
	ev = nextEvent(t, evs, "napt4 element deleted")
	if want, _ := napt.Canonical(); !slices.Equal(ev.Deleted, []pinhole.Pinhole{want}) {
		t.Fatalf("napt4 element deleted: %+v, want %v", ev, want)
	}

	// A flushed set: its sentinel and every element told.
	p := pinhole.Pinhole{Protocol: udp, InternalAddr: a, InternalPort: 53}
	apply(t, b, install(p, time.Hour))
	ns.MustRun(t, "nft", "flush", "set", "inet", "pcpd", "pin6")
	ev = nextEvent(t, evs, "flush set")
	if want, _ := p.Canonical(); !strings.Contains(ev.Damage, "pin6 flushed") || !slices.Contains(ev.Deleted, want) {
		t.Fatalf("flush set: %+v", ev)
	}
	if err := b.Setup(); err != nil { // pcpd's repair: not told
		t.Fatal(err)
	}
	marker(t, ns, b, evs, 1001, "Setup after a flush")

	// The table deleted: damage (however many messages it takes).
	ns.MustRun(t, "nft", "delete", "table", "inet", "pcpd")
	ev = nextEvent(t, evs, "delete table")
	if ev.Damage == "" {
		t.Fatalf("delete table: %+v", ev)
	}
	for len(evs) > 0 {
		<-evs
	}
	if err := b.Setup(); err != nil {
		t.Fatal(err)
	}
	// Another table's changes are not pcpd's.
	ns.MustRun(t, "nft", "add table inet other; add set inet other s { type ipv6_addr; }; add element inet other s { ::2 }; delete element inet other s { ::2 }; delete table inet other")
	marker(t, ns, b, evs, 1002, "Setup after a delete, another table's changes")
}

// TestWatchReopensAfterError: a failed receive (as an overflow's ENOBUFS)
// is told as Lost, and the watcher goes on telling on a new socket.
func TestWatchReopensAfterError(t *testing.T) {
	ns := netlab.NewNS(t, "watchlost")
	b := newBackend(t, ns, pinhole.Config{})
	// Restored by a cleanup registered before watching's, so after the
	// watcher has stopped reading receiveHook (a defer ran before it: a
	// data race under -race).
	t.Cleanup(pinhole.WatchFailNext())
	evs := watching(t, b)
	ns.MustRun(t, "nft", "add table inet other") // any notification wakes the receive that fails
	if ev := nextEvent(t, evs, "forced error"); ev.Lost == nil {
		t.Fatalf("first event %+v, want Lost", ev)
	}
	marker(t, ns, b, evs, 1003, "a reopen")
}

// TestWatchOverflow: a receive buffer the kernel overruns (the callback
// stalled while someone else deletes elements one transaction each) is
// told as Lost (ENOBUFS), then the watcher goes on.
func TestWatchOverflow(t *testing.T) {
	ns := netlab.NewNS(t, "watchnobufs")
	b := newBackend(t, ns, pinhole.Config{})
	defer pinhole.SetWatchBuffer(4096)()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	stall := make(chan struct{})
	evs := make(chan pinhole.WatchEvent, 4096)
	go b.Watch(ctx, func(ev pinhole.WatchEvent) { <-stall; evs <- ev })
	a := netip.MustParseAddr("2001:db8::7")
	var script strings.Builder
	for port := uint16(1); port <= 200; port++ {
		apply(t, b, install(pinhole.Pinhole{Protocol: tcp, InternalAddr: a, InternalPort: port}, time.Hour))
		script.WriteString("delete element inet pcpd pin6 { 2001:db8::7 . tcp . " + itoa(port) + " }\n")
	}
	// One transaction per element, so each is a notification of its own.
	for _, line := range strings.Split(strings.TrimSpace(script.String()), "\n") {
		ns.MustRun(t, "sh", "-c", "nft '"+line+"'")
	}
	close(stall)
	lost := false
	for !lost {
		ev := nextEvent(t, evs, "overflow")
		lost = ev.Lost != nil
	}
	for len(evs) > 0 {
		<-evs
	}
	marker(t, ns, b, evs, 1004, "an overflow")
}

// TestWatchAttachedJudgesOnlyPcpd: attached, the admin's changes to their
// own chains, rules and sets in the shared table are not told; pcpd's
// element deleted, its entry chain flushed and the table deleted are.
func TestWatchAttachedJudgesOnlyPcpd(t *testing.T) {
	ns := netlab.NewNS(t, "watchatt")
	loadNft(t, ns, adminRuleset)
	ns.MustRun(t, "nft", "add set inet filter admin6 { type ipv6_addr; }")
	b := newBackend(t, ns, pinhole.Config{Table: "filter", Attached: true, Chain: "pcpd"})
	evs := watching(t, b)
	out := ns.MustRun(t, "nft", "-a", "list", "chain", "inet", "filter", "forward")
	h := out[strings.Index(out, `iifname "lan0" accept # handle `)+len(`iifname "lan0" accept # handle `):]
	h = strings.TrimSpace(h[:strings.IndexByte(h, '\n')])
	ns.MustRun(t, "nft", "delete", "rule", "inet", "filter", "forward", "handle", h)
	ns.MustRun(t, "sh", "-c", "nft add element inet filter admin6 '{ ::5 }' && nft delete element inet filter admin6 '{ ::5 }' && nft add chain inet filter mine && nft delete chain inet filter mine && nft flush set inet filter admin6")
	markerIn(t, ns, b, evs, "filter", "pcpd_pin6", 2000, "the admin's own changes")

	ns.MustRun(t, "nft", "flush", "chain", "inet", "filter", "pcpd")
	if ev := nextEvent(t, evs, "entry chain flushed"); !strings.Contains(ev.Damage, "chain pcpd") {
		t.Fatalf("entry chain flushed: %+v", ev)
	}
	if err := b.Setup(); err != nil {
		t.Fatal(err)
	}
	markerIn(t, ns, b, evs, "filter", "pcpd_pin6", 2001, "Setup")
	ns.MustRun(t, "nft", "delete", "table", "inet", "filter")
	if ev := nextEvent(t, evs, "table deleted"); ev.Damage == "" {
		t.Fatalf("table deleted: %+v", ev)
	}
}

// TestWatchOwnPortsPastTheRing: more sockets of the Backend's own dialled
// over time than the ring of ports keeps (a Healthy beside another dials
// one each time; Healthy's kept socket is dialled again after every check
// that found damage) do not make the kept connection's writes someone
// else's: its delete is not told, nor (no in-place timeout update, as
// before Linux 6.10) an install that re-creates its element, which told
// as a deletion the server would put back, told again, round after round
// (review h/revnftmon).
func TestWatchOwnPortsPastTheRing(t *testing.T) {
	ns := netlab.NewNS(t, "watchring")
	b := newBackend(t, ns, pinhole.Config{})
	a := netip.MustParseAddr("2001:db8::6")
	p := pinhole.Pinhole{Protocol: tcp, InternalAddr: a, InternalPort: 80}
	q := pinhole.Pinhole{Protocol: tcp, InternalAddr: a, InternalPort: 81}
	apply(t, b, install(p, time.Hour), install(q, time.Hour))
	evs := watching(t, b)
	if err := b.DialSideSockets(20); err != nil {
		t.Fatal(err)
	}
	apply(t, b, del(p))
	pinhole.SetUpdatesInPlace(b, false)
	apply(t, b, install(q, time.Hour))
	pinhole.SetUpdatesInPlace(b, true)
	marker(t, ns, b, evs, 1005, "20 side sockets dialled, then pcpd's delete and re-creating install")
}

// TestWatchLostTellsAfterRejoin: Lost is told once the new socket has
// joined the group, so that what the caller does for it (the server: a
// check and an audit) sees every change Watch does not tell. Before
// (review h/revnftmon), Lost came before the reopen: an element someone
// deleted while the caller handled it (after its audit's dump) was told
// neither then nor later.
func TestWatchLostTellsAfterRejoin(t *testing.T) {
	ns := netlab.NewNS(t, "watchrejoin")
	b := newBackend(t, ns, pinhole.Config{})
	p := pinhole.Pinhole{Protocol: tcp, InternalAddr: netip.MustParseAddr("2001:db8::8"), InternalPort: 80}
	later := pinhole.Pinhole{Protocol: tcp, InternalAddr: netip.MustParseAddr("2001:db8::8"), InternalPort: 81}
	apply(t, b, install(p, time.Hour), install(later, time.Hour))
	defer pinhole.WatchFailNext()()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	evs := make(chan pinhole.WatchEvent, 1024)
	errs := make(chan error, 1)
	done := make(chan struct{})
	go func() {
		defer close(done)
		b.Watch(ctx, func(ev pinhole.WatchEvent) {
			if ev.Lost != nil {
				// Someone deletes an element while the caller handles Lost.
				_, err := ns.Run("nft", "delete", "element", "inet", "pcpd", "pin6", "{ 2001:db8::8 . tcp . 80 }")
				errs <- err
			}
			evs <- ev
		})
	}()
	defer func() { cancel(); <-done }()
	ns.MustRun(t, "nft", "add table inet other") // wakes the receive that fails
	if ev := nextEvent(t, evs, "forced error"); ev.Lost == nil {
		t.Fatalf("first event %+v, want Lost", ev)
	}
	if err := <-errs; err != nil {
		t.Fatal(err)
	}
	for b.WatchersOpen() == 0 { // reopened (before the fix, after Lost)
		time.Sleep(time.Millisecond)
	}
	// A later deletion: the next event is the one made during Lost.
	ns.MustRun(t, "nft", "delete", "element", "inet", "pcpd", "pin6", "{ 2001:db8::8 . tcp . 81 }")
	want, _ := p.Canonical()
	if ev := nextEvent(t, evs, "delete during Lost"); !slices.Equal(ev.Deleted, []pinhole.Pinhole{want}) {
		t.Fatalf("after Lost: %+v, want the deletion of %v made while Lost was handled", ev, want)
	}
}

// TestWatchTellsRangeElements: elements someone deletes from the
// concatenated-range sets (a FILTER's pin6_filter element, a NAPT
// mapping's napt4_filter element and its snat4_filter companion, key end
// and all) and from redir6 are told as exactly the pinholes installed
// (review h/revnftmon: the watch's own tests deleted only hash elements).
func TestWatchTellsRangeElements(t *testing.T) {
	ns := netlab.NewNS(t, "watchrange")
	b := newBackend(t, ns, pinhole.Config{})
	a := netip.MustParseAddr("2001:db8::5")
	f48 := pinhole.Pinhole{Protocol: tcp, InternalAddr: a, InternalPort: 81, RemotePrefix: netip.MustParsePrefix("2001:db8:9::/48")}
	f128 := pinhole.Pinhole{Protocol: tcp, InternalAddr: a, InternalPort: 82, RemotePrefix: netip.MustParsePrefix("2001:db8:9::1/128"), RemotePort: 4000}
	napt := pinhole.Pinhole{Protocol: udp, InternalAddr: netip.MustParseAddr("10.0.0.2"), InternalPort: 5000,
		ExternalAddr: netip.MustParseAddr("192.0.2.1"), ExternalPort: 6000, RemotePrefix: netip.MustParsePrefix("198.51.100.0/24")}
	redir := pinhole.Pinhole{Protocol: tcp, InternalAddr: a, InternalPort: 83, ExternalAddr: a, ExternalPort: 8083}
	evs := watching(t, b)
	for _, tc := range []struct {
		p   pinhole.Pinhole
		cmd string
	}{
		{f48, "delete element inet pcpd pin6_filter { 2001:db8::5 . tcp . 81 . 2001:db8:9::/48 . 0-65535 }"},
		{f128, "delete element inet pcpd pin6_filter { 2001:db8::5 . tcp . 82 . 2001:db8:9::1 . 4000 }"},
		{napt, "delete element inet pcpd napt4_filter { 192.0.2.1 . udp . 6000 . 198.51.100.0/24 . 0-65535 }"},
		{napt, "delete element inet pcpd snat4_filter { 10.0.0.2 . udp . 5000 . 198.51.100.0/24 . 0-65535 }"},
		{redir, "delete element inet pcpd redir6 { 2001:db8::5 . tcp . 8083 }"},
	} {
		apply(t, b, install(tc.p, time.Hour))
		ns.MustRun(t, "sh", "-c", "nft '"+tc.cmd+"'")
		ev := nextEvent(t, evs, tc.cmd)
		if want, _ := tc.p.Canonical(); ev.Damage != "" || !slices.Equal(ev.Deleted, []pinhole.Pinhole{want}) {
			t.Fatalf("%s: %+v, want Deleted %v", tc.cmd, ev, want)
		}
	}
}

// TestWatchWithoutOwnConn: a Backend writing on the caller's connection
// (New could not dial a lasting one: each flush then dials a socket of a
// new port) gets one of its own when Watch starts, so its writes are
// still not told (review h/revnftmon).
func TestWatchWithoutOwnConn(t *testing.T) {
	ns := netlab.NewNS(t, "watchnoown")
	b := newBackend(t, ns, pinhole.Config{})
	conn, err := ns.NftConn()
	if err != nil {
		t.Fatal(err)
	}
	pinhole.UseCallersConn(b, conn)
	p := pinhole.Pinhole{Protocol: tcp, InternalAddr: netip.MustParseAddr("2001:db8::9"), InternalPort: 80}
	apply(t, b, install(p, time.Hour))
	evs := watching(t, b)
	apply(t, b, del(p))
	marker(t, ns, b, evs, 1006, "pcpd's delete, New's connection not its own")
}

// TestWatchTellsAdds: elements someone else adds to pcpd's sets are told
// (h/fwadd): a pinhole (the internet let in) as Added with the expiry it
// was given, a live one re-added with a longer timeout (Linux >= 6.10
// updates it in place) likewise, a NAPT mapping and a filtered pinhole
// as what they open, an address added to the protected set as damage;
// pcpd's own installs and renewals, and other tables' single adds, are
// not. Before, none was told: the first event here was the marker's.
func TestWatchTellsAdds(t *testing.T) {
	ns := netlab.NewNS(t, "watchadd")
	b := newBackend(t, ns, pinhole.Config{})
	evs := watching(t, b)
	a := netip.MustParseAddr("2001:db8::5")
	own := pinhole.Pinhole{Protocol: tcp, InternalAddr: a, InternalPort: 443}
	apply(t, b, install(own, time.Minute))
	apply(t, b, install(own, 2*time.Minute))
	ns.MustRun(t, "nft", "add table inet other; add set inet other s { type ipv6_addr; }; add element inet other s { ::2 }")
	marker(t, ns, b, evs, 1007, "pcpd's own install and renewal, another table's add")

	napt := pinhole.Pinhole{Protocol: udp, InternalAddr: netip.MustParseAddr("10.0.0.2"), InternalPort: 5000,
		ExternalAddr: netip.MustParseAddr("192.0.2.1"), ExternalPort: 6000}
	f48 := pinhole.Pinhole{Protocol: tcp, InternalAddr: a, InternalPort: 81, RemotePrefix: netip.MustParsePrefix("2001:db8:9::/48")}
	for _, tc := range []struct {
		cmd     string
		p       pinhole.Pinhole
		expires time.Duration
	}{
		{"add element inet pcpd pin6 { 2001:db8::5 . tcp . 80 timeout 1h }", pinhole.Pinhole{Protocol: tcp, InternalAddr: a, InternalPort: 80}, time.Hour},
		{"add element inet pcpd pin6 { 2001:db8::5 . tcp . 443 timeout 1h }", own, time.Hour}, // a live one's timeout raised
		{"add element inet pcpd pin6 { 2001:db8::5 . udp . 53 }", pinhole.Pinhole{Protocol: udp, InternalAddr: a, InternalPort: 53}, 0},
		{"add element inet pcpd napt4 { 192.0.2.1 . udp . 6000 timeout 1h : 10.0.0.2 . 5000 }", napt, time.Hour},
		{"add element inet pcpd pin6_filter { 2001:db8::5 . tcp . 81 . 2001:db8:9::/48 . 0-65535 timeout 1h }", f48, time.Hour},
	} {
		ns.MustRun(t, "sh", "-c", "nft '"+tc.cmd+"'")
		ev := nextEvent(t, evs, tc.cmd)
		want, _ := tc.p.Canonical()
		if ev.Damage != "" || len(ev.Deleted) != 0 || len(ev.Added) != 1 || ev.Added[0].Pinhole != want || len(ev.By) != 1 {
			t.Fatalf("%s: %+v, want Added %v", tc.cmd, ev, want)
		}
		if got := ev.Added[0].Remaining; got > tc.expires || got < tc.expires-time.Minute {
			t.Fatalf("%s: told expiry %v, want %v", tc.cmd, got, tc.expires)
		}
	}
	ns.MustRun(t, "nft", "add", "element", "inet", "pcpd", "protected6", "{ 2001:db8::77 }")
	if ev := nextEvent(t, evs, "protected6 add"); !strings.Contains(ev.Damage, "added to set protected6") || len(ev.Added) != 0 {
		t.Fatalf("protected6 add: %+v, want damage", ev)
	}
}
