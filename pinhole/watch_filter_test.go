package pinhole

import (
	"encoding/binary"
	"testing"

	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"
)

// TestWatchFilterByteOrder runs the watcher's socket filter in x/net/bpf's
// virtual machine over notification skbs laid out in either host byte
// order (netlink headers are in the host's order): what it drops and what
// it passes must not depend on the order. Before the filter took the
// host's order (review h/revnftmon left it little-endian only), every
// big-endian row failed: on such a host the subsystem byte read was the
// type's, so every notification was passed and nothing was dropped. A
// single element added passes iff its table is pcpd's (h/fwadd: before,
// every one was dropped, the "add to pcpd's table" rows failed).
func TestWatchFilterByteOrder(t *testing.T) {
	const own, other = 0x1234abcd, 0x00c0ffee
	nftType := func(msg uint16) uint16 { return unix.NFNL_SUBSYS_NFTABLES<<8 | msg }
	msg := func(order binary.ByteOrder, typ uint16, pid uint32, payload int) []byte {
		m := make([]byte, unix.NLMSG_HDRLEN+payload)
		order.PutUint32(m[0:], uint32(len(m)))
		order.PutUint16(m[4:], typ)
		order.PutUint32(m[12:], pid)
		return m
	}
	// elemAdd is one element added to table: the table's name first.
	elemAdd := func(o binary.ByteOrder, table string, pid uint32) []byte {
		name := append([]byte(table), 0)
		for len(name)%4 != 0 {
			name = append(name, 0)
		}
		m := msg(o, nftType(unix.NFT_MSG_NEWSETELEM), pid, 4+4+len(name)+200)
		a := m[unix.NLMSG_HDRLEN+4:]
		o.PutUint16(a[0:], uint16(4+len(table)+1))
		o.PutUint16(a[2:], unix.NFTA_SET_ELEM_LIST_TABLE)
		copy(a[4:], name)
		return m
	}
	cases := []struct {
		name string
		skb  func(binary.ByteOrder) []byte
		pass bool
	}{
		{"someone's element delete", func(o binary.ByteOrder) []byte { return msg(o, nftType(unix.NFT_MSG_DELSETELEM), other, 300) }, true},
		{"someone's table delete", func(o binary.ByteOrder) []byte { return msg(o, nftType(unix.NFT_MSG_DELTABLE), other, 40) }, true},
		{"pcpd's own element delete", func(o binary.ByteOrder) []byte { return msg(o, nftType(unix.NFT_MSG_DELSETELEM), own, 300) }, false},
		{"the kernel's (port 0)", func(o binary.ByteOrder) []byte { return msg(o, nftType(unix.NFT_MSG_DELSETELEM), 0, 300) }, false},
		{"a generation message", func(o binary.ByteOrder) []byte { return msg(o, nftType(unix.NFT_MSG_NEWGEN), other, 20) }, false},
		{"someone's single element add", func(o binary.ByteOrder) []byte { return msg(o, nftType(unix.NFT_MSG_NEWSETELEM), other, 300) }, false},
		{"someone's element add then delete in one skb", func(o binary.ByteOrder) []byte {
			return append(msg(o, nftType(unix.NFT_MSG_NEWSETELEM), other, 300), msg(o, nftType(unix.NFT_MSG_DELSETELEM), other, 300)...)
		}, true},
		{"someone's single element add to pcpd's table", func(o binary.ByteOrder) []byte { return elemAdd(o, "pcpd", other) }, true},
		{"someone's single element add to another table", func(o binary.ByteOrder) []byte { return elemAdd(o, "filter", other) }, false},
		{"someone's single element add to a table named longer", func(o binary.ByteOrder) []byte { return elemAdd(o, "pcpd2", other) }, false},
		{"someone's single element add to a table named shorter", func(o binary.ByteOrder) []byte { return elemAdd(o, "pcp", other) }, false},
		{"pcpd's own single element add", func(o binary.ByteOrder) []byte { return elemAdd(o, "pcpd", own) }, false},
		{"a long single add (length over 255 bytes)", func(o binary.ByteOrder) []byte { return msg(o, nftType(unix.NFT_MSG_NEWSETELEM), other, 1000) }, false},
		{"not nftables (another nfnetlink subsystem)", func(o binary.ByteOrder) []byte {
			return msg(o, unix.NFNL_SUBSYS_CTNETLINK<<8|unix.NFT_MSG_NEWGEN, 0, 40)
		}, true},
	}
	for _, order := range []binary.ByteOrder{binary.LittleEndian, binary.BigEndian} {
		raw, err := watchFilterFor([]uint32{own}, "pcpd", order)
		if err != nil {
			t.Fatal(err)
		}
		ins, ok := bpf.Disassemble(raw)
		if !ok {
			t.Fatalf("%v: the filter does not disassemble", order)
		}
		vm, err := bpf.NewVM(ins)
		if err != nil {
			t.Fatalf("%v: %v", order, err)
		}
		for _, c := range cases {
			n, err := vm.Run(c.skb(order))
			if err != nil {
				t.Fatalf("%v %s: %v", order, c.name, err)
			}
			if got := n != 0; got != c.pass {
				t.Errorf("%v, %s: passed %v, want %v", order, c.name, got, c.pass)
			}
		}
	}
}
