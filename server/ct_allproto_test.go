package server

import (
	"errors"
	"net/netip"
	"runtime"
	"strconv"
	"sync"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/pcpd/pcpd/internal/ctnl"
	"github.com/pcpd/pcpd/internal/netlab"
)

// TestCtAllProtoWalkStreamed (root, h/allproto): the kernel-filtered
// walk's all-protocols group (an IPv6 all-protocols mapping's end: group
// protocol 0, whose dump is the family's whole table) judges its dump as
// it streams in. In a namespace of 100 000 unrelated IPv6 entries, 6 000
// TCP and UDP entries to the ended mapping's address and 100 to another
// address, the flusher's walk (live) asks spare about every one of the
// 6 000 (in chunks: more than ctHitChunk) and ends exactly those it does
// not keep (a third kept), named by what the dump gave though the read
// buffer was reused meanwhile; every other entry stays. What the walk
// allocates stays well under the table's size: read whole (Execute), the
// dump alone was ≈ 1.1 KB an entry (BenchmarkCtAllProtoWalk), and this
// test failed with "allocated 127.5 MB"; streamed, ≈ 1 KB a flow matched,
// whatever the table holds besides. A second walk whose table
// resizes meanwhile (ctHashSize changes) still ends what it found and
// fails with ErrResized (walked again), as the read-whole dump did.
func TestCtAllProtoWalkStreamed(t *testing.T) {
	netlab.RequireRoot(t)
	ns := netlab.NewNS(t, "ctallproto")
	h, nh := nsHandles(t, ns)
	const unrelated, ours, others = 100000, 6000, 100
	ns.MustRun(t, "sysctl", "-qw", "net.netfilter.nf_conntrack_max="+strconv.Itoa(2*(unrelated+ours+others)))
	fillUnrelated6(t, ns, unrelated)
	addr, other := netip.MustParseAddr("2001:db8:1::7"), netip.MustParseAddr("2001:db8:1::8")
	fillFlowsTo(t, ns, addr, ours)
	fillFlowsTo(t, ns, other, others)
	d, err := dialConntrack(int(h))
	if err != nil {
		t.Fatal(err)
	}
	defer d.close()
	var mu sync.Mutex
	asked, chunks := 0, 0
	d.live = true
	d.spare = func(hits []ctHit) {
		mu.Lock()
		defer mu.Unlock()
		chunks++
		for i := range hits {
			asked++
			hits[i].keep = hits[i].src.Port()%3 == 0
		}
	}
	fs := []ctFilter{{t: ctTarget{addr: addr}}}
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	n, err := d.end(ctGroup{}, fs)
	runtime.ReadMemStats(&after)
	kept := 0
	for i := range ours {
		if (1024+i)%3 == 0 {
			kept++
		}
	}
	if err != nil || n != ours-kept {
		t.Fatalf("walk: %d ended, %v; want %d", n, err, ours-kept)
	}
	if asked != ours || chunks < 2 {
		t.Errorf("spare asked about %d flows in %d chunks, want %d in ≥ 2", asked, chunks, ours)
	}
	alloc := after.TotalAlloc - before.TotalAlloc
	t.Logf("the walk allocated %.2f MB over %d entries", float64(alloc)/1e6, unrelated+ours+others)
	if alloc > 32<<20 {
		t.Errorf("allocated %.1f MB, want < 32 (a dump read whole)", float64(alloc)/1e6)
	}
	flows, err := nh.ConntrackTableList(netlink.ConntrackTable, netlink.FAMILY_V6)
	if err != nil {
		t.Fatal(err)
	}
	left := map[netip.Addr]int{}
	for _, f := range flows {
		to, _ := netip.AddrFromSlice(f.Forward.DstIP)
		left[to]++
		if to == addr && f.Forward.SrcPort%3 != 0 {
			t.Errorf("a flow spare did not keep is left: %s", f)
		}
	}
	if left[addr] != kept || left[other] != others || left[unrelatedDst6] != unrelated {
		t.Errorf("left %d of the mapping's (want %d kept), %d of the other address's (want %d), %d unrelated (want %d)",
			left[addr], kept, left[other], others, left[unrelatedDst6], unrelated)
	}

	// Resized during the dump: what it found is ended (every flow of
	// the address: nothing spared now), the group fails.
	fillFlowsTo(t, ns, addr, 10)
	flows, err = nh.ConntrackTableList(netlink.ConntrackTable, netlink.FAMILY_V6)
	if err != nil {
		t.Fatal(err)
	}
	want := 0
	for _, f := range flows {
		if to, _ := netip.AddrFromSlice(f.Forward.DstIP); to == addr {
			want++
		}
	}
	defer func(f func() string) { ctHashSize = f }(ctHashSize)
	size := 0
	ctHashSize = func() string { size++; return strconv.Itoa(size) }
	d.spare = nil
	n, err = d.end(ctGroup{}, fs)
	if !errors.Is(err, ctnl.ErrResized) || n != want || want <= kept {
		t.Errorf("resized walk: %d ended, %v; want %d (> %d) and ErrResized", n, err, want, kept)
	}
}

// unrelatedDst6 is where fillUnrelated6's entries go.
var unrelatedDst6 = netip.MustParseAddr("2001:db8:fe::1")

// fillUnrelated6 adds n IPv6 UDP entries to ns's conntrack table, from
// 2001:db8:ff::/112 ports 1024-61023 to [unrelatedDst6]:53: no
// mapping's.
func fillUnrelated6(tb testing.TB, ns *netlab.NS, n int) {
	src6 := netip.MustParseAddr("2001:db8:ff::1").As16()
	netlab.FillConntrack(tb, ns, n, func(i int) netlab.ConntrackEntry {
		s := src6
		s[14], s[15] = byte(i/60000>>8), byte(i/60000)
		return netlab.ConntrackEntry{Proto: unix.IPPROTO_UDP, Src: netip.AddrPortFrom(netip.AddrFrom16(s), uint16(1024+i%60000)),
			Dst: netip.AddrPortFrom(unrelatedDst6, 53), Status: 2 | 4}
	})
}

// fillFlowsTo adds n entries to ns's conntrack table, TCP and UDP in
// turn, from [2001:db8:ff::2]:1024+i to ports 2000-2006 of to.
func fillFlowsTo(tb testing.TB, ns *netlab.NS, to netip.Addr, n int) {
	rem := netip.MustParseAddr("2001:db8:ff::2")
	netlab.FillConntrack(tb, ns, n, func(i int) netlab.ConntrackEntry {
		proto := uint8(unix.IPPROTO_TCP)
		if i%2 == 1 {
			proto = unix.IPPROTO_UDP
		}
		return netlab.ConntrackEntry{Proto: proto, Src: netip.AddrPortFrom(rem, uint16(1024+i)), Dst: netip.AddrPortFrom(to, uint16(2000+i%7)), Status: 2 | 4}
	})
}
