package server

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"sync"
	"time"

	"github.com/mdlayher/netlink"
	vnl "github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/pcpd/pcpd/internal/ctnl"
)

// Conntrack over netlink (internal/ctnl). The kernel filters a dump
// itself when it carries CTA_FILTER (Linux 5.8+): only the flows whose
// original (or reply) tuple matches the given fields come back.

// ctTarget is the original destination of inbound flows through a
// mapping, or the reply destination of outbound flows SNAT-ed to it.
type ctTarget struct {
	addr  netip.Addr
	proto uint8
	port  uint16
}

func (t ctTarget) dst() netip.AddrPort { return netip.AddrPortFrom(t.addr, t.port) }

// wild reports whether t is an IPv6 all-ports (port 0) or all-protocols
// (protocol 0, port 0) mapping's: every inbound flow to its address, of
// its protocol or of any (appendCtFilters).
func (t ctTarget) wild() bool { return t.port == 0 }

// ctGroup is the flows one dump asks for: of a family and protocol, by
// original destination or, with nat, by reply destination.
type ctGroup struct {
	v4    bool
	proto uint8
	nat   bool
}

// ctDeleter ends flows by original (or reply) destination with
// kernel-side filtering: a dump per group that returns only its flows,
// then their deletes, pipelined (deleteAll). The generic walk (kernels
// without CTA_FILTER: deleteMatching) reads the whole conntrack table in
// user space for every flush, and deletes the same way.
type ctDeleter struct {
	c *netlink.Conn
	// admits spares the inbound flows live leases admit (nil: none),
	// unless live.
	admits ctAdmits
	// fault, if set, sees every dump's result and may change it (tests:
	// Server.ctDumpFault).
	fault ctFault
	// spare marks the flows of hits that a lease live as it is asked
	// admits (Server.spareLive; nil: none spared): those wildcard
	// filters matched and, with live, every flow a filter matched.
	spare func([]ctHit)
	// live: admits is not used; what a live lease admits is asked of
	// spare once a dump's flows are read (the flusher's walk: a lease
	// made after the mapping ended, before or during the walk, keeps
	// the flows it admits). Without it (cutRetargeted, under s.mu),
	// admits decides for the exact filters.
	live bool
	// host spares the inbound flows the host opened itself (their
	// original source is one of its addresses: Server.hostAddrs; nil:
	// none spared).
	host hostAddrs
	// overflowed: the kernel dropped answers (ENOBUFS) on c. deleteAll
	// recovered, but c is not used for another walk (ctSocket).
	overflowed bool
}

// ctFault sees a conntrack dump's result and may change it (tests).
type ctFault func(msgs []netlink.Message, err error) ([]netlink.Message, error)

// dialConntrack is a deleter on a socket of its own (tests, benchmarks;
// the walk keeps its socket: ctSocket).
func dialConntrack(nsFd int) (*ctDeleter, error) {
	c, err := dialCtConn(nsFd)
	if err != nil {
		return nil, err
	}
	return &ctDeleter{c: c}, nil
}

// dialCtConn opens a ctnetlink socket in the namespace nsFd (0: the
// caller's), subscribed to no multicast group: the kernel sends it only
// the answers to what is sent on it.
func dialCtConn(nsFd int) (*netlink.Conn, error) {
	c, err := netlink.Dial(unix.NETLINK_NETFILTER, &netlink.Config{NetNS: nsFd})
	if err != nil {
		return nil, fmt.Errorf("server: conntrack netlink: %w", err)
	}
	// A chunk's failures (deleteAll) are queued at once: without the
	// request quoted in each (NETLINK_CAP_ACK) and with room for them,
	// 256 fit. Best effort: deleteAll recovers from an overflow anyway.
	c.SetOption(netlink.CapAcknowledge, true)
	c.SetReadBuffer(ctReadBuffer)
	return c, nil
}

