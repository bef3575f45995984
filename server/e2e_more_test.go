package server

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/policy"
)

// dialFrom connects from the Internet namespace with a fixed source port.
func (l *lab) dialFrom(srcPort uint16, dst netip.AddrPort) error {
	return l.topo.Internet.Do(func() error {
		d := net.Dialer{Timeout: 700 * time.Millisecond, LocalAddr: &net.TCPAddr{IP: l.topo.InternetV6.AsSlice(), Port: int(srcPort)}}
		c, err := d.Dial("tcp", dst.String())
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(time.Second))
		line, err := bufio.NewReader(c).ReadString('\n')
		if err != nil || line != netlab.Greeting+"\n" {
			return fmt.Errorf("greeting %q: %v", line, err)
		}
		return nil
	})
}

// TestE2EFilterPeerThirdParty: FILTER admits only its remote prefix
// (FLT-07), PEER only its remote address and port (PEER-08), a
// THIRD_PARTY mapping opens the named address (TP-04), and a pinhole
// survives the end of a connection (MAP-21).
func TestE2EFilterPeerThirdParty(t *testing.T) {
	l := newLab(t)
	c := l.topo.ClientV6
	svc := netip.AddrPortFrom(c, 443)
	l.topo.Client.ServeTCP(t, svc.String())
	t.Run("FLT-07", func(t *testing.T) {
		r := mapReq(c, pcp.ProtoTCP, 443, 0, time.Hour, 1)
		r.Options.Filters = []pcp.Filter{{Remote: netip.MustParsePrefix("2001:db8:99::/48")}}
		if resp := l.pcp(r); resp.Result != 0 {
			t.Fatal(resp.Result)
		}
		if l.reach(svc) {
			t.Fatal("a remote outside the filter got in")
		}
		r.Options.Filters = []pcp.Filter{{}, {Remote: netip.MustParsePrefix("2001:db8:ffff::/64")}}
		if resp := l.pcp(r); resp.Result != 0 {
			t.Fatal(resp.Result)
		}
		if !l.reach(svc) {
			t.Fatal("a remote inside the filter was dropped")
		}
		t.Run("MAP-21", func(t *testing.T) {
			// The previous connection ended with FIN; a new one still
			// works.
			if !l.reach(svc) {
				t.Fatal("pinhole closed with the connection")
			}
		})
		l.pcp(mapReq(c, pcp.ProtoTCP, 443, 0, 0, 1))
	})
	t.Run("PEER-08", func(t *testing.T) {
		rem := netip.AddrPortFrom(l.topo.InternetV6, 45000)
		if resp := l.pcp(peerReq(c, pcp.ProtoTCP, 443, rem, time.Hour, 1)); resp.Result != 0 {
			t.Fatal(resp.Result)
		}
		if err := l.dialFrom(45000, svc); err != nil {
			t.Fatalf("the PEER's remote cannot connect: %v", err)
		}
		if l.dialFrom(45001, svc) == nil {
			t.Fatal("another remote port got in through a PEER pinhole")
		}
	})
	t.Run("TP-04", func(t *testing.T) {
		other := netip.MustParseAddr("2001:db8:1:2::20")
		l.topo.Client.MustRun(t, "ip", "addr", "add", other.String()+"/64", "dev", l.topo.ClientIf, "nodad")
		// A SYN to other before its local route is in is dropped, and the
		// retransmission comes after reach's timeout (1 in 20-60 runs
		// on a loaded box, Ip6InAddrErrors 1 in the client).
		l.topo.Client.WaitLocal(t, other)
		l.topo.Client.ServeTCP(t, netip.AddrPortFrom(other, 8443).String())
		r := mapReq(c, pcp.ProtoTCP, 8443, 0, time.Hour, 1)
		r.Options.ThirdParty = other
		if resp := l.pcp(r); resp.Result != 0 || resp.Map.ExternalAddr != other {
			t.Fatalf("%+v", resp)
		}
		if !l.reach(netip.AddrPortFrom(other, 8443)) {
			t.Fatal("THIRD_PARTY mapping does not pass traffic")
		}
	})
}

