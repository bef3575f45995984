package server

import (
	"fmt"
	"net"
	"net/netip"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/policy"
	"github.com/pcpd/pcpd/store"
	"go.uber.org/zap"
)

// Standalone, the guard cuts an IPv6 pinhole's established flows itself
// the moment its element goes (pinhole/cutflows.go), so a delete's reply
// waits for the conntrack walk only when it ended a mapping whose flows
// the ruleset does not cut (mustWaitFlush): an IPv4 NAPT mapping and its
// SNAT-ed flows, an IPv6 redirect, attached mode.

// ctGate holds the conntrack walks of a lab's server back while closed.
type ctGate struct {
	mu   sync.Mutex
	held chan struct{} // nil: open
}

func (g *ctGate) hold() {
	g.mu.Lock()
	g.held = make(chan struct{})
	g.mu.Unlock()
}

func (g *ctGate) release() {
	g.mu.Lock()
	close(g.held)
	g.held = nil
	g.mu.Unlock()
}

func (g *ctGate) tweak(s *Server) {
	walk := s.ct.walk
	s.ct.walk = func(fs []ctFilter) ([]ctFilter, error) {
		g.mu.Lock()
		h := g.held
		g.mu.Unlock()
		if h != nil {
			<-h
		}
		return walk(fs)
	}
}

