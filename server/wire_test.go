package server

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"strings"
	"testing"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/policy"
)

func unhex(t *testing.T, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(strings.ReplaceAll(s, " ", ""))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

const (
	clientA6 = "20010db8000a00000000000000000010" // addrA
	clientB6 = "20010db8000b00000000000000000010"
	clientA4 = "00000000000000000000ffff0a000002" // v4A
	nonce    = "0102030405060708090a0b0c"
	// MAP TCP 443 suggest 80, 3600 s, no suggested address.
	mapBody = nonce + "06000000 01bb 0050 00000000000000000000000000000000"
)

func mapHex(client, opts string) string { return "0201 0000 00000e10 " + client + mapBody + opts }

// TestWireExamples runs PROTOCOL.md's wire examples through the whole
// engine (codec wiring, dispatch, reply building), one subtest per ID.
func TestWireExamples(t *testing.T) {
	h := newHarness(t)
	// result sends hex from src and returns the reply.
	send := func(t *testing.T, v4 bool, s string) []byte {
		src := addrA
		if v4 {
			src = v4A
		}
		return h.raw(src, unhex(t, s))
	}
	code := func(t *testing.T, out []byte, want pcp.ResultCode) {
		t.Helper()
		if len(out) < 4 || out[0] != 2 || out[3] != byte(want) {
			t.Fatalf("reply % x, want result %v", out, want)
		}
		if lt := binary.BigEndian.Uint32(out[4:8]); len(out) >= 8 && want != pcp.Success && lt != uint32(want.ErrorLifetime().Seconds()) {
			t.Fatalf("HDR-07: lifetime %d for %v", lt, want)
		}
	}
	t.Run("PKT-04", func(t *testing.T) {
		req := append(unhex(t, mapHex(clientA6, "")), make([]byte, 1104-60)...)
		out := h.raw(addrA, req)
		code(t, out, pcp.MalformedRequest)
		if len(out) != 1100 {
			t.Fatalf("%d octets", len(out))
		}
	})
	t.Run("PKT-05", func(t *testing.T) {
		out := h.raw(addrA, append(unhex(t, mapHex(clientA6, "")), 0xff))
		code(t, out, pcp.MalformedRequest)
		if len(out) != 64 || !bytes.Equal(out[61:], []byte{0, 0, 0}) {
			t.Fatalf("% x", out)
		}
	})
	t.Run("PKT-06", func(t *testing.T) {
		code(t, h.raw(addrA, unhex(t, mapHex(clientA6, ""))[:56]), pcp.MalformedRequest)
	})
	t.Run("PKT-07", func(t *testing.T) {
		out := send(t, false, "0205 0000 00000000 "+clientA6+"deadbeef")
		code(t, out, pcp.UnsuppOpcode)
		if out[1] != 0x85 || !bytes.Equal(out[24:], unhex(t, "deadbeef")) {
			t.Fatalf("% x", out)
		}
	})
	t.Run("PKT-09", func(t *testing.T) {
		code(t, h.raw(addrA, append([]byte{3}, make([]byte, 22)...)), pcp.UnsuppVersion)
		code(t, h.raw(addrA, append(unhex(t, "0200 0000 00000000 "+clientB6), 0)), pcp.MalformedRequest)
		code(t, send(t, false, mapHex(clientB6, "04000004 00000000")), pcp.AddressMismatch)
	})
	t.Run("VER-01", func(t *testing.T) {
		if out := send(t, true, "0000"); len(out) != 12 || out[1] != 0x80 {
			t.Fatalf("% x", out)
		}
	})
	t.Run("VER-03", func(t *testing.T) {
		out := send(t, false, "0301 0000 00000000 "+clientA6)
		if !bytes.HasPrefix(out, unhex(t, "0281 0001 00000708")) {
			t.Fatalf("% x", out)
		}
	})
	t.Run("VER-04", func(t *testing.T) {
		if out := send(t, false, "0100"); !bytes.Equal(out, unhex(t, "02800001")) {
			t.Fatalf("% x", out)
		}
	})
	t.Run("VER-05", func(t *testing.T) {
		out := send(t, false, "0301 0000 00000000 "+clientA6)
		if !bytes.Equal(out[12:24], unhex(t, clientA6)[4:16]) {
			t.Fatalf("octets 12-23 not copied: % x", out)
		}
	})
	t.Run("HDR-01", func(t *testing.T) {
		out := send(t, false, "0200 ffff 00000000 "+clientA6)
		if out[2] != 0 || out[1] != 0x80 {
			t.Fatalf("% x", out)
		}
	})
	t.Run("HDR-03/HDR-04", func(t *testing.T) {
		req := unhex(t, mapHex(clientA6, ""))
		req[36] = 132 // SCTP: UNSUPP_PROTOCOL, a parsed request
		out := h.raw(addrA, req)
		code(t, out, pcp.UnsuppProtocol)
		if !bytes.Equal(out[24:], req[24:]) || !bytes.Equal(out[12:24], make([]byte, 12)) {
			t.Fatalf("% x", out)
		}
		short := unhex(t, mapHex(clientA6, ""))[:56]
		if out := h.raw(addrA, short); !bytes.Equal(out[12:24], short[12:24]) {
			t.Fatalf("unparsed: octets 12-23 not copied: % x", out)
		}
	})
	t.Run("HDR-05/OPT-04", func(t *testing.T) {
		filter := "03000014 0030 0000 20010db8009900000000000000000000"
		out := send(t, false, mapHex(clientA6, "c8000003 aabbcc00 "+filter))
		code(t, out, pcp.Success)
		if len(out) != 84 || !bytes.Equal(out[60:], unhex(t, filter)) {
			t.Fatalf("%d octets: % x", len(out), out)
		}
		send(t, false, "0201 0000 00000000 "+clientA6+mapBody) // delete again
	})
	t.Run("ADDR-02", func(t *testing.T) {
		code(t, send(t, true, "0200 0000 00000000 000000000000000000000000 0a000002"), pcp.AddressMismatch)
		code(t, send(t, true, "0200 0000 00000000 "+clientA4), pcp.Success)
	})
	t.Run("OPT-01", func(t *testing.T) {
		out := send(t, false, mapHex(clientA6, "02000000 03000014 0030 0000 20010db8009900000000000000000000"))
		code(t, out, pcp.Success)
		send(t, false, "0201 0000 00000000 "+clientA6+mapBody)
	})
	t.Run("OPT-02", func(t *testing.T) {
		code(t, send(t, false, mapHex(clientA6, "03000040 "+strings.Repeat("00", 20))), pcp.MalformedOption)
	})
	t.Run("OPT-03", func(t *testing.T) {
		req := mapHex(clientA6, "04000004 00000000")
		out := send(t, false, req)
		code(t, out, pcp.UnsuppOption)
		if !bytes.Equal(out[24:], unhex(t, req)[24:]) {
			t.Fatal("not a full copy")
		}
	})
	t.Run("OPT-05", func(t *testing.T) {
		code(t, send(t, false, mapHex(clientA6, "01000004 00000000")), pcp.MalformedOption)
		code(t, send(t, false, mapHex(clientA6, "02000000 02000000")), pcp.MalformedOption)
	})
	t.Run("OPT-06", func(t *testing.T) {
		bad := "03000014 00c8 0000 20010db8009900000000000000000000" // prefix length 200
		code(t, send(t, false, mapHex(clientA6, "04000004 00000000 "+bad)), pcp.UnsuppOption)
		code(t, send(t, false, mapHex(clientA6, bad+" 04000004 00000000")), pcp.MalformedOption)
	})
	t.Run("OPT-07", func(t *testing.T) {
		code(t, send(t, false, "0200 0000 00000000 "+clientA6+"03000014 0030 0000 20010db8009900000000000000000000"), pcp.MalformedOption)
	})
	t.Run("OPT-10", func(t *testing.T) {
		out := send(t, true, "0201 0000 00000e10 "+clientA4+nonce+"11000000 1388 1388 00000000000000000000ffff00000000 8200000500101388 01000000")
		code(t, out, pcp.Success)
		if len(out) != 60 {
			t.Fatalf("PORT_SET echoed though ignored: % x", out)
		}
	})
	if n := len(h.fw.Holes()); n != 1 { // only OPT-10's IPv4 mapping is left
		t.Fatalf("%d pinholes left: %v", n, h.fw.Holes())
	}
}

// TestOPT08Disabled: THIRD_PARTY switched off is UNSUPP_OPTION even for a
// well-formed option.
func TestOPT08Disabled(t *testing.T) {
	h := newHarness(t, func(_ *Config, p *policy.Config) { p.ThirdParty = policy.ThirdPartyOff })
	out := h.raw(addrA, unhex(t, mapHex(clientA6, "01000010 20010db8000a00000000000000000011")))
	if len(out) < 4 || out[3] != byte(pcp.UnsuppOption) {
		t.Fatalf("% x", out)
	}
}
