package reliability

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
)

// Expected outcomes besides a result code.
const (
	wantDrop       = -1 // silent drop (PKT-01..03, PMP-03)
	wantNotSuccess = -2 // any error reply or a drop (fuzz corpus: no table to say which)
)

// badCase is one hostile datagram.
type badCase struct {
	name  string // PROTOCOL.md ID and what is wrong
	v4    bool   // sent from an IPv4 source (PCP over IPv4, NAT-PMP)
	build func(src netip.Addr) []byte
	want  int  // result code, wantDrop or wantNotSuccess
	live  bool // aimed at the live mapping (sent from its owner)
}

// Raw packet builders. pcp.AppendRequest makes the valid base; the faults
// are applied to its bytes, as an attacker would.

func mapBytes(src netip.Addr, proto pcp.Protocol, port uint16, life time.Duration) []byte {
	return pcp.AppendRequest(nil, pcp.NewMap(src, proto, port, life))
}

func peerBytes(src netip.Addr, proto pcp.Protocol, port uint16, remote netip.AddrPort) []byte {
	return pcp.AppendRequest(nil, pcp.NewPeer(src, proto, port, remote, time.Hour))
}

func announceBytes(src netip.Addr) []byte { return pcp.AppendRequest(nil, pcp.NewAnnounce(src)) }

// opt encodes one option with its zero padding.
func opt(code byte, data []byte) []byte {
	b := []byte{code, 0, byte(len(data) >> 8), byte(len(data))}
	b = append(b, data...)
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	return b
}

func addr16(a netip.Addr) []byte {
	b := a.As16()
	if a.Is4() {
		b = netip.AddrFrom16(b).As16() // As16 of an IPv4 address is already ::ffff:a.b.c.d
	}
	return b[:]
}

func tpOpt(a netip.Addr) []byte { return opt(1, addr16(a)) }

func filterOpt(prefixLen byte, port uint16, remote netip.Addr) []byte {
	d := []byte{0, prefixLen, byte(port >> 8), byte(port)}
	return opt(3, append(d, addr16(remote)...))
}

func withLen(b []byte, n int) []byte {
	out := make([]byte, n)
	copy(out, b)
	return out
}

func setClientIP(b []byte, a netip.Addr) []byte {
	out := append([]byte(nil), b...)
	copy(out[8:24], addr16(a))
	return out
}

func cat(parts ...[]byte) []byte {
	var b []byte
	for _, p := range parts {
		b = append(b, p...)
	}
	return b
}

