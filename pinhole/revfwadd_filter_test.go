package pinhole

import (
	"encoding/binary"
	"strings"
	"testing"

	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"
)

// TestWatchFilterTableNames (review h/revfwadd): for every table name
// length the filter compares (1..maxFilteredTable), with the most ports it
// ever holds (numKeptPorts + ownPortsKept), in both byte orders, a single
// element added to pcpd's table by someone else passes, and one added to a
// table whose name differs in any one byte, is one byte longer or shorter,
// is dropped; past maxFilteredTable every single add passes (judged in
// userspace). Checked: all pass on h/fwadd as written.
func TestWatchFilterTableNames(t *testing.T) {
	const other = 0x00c0ffee
	ports := make([]uint32, numKeptPorts+ownPortsKept)
	for i := range ports {
		ports[i] = uint32(0x1000 + i)
	}
	add := func(o binary.ByteOrder, table string) []byte {
		name := append([]byte(table), 0)
		for len(name)%4 != 0 {
			name = append(name, 0)
		}
		m := make([]byte, unix.NLMSG_HDRLEN+4+4+len(name)+120)
		o.PutUint32(m[0:], uint32(len(m)))
		o.PutUint16(m[4:], unix.NFNL_SUBSYS_NFTABLES<<8|unix.NFT_MSG_NEWSETELEM)
		o.PutUint32(m[12:], other)
		a := m[unix.NLMSG_HDRLEN+4:]
		o.PutUint16(a[0:], uint16(4+len(table)+1))
		o.PutUint16(a[2:], unix.NFTA_SET_ELEM_LIST_TABLE)
		copy(a[4:], name)
		return m
	}
	for _, order := range []binary.ByteOrder{binary.LittleEndian, binary.BigEndian} {
		for n := 1; n <= maxFilteredTable+2; n++ {
			table := strings.Repeat("p", n-1) + "d"
			raw, err := watchFilterFor(ports, table, order)
			if err != nil {
				t.Fatalf("%v, table of %d: %v", order, n, err)
			}
			ins, _ := bpf.Disassemble(raw)
			vm, err := bpf.NewVM(ins)
			if err != nil {
				t.Fatalf("%v, table of %d: %v", order, n, err)
			}
			run := func(name string) bool {
				r, err := vm.Run(add(order, name))
				if err != nil {
					t.Fatalf("%v: %v", order, err)
				}
				return r != 0
			}
			if !run(table) {
				t.Errorf("%v, table of %d: pcpd's own table's add dropped", order, n)
			}
			others := []string{table + "x", table[:n-1]}
			for i := range n {
				b := []byte(table)
				b[i] ^= 0x20
				others = append(others, string(b))
			}
			for _, o := range others {
				if got, want := run(o), n > maxFilteredTable; got != want {
					t.Errorf("%v, table %q, add to %q: passed %v, want %v", order, table, o, got, want)
				}
			}
		}
	}
}