// ctSocket keeps the conntrack walk's ctnetlink socket from one walk to
// the next while the server serves (Serve: open, then close as it
// returns). Closing any NETLINK_NETFILTER socket makes nf_tables take the
// namespace's commit mutex and wait out an RCU grace period
// (nft_rcv_nl_event): a close per walk took 16 ms of a 37 ms walk and
// held the engine's nftables transactions meanwhile (4.7 ms a batch
// instead of 0.08; BENCHMARKS.md item 41).
//
// A walk takes the socket (take) and hands it back (put) saying whether
// it may serve another. It may not after any failed exchange (a dump that
// failed, was cut short or marked interrupted, a delete that failed, a
// read error or deadline, an injected fault) nor after an overflow
// (ENOBUFS): it is closed then, and the next walk dials a new one. That
// is what keeps a walk from reading what an earlier one left: the socket
// joins no multicast group, so nothing unsolicited is queued on it; a
// walk that succeeded read every exchange to its end (the dump's
// NLMSG_DONE, the acknowledged NOOP closing each chunk of deletes, sent
// after them: the kernel answers a sendmsg's messages in order, before the
// call returns), so its queue is empty; only a failed one may leave
// answers queued. Sequence numbers alone would not do: mdlayher/netlink
// numbers each message (Conn.nextSequence) and Execute checks every reply
// against its request (Validate: sequence and port id), but it fails the
// exchange on a stale reply rather than skipping it (the answer then
// stays queued for the next exchange, which fails too), it returns a
// stale NLMSG_ERROR as the error before checking its sequence, and
// deleteAll's Receive checks none but the NOOP's. So a socket that saw a
// failure serves no later walk. (The rest of the walk it failed in goes
// on with it, as before: an exchange there reading stale answers fails,
// as shown, or counts a stale delete failure as its own, and the groups
// that failed are walked again.)
//
// Walks run one at a time (ctFlusher.run, one goroutine); should two
// ever overlap, the second dials its own socket and the one handed back
// second is closed. Outside Serve (Start's walks, a flush queued after
// Serve returned) each walk dials and closes its own, as before, so the
// socket lives no longer than Serve whatever the caller does.
type ctSocket struct {
	mu      sync.Mutex
	c       *netlink.Conn // idle between walks (nil: none)
	serving bool          // between open and close: a socket handed back is kept
	// dialed, if set, is told of every socket dialled (tests).
	dialed func(*netlink.Conn)
}

// open lets the sockets handed back from now on be kept.
func (k *ctSocket) open() {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.serving = true
}

// close closes the kept socket and keeps none from now on: a walk in
// flight closes its own as it hands it back.
func (k *ctSocket) close() {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.serving = false
	if k.c != nil {
		k.c.Close()
		k.c = nil
	}
}

// take returns the kept socket, or a new one dialled in the namespace
// nsFd; the caller hands it back with put.
func (k *ctSocket) take(nsFd int) (*netlink.Conn, error) {
	k.mu.Lock()
	c, dialed := k.c, k.dialed
	k.c = nil
	k.mu.Unlock()
	if c != nil {
		return c, nil
	}
	c, err := dialCtConn(nsFd)
	if err == nil && dialed != nil {
		dialed(c)
	}
	return c, err
}

// put hands back a socket take returned: kept for the next walk if ok
// (every exchange on it succeeded and read to its end) and the server
// serves, closed otherwise.
func (k *ctSocket) put(c *netlink.Conn, ok bool) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if !ok || !k.serving || k.c != nil {
		c.Close()
		return
	}
	k.c = c
}

// ctReadBuffer is the conntrack socket's receive buffer: 256 failed
// deletes overflowed the default 212 992 bytes (TestCtDeleteAll).
const ctReadBuffer = 1 << 20

func (d *ctDeleter) close() { d.c.Close() }

