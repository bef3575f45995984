package pinhole

import (
	"encoding/binary"
	"errors"
	"fmt"
	"time"

	"github.com/google/nftables"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// LeaseSetGC is the garbage-collection interval Setup asks the kernel for
// on pcpd's pinhole sets (pin6, pin6_proto, pin6_addr, pin6_filter,
// pin6_addr_filter; NFTA_SET_GC_INTERVAL). The kernel's default is 1 s:
// every second a worker walks the whole set for expired elements
// (nft_rhash_gc) in one RCU read-side section, 4-10 ms of one CPU at
// 55 000-100 000 elements on the 2-core bench machine (a kernel without
// preemption: whatever waits for that CPU waits those milliseconds;
// BENCHMARKS.md item 70). pcpd deletes its elements itself at expiry; the
// kernel's timeouts are the backstop for a pcpd that is not running, and
// an expired element matches nothing whether or not it has been collected
// (nft_rhash_cmp, the pipapo and rbtree lookups check the expiry), so a
// longer interval only keeps an expired element's memory a while longer.
//
// Not the maps (redir6, napt4, snat4 and their filtered ones): nft 1.0.6
// lists a map's gc-interval and cannot read it back ('syntax error,
// unexpected gc-interval'), so an admin's 'nft list ruleset' would no
// longer load (TestNATCutLayout). Not the meters: a full meter admits a
// new source only once its expired ones are collected.
var LeaseSetGC = 5 * time.Minute

// setLeaseGC asks the kernel for LeaseSetGC on every pinhole set, one
// transaction a set on the raw socket (b.raw, under mu): the NEWSET that
// google/nftables sends for the set (its flags, types and description, so
// the kernel takes it as the same set: nf_tables_newset's update path),
// with NFTA_SET_GC_INTERVAL added; google/nftables v0.3.0 cannot send that
// attribute. A set already at LeaseSetGC is written the same again.
func (b *Backend) setLeaseGC() error {
	if b.conn.TestDial != nil || LeaseSetGC <= 0 {
		return nil
	}
	c, err := b.rawConn()
	if err != nil {
		return err
	}
	for _, s := range b.sets {
		if s.IsMap || !s.HasTimeout {
			continue
		}
		msgs, err := setGCBatch(s, LeaseSetGC)
		if err != nil {
			return fmt.Errorf("pinhole: gc interval of %s: %w", s.Name, err)
		}
		if err := sendCatchAll(c, msgs); err != nil {
			b.raw.close() // a reply left unread would be the next request's
			return fmt.Errorf("pinhole: gc interval of %s: %w", s.Name, classify(err))
		}
	}
	return nil
}

// rawConn is b.raw's socket, dialled into b's namespace at first use.
func (b *Backend) rawConn() (*netlink.Conn, error) {
	if b.raw.c == nil {
		c, err := netlink.Dial(unix.NETLINK_NETFILTER, &netlink.Config{NetNS: b.netns})
		if err != nil {
			return nil, fmt.Errorf("pinhole: netlink: %w", err)
		}
		b.raw.c = c
	}
	// Its notifications are pcpd's own (the watcher leaves them out):
	// noted at every use, the socket (getRules' too) may have left the
	// ring.
	b.ports.note(b.raw.c)
	return b.raw.c, nil
}

// setGCBatch is the transaction that sets s's gc interval to gc: the
// batch google/nftables encodes for AddSet(s) (captured from a connection
// that sends nothing), its NEWSET with NFTA_SET_GC_INTERVAL (milliseconds,
// big-endian) appended.
func setGCBatch(s *nftables.Set, gc time.Duration) ([]netlink.Message, error) {
	var got []netlink.Message
	c, err := nftables.New(nftables.WithTestDial(func(req []netlink.Message) ([]netlink.Message, error) {
		got = append(got, req...)
		return req, nil
	}))
	if err != nil {
		return nil, err
	}
	cp := *s
	cp.ID = 0 // a batch-local ID of this batch's own
	if err := c.AddSet(&cp, nil); err != nil {
		return nil, err
	}
	if err := c.Flush(); err != nil {
		return nil, err
	}
	newSet := netlink.HeaderType(unix.NFNL_SUBSYS_NFTABLES<<8 | unix.NFT_MSG_NEWSET)
	var out []netlink.Message
	found := false
	for _, m := range got {
		// Length too: the socket sets it from the data only when 0, and
		// a NEWSET sent with its old length lost the attribute and threw
		// the batch's end out of step (the kernel acknowledged the
		// message, and aborted the transaction).
		m.Header.Length, m.Header.Sequence, m.Header.PID = 0, 0, 0
		if m.Header.Type == newSet {
			attr := make([]byte, 8)
			binary.NativeEndian.PutUint16(attr[0:2], 8)
			binary.NativeEndian.PutUint16(attr[2:4], unix.NFTA_SET_GC_INTERVAL)
			binary.BigEndian.PutUint32(attr[4:8], uint32(gc.Milliseconds()))
			m.Data = append(m.Data[:len(m.Data):len(m.Data)], attr...)
			found = true
		}
		out = append(out, m)
	}
	if !found || len(out) != 3 {
		return nil, errors.New("google/nftables encoded no NEWSET batch")
	}
	return out, nil
}
