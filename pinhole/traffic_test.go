package pinhole_test

import (
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/nftables"
	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
	"github.com/vishvananda/netns"
	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv6"
)

// TestPinholeLifecycle is the headline: for TCP and UDP, a
// connection from the internet to the client's address fails before the
// pinhole, works with it, fails after delete, and fails again once the
// kernel's element timeout has run out, with nothing of pcpd running.
func TestPinholeLifecycle(t *testing.T) {
	topo, b := guardedTopology(t, pinhole.Config{})
	for _, proto := range []uint8{tcp, udp} {
		t.Run(protoName(proto), func(t *testing.T) {
			dst := netip.AddrPortFrom(topo.ClientV6, 8000+uint16(proto))
			serve(t, topo.Client, proto, dst)
			// The client reaching out is not protected traffic.
			mustReach(t, "host to client (sanity, unguarded from inside)", topo.Client, proto, netip.Addr{}, netip.AddrPortFrom(topo.ClientV6, dst.Port()))
			mustNotReach(t, "before install", topo.Internet, proto, netip.Addr{}, dst)

			p := pinhole.Pinhole{Protocol: proto, InternalAddr: topo.ClientV6, InternalPort: dst.Port()}
			apply(t, b, install(p, time.Minute))
			mustReach(t, "after install", topo.Internet, proto, netip.Addr{}, dst)

			apply(t, b, del(p))
			mustNotReach(t, "after delete", topo.Internet, proto, netip.Addr{}, dst)

			// Kernel expiry: install with a short timeout, then drop every
			// reference to pcpd's side; only the kernel acts from here.
			apply(t, b, install(p, 2*time.Second))
			mustReach(t, "after re-install", topo.Internet, proto, netip.Addr{}, dst)
			waitUnlisted(t, b, p, 2500*time.Millisecond)
			mustNotReach(t, "after kernel expiry", topo.Internet, proto, netip.Addr{}, dst)
		})
	}
}

// TestFilterAdmitsOnlyRemote_6887_13_3: a FILTER pinhole (RFC 6887 section
// 13.3; PEER uses the same sets) lets in only the given remote prefix and,
// when set, remote port. A second internet address plays the stranger.
func TestFilterAdmitsOnlyRemote_6887_13_3(t *testing.T) {
	topo, b := guardedTopology(t, pinhole.Config{})
	friend, stranger := topo.InternetV6, netip.MustParseAddr("2001:db8:ffff::3")
	topo.Internet.MustRun(t, "ip", "addr", "add", stranger.String()+"/64", "dev", "eth0", "nodad")
	// Receivable before "must not reach" is asked: else no reply would come
	// back to it whatever the pinhole did (netlab.WaitLocal).
	topo.Internet.WaitLocal(t, stranger)

	for _, tc := range []struct {
		name  string
		proto uint8
		port  uint16 // 0: all ports
	}{
		{"TCP", tcp, 8100},
		{"UDP", udp, 8101},
		{"TCP all ports", tcp, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			svc := tc.port
			if svc == 0 {
				svc = 8102
			}
			dst := netip.AddrPortFrom(topo.ClientV6, svc)
			serve(t, topo.Client, tc.proto, dst)
			p := pinhole.Pinhole{Protocol: tc.proto, InternalAddr: topo.ClientV6, InternalPort: tc.port,
				RemotePrefix: netip.PrefixFrom(friend, 128)}
			apply(t, b, install(p, time.Minute))
			mustReach(t, "filtered remote", topo.Internet, tc.proto, friend, dst)
			mustNotReach(t, "other remote", topo.Internet, tc.proto, stranger, dst)
			apply(t, b, del(p))
			mustNotReach(t, "filtered remote after delete", topo.Internet, tc.proto, friend, dst)
		})
	}

	t.Run("all protocols", func(t *testing.T) {
		dst := netip.AddrPortFrom(topo.ClientV6, 8103)
		serve(t, topo.Client, tcp, dst)
		outside := netip.MustParseAddr("2001:db8:ffff::4")
		topo.Internet.MustRun(t, "ip", "addr", "add", outside.String()+"/64", "dev", "eth0", "nodad")
		topo.Internet.WaitLocal(t, outside)
		p := pinhole.Pinhole{InternalAddr: topo.ClientV6, RemotePrefix: netip.MustParsePrefix("2001:db8:ffff::/126")}
		apply(t, b, install(p, time.Minute))
		mustReach(t, "remote inside prefix", topo.Internet, tcp, friend, dst)
		mustNotReach(t, "remote outside prefix", topo.Internet, tcp, outside, dst)
		apply(t, b, del(p))
	})

	t.Run("remote port", func(t *testing.T) {
		dst := netip.AddrPortFrom(topo.ClientV6, 8104)
		serve(t, topo.Client, udp, dst)
		p := pinhole.Pinhole{Protocol: udp, InternalAddr: topo.ClientV6, InternalPort: dst.Port(),
			RemotePrefix: netip.PrefixFrom(friend, 128), RemotePort: 40000}
		apply(t, b, install(p, time.Minute))
		mustNotReach(t, "wrong source port", topo.Internet, udp, friend, dst)
		if err := topo.Internet.Do(func() error {
			c, err := net.DialUDP("udp", &net.UDPAddr{IP: friend.AsSlice(), Port: 40000}, net.UDPAddrFromAddrPort(dst))
			if err != nil {
				return err
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(okWait))
			if _, err := c.Write([]byte("x")); err != nil {
				return err
			}
			_, err = c.Read(make([]byte, 16))
			return err
		}); err != nil {
			t.Fatalf("from remote port 40000: %v", err)
		}
	})
}

