package server

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// Conntrack over netlink (linux/netfilter/nfnetlink_conntrack.h). The
// kernel filters a dump itself when it carries CTA_FILTER (Linux 5.8+):
// only the flows whose original tuple matches the given fields come back.
const (
	nfnlSubsysCtnetlink = 1
	ctMsgGet            = 1
	ctMsgDelete         = 2

	ctaTupleOrig = 1
	ctaZone      = 18
	ctaFilter    = 25

	ctaTupleIP    = 1
	ctaTupleProto = 2
	ctaIPv4Dst    = 2
	ctaIPv6Dst    = 4
	ctaProtoNum   = 1
	ctaProtoDst   = 3

	ctaFilterOrigFlags  = 1
	ctaFilterReplyFlags = 2
	// CTA_FILTER_F_* (nf_conntrack_netlink.c): which original-tuple
	// fields must match.
	ctaFilterFIPDst    = 1 << 1
	ctaFilterFProtoNum = 1 << 3
	ctaFilterFDstPort  = 1 << 5
)

// ctTarget is the original destination of inbound flows through a mapping.
type ctTarget struct {
	addr  netip.Addr
	proto uint8
	port  uint16
}

// ctDeleter ends flows by original destination with kernel-side filtering:
// a dump per target that returns only its flows, then a delete per flow.
// The generic walk (netlink.ConntrackDeleteFilters) copied and parsed the
// whole conntrack table in user space for every flush.
type ctDeleter struct {
	c *netlink.Conn
}

func dialConntrack(nsFd int) (*ctDeleter, error) {
	c, err := netlink.Dial(unix.NETLINK_NETFILTER, &netlink.Config{NetNS: nsFd})
	if err != nil {
		return nil, fmt.Errorf("server: conntrack netlink: %w", err)
	}
	return &ctDeleter{c: c}, nil
}

func (d *ctDeleter) close() { d.c.Close() }

func nfgen(family uint8) []byte { return []byte{family, 0, 0, 0} }

// end deletes every flow whose original tuple goes to one of ts (one
// family and protocol); it returns how many. Every kernel dump walks the
// whole conntrack hash table, so a group costs one dump: filtered by
// protocol and port (and IPv4 address) when it has one target, by
// protocol alone when it has more; what comes back is matched here.
func (d *ctDeleter) end(ts []ctTarget) (int, error) {
	t := ts[0]
	fam, ipAttr, ip := uint8(unix.AF_INET6), uint16(ctaIPv6Dst), t.addr.AsSlice()
	if t.addr.Is4() {
		fam, ipAttr = unix.AF_INET, ctaIPv4Dst
	}
	// The kernel compares IPv6 addresses with the result of
	// ipv6_addr_cmp inverted (equal addresses fail the filter; seen on
	// 6.18), so IPv6 dumps never filter by address.
	flags := uint32(ctaFilterFProtoNum)
	if len(ts) == 1 {
		flags |= ctaFilterFDstPort
		if t.addr.Is4() {
			flags |= ctaFilterFIPDst
		}
	}
	want := make(map[ctTarget]bool, len(ts))
	for _, t := range ts {
		want[t] = true
	}
	ae := netlink.NewAttributeEncoder()
	ae.Nested(ctaTupleOrig, func(ae *netlink.AttributeEncoder) error {
		ae.Nested(ctaTupleIP, func(ae *netlink.AttributeEncoder) error {
			ae.Bytes(ipAttr, ip)
			return nil
		})
		ae.Nested(ctaTupleProto, func(ae *netlink.AttributeEncoder) error {
			ae.Uint8(ctaProtoNum, t.proto)
			ae.Bytes(ctaProtoDst, binary.BigEndian.AppendUint16(nil, t.port))
			return nil
		})
		return nil
	})
	ae.Nested(ctaFilter, func(ae *netlink.AttributeEncoder) error {
		ae.Uint32(ctaFilterOrigFlags, flags)
		ae.Uint32(ctaFilterReplyFlags, 0)
		return nil
	})
	attrs, err := ae.Encode()
	if err != nil {
		return 0, err
	}
	msgs, err := d.c.Execute(netlink.Message{
		Header: netlink.Header{Type: netlink.HeaderType(nfnlSubsysCtnetlink<<8 | ctMsgGet), Flags: netlink.Request | netlink.Dump},
		Data:   append(nfgen(fam), attrs...),
	})
	if err != nil {
		return 0, fmt.Errorf("server: conntrack dump: %w", err)
	}
	n := 0
	var errs []error
	for _, m := range msgs {
		if len(m.Data) < 4 {
			continue
		}
		ad, err := netlink.NewAttributeDecoder(m.Data[4:])
		if err != nil {
			continue
		}
		var tuple, zone []byte
		for ad.Next() {
			switch ad.Type() {
			case ctaTupleOrig:
				tuple = ad.Bytes()
			case ctaZone:
				zone = ad.Bytes()
			}
		}
		// Checked here in any case: a kernel that does not know
		// CTA_FILTER ignores it and dumps every flow.
		if tuple == nil {
			continue
		}
		if dst, ok := origDst(tuple, ipAttr); !ok || !want[dst] {
			continue
		}
		del := netlink.NewAttributeEncoder()
		del.Bytes(ctaTupleOrig|netlink.Nested, tuple)
		if zone != nil {
			del.Bytes(ctaZone, zone)
		}
		b, err := del.Encode()
		if err != nil {
			continue
		}
		_, err = d.c.Execute(netlink.Message{
			Header: netlink.Header{Type: netlink.HeaderType(nfnlSubsysCtnetlink<<8 | ctMsgDelete), Flags: netlink.Request | netlink.Acknowledge},
			Data:   append(nfgen(m.Data[0]), b...),
		})
		switch {
		case err == nil:
			n++
		case errors.Is(err, unix.ENOENT):
			// Gone meanwhile.
		default:
			errs = append(errs, err)
		}
	}
	return n, errors.Join(errs...)
}

// origDst reads the destination of a CTA_TUPLE_ORIG payload.
func origDst(tuple []byte, ipAttr uint16) (ctTarget, bool) {
	var t ctTarget
	ad, err := netlink.NewAttributeDecoder(tuple)
	if err != nil {
		return t, false
	}
	ipOK, protoOK, portOK := false, false, false
	for ad.Next() {
		switch ad.Type() {
		case ctaTupleIP:
			ad.Nested(func(nd *netlink.AttributeDecoder) error {
				for nd.Next() {
					if nd.Type() == ipAttr {
						t.addr, ipOK = netip.AddrFromSlice(nd.Bytes())
					}
				}
				return nil
			})
		case ctaTupleProto:
			ad.Nested(func(nd *netlink.AttributeDecoder) error {
				for nd.Next() {
					switch b := nd.Bytes(); nd.Type() {
					case ctaProtoNum:
						if protoOK = len(b) == 1; protoOK {
							t.proto = b[0]
						}
					case ctaProtoDst:
						if portOK = len(b) == 2; portOK {
							t.port = binary.BigEndian.Uint16(b)
						}
					}
				}
				return nil
			})
		}
	}
	return t, ad.Err() == nil && ipOK && protoOK && portOK
}
