package server

import (
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"go.uber.org/zap/zaptest"
	"golang.org/x/sys/unix"

	"github.com/pcpd/pcpd/internal/netlab"
)

// TestListenerLeftWithinOnePass (h/lodrop; RELIABILITY.md, h/swap2's
// left item): the listener compares the interfaces only at its passes, so
// a served device that left the namespace and came back on its index, or
// another device put under its name on its index, between two passes
// (no pass found it gone) was reported by nothing: the ownership's view,
// however young, judged the requests arriving there as the old device's
// (DeviceFollower; the swap h/fresh and h/swap2 closed for every other
// timing). The kernel tells every such departure (RTM_DELLINK, on a
// deletion and on a move to another namespace), which follow now records
// for the next pass: each row's changes land between two passes (resync
// called by hand, the subscription read by follow as run reads it) and
// the second pass reports the name. A link going down and up tells no
// departure and is not reported. In every row the socket the first pass
// bound by index keeps receiving, both families, once the addresses are
// back (the move and the deletion flush them, the pass in between sees
// the same addresses on the same index and keeps the socket): the kernel
// closes nothing, and a socket bound by index takes whatever device holds
// the index.
func TestListenerLeftWithinOnePass(t *testing.T) {
	netlab.RequireRoot(t)
	ns := netlab.NewNS(t, "lo1h")
	away := netlab.NewNS(t, "lo1x")
	cli := netlab.NewNS(t, "lo1c")
	h, nh := nsHandles(t, ns)
	a, p := netlab.UniqueIfName("lo1a"), netlab.UniqueIfName("lo1p")
	srv4, srv6 := netip.MustParseAddr("10.77.0.1"), netip.MustParseAddr("2001:db8:77::1")
	cli4, cli6 := netip.MustParseAddr("10.77.0.2"), netip.MustParseAddr("2001:db8:77::2")
	ns.MustRun(t, "ip", "link", "add", a, "type", "veth", "peer", "name", p, "netns", cli.Name)
	index := linkIndex(t, nh, a)
	addrs := func() {
		t.Helper()
		ns.MustRun(t, "ip", "addr", "replace", srv4.String()+"/24", "dev", a)
		ns.MustRun(t, "ip", "addr", "replace", srv6.String()+"/64", "dev", a, "nodad")
		ns.MustRun(t, "ip", "link", "set", a, "up")
		cli.MustRun(t, "ip", "addr", "replace", cli4.String()+"/24", "dev", p)
		cli.MustRun(t, "ip", "addr", "replace", cli6.String()+"/64", "dev", p, "nodad")
		cli.MustRun(t, "ip", "link", "set", p, "up")
	}
	addrs()

	var devs, gone []string
	in := make(chan packet, 64)
	l := &listener{log: zaptest.NewLogger(t), ifaces: []string{a}, port: Port, ns: h, out: in, pass: time.Hour,
		onDevice: func(k []string, g bool) {
			if g {
				gone = append(gone, k...)
			} else {
				devs = append(devs, k...)
			}
		}}
	t.Cleanup(l.closeAll)
	l.followBy(t, subscribeLinks(t, h))
	conn := func(addr netip.Addr) *udpConn {
		l.mu.Lock()
		defer l.mu.Unlock()
		return l.conns[netip.AddrPortFrom(addr, Port)]
	}
	l.resync(nh) // the first pass
	c4, c6 := conn(srv4), conn(srv6)
	if c4 == nil || c6 == nil {
		t.Fatalf("the first pass serves %v, want %v and %v", l.addrs(), srv4, srv6)
	}

	// received waits for a datagram from the client's src to srv on the
	// listener, and returns the socket it came in on.
	received := func(src, dst netip.Addr) (*udpConn, error) {
		if err := cli.Do(func() error {
			c, err := net.DialUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(src, 0)), net.UDPAddrFromAddrPort(netip.AddrPortFrom(dst, Port)))
			if err != nil {
				return err
			}
			defer c.Close()
			_, err = c.Write([]byte("left"))
			return err
		}); err != nil {
			return nil, err
		}
		deadline := time.After(followNever)
		for {
			select {
			case pk := <-in:
				if pk.src.Addr() == src {
					return pk.conn, nil
				}
			case <-deadline:
				return nil, fmt.Errorf("nothing from %v to %v received", src, dst)
			}
		}
	}
	veth := func(where ...string) []string {
		return append([]string{"ip"}, append(where, "link", "add", a, "index", strconv.Itoa(index), "type", "veth", "peer", "name", p, "netns", cli.Name)...)
	}
	for _, step := range []struct {
		name string
		do   []*netlab.NS // where each command runs
		cmds [][]string
		devs []string
	}{
		{"down and up (no departure)", []*netlab.NS{ns, ns}, [][]string{{"ip", "link", "set", a, "down"}, {"ip", "link", "set", a, "up"}}, nil},
		{"moved to another namespace and back, its index kept", []*netlab.NS{ns, away},
			[][]string{{"ip", "link", "set", a, "netns", away.Name}, {"ip", "link", "set", a, "netns", ns.Name}}, []string{a}},
		{"deleted and created again on its index", []*netlab.NS{ns, ns},
			[][]string{{"ip", "link", "del", a}, veth()}, []string{a}},
		{"deleted, another device moved in under its name on its index", []*netlab.NS{ns, away, away},
			[][]string{{"ip", "link", "del", a}, veth(), {"ip", "link", "set", a, "netns", ns.Name}}, []string{a}},
	} {
		for i, cmd := range step.cmds {
			step.do[i].MustRun(t, cmd...)
		}
		addrs()
		if lnk, err := nh.LinkByName(a); err != nil || lnk.Attrs().Index != index {
			t.Fatalf("%s: %s is not back on index %d: %v %v", step.name, a, index, lnk, err)
		}
		if err := l.followedUpTo(ns); err != nil {
			t.Fatalf("%s: %v", step.name, err)
		}
		devs, gone = nil, nil
		l.resync(nh) // the next pass
		if !slices.Equal(devs, step.devs) || len(gone) != 0 {
			t.Errorf("%s, between two passes: reported changed %q, deleted %q; want %q, none", step.name, devs, gone, step.devs)
		}
		for _, f := range []struct {
			src, dst netip.Addr
			kept     *udpConn
		}{{cli4, srv4, c4}, {cli6, srv6, c6}} {
			got, err := received(f.src, f.dst)
			if err != nil {
				t.Errorf("%s: %v (serving %v)", step.name, err, l.addrs())
				continue
			}
			if got != f.kept {
				t.Errorf("%s: %v received on another socket than the first pass's (bound to index %d before, %d now)", step.name, f.dst, f.kept.index, got.index)
			}
		}
	}
}