// TestRedirect80To443: an IPv6 port redirect on the client's own address
// (StartOS asks for 80 → 443) reaches the service on 443; 443 itself stays
// closed, and the redirect ends with its lease.
func TestRedirect80To443(t *testing.T) {
	topo, b := guardedTopology(t, pinhole.Config{})
	for _, proto := range []uint8{tcp, udp} {
		t.Run(protoName(proto), func(t *testing.T) {
			svc := netip.AddrPortFrom(topo.ClientV6, 443)
			ext := netip.AddrPortFrom(topo.ClientV6, 80)
			serve(t, topo.Client, proto, svc)
			mustNotReach(t, "before install", topo.Internet, proto, netip.Addr{}, ext)
			p := pinhole.Pinhole{Protocol: proto, InternalAddr: topo.ClientV6, InternalPort: 443, ExternalPort: 80}
			apply(t, b, install(p, 2*time.Second))
			mustReach(t, "redirected", topo.Internet, proto, netip.Addr{}, ext)
			mustNotReach(t, "internal port directly", topo.Internet, proto, netip.Addr{}, svc)
			waitUnlisted(t, b, p, 2500*time.Millisecond)
			mustNotReach(t, "after kernel expiry", topo.Internet, proto, netip.Addr{}, ext)
		})
	}
	t.Run("filtered", func(t *testing.T) {
		stranger := netip.MustParseAddr("2001:db8:ffff::5")
		topo.Internet.MustRun(t, "ip", "addr", "add", stranger.String()+"/64", "dev", "eth0", "nodad")
		topo.Internet.WaitLocal(t, stranger)
		topo.Client.ServeTCP(t, netip.AddrPortFrom(topo.ClientV6, 8443).String())
		ext := netip.AddrPortFrom(topo.ClientV6, 8080)
		p := pinhole.Pinhole{Protocol: tcp, InternalAddr: topo.ClientV6, InternalPort: 8443, ExternalPort: 8080,
			RemotePrefix: netip.PrefixFrom(topo.InternetV6, 128)}
		apply(t, b, install(p, time.Minute))
		mustReach(t, "filtered remote", topo.Internet, tcp, topo.InternetV6, ext)
		mustNotReach(t, "other remote", topo.Internet, tcp, stranger, ext)
		apply(t, b, del(p))
		mustNotReach(t, "after delete", topo.Internet, tcp, topo.InternetV6, ext)
	})
}

