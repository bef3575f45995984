package pinhole

import (
	"strings"
	"testing"
	"time"

	"github.com/google/nftables"
)

// TestDecodeSNATRoundTrip (h/oddsnat): a SNAT map's element that is byte
// for byte the companion pcpd writes decodes to its NAPT mapping (plain);
// any other element (by hand) to an odd Pinhole (OddSNAT) whose Delete is
// of that very element of that very map, no companion and no map element
// with it, which equals no lease's pinhole and cannot be installed. A key
// too short for the map is not read (the kernel never holds one). Before,
// snatPinhole dropped every such element but the catch-all: the watch did
// not tell it, and List read no SNAT map.
func TestDecodeSNATRoundTrip(t *testing.T) {
	c4, pub := addr("10.100.0.2"), addr("198.51.100.1")
	napt := Pinhole{Protocol: 6, InternalAddr: c4, InternalPort: 1500, ExternalAddr: pub, ExternalPort: 21500}
	filtered := napt
	filtered.RemotePrefix = pfx("203.0.113.0/24")
	_, plain4, _ := snatElement(kindNAPT4, napt)
	_, plainF, _ := snatElement(kindNAPT4Filter, filtered)
	clone := func(e nftables.SetElement) nftables.SetElement {
		return nftables.SetElement{Key: append([]byte{}, e.Key...), KeyEnd: append([]byte(nil), e.KeyEnd...), Val: append([]byte{}, e.Val...)}
	}
	portRange := clone(plainF)
	portRange.Key[8], portRange.Key[9] = 0x03, 0xe8       // internal ports 1000 ..
	portRange.KeyEnd[8], portRange.KeyEnd[9] = 0x07, 0xd0 // .. 2000
	notPrefix := clone(plainF)
	notPrefix.KeyEnd[15] = 0x05 // remote range .0-.5
	noKeyEnd := clone(plainF)
	noKeyEnd.KeyEnd = nil
	toZero := clone(plain4)
	toZero.Val = make([]byte, len(toZero.Val)) // to 0.0.0.0:0
	otherPort := clone(plain4)
	otherPort.Val[4] = 0x01 // external port 256+..., a companion's shape: plain (another mapping's)
	for _, tc := range []struct {
		name  string
		i     int
		e     nftables.SetElement
		plain bool
	}{
		{"snat4 companion", snat4, plain4, true},
		{"snat4_filter companion", snat4Filter, plainF, true},
		{"snat4, another external port", snat4, otherPort, true},
		{"snat4_filter, internal port range 1000-2000", snat4Filter, portRange, false},
		{"snat4_filter, remote range not a prefix", snat4Filter, notPrefix, false},
		{"snat4_filter, no key end", snat4Filter, noKeyEnd, false},
		{"snat4, to 0.0.0.0:0", snat4, toZero, false},
		{"snat4, catch-all", snat4, nftables.SetElement{Val: plain4.Val}, false},
		{"snat4_filter, catch-all", snat4Filter, nftables.SetElement{Val: plainF.Val}, false},
	} {
		p, ok := decodeSNAT(tc.i, tc.e)
		if !ok {
			t.Errorf("%s: not read", tc.name)
			continue
		}
		if tc.plain {
			if p.Odd() {
				t.Errorf("%s: decoded odd, want plain", tc.name)
			} else if j, se, isNAPT := snatElement(kindOf(p), p); !isNAPT || j != tc.i || !sameElement(se, tc.e) {
				t.Errorf("%s: %v's companion is not the element read", tc.name, p)
			}
			continue
		}
		if !p.OddSNAT() || p == napt || p == filtered {
			t.Errorf("%s: %v (odd SNAT %v), want an odd SNAT Pinhole", tc.name, p, p.OddSNAT())
			continue
		}
		if n, ok := p.SNATCompanionOf(); ok {
			t.Errorf("%s: taken for the companion of %v", tc.name, n)
		}
		if p.CatchAll() != (len(tc.e.Key) == 0) {
			t.Errorf("%s: CatchAll %v", tc.name, p.CatchAll())
		}
		if _, _, has := snatElement(kindOf(p), p); has {
			t.Errorf("%s: a companion computed for an odd Pinhole", tc.name)
		}
		enc, err := encode(Op{Kind: Delete, Pinhole: p})
		if err != nil {
			t.Errorf("%s: encode Delete: %v", tc.name, err)
			continue
		}
		if !sameElement(enc.elem, tc.e) || !strings.HasPrefix(enc.id, snatSpecs[tc.i].name+"|") || enc.sid != "" {
			t.Errorf("%s: Delete of %x in %s (sid %q), want exactly the element read in %s", tc.name, enc.elem.Key, enc.id[:strings.Index(enc.id, "|")], enc.sid, snatSpecs[tc.i].name)
		}
		if _, err := (Op{Kind: Install, Pinhole: p, Timeout: time.Minute}).validate(); err == nil {
			t.Errorf("%s: Install of an odd SNAT Pinhole accepted", tc.name)
		}
		if _, err := (Op{Kind: Delete, Pinhole: p, Companion: true}).validate(); err == nil {
			t.Errorf("%s: a Companion Delete of an odd SNAT Pinhole accepted", tc.name)
		}
	}
	// A companion of no mapping List read (by hand, or its map element
	// deleted): odd, and SNATCompanionOf names its mapping.
	for _, tc := range []struct {
		i int
		e nftables.SetElement
		n Pinhole
	}{{snat4, plain4, napt}, {snat4Filter, plainF, filtered}} {
		p := snatOdd(tc.i, tc.e, tc.n)
		if n, ok := p.SNATCompanionOf(); !ok || n != tc.n || n.Odd() {
			t.Errorf("%s companion alone: SNATCompanionOf %v, %v; want %v", snatSpecs[tc.i].name, n, ok, tc.n)
		}
		if enc, err := encode(Op{Kind: Delete, Pinhole: p}); err != nil || !sameElement(enc.elem, tc.e) {
			t.Errorf("%s companion alone: Delete of %x, %v; want exactly the element read", snatSpecs[tc.i].name, enc.elem.Key, err)
		}
	}
	if _, ok := decodeSNAT(snat4, nftables.SetElement{Key: plain4.Key[:6], Val: plain4.Val}); ok {
		t.Error("a key too short for snat4 read")
	}
}
