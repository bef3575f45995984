package pinhole

import (
	"encoding/binary"
	"errors"
	"hash/fnv"
	"slices"
	"sync"
	"sync/atomic"

	"github.com/google/nftables"
	"github.com/mdlayher/netlink"
	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"
)

// Skipping an unchanged read (h/nftgen, issue 9 and 8): ForeignDNAT reads
// every prerouting nat rule of the host's other tables (8.7 ms at 1 000
// rules, 112-116 ms at 10 000), every 2 s in the background while ports
// are allocated and inline, under the engine's lock, for the first
// allocation after 10 s without one. It now reads only when something
// that can change its answer may have changed since the last good read:
//
//   - a transaction committed by a socket other than the Backend's own
//     kept ones. The kernel tells every commit with an NFT_MSG_NEWGEN
//     notification whose nlmsg_pid is the committing socket's port id,
//     queued to every NFNLGRP_NFTABLES listener before the commit's
//     acknowledgement, after its changes are visible, and with ENOBUFS
//     set on the listener if it cannot be (nf_tables_gen_notify). A
//     socket of ForeignDNAT's own hears them; a socket filter drops the
//     Backend's own in the kernel (pcpd commits per MAP: under load they
//     would fill its buffer between reads), so only others' are queued.
//     pcpd's own transactions write only its own table and chains, which
//     the read leaves out: they cannot change its answer.
//   - a named set or map the last read looked into whose elements
//     changed without a commit: the packet path adds to a set or map a
//     rule's "add @s"/"update @s" targets (a map, or a set with timeouts,
//     takes them without the dynamic flag: checked, Linux 6.18), and
//     elements time out. Each such set (not a constant one: anonymous
//     sets are) is dumped again at the check and compared with what the
//     read saw (setPrint): a dump per set, not the ruleset's.
//   - a table with the owner flag (NFT_TABLE_F_OWNER: a daemon's, bound
//     to its netlink socket) there at the last read and gone: the kernel
//     destroys it when its owner's socket closes (the daemon exits or
//     crashes) without a commit, a notification or a new generation
//     (nft_rcv_nl_event; checked, Linux 6.18). The tables are dumped
//     again at the check only while the last read saw such a table
//     (review h/revgen: before, its forwards stayed reserved until
//     another process committed, on a quiet host for good).
//   - anything unknown: the socket just opened, failed or overran (any
//     error on it), the read failed, other arguments. Then it reads.
//
// The socket is drained (without blocking) right before a read begins, so
// a commit that completes during the read is told after it: the read is
// made again at once (readForeignAt, review h/revf4: it may mix two
// generations), up to foreignTries times, and the next call reads again. Not the generation id (NFT_MSG_GETGEN): pcpd's own
// commits move it (every MAP), so it would rarely stay still under load;
// and GETGEN reads it without the commit lock, while the kernel moves it
// before the commit's changes are visible (nf_tables_commit: base_seq,
// then the generation cursor, the elements and the notifications): a read
// recorded at generation g could miss the commit g itself, and a later
// check, finding g again, keep that read for good.
//
// Trusted as pcpd's own are only the port ids of its kept sockets (live:
// a port id is unique among a namespace's live netlink sockets), not the
// ring of one-call ones the watcher also leaves out, whose ports another
// process may be given once they are closed: their rare commits (a second
// Healthy's sentinels, a set's gc interval) count as someone else's, a
// read more.
type foreignGen struct {
	mu sync.Mutex // c (refilter runs from ownPorts.record)
	c  *netlink.Conn
	// clean: c was open and drained right before the last read began,
	// that read succeeded, and nothing told since.
	clean bool
	// told: another socket's commit, an overrun, an error or a taint
	// since the last toldSince (readForeignAt's tries).
	told bool
	last *ForeignDNAT
	args foreignArgs
	sets []setPrint // the non-constant named sets the last read looked into
	// owned are the ip and inet tables with the owner flag when the last
	// read began (ownedTables): the kernel destroys one without a commit.
	owned []tableKey
	reads atomic.Uint64
	skips atomic.Uint64
	fake  bool   // the Backend's connection is fake-dialled (tests): no socket, every call reads
	buf   []byte // drain's, under mu
}

