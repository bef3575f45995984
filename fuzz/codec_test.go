package fuzz

import (
	"bytes"
	"errors"
	"net/netip"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"

	"github.com/pcpd/pcpd/pcp"
)

var cmpOpts = cmpopts.EquateComparable(netip.Addr{}, netip.Prefix{})

// parser returns the Parser configuration selected by a fuzzed byte.
func parser(flags uint8) pcp.Parser {
	return pcp.Parser{
		DisableThirdParty:    flags&1 != 0,
		DisablePreferFailure: flags&2 != 0,
		IgnorePortSet:        flags&4 != 0,
		DeferOptionChecks:    flags&8 != 0,
	}
}

// source returns the packet source selected by a fuzzed byte: none, the
// request's own Client IP (so ADDRESS_MISMATCH passes), that address
// IPv4-mapped as a dual-stack socket reports it, or a fixed address.
func source(b []byte, mode uint8) netip.Addr {
	switch mode % 4 {
	case 1, 2:
		if len(b) < 24 {
			return netip.Addr{}
		}
		a := netip.AddrFrom16([16]byte(b[8:24]))
		if mode%4 == 1 {
			return a.Unmap()
		}
		return a // IPv4 stays ::ffff:a.b.c.d, as from a dual-stack socket
	case 3:
		return netip.MustParseAddr("2001:db8:1::10")
	}
	return netip.Addr{}
}

// FuzzRequestRoundTrip: b1 → m1 → b2 → m2 → b3 with m1 == m2 and
// b2 == b3 (STYLE.md). b1 == b2 is not required: reserved octets, padding
// and ignored options do not survive decoding.
func FuzzRequestRoundTrip(f *testing.F) {
	f.Fuzz(func(t *testing.T, b1 []byte) {
		var m1, m2, m3 pcp.Request
		if pcp.ParseRequest(b1, netip.Addr{}, &m1) != nil {
			return
		}
		b2 := pcp.AppendRequest(nil, &m1)
		if err := pcp.ParseRequest(b2, netip.Addr{}, &m2); err != nil {
			t.Fatalf("re-encoded request does not decode: %v\nb1 %x\nb2 %x", err, b1, b2)
		}
		if !requestEqual(&m1, &m2) {
			t.Fatalf("m1 != m2 (-m1 +m2):\n%s", cmp.Diff(m1, m2, cmpOpts))
		}
		b3 := pcp.AppendRequest(nil, &m2)
		if !bytes.Equal(b2, b3) {
			t.Fatalf("b2 != b3\nb2 %x\nb3 %x", b2, b3)
		}
		if len(b2) > len(b1) {
			t.Fatalf("canonical form longer than the input: %d > %d", len(b2), len(b1))
		}
		if err := pcp.ParseRequest(b3, netip.Addr{}, &m3); err != nil {
			t.Fatal(err)
		}
	})
}

// FuzzParseRequest: ParseRequest never panics, never returns a value and
// an error together (a failed parse leaves the value as it was), its
// errors are consistent *ParseErrors, and every reply built for the input
// — the echoed success reply or the copy-error reply — is at most 1100
// octets, a multiple of 4, and no longer than the request except for the
// padding PROTOCOL.md (f) allows (to the next multiple of 4).
func FuzzParseRequest(f *testing.F) {
	f.Fuzz(func(t *testing.T, b []byte, flags uint8, srcMode uint8) {
		p := parser(flags)
		src := source(b, srcMode)
		// Fill the value first so a partial write would show.
		sentinel := pcp.Request{Opcode: 99, ClientAddr: netip.MustParseAddr("192.0.2.99"), Lifetime: 42}
		req := sentinel
		err := p.ParseRequest(b, src, &req)
		if err != nil {
			if !requestEqual(&sentinel, &req) {
				t.Fatalf("failed parse (%v) changed the value:\n%s", err, cmp.Diff(sentinel, req, cmpOpts))
			}
			var pe *pcp.ParseError
			if !errors.As(err, &pe) {
				t.Fatalf("error %v is not a *ParseError", err)
			}
			if pe.Silent != errors.Is(err, pcp.ErrDrop) {
				t.Fatalf("Silent=%v but errors.Is(ErrDrop)=%v", pe.Silent, errors.Is(err, pcp.ErrDrop))
			}
			if pe.Silent {
				if len(b) >= 2 && b[1]&0x80 == 0 && !(b[0] == pcp.Version && len(b) < pcp.HeaderSize) {
					t.Fatalf("dropped a packet PKT-01..03 do not drop: %v", err)
				}
				return
			}
			if pe.Result == pcp.Success {
				t.Fatal("error with result SUCCESS")
			}
			reply := pcp.AppendErrorResponse(nil, b, pe.Result, pe.Result.ErrorLifetime(), 1)
			checkReplySize(t, b, reply, true)
			return
		}
		if req.Opcode > pcp.OpPeer || len(b) > pcp.MaxMessageSize || len(b)%4 != 0 {
			t.Fatalf("accepted %d octets, opcode %d", len(b), req.Opcode)
		}
		if p.DeferOptionChecks {
			_ = req.CheckOptions() // must not panic
		} else if err := req.CheckOptions(); err != nil {
			t.Fatalf("accepted request fails its own option checks: %v", err)
		}
		// Echo everything processed, as the engine would on success.
		resp := pcp.Response{Opcode: req.Opcode, Lifetime: req.Lifetime, Epoch: 1, Map: req.Map, Peer: req.Peer, Options: req.Options}
		if req.Opcode == pcp.OpAnnounce {
			resp.Options = pcp.Options{}
		}
		reply := pcp.AppendResponse(nil, &resp)
		checkReplySize(t, b, reply, false)
		var back pcp.Response
		if err := pcp.ParseResponse(reply, &back); err != nil {
			t.Fatalf("own success reply does not decode: %v\n%x", err, reply)
		}
	})
}

