package server

import (
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"testing"

	mdnl "github.com/mdlayher/netlink"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/pcpd/pcpd/internal/netlab"
)

// TestCtDeleteAll (root): the pipelined conntrack deletes (deleteAll:
// chunks of ctDeleteChunk without acks, each closed by an acknowledged
// NOOP) delete every flow asked for across chunks and count them, and a
// flow already gone (ENOENT) anywhere in a chunk, first or last included,
// is neither counted nor an error nor a stall. An overflow (ENOBUFS) is
// recorded (ctDeleter.overflowed): the walk does not keep that socket;
// the last row fails without it.
func TestCtDeleteAll(t *testing.T) {
	for _, c := range []struct {
		name    string
		exist   int
		missing []int // positions of deletes of flows that do not exist
		rbuf    int   // with it, the socket's receive buffer (forces ENOBUFS)
	}{
		{"one", 1, nil, 0},
		{"three chunks, gone ones at chunk edges", 2*ctDeleteChunk + 88, []int{0, ctDeleteChunk - 1, ctDeleteChunk, 300, 2*ctDeleteChunk + 92}, 0},
		{"only gone ones", 0, []int{0, 1, 2}, 0},
		// Every delete of a chunk failing: 256 error messages, each
		// quoting its request, queued at once in the socket's receive
		// buffer before the NOOP's ack (the kernel handles the whole
		// sendmsg first).
		{"two whole chunks gone, then ten", 10, seq(2 * ctDeleteChunk), 0},
		{"two whole chunks gone, then ten, answers overflowing", 10, seq(2 * ctDeleteChunk), 4096},
	} {
		t.Run(c.name, func(t *testing.T) {
			ns := netlab.NewNS(t, "ctexpd")
			h, nh := nsHandles(t, ns)
			src := func(i int) netip.AddrPort {
				return netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 9, byte(i >> 8), byte(i)}), 1000)
			}
			dst := netip.MustParseAddrPort("192.0.2.1:80")
			for i := range c.exist {
				f := &netlink.ConntrackFlow{FamilyType: unix.AF_INET, TimeOut: 600}
				f.Forward = netlink.IPTuple{Protocol: protoTCP, SrcIP: net.IP(src(i).Addr().AsSlice()), SrcPort: 1000, DstIP: net.IP(dst.Addr().AsSlice()), DstPort: 80}
				f.Reverse = netlink.IPTuple{Protocol: protoTCP, SrcIP: net.IP(dst.Addr().AsSlice()), SrcPort: 80, DstIP: net.IP(src(i).Addr().AsSlice()), DstPort: 1000}
				if err := nh.ConntrackCreate(netlink.ConntrackTable, netlink.FAMILY_V4, f); err != nil {
					t.Fatal(err)
				}
			}
			var dels []mdnl.Message
			next, gone := 0, 60000
			for pos := 0; next < c.exist || len(dels) < c.exist+len(c.missing); pos++ {
				s := src(next)
				if len(c.missing) > 0 && contains(c.missing, pos) {
					s = src(gone)
					gone++
				} else {
					next++
				}
				m, ok := ctDeleteMsg(unix.AF_INET, origTuple(t, s, dst), nil)
				if !ok {
					t.Fatal("delete message")
				}
				dels = append(dels, m)
			}
			d, err := dialConntrack(int(h))
			if err != nil {
				t.Fatal(err)
			}
			defer d.close()
			if c.rbuf > 0 {
				if err := d.c.SetReadBuffer(c.rbuf); err != nil {
					t.Fatal(err)
				}
			}
			n, err := d.deleteAll(dels)
			// Overflowing, some failures go uncounted: n may be more.
			if n < c.exist || (c.rbuf == 0 && n != c.exist) || err != nil {
				t.Fatalf("deleted %d, err %v; want %d, nil", n, err, c.exist)
			}
			// An overflow leaves the socket unfit for another walk
			// (ctSocket: the walk closes it and the next dials anew).
			if d.overflowed != (c.rbuf > 0) {
				t.Errorf("overflowed %v, want %v", d.overflowed, c.rbuf > 0)
			}
			left, err := nh.ConntrackTableList(netlink.ConntrackTable, netlink.FAMILY_V4)
			if err != nil || len(left) != 0 {
				t.Fatalf("%d flows left (%v)", len(left), err)
			}
		})
	}
}

// seq is 0, 1, …, n-1.
func seq(n int) []int {
	out := make([]int, n)
	for i := range out {
		out[i] = i
	}
	return out
}

func contains(xs []int, x int) bool {
	for _, y := range xs {
		if x == y {
			return true
		}
	}
	return false
}

// origTuple is the CTA_TUPLE_ORIG payload of a TCP IPv4 flow.
func origTuple(t *testing.T, src, dst netip.AddrPort) []byte {
	ae := mdnl.NewAttributeEncoder()
	ae.Nested(ctaTupleIP, func(ae *mdnl.AttributeEncoder) error {
		ae.Bytes(ctaIPv4Src, src.Addr().AsSlice())
		ae.Bytes(ctaIPv4Dst, dst.Addr().AsSlice())
		return nil
	})
	ae.Nested(ctaTupleProto, func(ae *mdnl.AttributeEncoder) error {
		ae.Uint8(ctaProtoNum, protoTCP)
		ae.Bytes(ctaProtoSrc, binary.BigEndian.AppendUint16(nil, src.Port()))
		ae.Bytes(ctaProtoDst, binary.BigEndian.AppendUint16(nil, dst.Port()))
		return nil
	})
	b, err := ae.Encode()
	if err != nil {
		t.Fatal(fmt.Errorf("tuple: %w", err))
	}
	return b
}
