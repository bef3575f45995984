package pcp

import (
	"net/netip"
	"testing"
	"time"
)

// Benchmarks for the hot path: decode a request into a reused value,
// encode a reply into a reused buffer. Both must not allocate.

func benchDecode(b *testing.B, hexReq, src string) {
	pkt := unhex(b, hexReq)
	s := netip.MustParseAddr(src)
	var req Request
	var p Parser
	b.ReportAllocs()
	b.SetBytes(int64(len(pkt)))
	for b.Loop() {
		if err := p.ParseRequest(pkt, s, &req); err != nil {
			b.Fatal(err)
		}
	}
}

func benchEncode(b *testing.B, r *Response) {
	buf := make([]byte, 0, MaxMessageSize)
	b.ReportAllocs()
	for b.Loop() {
		buf = AppendResponse(buf[:0], r)
	}
	b.SetBytes(int64(len(buf)))
}

func BenchmarkDecodeMAP(b *testing.B) { benchDecode(b, hdrMap6+dataMap443, "2001:db8:1::10") }

func BenchmarkDecodeMAPIPv4(b *testing.B) { benchDecode(b, hdrMap4+dataMap5000v4, "10.0.0.5") }

func BenchmarkDecodeMAPOptions(b *testing.B) {
	benchDecode(b, hdrMap6+dataMap443+optPF+optFilterDoc+"80 00 0003 776562 00", "2001:db8:1::10")
}

func BenchmarkDecodePEER(b *testing.B) {
	benchDecode(b, hdrPeer6+dataPeer5000+"0035 0000 20010db8009900000000000000000001", "2001:db8:1::10")
}

func BenchmarkDecodeANNOUNCE(b *testing.B) {
	benchDecode(b, "02 00 0000 00000000 20010db8000100000000000000000010", "2001:db8:1::10")
}

func BenchmarkEncodeMAP(b *testing.B) {
	benchEncode(b, &Response{Opcode: OpMap, Lifetime: time.Hour, Epoch: testEpoch,
		Map: MapData{Nonce: testNonce, Protocol: ProtoTCP, InternalPort: 443, ExternalPort: 80, ExternalAddr: addr("2001:db8:1::10")}})
}

func BenchmarkEncodeMAPOptions(b *testing.B) {
	benchEncode(b, &Response{Opcode: OpMap, Lifetime: time.Hour, Epoch: testEpoch,
		Map: MapData{Nonce: testNonce, Protocol: ProtoTCP, InternalPort: 443, ExternalPort: 80, ExternalAddr: addr("2001:db8:1::10")},
		Options: withFilters(Options{PreferFailure: true, Description: []byte("web"), HasDescription: true},
			Filter{Remote: pfx("2001:db8:99::/48")})})
}

func BenchmarkEncodePEER(b *testing.B) {
	benchEncode(b, &Response{Opcode: OpPeer, Lifetime: time.Hour, Epoch: testEpoch,
		Map:  MapData{Nonce: testNonce, Protocol: ProtoUDP, InternalPort: 5000, ExternalPort: 5000, ExternalAddr: addr("2001:db8:1::10")},
		Peer: PeerData{RemotePort: 53, RemoteAddr: addr("2001:db8:99::1")}})
}

func BenchmarkEncodeANNOUNCE(b *testing.B) {
	benchEncode(b, &Response{Opcode: OpAnnounce, Epoch: testEpoch})
}

func BenchmarkEncodeError(b *testing.B) {
	pkt := unhex(b, hdrMap6Wrong+dataMap443)
	buf := make([]byte, 0, MaxMessageSize)
	b.ReportAllocs()
	for b.Loop() {
		buf = AppendErrorResponse(buf[:0], pkt, AddressMismatch, AddressMismatch.ErrorLifetime(), testEpoch)
	}
}

// BenchmarkDecodeError: a hostile packet costs no allocation either.
func BenchmarkDecodeError(b *testing.B) {
	pkt := unhex(b, hdrMap6+dataMap443+optUnknownMandatory)
	s := netip.MustParseAddr("2001:db8:1::10")
	var req Request
	b.ReportAllocs()
	for b.Loop() {
		if ParseRequest(pkt, s, &req) == nil {
			b.Fatal("parsed")
		}
	}
}

func BenchmarkDecodePMP(b *testing.B) {
	pkt := unhex(b, "0002000004d204d200000e10")
	var req PMPRequest
	b.ReportAllocs()
	for b.Loop() {
		if err := ParsePMPRequest(pkt, &req); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkEncodePMP(b *testing.B) {
	buf := make([]byte, 0, 64)
	b.ReportAllocs()
	for b.Loop() {
		buf = AppendPMPMapResponse(buf[:0], PMPOpMapTCP, PMPSuccess, testEpoch, 1234, 1234, time.Hour)
	}
}

func BenchmarkEncodePMPAddress(b *testing.B) {
	buf := make([]byte, 0, 64)
	ext := addr("203.0.113.1")
	b.ReportAllocs()
	for b.Loop() {
		buf = AppendPMPAddressResponse(buf[:0], PMPSuccess, testEpoch, ext)
	}
}

// TestZeroAllocs_HotPath asserts what the benchmarks show, so a change
// that allocates fails the normal test run.
func TestZeroAllocs_HotPath(t *testing.T) {
	mapPkt := unhex(t, hdrMap6+dataMap443+optPF+optFilterDoc+"80 00 0003 776562 00")
	peerPkt := unhex(t, hdrPeer6+dataPeer5000+"0035 0000 20010db8009900000000000000000001")
	annPkt := unhex(t, "02 00 0000 00000000 20010db8000100000000000000000010")
	bad := unhex(t, hdrMap6+dataMap443+optUnknownMandatory)
	src := addr("2001:db8:1::10")
	var req Request
	buf := make([]byte, 0, MaxMessageSize)
	cases := map[string]func(){
		"decode MAP":      func() { ParseRequest(mapPkt, src, &req) },
		"decode PEER":     func() { ParseRequest(peerPkt, src, &req) },
		"decode ANNOUNCE": func() { ParseRequest(annPkt, src, &req) },
		"decode error":    func() { ParseRequest(bad, src, &req) },
		"encode MAP": func() {
			ParseRequest(mapPkt, src, &req)
			r := Response{Opcode: OpMap, Map: req.Map, Options: req.Options}
			buf = AppendResponse(buf[:0], &r)
		},
		"encode error": func() { buf = AppendErrorResponse(buf[:0], bad, UnsuppOption, time.Hour, 1) },
		"NAT-PMP": func() {
			var p PMPRequest
			ParsePMPRequest(unhexStatic, &p)
			buf = AppendPMPMapResponse(buf[:0], p.Opcode, 0, 1, p.InternalPort, p.SuggestedExternalPort, p.Lifetime)
		},
	}
	for name, f := range cases {
		if n := testing.AllocsPerRun(100, f); n != 0 {
			t.Errorf("%s: %v allocs/op, want 0", name, n)
		}
	}
}

var unhexStatic = []byte{0, 2, 0, 0, 4, 0xd2, 4, 0xd2, 0, 0, 0x0e, 0x10}