// end deletes every flow of group g matching one of fs (sorted by
// cmpCtFilter, without duplicates); it returns how many. Every kernel dump walks the whole conntrack hash table, so a group
// costs one dump: filtered by protocol, by the IPv4 address when all of fs
// share it, and by port too when there is one key; what comes back is
// matched here (source included, for SNAT-ed flows). The all-protocols
// group (protocol 0: wildcard filters of IPv6 all-protocols mappings) is
// the family's whole table, unfiltered, every protocol (ICMPv6 and
// port-less ones included, as pin6_addr admits them).
func (d *ctDeleter) end(g ctGroup, fs []ctFilter) (int, error) {
	t := fs[0].t
	fam, ipDst, ip := uint8(unix.AF_INET6), uint16(ctnl.IPv6Dst), t.addr.AsSlice()
	if g.v4 {
		fam, ipDst = unix.AF_INET, ctnl.IPv4Dst
	}
	// The kernel compares IPv6 addresses with the result of
	// ipv6_addr_cmp inverted (equal addresses fail the filter; seen on
	// 6.18), so IPv6 dumps never filter by address.
	flags := uint32(ctnl.FilterProtoNum)
	if g.v4 && fs[len(fs)-1].t.addr == t.addr { // sorted by address
		flags |= ctnl.FilterIPDst
	}
	if !t.wild() && fs[len(fs)-1].t == t {
		// One target (sorted: its filters are the run): a retake's
		// inbound and SNAT filters, or a port's several SNAT sources.
		// Before, only a lone filter was filtered by port, and two
		// SNAT filters of one endpoint dumped every flow SNAT-ed to
		// the address (TestCtDumpPortFilteredForOneTarget).
		flags |= ctnl.FilterDstPort
	}
	dir, origFlags, replyFlags := uint16(ctnl.TupleOrig), flags, uint32(0)
	if g.nat {
		dir, origFlags, replyFlags = ctnl.TupleReply, 0, flags
	}
	// Wildcard filters (port 0, sorted first of an address's) in fs: a
	// flow not matched exactly is looked for among them too.
	wild := slices.ContainsFunc(fs, func(f ctFilter) bool { return !f.nat && f.t.wild() })
	var attrs []byte
	if g.proto != 0 { // protocol 0: no filter, the whole table
		var err error
		if attrs, err = ctnl.DstFilter(dir, ipDst, ip, t.proto, t.port, origFlags, replyFlags); err != nil {
			return 0, err
		}
	}
	var dels []netlink.Message
	var hits []ctHit
	// hits' deletes (ctnl.DeleteMsg copies what it names a flow by out
	// of the dump: a streamed dump's read buffer is reused); none (nil
	// Data) if it could not be built.
	var held []netlink.Message
	// decide asks spare about hits and queues the deletes of those no
	// live lease keeps: every ctHitChunk hits (what they hold beside the
	// dump stays bounded: with live, every flow matched is a hit), and
	// once the dump is read.
	decide := func() {
		if len(hits) > 0 && d.spare != nil {
			d.spare(hits)
		}
		for i, h := range hits {
			if del := held[i]; !h.keep && del.Data != nil {
				dels = append(dels, del)
			}
		}
		hits, held = hits[:0], held[:0]
	}
	hit := func(h ctHit, family byte, orig, reply, zone, id []byte) {
		del, _ := heldFlow(family, orig, reply, zone, id).delete()
		hits = append(hits, h)
		held = append(held, del)
	}
	// A dump the kernel marks inconsistent (NLM_F_DUMP_INTR: the table
	// changed under it) may have missed flows: what it found is ended,
	// and the group walked again (ctFlusher).
	dumpIntr := false
	// judge decides about one dumped entry (family, its attributes
	// after struct nfgenmsg, whether NLM_F_DUMP_INTR marked it).
	judge := func(family byte, attrs []byte, interrupted bool) {
		dumpIntr = dumpIntr || interrupted
		if len(hits) >= ctHitChunk {
			decide()
		}
		var orig, reply, zone, id []byte
		if !ctnl.Attrs(attrs, func(typ uint16, v []byte) {
			switch typ {
			case ctnl.TupleOrig:
				orig = v
			case ctnl.TupleReply:
				reply = v
			case ctnl.Zone:
				zone = v
			case ctnl.ID:
				id = v
			}
		}) {
			return // malformed: not judged on part of it
		}
		// Checked here in any case: a kernel that does not know
		// CTA_FILTER ignores it and dumps every flow.
		if orig == nil {
			return
		}
		o, ok := ctTupleOf(orig, g.v4)
		if !ok {
			return
		}
		k := ctFilter{nat: g.nat, t: ctTarget{addr: o.dst.Addr(), proto: o.proto, port: o.dst.Port()}}
		if !g.nat && g.proto != o.proto && g.proto != 0 {
			return // a kernel that ignored CTA_FILTER
		}
		if !g.nat && wild {
			// Exactly matched and not spared: ended. Otherwise
			// (and always with live) the live leases decide, once
			// every flow is read (spareLive takes s.mu a chunk at
			// a time).
			// Where the kernel delivered it (the reply's source;
			// invalid if unread: spared by none).
			var to netip.AddrPort
			if r, ok := ctTupleOf(reply, g.v4); ok {
				to = r.src
			}
			w := ctFilter{t: ctTarget{addr: k.t.addr, proto: g.proto}}
			exact := deliveredBy(fs, k.t, to)
			if _, ok := slices.BinarySearchFunc(fs, w, cmpCtTarget); ok && (d.live || !(exact && !d.admits.admitted(k.t, o.src, to))) {
				if d.host.has(o.src.Addr()) {
					return // the host's own (Server.hostAddrs)
				}
				hit(ctHit{t: k.t, src: o.src, to: to}, family, orig, reply, zone, id)
				return
			}
		}
		if g.nat {
			r, ok := ctTupleOf(reply, g.v4)
			if !ok || !o.src.Addr().Is4() {
				return
			}
			k.t = ctTarget{addr: r.dst.Addr(), proto: r.proto, port: r.dst.Port()}
			k.src4, k.sport = o.src.Addr().As4(), o.src.Port()
		}
		if g.nat {
			if _, want := slices.BinarySearchFunc(fs, k, cmpCtFilter); !want {
				return
			}
		} else if r, _ := ctTupleOf(reply, g.v4); !deliveredBy(fs, k.t, r.src) {
			// Not delivered where an ended mapping delivered its
			// flows (none if unread): an admin's own DNAT-ed flow
			// (ctFilter.delivered).
			return
		}
		if d.live {
			// Asked of the live leases once every flow is read.
			h := ctHit{t: k.t, src: o.src, nat: g.nat}
			if g.nat {
				h.to = o.dst // the remote
			} else if d.host.has(o.src.Addr()) {
				return // the host's own (Server.hostAddrs)
			} else if r, ok := ctTupleOf(reply, g.v4); ok {
				h.to = r.src // where the kernel delivered it
			}
			hit(h, family, orig, reply, zone, id)
			return
		}
		if g.nat && d.admits.snatted(k.t, o.src, o.dst) {
			// Its SNAT is a live lease's (a PEER's, of this remote):
			// before, any live holder of the endpoint kept every
			// remote's (review h/revpeer).
			return
		}
		if !g.nat && d.host.has(o.src.Addr()) {
			// The host opened it, to the client: no pinhole admitted
			// it, and the guard drops a forwarded packet from a host
			// address (Server.hostAddrs).
			return
		}
		if !g.nat && d.admits[k.t] != nil {
			// Spared if a live lease admits it where the kernel
			// delivered it (the reply's source).
			if r, ok := ctTupleOf(reply, g.v4); ok && d.admits.admitted(k.t, o.src, r.src) {
				return
			}
		}
		if del, ok := heldFlow(family, orig, reply, zone, id).delete(); ok {
			dels = append(dels, del)
		}
	}
	buckets := ctHashSize()
	var err error
	refusal := true // an error is the dump's only answer
	if g.proto == 0 && d.fault == nil {
		// The whole table: streamed, each entry judged as it is read
		// (one read's worth held at a time). Read whole (Execute),
		// 100 000 entries took 113 MB and 1.37 M allocations a walk
		// (BenchmarkCtAllProtoWalk).
		_, err = ctnl.Dump(d.c, fam, nil, func(f *ctnl.Flow) bool {
			refusal = false
			judge(f.Family, f.Attrs, f.Interrupted)
			return false
		})
	} else {
		var msgs []netlink.Message
		if g.proto == 0 {
			// A fault to inject (tests) sees the dump's entries
			// as a read whole one's.
			msgs, err = ctDumpMessages(d.c, fam)
		} else {
			msgs, err = d.c.Execute(ctnl.Request(ctnl.MsgGet, netlink.Request|netlink.Dump, fam, attrs))
		}
		if d.fault != nil {
			msgs, err = d.fault(msgs, err)
		}
		if err == nil {
			for _, m := range msgs {
				// Any message marked (one without an entry too).
				intr := m.Header.Flags&netlink.DumpInterrupted != 0
				dumpIntr = dumpIntr || intr
				if len(m.Data) >= 4 {
					judge(m.Data[0], m.Data[4:], intr)
				}
			}
		}
	}
	if err != nil {
		if refusal && (errors.Is(err, unix.EINVAL) || errors.Is(err, unix.EOPNOTSUPP)) {
			// The kernel's answer to the dump request, its only one:
			// nothing of this exchange is left queued on d.c.
			return 0, fmt.Errorf("server: conntrack dump: %w: %w", errCtFilterRefused, err)
		}
		return 0, fmt.Errorf("server: conntrack dump: %w", err)
	}
	var intr error
	if dumpIntr {
		intr = errCtDumpInterrupted
	} else if ctHashSize() != buckets {
		// Resized meanwhile (nf_conntrack_buckets): the dump walked the
		// buckets by index while the kernel moved the entries, and may
		// have skipped flows; likewise walked again (h/left9).
		intr = fmt.Errorf("server: conntrack dump: %w", ctnl.ErrResized)
	}
	decide()
	n, err := d.deleteAll(dels)
	return n, errors.Join(intr, err)
}

