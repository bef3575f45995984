package pcp

import (
	"errors"
	"strings"
	"testing"
)

// Unknown options are kept so a server can decide about them (RFC 6887
// §7.3): optional ones are ignored by the parser but visible in
// Options.Unknown (OPT-04); mandatory ones fail with UNSUPP_OPTION
// (OPT-03) unless the caller asks to decide itself.
func TestUnknownOptionsKept_6887_7_3(t *testing.T) {
	const hdr = `02 01 0000 00000e10 20010db8000100000000000000000010 // MAP, 3600 s`
	const optUnknownOptional = `
c8 00 0003 aabbcc 00              // option 200 (optional), length 3, 1 pad`
	const optUnknownMandatory = `
7f 00 0004 01020304               // option 127 (mandatory), length 4`
	src := addr("2001:db8:1::10")

	t.Run("OPT-04 optional kept, parse succeeds", func(t *testing.T) {
		var r Request
		if err := ParseRequest(unhex(t, hdr+dataMap443+optUnknownOptional), src, &r); err != nil {
			t.Fatal(err)
		}
		if len(r.Options.Unknown) != 1 || r.Options.Unknown[0].Code != 200 || string(r.Options.Unknown[0].Data) != "\xaa\xbb\xcc" {
			t.Fatalf("Unknown = %+v, want option 200 with aabbcc", r.Options.Unknown)
		}
		// Never echoed: the reply carries only processed options.
		resp := Response{Opcode: OpMap, Map: r.Map, Options: r.Options}
		if got := len(AppendResponse(nil, &resp)); got != MapSize {
			t.Fatalf("reply length %d, want %d (unknown option must not be echoed)", got, MapSize)
		}
	})
	t.Run("OPT-03 mandatory rejected by default", func(t *testing.T) {
		var r Request
		err := ParseRequest(unhex(t, hdr+dataMap443+optUnknownMandatory), src, &r)
		var pe *ParseError
		if !errors.As(err, &pe) || pe.Result != UnsuppOption {
			t.Fatalf("err = %v, want UNSUPP_OPTION", err)
		}
	})
	t.Run("OPT-03 mandatory kept for the caller", func(t *testing.T) {
		var r Request
		p := Parser{KeepUnknownMandatory: true}
		if err := p.ParseRequest(unhex(t, hdr+dataMap443+optUnknownOptional+optUnknownMandatory), src, &r); err != nil {
			t.Fatal(err)
		}
		if len(r.Options.Unknown) != 2 || r.Options.Unknown[1].Code != 127 || !r.Options.Unknown[1].Code.Mandatory() {
			t.Fatalf("Unknown = %+v, want [200 127]", r.Options.Unknown)
		}
	})
	t.Run("more unknown options than can be kept still fails", func(t *testing.T) {
		var r Request
		p := Parser{KeepUnknownMandatory: true}
		pkt := hdr + dataMap443 + strings.Repeat(optUnknownOptional, MaxUnknown) + optUnknownMandatory
		err := p.ParseRequest(unhex(t, pkt), src, &r)
		var pe *ParseError
		if !errors.As(err, &pe) || pe.Result != UnsuppOption {
			t.Fatalf("err = %v, want UNSUPP_OPTION for the mandatory option that cannot be kept", err)
		}
	})
	t.Run("allocation free", func(t *testing.T) {
		pkt := unhex(t, hdr+dataMap443+optUnknownOptional)
		var r Request
		if n := testing.AllocsPerRun(100, func() { ParseRequest(pkt, src, &r) }); n != 0 {
			t.Fatalf("%v allocations per parse", n)
		}
	})
}