// foreignArgs are ForeignDNAT's arguments: a read is kept for the same.
type foreignArgs struct {
	ext         [4]byte
	valid       bool
	first, last uint16
	ifs         string // the external address's interfaces (extInterfaces)
}

// setPrint is a named set as a read saw it: a fingerprint of its
// elements (keys, key ends, data; not their expiry, which moves).
type setPrint struct {
	set   *nftables.Set
	print uint64
}

// ForeignReads are ForeignDNAT's calls that read the host's ruleset and
// those answered from the last read (nothing changed since): tests and
// benchmarks.
func (b *Backend) ForeignReads() (read, skipped uint64) {
	return b.foreignGen.reads.Load(), b.foreignGen.skips.Load()
}

// unchanged reports whether the last read still holds for args (caller
// holds b.foreignMu): told nothing, and every set it looked into the same
// (read over c). Any doubt is a change.
func (g *foreignGen) unchanged(b *Backend, c *nftables.Conn, args foreignArgs) bool {
	if !g.drain(b) || g.last == nil || g.args != args {
		return false
	}
	if len(g.owned) > 0 {
		if now, err := ownedTables(c); err != nil || !slices.Equal(now, g.owned) {
			return false
		}
	}
	for _, s := range g.sets {
		els, err := c.GetSetElements(s.set)
		if err != nil || printOf(els) != s.print {
			return false
		}
	}
	return true
}

// tableFlagOwner is NFT_TABLE_F_OWNER.
const tableFlagOwner = 0x2

// ownedTables are the ip and inet tables (those the read reads) with the
// owner flag, in the kernel's order.
func ownedTables(c *nftables.Conn) ([]tableKey, error) {
	ts, err := c.ListTables()
	if err != nil {
		return nil, err
	}
	var out []tableKey
	for _, t := range ts {
		if tableFlags(t)&tableFlagOwner != 0 && (t.Family == nftables.TableFamilyIPv4 || t.Family == nftables.TableFamilyINet) {
			out = append(out, keyOf(t))
		}
	}
	return out, nil
}

// drain reads what the socket was told (opening it first: then nothing
// is known) and reports whether the last read still holds by it: clean,
// and no other socket's commit or error since.
func (g *foreignGen) drain(b *Backend) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.c == nil {
		g.clean = false
		if g.fake || g.open(b) != nil {
			return false
		}
		return false // opened now: what came before is unknown
	}
	own := b.ports.keptList()
	if g.buf == nil {
		g.buf = make([]byte, 8192)
	}
	buf := g.buf
	for {
		var n int
		var rerr error
		err := rawControl(g.c, func(fd uintptr) {
			n, _, rerr = unix.Recvfrom(int(fd), buf, unix.MSG_DONTWAIT)
		})
		switch {
		case err != nil || (rerr != nil && !errors.Is(rerr, unix.EAGAIN) && !errors.Is(rerr, unix.EINTR) && !errors.Is(rerr, unix.ENOBUFS)):
			g.close() // broken: opened again at the next call
			return false
		case errors.Is(rerr, unix.EAGAIN):
			return g.clean
		case rerr != nil: // ENOBUFS (overrun, a notification the kernel could not send), EINTR
			g.clean, g.told = false, true
			continue
		}
		if !othersGen(buf[:n], own) {
			continue
		}
		g.clean, g.told = false, true
	}
}