// ctDumpMessages is family fam's whole table dumped on c (ctnl.Dump), each
// entry a message as Execute returns it (a copy; NLM_F_DUMP_INTR kept):
// what a fault injected sees of the all-protocols group's dump (tests).
func ctDumpMessages(c *netlink.Conn, fam uint8) ([]netlink.Message, error) {
	var msgs []netlink.Message
	_, err := ctnl.Dump(c, fam, nil, func(f *ctnl.Flow) bool {
		m := netlink.Message{Data: append([]byte{f.Family, unix.NFNETLINK_V0, 0, 0}, f.Attrs...)}
		if f.Interrupted {
			m.Header.Flags |= netlink.DumpInterrupted
		}
		msgs = append(msgs, m)
		return false
	})
	return msgs, err
}

// ctHitChunk is how many flows a walk holds for spareLive at a time (one
// hold of s.mu each, as spareLive's own chunks).
const ctHitChunk = 4096

// ctHeldFlow is a flow a filter matched, until spareLive said whether it
// stays: what its delete names it by (ctnl.DeleteMsg: its reply tuple and
// CTA_ID, so that a flow made since with its original tuple, delivered
// elsewhere, is not ended; review h/revctnl).
type ctHeldFlow struct {
	family          byte
	dir             uint16 // ctnl.TupleReply (ctnl.TupleOrig: none read)
	tuple, zone, id []byte
}