// badCases generates every bad-input class of PROTOCOL.md section 4.
func badCases() []badCase {
	other6 := netip.MustParseAddr("2001:db8:1ff:ffff::99") // not the sender
	remote := netip.MustParseAddrPort("[2001:db8:ffff::2]:443")
	c := []badCase{
		{name: "PKT-01 empty", build: func(netip.Addr) []byte { return []byte{} }, want: wantDrop},
		{name: "PKT-01 one octet 02", build: func(netip.Addr) []byte { return []byte{2} }, want: wantDrop},
		{name: "PKT-01 one octet 00 (v4)", v4: true, build: func(netip.Addr) []byte { return []byte{0} }, want: wantDrop},
		{name: "PKT-02 R bit on MAP", build: func(s netip.Addr) []byte { b := mapBytes(s, pcp.ProtoTCP, 80, time.Hour); b[1] |= 0x80; return b }, want: wantDrop},
		{name: "PKT-02 R bit on ANNOUNCE", build: func(s netip.Addr) []byte { b := announceBytes(s); b[1] |= 0x80; return b }, want: wantDrop},
		{name: "PKT-02 NAT-PMP 00 80", v4: true, build: func(netip.Addr) []byte { return []byte{0, 0x80} }, want: wantDrop},
		{name: "PKT-02 NAT-PMP op 129, 16 octets", v4: true, build: func(netip.Addr) []byte { return withLen([]byte{0, 0x81}, 16) }, want: wantDrop},
		{name: "PKT-02 version 3 with R bit", build: func(netip.Addr) []byte { return withLen([]byte{3, 0x81}, 24) }, want: wantDrop},
		{name: "PKT-03 20-octet v2", build: func(s netip.Addr) []byte { return mapBytes(s, pcp.ProtoTCP, 80, time.Hour)[:20] }, want: wantDrop},
		{name: "PKT-03 2-octet v2", build: func(netip.Addr) []byte { return []byte{2, 1} }, want: wantDrop},
		{name: "PKT-03 23-octet v2", build: func(s netip.Addr) []byte { return announceBytes(s)[:23] }, want: wantDrop},
		{name: "PKT-04 1104-octet MAP", build: func(s netip.Addr) []byte { return withLen(mapBytes(s, pcp.ProtoTCP, 80, time.Hour), 1104) }, want: int(pcp.MalformedRequest)},
		{name: "PKT-04 2000-octet ANNOUNCE", build: func(s netip.Addr) []byte { return withLen(announceBytes(s), 2000) }, want: int(pcp.MalformedRequest)},
		{name: "PKT-05 61-octet MAP", build: func(s netip.Addr) []byte { return withLen(mapBytes(s, pcp.ProtoTCP, 80, time.Hour), 61) }, want: int(pcp.MalformedRequest)},
		{name: "PKT-05 63-octet MAP", build: func(s netip.Addr) []byte { return withLen(mapBytes(s, pcp.ProtoTCP, 80, time.Hour), 63) }, want: int(pcp.MalformedRequest)},
		{name: "PKT-05 25-octet ANNOUNCE", build: func(s netip.Addr) []byte { return withLen(announceBytes(s), 25) }, want: int(pcp.MalformedRequest)},
		{name: "PKT-06 56-octet MAP", build: func(s netip.Addr) []byte { return mapBytes(s, pcp.ProtoTCP, 80, time.Hour)[:56] }, want: int(pcp.MalformedRequest)},
		{name: "PKT-06 PEER cut to 60", build: func(s netip.Addr) []byte { return peerBytes(s, pcp.ProtoTCP, 80, remote)[:60] }, want: int(pcp.MalformedRequest)},
		{name: "PKT-06 PEER cut to 76", build: func(s netip.Addr) []byte { return peerBytes(s, pcp.ProtoTCP, 80, remote)[:76] }, want: int(pcp.MalformedRequest)},
		{name: "PKT-09 23-octet v3", build: func(netip.Addr) []byte { return withLen([]byte{3, 1}, 23) }, want: int(pcp.UnsuppVersion)},
		{name: "PKT-09 25-octet v2, wrong Client IP", build: func(s netip.Addr) []byte { return withLen(setClientIP(announceBytes(s), other6), 25) }, want: int(pcp.MalformedRequest)},
		{name: "PKT-09 wrong Client IP + unknown mandatory option", build: func(s netip.Addr) []byte {
			return cat(setClientIP(mapBytes(s, pcp.ProtoTCP, 80, time.Hour), other6), opt(4, make([]byte, 4)))
		}, want: int(pcp.AddressMismatch)},
		{name: "VER-02 version 0 from IPv6", build: func(netip.Addr) []byte { return []byte{0, 1, 0, 0, 0x1f, 0x90, 0x1f, 0x90, 0, 0, 0x1c, 0x20} }, want: int(pcp.UnsuppVersion)},
		{name: "VER-02 NAT-PMP address query from IPv6", build: func(netip.Addr) []byte { return []byte{0, 0} }, want: int(pcp.UnsuppVersion)},
		{name: "ADDR-01 MAP, Client IP not the source", build: func(s netip.Addr) []byte { return setClientIP(mapBytes(s, pcp.ProtoTCP, 80, time.Hour), other6) }, want: int(pcp.AddressMismatch)},
		{name: "ADDR-01 ANNOUNCE, Client IP not the source", build: func(s netip.Addr) []byte { return setClientIP(announceBytes(s), other6) }, want: int(pcp.AddressMismatch)},
		{name: "ADDR-02 IPv4 source, Client IP IPv4-compatible not mapped", v4: true, build: func(s netip.Addr) []byte {
			b := mapBytes(s, pcp.ProtoTCP, 80, time.Hour)
			copy(b[8:24], make([]byte, 16))
			a := s.As4()
			copy(b[20:24], a[:])
			return b
		}, want: int(pcp.AddressMismatch)},
		{name: "ADDR-03 wrong Client IP + THIRD_PARTY", build: func(s netip.Addr) []byte {
			return cat(setClientIP(mapBytes(s, pcp.ProtoTCP, 80, time.Hour), other6), tpOpt(s))
		}, want: int(pcp.AddressMismatch)},
		{name: "OPT-02 option longer than the packet", build: func(s netip.Addr) []byte {
			return cat(mapBytes(s, pcp.ProtoTCP, 80, time.Hour), []byte{3, 0, 0, 0x40}, make([]byte, 20))
		}, want: int(pcp.MalformedOption)},
		{name: "OPT-05 THIRD_PARTY length 4", build: func(s netip.Addr) []byte {
			return cat(mapBytes(s, pcp.ProtoTCP, 80, time.Hour), opt(1, make([]byte, 4)))
		}, want: int(pcp.MalformedOption)},
		{name: "OPT-05 PREFER_FAILURE twice", build: func(s netip.Addr) []byte {
			b := mapBytes(s, pcp.ProtoTCP, 80, time.Hour)
			b[42], b[43] = 0, 80
			return cat(b, opt(2, nil), opt(2, nil))
		}, want: int(pcp.MalformedOption)},
		{name: "OPT-05 FILTER length 16", build: func(s netip.Addr) []byte {
			return cat(mapBytes(s, pcp.ProtoTCP, 80, time.Hour), opt(3, make([]byte, 16)))
		}, want: int(pcp.MalformedOption)},
		{name: "OPT-06 unknown mandatory then bad FILTER", build: func(s netip.Addr) []byte {
			return cat(mapBytes(s, pcp.ProtoTCP, 80, time.Hour), opt(4, make([]byte, 4)), opt(3, make([]byte, 16)))
		}, want: int(pcp.UnsuppOption)},
		{name: "OPT-06 bad FILTER then unknown mandatory", build: func(s netip.Addr) []byte {
			return cat(mapBytes(s, pcp.ProtoTCP, 80, time.Hour), opt(3, make([]byte, 16)), opt(4, make([]byte, 4)))
		}, want: int(pcp.MalformedOption)},
		{name: "OPT-07 PREFER_FAILURE on PEER", build: func(s netip.Addr) []byte { return cat(peerBytes(s, pcp.ProtoTCP, 80, remote), opt(2, nil)) }, want: int(pcp.MalformedRequest)},
		{name: "OPT-07 FILTER on ANNOUNCE", build: func(s netip.Addr) []byte { return cat(announceBytes(s), filterOpt(128, 0, remote.Addr())) }, want: int(pcp.MalformedOption)},
		{name: "OPT-07 THIRD_PARTY on ANNOUNCE", build: func(s netip.Addr) []byte { return cat(announceBytes(s), tpOpt(s)) }, want: int(pcp.MalformedOption)},
		{name: "OPT-07 PREFER_FAILURE on ANNOUNCE", build: func(s netip.Addr) []byte { return cat(announceBytes(s), opt(2, nil)) }, want: int(pcp.MalformedOption)},
		{name: "OPT-07 FILTER on PEER", build: func(s netip.Addr) []byte {
			return cat(peerBytes(s, pcp.ProtoTCP, 80, remote), filterOpt(128, 0, remote.Addr()))
		}, want: int(pcp.MalformedOption)},
		{name: "MAP-03 protocol 0, port 80", build: func(s netip.Addr) []byte { return mapBytes(s, pcp.ProtoAll, 80, time.Hour) }, want: int(pcp.MalformedRequest)},
		{name: "MAP-03 protocol 0, port 80, delete", build: func(s netip.Addr) []byte { return mapBytes(s, pcp.ProtoAll, 80, 0) }, want: int(pcp.MalformedRequest)},
		{name: "MAP-04 SCTP", build: func(s netip.Addr) []byte { return mapBytes(s, pcp.ProtoSCTP, 80, time.Hour) }, want: int(pcp.UnsuppProtocol)},
		{name: "MAP-04 ICMP", build: func(s netip.Addr) []byte { return mapBytes(s, 1, 80, time.Hour) }, want: int(pcp.UnsuppProtocol)},
		{name: "MAP-05 TCP all ports", build: func(s netip.Addr) []byte { return mapBytes(s, pcp.ProtoTCP, 0, time.Hour) }, want: int(pcp.UnsuppProtocol)},
		{name: "MAP-05 UDP all ports", build: func(s netip.Addr) []byte { return mapBytes(s, pcp.ProtoUDP, 0, time.Hour) }, want: int(pcp.UnsuppProtocol)},
		{name: "MAP-05 all traffic", build: func(s netip.Addr) []byte { return mapBytes(s, pcp.ProtoAll, 0, time.Hour) }, want: int(pcp.UnsuppProtocol)},
		{name: "PF-02 PREFER_FAILURE, suggested port 0", build: func(s netip.Addr) []byte { return cat(mapBytes(s, pcp.ProtoTCP, 80, time.Hour), opt(2, nil)) }, want: int(pcp.MalformedOption)},
		{name: "PF-02 PREFER_FAILURE, lifetime 0", build: func(s netip.Addr) []byte {
			b := mapBytes(s, pcp.ProtoTCP, 80, 0)
			b[42], b[43] = 0, 80
			return cat(b, opt(2, nil))
		}, want: int(pcp.MalformedOption)},
		{name: "FLT-02 IPv6 prefix 129", build: func(s netip.Addr) []byte {
			return cat(mapBytes(s, pcp.ProtoTCP, 80, time.Hour), filterOpt(129, 0, remote.Addr()))
		}, want: int(pcp.MalformedOption)},
		{name: "FLT-02 IPv4-mapped prefix 95", v4: true, build: func(s netip.Addr) []byte {
			return cat(mapBytes(s, pcp.ProtoTCP, 80, time.Hour), filterOpt(95, 0, netip.MustParseAddr("192.0.2.0")))
		}, want: int(pcp.MalformedOption)},
		{name: "FLT-05 FILTER with lifetime 0", build: func(s netip.Addr) []byte {
			return cat(mapBytes(s, pcp.ProtoTCP, 80, 0), filterOpt(128, 0, remote.Addr()))
		}, want: int(pcp.MalformedOption)},
		{name: "FLT-08 IPv4 remote on IPv6 mapping", build: func(s netip.Addr) []byte {
			return cat(mapBytes(s, pcp.ProtoTCP, 80, time.Hour), filterOpt(128, 0, netip.MustParseAddr("192.0.2.1")))
		}, want: int(pcp.MalformedOption)},
		{name: "TP-01 THIRD_PARTY = source", build: func(s netip.Addr) []byte { return cat(mapBytes(s, pcp.ProtoTCP, 80, time.Hour), tpOpt(s)) }, want: int(pcp.MalformedRequest)},
		{name: "TP-03 THIRD_PARTY = victim's address", build: func(s netip.Addr) []byte { return cat(mapBytes(s, pcp.ProtoTCP, 80, time.Hour), tpOpt(victimAddr6)) }, want: int(pcp.NotAuthorized)},
		{name: "TP-03 THIRD_PARTY = loopback", build: func(s netip.Addr) []byte {
			return cat(mapBytes(s, pcp.ProtoTCP, 80, time.Hour), tpOpt(netip.IPv6Loopback()))
		}, want: int(pcp.NotAuthorized)},
		{name: "PEER-02 protocol 0", build: func(s netip.Addr) []byte { return peerBytes(s, pcp.ProtoAll, 80, remote) }, want: int(pcp.MalformedRequest)},
		{name: "PEER-02 internal port 0", build: func(s netip.Addr) []byte { return peerBytes(s, pcp.ProtoTCP, 0, remote) }, want: int(pcp.MalformedRequest)},
		{name: "PEER-02 remote port 0", build: func(s netip.Addr) []byte {
			return peerBytes(s, pcp.ProtoTCP, 80, netip.AddrPortFrom(remote.Addr(), 0))
		}, want: int(pcp.MalformedRequest)},
		{name: "PEER-03 remote loopback", build: func(s netip.Addr) []byte { return peerBytes(s, pcp.ProtoTCP, 80, netip.MustParseAddrPort("[::1]:443")) }, want: int(pcp.MalformedRequest)},
		{name: "PEER-03 remote multicast", build: func(s netip.Addr) []byte {
			return peerBytes(s, pcp.ProtoTCP, 80, netip.MustParseAddrPort("[ff02::1]:443"))
		}, want: int(pcp.MalformedRequest)},
		{name: "PEER-03 remote unspecified", build: func(s netip.Addr) []byte { return peerBytes(s, pcp.ProtoTCP, 80, netip.MustParseAddrPort("[::]:443")) }, want: int(pcp.MalformedRequest)},
		// HDR-06 / FLT-06: an error on a live mapping changes nothing.
		{name: "FLT-06 nine FILTERs on the live mapping", live: true, build: func(s netip.Addr) []byte {
			b := mapBytes(s, pcp.ProtoUDP, 4000, 2*time.Hour)
			for i := 0; i < 9; i++ {
				b = append(b, filterOpt(128, uint16(1000+i), remote.Addr())...)
			}
			return b
		}, want: int(pcp.ExcessiveRemotePeers)},
		{name: "HDR-06 unknown mandatory option on the live mapping", live: true, build: func(s netip.Addr) []byte {
			return cat(mapBytes(s, pcp.ProtoUDP, 4000, 2*time.Hour), opt(127, make([]byte, 4)))
		}, want: int(pcp.UnsuppOption)},
		// NAT-PMP (IPv4 sources, external IPv4 configured).
		{name: "PMP-02 opcode 3, 2 octets", v4: true, build: func(netip.Addr) []byte { return []byte{0, 3} }, want: int(pcp.PMPUnsupportedOpcode)},
		{name: "PMP-02 opcode 7, 3 octets", v4: true, build: func(netip.Addr) []byte { return []byte{0, 7, 0} }, want: int(pcp.PMPUnsupportedOpcode)},
		{name: "PMP-02 opcode 7, 6 octets", v4: true, build: func(netip.Addr) []byte { return []byte{0, 7, 0, 0, 0xaa, 0xbb} }, want: int(pcp.PMPUnsupportedOpcode)},
		{name: "PMP-03 map request of 8 octets", v4: true, build: func(netip.Addr) []byte { return withLen([]byte{0, 1}, 8) }, want: wantDrop},
		{name: "PMP-03 map request of 2 octets", v4: true, build: func(netip.Addr) []byte { return []byte{0, 2} }, want: wantDrop},
		{name: "PMP-10 internal port 0, lifetime > 0", v4: true, build: func(netip.Addr) []byte { return []byte{0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0x1c, 0x20} }, want: int(pcp.PMPNotAuthorized)},
		{name: "PMP-01 address query (valid; the (f) x6 case)", v4: true, build: func(netip.Addr) []byte { return []byte{0, 0} }, want: int(pcp.PMPSuccess)},
	}
	for op := 3; op < 128; op++ {
		c = append(c, badCase{name: fmt.Sprintf("PKT-07 opcode %d", op), build: func(s netip.Addr) []byte {
			b := mapBytes(s, pcp.ProtoTCP, 80, time.Hour)
			b[1] = byte(op)
			return b
		}, want: int(pcp.UnsuppOpcode)})
	}
	for _, op := range []int{8, 64, 127} {
		c = append(c, badCase{name: fmt.Sprintf("PMP-02 opcode %d, 12 octets", op), v4: true, build: func(netip.Addr) []byte {
			return withLen([]byte{0, byte(op)}, 12)
		}, want: int(pcp.PMPUnsupportedOpcode)})
	}
	for _, v := range []byte{1, 3, 4, 9, 255} {
		for n := 2; n <= 24; n++ {
			c = append(c, badCase{name: fmt.Sprintf("VER-03/04 version %d, %d octets", v, n), build: func(s netip.Addr) []byte {
				b := withLen(announceBytes(s), n)
				b[0] = v
				return b
			}, want: int(pcp.UnsuppVersion)})
		}
		c = append(c, badCase{name: fmt.Sprintf("VER-05 version %d MAP", v), build: func(s netip.Addr) []byte {
			b := mapBytes(s, pcp.ProtoTCP, 80, time.Hour)
			b[0] = v
			return b
		}, want: int(pcp.UnsuppVersion)})
	}
	for code := 4; code <= 12; code++ {
		c = append(c, badCase{name: fmt.Sprintf("OPT-03 unknown mandatory option %d", code), build: func(s netip.Addr) []byte {
			return cat(mapBytes(s, pcp.ProtoTCP, 80, time.Hour), opt(byte(code), make([]byte, 4)))
		}, want: int(pcp.UnsuppOption)})
	}
	return c
}

