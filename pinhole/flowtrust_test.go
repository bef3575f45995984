package pinhole_test

import (
	"fmt"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	mdnetlink "github.com/mdlayher/netlink"
	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv6"
	"golang.org/x/sys/unix"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// flowThrough installs a UDP pinhole at the client's port and sends one
// datagram through it (a labelled flow, its address recorded).
func flowThrough(t *testing.T, topo *netlab.Topology, be *pinhole.Backend, port uint16) netip.AddrPort {
	t.Helper()
	client := netip.AddrPortFrom(topo.ClientV6, port)
	rx := listenUDP(t, topo.Client, client)
	apply(t, be, install(pinhole.Pinhole{Protocol: udp, InternalAddr: client.Addr(), InternalPort: client.Port()}, time.Hour))
	sendUDPFrom(t, topo.Internet, client)
	rx.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := rx.Read(make([]byte, 16)); err != nil {
		t.Fatalf("datagram through the pinhole: %v", err)
	}
	return client
}

// TestFlowedWitnessAfterFailedWrite (root, namespace; h/flowtrust): the
// watch sees flowed6 flushed by another process (flowedTampered): the
// record is untrusted, and what says so to a later pcpd over the table
// is written. Those writes failing (FailFlushes), the next firewall
// check that finds the layout intact (Healthy), or a stop (Close),
// writes them again: a later pcpd's Setup does not trust the record,
// which lacks the address of a live flow. Before, flowedTampered wrote
// the mark alone, once: failed, the kernel said "trusted" (admit6's
// counter at 0, no mark) and a restart trusted the flushed record (the
// delete of the flow's mapping would leave its walk out).
func TestFlowedWitnessAfterFailedWrite(t *testing.T) {
	for _, next := range []string{"check", "stop"} {
		t.Run(next, func(t *testing.T) {
			topo, be := guardedTopology(t, pinhole.Config{})
			client := flowThrough(t, topo, be, 7500)
			if flowed, ok := be.FlowedAddrs(client.Addr()); !ok || !flowed(client.Addr()) {
				t.Fatal("the flow's address not recorded: nothing to test")
			}
			topo.Host.MustRun(t, "nft", "flush", "set", "inet", "pcpd", "flowed6")
			pinhole.FailFlushes(be, 2) // the counter's write, the mark's
			pinhole.FlowedTampered(be)
			if _, ok := be.FlowedAddrs(); ok {
				t.Fatal("record trusted after flowed6 was flushed")
			}
			switch next {
			case "check":
				if err := be.Healthy(); err != nil {
					t.Fatalf("Healthy: %v", err)
				}
			case "stop":
				be.Close()
			}
			if laterTrustsWithout(t, topo, client.Addr()) {
				t.Errorf("a later Setup trusts the record the last pcpd knew incomplete (flowed6 flushed, its witness's write failed, then a %s): the address of a live flow unrecorded", next)
			}
		})
	}
}

// pingMany sends one ICMPv6 echo request from Internet to each of n
// distinct addresses of the client's prefix (n conntrack entries).
func pingMany(t *testing.T, topo *netlab.Topology, n int) {
	t.Helper()
	if err := topo.Internet.Do(func() error {
		tx, err := net.ListenPacket("ip6:ipv6-icmp", topo.InternetV6.String())
		if err != nil {
			return err
		}
		defer tx.Close()
		for i := range n {
			a := topo.ClientPrefix6.Addr().As16()
			a[13], a[14], a[15] = 0xec, byte(i>>8), byte(i)
			m := icmp.Message{Type: ipv6.ICMPTypeEchoRequest, Body: &icmp.Echo{ID: 7, Seq: i, Data: []byte("x")}}
			b, err := m.Marshal(nil)
			if err != nil {
				return err
			}
			if _, err := tx.WriteTo(b, &net.IPAddr{IP: netip.AddrFrom16(a).AsSlice()}); err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
}

// TestRegainIgnoresEcho (root, namespace; h/flowtrust): echo requests to
// more distinct addresses of a protected prefix than flowed6 holds
// (AllowEcho: admitted unlabelled, by no pinhole; flowed6 made 64 large
// here) do not stop a rebuild from trusting the record: only labelled
// flows (a pinhole's admission) are recorded, as the ruleset records
// them; a labelled flow's address is recorded, an echo's is not. Before,
// the rebuild recorded every IPv6 flow to a protected address: "64 or
// more addresses with flows: more than flowed6 holds", and anyone able
// to ping a client's prefix kept every delete on the full walk.
func TestRegainIgnoresEcho(t *testing.T) {
	defer pinhole.SetFlowedSize(64)()
	topo, be := guardedTopology(t, pinhole.Config{AllowEcho: true})
	client := flowThrough(t, topo, be, 7600)
	pingMany(t, topo, 100)
	trusted, err := be.RegainFlowed(true)
	if err != nil || !trusted {
		t.Fatalf("RegainFlowed with echo flows to 100 addresses live: %v, %v", trusted, err)
	}
	echoed := topo.ClientPrefix6.Addr().As16()
	echoed[13] = 0xec
	flowed, ok := be.FlowedAddrs(client.Addr(), netip.AddrFrom16(echoed))
	if !ok {
		t.Fatal("record untrusted after RegainFlowed")
	}
	if !flowed(client.Addr()) {
		t.Error("the address of a flow a pinhole admitted not recorded by the rebuild")
	}
	if flowed(netip.AddrFrom16(echoed)) {
		t.Error("an echo's destination recorded by the rebuild")
	}
}

// resetRuleCounters resets the counters of chain's rules in inet table
// as "nft reset rules inet TABLE CHAIN" does (NFT_MSG_GETRULE_RESET, nft
// 1.0.7 and later; the CI's nft 1.0.6 has no such command).
func resetRuleCounters(t *testing.T, ns *netlab.NS, table, chain string) {
	t.Helper()
	if err := ns.Do(func() error {
		c, err := mdnetlink.Dial(unix.NETLINK_NETFILTER, nil)
		if err != nil {
			return err
		}
		defer c.Close()
		ae := mdnetlink.NewAttributeEncoder()
		ae.String(unix.NFTA_RULE_TABLE, table)
		ae.String(unix.NFTA_RULE_CHAIN, chain)
		attrs, err := ae.Encode()
		if err != nil {
			return err
		}
		_, err = c.Execute(mdnetlink.Message{
			Header: mdnetlink.Header{
				Type:  mdnetlink.HeaderType(unix.NFNL_SUBSYS_NFTABLES<<8 | unix.NFT_MSG_GETRULE_RESET),
				Flags: mdnetlink.Request | mdnetlink.Dump,
			},
			Data: append([]byte{unix.NFPROTO_INET, unix.NFNETLINK_V0, 0, 0}, attrs...),
		})
		return err
	}); err != nil {
		t.Fatalf("reset of %s's rule counters: %v", chain, err)
	}
}

// TestFlowedCounterReset (root, namespace; h/flowtrust): an add to a
// full flowed6 fails (admit6's counter at 1: a flow's address
// unrecorded), then someone resets the table's rule counters ("nft reset
// rules", which the kernel tells no one): the counter's packets are 0
// again. Neither the running Backend nor a later one over the table
// trusts the record: admit6's counter is written with its bytes at a
// base (counterBase), which the reset brings to 0. Before, both trusted
// it, the flow's address missing.
func TestFlowedCounterReset(t *testing.T) {
	defer pinhole.SetFlowedSize(16)()
	topo, be := guardedTopology(t, pinhole.Config{})
	var b strings.Builder
	for i := range 16 {
		fmt.Fprintf(&b, "2001:db8:ffff::%x,", i)
	}
	topo.Host.MustRun(t, "nft", "add", "element", "inet", "pcpd", "flowed6", "{ "+b.String()+" }")
	client := flowThrough(t, topo, be, 7700)
	if out := topo.Host.MustRun(t, "nft", "list", "chain", "inet", "pcpd", "admit6"); !strings.Contains(out, "counter packets 1 ") {
		t.Fatalf("admit6's counter not at 1 after an add to a full flowed6: nothing to test\n%s", out)
	}
	resetRuleCounters(t, topo.Host, "pcpd", "admit6")
	if out := topo.Host.MustRun(t, "nft", "list", "chain", "inet", "pcpd", "admit6"); !strings.Contains(out, "counter packets 0 bytes 0 ") {
		t.Fatalf("admit6's counter not reset: nothing to test\n%s", out)
	}
	if flowed, ok := be.FlowedAddrs(client.Addr()); ok && !flowed(client.Addr()) {
		t.Error("record trusted after admit6's counter was reset, the address of a flow admitted unrecorded missing")
	}
	if laterTrustsWithout(t, topo, client.Addr()) {
		t.Error("a later Setup trusts the record after admit6's counter was reset, the address of a flow admitted unrecorded missing")
	}
}

// laterTrustsWithout reports whether a later pcpd over topo's table (a
// Backend's Setup and first SetProtected, as a start) trusts a record
// that lacks a (the server would leave the walk of a's mapping out).
func laterTrustsWithout(t *testing.T, topo *netlab.Topology, a netip.Addr) bool {
	t.Helper()
	later := newBackend(t, topo.Host, pinhole.Config{})
	serveTunnel(t, later, topo)
	if err := later.SetProtected([]netip.Prefix{topo.ClientPrefix6, topo.ClientPrefix4}); err != nil {
		t.Fatal(err)
	}
	flowed, ok := later.FlowedAddrs(a)
	return ok && !flowed(a)
}

// TestWatchFlowedFlushDamage (root, namespace): someone's flush of
// flowed6 is told as damage naming the set, so that the server's watch
// logs it and checks the firewall at once (the check rebuilds the record
// from conntrack); and by the time it is told the record is untrusted and
// its witness written (a later Setup does not trust it either). Before
// (h/flushflake's left item), the flush was told as nothing: logged
// nowhere, and the record stayed untrusted until the periodic check.
func TestWatchFlowedFlushDamage(t *testing.T) {
	topo, be := guardedTopology(t, pinhole.Config{})
	client := flowThrough(t, topo, be, 7700)
	if flowed, ok := be.FlowedAddrs(client.Addr()); !ok || !flowed(client.Addr()) {
		t.Fatal("the flow's address not recorded: nothing to test")
	}
	evs := watching(t, be)
	topo.Host.MustRun(t, "nft", "flush", "set", "inet", "pcpd", "flowed6")
	ev := nextEvent(t, evs, "nft flush set of flowed6")
	if !strings.Contains(ev.Damage, "flowed6") {
		t.Errorf("told %+v after nft flush set inet pcpd flowed6, want damage naming flowed6", ev)
	}
	if _, ok := be.FlowedAddrs(); ok {
		t.Error("record trusted when the flush of flowed6 was told")
	}
	if laterTrustsWithout(t, topo, client.Addr()) {
		t.Error("a later Setup trusts the record flushed by hand: its witness not written before the flush was told")
	}
}
