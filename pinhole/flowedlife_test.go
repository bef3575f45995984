package pinhole_test

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pinhole"
)

// TestFlowedRegainAfterOverflow (root, namespace; h/flowedlife,
// pinhole/flowedlife.go): flowed6 full (65 536 addresses), a flow through
// a pinhole is admitted unrecorded (its add fails, admit6's counter
// rises): the record is untrusted. RegainFlowed rebuilds it from
// conntrack: trusted, the flow's address recorded (it was admitted before
// the rebuild and missing from the set), the set's leftovers gone, and
// admit6's counter at 0. Before, the record stayed untrusted for the
// Backend's life (no RegainFlowed: main does not build this test).
func TestFlowedRegainAfterOverflow(t *testing.T) {
	topo, be := guardedTopology(t, pinhole.Config{})
	var b strings.Builder
	b.WriteString("add element inet pcpd flowed6 {")
	for i := range 1 << 16 {
		fmt.Fprintf(&b, " 2001:db8:ffff::%x:%x,", i>>8, i&0xff)
	}
	b.WriteString(" }\n")
	f := filepath.Join(t.TempDir(), "fill.nft")
	if err := os.WriteFile(f, []byte(b.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	topo.Host.MustRun(t, "nft", "-f", f)
	client := flowThrough(t, topo, be, 7300)
	if _, ok := be.FlowedAddrs(); ok {
		t.Fatal("record trusted after an add to a full flowed6 failed: nothing to test")
	}
	trusted, err := be.RegainFlowed(false)
	if err != nil || !trusted {
		t.Fatalf("RegainFlowed: %v, %v", trusted, err)
	}
	flowed, ok := be.FlowedAddrs(client.Addr())
	if !ok {
		t.Fatal("record untrusted after RegainFlowed")
	}
	if !flowed(client.Addr()) {
		t.Error("the address of a flow admitted unrecorded before the rebuild not recorded by it")
	}
	if flowed(netip.MustParseAddr("2001:db8:ffff::1:1")) {
		t.Error("a leftover (no flow) still in flowed6 after the rebuild")
	}
	out := topo.Host.MustRun(t, "nft", "list", "chain", "inet", "pcpd", "admit6")
	if !regexp.MustCompile(`counter packets 0 `).MatchString(out) {
		t.Errorf("admit6's counter not at 0 after the rebuild:\n%s", out)
	}
	// A second flow is recorded by the ruleset again (room in the set).
	other := netip.AddrPortFrom(topo.ClientV6, 7301)
	apply(t, be, install(pinhole.Pinhole{Protocol: udp, InternalAddr: other.Addr(), InternalPort: other.Port()}, time.Hour))
	if _, ok := be.FlowedAddrs(); !ok {
		t.Error("record untrusted after a pinhole's install following the rebuild")
	}
}

// TestFlowedMarkDistrusted (root, namespace; h/flowedlife): flowed6
// holding the mark (::), as a pcpd stopped part way through a rebuild
// leaves it (admit6's counter then at 0), a Setup over the table does not
// trust the record; RegainFlowed trusts it again and the mark goes. Before
// (main), the counter alone was read: "a Setup over a table marked
// untrusted trusts the record".
func TestFlowedMarkDistrusted(t *testing.T) {
	topo, _ := guardedTopology(t, pinhole.Config{})
	topo.Host.MustRun(t, "nft", "add", "element", "inet", "pcpd", "flowed6", "{ :: }")
	be := newBackend(t, topo.Host, pinhole.Config{})
	serveTunnel(t, be, topo)
	if err := be.SetProtected([]netip.Prefix{topo.ClientPrefix6, topo.ClientPrefix4}); err != nil {
		t.Fatal(err)
	}
	if _, ok := be.FlowedAddrs(); ok {
		t.Fatal("a Setup over a table marked untrusted trusts the record")
	}
	if trusted, err := be.RegainFlowed(false); err != nil || !trusted {
		t.Fatalf("RegainFlowed: %v, %v", trusted, err)
	}
	if _, ok := be.FlowedAddrs(); !ok {
		t.Error("record untrusted after RegainFlowed")
	}
	if out := topo.Host.MustRun(t, "nft", "list", "set", "inet", "pcpd", "flowed6"); strings.Contains(out, " :: ") || strings.Contains(out, "{ ::") {
		t.Errorf("the mark still in flowed6 after RegainFlowed:\n%s", out)
	}
}