// checkReplySize enforces HDR-08 and PROTOCOL.md (f) for PCP replies.
func checkReplySize(t *testing.T, req, reply []byte, copyError bool) {
	t.Helper()
	if len(reply) > pcp.MaxMessageSize || len(reply)%4 != 0 {
		t.Fatalf("reply of %d octets (max 1100, multiple of 4)", len(reply))
	}
	limit := len(req)
	if copyError {
		// Only padding may grow it: 1-3 octets to the next multiple of 4.
		limit = (min(len(req), pcp.MaxMessageSize) + 3) &^ 3
		if len(reply) != limit {
			t.Fatalf("copy-error reply %d octets for a %d-octet request", len(reply), len(req))
		}
		return
	}
	if len(reply) > limit {
		t.Fatalf("success reply %d octets > request %d", len(reply), len(req))
	}
}

// FuzzErrorResponse: AppendErrorResponse on arbitrary input and result
// code follows HDR-03/HDR-04/VER-04: no reply under 2 octets, else the
// first 1100 octets padded to a multiple of 4, version 2, R set, octet 2
// zero, the result, and everything from octet 24 on as sent.
func FuzzErrorResponse(f *testing.F) {
	f.Fuzz(func(t *testing.T, b []byte, result uint8) {
		code := pcp.ResultCode(result)
		prefix := []byte{0xde, 0xad}
		reply := pcp.AppendErrorResponse(prefix, b, code, code.ErrorLifetime(), 7)
		if !bytes.Equal(reply[:2], prefix) {
			t.Fatal("dst prefix overwritten")
		}
		reply = reply[2:]
		if len(b) < 2 {
			if len(reply) != 0 {
				t.Fatalf("replied %x to a %d-octet packet", reply, len(b))
			}
			return
		}
		checkReplySize(t, b, reply, true)
		if reply[0] != pcp.Version || reply[1] != b[1]|0x80 || reply[2] != 0 || reply[3] != result {
			t.Fatalf("header %x for request %x", reply[:4], b[:2])
		}
		n := min(len(b), pcp.MaxMessageSize)
		if n > 24 && !bytes.Equal(reply[24:n], b[24:n]) {
			t.Fatal("octets 24+ differ from the request")
		}
		// Padding beyond the request is zero, except where a short
		// request's padding holds a header field (VER-04).
		fields := 4
		if len(reply) >= 12 {
			fields = 12
		} else if len(reply) >= 8 {
			fields = 8
		}
		for i := max(n, fields); i < len(reply); i++ {
			if reply[i] != 0 {
				t.Fatalf("non-zero padding at %d: %x", i, reply)
			}
		}
	})
}

// FuzzResponseRoundTrip: b1 → m1 → b2 → m2 → b3 for responses, m1 == m2,
// b2 == b3; a failed parse leaves the value alone; encoded responses are
// at most 1100 octets and multiples of 4.
func FuzzResponseRoundTrip(f *testing.F) {
	f.Fuzz(func(t *testing.T, b1 []byte) {
		sentinel := pcp.Response{Opcode: 77, Epoch: 5}
		m1 := sentinel
		if err := pcp.ParseResponse(b1, &m1); err != nil {
			if !responseEqual(&sentinel, &m1) {
				t.Fatalf("failed parse changed the value:\n%s", cmp.Diff(sentinel, m1, cmpOpts))
			}
			if !errors.Is(err, pcp.ErrMalformedResponse) {
				t.Fatalf("error %v does not wrap ErrMalformedResponse", err)
			}
			return
		}
		b2 := pcp.AppendResponse(nil, &m1)
		if len(b2) > pcp.MaxMessageSize || len(b2)%4 != 0 || len(b2) > len(b1) {
			t.Fatalf("re-encoded %d octets from %d", len(b2), len(b1))
		}
		var m2 pcp.Response
		if err := pcp.ParseResponse(b2, &m2); err != nil {
			t.Fatalf("re-encoded response does not decode: %v\nb1 %x\nb2 %x", err, b1, b2)
		}
		if !responseEqual(&m1, &m2) {
			t.Fatalf("m1 != m2 (-m1 +m2):\n%s", cmp.Diff(m1, m2, cmpOpts))
		}
		if b3 := pcp.AppendResponse(nil, &m2); !bytes.Equal(b2, b3) {
			t.Fatalf("b2 != b3\nb2 %x\nb3 %x", b2, b3)
		}
	})
}