// toldSince drains the socket (without opening it) and reports whether it
// was open (known) and told another socket's commit, an overrun or a
// taint since the last call (told), forgetting it: readForeignAt's check
// that no other process committed during a try.
func (g *foreignGen) toldSince(b *Backend) (known, told bool) {
	g.mu.Lock()
	open := g.c != nil
	g.mu.Unlock()
	if open {
		g.drain(b)
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	known, told = open && g.c != nil, g.told
	g.told = false
	return known, told
}

// ruleGen is the ruleset's generation (NFT_MSG_GETGEN's NFTA_GEN_ID: the
// kernel's base_seq). The library (v0.3.0) has no call for it.
func ruleGen(c *netlink.Conn) (uint32, error) {
	msgs, err := c.Execute(netlink.Message{
		Header: netlink.Header{Type: netlink.HeaderType(unix.NFNL_SUBSYS_NFTABLES<<8 | unix.NFT_MSG_GETGEN), Flags: netlink.Request},
		Data:   []byte{unix.AF_UNSPEC, unix.NFNETLINK_V0, 0, 0},
	})
	if err != nil {
		return 0, err
	}
	for _, m := range msgs {
		if len(m.Data) < 4 {
			continue
		}
		ad, err := netlink.NewAttributeDecoder(m.Data[4:])
		if err != nil {
			return 0, err
		}
		ad.ByteOrder = binary.BigEndian
		for ad.Next() {
			if ad.Type() == unix.NFTA_GEN_ID {
				return ad.Uint32(), nil
			}
		}
	}
	return 0, errors.New("pinhole: no generation in the answer")
}

// othersGen reports whether the messages in p tell a commit of a socket
// not in own, or anything else (the filter passes only NEWGENs): unparsable
// bytes count as such a commit.
func othersGen(p []byte, own []uint32) bool {
	others := false
	for len(p) > 0 {
		if len(p) < unix.NLMSG_HDRLEN {
			return true
		}
		l := binary.NativeEndian.Uint32(p[nlmsgLenOff:])
		typ := binary.NativeEndian.Uint16(p[nlmsgTypeOff:])
		pid := binary.NativeEndian.Uint32(p[nlmsgPidOff:])
		if l < unix.NLMSG_HDRLEN || int(l) > len(p) {
			return true
		}
		if typ != unix.NFNL_SUBSYS_NFTABLES<<8|unix.NFT_MSG_NEWGEN || !slices.Contains(own, pid) {
			others = true
		}
		p = p[min(len(p), int((l+unix.NLMSG_ALIGNTO-1)&^(unix.NLMSG_ALIGNTO-1))):]
	}
	return others
}

// rawControl runs fn on c's file descriptor.
func rawControl(c *netlink.Conn, fn func(fd uintptr)) error {
	rc, err := c.SyscallConn()
	if err != nil {
		return err
	}
	return rc.Control(fn)
}

// open dials the socket in b's namespace, with its filter, and joins the
// nftables group (g.mu held).
func (g *foreignGen) open(b *Backend) error {
	c, err := netlink.Dial(unix.NETLINK_NETFILTER, &netlink.Config{NetNS: b.netns})
	if err != nil {
		return err
	}
	if err := genFilter(c, b.ports.keptList()); err != nil {
		_ = c.Close()
		return err
	}
	if err := c.JoinGroup(unix.NFNLGRP_NFTABLES); err != nil {
		_ = c.Close()
		return err
	}
	g.c = c
	return nil
}

// refilter sets the socket's filter for the Backend's kept ports anew
// (ownPorts.set), as they are now, read under g.mu: of two refilters run
// out of order the last sets the latest list (review h/revgen: each set
// the list it was given, and the last could be an older one, with a
// closed socket's port id). A failure closes the socket: the old filter
// may drop a closed socket's id, and the next call reads.
func (g *foreignGen) refilter(o *ownPorts) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.c != nil && genFilter(g.c, o.keptList()) != nil {
		g.close()
	}
}

// taint makes the next ForeignDNAT read: the watcher was told another
// process's change of a table, chain, rule or set (WatchEvent.Foreign),
// which the generation socket may not have been told yet (each socket is
// queued its copy in turn).
func (g *foreignGen) taint() {
	g.mu.Lock()
	g.clean, g.told = false, true
	g.mu.Unlock()
}