// TestNAPT4: an IPv4 mapping makes the client's service reachable on the
// host's public IPv4 and port, for TCP and UDP, until delete or expiry.
func TestNAPT4(t *testing.T) {
	topo, b := guardedTopology(t, pinhole.Config{})
	for _, proto := range []uint8{tcp, udp} {
		t.Run(protoName(proto), func(t *testing.T) {
			svc := netip.AddrPortFrom(topo.ClientV4, 8000+uint16(proto))
			pub := netip.AddrPortFrom(topo.HostPublicV4, 18000+uint16(proto))
			serve(t, topo.Client, proto, svc)
			mustNotReach(t, "before install", topo.Internet, proto, netip.Addr{}, pub)
			p := pinhole.Pinhole{Protocol: proto, InternalAddr: topo.ClientV4, InternalPort: svc.Port(),
				ExternalAddr: topo.HostPublicV4, ExternalPort: pub.Port()}
			apply(t, b, install(p, time.Minute))
			mustReach(t, "mapped", topo.Internet, proto, netip.Addr{}, pub)
			apply(t, b, del(p))
			mustNotReach(t, "after delete", topo.Internet, proto, netip.Addr{}, pub)
			apply(t, b, install(p, 2*time.Second))
			mustReach(t, "re-mapped", topo.Internet, proto, netip.Addr{}, pub)
			waitUnlisted(t, b, p, 2500*time.Millisecond)
			mustNotReach(t, "after kernel expiry", topo.Internet, proto, netip.Addr{}, pub)
		})
	}
	t.Run("filtered", func(t *testing.T) {
		stranger := netip.MustParseAddr("198.51.100.3")
		topo.Internet.MustRun(t, "ip", "addr", "add", stranger.String()+"/24", "dev", "eth0")
		svc := netip.AddrPortFrom(topo.ClientV4, 8200)
		pub := netip.AddrPortFrom(topo.HostPublicV4, 18200)
		topo.Client.ServeTCP(t, svc.String())
		p := pinhole.Pinhole{Protocol: tcp, InternalAddr: topo.ClientV4, InternalPort: svc.Port(),
			ExternalAddr: topo.HostPublicV4, ExternalPort: pub.Port(), RemotePrefix: netip.PrefixFrom(topo.InternetV4, 32)}
		apply(t, b, install(p, time.Minute))
		mustReach(t, "filtered remote", topo.Internet, tcp, topo.InternetV4, pub)
		mustNotReach(t, "other remote", topo.Internet, tcp, stranger, pub)
	})
	t.Run("direct to client IPv4 stays closed", func(t *testing.T) {
		// Internet gets a route to the client's tunnel address: a packet
		// aimed there directly was not translated and meets the guard.
		topo.Internet.MustRun(t, "ip", "route", "add", topo.ClientPrefix4.String(), "via", topo.HostPublicV4.String())
		svc := netip.AddrPortFrom(topo.ClientV4, 8300)
		topo.Client.ServeTCP(t, svc.String())
		p := pinhole.Pinhole{Protocol: tcp, InternalAddr: topo.ClientV4, InternalPort: svc.Port(),
			ExternalAddr: topo.HostPublicV4, ExternalPort: 18300}
		apply(t, b, install(p, time.Minute))
		mustReach(t, "via public address", topo.Internet, tcp, netip.Addr{}, netip.AddrPortFrom(topo.HostPublicV4, 18300))
		mustNotReach(t, "client address directly", topo.Internet, tcp, netip.Addr{}, svc)
	})
}

// TestUnprotectedUntouched: the guard only looks at traffic to protected
// prefixes; everything else passes as if pcpd were not there.
func TestUnprotectedUntouched(t *testing.T) {
	topo := netlab.NewTopology(t, netlab.TopologyOptions{})
	b := newBackend(t, topo.Host, pinhole.Config{})
	dst := netip.AddrPortFrom(topo.ClientV6, 8400)
	topo.Client.ServeTCP(t, dst.String())
	if err := b.SetProtected([]netip.Prefix{netip.MustParsePrefix("2001:db8:9::/48")}); err != nil {
		t.Fatal(err)
	}
	mustReach(t, "not protected", topo.Internet, tcp, netip.Addr{}, dst)
	if err := b.SetProtected([]netip.Prefix{topo.ClientPrefix6}); err != nil {
		t.Fatal(err)
	}
	mustNotReach(t, "protected", topo.Internet, tcp, netip.Addr{}, dst)
	if err := b.SetProtected(nil); err != nil {
		t.Fatal(err)
	}
	mustReach(t, "protection lifted", topo.Internet, tcp, netip.Addr{}, dst)
}

