package pcp

import (
	"bytes"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

// TestResultCodeString_6887_7_4 checks the hand-written names against the
// RFC 6887 §7.4 table, and the lifetime classes of PROTOCOL.md §3.
func TestResultCodeString_6887_7_4(t *testing.T) {
	tests := []struct {
		code ResultCode
		name string
		life time.Duration
	}{
		{Success, "SUCCESS", 0},
		{UnsuppVersion, "UNSUPP_VERSION", 1800 * time.Second},
		{NotAuthorized, "NOT_AUTHORIZED", 1800 * time.Second},
		{MalformedRequest, "MALFORMED_REQUEST", 1800 * time.Second},
		{UnsuppOpcode, "UNSUPP_OPCODE", 1800 * time.Second},
		{UnsuppOption, "UNSUPP_OPTION", 1800 * time.Second},
		{MalformedOption, "MALFORMED_OPTION", 1800 * time.Second},
		{NetworkFailure, "NETWORK_FAILURE", 30 * time.Second},
		{NoResources, "NO_RESOURCES", 30 * time.Second},
		{UnsuppProtocol, "UNSUPP_PROTOCOL", 1800 * time.Second},
		{UserExQuota, "USER_EX_QUOTA", 30 * time.Second},
		{CannotProvideExternal, "CANNOT_PROVIDE_EXTERNAL", 30 * time.Second},
		{AddressMismatch, "ADDRESS_MISMATCH", 1800 * time.Second},
		{ExcessiveRemotePeers, "EXCESSIVE_REMOTE_PEERS", 1800 * time.Second},
		{14, "RESULT(14)", 1800 * time.Second},
		{255, "RESULT(255)", 1800 * time.Second},
	}
	for _, tt := range tests {
		t.Run("HDR-07/"+tt.name, func(t *testing.T) {
			if got := tt.code.String(); got != tt.name {
				t.Errorf("String() = %q, want %q", got, tt.name)
			}
			if got := tt.code.ErrorLifetime(); got != tt.life {
				t.Errorf("ErrorLifetime() = %v, want %v", got, tt.life)
			}
		})
	}
	if len(resultNames) != int(ExcessiveRemotePeers)+1 {
		t.Errorf("resultNames has %d entries", len(resultNames))
	}
}

func TestNames(t *testing.T) {
	for _, tt := range []struct{ got, want string }{
		{OpAnnounce.String(), "ANNOUNCE"}, {OpMap.String(), "MAP"}, {OpPeer.String(), "PEER"},
		{Opcode(3).String(), "AUTHENTICATION"}, {Opcode(9).String(), "OPCODE(9)"},
		{ProtoTCP.String(), "tcp"}, {ProtoUDP.String(), "udp"}, {ProtoAll.String(), "all"}, {Protocol(50).String(), "50"},
		{OptThirdParty.String(), "THIRD_PARTY"}, {OptPortSet.String(), "PORT_SET"}, {OptionCode(9).String(), "OPTION(9)"},
		{PMPNotAuthorized.String(), "NOT_AUTHORIZED"}, {PMPUnsupportedOpcode.String(), "UNSUPPORTED_OPCODE"}, {PMPResultCode(6).String(), "RESULT(6)"},
		{PMPOpMapTCP.String(), "MAP_TCP"}, {PMPOpcode(5).String(), "OPCODE(5)"},
	} {
		if tt.got != tt.want {
			t.Errorf("got %q, want %q", tt.got, tt.want)
		}
	}
	if !OptionCode(127).Mandatory() || OptionCode(128).Mandatory() {
		t.Error("Mandatory: 0-127 mandatory, 128-255 optional (§7.3)")
	}
}

// TestParseErrorSentinels: errors are lowercase, package-prefixed, wrap a
// sentinel, and map 1:1 to the result they ask for.
func TestParseErrorSentinels(t *testing.T) {
	src := addr("2001:db8:1::10")
	tests := []struct {
		id   string
		pkt  string
		want error
	}{
		{"PKT-01", ``, ErrDrop},
		{"VER-03", `03 00`, ErrUnsupportedVersion},
		{"PKT-05", hdrMap6 + dataMap443 + `ee`, ErrMalformedRequest},
		{"PKT-07", `02 05 0000 00000000 20010db8000100000000000000000010`, ErrUnsupportedOpcode},
		{"OPT-03", hdrMap6 + dataMap443 + optUnknownMandatory, ErrUnsupportedOption},
		{"OPT-02", hdrMap6 + dataMap443 + `03 00 0040`, ErrMalformedOption},
		{"ADDR-01", hdrMap6Wrong + dataMap443, ErrAddressMismatch},
	}
	for _, tt := range tests {
		t.Run(tt.id, func(t *testing.T) {
			var r Request
			err := ParseRequest(unhex(t, tt.pkt), src, &r)
			if !errors.Is(err, tt.want) {
				t.Fatalf("err = %v, want %v", err, tt.want)
			}
			if !strings.HasPrefix(err.Error(), "pcp: ") || strings.ToLower(err.Error()[:6]) != err.Error()[:6] {
				t.Errorf("error text %q", err)
			}
		})
	}
}

// TestDeferOptionChecks_MAP01: the engine may run the option semantics
// step after ownership (MAP-01 order) with DeferOptionChecks and
// Request.CheckOptions.
func TestDeferOptionChecks_MAP01(t *testing.T) {
	pkt := unhex(t, `02 01 0000 00000000 20010db8000100000000000000000010 // MAP, lifetime 0`+dataMap443+optPF)
	src := addr("2001:db8:1::10")
	var r Request
	if err := ParseRequest(pkt, src, &r); !errors.Is(err, ErrMalformedOption) {
		t.Fatalf("PF-02: default parse err = %v, want MALFORMED_OPTION", err)
	}
	p := Parser{DeferOptionChecks: true}
	if err := p.ParseRequest(pkt, src, &r); err != nil {
		t.Fatalf("deferred parse: %v", err)
	}
	if !r.Options.PreferFailure {
		t.Error("PREFER_FAILURE not decoded")
	}
	var pe *ParseError
	if err := r.CheckOptions(); !errors.As(err, &pe) || pe.Result != MalformedOption {
		t.Errorf("CheckOptions = %v, want MALFORMED_OPTION", err)
	}
}

// TestParserSwitches_OPT08: PREFER_FAILURE switched off is an unsupported
// mandatory option; PORT_SET switched off is ignored (OPT-10).
func TestParserSwitches_OPT08(t *testing.T) {
	src := addr("2001:db8:1::10")
	var r Request
	p := Parser{DisablePreferFailure: true}
	if err := p.ParseRequest(unhex(t, hdrMap6+dataMap443+optPF), src, &r); !errors.Is(err, ErrUnsupportedOption) {
		t.Errorf("PF off: %v, want UNSUPP_OPTION", err)
	}
	p = Parser{IgnorePortSet: true}
	if err := p.ParseRequest(unhex(t, hdrMap6+dataMap443+`82 00 0005 0000 1388 00 000000`), src, &r); err != nil || r.Options.HasPortSet {
		t.Errorf("PORT_SET ignored: err %v, HasPortSet %v", err, r.Options.HasPortSet)
	}
}

// TestEchoOrder_HDR05: a reply built from the decoded options echoes them
// in request order, with zeroed reserved octets and padding.
func TestEchoOrder_HDR05(t *testing.T) {
	pkt := unhex(t, hdrMap6+dataMap443+optFilterDoc+`
01 ff 0010 20010db8000100020000000000000001 // THIRD_PARTY, reserved octet ff
80 00 0002 6869 ffff                        // DESCRIPTION "hi", pad ffff
03 00 0014 00 80 0050 20010db8009800000000000000000001 // FILTER /128 port 80
`)
	var r Request
	if err := ParseRequest(pkt, addr("2001:db8:1::10"), &r); err != nil {
		t.Fatal(err)
	}
	resp := Response{Opcode: OpMap, Lifetime: time.Hour, Epoch: testEpoch, Map: r.Map, Options: r.Options}
	got := AppendResponse(nil, &resp)
	want := unhex(t, `
02 81 00 00 00000e10 0000abcd 00*12                      // SUCCESS header
0102030405060708090a0b0c 06 000000 01bb 0050 00*16       // opcode data
03 00 0014 00 30 0000 20010db8009900000000000000000000   // FILTER 1
01 00 0010 20010db8000100020000000000000001              // THIRD_PARTY, reserved zeroed
80 00 0002 6869 0000                                     // DESCRIPTION, zero pad
03 00 0014 00 80 0050 20010db8009800000000000000000001   // FILTER 2
`)
	if !bytes.Equal(got, want) {
		t.Errorf("echo\n got %x\nwant %x", got, want)
	}
	// A hand-built Options (no decode order) is written in code order.
	o := Options{Description: []byte("x"), HasDescription: true, ThirdParty: addr("10.0.0.9")}
	if got := appendOptions(nil, &o); got[0] != byte(OptThirdParty) || got[20] != byte(OptDescription) {
		t.Errorf("code order: %x", got)
	}
}

// TestEncoderGuard_HDR08: a success that would exceed 1100 octets goes out
// as MALFORMED_REQUEST without options.
func TestEncoderGuard_HDR08(t *testing.T) {
	fs := make([]Filter, MaxFilters)
	for i := range fs {
		fs[i] = Filter{Remote: pfx("2001:db8:99::/48")}
	}
	r := Response{Opcode: OpMap, Lifetime: time.Hour, Map: mapWant.Map,
		Options: Options{Filters: fs, ThirdParty: addr("2001:db8:1::20")}}
	if r.Len() <= MaxMessageSize {
		t.Fatalf("test response only %d octets", r.Len())
	}
	b := AppendResponse(nil, &r)
	if len(b) != MapSize || b[3] != byte(MalformedRequest) {
		t.Errorf("guarded reply %d octets, result %d", len(b), b[3])
	}
	var back Response
	if err := ParseResponse(b, &back); err != nil || back.Result != MalformedRequest || back.Lifetime != LongErrorLifetime {
		t.Errorf("guarded reply decodes to %+v, %v", back, err)
	}
}

// TestResponseDecode_6887_7_2 decodes every golden success reply back
// into the Response it was built from (client side).
func TestResponseDecode_6887_7_2(t *testing.T) {
	for _, v := range requestVectors {
		if v.resp == nil {
			continue
		}
		t.Run(v.id, func(t *testing.T) {
			var got Response
			if err := ParseResponse(AppendResponse(nil, v.resp), &got); err != nil {
				t.Fatal(err)
			}
			if d := cmp.Diff(*v.resp, got, cmpOpts); d != "" {
				t.Errorf("(-want +got):\n%s", d)
			}
		})
	}
}

func TestResponseDecodeErrors(t *testing.T) {
	ok := `02 81 00 00 00000e10 0000abcd 00*12 0102030405060708090a0b0c 06 000000 01bb 0050 00*16`
	tests := []struct{ id, pkt string }{
		{"short", `02 81 00 00`},
		{"not x4", ok + `00`},
		{"R bit clear", `02 01 00 00 00000e10 0000abcd 00*12`},
		{"version 1", `01 81 00 00 00000e10 0000abcd 00*12`},
		{"MAP without data", `02 81 00 00 00000e10 0000abcd 00*12`},
		{"TP length 4", ok + `01 00 0004 0a000001`},
		{"PF twice", ok + `02 00 0000 02 00 0000`},
		{"FILTER /200", ok + `03 00 0014 00 c8 0000 00*16`},
		{"option past end", ok + `80 00 0010 00000000`},
	}
	for _, tt := range tests {
		t.Run(tt.id, func(t *testing.T) {
			r := Response{Epoch: 9}
			if err := ParseResponse(unhex(t, tt.pkt), &r); !errors.Is(err, ErrMalformedResponse) {
				t.Errorf("err = %v, want ErrMalformedResponse", err)
			}
			if r.Epoch != 9 || r.Opcode != 0 {
				t.Error("failed parse changed the value")
			}
		})
	}
	// An UNSUPP_OPCODE reply decodes as header only (PKT-07).
	var r Response
	if err := ParseResponse(unhex(t, `02 85 00 04 00000708 0000abcd 00*12 aabbccdd`), &r); err != nil || r.Opcode != 5 || r.Result != UnsuppOpcode {
		t.Errorf("UNSUPP_OPCODE reply: %+v %v", r, err)
	}
}

// TestNewRequests builds client requests and checks they decode as the
// server would see them.
func TestNewRequests(t *testing.T) {
	src := addr("10.0.0.5")
	for _, r := range []*Request{
		NewMap(src, ProtoTCP, 8080, time.Hour),
		NewPeer(src, ProtoUDP, 5000, netipAddrPort("198.51.100.7:53"), time.Hour),
		NewAnnounce(src),
	} {
		var got Request
		if err := ParseRequest(AppendRequest(nil, r), src, &got); err != nil {
			t.Fatalf("%v: %v", r.Opcode, err)
		}
		if d := cmp.Diff(*r, got, cmpOpts); d != "" {
			t.Errorf("%v (-want +got):\n%s", r.Opcode, d)
		}
	}
	if a, b := NewNonce(), NewNonce(); a == b || a == (Nonce{}) {
		t.Error("NewNonce is not random")
	}
}