// heldFlow is the dumped flow with these payloads (family, CTA_TUPLE_ORIG,
// CTA_TUPLE_REPLY, CTA_ZONE, CTA_ID).
func heldFlow(family byte, orig, reply, zone, id []byte) ctHeldFlow {
	if len(reply) == 0 {
		return ctHeldFlow{family: family, dir: ctnl.TupleOrig, tuple: orig, zone: zone, id: id}
	}
	return ctHeldFlow{family: family, dir: ctnl.TupleReply, tuple: reply, zone: zone, id: id}
}

// delete is f's delete (ctnl.DeleteMsg).
func (f ctHeldFlow) delete() (netlink.Message, bool) {
	return ctnl.DeleteMsg(f.family, f.dir, f.tuple, f.zone, f.id)
}

// deleteMatching is the generic walk's (Server.walkConntrackGeneric,
// kernels without CTA_FILTER) dump and deletes: one dump of family fam's
// whole table, unfiltered in the kernel; each entry one of fs matches
// (netlink's filters and pcpd's own around them: keepHost, keepLive,
// keepAdmitted, keepSNATted, natFlowFilter) is deleted as the
// kernel-filtered walk deletes (ctHeldFlow.delete: its reply tuple and
// CTA_ID), pipelined (deleteAll); it returns how many deletes succeeded.
// A dump the kernel marks inconsistent (NLM_F_DUMP_INTR) has what it
// found deleted and fails (walked again).
//
// Before (h/genwalk), netlink's ConntrackDeleteFilters deleted with the
// dump's own attributes: the kernel found the entry by its original tuple
// and checked CTA_ID, which an entry of the same original tuple made since
// at the freed one's address has too, so a flow the walk never judged,
// delivered elsewhere (DNAT-ed to another port), was deleted
// (TestE2EGenericWalkDeletesRemadeFlow); and it waited for each delete's
// answer in turn, and parsed every entry of the table into netlink's
// structures (BenchmarkCtGenericWalk: 96 MB and 6.5 M allocations a walk
// over 100 000 entries).
func (d *ctDeleter) deleteMatching(fam uint8, fs ...vnl.CustomConntrackFilter) (int, error) {
	var intr error
	var fl vnl.ConntrackFlow // one for every entry: the filters keep none
	var dels []netlink.Message
	// Streamed (one read's worth at a time): read whole (Execute), the
	// dump of 100 000 entries took 64 MB (BenchmarkCtGenericWalk).
	_, err := ctnl.Dump(d.c, fam, nil, func(f *ctnl.Flow) bool {
		if f.Interrupted {
			intr = errCtDumpInterrupted
		}
		orig, reply, zone, id, ok := ctFlowOf(&fl, f.Family, f.Attrs)
		if !ok || !slices.ContainsFunc(fs, func(f vnl.CustomConntrackFilter) bool { return f.MatchConntrackFlow(&fl) }) {
			return false
		}
		// DeleteMsg copies what it names the entry by out of the read
		// buffer.
		if del, ok := heldFlow(f.Family, orig, reply, zone, id).delete(); ok {
			dels = append(dels, del)
		}
		return false
	})
	if err != nil {
		return 0, fmt.Errorf("server: conntrack dump (generic): %w", err)
	}
	n, err := d.deleteAll(dels)
	return n, errors.Join(intr, err)
}

