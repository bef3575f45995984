package pinhole_test

import (
	"regexp"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// TestKeptSocketsTamperMidRead: Healthy and List keep their
// NETLINK_NETFILTER connections from call to call (h/nlsock), and a
// tamper that lands while they read (their reads fail mid-check, and the
// connection is closed and dialled again) leaves nothing behind that a
// later call reads: each tamper is reported by every Healthy after it,
// on the kept sockets and on a concurrent call's own; after the repair
// Healthy passes and List holds exactly the installed pinholes; an
// element deleted by hand is missing from List (the audit). Review
// h/revnlsock: passes on h/nlsock; fails with the kept connection
// dialled outside the Backend's namespace.
func TestKeptSocketsTamperMidRead(t *testing.T) {
	netlab.RequireRoot(t)
	ns := netlab.NewNS(t, "rvnlstmp")
	b := newBackend(t, ns, pinhole.Config{})
	var ops []pinhole.Op
	for i := range 60 {
		ops = append(ops, install(benchPinhole(i), time.Hour))
	}
	apply(t, b, ops...)
	out := ns.MustRun(t, "nft", "list", "table", "inet", "pcpd")
	tampers := [][]string{{"delete", "table", "inet", "pcpd"}, {"flush", "ruleset"}}
	for _, m := range regexp.MustCompile(`(?m)^\s*(set|map) (\S+) \{`).FindAllStringSubmatch(out, -1) {
		// Sets empty in this configuration (no owners, meter, protected
		// or served addresses; flowed6: no flow admitted, and its
		// contents, the record of admitted flows' addresses, are not
		// Healthy's to check: pinhole/flowed.go) are not damaged by a
		// flush.
		if !slices.Contains([]string{"owners4", "owners6", "meter4", "meter6", "protected4", "protected6", "served4", "served6", "serving_ifs", "flowed6"}, m[2]) {
			tampers = append(tampers, []string{"flush", m[1], "inet", "pcpd", m[2]})
		}
	}
	for _, m := range regexp.MustCompile(`(?m)^\s*chain (\S+) \{`).FindAllStringSubmatch(out, -1) {
		tampers = append(tampers, []string{"flush", "chain", "inet", "pcpd", m[1]})
	}
	if len(tampers) < 10 {
		t.Fatalf("%d tampers from the listing; want the table's sets and chains:\n%s", len(tampers), out)
	}
	for _, tp := range tampers {
		// Readers in flight while the tamper lands: two Healthy (one on
		// the kept sockets, one on its own) and a List.
		var stop atomic.Bool
		var wg sync.WaitGroup
		for g := range 3 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for !stop.Load() {
					if g == 2 {
						b.List()
					} else {
						b.Healthy()
					}
				}
			}()
		}
		time.Sleep(time.Millisecond)
		ns.MustRun(t, append([]string{"nft"}, tp...)...)
		var errs [3]error
		var cw sync.WaitGroup
		for i := range errs {
			cw.Add(1)
			go func() { defer cw.Done(); errs[i] = b.Healthy() }()
		}
		cw.Wait()
		stop.Store(true)
		wg.Wait()
		for i, err := range errs {
			if err == nil {
				t.Errorf("%v: concurrent Healthy %d reported healthy", tp, i)
			}
		}
		if err := b.Healthy(); err == nil { // alone: on the kept sockets
			t.Errorf("%v: Healthy reported healthy", tp)
		}
		if err := b.Setup(); err != nil {
			t.Fatalf("Setup: %v", err)
		}
		apply(t, b, ops...)
		if err := b.Healthy(); err != nil {
			t.Errorf("%v: Healthy after the repair: %v", tp, err)
		}
		if got, err := b.List(); err != nil || len(got) != len(ops) {
			t.Errorf("%v: List after the repair: %d entries (%v), want %d", tp, len(got), err, len(ops))
		}
		ns.MustRun(t, "nft", "delete", "element", "inet", "pcpd", "pin6", "{", "2001:db8:1:2::7", ".", "tcp", ".", "443", "}")
		if got, err := b.List(); err != nil || len(got) != len(ops)-1 {
			t.Errorf("%v: List after an element deleted by hand: %d entries (%v), want %d", tp, len(got), err, len(ops)-1)
		}
		apply(t, b, ops[7])
	}
}
