package server

import (
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/pcpd/pcpd/pcp"
)

// TestHostPortsReadPerProtocol: the scan of the host's ports fails closed
// per protocol. A kernel that answers one protocol's sock_diag dump and
// never the other's (udp_diag or tcp_diag not built, or its module not
// installed: every dump of it ENOENT, for good) knows the first
// protocol's ports: its new IPv4 mappings are granted, never on a port a
// host service of that protocol holds, while the other protocol's are
// refused with NO_RESOURCES (NAT-PMP: OUT_OF_RESOURCES). Since df5ea06
// every new IPv4 mapping, of either protocol, was refused as long as
// either dump failed: on such a host, for ever (review revedge).
func TestHostPortsReadPerProtocol(t *testing.T) {
	tl, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer tl.Close()
	ul, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ul.Close()
	svc := map[pcp.Protocol]uint16{
		pcp.ProtoTCP: uint16(tl.Addr().(*net.TCPAddr).Port),
		pcp.ProtoUDP: uint16(ul.LocalAddr().(*net.UDPAddr).Port),
	}
	pmpOp := map[pcp.Protocol]pcp.PMPOpcode{pcp.ProtoTCP: pcp.PMPOpMapTCP, pcp.ProtoUDP: pcp.PMPOpMapUDP}
	oldTCP, oldUDP := socketDiagTCP, socketDiagUDP
	t.Cleanup(func() { socketDiagTCP, socketDiagUDP = oldTCP, oldUDP })
	absent := func(uint8) ([]*netlink.Socket, error) { return nil, syscall.ENOENT }

	for _, tc := range []struct {
		name       string
		failing    pcp.Protocol // its dump always fails
		read, unrd pcp.Protocol
	}{
		{"udp_diag absent", pcp.ProtoUDP, pcp.ProtoTCP, pcp.ProtoUDP},
		{"tcp_diag absent", pcp.ProtoTCP, pcp.ProtoUDP, pcp.ProtoTCP},
	} {
		t.Run(tc.name, func(t *testing.T) {
			socketDiagTCP, socketDiagUDP = oldTCP, oldUDP
			if tc.failing == pcp.ProtoUDP {
				socketDiagUDP = absent
			} else {
				socketDiagTCP = absent
			}
			h := newHarness(t)
			n := byte(0)
			for round := range 3 { // each round a fresh scan: the failure lasts
				h.s.hostPorts.mu.Lock()
				h.s.hostPorts.at = time.Time{}
				h.s.hostPorts.mu.Unlock()

				n++
				port := uint16(6000 + round)
				r := h.do(mapReq(v4A, tc.read, port, svc[tc.read], time.Hour, n))
				if r.Result != pcp.Success || r.Map.ExternalPort == 0 || r.Map.ExternalPort == svc[tc.read] {
					t.Fatalf("round %d: MAP %v suggesting the host service's %d, its dump good: %v, external port %d; want SUCCESS on another port",
						round, tc.read, svc[tc.read], r.Result, r.Map.ExternalPort)
				}
				if r := h.pmp(v4A, pmpOp[tc.read], port+100, svc[tc.read], time.Hour); r.Result != pcp.PMPSuccess || r.ExternalPort == svc[tc.read] {
					t.Fatalf("round %d: NAT-PMP map %v: result %d, external port %d; want SUCCESS on another port than %d",
						round, tc.read, r.Result, r.ExternalPort, svc[tc.read])
				}
				n++
				if r := h.do(mapReq(v4A, tc.unrd, port+200, svc[tc.unrd], time.Hour, n)); r.Result != pcp.NoResources {
					t.Fatalf("round %d: MAP %v, its dump failing: %v, external port %d; want NO_RESOURCES", round, tc.unrd, r.Result, r.Map.ExternalPort)
				}
				if r := h.pmp(v4A, pmpOp[tc.unrd], port+300, 0, time.Hour); r.Result != pcp.PMPOutOfResources {
					t.Fatalf("round %d: NAT-PMP map %v, its dump failing: result %d; want OUT_OF_RESOURCES", round, tc.unrd, r.Result)
				}
			}
			if n := h.logs.FilterMessageSnippet("cannot list the host's sockets").Len(); n != 1 {
				t.Errorf("%d warnings of the failing dumps, want 1", n)
			}
		})
	}
}