// sendOnce sends b once from the Client namespace (from laddr) to dst
// and returns the socket, to read the reply from: a retransmission would
// be answered at once (the mapping is gone by then) and hide a held reply.
func (l *lab) sendOnce(t *testing.T, laddr, dst netip.AddrPort, b []byte) *net.UDPConn {
	t.Helper()
	var c *net.UDPConn
	if err := l.topo.Client.Do(func() (err error) {
		c, err = net.DialUDP("udp", net.UDPAddrFromAddrPort(laddr), net.UDPAddrFromAddrPort(dst))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if _, err := c.Write(b); err != nil {
		t.Fatal(err)
	}
	return c
}

// udpInbound opens an IPv6 PCP MAP of the client's UDP port and an
// established UDP flow through it from the Internet (an echo round trip).
func (l *lab) udpInbound(t *testing.T, port uint16) (net.Conn, netip.AddrPort, netip.AddrPort) {
	t.Helper()
	client := netip.AddrPortFrom(l.topo.ClientV6, port)
	l.topo.Client.ServeUDPEcho(t, client.String())
	resp := l.pcp(mapReq(client.Addr(), pcp.ProtoUDP, port, port, time.Hour, 1))
	if resp.Result != pcp.Success {
		t.Fatalf("MAP UDP: %+v", resp)
	}
	src := netip.AddrPortFrom(l.topo.InternetV6, port+40000)
	var c net.Conn
	if err := l.topo.Internet.Do(func() (err error) {
		d := net.Dialer{LocalAddr: net.UDPAddrFromAddrPort(src)}
		c, err = d.Dial("udp", client.String())
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if err := echoOnce(c); err != nil {
		t.Fatalf("UDP through the live mapping: %v", err)
	}
	return c, src, client
}

// TestE2EDeleteReplyCutsWithoutWalk (issue 8's churn row, PMP-12): with
// the conntrack walk held back, the delete of an IPv6 PCP MAP (TCP, UDP)
// is answered, and its established flow's next packet from the remote is
// dropped by the guard: the flow's conntrack entry is still there (no
// walk ran); once the walk runs, the entry goes too. The delete of a
// NAT-PMP mapping or a PCP IPv4 MAP (IPv4 NAPT: the ruleset cuts the
// DNAT-ed flows, not the SNAT-ed ones, pinhole/natcut.go) is not
// answered until the walk ran, and then its flow is gone; an IPv6
// redirect's is answered with the walk held and its flow cut by natcut.
// On main the IPv6 rows fail (the redirect's: the reply waits for the
// held walk, no reply within ctFlushBound).
// Without the guard's re-check (the pinhole layout of main, the server's
// change kept) the flow carries data after the reply. The "attached"
// rows do the same beneath an admin's forward chain that accepts
// established flows before "jump pcpd" (pinhole/attcut.go): on main the
// two IPv6 ones get no reply while the walk is held (CutsFlows false).
func TestE2EDeleteReplyCutsWithoutWalk(t *testing.T) {
	for i, c := range []struct {
		name string
		kind string // "map6", "udp6", "pmp"
		cut  bool   // answered with the walk held, the flow cut by the guard
	}{
		{"PCP MAP IPv6 TCP", "map6", true},
		{"PCP MAP IPv6 UDP", "udp6", true},
		{"NAT-PMP (IPv4 NAPT)", "pmp", false},
		// pinhole/natcut.go: the DNAT-ed flows are cut by the ruleset;
		// an IPv4 MAP's SNAT-ed ones only by the walk.
		{"PCP MAP IPv6 redirect", "redir6", true},
		{"PCP MAP IPv4", "map4", false},
		// Attached beneath an admin's forward chain that accepts
		// established flows first (pinhole/attcut.go: pcpd_cut).
		{"attached, PCP MAP IPv6 TCP", "attached map6", true},
		{"attached, PCP MAP IPv6 redirect", "attached redir6", true},
		{"attached, NAT-PMP", "attached pmp", false},
	} {
		t.Run(c.name, func(t *testing.T) {
			var gate ctGate
			l := newLab(t, func(_ *Config, p *policy.Config) { p.MinLifetime = time.Second })
			l.stop()
			kind, attached := strings.CutPrefix(c.kind, "attached ")
			if attached {
				l.attach(t)
			}
			l.tweak = gate.tweak
			l.start()
			port := uint16(9900 + i)
			var proto uint8 = protoTCP
			var conn net.Conn
			var src, dst netip.AddrPort
			var req []byte
			var from, to netip.AddrPort
			switch kind {
			case "udp6":
				proto = protoUDP
				conn, src, dst = l.udpInbound(t, port)
				from, to = netip.AddrPortFrom(l.topo.ClientV6, 0), l.server6()
				req = pcp.AppendRequest(nil, mapReq(l.topo.ClientV6, pcp.ProtoUDP, port, port, 0, 1))
			case "map6":
				conn, src, dst = l.inbound(t, "map6", port, time.Hour)
				from, to = netip.AddrPortFrom(l.topo.ClientV6, 0), l.server6()
				req = pcp.AppendRequest(nil, mapReq(l.topo.ClientV6, pcp.ProtoTCP, port, port, 0, 1))
			case "redir6":
				conn, src, dst = l.inbound(t, "redir6", port, time.Hour)
				from, to = netip.AddrPortFrom(l.topo.ClientV6, 0), l.server6()
				req = pcp.AppendRequest(nil, mapReq(l.topo.ClientV6, pcp.ProtoTCP, port, dst.Port(), 0, 1))
			case "map4":
				conn, src, dst = l.inbound(t, "map4", port, time.Hour)
				from, to = netip.AddrPortFrom(l.topo.ClientV4, 0), l.server4()
				req = pcp.AppendRequest(nil, mapReq(l.topo.ClientV4, pcp.ProtoTCP, port, dst.Port(), 0, 1))
			case "pmp":
				conn, src, dst = l.inbound(t, "pmp", port, time.Hour)
				to = l.server4()
				req = pcp.AppendPMPRequest(nil, &pcp.PMPRequest{Opcode: pcp.PMPOpMapTCP, InternalPort: port})
			}
			gate.hold()
			held := true
			defer func() {
				if held {
					gate.release()
				}
			}()
			rc := l.sendOnce(t, from, to, req)
			buf := make([]byte, 1100)
			if !c.cut {
				// Answered only after the walk: none while it is held.
				rc.SetReadDeadline(time.Now().Add(700 * time.Millisecond))
				if _, err := rc.Read(buf); err == nil {
					t.Fatal("delete answered while its conntrack walk was held back")
				}
				gate.release()
				held = false
			}
			rc.SetReadDeadline(time.Now().Add(ctFlushBound))
			if _, err := rc.Read(buf); err != nil {
				t.Fatalf("no reply to the delete (walk held: %v): %v", held, err)
			}
			if held {
				if l.ctFlowOf(t, proto, src, dst) == nil {
					t.Fatal("flow gone with the walk held: nothing to test")
				}
				if err := echoOnce(conn); err == nil {
					t.Error("the flow carries data after its delete was answered")
				}
				gate.release()
				held = false
				l.waitFlowGoneOf(t, proto, src, dst)
				return
			}
			if f := l.ctFlowOf(t, proto, src, dst); f != nil {
				t.Errorf("flow still tracked after the answered delete: %s", f)
			}
			if err := echoOnce(conn); err == nil {
				t.Error("the flow carries data after its delete was answered")
			}
		})
	}
}

// waitFlowGoneOf is waitFlowGone for a protocol.
func (l *lab) waitFlowGoneOf(t *testing.T, proto uint8, src, dst netip.AddrPort) {
	t.Helper()
	deadline := time.Now().Add(ctFlushBound)
	for l.ctFlowOf(t, proto, src, dst) != nil {
		if time.Now().After(deadline) {
			t.Fatalf("flow %v → %v still tracked %v after the walk was let go", src, dst, ctFlushBound)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// cutterFunc is a FlowCutter.
type cutterFunc func(pinhole.Pinhole) bool

func (f cutterFunc) CutsFlows(p pinhole.Pinhole) bool { return f(p) }

// TestMustWaitFlush: a reply waits for the walk when any mapping its
// request ended is one whose flows the firewall does not cut (a kind
// CutsFlows is false for, everything without a FlowCutter: attached
// mode, a kernel without labels) or an IPv4 NAPT mapping that is not a
// PEER (its SNAT-ed flows: snatFlows), and never with KeepConnections.
// Fails with mustWaitFlush always true (main's "ends"): the all-cut rows;
// and without snatFlows' check: the "IPv4 NAPT MAP, natcut" row.
func TestMustWaitFlush(t *testing.T) {
	v6 := netip.MustParseAddr("2001:db8:1::10")
	v4, ext4 := netip.MustParseAddr("10.0.0.10"), netip.MustParseAddr("192.0.2.1")
	map6 := store.Lease{Key: store.Key{Protocol: protoTCP, InternalAddr: v6, InternalPort: 80}, ExternalAddr: v6, ExternalPort: 80}
	allPorts6 := store.Lease{Key: store.Key{Protocol: protoTCP, InternalAddr: v6}, ExternalAddr: v6}
	redirect6 := store.Lease{Key: store.Key{Protocol: protoTCP, InternalAddr: v6, InternalPort: 80}, ExternalAddr: v6, ExternalPort: 8080}
	napt4 := store.Lease{Key: store.Key{Protocol: protoTCP, InternalAddr: v4, InternalPort: 80}, ExternalAddr: ext4, ExternalPort: 8080}
	peer4 := napt4
	peer4.Kind = store.KindPeer
	// As pinhole.Backend's before natcut.go, standalone: IPv6 pinholes but
	// redirects.
	standalone := cutterFunc(func(p pinhole.Pinhole) bool {
		return p.InternalAddr.Is6() && (p.ExternalPort == 0 || p.ExternalPort == p.InternalPort)
	})
	// With natcut.go: every kind.
	natcut := cutterFunc(func(pinhole.Pinhole) bool { return true })
	for _, c := range []struct {
		name   string
		cutter FlowCutter
		keep   bool
		ended  []store.Lease
		want   bool
	}{
		{"IPv6 MAP, cut", standalone, false, []store.Lease{map6}, false},
		{"IPv6 MAPs, all cut", standalone, false, []store.Lease{map6, allPorts6}, false},
		{"IPv6 MAP and IPv4 NAPT", standalone, false, []store.Lease{map6, napt4}, true},
		{"IPv6 redirect", standalone, false, []store.Lease{redirect6}, true},
		{"IPv6 redirect, natcut", natcut, false, []store.Lease{redirect6}, false},
		{"IPv4 PEER, natcut", natcut, false, []store.Lease{peer4}, false},
		{"IPv4 PEER, no natcut", standalone, false, []store.Lease{peer4}, true},
		// Its SNAT-ed outbound flows: only the walk ends them.
		{"IPv4 NAPT MAP, natcut", natcut, false, []store.Lease{napt4}, true},
		{"IPv6 MAP and IPv4 PEER, natcut", natcut, false, []store.Lease{map6, peer4}, false},
		{"no FlowCutter (attached)", nil, false, []store.Lease{map6}, true},
		{"KeepConnections", nil, true, []store.Lease{napt4}, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			s := &Server{cutter: c.cutter}
			s.cfg.KeepConnections = c.keep
			if got := s.mustWaitFlush(c.ended); got != c.want {
				t.Errorf("mustWaitFlush = %v, want %v", got, c.want)
			}
		})
	}
}

// TestCtWalksSpaced: walks nobody waits for start at least a gap apart
// (ctWalkGap; an hour here): flushes queued within it share one walk, and
// a waiter (an IPv4 NAPT delete's reply, HandleBatch) has it run at once.
// Without the spacing (gap < 0, main's flusher) the second flush walks
// alone at once, and the test fails there.
func TestCtWalksSpaced(t *testing.T) {
	walked := make(chan []ctFilter, 10)
	c := &ctFlusher{gap: time.Hour, walk: func(fs []ctFilter) ([]ctFilter, error) {
		walked <- fs
		return nil, nil
	}}
	c.add([]ctFilter{{t: ctTarget{port: 1}}})
	if fs := <-walked; len(fs) != 1 {
		t.Fatalf("first walk of %d filters, want 1", len(fs))
	}
	c.add([]ctFilter{{t: ctTarget{port: 2}}})
	c.add([]ctFilter{{t: ctTarget{port: 3}}})
	select {
	case fs := <-walked:
		t.Fatalf("a walk of %d filters nobody waited for, within the gap", len(fs))
	case <-time.After(200 * time.Millisecond): // none comes within the hour
	}
	done := make(chan struct{})
	c.after(c.seq(), func() { close(done) })
	select {
	case fs := <-walked:
		if len(fs) != 2 {
			t.Errorf("the waiter's walk had %d filters, want the 2 queued in the gap", len(fs))
		}
	case <-time.After(ctFlushBound):
		t.Fatal("a waiter did not cut the gap short")
	}
	select {
	case <-done:
	case <-time.After(ctFlushBound):
		t.Fatal("waiter not released after the walk")
	}
}

// TestEndConntrackRunsSpacedWalk (review h/revctcut): a walk nobody
// waits for, held back by the gap (ctWalkGap) when Serve ends, has run
// when Serve's end (endConntrack) returns: pcpd exits right after, and
// the flows of a mapping revoked or expired just before (IPv4 NAPT: only
// the walk ends them) outlived it for good. With endConntrack only
// closing the flusher (h/ctcut's Serve: s.ct.close()), the walk had not
// run when it returned.
func TestEndConntrackRunsSpacedWalk(t *testing.T) {
	var mu sync.Mutex
	walks := 0
	s := &Server{log: zap.NewNop()}
	s.ct = ctFlusher{gap: time.Hour, walk: func(fs []ctFilter) ([]ctFilter, error) {
		mu.Lock()
		walks++
		mu.Unlock()
		return nil, nil
	}}
	s.ct.add([]ctFilter{{t: ctTarget{port: 1}}})
	s.waitConntrack() // the first walk, which starts the gap
	s.ct.add([]ctFilter{{t: ctTarget{port: 2}}})
	s.endConntrack()
	mu.Lock()
	defer mu.Unlock()
	if walks != 2 {
		t.Errorf("%d walks when Serve's end returned, want 2 (the one held back by the gap too)", walks)
	}
}

// TestE2EUpgradeDeleteWaitsForWalk (review h/revctcut): a pcpd started
// over a table whose guard6 admits without the label (one laid out before
// the label rules: an upgrade) does not answer the delete of an IPv6 MAP
// whose connection opened then until its walk ran, and then the flow is
// gone: that flow is unlabelled, the re-check never drops it. With
// h/ctcut's Setup (CutsFlows true whatever the table held before) the
// delete was answered with the walk held back, and the flow carried data
// after it. The delete is sent once the restarted server's view of the
// client's owner is read (waitOwnerServed) and its reply must be a
// SUCCESS: sent before, under load, it was refused NOT_AUTHORIZED (no
// owner yet, nothing deleted, the flow rightly alive), and the test took
// that refusal for the delete's answer (CI run 50: "delete answered while
// its conntrack walk was held back", 2-4 of 30-40 runs beside two busy
// cores, h/flake).
func TestE2EUpgradeDeleteWaitsForWalk(t *testing.T) {
	for _, c := range []struct {
		kind, chain, set string
		label            string // the label set as the rule has it
		port, ext        uint16
	}{
		{"map6", "guard6", "pin6", " ct label set 127 goto admit6", 9950, 9950},
		// pinhole/natcut.go: a redirect's DNAT rule without its label
		// (main's prerouting); without translatesUnlabelled the reply
		// is sent with the walk held and the flow carries data after it.
		{"redir6", "prerouting", "redir6", " ct label set 126", 9951, 10051},
	} {
		t.Run(c.kind, func(t *testing.T) {
			var gate ctGate
			l := newLab(t, func(c *Config, p *policy.Config) {
				p.MinLifetime = time.Second
				c.TamperInterval = time.Hour // the repair would be the upgrade's Setup too
				c.NoFirewallWatch = true
			})
			l.restartWith(gate.tweak)
			// The rule of the set as a pcpd before the labels wrote it.
			out := l.topo.Host.MustRun(t, "nft", "-a", "list", "chain", "inet", "pcpd", c.chain)
			m := regexp.MustCompile(`\n\s*(\S[^\n]*@` + c.set + `)` + regexp.QuoteMeta(c.label) + `([^\n]*) # handle (\d+)`).FindStringSubmatch(out)
			if m == nil {
				t.Fatalf("no labelling rule of %s in %s:\n%s", c.set, c.chain, out)
			}
			unlabelled := m[1] + m[2]
			if c.chain == "guard6" {
				unlabelled += " accept"
			}
			l.topo.Host.MustRun(t, "sh", "-c", "nft replace rule inet pcpd "+c.chain+" handle "+m[3]+" "+unlabelled)
			conn, src, dst := l.inbound(t, c.kind, c.port, time.Hour)
			l.stop()
			l.start() // the upgraded pcpd: its Setup writes the labelled layout
			l.waitOwnerServed(t, l.topo.ClientV6)
			gate.hold()
			held := true
			defer func() {
				if held {
					gate.release()
				}
			}()
			rc := l.sendOnce(t, netip.AddrPortFrom(l.topo.ClientV6, 0), l.server6(),
				pcp.AppendRequest(nil, mapReq(l.topo.ClientV6, pcp.ProtoTCP, c.port, c.ext, 0, 1)))
			buf := make([]byte, 1100)
			rc.SetReadDeadline(time.Now().Add(700 * time.Millisecond))
			if n, err := rc.Read(buf); err == nil {
				mustDeleted(t, buf[:n])
				if err := echoOnce(conn); err == nil {
					t.Error("the flow (opened before the upgrade) carries data after its delete was answered")
				}
				t.Fatal("delete answered while its conntrack walk was held back")
			}
			gate.release()
			held = false
			rc.SetReadDeadline(time.Now().Add(ctFlushBound))
			n, err := rc.Read(buf)
			if err != nil {
				t.Fatalf("no reply to the delete after the walk: %v", err)
			}
			mustDeleted(t, buf[:n])
			if f := l.ctFlowOf(t, protoTCP, src, dst); f != nil {
				t.Errorf("flow still tracked after the answered delete: %s", f)
			}
			if err := echoOnce(conn); err == nil {
				t.Error("the flow carries data after its delete was answered")
			}
		})
	}
}

// waitOwnerServed waits until the ownership's view has an owner for a
// request from a arriving on the lab's served interface. Each start of
// the lab's server has its listener report that interface as a changed
// device (policy.WireGuard.DevicesChanged: the lab's WireGuard reads the
// device from outside the Host namespace, so FirstIndex does not know
// it), which drops the interface's peers from the view until a re-read;
// a request that opens a pinhole waits for that read (freshFirst), and
// so, since h/delwait, does a delete (before, it was refused
// NOT_AUTHORIZED, no owner, meanwhile: TestE2EDeleteAfterDeviceChange).
// A test that wants its delete to meet the read view at once (not
// deferred to the THIRD_PARTY queue) still waits here.
func (l *lab) waitOwnerServed(t *testing.T, a netip.Addr) {
	t.Helper()
	if err := netlab.Eventually(5*time.Second, func() error {
		if _, ok := l.wg.LookupOn(a, l.topo.HostLANIf); !ok {
			return fmt.Errorf("%v has no owner on %s", a, l.topo.HostLANIf)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
}

// mustDeleted fails t unless b is a PCP MAP reply of SUCCESS: a delete
// refused deleted nothing, and its mapping's flow rightly lives on.
func mustDeleted(t *testing.T, b []byte) {
	t.Helper()
	var r pcp.Response
	if err := pcp.ParseResponse(b, &r); err != nil {
		t.Fatalf("reply to the delete % x: %v", b, err)
	}
	if r.Opcode != pcp.OpMap || r.Result != pcp.Success {
		t.Fatalf("delete refused (%v %v, lifetime %v): nothing deleted, nothing to test", r.Opcode, r.Result, r.Lifetime)
	}
}
