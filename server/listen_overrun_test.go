package server

import (
	"net/netip"
	"slices"
	"strconv"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"
	"golang.org/x/sys/unix"

	"github.com/pcpd/pcpd/internal/netlab"
)

// TestListenerLeftOverrun (review h/revdw of h/lodrop): follow records
// the links the kernel tells gone (RTM_DELLINK) so that a served device
// gone and back on its index between two passes is reported changed
// (TestListenerLeftWithinOnePass). A subscription overrun (ENOBUFS: a
// link or address storm, containers' veths coming and going) loses
// notifications, that device's RTM_DELLINK among them, and the pass the
// error asks for sees the name on its index as before: nothing told the
// ownership. After an overrun follow now counts every served name as
// gone and back (as beyond maxLeft departures): the ownership reads its
// devices again. Here the subscription's receive buffer is the kernel's
// least and follow starts only after the storm: links added, then the
// served one deleted and created again on its index, its departure lost.
func TestListenerLeftOverrun(t *testing.T) {
	netlab.RequireRoot(t)
	ns := netlab.NewNS(t, "lo2h")
	h, nh := nsHandles(t, ns)
	a, p := netlab.UniqueIfName("lo2a"), netlab.UniqueIfName("lo2p")
	srv4 := netip.MustParseAddr("10.78.0.1")
	ns.MustRun(t, "ip", "link", "add", a, "type", "veth", "peer", "name", p)
	index := linkIndex(t, nh, a)
	up := func() {
		t.Helper()
		ns.MustRun(t, "ip", "addr", "replace", srv4.String()+"/24", "dev", a)
		ns.MustRun(t, "ip", "link", "set", a, "up")
		ns.MustRun(t, "ip", "link", "set", p, "up")
	}
	up()
	var devs, gone []string
	l := &listener{log: zaptest.NewLogger(t), ifaces: []string{a}, port: Port, ns: h, out: make(chan packet, 1), pass: time.Hour,
		onDevice: func(k []string, g bool) {
			if g {
				gone = append(gone, k...)
			} else {
				devs = append(devs, k...)
			}
		}}
	t.Cleanup(l.closeAll)
	sock := subscribeLinks(t, h)
	if err := unix.SetsockoptInt(sock.GetFd(), unix.SOL_SOCKET, unix.SO_RCVBUF, 0); err != nil {
		t.Fatal(err)
	}
	l.resync(nh) // the first pass
	if len(l.addrs()) == 0 {
		t.Fatalf("the first pass serves nothing")
	}
	for i := range 8 { // the storm: fills the receive buffer
		ns.MustRun(t, "ip", "link", "add", netlab.UniqueIfName("lo2s"+strconv.Itoa(i)), "type", "veth", "peer", "name", netlab.UniqueIfName("lo2t"+strconv.Itoa(i)))
	}
	ns.MustRun(t, "ip", "link", "del", a)
	ns.MustRun(t, "ip", "link", "add", a, "index", strconv.Itoa(index), "type", "veth", "peer", "name", p)
	up()

	l.followBy(t, sock)
	if err := l.followedUpTo(ns); err != nil {
		t.Fatal(err)
	}
	l.resync(nh) // the next pass
	if want := []string{a}; !slices.Equal(devs, want) || len(gone) != 0 {
		t.Errorf("served device deleted and created again on its index during a subscription overrun: the next pass reported changed %q, deleted %q; want %q, none", devs, gone, want)
	}
}