// FuzzPMPRoundTrip: NAT-PMP requests b1 → m1 → b2 → m2 → b3 (m1 == m2,
// b2 == b3), no value with an error, and the replies a server builds for
// the input keep PROTOCOL.md (f): no longer than the request except the
// address reply (2 → 12), the mapping reply (12 → 16) and the
// unsupported-opcode echo of a 2-3-octet request (→ 4). Replies decode
// back (response round trip).
func FuzzPMPRoundTrip(f *testing.F) {
	f.Fuzz(func(t *testing.T, b1 []byte, result uint16, epoch uint32) {
		sentinel := pcp.PMPRequest{Opcode: 200, InternalPort: 1}
		m1 := sentinel
		err := pcp.ParsePMPRequest(b1, &m1)
		var reply []byte
		var pe *pcp.ParseError
		switch {
		case err == nil:
			b2 := pcp.AppendPMPRequest(nil, &m1)
			var m2 pcp.PMPRequest
			if err := pcp.ParsePMPRequest(b2, &m2); err != nil || m1 != m2 {
				t.Fatalf("round trip: %v, m1 %+v m2 %+v", err, m1, m2)
			}
			if b3 := pcp.AppendPMPRequest(nil, &m2); !bytes.Equal(b2, b3) {
				t.Fatalf("b2 %x != b3 %x", b2, b3)
			}
			res := pcp.PMPResultCode(result)
			if m1.Opcode == pcp.PMPOpAddress {
				reply = pcp.AppendPMPAddressResponse(nil, res, pcp.Epoch(epoch), netip.AddrFrom4([4]byte{203, 0, 113, 1}))
				if len(reply) != 12 {
					t.Fatalf("address reply %d octets", len(reply))
				}
			} else {
				reply = pcp.AppendPMPMapResponse(nil, m1.Opcode, res, pcp.Epoch(epoch), m1.InternalPort, m1.SuggestedExternalPort, m1.Lifetime)
				if len(reply) != 16 || len(b1) < 12 {
					t.Fatalf("map reply %d octets for a %d-octet request", len(reply), len(b1))
				}
			}
			var r1, r2 pcp.PMPResponse
			if err := pcp.ParsePMPResponse(reply, &r1); err != nil {
				t.Fatal(err)
			}
			var again []byte
			if r1.Opcode == pcp.PMPOpAddress {
				again = pcp.AppendPMPAddressResponse(nil, r1.Result, r1.Epoch, r1.ExternalAddr)
			} else {
				again = pcp.AppendPMPMapResponse(nil, r1.Opcode, r1.Result, r1.Epoch, r1.InternalPort, r1.ExternalPort, r1.Lifetime)
			}
			if err := pcp.ParsePMPResponse(again, &r2); err != nil || r1 != r2 || !bytes.Equal(reply, again) {
				t.Fatalf("response round trip: %v\n%x\n%x", err, reply, again)
			}
			if res != pcp.PMPSuccess && r1.Opcode == pcp.PMPOpAddress && !r1.ExternalAddr.IsUnspecified() {
				t.Fatal("error address reply carries an address (PMP-03)")
			}
		case !errors.As(err, &pe):
			t.Fatalf("error %v is not a *ParseError", err)
		case m1 != sentinel:
			t.Fatalf("failed parse changed the value: %+v", m1)
		case pe.Silent:
			return
		case pe.Result == pcp.UnsuppOpcode:
			reply = pcp.AppendPMPUnsupportedOpcode(nil, b1, pcp.Epoch(epoch))
			want := max(min(len(b1), pcp.MaxMessageSize), 4)
			if len(reply) != want || reply[1] != b1[1]|0x80 || reply[2] != 0 || reply[3] != 5 {
				t.Fatalf("unsupported-opcode echo %x for %x", reply, b1)
			}
			if len(reply) > len(b1) && len(b1) > 3 {
				t.Fatal("echo longer than the request")
			}
		case pe.Result == pcp.UnsuppVersion:
			if len(b1) < 2 || b1[0] == pcp.PMPVersion {
				t.Fatalf("UNSUPP_VERSION for %x", b1)
			}
		default:
			t.Fatalf("unexpected error %v", err)
		}
		if len(reply) > pcp.MaxMessageSize {
			t.Fatalf("reply of %d octets", len(reply))
		}
	})
}

// requestEqual and responseEqual compare without reflection: go-cmp per
// execution would slow the fuzzer tenfold. cmp.Diff explains failures.
func requestEqual(a, b *pcp.Request) bool {
	return a.Opcode == b.Opcode && a.Lifetime == b.Lifetime && a.ClientAddr == b.ClientAddr &&
		a.Map == b.Map && a.Peer == b.Peer && a.Options.Equal(b.Options)
}

func responseEqual(a, b *pcp.Response) bool {
	return a.Opcode == b.Opcode && a.Result == b.Result && a.Lifetime == b.Lifetime && a.Epoch == b.Epoch &&
		a.Map == b.Map && a.Peer == b.Peer && a.Options.Equal(b.Options)
}