// TestICMPv6_4890: echo requests reach a protected client only when
// AllowEcho says so (RFC 4890 leaves echo to local policy); the error types
// are covered by TestICMPv6Errors_4890_4_3.
func TestICMPv6_4890(t *testing.T) {
	needPing(t)
	for _, allow := range []bool{false, true} {
		t.Run(map[bool]string{false: "echo off", true: "echo on"}[allow], func(t *testing.T) {
			topo, _ := guardedTopology(t, pinhole.Config{AllowEcho: allow})
			_, err := topo.Internet.Run("ping", "-6", "-c", "1", "-W", "1", topo.ClientV6.String())
			if (err == nil) != allow {
				t.Fatalf("ping with AllowEcho=%v: err=%v", allow, err)
			}
			if l := nftList(t, topo.Host, "chain", "inet", "pcpd", "guard6"); !strings.Contains(l, "icmpv6 type 1-4 accept") {
				t.Fatalf("guard6 lacks the RFC 4890 rule:\n%s", l)
			}
		})
	}
}

// TestKernelExpiryWithoutProcess: the pinholes are installed by a separate
// process that then exits, so no pcpd code is alive while they work and
// when they lapse: expiry is the kernel's alone.
func TestKernelExpiryWithoutProcess(t *testing.T) {
	topo, _ := guardedTopology(t, pinhole.Config{})
	tcpDst := netip.AddrPortFrom(topo.ClientV6, 8500)
	udpDst := netip.AddrPortFrom(topo.ClientV6, 8501)
	serve(t, topo.Client, tcp, tcpDst)
	serve(t, topo.Client, udp, udpDst)
	mustNotReach(t, "before install", topo.Internet, tcp, netip.Addr{}, tcpDst)

	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperInstall$", "-test.count=1")
	cmd.Env = append(os.Environ(), "PINHOLE_HELPER_NETNS="+topo.Host.Name,
		"PINHOLE_HELPER_PINHOLES="+tcpDst.String()+","+udpDst.String(), "PINHOLE_HELPER_TIMEOUT=3s")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("installer process: %v\n%s", err, out)
	}
	installed := time.Now()
	mustReach(t, "installed by a process that has exited", topo.Internet, tcp, netip.Addr{}, tcpDst)
	mustReach(t, "installed by a process that has exited", topo.Internet, udp, netip.Addr{}, udpDst)
	time.Sleep(time.Until(installed.Add(3500 * time.Millisecond)))
	mustNotReach(t, "after kernel expiry", topo.Internet, tcp, netip.Addr{}, tcpDst)
	mustNotReach(t, "after kernel expiry", topo.Internet, udp, netip.Addr{}, udpDst)
}

// TestHelperInstall is the installer process of
// TestKernelExpiryWithoutProcess; it does nothing in a normal run.
func TestHelperInstall(t *testing.T) {
	nsName := os.Getenv("PINHOLE_HELPER_NETNS")
	if nsName == "" {
		t.Skip("helper process only")
	}
	timeout, err := time.ParseDuration(os.Getenv("PINHOLE_HELPER_TIMEOUT"))
	if err != nil {
		t.Fatal(err)
	}
	h, err := netns.GetFromName(nsName)
	if err != nil {
		t.Fatal(err)
	}
	conn, err := nftables.New(nftables.WithNetNSFd(int(h)))
	if err != nil {
		t.Fatal(err)
	}
	b, err := pinhole.New(conn, pinhole.Config{})
	if err != nil {
		t.Fatal(err)
	}
	var ops []pinhole.Op
	for i, s := range strings.Split(os.Getenv("PINHOLE_HELPER_PINHOLES"), ",") {
		ap := netip.MustParseAddrPort(s)
		ops = append(ops, install(pinhole.Pinhole{Protocol: []uint8{tcp, udp}[i], InternalAddr: ap.Addr(), InternalPort: ap.Port()}, timeout))
	}
	apply(t, b, ops...)
}