// subscribeLinks subscribes, in h's namespace, to the notifications the
// listener follows (run's).
func subscribeLinks(t *testing.T, h netns.NsHandle) *nl.NetlinkSocket {
	t.Helper()
	sock, err := nl.SubscribeAt(h, netns.None(), unix.NETLINK_ROUTE, unix.RTNLGRP_LINK, unix.RTNLGRP_IPV4_IFADDR, unix.RTNLGRP_IPV6_IFADDR)
	if err != nil {
		t.Fatal(err)
	}
	return sock
}

// followBy has l follow sock (as run does, no pass poked) until t ends.
func (l *listener) followBy(t *testing.T, sock *nl.NetlinkSocket) {
	done, ended := make(chan struct{}), make(chan struct{})
	go func() { defer close(ended); l.follow(sock, done, func() {}) }()
	t.Cleanup(func() {
		close(done)
		sock.Close()
		<-ended
	})
}

// followedUpTo adds and deletes a link in ns and waits until follow has
// recorded its departure: it has then read every message before it (one
// socket, in order).
func (l *listener) followedUpTo(ns *netlab.NS) error {
	marker := netlab.UniqueIfName("lo1m")
	if out, err := ns.Run("ip", "link", "add", marker, "type", "veth", "peer", "name", netlab.UniqueIfName("lo1q")); err != nil {
		return fmt.Errorf("%w: %s", err, out)
	}
	if out, err := ns.Run("ip", "link", "del", marker); err != nil {
		return fmt.Errorf("%w: %s", err, out)
	}
	return netlab.Eventually(followNever, func() error {
		l.leftMu.Lock()
		defer l.leftMu.Unlock()
		if !l.left.has(0, marker) {
			return fmt.Errorf("%s's departure not recorded", marker)
		}
		return nil
	})
}

// linkIndex is the index of the link named name in h's namespace.
func linkIndex(t *testing.T, h *netlink.Handle, name string) int {
	t.Helper()
	lnk, err := h.LinkByName(name)
	if err != nil {
		t.Fatal(err)
	}
	return lnk.Attrs().Index
}
