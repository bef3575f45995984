package pinhole

import (
	"errors"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/nftables"
)

// TestOddElementRoundTrip (h/redir6): an element pcpd never writes in
// its set (by hand), even one whose fields no Pinhole has, decodes to an
// odd Pinhole that encodes back to that very element of that very set,
// so that its Delete removes it (and nothing else: no SNAT companion);
// it is no lease's pinhole (not equal to the plain one it reads like)
// and cannot be installed. Before, a redir6_filter element from a port to
// itself or from every port decoded as a pin6_filter pinhole (kindOf) and
// its Delete went there: 'redir6_filter: decoded to pin6_filter'. Every
// shape pcpd writes still decodes to a plain Pinhole (TestNormalize).
func TestOddElementRoundTrip(t *testing.T) {
	c := addr("2001:db8:1:2::10")
	from := pfx("2001:db8:ffff::/48")
	filtered := Pinhole{Protocol: 6, InternalAddr: c, InternalPort: 443, ExternalAddr: c, ExternalPort: 443, RemotePrefix: from}
	plain := Pinhole{Protocol: 6, InternalAddr: c, InternalPort: 443, ExternalAddr: c, ExternalPort: 443}
	allPorts := element(kindRedirect6Filter, filtered)
	allPorts.Key = append([]byte{}, allPorts.Key...)
	allPorts.KeyEnd = append([]byte{}, allPorts.KeyEnd...)
	allPorts.Key[20], allPorts.Key[21] = 0, 0             // external ports 0 ..
	allPorts.KeyEnd[20], allPorts.KeyEnd[21] = 0xff, 0xff // .. 65535
	portRange := element(kindFilter, filtered)
	portRange.KeyEnd = append([]byte{}, portRange.KeyEnd...)
	portRange.KeyEnd[20], portRange.KeyEnd[21] = 0x01, 0xbc // ports 443-444
	notPrefix := element(kindFilter, filtered)
	notPrefix.KeyEnd = append([]byte{}, notPrefix.KeyEnd...)
	notPrefix.KeyEnd[24+15] = 0x07 // remote range ends at ...::7
	elsewhere := element(kindRedirect6, Pinhole{Protocol: 6, InternalAddr: c, InternalPort: 22, ExternalAddr: c, ExternalPort: 8080})
	elsewhere.Val = append([]byte{}, elsewhere.Val...)
	elsewhere.Val[15] = 0x11 // DNAT to another address
	napt := Pinhole{Protocol: 6, InternalAddr: addr("10.100.0.2"), InternalPort: 80, ExternalAddr: addr("198.51.100.1"), ExternalPort: 8080, RemotePrefix: pfx("198.51.100.0/24")}
	naptZero := element(kindNAPT4Filter, napt)
	naptZero.KeyEnd = append([]byte{}, naptZero.KeyEnd...)
	naptZero.KeyEnd[16], naptZero.KeyEnd[17] = 0, 0 // remote port 0-0, not "any"
	zeroRange := element(kindFilter, filtered)
	zeroRange.Key = append([]byte{}, zeroRange.Key...)
	zeroRange.KeyEnd = append([]byte{}, zeroRange.KeyEnd...)
	zeroRange.Key[20], zeroRange.Key[21], zeroRange.KeyEnd[20], zeroRange.KeyEnd[21] = 0, 0, 0, 0 // port 0-0, not "any"
	for _, tc := range []struct {
		name  string
		k     kind
		e     nftables.SetElement
		looks Pinhole // the plain Pinhole it reads like
	}{
		{"redir6_filter, a port to itself", kindRedirect6Filter, element(kindRedirect6Filter, filtered), filtered},
		{"redir6_filter, every port to 443", kindRedirect6Filter, allPorts, filtered},
		{"redir6, a port to itself", kindRedirect6, element(kindRedirect6, plain), plain},
		{"pin6_filter, port range 0-0", kindFilter, zeroRange, Pinhole{Protocol: 6, InternalAddr: c, ExternalAddr: c, RemotePrefix: from}},
		// No Pinhole has these: read as far as they go (before: a decode
		// error; List failed, the watch told nothing).
		{"pin6_filter, port range 443-444", kindFilter, portRange, filtered},
		{"pin6_filter, remote range not a prefix", kindFilter, notPrefix, filtered},
		{"redir6 to another address", kindRedirect6, elsewhere, Pinhole{}},
		{"napt4_filter, remote port 0-0", kindNAPT4Filter, naptZero, napt},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, err := decode(tc.k, tc.e)
			if err != nil {
				t.Fatalf("decode: %v", err)
			}
			if k := kindOf(p); k != tc.k || !p.Odd() {
				t.Fatalf("%s: decoded to %s (odd %v)", specs[tc.k].name, specs[k].name, p.Odd())
			}
			if p == tc.looks {
				t.Errorf("equal to the plain pinhole %v: a lease holding that one would hold it", tc.looks)
			}
			if c, err := p.Canonical(); err == nil && c != p {
				t.Errorf("Canonical: %v; want it unchanged", c)
			}
			enc, err := encode(Op{Kind: Delete, Pinhole: p})
			if err != nil {
				t.Fatalf("encode Delete: %v", err)
			}
			if enc.sid != "" {
				t.Errorf("Delete takes a SNAT companion with it (%q): not the element's", enc.sid)
			}
			if enc.k != tc.k || !sameElement(enc.elem, tc.e) {
				t.Errorf("Delete goes to %s %x . %x : %x, want %s %x . %x : %x", specs[enc.k].name, enc.elem.Key, enc.elem.KeyEnd, enc.elem.Val,
					specs[tc.k].name, tc.e.Key, tc.e.KeyEnd, tc.e.Val)
			}
			again, err := decode(tc.k, enc.elem)
			if err != nil || again != p {
				t.Errorf("decoded again: %v, %v; want %v", again, err, p)
			}
			for _, kind := range []OpKind{Install, Refresh} {
				if _, err := encode(Op{Kind: kind, Pinhole: p, Timeout: time.Second}); !errors.Is(err, ErrInvalid) {
					t.Errorf("%s of an odd pinhole: %v, want ErrInvalid", kind, err)
				}
			}
		})
	}
}