// corpusCases turns the committed fuzz corpora into hostile datagrams:
// each packet as stored, and (PCP, ≥ 24 octets) with the Client IP set to
// the sender so it gets past ADDRESS_MISMATCH. Valid requests are left out
// (they are not bad input and may change state).
func corpusCases(t *testing.T, root string) []badCase {
	dirs, _ := filepath.Glob(filepath.Join(root, "fuzz", "testdata", "fuzz", "*"))
	var out []badCase
	for _, d := range dirs {
		files, _ := os.ReadDir(d)
		for _, f := range files {
			raw, err := os.ReadFile(filepath.Join(d, f.Name()))
			if err != nil {
				t.Fatal(err)
			}
			pkt, ok := corpusBytes(string(raw))
			if !ok {
				continue
			}
			name := "corpus " + filepath.Base(d) + "/" + f.Name()[:8]
			v4 := len(pkt) > 0 && pkt[0] == pcp.PMPVersion
			out = append(out, badCase{name: name, v4: v4, build: func(netip.Addr) []byte { return pkt }, want: wantNotSuccess})
			if len(pkt) >= pcp.HeaderSize && pkt[0] == pcp.Version {
				out = append(out,
					badCase{name: name + " (Client IP = source)", build: func(s netip.Addr) []byte { return setClientIP(pkt, s) }, want: wantNotSuccess},
					badCase{name: name + " (IPv4, Client IP = source)", v4: true, build: func(s netip.Addr) []byte { return setClientIP(pkt, s) }, want: wantNotSuccess})
			}
		}
	}
	return out
}

