package pinhole_test

import (
	"fmt"
	"net/netip"
	"testing"

	"github.com/pcpd/pcpd/pinhole"
)

// TestFlowedLookupsEveryAnswer (root, namespace; h/flushdump): every
// address a walk asks is answered as flowed6 holds it through the raw
// reader of the lookups' answers (flowedread.go: one recvmmsg a batch):
// a present address reported absent would leave a walk out while a flow
// to it lives on past its pinhole. flowed6 holds 200 addresses; 400 are
// asked (a batch's 64 many times over, not a multiple of it), two of
// three of the first 300 candidates that are in the set or not by their
// index, every third one outside it, some twice, an IPv4 and a mapped
// one (taken as flowed), then a present and an absent one alone
// (flowedHas). Each answer read is counted: all through the raw reader.
// The lookups alone: a set this small is otherwise read whole
// (flowedsmall.go; TestFlowedSmallSetDumped).
func TestFlowedLookupsEveryAnswer(t *testing.T) {
	defer pinhole.SetFlowedDumpMax(-1)()
	topo, be := guardedTopology(t, pinhole.Config{})
	const inSet = 200
	fillFlowed(t, topo.Host, inSet)
	read := 0
	defer pinhole.SetFlowedRecvHook(func(path string, n int) {
		if path == "mmsg" {
			read += n
		}
	})()
	want := map[netip.Addr]bool{}
	var asked []netip.Addr
	for i := range 400 {
		a := netip.MustParseAddr(fmt.Sprintf("2001:db8:ff00::%x:%x", i>>16, i&0xffff))
		if i%3 == 2 {
			a = netip.MustParseAddr(fmt.Sprintf("2001:db8:fe00::%x", i))
		}
		want[a] = i%3 != 2 && i < inSet
		asked = append(asked, a)
		if i%50 == 7 {
			asked = append(asked, a) // asked twice
		}
	}
	distinct := len(want)
	for _, s := range []string{"192.0.2.1", "::ffff:192.0.2.1"} {
		a := netip.MustParseAddr(s)
		want[a] = true
		asked = append(asked, a)
	}
	flowed, ok := be.FlowedAddrs(asked...)
	if !ok {
		t.Fatal("FlowedAddrs untrusted")
	}
	if read != distinct {
		t.Errorf("%d answers read through the raw reader, want %d (one an IPv6 address asked)", read, distinct)
	}
	present := 0
	for _, a := range asked {
		if got := flowed(a); got != want[a] {
			t.Errorf("flowed(%v) %v, want %v", a, got, want[a])
		}
		if want[a] {
			present++
		}
	}
	if present == 0 || present == len(asked) {
		t.Fatalf("%d of %d asked present: not a mix", present, len(asked))
	}
	alone := map[netip.Addr]bool{
		netip.MustParseAddr(fmt.Sprintf("2001:db8:ff00::%x", inSet-3)): true, // index 197: not asked
		netip.MustParseAddr("2001:db8:fd00::1"):                        false,
	}
	for a, w := range alone {
		if got := flowed(a); got != w {
			t.Errorf("flowed(%v) asked alone %v, want %v", a, got, w)
		}
	}
	if read != distinct+len(alone) {
		t.Errorf("%d answers read through the raw reader, want %d", read, distinct+len(alone))
	}
}