// TestApplyCompanionOnlyDelete (h/redir6): a Delete marked Companion
// sends its NAPT mapping's SNAT companion alone (guard add, delete), the
// map element untouched; Apply refuses it on anything but a NAPT
// mapping's Delete.
func TestApplyCompanionOnlyDelete(t *testing.T) {
	f := &fakeKernel{}
	b := fakeBackend(t, f)
	napt := Pinhole{Protocol: 6, InternalAddr: addr("10.100.0.2"), InternalPort: 80, ExternalAddr: addr("198.51.100.1"), ExternalPort: 8080}
	if err := b.Apply([]Op{{Kind: Delete, Pinhole: napt, Companion: true}}); err != nil {
		t.Fatalf("Apply: %v", err)
	}
	snatKey := []byte{10, 100, 0, 2, 6, 0, 0, 0, 0, 80, 0, 0}
	snatData := []byte{198, 51, 100, 1, 0x1f, 0x90, 0, 0}
	want := [][]sentMsg{{
		{Op: "begin"},
		{Op: "newsetelem", Set: "snat4", Elems: []sentElem{{Key: snatKey, Data: snatData, TimeoutMs: 1000}}},
		{Op: "delsetelem", Set: "snat4", Elems: []sentElem{{Key: snatKey, Data: snatData}}},
		{Op: "end"},
	}}
	if diff := cmp.Diff(want, f.batches); diff != "" {
		t.Errorf("batches (-want +got):\n%s", diff)
	}
	for _, op := range []Op{
		{Kind: Install, Pinhole: napt, Timeout: time.Second, Companion: true},
		{Kind: Delete, Pinhole: Pinhole{Protocol: 6, InternalAddr: tAddr, InternalPort: 443}, Companion: true},
	} {
		if err := b.Apply([]Op{op}); !errors.Is(err, ErrInvalid) {
			t.Errorf("Apply(%+v): %v, want ErrInvalid", op, err)
		}
	}
}