// corpusBytes extracts the first []byte value of a "go test fuzz v1" file.
func corpusBytes(s string) ([]byte, bool) {
	for _, line := range strings.Split(s, "\n") {
		if strings.HasPrefix(line, "[]byte(") && strings.HasSuffix(line, ")") {
			v, err := strconv.Unquote(line[len("[]byte(") : len(line)-1])
			if err != nil {
				return nil, false
			}
			return []byte(v), true
		}
	}
	return nil, false
}

// valid reports whether pcpd may legitimately act on b from src: such
// packets are not bad input.
func valid(b []byte, src netip.Addr) bool {
	if len(b) >= 2 && b[0] == pcp.PMPVersion && src.Is4() {
		var r pcp.PMPRequest
		return pcp.ParsePMPRequest(b, &r) == nil
	}
	var req pcp.Request
	return pcp.ParseRequest(b, src, &req) == nil
}

// amplificationException names the PROTOCOL.md (f) case a reply longer than
// its request falls under, or "" if none does.
func amplificationException(req, reply []byte, v4 bool) (string, float64) {
	n, m := len(req), len(reply)
	pad := (n + 3) &^ 3
	switch {
	case v4 && n == 2 && req[0] == 0 && req[1] == 0 && m == pcp.PMPAddressResponseSize:
		return "(f) NAT-PMP address query 2 → 12", 6
	case v4 && n >= 12 && req[0] == 0 && (req[1] == 1 || req[1] == 2) && m == pcp.PMPMapResponseSize:
		return "(f) NAT-PMP map reply 12 → 16", 16.0 / 12
	case v4 && n < 4 && req[0] == 0 && req[1] >= 3 && m == 4:
		return "(f) NAT-PMP unsupported-opcode echo of 2–3 octets → 4", 2
	case n >= 2 && n < pcp.HeaderSize && req[0] != pcp.Version && m == pad:
		return "(f) UNSUPP_VERSION of 2–23 octets padded to ×4 (VER-04)", 2
	case n > pcp.HeaderSize && n%4 != 0 && req[0] == pcp.Version && m == pad:
		return "(f) version-2 error reply padded to ×4 (PKT-05)", 28.0 / 25
	}
	return "", 0
}

