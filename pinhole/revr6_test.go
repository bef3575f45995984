package pinhole

import (
	"testing"

	"github.com/google/nftables"
)

// TestDecodeNoKeyEnd (review h/revr6): the kernel takes an element of a
// concatenated-range set without NFTA_SET_ELEM_KEY_END (any netlink
// client may send one; nft always sends both): it holds the single
// key, matches exactly it, and dumps it without a key end. Such an
// element (by hand) decodes to an odd Pinhole whose Delete is exactly
// it, in every interval set. Before, decode failed ('short element'):
// List failed (no audit fixed anything while it stayed) and the watch
// did not tell it, so it stayed, a pin6_addr_filter one admitting one
// remote to every port and protocol of the address
// (TestE2EWatchUndoesNoKeyEnd, TestE2EAuditUndoesNoKeyEnd).
func TestDecodeNoKeyEnd(t *testing.T) {
	c, r := addr("2001:db8:1:2::10"), pfx("2001:db8:ffff::7/128")
	v4 := Pinhole{Protocol: 6, InternalAddr: addr("10.100.0.2"), InternalPort: 80, ExternalAddr: addr("198.51.100.1"), ExternalPort: 8080, RemotePrefix: pfx("203.0.113.9/32"), RemotePort: 5555}
	for _, tc := range []struct {
		k kind
		p Pinhole
	}{
		{kindFilter, Pinhole{Protocol: 6, InternalAddr: c, InternalPort: 443, RemotePrefix: r, RemotePort: 5555}},
		{kindAddrFilter, Pinhole{InternalAddr: c, RemotePrefix: r}},
		{kindRedirect6Filter, Pinhole{Protocol: 6, InternalAddr: c, InternalPort: 22, ExternalPort: 8022, RemotePrefix: r, RemotePort: 5555}},
		{kindNAPT4Filter, v4},
	} {
		n, err := tc.p.normalize()
		if err != nil {
			t.Fatal(err)
		}
		e := element(tc.k, n)
		e = nftables.SetElement{Key: e.Key, Val: e.Val} // no key end: as the kernel dumps it
		p, err := decode(tc.k, e)
		if err != nil {
			t.Errorf("%s without a key end: decode: %v", specs[tc.k].name, err)
			continue
		}
		if !p.Odd() || p == n {
			t.Errorf("%s without a key end: decoded as %v (odd %v); want an odd Pinhole, none of a lease's", specs[tc.k].name, p, p.Odd())
		}
		enc, err := encode(Op{Kind: Delete, Pinhole: p})
		if err != nil || enc.k != tc.k || !sameElement(enc.elem, e) || enc.sid != "" {
			t.Errorf("%s without a key end: Delete goes to %s %x . %x (companion %q), %v; want exactly the element", specs[tc.k].name, specs[enc.k].name, enc.elem.Key, enc.elem.KeyEnd, enc.sid, err)
		}
	}
}