// TestICMPv6Errors_4890_4_3: ICMPv6 errors that RFC 4890 section 4.3.1/4.3.2
// says must (should) not be dropped in transit reach a protected client
// even when they belong to no tracked flow; an unknown type does not (and,
// as a control, does arrive while the prefix is not protected).
func TestICMPv6Errors_4890_4_3(t *testing.T) {
	topo, b := guardedTopology(t, pinhole.Config{})
	// The invoking packet: an IPv6 header of a flow the host never saw.
	inner := make([]byte, 48)
	inner[0], inner[6], inner[7] = 0x60, 17, 64
	copy(inner[8:24], topo.ClientV6.AsSlice())
	copy(inner[24:40], netip.MustParseAddr("2001:db8:ffff::99").AsSlice())
	msgs := []icmp.Message{
		{Type: ipv6.ICMPTypeDestinationUnreachable, Body: &icmp.DstUnreach{Data: inner}},
		{Type: ipv6.ICMPTypePacketTooBig, Body: &icmp.PacketTooBig{MTU: 1280, Data: inner}},
		{Type: ipv6.ICMPTypeTimeExceeded, Body: &icmp.TimeExceeded{Data: inner}},
		{Type: ipv6.ICMPTypeParameterProblem, Code: 1, Body: &icmp.ParamProb{Pointer: 6, Data: inner}},
		{Type: ipv6.ICMPType(200), Body: &icmp.RawBody{Data: inner}}, // private experimentation
	}
	check := func(want map[int]bool) {
		t.Helper()
		got, err := sendICMPv6(topo, msgs)
		if err != nil {
			t.Fatal(err)
		}
		if diff := cmp.Diff(want, got); diff != "" {
			t.Errorf("ICMPv6 types reaching the client (-want +got):\n%s", diff)
		}
	}
	if err := b.SetProtected(nil); err != nil {
		t.Fatal(err)
	}
	check(map[int]bool{1: true, 2: true, 3: true, 4: true, 200: true})
	if err := b.SetProtected([]netip.Prefix{topo.ClientPrefix6}); err != nil {
		t.Fatal(err)
	}
	check(map[int]bool{1: true, 2: true, 3: true, 4: true})
}

// sendICMPv6 sends msgs from Internet to Client over raw sockets and
// returns the types Client received.
func sendICMPv6(topo *netlab.Topology, msgs []icmp.Message) (map[int]bool, error) {
	var rx net.PacketConn
	if err := topo.Client.Do(func() (err error) {
		rx, err = net.ListenPacket("ip6:ipv6-icmp", topo.ClientV6.String())
		return err
	}); err != nil {
		return nil, err
	}
	defer rx.Close()
	got := map[int]bool{}
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 1500)
		rx.SetReadDeadline(time.Now().Add(time.Second))
		for {
			n, from, err := rx.ReadFrom(buf)
			if err != nil {
				return
			}
			if from.(*net.IPAddr).IP.Equal(topo.InternetV6.AsSlice()) && n > 0 {
				got[int(buf[0])] = true
			}
		}
	}()
	err := topo.Internet.Do(func() error {
		tx, err := net.ListenPacket("ip6:ipv6-icmp", topo.InternetV6.String())
		if err != nil {
			return err
		}
		defer tx.Close()
		for _, m := range msgs {
			b, err := m.Marshal(nil) // the kernel fills in the ICMPv6 checksum
			if err != nil {
				return err
			}
			if _, err := tx.WriteTo(b, &net.IPAddr{IP: topo.ClientV6.AsSlice()}); err != nil {
				return err
			}
		}
		return nil
	})
	<-done
	return got, err
}

// needPing fails a test that judges by ping when there is none: a missing
// ping would read as "echo blocked" and pass the echo-off case wrongly.
func needPing(t *testing.T) {
	t.Helper()
	if _, err := exec.LookPath("ping"); err != nil {
		t.Fatal("this test needs ping (Debian package iputils-ping; .ci/setup installs it)")
	}
}

// waitUnlisted waits until the kernel no longer lists p's element (its
// timeout ran out), at most max: the fixed sleep of max it replaces, so
// the check after expiry runs no later than before and, as a rule, as
// soon as the element is gone (a set lookup and a dump skip an expired
// element alike).
func waitUnlisted(t *testing.T, b *pinhole.Backend, p pinhole.Pinhole, max time.Duration) {
	t.Helper()
	deadline := time.Now().Add(max)
	for time.Now().Before(deadline) {
		es, err := b.List()
		if err != nil {
			t.Fatal(err)
		}
		listed := false
		for _, e := range es {
			q := e.Pinhole
			listed = listed || q.Protocol == p.Protocol && q.InternalAddr == p.InternalAddr && q.InternalPort == p.InternalPort
		}
		if !listed {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}
