package pcp

import (
	"bytes"
	"encoding/hex"
	"errors"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

// Golden PCP requests, one commented line per field. Shared chunks are
// constants; each vector names its PROTOCOL.md ID and RFC section.
const (
	// MAP header, 3600 s, from 2001:db8:1::10 (PROTOCOL.md §2 example).
	hdrMap6 = `
02                                // version 2
01                                // R=0, opcode MAP
0000                              // reserved
00000e10                          // requested lifetime 3600 s
20010db8000100000000000000000010  // client IP 2001:db8:1::10
`
	// MAP opcode data: TCP 443, suggest 80, no address preference.
	dataMap443 = `
0102030405060708090a0b0c          // mapping nonce
06                                // protocol TCP
000000                            // reserved
01bb                              // internal port 443
0050                              // suggested external port 80
00*16                             // suggested external address ::
`
	// MAP header, 3600 s, from 10.0.0.5 (IPv4-mapped on the wire).
	hdrMap4 = `
02                                // version 2
01                                // R=0, opcode MAP
0000                              // reserved
00000e10                          // requested lifetime 3600 s
00000000000000000000ffff0a000005  // client IP ::ffff:10.0.0.5
`
	// MAP opcode data: UDP 5000, suggest 5000, IPv4 all-zeros.
	dataMap5000v4 = `
0102030405060708090a0b0c          // mapping nonce
11                                // protocol UDP
000000                            // reserved
1388                              // internal port 5000
1388                              // suggested external port 5000
00000000000000000000ffff00000000  // suggested external address ::ffff:0.0.0.0
`
	// MAP header, 3600 s, from 2001:db8:1::11 (wrong for src ::10).
	hdrMap6Wrong = `
02                                // version 2
01                                // R=0, opcode MAP
0000                              // reserved
00000e10                          // requested lifetime 3600 s
20010db8000100000000000000000011  // client IP 2001:db8:1::11
`
	// PEER header and data: UDP 5000 → [2001:db8:99::1]:53.
	hdrPeer6 = `
02                                // version 2
02                                // R=0, opcode PEER
0000                              // reserved
00000e10                          // requested lifetime 3600 s
20010db8000100000000000000000010  // client IP 2001:db8:1::10
`
	dataPeer5000 = `
0102030405060708090a0b0c          // mapping nonce
11                                // protocol UDP
000000                            // reserved
1388                              // internal port 5000
0000                              // suggested external port 0
00*16                             // suggested external address ::
`
	optPF = `
02 00 0000                        // PREFER_FAILURE, length 0
`
	optFilterDoc = `
03 00 0014                        // FILTER, length 20
00                                // reserved
30                                // prefix length 48
0000                              // remote port 0 (all)
20010db8009900000000000000000000  // remote 2001:db8:99::
`
	optUnknownMandatory = `
04 00 0004                        // option 4 (unassigned, mandatory range), length 4
00000000                          // data
`
)

// reqVector is one golden request: either it decodes to want (and resp
// encodes to reply), or it fails with code / silently, and reply is what
// AppendErrorResponse makes of it.
type reqVector struct {
	id     string // PROTOCOL.md ID: case
	ref    string // RFC section
	p      Parser
	src    string
	req    string
	build  func(t testing.TB) []byte // instead of req, for long packets
	want   *Request
	resp   *Response
	silent bool
	code   ResultCode
	reply  string
	check  func(t *testing.T, req, reply []byte) // extra reply checks
}

func (v *reqVector) bytes(t testing.TB) []byte {
	if v.build != nil {
		return v.build(t)
	}
	return unhex(t, v.req)
}

var mapWant = Request{
	Opcode: OpMap, Lifetime: time.Hour, ClientAddr: addr("2001:db8:1::10"),
	Map: MapData{Nonce: testNonce, Protocol: ProtoTCP, InternalPort: 443, ExternalPort: 80, ExternalAddr: addr("::")},
}

func mapWantWith(o Options) *Request { r := mapWant; r.Options = o; return &r }

var requestVectors = []reqVector{
	{
		id: "MAP-02: MAP TCP 443 suggest 80 and its SUCCESS (PROTOCOL.md §2 example)", ref: "RFC 6887 §11.1, §11.3",
		src: "2001:db8:1::10", req: hdrMap6 + dataMap443,
		want: &mapWant,
		resp: &Response{Opcode: OpMap, Result: Success, Lifetime: time.Hour, Epoch: testEpoch,
			Map: MapData{Nonce: testNonce, Protocol: ProtoTCP, InternalPort: 443, ExternalPort: 80, ExternalAddr: addr("2001:db8:1::10")}},
		reply: `
02                                // version 2
81                                // R=1, opcode MAP
00                                // reserved
00                                // result SUCCESS
00000e10                          // lifetime 3600 s
0000abcd                          // epoch
00*12                             // reserved
0102030405060708090a0b0c          // mapping nonce
06                                // protocol TCP
000000                            // reserved
01bb                              // internal port 443
0050                              // assigned external port 80
20010db8000100000000000000000010  // assigned external address 2001:db8:1::10
`,
	},
	{
		id: "MAP-12: IPv4 MAP, UDP 5000, assigned 203.0.113.1:5000", ref: "RFC 6887 §11.1, §5",
		src: "10.0.0.5", req: hdrMap4 + dataMap5000v4,
		want: &Request{Opcode: OpMap, Lifetime: time.Hour, ClientAddr: addr("10.0.0.5"),
			Map: MapData{Nonce: testNonce, Protocol: ProtoUDP, InternalPort: 5000, ExternalPort: 5000, ExternalAddr: addr("0.0.0.0")}},
		resp: &Response{Opcode: OpMap, Lifetime: 7200 * time.Second, Epoch: testEpoch,
			Map: MapData{Nonce: testNonce, Protocol: ProtoUDP, InternalPort: 5000, ExternalPort: 5000, ExternalAddr: addr("203.0.113.1")}},
		reply: `
02 81 00 00                       // version 2, R=1 MAP, reserved, SUCCESS
00001c20                          // lifetime 7200 s
0000abcd                          // epoch
00*12                             // reserved
0102030405060708090a0b0c          // mapping nonce
11                                // protocol UDP
000000                            // reserved
1388                              // internal port 5000
1388                              // assigned external port 5000
00000000000000000000ffffcb007101  // assigned external address ::ffff:203.0.113.1
`,
	},
	{
		id: "PEER-01: PEER UDP 5000 to [2001:db8:99::1]:53 and its SUCCESS", ref: "RFC 6887 §12.1, §12.3",
		src: "2001:db8:1::10", req: hdrPeer6 + dataPeer5000 + `
0035                              // remote peer port 53
0000                              // reserved
20010db8009900000000000000000001  // remote peer address 2001:db8:99::1
`,
		want: &Request{Opcode: OpPeer, Lifetime: time.Hour, ClientAddr: addr("2001:db8:1::10"),
			Map:  MapData{Nonce: testNonce, Protocol: ProtoUDP, InternalPort: 5000, ExternalAddr: addr("::")},
			Peer: PeerData{RemotePort: 53, RemoteAddr: addr("2001:db8:99::1")}},
		resp: &Response{Opcode: OpPeer, Lifetime: time.Hour, Epoch: testEpoch,
			Map:  MapData{Nonce: testNonce, Protocol: ProtoUDP, InternalPort: 5000, ExternalPort: 5000, ExternalAddr: addr("2001:db8:1::10")},
			Peer: PeerData{RemotePort: 53, RemoteAddr: addr("2001:db8:99::1")}},
		reply: `
02 82 00 00                       // version 2, R=1 PEER, reserved, SUCCESS
00000e10                          // lifetime 3600 s
0000abcd                          // epoch
00*12                             // reserved
0102030405060708090a0b0c          // mapping nonce
11                                // protocol UDP
000000                            // reserved
1388                              // internal port 5000
1388                              // assigned external port 5000
20010db8000100000000000000000010  // assigned external address
0035                              // remote peer port 53
0000                              // reserved
20010db8009900000000000000000001  // remote peer address
`,
	},
	{
		id: "ANN-01: ANNOUNCE, lifetime 99 ignored; ANN-02 reply", ref: "RFC 6887 §14.1.1, §14.1.2",
		src: "10.0.0.5", req: `
02                                // version 2
00                                // R=0, opcode ANNOUNCE
0000                              // reserved
00000063                          // requested lifetime 99 s (ignored)
00000000000000000000ffff0a000005  // client IP ::ffff:10.0.0.5
`,
		want: &Request{Opcode: OpAnnounce, Lifetime: 99 * time.Second, ClientAddr: addr("10.0.0.5")},
		resp: &Response{Opcode: OpAnnounce, Epoch: testEpoch},
		reply: `
02 80 00 00                       // version 2, R=1 ANNOUNCE, reserved, SUCCESS
00000000                          // lifetime 0
0000abcd                          // epoch
00*12                             // reserved
`,
	},
	{
		id: "HDR-01: reserved octets ffff and opcode reserved set → reply zeroes them", ref: "RFC 6887 §7.1, §7.2",
		src: "2001:db8:1::10", req: `
02 01                             // version 2, MAP
ffff                              // reserved, all ones (ignored)
00000e10                          // requested lifetime 3600 s
20010db8000100000000000000000010  // client IP 2001:db8:1::10
0102030405060708090a0b0c          // mapping nonce
06                                // protocol TCP
ffffff                            // reserved, all ones (ignored)
01bb                              // internal port 443
0050                              // suggested external port 80
00*16                             // suggested external address ::
`,
		want: &mapWant,
		resp: &Response{Opcode: OpMap, Lifetime: time.Hour, Epoch: testEpoch, Map: mapWant.Map},
		reply: `
02 81 00 00                       // version 2, R=1 MAP, reserved 0, SUCCESS
00000e10 0000abcd 00*12           // lifetime, epoch, reserved
0102030405060708090a0b0c          // mapping nonce
06 000000 01bb 0050               // TCP, reserved 0, internal 443, external 80
00*16                             // external address
`,
	},
	{
		id: "MAP-17: delete (lifetime 0) copies the suggested port, SUCCESS lifetime 0", ref: "RFC 6887 §15.1, EID 3621",
		src: "2001:db8:1::10", req: `
02 01 0000                        // version 2, MAP, reserved
00000000                          // requested lifetime 0: delete
20010db8000100000000000000000010  // client IP
0102030405060708090a0b0c          // mapping nonce
06 000000                         // TCP, reserved
01bb                              // internal port 443
04d2                              // suggested external port 1234
00*16                             // suggested external address ::
`,
		want: &Request{Opcode: OpMap, ClientAddr: addr("2001:db8:1::10"),
			Map: MapData{Nonce: testNonce, Protocol: ProtoTCP, InternalPort: 443, ExternalPort: 1234, ExternalAddr: addr("::")}},
		resp: &Response{Opcode: OpMap, Epoch: testEpoch,
			Map: MapData{Nonce: testNonce, Protocol: ProtoTCP, InternalPort: 443, ExternalPort: 1234, ExternalAddr: addr("::")}},
		reply: `
02 81 00 00                       // version 2, R=1 MAP, reserved, SUCCESS
00000000                          // lifetime 0
0000abcd 00*12                    // epoch, reserved
0102030405060708090a0b0c          // mapping nonce
06 000000 01bb                    // TCP, reserved, internal 443
04d2                              // external port 1234 (the suggestion, copied)
00*16                             // external address :: (family all-zeros)
`,
	},

	// PKT — packet level.
	{id: "PKT-01: empty packet dropped", ref: "RFC 6887 §8.2", req: ``, silent: true},
	{id: "PKT-01: one octet dropped", ref: "RFC 6887 §8.2", req: `02 // version 2 only`, silent: true},
	{id: "PKT-02: R bit set dropped", ref: "RFC 6887 §8.2", req: `
02 81                             // version 2, R=1 MAP: a response
00*22                             // rest of a header
`, silent: true},
	{id: "PKT-02: NAT-PMP response (00 80) dropped", ref: "RFC 6887 §8.2, RFC 6886 §3.5", req: `00 80 // version 0, R=1`, silent: true},
	{id: "PKT-03: 20-octet version 2 dropped", ref: "RFC 6887 §8.2", req: `
02 01 0000                        // version 2, MAP, reserved
00000e10                          // lifetime
00*12                             // 12 of the 16 client IP octets
`, silent: true},
	{
		id: "PKT-04: 1104-octet MAP → MALFORMED_REQUEST, 1100-octet reply", ref: "RFC 6887 §7, §8.2",
		src: "2001:db8:1::10", code: MalformedRequest,
		build: func(t testing.TB) []byte {
			b := unhex(t, hdrMap6+dataMap443)
			b = append(b, 0xc8, 0, 0x04, 0x00) // optional option 200, length 1024
			return append(b, bytes.Repeat([]byte{0x41}, 1104-len(b))...)
		},
		check: func(t *testing.T, req, reply []byte) {
			if len(reply) != 1100 {
				t.Fatalf("reply is %d octets, want 1100", len(reply))
			}
			if !bytes.Equal(reply[12:], req[12:1100]) {
				t.Error("reply octets 12-1099 differ from the request's")
			}
		},
	},
	{
		id: "PKT-05: 61 octets → MALFORMED_REQUEST, copy zero-padded to 64", ref: "RFC 6887 §7, §8.2",
		src: "2001:db8:1::10", code: MalformedRequest,
		req: hdrMap6 + dataMap443 + `ee // one stray octet`,
		reply: `
02 81 00 03                       // version 2, R=1 MAP, reserved, MALFORMED_REQUEST
00000708                          // lifetime 1800 s (long error)
0000abcd                          // epoch
000100000000000000000010          // octets 12-23 copied (HDR-04: not parsed)
0102030405060708090a0b0c 06 000000 01bb 0050 00*16 // opcode data as sent
ee                                // the stray octet
000000                            // zero padding to 64
`,
	},
	{
		id: "PKT-06: 56-octet MAP → MALFORMED_REQUEST", ref: "RFC 6887 §11.1",
		src: "2001:db8:1::10", code: MalformedRequest,
		req: hdrMap6 + `
0102030405060708090a0b0c          // mapping nonce
06 000000 01bb 0050               // TCP, reserved, 443, 80
00*12                             // suggested external address, cut short
`,
		reply: `
02 81 00 03 00000708 0000abcd     // version, R=1 MAP, reserved, MALFORMED_REQUEST, 1800 s, epoch
000100000000000000000010          // octets 12-23 copied
0102030405060708090a0b0c 06 000000 01bb 0050 00*12 // opcode data as sent
`,
	},
	{
		id: "PKT-06: 76-octet PEER → MALFORMED_REQUEST", ref: "RFC 6887 §12.1",
		src: "2001:db8:1::10", code: MalformedRequest,
		req: hdrPeer6 + dataPeer5000 + `
0035 0000                         // remote port 53, reserved
00*12                             // remote peer address, cut short
`,
	},
	{
		id: "PKT-07: opcode 5 → UNSUPP_OPCODE, payload copied uninterpreted", ref: "RFC 6887 §7.4, §19.2",
		src: "2001:db8:1::10", code: UnsuppOpcode,
		req: `
02 05 0000                        // version 2, opcode 5, reserved
00000e10                          // lifetime
20010db8000100000000000000000010  // client IP
aabbccdd                          // opaque payload
`,
		reply: `
02 85 00 04                       // version 2, R=1 opcode 5, reserved, UNSUPP_OPCODE
00000708 0000abcd                 // 1800 s, epoch
000100000000000000000010          // octets 12-23 copied (HDR-04)
aabbccdd                          // payload as sent
`,
	},
	{
		id: "PKT-07: opcode 3 (AUTHENTICATION, RFC 7652) → UNSUPP_OPCODE", ref: "RFC 6887 §19.2",
		src: "2001:db8:1::10", code: UnsuppOpcode,
		req: `
02 03 0000 00000e10               // version 2, opcode 3, reserved, lifetime
20010db8000100000000000000000010  // client IP
`,
	},
	{
		id: "PKT-09: 23-octet version 3 → UNSUPP_VERSION (version before length)", ref: "RFC 6887 §8.2, §9",
		src: "2001:db8:1::10", code: UnsuppVersion,
		req: `
03 01 0000 00000e10               // version 3, MAP, reserved, lifetime
20010db80001000000000000000000    // 15 of 16 client IP octets
`,
		reply: `
02 81 00 01                       // version 2 (closest, VER-03), R=1 MAP, reserved, UNSUPP_VERSION
00000708 0000abcd                 // 1800 s, epoch
0001000000000000000000            // octets 12-22 copied
00                                // zero pad to 24
`,
	},
	{
		id: "PKT-09: 25-octet version 2, wrong client IP → MALFORMED_REQUEST (size before address)", ref: "RFC 6887 §8.2",
		src: "2001:db8:1::10", code: MalformedRequest,
		req: `
02 00 0000 00000000               // version 2, ANNOUNCE, reserved, lifetime
20010db8000100000000000000000011  // client IP ::11, not the source
ff                                // one stray octet
`,
	},
	{
		id: "PKT-09: MAP, wrong client IP + unknown mandatory option → ADDRESS_MISMATCH", ref: "RFC 6887 §8.2",
		src: "2001:db8:1::10", code: AddressMismatch,
		req: hdrMap6Wrong + dataMap443 + optUnknownMandatory,
		reply: `
02 81 00 0c 00000708 0000abcd     // version 2, R=1 MAP, reserved, ADDRESS_MISMATCH, 1800 s, epoch
00*12                             // octets 12-23 zero (HDR-04: parsed)
0102030405060708090a0b0c 06 000000 01bb 0050 00*16 // opcode data as sent
04 00 0004 00000000               // option as sent
`,
	},

	// VER — versions.
	{
		id: "VER-02: NAT-PMP map request with NAT-PMP off → PCP UNSUPP_VERSION", ref: "RFC 6887 App. A",
		src: "10.0.0.5", code: UnsuppVersion,
		req: `
00                                // version 0 (NAT-PMP)
01                                // opcode 1: map UDP
0000                              // reserved
1f90                              // internal port 8080
1f90                              // suggested external port 8080
00001c20                          // lifetime 7200 s
`,
		reply: `
02 81 00 01                       // version 2, R=1 opcode 1, reserved, UNSUPP_VERSION (NAT-PMP reads 00 01 as code 1)
00000708                          // lifetime 1800 s
0000abcd                          // epoch
`,
	},
	{
		id: "VER-03: version 3 MAP → UNSUPP_VERSION naming version 2", ref: "RFC 6887 §9",
		src: "2001:db8:1::10", code: UnsuppVersion,
		req: `03 01 0000 00000e10 20010db8000100000000000000000010 // version 3, MAP, reserved, lifetime, client IP`,
		reply: `
02 81 00 01 00000708 0000abcd     // version 2, R=1 MAP, reserved, UNSUPP_VERSION, 1800 s, epoch
000100000000000000000010          // octets 12-23 copied (VER-05)
`,
	},
	{
		id: "VER-04: 2-octet version 1 → 4-octet UNSUPP_VERSION", ref: "RFC 6887 §8.2, §9",
		src: "10.0.0.5", code: UnsuppVersion,
		req: `01 00 // version 1, opcode 0`,
		reply: `
02                                // version 2
80                                // R=1, opcode 0
00                                // reserved
01                                // UNSUPP_VERSION; lifetime and epoch do not fit
`,
	},
	{
		id: "VER-05: 24-octet version 1 keeps octets 12-23 as copied", ref: "RFC 6887 §7.2, §9",
		src: "10.0.0.5", code: UnsuppVersion,
		req: `
01 00 0000 00000000               // version 1, opcode 0, reserved, lifetime
0102030405060708 090a0b0c0d0e0f10 // 16 octets of whatever
`,
		reply: `
02 80 00 01 00000708 0000abcd     // version 2, R=1, reserved, UNSUPP_VERSION, 1800 s, epoch
05060708090a0b0c0d0e0f10          // octets 12-23 as copied
`,
	},

	// ADDR — client address.
	{
		id: "ADDR-01: client IP ::11 from ::10 → ADDRESS_MISMATCH, octets 12-23 zero", ref: "RFC 6887 §8.2",
		src: "2001:db8:1::10", code: AddressMismatch,
		req: hdrMap6Wrong + dataMap443,
		reply: `
02 81 00 0c 00000708 0000abcd     // version 2, R=1 MAP, reserved, ADDRESS_MISMATCH, 1800 s, epoch
00*12                             // octets 12-23 zero
0102030405060708090a0b0c 06 000000 01bb 0050 00*16 // opcode data as sent
`,
	},
	{
		id: "ADDR-01: ANNOUNCE with wrong client IP → ADDRESS_MISMATCH", ref: "RFC 6887 §14.1.1",
		src: "10.0.0.5", code: AddressMismatch,
		req: `02 00 0000 00000000 00000000000000000000ffff0a000006 // ANNOUNCE from 10.0.0.5 naming 10.0.0.6`,
	},
	{
		id: "ADDR-02: IPv4-compatible ::a00:5 from 10.0.0.5 → ADDRESS_MISMATCH", ref: "RFC 6887 §5",
		src: "10.0.0.5", code: AddressMismatch,
		req: `
02 00 0000 00000000               // version 2, ANNOUNCE, reserved, lifetime
0000000000000000000000000a000005  // ::10.0.0.5, not IPv4-mapped
`,
	},
	{
		id: "ADDR-02: dual-stack socket source ::ffff:10.0.0.5 matches the mapped field", ref: "RFC 6887 §5",
		src:  "::ffff:10.0.0.5",
		req:  `02 00 0000 00000000 00000000000000000000ffff0a000005 // ANNOUNCE from ::ffff:10.0.0.5`,
		want: &Request{Opcode: OpAnnounce, ClientAddr: addr("10.0.0.5")},
	},
	{
		id: "ADDR-03: wrong client IP + THIRD_PARTY → ADDRESS_MISMATCH", ref: "RFC 6887 §8.2, §13.1",
		src: "2001:db8:1::10", code: AddressMismatch,
		req: hdrMap6Wrong + dataMap443 + `
01 00 0010                        // THIRD_PARTY, length 16
20010db8000100000000000000000020  // internal address 2001:db8:1::20
`,
	},

	// OPT — options.
	{
		id: "OPT-01: PREFER_FAILURE then FILTER; non-zero pad ignored", ref: "RFC 6887 §7.3",
		src: "2001:db8:1::10", req: hdrMap6 + dataMap443 + optPF + optFilterDoc + `
80 00 0003                        // DESCRIPTION, length 3
776562                            // "web"
ff                                // padding, non-zero (ignored)
`,
		want: mapWantWith(withFilters(Options{PreferFailure: true, Description: []byte("web"), HasDescription: true},
			Filter{Remote: pfx("2001:db8:99::/48")})),
		resp: &Response{Opcode: OpMap, Lifetime: time.Hour, Epoch: testEpoch, Map: mapWant.Map,
			Options: withFilters(Options{PreferFailure: true, Description: []byte("web"), HasDescription: true},
				Filter{Remote: pfx("2001:db8:99::/48")})},
		reply: `
02 81 00 00 00000e10 0000abcd 00*12 // version 2, R=1 MAP, SUCCESS, 3600 s, epoch, reserved
0102030405060708090a0b0c 06 000000 01bb 0050 00*16 // opcode data
02 00 0000                        // PREFER_FAILURE
03 00 0014 00 30 0000 20010db8009900000000000000000000 // FILTER 2001:db8:99::/48 any port
80 00 0003 776562 00              // DESCRIPTION "web", zero pad
`,
	},
	{
		id: "OPT-02: FILTER length 64 past the end → MALFORMED_OPTION", ref: "RFC 6887 §7.3",
		src: "2001:db8:1::10", code: MalformedOption,
		req: hdrMap6 + dataMap443 + `
03 00 0040                        // FILTER, length 64: runs past the end
00 30 0000 20010db8009900000000000000000000 // 20 octets
`,
	},
	{
		id: "OPT-03: unknown mandatory option 4 → UNSUPP_OPTION, full copy", ref: "RFC 6887 §7.3",
		src: "2001:db8:1::10", code: UnsuppOption,
		req: hdrMap6 + dataMap443 + optUnknownMandatory,
		reply: `
02 81 00 05 00000708 0000abcd     // version 2, R=1 MAP, reserved, UNSUPP_OPTION, 1800 s, epoch
00*12                             // octets 12-23 zero (HDR-04: parsed)
0102030405060708090a0b0c 06 000000 01bb 0050 00*16 // opcode data as sent
04 00 0004 00000000               // the option as sent
`,
	},
	{
		id: "OPT-04/HDR-05: MAP + c8 + FILTER → SUCCESS echoing FILTER only (84 octets)", ref: "RFC 6887 §7.3",
		src: "2001:db8:1::10", req: hdrMap6 + dataMap443 + `
c8 00 0003                        // option 200 (optional range), length 3
aabbcc 00                         // data, pad
` + optFilterDoc,
		want: mapWantWith(withFilters(Options{}, Filter{Remote: pfx("2001:db8:99::/48")})),
		resp: &Response{Opcode: OpMap, Lifetime: time.Hour, Epoch: testEpoch, Map: mapWant.Map,
			Options: withFilters(Options{}, Filter{Remote: pfx("2001:db8:99::/48")})},
		check: func(t *testing.T, _, reply []byte) {
			if len(reply) != 84 {
				t.Errorf("reply is %d octets, want 84", len(reply))
			}
		},
	},
	{
		id: "OPT-04: PREFIX64 (129) ignored", ref: "RFC 7225 §4",
		src: "2001:db8:1::10", req: hdrMap6 + dataMap443 + `
81 00 0000                        // PREFIX64, length 0 (malformed, but optional and ignored)
`,
		want: &mapWant,
	},
	{
		id: "OPT-05: THIRD_PARTY length 4 → MALFORMED_OPTION", ref: "RFC 6887 §7.3, §13.1",
		src: "2001:db8:1::10", code: MalformedOption,
		req: hdrMap6 + dataMap443 + `01 00 0004 0a000005 // THIRD_PARTY, length 4`,
	},
	{
		id: "OPT-05: PREFER_FAILURE twice → MALFORMED_OPTION", ref: "RFC 6887 §13.2",
		src: "2001:db8:1::10", code: MalformedOption,
		req: hdrMap6 + dataMap443 + optPF + optPF,
	},
	{
		id: "OPT-05: DESCRIPTION twice → MALFORMED_OPTION", ref: "RFC 7220 §3",
		src: "2001:db8:1::10", code: MalformedOption,
		req: hdrMap6 + dataMap443 + `
80 00 0001 61 000000              // DESCRIPTION "a"
80 00 0001 62 000000              // DESCRIPTION "b"
`,
	},
	{
		id: "OPT-06: [unknown mandatory, bad FILTER] → UNSUPP_OPTION", ref: "RFC 6887 §7.3",
		src: "2001:db8:1::10", code: UnsuppOption,
		req: hdrMap6 + dataMap443 + optUnknownMandatory + `
03 00 0014 00 ff 0000 00*16       // FILTER, prefix length 255
`,
	},
	{
		id: "OPT-06: [bad FILTER, unknown mandatory] → MALFORMED_OPTION", ref: "RFC 6887 §7.3",
		src: "2001:db8:1::10", code: MalformedOption,
		req: hdrMap6 + dataMap443 + `
03 00 0014 00 ff 0000 00*16       // FILTER, prefix length 255
` + optUnknownMandatory,
	},
	{
		id: "OPT-07: ANNOUNCE + FILTER → MALFORMED_OPTION", ref: "RFC 6887 §13",
		src: "2001:db8:1::10", code: MalformedOption,
		req: `02 00 0000 00000000 20010db8000100000000000000000010 // ANNOUNCE` + optFilterDoc,
	},
	{
		id: "OPT-07: ANNOUNCE + DESCRIPTION (optional) ignored", ref: "RFC 6887 §7.3",
		src:  "2001:db8:1::10",
		req:  `02 00 0000 00000000 20010db8000100000000000000000010 // ANNOUNCE` + "\n80 00 0001 61 000000 // DESCRIPTION \"a\"",
		want: &Request{Opcode: OpAnnounce, ClientAddr: addr("2001:db8:1::10")},
	},
	{
		id: "OPT-07: PEER + PREFER_FAILURE → MALFORMED_REQUEST", ref: "RFC 6887 §12.1, §13.2",
		src: "2001:db8:1::10", code: MalformedRequest,
		req: hdrPeer6 + dataPeer5000 + `0035 0000 20010db8009900000000000000000001 // remote [2001:db8:99::1]:53` + optPF,
	},
	{
		id: "OPT-07: PEER + FILTER → MALFORMED_OPTION", ref: "RFC 6887 §13.3",
		src: "2001:db8:1::10", code: MalformedOption,
		req: hdrPeer6 + dataPeer5000 + `0035 0000 20010db8009900000000000000000001 // remote [2001:db8:99::1]:53` + optFilterDoc,
	},
	{
		id: "OPT-08: THIRD_PARTY switched off → UNSUPP_OPTION", ref: "RFC 6887 §13.1",
		p: Parser{DisableThirdParty: true}, src: "2001:db8:1::10", code: UnsuppOption,
		req: hdrMap6 + dataMap443 + `01 00 0010 20010db8000100000000000000000020 // THIRD_PARTY 2001:db8:1::20`,
	},
	{
		id: "OPT-09: DESCRIPTION with invalid UTF-8 ignored, request proceeds", ref: "RFC 7220 §3",
		src: "2001:db8:1::10", req: hdrMap6 + dataMap443 + `80 00 0002 c328 0000 // DESCRIPTION, bad UTF-8`,
		want: &mapWant,
	},
	{
		id: "OPT-09: DESCRIPTION length 0 (clears) is present", ref: "RFC 7220 §4",
		src: "2001:db8:1::10", req: hdrMap6 + dataMap443 + `80 00 0000 // DESCRIPTION, empty`,
		want: mapWantWith(Options{HasDescription: true}),
	},
	{
		id: "OPT-10: PORT_SET size 16 from 5000, parity", ref: "RFC 7753 §4",
		src: "2001:db8:1::10", req: hdrMap6 + dataMap443 + `
82 00 0005                        // PORT_SET, length 5
0010                              // port set size 16
1388                              // first internal port 5000
01                                // reserved bits, P=1
000000                            // pad
`,
		want: mapWantWith(Options{PortSet: PortSet{Size: 16, FirstInternalPort: 5000, Parity: true}, HasPortSet: true}),
	},
	{
		id: "OPT-10: PORT_SET size 0 → MALFORMED_OPTION", ref: "RFC 7753 §4",
		src: "2001:db8:1::10", code: MalformedOption,
		req: hdrMap6 + dataMap443 + `82 00 0005 0000 1388 00 000000 // PORT_SET size 0`,
	},
	{
		id: "OPT-10: PORT_SET with PREFER_FAILURE → MALFORMED_OPTION", ref: "RFC 7753 §4",
		src: "2001:db8:1::10", code: MalformedOption,
		req: hdrMap6 + dataMap443 + optPF + `82 00 0005 0010 1388 00 000000 // PORT_SET size 16`,
	},

	// MAP, PEER, TP, PF, FLT opcode rules decidable from the bytes.
	{
		id: "MAP-03: protocol 0 with internal port 80 → MALFORMED_REQUEST", ref: "RFC 6887 §11.3",
		src: "2001:db8:1::10", code: MalformedRequest,
		req: hdrMap6 + `
0102030405060708090a0b0c 00 000000 // nonce, protocol 0 (all), reserved
0050 0000 00*16                   // internal port 80, no suggestion
`,
	},
	{
		id: "PEER-02: remote port 0 → MALFORMED_REQUEST", ref: "RFC 6887 §12.1",
		src: "2001:db8:1::10", code: MalformedRequest,
		req: hdrPeer6 + dataPeer5000 + `0000 0000 20010db8009900000000000000000001 // remote port 0`,
	},
	{
		id: "PEER-03: remote peer ::1 (loopback) → MALFORMED_REQUEST", ref: "RFC 6887 §12.3",
		src: "2001:db8:1::10", code: MalformedRequest,
		req: hdrPeer6 + dataPeer5000 + `0035 0000 00000000000000000000000000000001 // remote [::1]:53`,
	},
	{
		id: "PEER-03: IPv4 remote for an IPv6 client → MALFORMED_REQUEST", ref: "RFC 6887 §12.3",
		src: "2001:db8:1::10", code: MalformedRequest,
		req: hdrPeer6 + dataPeer5000 + `0035 0000 00000000000000000000ffffc6336407 // remote 198.51.100.7:53`,
	},
	{
		id: "TP-01: THIRD_PARTY naming the source → MALFORMED_REQUEST", ref: "RFC 6887 §13.1",
		src: "2001:db8:1::10", code: MalformedRequest,
		req: hdrMap6 + dataMap443 + `01 00 0010 20010db8000100000000000000000010 // THIRD_PARTY = client`,
	},
	{
		id: "TP-04: THIRD_PARTY decoded and echoed", ref: "RFC 6887 §13.1",
		src: "2001:db8:1::10", req: hdrMap6 + dataMap443 + `01 00 0010 20010db8000100020000000000000001 // THIRD_PARTY 2001:db8:1:2::1`,
		want: mapWantWith(Options{ThirdParty: addr("2001:db8:1:2::1")}),
		resp: &Response{Opcode: OpMap, Lifetime: time.Hour, Epoch: testEpoch, Map: mapWant.Map,
			Options: Options{ThirdParty: addr("2001:db8:1:2::1")}},
		reply: `
02 81 00 00 00000e10 0000abcd 00*12 // SUCCESS header
0102030405060708090a0b0c 06 000000 01bb 0050 00*16 // opcode data
01 00 0010 20010db8000100020000000000000001 // THIRD_PARTY echoed
`,
	},
	{
		id: "PF-02: PREFER_FAILURE with suggested port 0 → MALFORMED_OPTION", ref: "RFC 6887 §13.2",
		src: "2001:db8:1::10", code: MalformedOption,
		req: hdrMap6 + `0102030405060708090a0b0c 06 000000 01bb 0000 00*16 // TCP 443, suggest port 0` + optPF,
	},
	{
		id: "PF-02: PREFER_FAILURE with lifetime 0 → MALFORMED_OPTION", ref: "RFC 6887 §11.3",
		src: "2001:db8:1::10", code: MalformedOption,
		req: `02 01 0000 00000000 20010db8000100000000000000000010 // MAP, lifetime 0` + dataMap443 + optPF,
	},
	{
		id: "FLT-02: ::ffff:192.0.2.0/95 → MALFORMED_OPTION", ref: "RFC 6887 §13.3",
		src: "10.0.0.5", code: MalformedOption,
		req: hdrMap4 + dataMap5000v4 + `03 00 0014 00 5f 0000 00000000000000000000ffffc0000200 // FILTER ::ffff:192.0.2.0/95`,
	},
	{
		id: "FLT-02: ::ffff:192.0.2.0/120 = 192.0.2.0/24", ref: "RFC 6887 §13.3",
		src: "10.0.0.5", req: hdrMap4 + dataMap5000v4 + `03 00 0014 00 78 0050 00000000000000000000ffffc0000200 // FILTER ::ffff:192.0.2.0/120 port 80`,
		want: &Request{Opcode: OpMap, Lifetime: time.Hour, ClientAddr: addr("10.0.0.5"),
			Map:     MapData{Nonce: testNonce, Protocol: ProtoUDP, InternalPort: 5000, ExternalPort: 5000, ExternalAddr: addr("0.0.0.0")},
			Options: withFilters(Options{}, Filter{Remote: pfx("192.0.2.0/24"), RemotePort: 80})},
	},
	{
		id: "FLT-03: [A, prefix 0, B] decodes in order; prefix 0 clears", ref: "RFC 6887 §13.3, EID 3891",
		src: "2001:db8:1::10", req: hdrMap6 + dataMap443 + optFilterDoc + `
03 00 0014 00 00 1234 20010db8000000000000000000000001 // FILTER prefix 0: clear (address, port ignored)
03 00 0014 00 80 01bb 20010db8009800000000000000000001 // FILTER 2001:db8:98::1/128 port 443
`,
		want: mapWantWith(withFilters(Options{}, Filter{Remote: pfx("2001:db8:99::/48")}, Filter{},
			Filter{Remote: pfx("2001:db8:98::1/128"), RemotePort: 443})),
	},
	{
		id: "FLT-05: FILTER with lifetime 0 → MALFORMED_OPTION", ref: "RFC 6887 §13.3",
		src: "2001:db8:1::10", code: MalformedOption,
		req: `02 01 0000 00000000 20010db8000100000000000000000010 // MAP, lifetime 0` + dataMap443 + optFilterDoc,
	},
	{
		id: "FLT-08: IPv6 FILTER for an IPv4 mapping → MALFORMED_OPTION", ref: "RFC 6887 §10, §13.3",
		src: "10.0.0.5", code: MalformedOption,
		req: hdrMap4 + dataMap5000v4 + optFilterDoc,
	},
}

// TestRequestVectors checks every golden request: decode → struct diff;
// error class; reply bytes (AppendResponse for successes,
// AppendErrorResponse with the code's lifetime for errors).
func TestRequestVectors(t *testing.T) {
	if len(requestVectors) < 30 {
		t.Fatalf("only %d vectors", len(requestVectors))
	}
	for _, v := range requestVectors {
		t.Run(v.id, func(t *testing.T) {
			b := v.bytes(t)
			var got Request
			err := v.p.ParseRequest(b, addr(v.src), &got)
			var reply []byte
			switch {
			case v.silent:
				var pe *ParseError
				if !errors.As(err, &pe) || !pe.Silent || !errors.Is(err, ErrDrop) {
					t.Fatalf("err = %v, want a silent drop", err)
				}
				return
			case v.want != nil:
				if err != nil {
					t.Fatalf("err = %v, want success", err)
				}
				if d := cmp.Diff(*v.want, got, cmpOpts); d != "" {
					t.Fatalf("decoded (-want +got):\n%s", d)
				}
				if v.resp == nil {
					return
				}
				reply = AppendResponse(nil, v.resp)
				if len(reply) > len(b) {
					t.Errorf("reply %d octets > request %d (no amplification)", len(reply), len(b))
				}
			default:
				var pe *ParseError
				if !errors.As(err, &pe) || pe.Silent || pe.Result != v.code {
					t.Fatalf("err = %v, want %v", err, v.code)
				}
				if got.Opcode != 0 || got.ClientAddr.IsValid() {
					t.Fatalf("failed parse wrote into the request: %+v", got)
				}
				reply = AppendErrorResponse(nil, b, v.code, v.code.ErrorLifetime(), testEpoch)
				if len(reply)%4 != 0 || len(reply) > MaxMessageSize {
					t.Errorf("error reply length %d", len(reply))
				}
			}
			if v.reply != "" {
				want := unhex(t, v.reply)
				if !bytes.Equal(reply, want) {
					t.Errorf("reply\n got %s\nwant %s", hex.EncodeToString(reply), hex.EncodeToString(want))
				}
			}
			if v.check != nil {
				v.check(t, b, reply)
			}
		})
	}
}
