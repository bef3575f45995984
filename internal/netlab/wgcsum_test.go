package netlab

import (
	"bytes"
	"encoding/binary"
	"net/netip"
	"testing"
	"time"
)

// zeroSumPayload is a payload of n octets (n ≥ 2, even) whose UDP datagram
// from src to dst has a one's-complement sum of 0xffff: its computed
// checksum is 0, which a sender must carry as 0xffff (RFC 768; RFC 8200
// §8.1: an IPv6 receiver discards a datagram whose checksum field is 0).
// One datagram in 65 536 is such; TestE2ENATPriorPruned's delete of port
// 20034 from client port 36502 was one (h/flake2).
func zeroSumPayload(src, dst netip.AddrPort, n int) []byte {
	p := bytes.Repeat([]byte{0x5a}, n)
	p[n-2], p[n-1] = 0, 0
	var sum uint32
	add := func(b []byte) {
		for i := 0; i+1 < len(b); i += 2 {
			sum += uint32(binary.BigEndian.Uint16(b[i:]))
		}
	}
	s, d := src.Addr().As16(), dst.Addr().As16()
	add(s[:])
	add(d[:])
	ulen := uint16(8 + n)
	add([]byte{0, 0, byte(ulen >> 8), byte(ulen), 0, 0, 0, 17}) // pseudo-header: length, next header
	add([]byte{byte(src.Port() >> 8), byte(src.Port()), byte(dst.Port() >> 8), byte(dst.Port()), byte(ulen >> 8), byte(ulen), 0, 0})
	add(p)
	for sum > 0xffff {
		sum = sum&0xffff + sum>>16
	}
	binary.BigEndian.PutUint16(p[n-2:], uint16(0xffff-sum))
	return p
}

// TestWireGuardZeroChecksumUDP (root; h/flake2): an IPv6 UDP datagram whose
// checksum computes to 0 crosses the lab's WireGuard tunnel both ways.
// wireguard-go (tun/offload_linux.go gsoNoneChecksum) completes the
// checksum of a datagram the kernel hands its TUN device unfinished
// (CHECKSUM_PARTIAL: the device offers checksum offload) and writes 0
// where 0xffff belongs, and the far side's kernel drops the datagram
// (Udp6InCsumErrors). The same datagram resent is dropped every time:
// TestE2ENATPriorPruned's delete got no reply in 30 s, once in CI, and a
// fresh socket (another port, another sum) got its answer at once.
func TestWireGuardZeroChecksumUDP(t *testing.T) {
	topo := NewTopology(t, TopologyOptions{WireGuard: true})
	for _, tc := range []struct {
		name     string
		from, to *NS
		src, dst netip.AddrPort
	}{
		{"client to host", topo.Client, topo.Host, netip.AddrPortFrom(topo.ClientV6, 36502), netip.AddrPortFrom(topo.HostTunnelV6, 5399)},
		{"host to client", topo.Host, topo.Client, netip.AddrPortFrom(topo.HostTunnelV6, 5398), netip.AddrPortFrom(topo.ClientV6, 36503)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rx := tc.to.MustListenUDP(t, tc.dst)
			tx := tc.from.MustListenUDP(t, tc.src)
			for _, zero := range []bool{false, true} {
				p := zeroSumPayload(tc.src, tc.dst, 60)
				if !zero {
					p[0]++ // any other sum
				}
				got := false
				for try := 0; try < 3 && !got; try++ {
					if _, err := tx.WriteToUDPAddrPort(p, tc.dst); err != nil {
						t.Fatal(err)
					}
					rx.SetReadDeadline(time.Now().Add(time.Second))
					buf := make([]byte, 2048)
					n, err := rx.Read(buf)
					got = err == nil && bytes.Equal(buf[:n], p)
				}
				if !got {
					csum, _ := tc.to.Run("sh", "-c", "grep -E 'Udp6(InErrors|InCsumErrors)' /proc/net/snmp6")
					t.Errorf("zero-sum %v: the datagram %v → %v never arrived (3 sends); the receiver's %q", zero, tc.src, tc.dst, csum)
				}
			}
		})
	}
}