// resultOf reads the result code of a reply: PCP octet 3, NAT-PMP octets
// 2–3.
func resultOf(reply []byte) int {
	if len(reply) >= 4 && reply[0] == pcp.PMPVersion {
		return int(binary.BigEndian.Uint16(reply[2:4]))
	}
	if len(reply) >= 4 {
		return int(reply[3])
	}
	return -100
}

// TestBadInputBulkHDR06: every bad-input class of PROTOCOL.md, plus the
// committed fuzz corpora, sent to a running pcpd over the serving interface
// (issue 9 "every bad-input class ... generated in bulk"). Each gets the
// code PROTOCOL.md names (or a silent drop); the corpus packets get an
// error or nothing. Nothing changes state: kernel elements, leases and the
// live mapping's expiry are the same afterwards (HDR-06). Every reply is at
// most as long as its request except the PROTOCOL.md (f) cases, each named
// and bounded; the test reports the amplification figures.
func TestBadInputBulkHDR06(t *testing.T) {
	l := newLab(t, labOptions{})
	l.start()
	root := moduleRoot(t)
	cases := append(badCases(), corpusCases(t, root)...)

	// Source plan: one fresh IPv6 source (its own /64) per case from the
	// flood client's prefix, IPv4 sources spread over its /24, so no rate limit can mask
	// an answer; the live mapping's owner sends only the few "live" cases.
	liveSrc := floodSrc(0xffffff)
	l.mustMap(l.pcpClient(liveSrc), liveSrc, pcp.ProtoUDP, 4000, time.Hour)
	baseKernel := len(l.kernel())
	baseLeases := leaseSet(l.leases())
	liveBefore := baseLeases[leaseKey{liveSrc, "udp", 4000}]

	type result struct {
		c     badCase
		req   []byte
		reply []byte
		src   netip.Addr
		err   error
	}
	results := make([]result, len(cases))
	var next atomic.Int64
	var v6n, v4n atomic.Uint32
	v6n.Store(0x10000)
	var wg sync.WaitGroup
	skipped := atomic.Int64{}
	for w := 0; w < 16; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1)) - 1
				if i >= len(cases) {
					return
				}
				c := cases[i]
				var src netip.Addr
				switch {
				case c.live:
					src = liveSrc
				case c.v4:
					src = netip.AddrFrom4([4]byte{10, 100, 1, byte(1 + v4n.Add(1)%254)})
				default:
					src = floodSrc(v6n.Add(1))
				}
				req := c.build(src)
				if c.want == wantNotSuccess && valid(req, src) {
					skipped.Add(1)
					results[i] = result{c: c, src: src}
					continue
				}
				conn, err := socketIn(l.topo.Client, src)
				if err != nil {
					results[i] = result{c: c, err: err}
					continue
				}
				// Generous: the CI machine is shared; an answer is returned
				// the moment it arrives.
				wait := 3 * time.Second
				switch c.want {
				case wantDrop:
					wait = 500 * time.Millisecond
				case wantNotSuccess:
					wait = time.Second
				}
				reply, err := rawExchange(conn, l.serverFor(src), req, wait)
				conn.Close()
				results[i] = result{c: c, req: req, reply: reply, src: src, err: err}
			}
		}()
	}
	wg.Wait()

	var (
		sent, dropped, answered int
		reqBytes, replyBytes    int
		maxPlain                float64
		maxPlainName            string
		exceptions              = map[string]float64{}
	)
	for _, r := range results {
		if r.err != nil {
			t.Fatalf("%s: %v", r.c.name, r.err)
		}
		if r.req == nil {
			continue // a valid request from the corpus, left out
		}
		sent++
		reqBytes += len(r.req)
		replyBytes += len(r.reply)
		if r.reply == nil {
			dropped++
			if r.c.want >= 0 {
				t.Errorf("%s: no answer, want %d", r.c.name, r.c.want)
			}
			continue
		}
		answered++
		got := resultOf(r.reply)
		switch {
		case r.c.want == wantDrop:
			t.Errorf("%s: answered (%d octets, result %d), want a silent drop", r.c.name, len(r.reply), got)
		case r.c.want == wantNotSuccess:
			if got == 0 {
				t.Errorf("%s: SUCCESS for a packet the codec rejects: % x", r.c.name, r.req)
			}
		case got != r.c.want:
			t.Errorf("%s: result %d, want %d", r.c.name, got, r.c.want)
		}
		ratio := float64(len(r.reply)) / float64(max(len(r.req), 1))
		if ratio <= 1 {
			if ratio > maxPlain {
				maxPlain, maxPlainName = ratio, r.c.name
			}
			continue
		}
		name, bound := amplificationException(r.req, r.reply, r.c.v4)
		if name == "" {
			t.Errorf("%s: reply %d octets for a %d-octet request (×%.2f): amplification outside PROTOCOL.md (f)", r.c.name, len(r.reply), len(r.req), ratio)
			continue
		}
		if ratio > bound+1e-9 {
			t.Errorf("%s: ×%.2f exceeds %s's bound ×%.2f", r.c.name, ratio, name, bound)
		}
		exceptions[name] = max(exceptions[name], ratio)
	}

	// No state change.
	if n := len(l.kernel()); n != baseKernel {
		t.Errorf("kernel elements: %d before, %d after the bad input", baseKernel, n)
	}
	after := leaseSet(l.leases())
	if len(after) != len(baseLeases) {
		t.Errorf("leases: %d before, %d after the bad input", len(baseLeases), len(after))
	}
	if la := after[leaseKey{liveSrc, "udp", 4000}]; !la.ExpiresAt.Equal(liveBefore.ExpiresAt) || len(la.Filters) != 0 {
		t.Errorf("live mapping changed by refused requests: expires %v → %v, filters %v", liveBefore.ExpiresAt, la.ExpiresAt, la.Filters)
	}
	if !l.running() {
		t.Fatal("pcpd died")
	}
	names := make([]string, 0, len(exceptions))
	for n := range exceptions {
		names = append(names, n)
	}
	sort.Strings(names)
	var ex strings.Builder
	for _, n := range names {
		fmt.Fprintf(&ex, "\n    %s: max ×%.3f", n, exceptions[n])
	}
	t.Logf("bad input: %d cases (%d generated, %d from the fuzz corpora; %d valid corpus packets left out); %d answered, %d dropped; %d request octets → %d reply octets (×%.3f overall); largest ratio outside (f): ×%.3f (%s); (f) cases seen:%s",
		sent, len(badCases()), len(cases)-len(badCases()), skipped.Load(), answered, dropped, reqBytes, replyBytes, float64(replyBytes)/float64(reqBytes), maxPlain, maxPlainName, ex.String())
}

// moduleRoot is the repository root (for the fuzz corpora).
func moduleRoot(t *testing.T) string {
	t.Helper()
	wd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	return filepath.Dir(wd)
}
