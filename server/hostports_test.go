package server

import (
	"net"
	"net/netip"
	"slices"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/policy"
	"github.com/pcpd/pcpd/server/servertest"
)

// TestE2EMAP12HostPortsReserved: an IPv4 NAPT mapping never takes a
// public port the host itself uses, whatever the client suggests: the
// WireGuard listen port (a UDP mapping there would DNAT the tunnel away),
// a port a host service listens on, pcpd's 5350/5351 (TCP too), and the
// configured reserved ports. A reserved suggestion counts as taken: another
// port is granted (MAP-09), or CANNOT_PROVIDE_EXTERNAL with PREFER_FAILURE
// (PF-04). The tunnel keeps working.
func TestE2EMAP12HostPortsReserved(t *testing.T) {
	const reservedCfg = 40001
	l := newLab(t, func(c *Config, _ *policy.Config) { c.ReservedPorts = []uint16{reservedCfg} })
	wgPort := uint16(l.topo.HostWGPort)
	// A host service on TCP 2222, listening on every address.
	var ln net.Listener
	if err := l.topo.Host.Do(func() (err error) {
		ln, err = net.Listen("tcp", ":2222")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	// A service started after pcpd: found at allocation time.
	time.Sleep(hostPortsTTL)

	pcpMap := func(proto pcp.Protocol, port, sugg uint16, pf bool, n byte) pcp.Response {
		r := mapReq(l.topo.ClientV4, proto, port, sugg, time.Hour, n)
		r.Map.ExternalAddr = l.topo.HostPublicV4
		r.Options.PreferFailure = pf
		return l.pcp(r)
	}
	for i, tc := range []struct {
		name  string
		proto pcp.Protocol
		port  uint16
	}{
		{"WireGuard listen port", pcp.ProtoUDP, wgPort},
		{"host TCP listener", pcp.ProtoTCP, 2222},
		{"PCP port over TCP", pcp.ProtoTCP, pcp.Port},
		{"NAT-PMP announce port over TCP", pcp.ProtoTCP, pcp.ClientPort},
		{"configured reserved port", pcp.ProtoUDP, reservedCfg},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// Internal port = the reserved one too, so the fallback to
			// the internal port must skip it as well.
			r := pcpMap(tc.proto, tc.port, tc.port, false, byte(2*i+1))
			if r.Result != pcp.Success || r.Map.ExternalPort == tc.port || r.Map.ExternalPort == 0 {
				t.Fatalf("MAP %v suggesting %d: %v, external port %d", tc.proto, tc.port, r.Result, r.Map.ExternalPort)
			}
			if r := pcpMap(tc.proto, tc.port+1, tc.port, true, byte(2*i+2)); r.Result != pcp.CannotProvideExternal {
				t.Fatalf("MAP %v + PREFER_FAILURE suggesting %d: %v, external port %d", tc.proto, tc.port, r.Result, r.Map.ExternalPort)
			}
		})
	}
	t.Run("NAT-PMP", func(t *testing.T) {
		b := pcp.AppendPMPRequest(nil, &pcp.PMPRequest{Opcode: pcp.PMPOpMapUDP, InternalPort: wgPort, SuggestedExternalPort: wgPort, Lifetime: time.Hour})
		out, err := l.exchange(netip.AddrPort{}, l.server4(), b)
		if err != nil {
			t.Fatal(err)
		}
		var r pcp.PMPResponse
		if err := pcp.ParsePMPResponse(out, &r); err != nil || r.Result != 0 || r.ExternalPort == wgPort {
			t.Fatalf("NAT-PMP UDP %d: % x %v", wgPort, out, err)
		}
	})
	for _, e := range l.kernelHoles() {
		if e.Pinhole.ExternalAddr == l.topo.HostPublicV4 && e.Pinhole.Protocol == protoUDP && e.Pinhole.ExternalPort == wgPort {
			t.Fatalf("kernel maps the WireGuard port: %v", e.Pinhole)
		}
	}
	// The tunnel still carries traffic: a request over it is answered.
	if r := l.pcp(pcp.NewAnnounce(l.topo.ClientV4)); r.Result != pcp.Success {
		t.Fatalf("ANNOUNCE over the tunnel: %v", r.Result)
	}
	if err := netlab.Eventually(2*time.Second, func() error {
		_, err := l.topo.Client.Run("ping", "-c", "1", "-W", "1", l.topo.HostTunnelV4.String())
		return err
	}); err != nil {
		t.Fatalf("ping over the tunnel: %v", err)
	}
}

// TestPortSet: every port, 0 and 65535 included, is in the set iff added;
// neighbours in the same word are not; union keeps both sides.
func TestPortSet(t *testing.T) {
	for _, tc := range []struct {
		name  string
		ports []uint16
	}{
		{"empty", nil},
		{"edges", []uint16{0, 65535}},
		{"one word", []uint16{64, 65, 127}},
		{"word boundaries", []uint16{63, 64, 4095, 4096, 65472}},
		{"pcp ports", []uint16{pcp.ClientPort, pcp.Port}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var s portSet
			for _, p := range tc.ports {
				s.add(p)
			}
			for p := range 1 << 16 {
				if got, want := s.has(uint16(p)), slices.Contains(tc.ports, uint16(p)); got != want {
					t.Fatalf("has(%d) = %v, want %v", p, got, want)
				}
			}
			var u portSet
			u.add(1000)
			u.union(&s)
			if !u.has(1000) {
				t.Fatal("union lost its own port")
			}
			for _, p := range tc.ports {
				if !u.has(p) {
					t.Fatalf("union lost %d", p)
				}
			}
		})
	}
}

