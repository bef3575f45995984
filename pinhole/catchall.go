package pinhole

import (
	"encoding/binary"
	"errors"
	"fmt"
	"time"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// nftSetElemCatchall is NFT_SET_ELEM_CATCHALL (linux/netfilter/nf_tables.h;
// not in x/sys/unix).
const nftSetElemCatchall = 0x2

// isCatchAll: e deletes a catch-all element (nft's "*", by hand: an odd
// Pinhole of no key).
func isCatchAll(e encodedOp) bool {
	return e.op.Kind == Delete && e.op.Pinhole.Odd() && e.op.Pinhole.odd.Value().key == ""
}

// snatOf is the SNAT map of NAPT kind k's companions.
func snatOf(k kind) int {
	if k == kindNAPT4Filter {
		return snat4Filter
	}
	return snat4
}

// catchAllSet is the set of the catch-all element o (of b's table).
func (b *Backend) catchAllSet(o oddElement) string {
	if o.snat {
		return b.snat[snatOf(o.k)].Name
	}
	return b.sets[o.k].Name
}

// deleteCatchAll removes the catch-all element of set (of b's table) in a
// transaction of its own, on the raw socket (b.raw, under mu): begin,
// NFT_MSG_DELSETELEM of one element with NFTA_SET_ELEM_FLAGS catch-all
// and no key (the kernel's nft_del_setelem: the catch-all path), end, its
// acknowledgement read. google/nftables v0.3.0 cannot send it (its
// element list always holds a key and no flag but interval-end): a Delete
// of the odd Pinhole through it, an empty key, the kernel refused
// (EINVAL), and the catch-all stayed (review h/revr6, finding 2:
// TestE2EUndoesCatchAll). No catch-all there (ENOENT): nothing to do.

func (b *Backend) deleteCatchAll(set string) error {
	c, err := b.rawConn()
	if err != nil {
		return err
	}
	msgs, err := catchAllBatch(byte(b.table.Family), b.table.Name, set)
	if err != nil {
		return err
	}
	err = sendCatchAll(c, msgs)
	if errors.Is(err, unix.ENOENT) {
		return nil
	}
	if err != nil {
		b.raw.close() // a reply left unread would be the next request's
		return fmt.Errorf("pinhole: delete catch-all element of %s: %w", set, classify(err))
	}
	return nil
}

// catchAllBatch is deleteCatchAll's transaction.
func catchAllBatch(family byte, table, set string) ([]netlink.Message, error) {
	flags := make([]byte, 4)
	binary.BigEndian.PutUint32(flags, nftSetElemCatchall)
	ae := netlink.NewAttributeEncoder()
	ae.String(unix.NFTA_SET_ELEM_LIST_TABLE, table)
	ae.String(unix.NFTA_SET_ELEM_LIST_SET, set)
	ae.Nested(unix.NFTA_SET_ELEM_LIST_ELEMENTS, func(nae *netlink.AttributeEncoder) error {
		nae.Nested(unix.NFTA_LIST_ELEM, func(eae *netlink.AttributeEncoder) error {
			eae.Bytes(unix.NFTA_SET_ELEM_FLAGS, flags)
			return nil
		})
		return nil
	})
	attrs, err := ae.Encode()
	if err != nil {
		return nil, err
	}
	batch := func(t uint16) netlink.Message {
		return netlink.Message{
			Header: netlink.Header{Type: netlink.HeaderType(t), Flags: netlink.Request},
			Data:   []byte{unix.AF_UNSPEC, unix.NFNETLINK_V0, 0, unix.NFNL_SUBSYS_NFTABLES}, // res_id: the subsystem, big-endian
		}
	}
	return []netlink.Message{
		batch(unix.NFNL_MSG_BATCH_BEGIN),
		{
			Header: netlink.Header{
				Type:  netlink.HeaderType(unix.NFNL_SUBSYS_NFTABLES<<8 | unix.NFT_MSG_DELSETELEM),
				Flags: netlink.Request | netlink.Acknowledge,
			},
			Data: append([]byte{family, unix.NFNETLINK_V0, 0, 0}, attrs...),
		},
		batch(unix.NFNL_MSG_BATCH_END),
	}, nil
}

// sendCatchAll sends msgs (one message asking for an acknowledgement) and
// reads its one reply: the acknowledgement, or the error (the message's,
// or the batch's).
func sendCatchAll(c *netlink.Conn, msgs []netlink.Message) error {
	if _, err := c.SendMessages(msgs); err != nil {
		return err
	}
	_ = c.SetReadDeadline(time.Now().Add(flushDeadline))
	defer c.SetReadDeadline(time.Time{})
	_, err := c.Receive()
	return err
}