// close closes the socket (g.mu held).
func (g *foreignGen) close() {
	if g.c != nil {
		_ = g.c.Close()
		g.c = nil
	}
	g.clean, g.told = false, true
}

// genFilter sets c's socket filter: it passes an nftables NEWGEN whose
// port id is none of own, and drops the rest (every other notification,
// and the Backend's own commits' generations). A NEWGEN is the only
// message of its skb (nf_tables_gen_notify), so the first message is the
// one judged. Port id 0 passes (not pcpd's).
func genFilter(c *netlink.Conn, own []uint32) error {
	order := hostOrder()
	type ins = bpf.Instruction
	var prog []ins
	prog = append(prog,
		bpf.LoadAbsolute{Off: hostByte(order, nlmsgTypeOff, 2, 1), Size: 1},
		bpf.JumpIf{Cond: bpf.JumpEqual, Val: unix.NFNL_SUBSYS_NFTABLES, SkipFalse: 1},
		bpf.LoadAbsolute{Off: hostByte(order, nlmsgTypeOff, 2, 0), Size: 1},
	)
	// After the three above: a jump to drop or pass, filled in below.
	prog = append(prog, bpf.JumpIf{Cond: bpf.JumpEqual, Val: unix.NFT_MSG_NEWGEN}, bpf.LoadAbsolute{Off: nlmsgPidOff, Size: 4})
	ports := make([]uint32, 0, len(own))
	for _, p := range own {
		if p != 0 {
			var b [4]byte
			order.PutUint32(b[:], p)
			ports = append(ports, binary.BigEndian.Uint32(b[:]))
		}
	}
	for _, p := range ports {
		prog = append(prog, bpf.JumpIf{Cond: bpf.JumpEqual, Val: p})
	}
	pass := len(prog)
	prog = append(prog, bpf.RetConstant{Val: 0xffffffff}, bpf.RetConstant{Val: 0})
	drop := pass + 1
	if len(prog) > 255 {
		return errors.New("pinhole: generation filter too long")
	}
	// Fill in the jumps: not nftables (index 1, false) and not NEWGEN
	// (index 3, false) drop; an own port (5...) drops.
	j := prog[1].(bpf.JumpIf)
	j.SkipFalse = uint8(drop - 1 - 1)
	prog[1] = j
	j = prog[3].(bpf.JumpIf)
	j.SkipFalse = uint8(drop - 3 - 1)
	prog[3] = j
	for i := 5; i < pass; i++ {
		j := prog[i].(bpf.JumpIf)
		j.SkipTrue = uint8(drop - i - 1)
		prog[i] = j
	}
	raw, err := bpf.Assemble(prog)
	if err != nil {
		return err
	}
	return c.SetBPF(raw)
}

// printOf is a fingerprint of a set's elements, whatever their order.
func printOf(els []nftables.SetElement) uint64 {
	keys := make([]string, 0, len(els))
	for _, e := range els {
		var b []byte
		for _, f := range [][]byte{e.Key, e.KeyEnd, e.Val} {
			b = binary.BigEndian.AppendUint32(b, uint32(len(f)))
			b = append(b, f...)
		}
		flags := byte(0)
		if e.IntervalEnd {
			flags |= 1
		}
		b = append(b, flags)
		if v := e.VerdictData; v != nil {
			b = binary.BigEndian.AppendUint32(b, uint32(v.Kind))
			b = append(b, v.Chain...)
		}
		keys = append(keys, string(b))
	}
	slices.Sort(keys)
	h := fnv.New64a()
	for _, k := range keys {
		_, _ = h.Write(binary.BigEndian.AppendUint32(nil, uint32(len(k))))
		_, _ = h.Write([]byte(k))
	}
	return h.Sum64()
}
