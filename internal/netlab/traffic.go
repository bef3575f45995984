package netlab

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"testing"
	"time"
)

// Greeting is what ServeTCP and StartTCPServer write to every connection.
const Greeting = "ok"

// ListenTCP opens a TCP listener inside the namespace.
func (n *NS) ListenTCP(addr string) (net.Listener, error) {
	var l net.Listener
	err := n.Do(func() (err error) {
		l, err = net.Listen("tcp", addr)
		return err
	})
	return l, err
}

// StartTCPServer listens inside the namespace and greets every connection
// with "ok\n", so a dialer can tell a real end-to-end connection from a
// middlebox answer.
func (n *NS) StartTCPServer(addr string) (io.Closer, error) {
	return n.startTCP(addr, func(c net.Conn) {
		c.SetDeadline(time.Now().Add(5 * time.Second))
		io.WriteString(c, Greeting+"\n")
	})
}

// StartTCPEcho listens inside the namespace and sends every connection
// back what it reads, for as long as the connection lasts: a flow that
// can be tested again and again, as StartUDPEcho's.
func (n *NS) StartTCPEcho(addr string) (io.Closer, error) {
	return n.startTCP(addr, func(c net.Conn) { io.Copy(c, c) })
}

// startTCP listens inside the namespace and runs serve on every
// connection, then closes it.
func (n *NS) startTCP(addr string, serve func(net.Conn)) (io.Closer, error) {
	l, err := n.ListenTCP(addr)
	if err != nil {
		return nil, err
	}
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() { defer c.Close(); serve(c) }()
		}
	}()
	return l, nil
}

// ServeTCP is StartTCPServer for tests.
func (n *NS) ServeTCP(t testing.TB, addr string) { t.Helper(); serve(t, n.StartTCPServer, addr) }

// ServeTCPEcho is StartTCPEcho for tests.
func (n *NS) ServeTCPEcho(t testing.TB, addr string) { t.Helper(); serve(t, n.StartTCPEcho, addr) }

// serve starts a server on addr for the rest of the test.
func serve(t testing.TB, start func(string) (io.Closer, error), addr string) {
	t.Helper()
	c, err := start(addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
}

// DialTCP connects from inside the namespace and reads the greeting. It
// returns nil only when the whole exchange worked.
func (n *NS) DialTCP(addr string, timeout time.Duration) error {
	return n.Probe("tcp", netip.AddrPort{}, addr, timeout)
}

// Probe connects from inside the namespace to addr over network, from
// the local address from if it is valid (any otherwise), and wants
// within timeout the greeting of StartTCPServer ("tcp") or the echo of
// StartUDPEcho to one datagram ("udp"). nil means the whole exchange
// worked.
func (n *NS) Probe(network string, from netip.AddrPort, addr string, timeout time.Duration) error {
	return n.Do(func() error {
		d := net.Dialer{Timeout: timeout}
		if from.Addr().IsValid() {
			if network == "udp" {
				d.LocalAddr = net.UDPAddrFromAddrPort(from)
			} else {
				d.LocalAddr = net.TCPAddrFromAddrPort(from)
			}
		}
		c, err := d.Dial(network, addr)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(timeout))
		if network == "udp" {
			msg := "probe-" + Rand(8)
			if _, err := c.Write([]byte(msg)); err != nil {
				return err
			}
			buf := make([]byte, 2048)
			k, err := c.Read(buf)
			if err != nil {
				return err
			}
			if string(buf[:k]) != "echo:"+msg {
				return errors.New("netlab: wrong UDP echo")
			}
			return nil
		}
		line, err := bufio.NewReader(c).ReadString('\n')
		if err != nil {
			return fmt.Errorf("netlab: read greeting from %s: %w", addr, err)
		}
		if strings.TrimSpace(line) != Greeting {
			return fmt.Errorf("netlab: unexpected greeting %q from %s", line, addr)
		}
		return nil
	})
}

// StartUDPEcho answers every datagram with "echo:" + its payload.
func (n *NS) StartUDPEcho(addr string) (io.Closer, error) {
	return n.startUDP(addr, func(b []byte, _ netip.AddrPort) []byte { return append([]byte("echo:"), b...) })
}

// StartUDPReflector answers every datagram with its source address:port
// (an IPv4-mapped address unmapped): what a NAT on the way made of it.
func (n *NS) StartUDPReflector(addr string) (io.Closer, error) {
	return n.startUDP(addr, func(_ []byte, from netip.AddrPort) []byte {
		return []byte(netip.AddrPortFrom(from.Addr().Unmap(), from.Port()).String())
	})
}

