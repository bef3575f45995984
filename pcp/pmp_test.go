package pcp

import (
	"bytes"
	"encoding/hex"
	"errors"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

// pmpVector is one golden NAT-PMP request and, when it decodes, the reply
// built by the encoder named in reply.
type pmpVector struct {
	id     string
	ref    string
	req    string
	want   *PMPRequest
	silent bool
	code   ResultCode // UnsuppVersion or UnsuppOpcode
	build  func(req []byte) []byte
	reply  string
}

var pmpVectors = []pmpVector{
	{
		id: "VER-01: external address request and reply", ref: "RFC 6886 §3.2",
		req:  `00 00 // version 0, opcode 0`,
		want: &PMPRequest{Opcode: PMPOpAddress},
		build: func([]byte) []byte {
			return AppendPMPAddressResponse(nil, PMPSuccess, testEpoch, addr("203.0.113.1"))
		},
		reply: `
00                                // version 0
80                                // opcode 128 + 0
0000                              // result SUCCESS
0000abcd                          // seconds since start of epoch
cb007101                          // external address 203.0.113.1
`,
	},
	{
		id: "PMP-03: address reply with an error carries 0.0.0.0", ref: "RFC 6886 §3.2",
		req:  `00 00 // version 0, opcode 0`,
		want: &PMPRequest{Opcode: PMPOpAddress},
		build: func([]byte) []byte {
			return AppendPMPAddressResponse(nil, PMPNetworkFailure, testEpoch, addr("203.0.113.1"))
		},
		reply: `00 80 0003 0000abcd 00000000 // version 0, 128, NETWORK_FAILURE, SSSoE, address 0.0.0.0`,
	},
	{
		id: "PMP-03: TCP mapping request and reply", ref: "RFC 6886 §3.3",
		req: `
00                                // version 0
02                                // opcode 2: map TCP
0000                              // reserved
1f90                              // internal port 8080
0050                              // suggested external port 80
00001c20                          // requested lifetime 7200 s
`,
		want: &PMPRequest{Opcode: PMPOpMapTCP, InternalPort: 8080, SuggestedExternalPort: 80, Lifetime: 2 * time.Hour},
		build: func([]byte) []byte {
			return AppendPMPMapResponse(nil, PMPOpMapTCP, PMPSuccess, testEpoch, 8080, 80, 2*time.Hour)
		},
		reply: `
00                                // version 0
82                                // opcode 128 + 2
0000                              // result SUCCESS
0000abcd                          // SSSoE
1f90                              // internal port 8080
0050                              // mapped external port 80
00001c20                          // lifetime 7200 s
`,
	},
	{
		id: "PMP-03: extra octets after a mapping request ignored", ref: "RFC 6886 §3.3",
		req:  `00 01 0000 1388 1388 00000e10 deadbeef // UDP 5000→5000 3600 s, 4 extra octets`,
		want: &PMPRequest{Opcode: PMPOpMapUDP, InternalPort: 5000, SuggestedExternalPort: 5000, Lifetime: time.Hour},
	},
	{
		id: "PMP-07: delete reply: internal port copied, external 0, lifetime 0", ref: "RFC 6886 §3.4",
		req:  `00 01 0000 1388 1388 00000000 // UDP 5000, lifetime 0: delete`,
		want: &PMPRequest{Opcode: PMPOpMapUDP, InternalPort: 5000, SuggestedExternalPort: 5000},
		build: func([]byte) []byte {
			return AppendPMPMapResponse(nil, PMPOpMapUDP, PMPSuccess, testEpoch, 5000, 0, 0)
		},
		reply: `00 81 0000 0000abcd 1388 0000 00000000 // version 0, 129, SUCCESS, SSSoE, int 5000, ext 0, lifetime 0`,
	},
	{
		id: "PMP-09: mapping error reply", ref: "RFC 6886 §3.5",
		req:  `00 02 0000 0016 0016 00000e10 // TCP 22→22 3600 s`,
		want: &PMPRequest{Opcode: PMPOpMapTCP, InternalPort: 22, SuggestedExternalPort: 22, Lifetime: time.Hour},
		build: func([]byte) []byte {
			return AppendPMPMapResponse(nil, PMPOpMapTCP, PMPOutOfResources, testEpoch, 22, 0, 0)
		},
		reply: `00 82 0004 0000abcd 0016 0000 00000000 // OUT_OF_RESOURCES, internal 22 copied, rest 0`,
	},
	{
		id: "PMP-02: opcode 7 echoed with 0x80 and result 5", ref: "RFC 6886 §3.5",
		req: `00 07 0000 aabb // version 0, opcode 7, reserved, 2 octets`, code: UnsuppOpcode,
		build: func(req []byte) []byte { return AppendPMPUnsupportedOpcode(nil, req, testEpoch) },
		reply: `
00                                // version 0
87                                // opcode 128 + 7
0005                              // result UNSUPPORTED_OPCODE
aabb                              // rest as sent
`,
	},
	{
		id: "PMP-02: 2-octet opcode 9 extended to 4", ref: "RFC 6886 §3.5, PROTOCOL.md (f)",
		req: `00 09 // version 0, opcode 9`, code: UnsuppOpcode,
		build: func(req []byte) []byte { return AppendPMPUnsupportedOpcode(nil, req, testEpoch) },
		reply: `00 89 0005 // opcode 137, UNSUPPORTED_OPCODE`,
	},
	{
		id: "PMP-02: 12-octet opcode 3 echoed, SSSoE in octets 4-7 (EPO-01)", ref: "RFC 6886 §3.5, §3.6",
		req: `00 03 ffff 11111111 22222222 // opcode 3, junk`, code: UnsuppOpcode,
		build: func(req []byte) []byte { return AppendPMPUnsupportedOpcode(nil, req, testEpoch) },
		reply: `00 83 0005 0000abcd 22222222 // opcode 131, UNSUPPORTED_OPCODE, SSSoE, rest as sent`,
	},
	{id: "PMP-03: mapping request under 12 octets dropped", ref: "RFC 6886 §3.3", req: `00 01 0000 1388 1388 // 8 octets`, silent: true},
	{id: "PKT-02: NAT-PMP reply (R bit) dropped", ref: "RFC 6886 §3.5", req: `00 81 0000 // opcode 129`, silent: true},
	{id: "PKT-01: one octet dropped", ref: "RFC 6887 §8.2", req: `00 // version only`, silent: true},
	{id: "PMP-01: version 1 is not NAT-PMP", ref: "RFC 6886 §3.5", req: `01 00 // version 1`, code: UnsuppVersion},

	// Captured from third-party clients. natpmpc (Debian natpmpc
	// 20150609-7.1+b2, libnatpmp) and github.com/jackpal/go-nat-pmp
	// v1.1.0 were run inside a throwaway network namespace against a
	// Python UDP listener on 127.0.0.1:5351 that logged each datagram in
	// hex and answered it (see testdata/captured.md).
	{
		id: "captured natpmpc: public address request (natpmpc -g 127.0.0.1)", ref: "RFC 6886 §3.2",
		req: `0000 // natpmpc`, want: &PMPRequest{Opcode: PMPOpAddress},
	},
	{
		id: "captured natpmpc: -a 1234 1234 tcp 3600", ref: "RFC 6886 §3.3",
		req: `
00                                // version 0
02                                // opcode 2: TCP
0000                              // reserved
04d2                              // private (internal) port 1234
04d2                              // public (suggested) port 1234
00000e10                          // lifetime 3600 s
`,
		want: &PMPRequest{Opcode: PMPOpMapTCP, InternalPort: 1234, SuggestedExternalPort: 1234, Lifetime: time.Hour},
	},
	{
		id: "captured natpmpc: -a 5000 5001 udp 0 (delete)", ref: "RFC 6886 §3.4",
		req: `
00 01                             // version 0, opcode 1: UDP
0000                              // reserved
1389                              // private port 5001
1388                              // public port 5000
00000000                          // lifetime 0
`,
		want: &PMPRequest{Opcode: PMPOpMapUDP, InternalPort: 5001, SuggestedExternalPort: 5000},
	},
	{
		id: "captured go-nat-pmp: GetExternalAddress", ref: "RFC 6886 §3.2",
		req: `0000 // go-nat-pmp`, want: &PMPRequest{Opcode: PMPOpAddress},
	},
	{
		id: `captured go-nat-pmp: AddPortMapping("tcp", 8080, 80, 7200)`, ref: "RFC 6886 §3.3",
		req: `
00 02                             // version 0, opcode 2: TCP
0000                              // reserved
1f90                              // internal port 8080
0050                              // requested external port 80
00001c20                          // lifetime 7200 s
`,
		want: &PMPRequest{Opcode: PMPOpMapTCP, InternalPort: 8080, SuggestedExternalPort: 80, Lifetime: 2 * time.Hour},
	},
	{
		id: `captured go-nat-pmp: AddPortMapping("udp", 51820, 0, 0)`, ref: "RFC 6886 §3.3, §3.4",
		req: `
00 01                             // version 0, opcode 1: UDP
0000                              // reserved
ca6c                              // internal port 51820
0000                              // requested external port 0
00000000                          // lifetime 0
`,
		want: &PMPRequest{Opcode: PMPOpMapUDP, InternalPort: 51820},
	},
}

// TestPMPVectors checks every golden NAT-PMP request and reply.
func TestPMPVectors(t *testing.T) {
	for _, v := range pmpVectors {
		t.Run(v.id, func(t *testing.T) {
			b := unhex(t, v.req)
			var got PMPRequest
			err := ParsePMPRequest(b, &got)
			switch {
			case v.silent:
				var pe *ParseError
				if !errors.As(err, &pe) || !pe.Silent {
					t.Fatalf("err = %v, want silent drop", err)
				}
			case v.want != nil:
				if err != nil {
					t.Fatalf("err = %v", err)
				}
				if d := cmp.Diff(*v.want, got); d != "" {
					t.Fatalf("decoded (-want +got):\n%s", d)
				}
				// Request round trip (client side encoder).
				if again := AppendPMPRequest(nil, &got); !bytes.Equal(again, b[:len(again)]) {
					t.Errorf("AppendPMPRequest = %x, want %x", again, b)
				}
			default:
				var pe *ParseError
				if !errors.As(err, &pe) || pe.Silent || pe.Result != v.code {
					t.Fatalf("err = %v, want %v", err, v.code)
				}
				if got != (PMPRequest{}) {
					t.Fatalf("failed parse wrote %+v", got)
				}
			}
			if v.build == nil {
				return
			}
			reply := v.build(b)
			if want := unhex(t, v.reply); !bytes.Equal(reply, want) {
				t.Errorf("reply\n got %s\nwant %s", hex.EncodeToString(reply), hex.EncodeToString(want))
			}
			var resp PMPResponse
			if err := ParsePMPResponse(reply, &resp); err != nil {
				t.Errorf("ParsePMPResponse(reply): %v", err)
			}
		})
	}
}

// TestPMPResponseDecode_6886_3_2 decodes replies as a client would.
func TestPMPResponseDecode_6886_3_2(t *testing.T) {
	var r PMPResponse
	if err := ParsePMPResponse(AppendPMPAddressResponse(nil, PMPSuccess, 7, addr("198.51.100.1")), &r); err != nil {
		t.Fatal(err)
	}
	want := PMPResponse{Opcode: PMPOpAddress, Epoch: 7, ExternalAddr: addr("198.51.100.1")}
	if d := cmp.Diff(want, r, cmpOpts); d != "" {
		t.Errorf("(-want +got):\n%s", d)
	}
	for _, bad := range []string{"", "0000", "0080 0000", "0180 0000 00000000 00000000", "0081 0000 00000000 0000"} {
		before := r
		if err := ParsePMPResponse(unhex(t, bad), &r); !errors.Is(err, ErrMalformedResponse) {
			t.Errorf("ParsePMPResponse(%q) = %v, want ErrMalformedResponse", bad, err)
		}
		if r != before {
			t.Errorf("ParsePMPResponse(%q) modified the value on error", bad)
		}
	}
}
