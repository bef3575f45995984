package pinhole

import (
	"encoding/binary"
	"net/netip"
	"testing"

	"golang.org/x/sys/unix"
)

// TestDumpDatagram (h/flushone): what a dump's datagram tells
// (dumpDatagram): its keys, whether it ends the dump, and whether the
// dump can still be whole (elements in a datagram after the first: the
// kernel's later walks skip by a count an add or a resize makes wrong,
// so an address not seen is not known absent). Anything but NEWSETELEMs
// of the dump's sequence and a clean end fails.
func TestDumpDatagram(t *testing.T) {
	a1, a2 := netip.MustParseAddr("2001:db8::1"), netip.MustParseAddr("2001:db8::2")
	elems := func(seq uint32, as ...netip.Addr) []byte { return setElemMsg(seq, unix.NLM_F_MULTI, as...) }
	done := func(seq uint32, errno int32) []byte {
		p := binary.NativeEndian.AppendUint32(nil, uint32(errno))
		return nlMsgF(unix.NLMSG_DONE, unix.NLM_F_MULTI, seq, p)
	}
	cat := func(bs ...[]byte) []byte {
		var out []byte
		for _, b := range bs {
			out = append(out, b...)
		}
		return out
	}
	for _, tc := range []struct {
		name            string
		d               []byte
		part            int
		keys            []netip.Addr
		done, whole, ok bool
	}{
		{"first, elements", elems(7, a1, a2), 0, []netip.Addr{a1, a2}, false, true, true},
		{"first, empty and end", cat(elems(7), done(7, 0)), 0, nil, true, true, true},
		{"first, elements and end", cat(elems(7, a1), done(7, 0)), 0, []netip.Addr{a1}, true, true, true},
		{"second, empty and end", cat(elems(7), done(7, 0)), 1, nil, true, true, true},
		{"second, end alone", done(7, 0), 1, nil, true, true, true},
		{"second, elements", elems(7, a2), 1, []netip.Addr{a2}, false, false, true},
		{"second, elements and end", cat(elems(7, a2), done(7, 0)), 1, []netip.Addr{a2}, true, false, true},
		{"another sequence", elems(8, a1), 0, nil, false, false, false},
		{"end with an error", done(7, -int32(unix.EINTR)), 1, nil, false, false, false},
		{"something after the end", cat(done(7, 0), elems(7)), 1, nil, false, false, false},
		{"not multi", setElemMsg(7, 0, a1), 0, nil, false, false, false},
		{"an error", nlMsgF(unix.NLMSG_ERROR, 0, 7, make([]byte, 20)), 0, nil, false, false, false},
		{"truncated", elems(7, a1)[:40], 0, nil, false, false, false},
		{"a short key", setElemMsgKey(7, make([]byte, 4)), 0, nil, false, false, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var keys []netip.Addr
			d, w, ok := dumpDatagram(tc.d, 7, tc.part, func(k [16]byte) { keys = append(keys, netip.AddrFrom16(k)) })
			if d != tc.done || w != tc.whole || ok != tc.ok {
				t.Errorf("done %v whole %v ok %v, want %v %v %v", d, w, ok, tc.done, tc.whole, tc.ok)
			}
			if tc.ok && len(keys) != len(tc.keys) {
				t.Fatalf("keys %v, want %v", keys, tc.keys)
			}
			for i := range tc.keys {
				if keys[i] != tc.keys[i] {
					t.Errorf("keys %v, want %v", keys, tc.keys)
				}
			}
		})
	}
}

func nlMsgF(typ, flags uint16, seq uint32, payload []byte) []byte {
	l := unix.NLMSG_HDRLEN + len(payload)
	b := make([]byte, nlmsgAlign(l))
	binary.NativeEndian.PutUint32(b, uint32(l))
	binary.NativeEndian.PutUint16(b[4:], typ)
	binary.NativeEndian.PutUint16(b[6:], flags)
	binary.NativeEndian.PutUint32(b[8:], seq)
	copy(b[unix.NLMSG_HDRLEN:], payload)
	return b
}

func nlAttrB(typ uint16, v []byte) []byte {
	b := make([]byte, nlmsgAlign(unix.NLA_HDRLEN+len(v)))
	binary.NativeEndian.PutUint16(b, uint16(unix.NLA_HDRLEN+len(v)))
	binary.NativeEndian.PutUint16(b[2:], typ)
	copy(b[unix.NLA_HDRLEN:], v)
	return b
}

// setElemMsg is a NEWSETELEM of flowed6 holding as, as the kernel dumps.
func setElemMsg(seq uint32, flags uint16, as ...netip.Addr) []byte {
	var list []byte
	for _, a := range as {
		k := a.As16()
		list = append(list, nlAttrB(unix.NLA_F_NESTED|unix.NFTA_LIST_ELEM,
			nlAttrB(unix.NLA_F_NESTED|unix.NFTA_SET_ELEM_KEY, nlAttrB(unix.NFTA_DATA_VALUE, k[:])))...)
	}
	return setElemMsgList(seq, flags, list)
}

// setElemMsgKey is a NEWSETELEM of one element whose key is k.
func setElemMsgKey(seq uint32, k []byte) []byte {
	return setElemMsgList(seq, unix.NLM_F_MULTI, nlAttrB(unix.NLA_F_NESTED|unix.NFTA_LIST_ELEM,
		nlAttrB(unix.NLA_F_NESTED|unix.NFTA_SET_ELEM_KEY, nlAttrB(unix.NFTA_DATA_VALUE, k))))
}

func setElemMsgList(seq uint32, flags uint16, list []byte) []byte {
	p := []byte{unix.NFPROTO_INET, unix.NFNETLINK_V0, 0, 0}
	p = append(p, nlAttrB(unix.NFTA_SET_ELEM_LIST_TABLE, []byte("pcpd\x00"))...)
	p = append(p, nlAttrB(unix.NFTA_SET_ELEM_LIST_SET, []byte("flowed6\x00"))...)
	p = append(p, nlAttrB(unix.NLA_F_NESTED|unix.NFTA_SET_ELEM_LIST_ELEMENTS, list)...)
	return nlMsgF(unix.NFNL_SUBSYS_NFTABLES<<8|unix.NFT_MSG_NEWSETELEM, flags, seq, p)
}

// FuzzDumpDatagram: no datagram makes dumpDatagram panic (the kernel's
// answers only, pid 0, but read by hand), nor gives a key from fewer
// bytes than a header.
func FuzzDumpDatagram(f *testing.F) {
	a := netip.MustParseAddr("2001:db8::1")
	f.Add(setElemMsg(7, unix.NLM_F_MULTI, a), 0)
	f.Add(append(setElemMsg(7, unix.NLM_F_MULTI), nlMsgF(unix.NLMSG_DONE, unix.NLM_F_MULTI, 7, make([]byte, 4))...), 1)
	f.Add(setElemMsgKey(7, make([]byte, 20)), 0)
	f.Fuzz(func(t *testing.T, d []byte, part int) {
		keys := 0
		_, _, ok := dumpDatagram(d, 7, part, func([16]byte) { keys++ })
		if !ok && keys > 0 && len(d) < unix.NLMSG_HDRLEN {
			t.Fatalf("%d keys from a datagram shorter than a header", keys)
		}
	})
}