// ctaMark is CTA_MARK.
const ctaMark = 8

// ctFlowOf fills fl, as netlink's conntrack filters read a flow, from the
// attributes attrs of a dumped entry of family (its addresses and labels
// alias attrs), and returns the payloads a delete names it by
// (heldFlow); false if its original tuple lacks an address.
func ctFlowOf(fl *vnl.ConntrackFlow, family byte, attrs []byte) (orig, reply, zone, id []byte, ok bool) {
	*fl = vnl.ConntrackFlow{FamilyType: family}
	ctnl.Attrs(attrs, func(typ uint16, v []byte) {
		switch typ {
		case ctnl.TupleOrig:
			orig = v
			ctIPTupleOf(&fl.Forward, v)
		case ctnl.TupleReply:
			reply = v
			ctIPTupleOf(&fl.Reverse, v)
		case ctnl.Zone:
			zone = v
			if len(v) == 2 {
				fl.Zone = binary.BigEndian.Uint16(v)
			}
		case ctnl.ID:
			id = v
		case ctnl.Labels:
			fl.Labels = v
		case ctaMark:
			if len(v) == 4 {
				fl.Mark = binary.BigEndian.Uint32(v)
			}
		}
	})
	return orig, reply, zone, id, fl.Forward.SrcIP != nil && fl.Forward.DstIP != nil
}

