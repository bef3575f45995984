package pinhole

import (
	"encoding/binary"
	"testing"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// FuzzDecodeRuleMsgs (review h/revl9, issue 9): pcpd's own decoder of the
// kernel's NEWRULE messages (decodeRuleMsgs, for a chain the library
// cannot parse) never panics on any bytes: a whole message's, one
// expression's NFTA_LIST_ELEM, a ct expression's key, register and
// direction attribute of any length. What it decodes the walk reads
// without a panic, and a ct load it reads back is the one encoded: a
// "ct original proto-dst" (key 12, direction 0) before "cmp eq 8080" and
// a DNAT reserves TCP 8080 and nothing else; any other key or direction
// reserves nothing (a catch-all, not sure, at most). FuzzForeignDecode
// builds rules of expr values and never reached this decoder.
func FuzzDecodeRuleMsgs(f *testing.F) {
	f.Add([]byte{2, 0, 0, 0}, []byte{}, uint32(unix.NFT_CT_PROTO_DST), []byte{0})
	f.Add([]byte{2, 0, 0, 0, 8, 0, 3, 0}, []byte{8, 0, 1, 0, 'c', 't', 0, 0}, uint32(unix.NFT_CT_PROTO_DST), []byte{1})
	f.Add([]byte{}, []byte{12, 0, 1, 0, 'o', 's', 'f', 0, 4, 0, 2, 0}, uint32(unix.NFT_CT_DST_IP), []byte{0, 0, 0, 0})
	f.Add([]byte{2, 0, 0, 0, 4, 0, 4, 0}, []byte{}, uint32(unix.NFT_CT_PROTOCOL), []byte{})
	f.Fuzz(func(t *testing.T, msg, elem []byte, key uint32, dir []byte) {
		// Any bytes as a message.
		_, _ = decodeRuleMsgs(nftables.TableFamilyIPv4, []netlink.Message{{Data: msg}})
		// A rule: tcp, ct KEY [DIR], cmp eq 8080, the fuzzed element, dnat.
		ctAttrs := []netlink.Attribute{
			{Type: unix.NFTA_CT_KEY, Data: binary.BigEndian.AppendUint32(nil, key)},
			{Type: unix.NFTA_CT_DREG, Data: binary.BigEndian.AppendUint32(nil, 1)},
		}
		if len(dir) > 0 {
			ctAttrs = append(ctAttrs, netlink.Attribute{Type: unix.NFTA_CT_DIRECTION, Data: dir})
		}
		ctData, err := netlink.MarshalAttributes(ctAttrs)
		if err != nil {
			t.Skip()
		}
		ct, err := netlink.MarshalAttributes([]netlink.Attribute{
			{Type: unix.NFTA_EXPR_NAME, Data: []byte("ct\x00")},
			{Type: unix.NLA_F_NESTED | unix.NFTA_EXPR_DATA, Data: ctData},
		})
		if err != nil {
			t.Skip()
		}
		pre := ruleMsg(t, 1, l4(unix.IPPROTO_TCP))
		post := ruleMsg(t, 1, cat([]expr.Any{&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: be16(8080)}}, dnat4()))
		elems := append(elemsOf(t, pre), ct)
		if len(elem) > 0 {
			elems = append(elems, elem)
		}
		m := ruleMsg(t, 1, nil, append(elems, elemsOf(t, post)...)...)
		rs, err := decodeRuleMsgs(nftables.TableFamilyIPv4, []netlink.Message{m})
		if err != nil {
			return // the chain is reported undecoded
		}
		var got *expr.Ct
		for _, e := range rs[0].Exprs {
			if c, ok := e.(*expr.Ct); ok && got == nil {
				got = c
			}
		}
		wantDir := uint32(0)
		if len(dir) > 0 {
			wantDir = uint32(dir[0])
		}
		if got == nil || uint32(got.Key) != key || got.Register != 1 || got.SourceRegister || got.Direction != wantDir {
			t.Fatalf("ct decoded as %+v, want key %d register 1 direction %d", got, key, wantDir)
		}
		pc := baseChain(fAdmin, "pre", fNAT, nftables.ChainHookPrerouting, *nftables.ChainPriorityNATDest)
		src := &fakeRules{chainList: []*nftables.Chain{pc}, rulesOf: map[string][]*nftables.Rule{"admin/pre": rs}}
		fd, err := readForeign(src, func(*nftables.Table, string) bool { return false }, fExt, 1024, 65535)
		if err != nil {
			t.Fatal(err)
		}
		if len(elem) > 0 {
			return // the fuzzed expression may load or compare anything
		}
		// The destination port of a new connection: the original
		// tuple's, or the reply tuple's source (its inverse), as
		// TestForeignCtTuple and the real kernel's TestForeignDNATCtKernel.
		want := ""
		if key == unix.NFT_CT_PROTO_DST && wantDir == 0 || key == unix.NFT_CT_PROTO_SRC && wantDir == 1 {
			want = "8080"
		}
		if got := fd.TCP.String(); got != want || fd.UDP.String() != "" {
			t.Fatalf("ct key %d direction %d: TCP %q UDP %q reserved, want TCP %q", key, wantDir, got, fd.UDP.String(), want)
		}
	})
}