// TestE2ELIFE04ExpiryWithoutDaemon: a pinhole ends at its lease's expiry
// even when pcpd is not running; the next start drops the lease.
func TestE2ELIFE04ExpiryWithoutDaemon(t *testing.T) {
	l := newLab(t, func(_ *Config, p *policy.Config) { p.MinLifetime = time.Second })
	c := l.topo.ClientV6
	svc := netip.AddrPortFrom(c, 443)
	l.topo.Client.ServeTCP(t, svc.String())
	if resp := l.pcp(mapReq(c, pcp.ProtoTCP, 443, 0, 3*time.Second, 1)); resp.Result != 0 || resp.Lifetime != 3*time.Second {
		t.Fatalf("%+v", resp)
	}
	l.stop()
	if !l.reach(svc) {
		t.Fatal("closed before expiry")
	}
	time.Sleep(3500 * time.Millisecond)
	if l.reach(svc) {
		t.Fatal("pinhole outlived its lease with pcpd stopped")
	}
	l.start()
	if n := len(l.srv.Leases()); n != 0 {
		t.Fatalf("%d expired leases restored", n)
	}
	if !l.srv.Status().Restarted {
		t.Fatal("dropping expired leases is no state loss; the epoch must continue")
	}
}

// TestE2EPMP13Announce: after a restart NAT-PMP clients get the external
// address announcement on port 5350, with the continued epoch.
func TestE2EPMP13Announce(t *testing.T) {
	l := newLab(t)
	b := pcp.AppendPMPRequest(nil, &pcp.PMPRequest{Opcode: pcp.PMPOpMapUDP, InternalPort: 5000, Lifetime: time.Hour})
	if _, err := l.exchange(netip.AddrPort{}, l.server4(), b); err != nil {
		t.Fatal(err)
	}
	l.stop()
	var conn *net.UDPConn
	if err := l.topo.Client.Do(func() (err error) {
		conn, err = net.ListenUDP("udp4", net.UDPAddrFromAddrPort(netip.AddrPortFrom(l.topo.ClientV4, pcp.ClientPort)))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	l.start()
	buf := make([]byte, 64)
	conn.SetReadDeadline(time.Now().Add(3 * time.Second))
	n, from, err := conn.ReadFromUDPAddrPort(buf)
	if err != nil {
		t.Fatal(err)
	}
	var r pcp.PMPResponse
	if err := pcp.ParsePMPResponse(buf[:n], &r); err != nil || r.Opcode != pcp.PMPOpAddress || r.Result != 0 || r.ExternalAddr != l.topo.HostPublicV4 {
		t.Fatalf("% x: %v", buf[:n], err)
	}
	if from != l.server4() {
		t.Fatalf("announcement from %v, want %v", from, l.server4())
	}
}

// TestE2EPMP12EndsConnections: deleting a NAT-PMP mapping ends the
// connections that came in through it, not only new ones.
func TestE2EPMP12EndsConnections(t *testing.T) {
	l := newLab(t)
	serveEcho(t, l.topo.Client, netip.AddrPortFrom(l.topo.ClientV4, 8080))
	mapping := func(lifetime time.Duration) {
		b := pcp.AppendPMPRequest(nil, &pcp.PMPRequest{Opcode: pcp.PMPOpMapTCP, InternalPort: 8080, SuggestedExternalPort: 18080, Lifetime: lifetime})
		if _, err := l.exchange(netip.AddrPort{}, l.server4(), b); err != nil {
			t.Fatal(err)
		}
	}
	mapping(time.Hour)
	var c net.Conn
	if err := l.topo.Internet.Do(func() (err error) {
		c, err = net.DialTimeout("tcp", netip.AddrPortFrom(l.topo.HostPublicV4, 18080).String(), 2*time.Second)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := echoOnce(c); err != nil {
		t.Fatalf("connection through the mapping: %v", err)
	}
	mapping(0)
	if err := netlab.Eventually(3*time.Second, func() error {
		if echoOnce(c) == nil {
			return fmt.Errorf("connection still passes after delete")
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
}

// TestE2EANN03StateLoss: with the state directory lost, the epoch resets,
// the now unexplained pinholes are removed, and the client (known only
// from those pinholes) is told by an unsolicited ANNOUNCE on port 5350.
func TestE2EANN03StateLoss(t *testing.T) {
	l := newLab(t)
	c := l.topo.ClientV6
	if resp := l.pcp(mapReq(c, pcp.ProtoTCP, 443, 0, time.Hour, 1)); resp.Result != 0 {
		t.Fatal(resp.Result)
	}
	time.Sleep(2 * time.Second) // so that a continued epoch would be ≥ 2
	l.stop()
	l.dir = t.TempDir() // the old state is gone
	var conn *net.UDPConn
	if err := l.topo.Client.Do(func() (err error) {
		conn, err = net.ListenUDP("udp6", net.UDPAddrFromAddrPort(netip.AddrPortFrom(c, pcp.ClientPort)))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	l.start()
	if st := l.srv.Status(); st.Restarted || st.Epoch > 1 || st.Leases != 0 {
		t.Fatalf("after state loss: %+v", st)
	}
	// The audit that removes them runs in the background, once at start
	// (watchFirewall), so it may end after l.start sees the sockets open
	// (a full package run lost that race once, 09:32).
	if err := netlab.Eventually(5*time.Second, func() error {
		if n := len(l.kernelHoles()); n != 0 {
			return fmt.Errorf("%d unexplained pinholes kept", n)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 64)
	conn.SetReadDeadline(time.Now().Add(3 * time.Second))
	n, err := conn.Read(buf)
	if err != nil {
		t.Fatalf("no ANNOUNCE: %v", err)
	}
	var r pcp.Response
	if err := pcp.ParseResponse(buf[:n], &r); err != nil || r.Opcode != pcp.OpAnnounce || r.Epoch > 1 {
		t.Fatalf("% x: %v", buf[:n], err)
	}
}

// TestE2EMAP05Wildcard: a TCP all-ports mapping opens every TCP port of
// the address in the kernel, and nothing else.
func TestE2EMAP05Wildcard(t *testing.T) {
	l := newLab(t, func(_ *Config, p *policy.Config) { p.AllowAllPorts = true })
	c := l.topo.ClientV6
	l.topo.Client.ServeTCP(t, netip.AddrPortFrom(c, 2222).String())
	l.topo.Client.ServeUDPEcho(t, netip.AddrPortFrom(c, 2222).String())
	if l.reach(netip.AddrPortFrom(c, 2222)) {
		t.Fatal("open before the MAP")
	}
	if resp := l.pcp(mapReq(c, pcp.ProtoTCP, 0, 0, time.Hour, 1)); resp.Result != 0 {
		t.Fatal(resp.Result)
	}
	if !l.reach(netip.AddrPortFrom(c, 2222)) {
		t.Fatal("all-ports mapping does not pass TCP")
	}
	if l.topo.Internet.ProbeUDP(netip.AddrPortFrom(c, 2222).String(), 500*time.Millisecond) == nil {
		t.Fatal("a TCP wildcard lets UDP in")
	}
}

// TestE2EPMP12DeleteEndsConnectionAtOnce: once the delete of an IPv6 PCP
// MAP is acknowledged, an inbound TCP connection through it carries no
// more data: not a second later, at once (the conntrack flush is done
// before the reply; it used to run in the background and race the
// client). Also when the client side speaks first after the delete, so
// conntrack's loose pickup of its mid-stream segment must not revive the
// flow.
func TestE2EPMP12DeleteEndsConnectionAtOnce(t *testing.T) {
	l := newLab(t)
	for i, clientFirst := range []bool{false, true} {
		name := "remote speaks first"
		if clientFirst {
			name = "client speaks first"
		}
		t.Run(name, func(t *testing.T) {
			port := uint16(9100 + i)
			ln, err := l.topo.Client.ListenTCP(netip.AddrPortFrom(l.topo.ClientV6, port).String())
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			accepted := make(chan net.Conn, 1)
			go func() {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				accepted <- c
				io.Copy(c, c)
			}()
			req := mapReq(l.topo.ClientV6, pcp.ProtoTCP, port, port, time.Hour, byte(i+1))
			if r := l.pcp(req); r.Result != pcp.Success {
				t.Fatalf("MAP: %v", r.Result)
			}
			var c net.Conn
			if err := l.topo.Internet.Do(func() (err error) {
				c, err = net.DialTimeout("tcp", netip.AddrPortFrom(l.topo.ClientV6, port).String(), 2*time.Second)
				return err
			}); err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			inside := <-accepted
			defer inside.Close()
			echo := func(msg string) error {
				c.SetDeadline(time.Now().Add(time.Second))
				if _, err := c.Write([]byte(msg)); err != nil {
					return err
				}
				_, err := io.ReadFull(c, make([]byte, len(msg)))
				return err
			}
			if err := echo("before"); err != nil {
				t.Fatalf("through the live mapping: %v", err)
			}
			del := mapReq(l.topo.ClientV6, pcp.ProtoTCP, port, 0, 0, byte(i+1))
			if r := l.pcp(del); r.Result != pcp.Success {
				t.Fatalf("delete: %v", r.Result)
			}
			if clientFirst {
				// A mid-stream segment from the inside, before the
				// remote sends anything.
				inside.Write([]byte("late"))
				time.Sleep(100 * time.Millisecond)
			}
			if err := echo("after"); err == nil {
				t.Fatal("the connection still carries data after the delete was acknowledged")
			}
		})
	}
}