// ctIPTupleOf fills t from a tuple's payload b (addresses aliasing b), as
// netlink's own parser does.
func ctIPTupleOf(t *vnl.IPTuple, b []byte) {
	ctnl.Attrs(b, func(typ uint16, v []byte) {
		switch typ {
		case ctnl.TupleIP:
			ctnl.Attrs(v, func(typ uint16, v []byte) {
				if len(v) != net.IPv4len && len(v) != net.IPv6len {
					return
				}
				switch typ {
				case ctnl.IPv4Src, ctnl.IPv6Src:
					t.SrcIP = net.IP(v)
				case ctnl.IPv4Dst, ctnl.IPv6Dst:
					t.DstIP = net.IP(v)
				}
			})
		case ctnl.TupleProto:
			ctnl.Attrs(v, func(typ uint16, v []byte) {
				switch {
				case typ == ctnl.ProtoNum && len(v) == 1:
					t.Protocol = v[0]
				case typ == ctnl.ProtoSrcPort && len(v) == 2:
					t.SrcPort = binary.BigEndian.Uint16(v)
				case typ == ctnl.ProtoDstPort && len(v) == 2:
					t.DstPort = binary.BigEndian.Uint16(v)
				}
			})
		}
	})
}

// cmpCtTarget is cmpCtFilter without what a wildcard filter keeps in the
// SNAT fields (its end): the first of a target's filters is found.
func cmpCtTarget(a, b ctFilter) int {
	a.src4, a.sport, b.src4, b.sport = [4]byte{}, 0, [4]byte{}, 0
	return cmpCtFilter(a, b)
}

// ctHashSize is conntrack's hash table size (ctnl.HashSize; a variable
// for tests).
var ctHashSize = ctnl.HashSize

// errCtFilterRefused marks a kernel-filtered dump the kernel refused
// (EINVAL, EOPNOTSUPP: it does not take the filter); the walk goes on
// generic, on the same socket (walkCt).
var errCtFilterRefused = errors.New("filter refused")

var errCtDumpInterrupted = errors.New("server: conntrack dump interrupted (NLM_F_DUMP_INTR)")

// ctDeleteMsg is the delete of the flow whose CTA_TUPLE_ORIG payload is
// orig (in zone, if any), without NLM_F_ACK (deleteAll's tests; the walk
// deletes by what it dumped: ctHeldFlow.delete).
func ctDeleteMsg(family byte, orig, zone []byte) (netlink.Message, bool) {
	return ctnl.DeleteMsg(family, ctnl.TupleOrig, orig, zone, nil)
}

// ctDeleteChunk is how many deletes go in one sendmsg: the kernel's
// errors for a whole chunk (≈ 150 bytes each) fit the socket's receive
// buffer.
const ctDeleteChunk = 256

