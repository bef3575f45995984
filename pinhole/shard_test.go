package pinhole_test

import (
	"fmt"
	"net/netip"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pinhole"
)

// TestPortShardsUpgrade: a table an earlier pcpd laid out, all its port
// pinholes in pin6 (no pin6_1 .. pin6_7, guard6 and recheck6 looking up
// pin6 alone), taken over by a start of this one: its Setup adds the
// shards and their lookups, then moves every element to the shard its
// key hashes to (movePortShards), with the time it had left. After it
// each pinhole is in its own set, List reads every one back as a pinhole
// (none odd: an element left in the wrong set would be read as an odd
// one, and the audit would delete it), and traffic still passes.
//
// cut_short: the same elements in pin6 beside its shards, as a move cut
// short by a crash leaves them. Before, only a table without pin6_1 was
// moved: these stayed in pin6, unlisted ('not listed', 'pin6 still
// holds 64 of the 64 elements'), and the audit would have deleted them.
func TestPortShardsUpgrade(t *testing.T) {
	for _, older := range []bool{true, false} {
		name := map[bool]string{true: "older_table", false: "cut_short"}[older]
		t.Run(name, func(t *testing.T) { testPortShardsUpgrade(t, older) })
	}
}

func testPortShardsUpgrade(t *testing.T, older bool) {
	topo, _ := guardedTopology(t, pinhole.Config{})
	host, client := topo.Host, topo.ClientV6
	if older {
		// The earlier layout: the shards' lookups and the shards gone.
		for _, chain := range []string{"guard6", "recheck6"} {
			out := host.MustRun(t, "nft", "-a", "list", "chain", "inet", "pcpd", chain)
			for _, m := range regexp.MustCompile(`@pin6_\d+ .*# handle (\d+)`).FindAllStringSubmatch(out, -1) {
				host.MustRun(t, "nft", "delete", "rule", "inet", "pcpd", chain, "handle", m[1])
			}
		}
		for i := 1; i < 8; i++ {
			host.MustRun(t, "nft", "delete", "set", "inet", "pcpd", fmt.Sprintf("pin6_%d", i))
		}
	}
	var elems []string
	var pins []pinhole.Pinhole
	for port := uint16(7000); port < 7064; port++ {
		elems = append(elems, fmt.Sprintf("%s . udp . %d timeout 1h", client, port))
		pins = append(pins, pinhole.Pinhole{Protocol: udp, InternalAddr: client, InternalPort: port, ExternalAddr: client, ExternalPort: port})
	}
	host.MustRun(t, "nft", "add element inet pcpd pin6 { "+strings.Join(elems, ", ")+" }")
	moved := netip.AddrPortFrom(client, 0)
	for _, p := range pins {
		if pinhole.PortSetName(p.InternalAddr, p.Protocol, p.InternalPort) != "pin6" {
			moved = netip.AddrPortFrom(client, p.InternalPort)
			break
		}
	}
	serve(t, topo.Client, udp, moved)
	mustReach(t, "before the upgrade", topo.Internet, udp, netip.Addr{}, moved)

	nb := newBackend(t, host, pinhole.Config{})
	entries, err := nb.List()
	if err != nil {
		t.Fatal(err)
	}
	got := map[pinhole.Pinhole]bool{}
	for _, e := range entries {
		if e.Pinhole.Odd() {
			t.Errorf("after the upgrade: %v listed as odd (in the wrong set)", e.Pinhole)
			continue
		}
		got[e.Pinhole] = true
		if e.Remaining < 59*time.Minute || e.Remaining > time.Hour {
			t.Errorf("after the upgrade: %v has %v left, want its hour less the test's time", e.Pinhole, e.Remaining)
		}
	}
	for _, p := range pins {
		if !got[p] {
			t.Errorf("after the upgrade: %v not listed", p)
		}
		set := pinhole.PortSetName(p.InternalAddr, p.Protocol, p.InternalPort)
		if _, err := host.Run("nft", "get", "element", "inet", "pcpd", set, "{", fmt.Sprintf("%s . udp . %d", client, p.InternalPort), "}"); err != nil {
			t.Errorf("after the upgrade: %v not in %s: %v", p, set, err)
		}
	}
	if n := strings.Count(nftList(t, host, "set", "inet", "pcpd", "pin6"), " . udp . "); n >= len(pins) {
		t.Errorf("pin6 still holds %d of the %d elements", n, len(pins))
	}
	mustReach(t, "after the upgrade", topo.Internet, udp, netip.Addr{}, moved)
}