// startUDP listens on addr inside the namespace and answers every
// datagram with what reply makes of its payload and source.
func (n *NS) startUDP(addr string, reply func(b []byte, from netip.AddrPort) []byte) (io.Closer, error) {
	var c *net.UDPConn
	err := n.Do(func() error {
		pc, err := net.ListenPacket("udp", addr)
		if err == nil {
			c = pc.(*net.UDPConn)
		}
		return err
	})
	if err != nil {
		return nil, err
	}
	go func() {
		buf := make([]byte, 2048)
		for {
			k, from, err := c.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			c.WriteToUDPAddrPort(reply(buf[:k], from), from)
		}
	}()
	return c, nil
}

// ServeUDPEcho is StartUDPEcho for tests.
func (n *NS) ServeUDPEcho(t testing.TB, addr string) { t.Helper(); serve(t, n.StartUDPEcho, addr) }

// MustListenUDP opens a UDP socket bound to ap inside the namespace,
// closed when the test ends; a failure ends the test.
func (n *NS) MustListenUDP(t testing.TB, ap netip.AddrPort) *net.UDPConn {
	t.Helper()
	var c *net.UDPConn
	if err := n.Do(func() (err error) {
		c, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(ap))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// ProbeUDP sends one datagram from inside the namespace and waits for the
// echo. nil means the round trip worked.
func (n *NS) ProbeUDP(addr string, timeout time.Duration) error {
	return n.Probe("udp", netip.AddrPort{}, addr, timeout)
}

// SendUDPFrom sends a datagram from src in n to dst, up to three times,
// each time reading rx for waitEach, and returns the source rx saw for
// the first that arrived (unmapped; invalid if none did). Datagrams left
// in rx by an earlier call are skipped: each call's payload is its own.
// The source may be spoofed: no answer is expected.
func (n *NS) SendUDPFrom(src netip.Addr, dst netip.AddrPort, rx *net.UDPConn, waitEach time.Duration) (netip.Addr, error) {
	return n.SendUDPFromPort(netip.AddrPortFrom(src, 0), dst, rx, waitEach)
}

// SendUDPFromPort is SendUDPFrom from a chosen source port too (0: any),
// for a test that then looks up the flow's conntrack entry by its tuple.
func (n *NS) SendUDPFromPort(src, dst netip.AddrPort, rx *net.UDPConn, waitEach time.Duration) (netip.Addr, error) {
	var c *net.UDPConn
	if err := n.Do(func() (err error) {
		c, err = net.DialUDP("udp", net.UDPAddrFromAddrPort(src), net.UDPAddrFromAddrPort(dst))
		return err
	}); err != nil {
		return netip.Addr{}, err
	}
	defer c.Close()
	msg := fmt.Sprintf("from %v %s", src.Addr(), Rand(8))
	buf := make([]byte, 128)
	for range 3 {
		c.Write([]byte(msg))
		deadline := time.Now().Add(waitEach)
		for {
			rx.SetReadDeadline(deadline)
			k, from, err := rx.ReadFromUDPAddrPort(buf)
			if err != nil {
				break
			}
			if string(buf[:k]) == msg {
				return from.Addr().Unmap(), nil
			}
		}
	}
	return netip.Addr{}, nil
}

// Eventually polls cond until it returns nil or timeout passes, returning
// the last error. Data-plane changes (routes, handshakes) take a moment.
func Eventually(timeout time.Duration, cond func() error) error {
	deadline := time.Now().Add(timeout)
	for {
		err := cond()
		if err == nil || time.Now().After(deadline) {
			return err
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Zone returns the numeric zone (interface index) of ifname inside the
// namespace, for link-local addresses. A zone given by name is resolved by
// Go's process-wide interface cache, which does not know namespaces: a
// "lan0" of an earlier test's namespace, cached under its old index, makes
// bind or dial fail with ENODEV ("no such device") or pick the wrong
// interface. The index, looked up in the namespace itself, is never stale.
func (n *NS) Zone(t testing.TB, ifname string) string {
	t.Helper()
	var idx int
	if err := n.Do(func() error {
		ifi, err := net.InterfaceByName(ifname)
		if err != nil {
			return err
		}
		idx = ifi.Index
		return nil
	}); err != nil {
		t.Fatalf("netlab: zone of %s in %s: %v", ifname, n.Name, err)
	}
	return strconv.Itoa(idx)
}
