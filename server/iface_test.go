package server

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"runtime"
	"testing"
	"time"

	"github.com/vishvananda/netns"
	"go.uber.org/zap/zaptest"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/policy"
)

// TestInterfaceComesBack: the serving interface is deleted and re-created
// under the same name: pcpd keeps running, stops serving while it is gone
// and serves the new one (a new interface index) without a restart.
func TestInterfaceComesBack(t *testing.T) {
	srvNS, cliNS := netlab.NewNS(t, "srv"), netlab.NewNS(t, "cli")
	srvAddr, cliAddr := netip.MustParseAddr("2001:db8:7::1"), netip.MustParseAddr("2001:db8:7::2")
	build := func() {
		if err := netlab.Veth(cliNS, "eth0", srvNS, "pcp0"); err != nil {
			t.Fatal(err)
		}
		srvNS.MustRun(t, "ip", "addr", "add", srvAddr.String()+"/64", "dev", "pcp0", "nodad")
		cliNS.MustRun(t, "ip", "addr", "add", cliAddr.String()+"/64", "dev", "eth0", "nodad")
	}
	build()
	h, pol := servedBy(t, srvNS, "2001:db8:7::/64")
	sv := startServing(t, Config{Interfaces: []string{"pcp0"}, NetNS: h, KeepConnections: true}, pol, zaptest.NewLogger(t))
	defer sv.stop()
	s := sv.s

	ask := func() error {
		var c *net.UDPConn
		if err := cliNS.Do(func() (err error) {
			c, err = net.DialUDP("udp6", &net.UDPAddr{IP: cliAddr.AsSlice()}, net.UDPAddrFromAddrPort(netip.AddrPortFrom(srvAddr, Port)))
			return err
		}); err != nil {
			return err
		}
		defer c.Close()
		c.Write(pcp.AppendRequest(nil, pcp.NewAnnounce(cliAddr)))
		c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
		_, err := c.Read(make([]byte, 64))
		return err
	}
	if err := netlab.Eventually(5*time.Second, ask); err != nil {
		t.Fatalf("not served: %v", err)
	}
	srvNS.MustRun(t, "ip", "link", "del", "pcp0")
	if err := netlab.Eventually(5*time.Second, func() error {
		if len(s.Status().Listen) != 0 {
			return errors.New("still serving a deleted interface")
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	build()
	start := time.Now()
	if err := netlab.Eventually(5*time.Second, ask); err != nil {
		t.Fatalf("not served after the interface came back: %v", err)
	}
	t.Logf("served again %v after the interface came back", time.Since(start).Round(time.Millisecond))
}

// TestServeNoLeaks: starting and stopping the engine leaves no goroutine
// (sockets, netlink subscriptions, announcements) behind.
func TestServeNoLeaks(t *testing.T) {
	ns := netlab.NewNS(t, "leak")
	ns.MustRun(t, "ip", "link", "add", "d0", "type", "veth", "peer", "name", "d1")
	ns.MustRun(t, "ip", "link", "set", "d1", "up")
	ns.MustRun(t, "ip", "addr", "add", "2001:db8:8::1/64", "dev", "d0", "nodad")
	ns.MustRun(t, "ip", "addr", "add", "10.8.0.1/24", "dev", "d0")
	ns.MustRun(t, "ip", "link", "set", "d0", "up")
	h, pol := servedBy(t, ns, "2001:db8:8::/64")
	cycle := func() {
		sv := startServing(t, Config{Interfaces: []string{"d0"}, NetNS: h, KeepConnections: true}, pol, nil)
		if err := netlab.Eventually(3*time.Second, func() error {
			if len(sv.s.Status().Listen) < 2 {
				return errors.New("not serving")
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		if err := sv.stop(); err != nil {
			t.Fatal(err)
		}
		<-sv.s.announceDone
	}
	cycle()
	time.Sleep(100 * time.Millisecond)
	base := runtime.NumGoroutine()
	for range 5 {
		cycle()
	}
	if err := netlab.Eventually(3*time.Second, func() error {
		if n := runtime.NumGoroutine(); n > base+1 {
			return fmt.Errorf("%d goroutines, %d before", n, base)
		}
		return nil
	}); err != nil {
		buf := make([]byte, 1<<16)
		t.Fatalf("%v\n%s", err, buf[:runtime.Stack(buf, true)])
	}
}

// TestANN04Multicast: with AnnounceMulticast (non-WireGuard links) the
// unsolicited ANNOUNCE goes to [ff02::1]:5350 and 224.0.0.1:5350, and the
// NAT-PMP announcement to 224.0.0.1:5350 (PMP-13), from port 5351 of the
// serving address.
func TestANN04Multicast(t *testing.T) {
	srvNS, cliNS := netlab.NewNS(t, "msrv"), netlab.NewNS(t, "mcli")
	if err := netlab.Veth(cliNS, "eth0", srvNS, "lan0"); err != nil {
		t.Fatal(err)
	}
	srvNS.MustRun(t, "ip", "addr", "add", "2001:db8:9::1/64", "dev", "lan0", "nodad")
	srvNS.MustRun(t, "ip", "addr", "add", "10.9.0.1/24", "dev", "lan0")
	cliNS.MustRun(t, "ip", "addr", "add", "2001:db8:9::2/64", "dev", "eth0", "nodad")
	cliNS.MustRun(t, "ip", "addr", "add", "10.9.0.2/24", "dev", "eth0")
	var c6, c4 *net.UDPConn
	if err := cliNS.Do(func() (err error) {
		if c6, err = net.ListenUDP("udp6", &net.UDPAddr{Port: pcp.ClientPort}); err != nil {
			return err
		}
		c4, err = net.ListenUDP("udp4", &net.UDPAddr{Port: pcp.ClientPort})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer c6.Close()
	defer c4.Close()
	h, pol := servedBy(t, srvNS, "2001:db8:9::/64")
	sv := startServing(t, Config{Interfaces: []string{"lan0"}, NetNS: h, KeepConnections: true, AnnounceMulticast: true,
		ExternalIPv4: netip.MustParseAddr("198.51.100.9")}, pol, nil)
	defer sv.stop()

	buf := make([]byte, 64)
	c6.SetReadDeadline(time.Now().Add(3 * time.Second))
	n, from, err := c6.ReadFromUDPAddrPort(buf)
	if err != nil {
		t.Fatalf("no IPv6 multicast ANNOUNCE: %v", err)
	}
	var r pcp.Response
	if err := pcp.ParseResponse(buf[:n], &r); err != nil || r.Opcode != pcp.OpAnnounce || from.Port() != Port {
		t.Fatalf("from %v: % x: %v", from, buf[:n], err)
	}
	var sawPCP, sawPMP bool
	for !sawPCP || !sawPMP {
		c4.SetReadDeadline(time.Now().Add(3 * time.Second))
		n, from, err := c4.ReadFromUDPAddrPort(buf)
		if err != nil {
			t.Fatalf("IPv4 multicast: PCP %v, NAT-PMP %v: %v", sawPCP, sawPMP, err)
		}
		if from != netip.MustParseAddrPort("10.9.0.1:5351") {
			t.Fatalf("from %v", from)
		}
		switch buf[0] {
		case pcp.Version:
			sawPCP = true
		case pcp.PMPVersion:
			var p pcp.PMPResponse
			if err := pcp.ParsePMPResponse(buf[:n], &p); err != nil || p.ExternalAddr != netip.MustParseAddr("198.51.100.9") {
				t.Fatalf("% x: %v", buf[:n], err)
			}
			sawPMP = true
		}
	}
}

// TestEPO04StoreHousekeeping: while serving, the engine marks the store
// alive every TouchInterval (clock-doubt detection at the next start,
// EPO-04) and writes the backup copy every SnapshotInterval and once more
// at graceful shutdown.
func TestEPO04StoreHousekeeping(t *testing.T) {
	ns := netlab.NewNS(t, "hk")
	ns.MustRun(t, "ip", "link", "add", "d0", "type", "veth", "peer", "name", "d1")
	ns.MustRun(t, "ip", "link", "set", "d1", "up")
	ns.MustRun(t, "ip", "addr", "add", "2001:db8:8::1/64", "dev", "d0", "nodad")
	ns.MustRun(t, "ip", "link", "set", "d0", "up")
	h, pol := servedBy(t, ns, "2001:db8:8::/64")
	// serve runs the engine for d, stops it, and returns the store's
	// counts while serving and after Serve returned.
	serve := func(touch, snapshot, d time.Duration) (touches, snaps, snapsAfter int) {
		sv := startServing(t, Config{Interfaces: []string{"d0"}, NetNS: h, KeepConnections: true,
			TouchInterval: touch, SnapshotInterval: snapshot}, pol, zaptest.NewLogger(t))
		time.Sleep(d)
		touches, snaps = sv.st.Housekeeping()
		if err := sv.stop(); err != nil {
			t.Fatal(err)
		}
		_, snapsAfter = sv.st.Housekeeping()
		return touches, snaps, snapsAfter
	}
	t.Run("periodic", func(t *testing.T) {
		touches, snaps, _ := serve(50*time.Millisecond, 200*time.Millisecond, time.Second)
		if touches < 5 || snaps < 2 {
			t.Fatalf("after 1 s: %d touches (every 50 ms), %d snapshots (every 200 ms)", touches, snaps)
		}
	})
	t.Run("shutdown", func(t *testing.T) {
		_, snaps, after := serve(time.Minute, time.Hour, 300*time.Millisecond)
		if snaps != 0 || after != 1 {
			t.Fatalf("snapshots: %d while serving (want 0), %d when Serve returned (want 1)", snaps, after)
		}
	})
}

// servedBy is ns's handle (closed at the end of t) and a policy whose one
// client "c" owns prefix, for a server serving in ns.
func servedBy(t *testing.T, ns *netlab.NS, prefix string) (netns.NsHandle, *policy.Policy) {
	t.Helper()
	h, err := ns.Handle()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	own, _ := policy.NewStatic(map[string][]netip.Prefix{"c": {netip.MustParsePrefix(prefix)}})
	pol, _ := policy.New(policy.Config{}, own)
	return h, pol
}
