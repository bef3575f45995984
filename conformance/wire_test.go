package conformance

import (
	"bytes"
	"encoding/hex"
	"net/netip"
	"strings"
	"testing"

	"github.com/pcpd/pcpd/pcp"
)

func unhex(t *testing.T, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(strings.NewReplacer(" ", "", "\n", "", "\t", "").Replace(s))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// The suite's own encoder against PROTOCOL.md §2's worked example, so the
// oracle does not depend on the codec it judges.
func TestRequestBytesProtocolExample(t *testing.T) {
	r := request{Op: opMap, Lifetime: 3600, Client: netip.MustParseAddr("2001:db8:1::10"),
		Nonce: [12]byte{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}, Proto: protoTCP, IntPort: 443, ExtPort: 80}
	want := unhex(t, `02 01 0000 00000e10 20010db8000100000000000000000010
		0102030405060708090a0b0c 06 000000 01bb 0050 00000000000000000000000000000000`)
	if got := r.bytes(); !bytes.Equal(got, want) {
		t.Errorf("MAP request\ngot  %x\nwant %x", got, want)
	}
	// IPv4 client: address fields IPv4-mapped, suggested address ::ffff:0.0.0.0.
	r4 := request{Op: opMap, Lifetime: 1, Client: netip.MustParseAddr("10.0.0.5"), Proto: protoUDP}
	b := r4.bytes()
	if !bytes.Equal(b[8:24], unhex(t, "00000000000000000000ffff0a000005")) || !bytes.Equal(b[44:60], unhex(t, "00000000000000000000ffff00000000")) {
		t.Errorf("IPv4 MAP request address fields: %x", b)
	}
}

func TestOptionPadding(t *testing.T) {
	for _, tt := range []struct {
		data []byte
		want string
	}{
		{nil, "80000000"},
		{[]byte{0xaa}, "80000001 aa000000"},
		{[]byte{1, 2, 3, 4}, "80000004 01020304"},
		{[]byte{1, 2, 3, 4, 5}, "80000005 01020304 05000000"},
	} {
		if got := option(0x80, tt.data); !bytes.Equal(got, unhex(t, tt.want)) {
			t.Errorf("option(%x) = %x, want %s", tt.data, got, tt.want)
		}
	}
	if got := filterPrefix(netip.MustParsePrefix("192.0.2.0/24"), 80); !bytes.Equal(got, unhex(t, "03000014 00780050 00000000000000000000ffffc0000200")) {
		t.Errorf("IPv4 FILTER /24 = %x (want wire prefix length 120)", got)
	}
}

func TestParseResponse(t *testing.T) {
	b := unhex(t, `02 81 00 00 00000e10 0000002a 000000000000000000000000
		0102030405060708090a0b0c 06 000000 01bb 0050 20010db8000100000000000000000010
		03000014 00780000 00000000000000000000ffffc0000200`)
	r, err := parseResponse(b)
	if err != nil {
		t.Fatal(err)
	}
	if r.Result != pcp.Success || r.Lifetime != 3600 || r.Epoch != 42 || r.IntPort != 443 || r.ExtPort != 80 ||
		r.ExtAddr != netip.MustParseAddr("2001:db8:1::10") || !bytes.Equal(r.optCodes(), []byte{optFilter}) || r.OptsErr != nil {
		t.Errorf("parsed %s, options %v, %v", r, r.optCodes(), r.OptsErr)
	}
	if _, err := parseResponse([]byte{2, 0x80}); err == nil {
		t.Error("2-octet reply parsed")
	}
	bad := append(b[:60:60], 0x80, 0, 0, 9, 1, 2, 3, 4)
	if r, _ := parseResponse(bad); r.OptsErr == nil {
		t.Error("option running past the end not reported")
	}
}

// Every check names a PROTOCOL.md ID and an RFC section, and the IDs
// come from the groups PROTOCOL.md defines.
func TestChecksNamed(t *testing.T) {
	groups := "PKT VER HDR ADDR OPT MAP LIFE PF FLT TP PEER ANN UPD EPO SEC PMP"
	for _, c := range Checks() {
		g, _, ok := strings.Cut(c.ID, "-")
		if !ok || !strings.Contains(groups, g) || c.Section == "" || c.Name == "" || c.Level == "" || c.Run == nil {
			t.Errorf("check %+v is not fully named", c)
		}
	}
}

func TestMatches(t *testing.T) {
	req := (request{Op: opMap, Client: netip.MustParseAddr("::1"), Nonce: [12]byte{1}}).bytes()
	same := append([]byte{}, req...)
	same[1] |= 0x80
	other := append([]byte{}, same...)
	other[24] ^= 0xff
	if !matches(req, same) || matches(req, other) {
		t.Error("nonce matching broken")
	}
}
