package server

import (
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	mdnl "github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/policy"
)

// Issue 9 (h/holder): an endpoint taken again by a new holder before the
// ended mapping's flush ran.

// acceptOne listens on addr in the Client namespace and returns a
// channel that yields the first connection accepted (the client's side
// of an inbound connection, to send from).
func (l *lab) acceptOne(t *testing.T, addr netip.AddrPort) <-chan net.Conn {
	t.Helper()
	var ln net.Listener
	if err := l.topo.Client.Do(func() (err error) {
		ln, err = net.Listen("tcp", addr.String())
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	ch := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			close(ch)
			return
		}
		t.Cleanup(func() { c.Close() })
		ch <- c
	}()
	return ch
}

// TestE2ERetakenBeforeFlushKeepsNewFlow (root, namespaces; issue 9): a
// mapping ends (deleted, expired) while the conntrack flusher is busy (its
// walk held here, as behind a long walk or ctWalkGap), and the endpoint is
// mapped again before the ended mapping's walk runs: the same IPv6 MAP
// made again (or FILTERed to another remote port), a NAT-PMP mapping of
// the same client taking its port back (MAP-22 keeps it for that internal
// endpoint only), an IPv6 redirect's external port mapped to another
// internal port of the client. A connection opened through the new
// mapping before the walk ran must outlive the walk: its conntrack entry
// stays (looked at before any packet: a packet from the remote would make
// a new one by TCP's loose pick-up), and data still flows (from the
// client's side first where the client's socket is the test's: its
// mid-stream segment without the entry is refused). The walk ends what no
// live lease admits where it was delivered (spareLive): the ended
// mapping's connection from a remote the new mapping's FILTER does not
// admit, or delivered to the old internal port. Fails without the fix:
// the walk deletes the new connection's entry (every row), and the
// client's data never arrives (redirect rows). The generic rows take the
// walk for kernels without CTA_FILTER (a dump refused with EINVAL).
//
// The ended mapping's connection from a remote the new mapping admits,
// delivered where it delivers, stays tracked now. On main its entry went,
// but it carried data all the same (the remote's next segment made a new
// entry through the mapping made again: seen in the rows without FILTER
// when this test asserted that it ended), so only its state was lost.
func TestE2ERetakenBeforeFlushKeepsNewFlow(t *testing.T) {
	for i, c := range []struct {
		name    string
		kind    string // lab.inbound's
		end     string // "delete" or "expire"
		other   bool   // mapped again for another internal port (redirect)
		filter  bool   // mapped again FILTERed to the new connection's remote port
		generic bool   // the walk without CTA_FILTER (keepLive)
	}{
		{"IPv6 MAP deleted, made again", "map6", "delete", false, false, false},
		{"IPv6 MAP expired, made again", "map6", "expire", false, false, false},
		{"IPv6 MAP deleted, made again FILTERed", "map6", "delete", false, true, false},
		{"NAT-PMP expired, its port taken back", "pmp", "expire", false, false, false},
		{"IPv6 redirect deleted, its port mapped to another internal port", "redir6", "delete", true, false, false},
		{"IPv6 MAP deleted, made again FILTERed, generic walk", "map6", "delete", false, true, true},
		{"NAT-PMP expired, its port taken back, generic walk", "pmp", "expire", false, false, true},
		{"IPv6 redirect deleted, its port mapped to another internal port, generic walk", "redir6", "delete", true, false, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			var gate ctGate
			l := newLab(t, func(_ *Config, p *policy.Config) { p.MinLifetime = time.Second })
			l.stop()
			l.tweak = func(s *Server) {
				gate.tweak(s)
				if c.generic {
					s.ctDumpFault = func([]mdnl.Message, error) ([]mdnl.Message, error) {
						return nil, &mdnl.OpError{Op: "receive", Err: unix.EINVAL}
					}
				}
			}
			l.start()
			port := uint16(9720 + 4*i)
			lifetime := time.Hour
			if c.end == "expire" {
				lifetime = 2 * time.Second
			}
			old, src, dst := l.inbound(t, c.kind, port, lifetime)
			gate.hold()
			defer gate.release()
			client := l.topo.ClientV6
			if c.kind == "pmp" {
				client = l.topo.ClientV4
			}
			in := port
			if c.other {
				in = port + 1
			}
			// The new mapping's internal endpoint: the client's side of the
			// new connection is accepted there.
			var accepted <-chan net.Conn
			if c.other {
				accepted = l.acceptOne(t, netip.AddrPortFrom(client, in))
			}
			src2 := netip.AddrPortFrom(src.Addr(), src.Port()+1)
			seq := l.srv.ct.seq()
			switch c.end {
			case "delete":
				if r := l.pcp(mapReq(client, pcp.ProtoTCP, port, dst.Port(), 0, 1)); r.Result != pcp.Success {
					t.Fatalf("delete: %+v", r)
				}
			case "expire":
				l.waitNoLeases(t, 5*time.Second)
			}
			waitFor(t, func() bool { return l.srv.ct.seq() > seq })
			switch c.kind {
			case "pmp":
				if got := l.pmpMap(t, port, dst.Port(), time.Hour); got != dst {
					t.Fatalf("NAT-PMP mapped again on %v, want %v", got, dst)
				}
			default:
				req := mapReq(client, pcp.ProtoTCP, in, dst.Port(), time.Hour, 2)
				if c.filter {
					req.Options.Filters = append(req.Options.Filters, pcp.Filter{Remote: netip.PrefixFrom(src2.Addr(), 128), RemotePort: src2.Port()})
				}
				r := l.pcp(req)
				if r.Result != pcp.Success || netip.AddrPortFrom(r.Map.ExternalAddr.Unmap(), r.Map.ExternalPort) != dst {
					t.Fatalf("mapped again: %+v", r)
				}
			}
			if !c.other {
				// The echo server of lab.inbound holds the port: a
				// connection to it is echoed; one to be sent from is
				// taken from another listener below.
				accepted = nil
			}
			var conn2 net.Conn
			var cside net.Conn
			if accepted != nil {
				conn2 = dialIn(t, l.topo.Internet, src2, dst)
				select {
				case cside = <-accepted:
				case <-time.After(5 * time.Second):
					t.Fatal("the new connection was not accepted")
				}
			} else {
				conn2 = dialIn(t, l.topo.Internet, src2, dst)
				if err := echoOnce(conn2); err != nil {
					t.Fatalf("through the mapping made again: %v", err)
				}
			}
			if l.ctFlow(t, src2, dst) == nil {
				t.Fatal("no entry of the new connection before the walk; nothing to test")
			}
			gate.release()
			l.srv.waitConntrack()
			gate.hold() // released again by the defer
			if c.other || c.filter {
				// No live lease admits it where it was delivered.
				if f := l.ctFlow(t, src, dst); f != nil {
					t.Errorf("the ended mapping's connection is still tracked: %s", f)
				}
				if err := echoOnce(old); err == nil {
					t.Error("the ended mapping's connection still carries data")
				}
			} else {
				t.Logf("the ended mapping's connection, admitted by the new one: tracked %v", l.ctFlow(t, src, dst) != nil)
			}
			if f := l.ctFlow(t, src2, dst); f == nil {
				t.Error("the walk of the ended mapping deleted the new mapping's connection")
			}
			if cside != nil {
				// The client's side speaks first.
				cside.SetDeadline(time.Now().Add(time.Second))
				if _, err := cside.Write([]byte("y")); err != nil {
					t.Fatal(err)
				}
				conn2.SetDeadline(time.Now().Add(2 * time.Second))
				if _, err := io.ReadFull(conn2, make([]byte, 1)); err != nil {
					t.Errorf("the client's data on the new connection did not arrive: %v", err)
				}
			} else if err := echoOnce(conn2); err != nil {
				t.Errorf("the new connection ended: %v", err)
			}
		})
	}
}