// TestReservedPortsStatic: pcpd's own ports and every configured reserved
// port are reserved for both protocols, with a list far beyond the 1 024
// the configuration allowed when each candidate walked it (no scan of the
// host is needed for them).
func TestReservedPortsStatic(t *testing.T) {
	var list []uint16
	for p := uint16(20000); p < 60000; p += 3 {
		list = append(list, p)
	}
	own, err := policy.NewStatic(map[string][]netip.Prefix{"a": {netip.MustParsePrefix("2001:db8::/32")}})
	if err != nil {
		t.Fatal(err)
	}
	pol, err := policy.New(policy.Config{}, own)
	if err != nil {
		t.Fatal(err)
	}
	s, err := New(Config{ReservedPorts: list}, Deps{Firewall: servertest.NewFirewall(time.Now), Store: servertest.NewStore(), Policy: pol}, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	h := &s.hostPorts
	for _, proto := range []uint8{protoTCP, protoUDP} {
		for _, p := range append([]uint16{pcp.Port, pcp.ClientPort}, list...) {
			if !h.reserved(proto, p) {
				t.Fatalf("%s port %d not reserved", protoName(proto), p)
			}
		}
	}
	if !h.at.IsZero() {
		t.Error("static ports made the host be scanned")
	}
	// A port off the list is not in the static set (whether the host uses
	// it is the scan's business).
	if h.static.has(20001) || h.static.has(19999) || h.static.has(60001) {
		t.Error("static set holds ports not configured")
	}
}

// TestHostPortsBackgroundRefresh: with the background refresher on (as
// housekeep runs it beside the engine), an allocation's check uses the
// sets the refresher keeps fresh instead of dumping the host's sockets
// itself (2.6-3 ms in the engine every 2 s); a listener opened since is
// reserved after the next refresh; an idle server is not rescanned; and
// a stale set (refresher stopped or behind) is rescanned inline.
func TestHostPortsBackgroundRefresh(t *testing.T) {
	s := &Server{log: zap.NewNop()}
	h := &hostPorts{s: s}
	h.setBackground(true)
	const spare = 39999         // not static: only 5350, 5351 are
	h.reserved(protoTCP, spare) // first use: scans inline
	first := h.at
	if first.IsZero() {
		t.Fatal("first use did not scan")
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	port := uint16(ln.Addr().(*net.TCPAddr).Port)
	if h.reserved(protoTCP, port) {
		t.Fatalf("port %d reserved before any rescan (the check scanned inline)", port)
	}
	if h.at != first {
		t.Fatal("a fresh set was rescanned inline")
	}
	h.refresh()
	if !h.reserved(protoTCP, port) || h.at == first {
		t.Fatalf("listener on %d not reserved after the background refresh", port)
	}
	// Idle: no allocation asked within hostPortsIdle, no rescan.
	h.mu.Lock()
	h.lastUse = time.Now().Add(-hostPortsIdle - time.Second)
	at := h.at
	h.mu.Unlock()
	h.refresh()
	if h.at != at {
		t.Error("idle server rescanned")
	}
	// Stale beyond the TTL and the slack: the check scans itself.
	h.mu.Lock()
	h.at = time.Now().Add(-hostPortsTTL - hostPortsSlack - time.Second)
	stale := h.at
	h.mu.Unlock()
	h.reserved(protoTCP, spare)
	if h.at == stale {
		t.Error("stale set used without a rescan")
	}
}

// TestHostPortsResolveErrorKeepsPorts: a configured interface name that
// cannot be resolved (a transient netlink error, not "no such interface")
// fails the dump, so the ports reserved before stay reserved: skipping it
// freed the WireGuard listen port (which the socket dump may not show,
// kernel WireGuard's socket living where the device was created) for a
// NAPT mapping that would carry the tunnel away.
func TestHostPortsResolveErrorKeepsPorts(t *testing.T) {
	const wgPort = 51999 // stands for the listen port read before
	s := &Server{log: zap.NewNop(), cfg: Config{Interfaces: []string{"wireguard-to-the-branch-office-of-bremen"}}}
	h := &hostPorts{s: s}
	old := kernelName
	t.Cleanup(func() { kernelName = old })
	kernelName = func(string) (string, bool, error) { return "", false, nil }
	h.mu.Lock()
	h.scan()
	if h.udp.has(wgPort) {
		h.mu.Unlock()
		t.Skipf("UDP %d in use on this host", wgPort)
	}
	h.udp.add(wgPort)
	kernelName = func(string) (string, bool, error) { return "", false, syscall.ENOBUFS }
	h.scan()
	kept := h.udp.has(wgPort)
	h.mu.Unlock()
	if !kept {
		t.Errorf("UDP %d no longer reserved after a scan whose name resolution failed", wgPort)
	}
}