// deleteAll sends dels (conntrack deletes without NLM_F_ACK: the kernel
// answers only a failure) in chunks, each closed by an acknowledged
// NLMSG_NOOP, whose ack says the chunk is done; it returns how many
// deletes succeeded. One at a time, each waiting for its ack, the deletes
// took ≈ 40 µs each, most of a walk ending 10 000 flows (BENCHMARKS.md).
func (d *ctDeleter) deleteAll(dels []netlink.Message) (int, error) {
	n := 0
	var errs []error
	defer d.c.SetReadDeadline(time.Time{})
	for len(dels) > 0 {
		k := min(len(dels), ctDeleteChunk)
		chunk := append(dels[:k:k], netlink.Message{Header: netlink.Header{Type: netlink.Noop, Flags: netlink.Request | netlink.Acknowledge}})
		dels = dels[k:]
		sent, err := d.c.SendMessages(chunk)
		if err != nil {
			return n, errors.Join(append(errs, fmt.Errorf("server: conntrack delete: %w", err))...)
		}
		end := sent[len(sent)-1].Header.Sequence
		d.c.SetReadDeadline(time.Now().Add(5 * time.Second))
		failed := 0
		for done := false; !done; {
			ms, err := d.c.Receive()
			var oe *netlink.OpError
			switch {
			case err == nil:
				for _, m := range ms {
					done = done || m.Header.Sequence == end
				}
			case errors.Is(err, unix.ENOBUFS):
				// The kernel dropped answers: failures (uncounted) and
				// maybe the NOOP's ack. Waiting for that ack stalled
				// till the deadline, and the chunks after were never
				// sent (TestCtDeleteAll): ask for another and wait
				// for it instead.
				d.overflowed = true
				seq, err := d.resync()
				if err != nil {
					return n, errors.Join(append(errs, fmt.Errorf("server: conntrack delete: %w", err))...)
				}
				end = seq
			case errors.As(err, &oe) && oe.Err != nil && !errors.Is(err, os.ErrDeadlineExceeded):
				// One delete's failure: gone meanwhile (ENOENT), or not.
				failed++
				if !errors.Is(err, unix.ENOENT) {
					errs = append(errs, err)
				}
			default:
				return n, errors.Join(append(errs, fmt.Errorf("server: conntrack delete: %w", err))...)
			}
		}
		n += k - failed
	}
	return n, errors.Join(errs...)
}

// resync drains the socket after an overflow and sends a new acknowledged
// NOOP, whose sequence it returns. The kernel answers a sendmsg's
// messages as it handles them, before the call returns, so everything a
// chunk will get is queued by now; and until the queue was emptied once
// (NETLINK_S_CONGESTED), it drops every further answer, the new NOOP's
// ack included.
func (d *ctDeleter) resync() (uint32, error) {
	// At most a chunk's answers (and those of earlier NOOPs) are queued.
	for range 4 * ctDeleteChunk {
		d.c.SetReadDeadline(time.Now().Add(10 * time.Millisecond))
		if _, err := d.c.Receive(); errors.Is(err, os.ErrDeadlineExceeded) {
			break
		}
	}
	d.c.SetReadDeadline(time.Now().Add(5 * time.Second))
	m, err := d.c.Send(netlink.Message{Header: netlink.Header{Type: netlink.Noop, Flags: netlink.Request | netlink.Acknowledge}})
	return m.Header.Sequence, err
}

// ctTuple is a CTA_TUPLE_ORIG or CTA_TUPLE_REPLY payload.
type ctTuple struct {
	src, dst netip.AddrPort
	proto    uint8
}

// ctTupleOf reads a tuple payload of an IPv4 flow (v4) or an IPv6 one;
// false if its protocol or an address is missing, or one port only. Ports
// are 0 if it has none (ICMPv6, GRE, ...: the all-protocols group's flows;
// a flow of a protocol with ports always has them).
func ctTupleOf(b []byte, v4 bool) (ctTuple, bool) {
	var d ctnl.Tuple
	if !ctnl.DecodeTuple(b, &d) || !d.ProtoOK || d.SportOK != d.DportOK || !d.HasAddrs() || d.Src.Is4() != v4 || d.Dst.Is4() != v4 {
		return ctTuple{}, false
	}
	return ctTuple{src: netip.AddrPortFrom(d.Src, d.Sport), dst: netip.AddrPortFrom(d.Dst, d.Dport), proto: d.Proto}, true
}
