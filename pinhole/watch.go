package pinhole

import (
	"context"
	"encoding/binary"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/nftables"
	"github.com/mdlayher/netlink"
	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"
)

// The watcher: the kernel's nftables notifications (NFNLGRP_NFTABLES) in
// the Backend's namespace, so that someone else's change to pcpd's
// objects is noticed when it is committed, not at the server's next
// Healthy (issue 9). The kernel sends one message per object or element
// a transaction adds or deletes, pcpd's own included (one per element of
// every MAP), to every listener; a socket filter (watchFilter) drops in
// the kernel what the Backend's own sockets committed (by the message's
// nlmsg_pid, the committing socket's port id), what the kernel itself
// sent (port id 0: no element the kernel's garbage collection removed is
// ever told of here), the generation messages, messages of one set,
// object or flowtable added, and those of one element added to another
// table than pcpd's; the rest is read and judged here (judge).

// WatchEvent is one batch of what the watcher read: someone else's
// changes to pcpd's objects.
type WatchEvent struct {
	// Damage, if not empty, says what of pcpd's layout someone deleted
	// or changed (a table, chain, rule or set, a sentinel, an element of
	// a set Healthy compares): Healthy would find it; check and repair.
	Damage string
	// Deleted are the pinholes whose elements (or SNAT companions)
	// someone deleted from pcpd's sets, as List returns them.
	Deleted []Pinhole
	// Added are the pinholes whose elements (or SNAT companions) someone
	// added to pcpd's sets, or re-added with another timeout (Linux >=
	// 6.10 updates an existing element's timeout in place), each with the
	// expiry the kernel was given (Remaining; 0: none, the element is
	// permanent). pcpd's sets hold only what its leases explain: the
	// caller removes what no lease holds and cuts the rest back to its
	// lease (h/fwadd). Before, an added element was never told: a hole
	// opened by hand lived up to the hourly audit, and one re-added with
	// a longer timeout outlived its lease.
	Added []Entry
	// By are the netlink port ids that committed them (for logs).
	By []uint32
	// Lost: the watcher's socket failed (ENOBUFS: the kernel dropped
	// notifications it had no room for); anything may have been missed.
	// The watcher has reopened its socket.
	Lost error
}

// watchBuffer is the watcher's receive buffer. Only someone else's
// changes reach it; a reload of a large ruleset by the admin is the
// burst it must hold (≈ 100 bytes a rule).
var watchBuffer = 4 << 20 // a variable for tests only: SetWatchBuffer

// ownPorts are the port ids of the Backend's own netlink sockets: those
// of its kept connections (kept: the main connection, Healthy's and
// List's), whatever else is dialled, and the ownPortsKept latest others
// (ring: sockets dialled for one call, kept ones replaced; a socket
// closed may still have notifications queued at the watcher, read after
// its close). Before (review h/revnftmon), the kept connections' ports
// were in the ring too: 16 sockets dialled since (Healthy's kept socket
// is dialled again after every check that found damage, a Healthy beside
// another dials one each time) pushed the main connection's port out, and
// every write of pcpd's was told as someone else's: its deletes as
// deleted pinholes, its Setup as damage, and, where an install re-creates
// the element (no in-place timeout update: Linux < 6.10, or a timeout of
// 100 ms or less), the server's own putting back told as a deletion
// again, round after round (TestWatchOwnPortsPastTheRing).
type ownPorts struct {
	mu   sync.Mutex
	kept [numKeptPorts]uint32
	ring []uint32
	next int
	cur  atomic.Pointer[[]uint32]
	// watchers are told of a new list (their filters), and gen of the
	// kept ports (ForeignDNAT's generation socket's filter: foreigngen.go).
	watchers []*watcher
	gen      *foreignGen
}

const ownPortsKept = 16

// The Backend's kept connections, each a slot of ownPorts.kept.
const (
	keptMain = iota
	keptHealth
	keptList
	keptFlowed // flowed6's (ForgetFlowed, Reflowed, RegainFlowed)
	numKeptPorts
)

// note records the port id of nl, a socket of the Backend's dialled for
// one call (a ring entry).
func (o *ownPorts) note(nl *netlink.Conn) { o.record(-1, nl) }

// keep records the port id of nl, the kept connection of slot (keptMain
// ...), in place of the one before, which goes to the ring.
func (o *ownPorts) keep(slot int, nl *netlink.Conn) { o.record(slot, nl) }

// forget moves the port id of nl, the kept connection of slot about to
// be closed, from kept to the ring, before the close (review h/revgen):
// ForeignDNAT's generation filter trusts only live sockets' ids, and a
// closed socket's id is free for another process's socket; until the
// slot's next dial (Healthy's after a failed check: the next check) the
// filter dropped that process's commits as pcpd's own.
func (o *ownPorts) forget(slot int, nl *netlink.Conn) {
	if nl == nil {
		return
	}
	if port, ok := portOf(nl); ok {
		o.set(slot, port, true)
	}
}

func (o *ownPorts) record(slot int, nl *netlink.Conn) {
	if nl == nil {
		return
	}
	port, ok := portOf(nl)
	if !ok {
		return
	}
	o.set(slot, port, false)
}

// set records port: in the ring (slot -1), as slot's kept port (the one
// before to the ring), or, forget, out of slot if it is slot's (to the
// ring); then the filters are set anew.
func (o *ownPorts) set(slot int, port uint32, forget bool) {
	o.mu.Lock()
	push := port
	switch {
	case forget && o.kept[slot] != port:
		o.mu.Unlock()
		return
	case forget:
		o.kept[slot] = 0
	case slot >= 0:
		push, o.kept[slot] = o.kept[slot], port
	}
	if push != 0 && !slices.Contains(o.ring, push) {
		if len(o.ring) < ownPortsKept {
			o.ring = append(o.ring, push)
		} else {
			o.ring[o.next] = push
			o.next = (o.next + 1) % ownPortsKept
		}
	}
	list := make([]uint32, 0, numKeptPorts+len(o.ring))
	for _, p := range append(o.kept[:], o.ring...) {
		if p != 0 && !slices.Contains(list, p) {
			list = append(list, p)
		}
	}
	o.cur.Store(&list)
	ws := slices.Clone(o.watchers)
	o.mu.Unlock()
	for _, w := range ws {
		w.refilter(list)
	}
	if o.gen != nil && slot >= 0 {
		o.gen.refilter(o)
	}
}

// keptList is the port ids of the Backend's kept connections: live
// sockets (ForeignDNAT trusts only these as its own: foreigngen.go).
func (o *ownPorts) keptList() []uint32 {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.keptLocked()
}

func (o *ownPorts) keptLocked() []uint32 {
	var out []uint32
	for _, p := range o.kept {
		if p != 0 {
			out = append(out, p)
		}
	}
	return out
}

// list is the port ids known.
func (o *ownPorts) list() []uint32 {
	if p := o.cur.Load(); p != nil {
		return *p
	}
	return nil
}

func (o *ownPorts) has(port uint32) bool { return slices.Contains(o.list(), port) }

// portOf is the port id the kernel bound nl to.
func portOf(nl *netlink.Conn) (uint32, bool) {
	rc, err := nl.SyscallConn()
	if err != nil {
		return 0, false
	}
	var port uint32
	var ok bool
	_ = rc.Control(func(fd uintptr) {
		sa, err := unix.Getsockname(int(fd))
		if nsa, isNL := sa.(*unix.SockaddrNetlink); err == nil && isNL {
			port, ok = nsa.Pid, true
		}
	})
	return port, ok
}

// OwnPorts are the port ids of the Backend's own netlink sockets that
// the watcher leaves out (tests).
func (b *Backend) OwnPorts() []uint32 { return b.ports.list() }

// watchOwnPorts: the filter leaves out the Backend's own ports (tests turn
// it off to show what the server decides on its own).
var watchOwnPorts atomic.Bool

func init() { watchOwnPorts.Store(true) }

// SetWatchOwnPorts sets whether the watcher leaves out what the Backend's
// own sockets commit (default true), in the kernel's filter and when it
// judges a message; and returns the old setting. Tests only: with false,
// every pinhole element pcpd deletes reaches the caller as Deleted, which
// must then tell its own deletes from someone else's by its leases alone
// (pcpd's own writes are never told as Damage).
func SetWatchOwnPorts(on bool) bool { return watchOwnPorts.Swap(on) }

// Message types and an attribute golang.org/x/sys/unix does not name
// (linux/netfilter/nf_tables.h): the DESTROY commands (Linux 6.3) are
// told as such.
const (
	nftMsgDestroyTable   = 26
	nftMsgDestroyChain   = 27
	nftMsgDestroyRule    = 28
	nftMsgDestroySet     = 29
	nftMsgDestroySetElem = 30
	nftaSetElemKeyEnd    = 10
)

// Fields of a netlink message header, in the host's byte order.
const (
	nlmsgLenOff  = 0  // u32
	nlmsgTypeOff = 4  // u16: low byte the nftables message type, high byte the nfnetlink subsystem
	nlmsgPidOff  = 12 // u32
)

// hostByte is the offset of the i-th least significant byte of a
// size-byte field at off stored in order (the host's: netlink headers
// are in host byte order, and classic BPF loads bytes where they lie).
func hostByte(order binary.ByteOrder, off, size, i uint32) uint32 {
	if order == binary.ByteOrder(binary.BigEndian) {
		return off + size - 1 - i
	}
	return off + i
}

// hostOrder is the host's byte order as the filter needs it: big or
// little endian (binary.NativeEndian is neither value).
func hostOrder() binary.ByteOrder {
	if binary.NativeEndian.Uint16([]byte{0, 1}) == 1 {
		return binary.BigEndian
	}
	return binary.LittleEndian
}

// watchFilter is the socket filter for ports (the Backend's own) and
// table (pcpd's): it drops a notification skb whose first message was
// sent by one of ports or by the kernel (port 0), a NEWGEN, a
// single-message skb that adds a set, an object or a flowtable, and one
// that adds a set element to another table than table; it passes the
// rest. Elements added to table pass (h/fwadd): pcpd's own are dropped by
// their port, and the packet path's (dynset: "update @meter", "add @set",
// meters) are never notified (checked: Linux 6.18), so what passes is
// someone else's add; other tables' single adds (fail2ban, another
// controller) still stop in the kernel. The
// kernel gathers a transaction's notifications into skbs of up to a page
// or two, all from one committer, so the port of the first message is
// every message's; their types may differ (pcpd's delete is an add and a
// delete of the element), so an skb of several messages is passed
// whatever its first message's type. Classic BPF loads words in network
// byte order: the port is compared as its bytes lie in the host's order,
// the type and length read a byte at a time where the host's order puts
// them (watchFilterFor; a test runs both orders).
func watchFilter(ports []uint32, table string) ([]bpf.RawInstruction, error) {
	return watchFilterFor(ports, table, hostOrder())
}

// The first attribute of a NEWSETELEM notification: the table's name
// (NFTA_SET_ELEM_LIST_TABLE, put first by nf_tables_fill_setelem_info),
// after the netlink and nfgenmsg headers.
const (
	elemTableAttrOff = unix.NLMSG_HDRLEN + 4 // nla_len (u16), nla_type (u16), in the host's order
	elemTableNameOff = elemTableAttrOff + 4  // the name, NUL ended, zero padded to 4 bytes
	// maxFilteredTable: a longer table name is not compared in the
	// filter (its length bounds the program): single adds to any table
	// then pass and are judged in userspace.
	maxFilteredTable = 63
)

// watchFilterFor is watchFilter for a host of byte order order.
func watchFilterFor(ports []uint32, table string, order binary.ByteOrder) ([]bpf.RawInstruction, error) {
	const (
		drop   = "drop"
		pass   = "pass"
		single = "single"
		elem   = "elem"
	)
	type ins struct {
		i            bpf.Instruction
		jtrue, jfals string // labels of a conditional jump
	}
	var prog []ins
	add := func(i bpf.Instruction) { prog = append(prog, ins{i: i}) }
	jeq := func(v uint32, to string) {
		prog = append(prog, ins{i: bpf.JumpIf{Cond: bpf.JumpEqual, Val: v}, jtrue: to})
	}
	jne := func(v uint32, to string) {
		prog = append(prog, ins{i: bpf.JumpIf{Cond: bpf.JumpEqual, Val: v}, jfals: to})
	}
	labels := map[string]int{}
	label := func(name string) { labels[name] = len(prog) }

	// Not nftables (nfnetlink subsystem): not ours to judge, passed.
	add(bpf.LoadAbsolute{Off: hostByte(order, nlmsgTypeOff, 2, 1), Size: 1})
	prog = append(prog, ins{i: bpf.JumpIf{Cond: bpf.JumpEqual, Val: unix.NFNL_SUBSYS_NFTABLES}, jfals: pass})
	add(bpf.LoadAbsolute{Off: nlmsgPidOff, Size: 4})
	jeq(0, drop)
	for _, p := range ports {
		var b [4]byte
		order.PutUint32(b[:], p)
		jeq(binary.BigEndian.Uint32(b[:]), drop)
	}
	add(bpf.LoadAbsolute{Off: hostByte(order, nlmsgTypeOff, 2, 0), Size: 1})
	jeq(unix.NFT_MSG_NEWGEN, drop)
	jeq(unix.NFT_MSG_NEWSETELEM, elem)
	for _, t := range []uint32{unix.NFT_MSG_NEWSET, unix.NFT_MSG_NEWOBJ, unix.NFT_MSG_NEWFLOWTABLE} {
		jeq(t, single)
	}
	add(bpf.RetConstant{Val: 0xffffffff})
	// alone jumps to ifAlone if the skb holds its first message alone,
	// else to otherwise: the first message's length (u32 in the host's
	// order; < 64 KiB: its two low bytes) against the skb's.
	alone := func(ifAlone, otherwise string) {
		add(bpf.LoadAbsolute{Off: hostByte(order, nlmsgLenOff, 4, 1), Size: 1})
		add(bpf.ALUOpConstant{Op: bpf.ALUOpShiftLeft, Val: 8})
		add(bpf.TAX{})
		add(bpf.LoadAbsolute{Off: hostByte(order, nlmsgLenOff, 4, 0), Size: 1})
		add(bpf.ALUOpX{Op: bpf.ALUOpOr})
		add(bpf.TAX{})
		add(bpf.LoadExtension{Num: bpf.ExtLen})
		prog = append(prog, ins{i: bpf.JumpIfX{Cond: bpf.JumpEqual}, jtrue: ifAlone, jfals: otherwise})
	}
	label(elem)
	// One element added (a transaction's several are passed, as before):
	// passed iff its table is table. The attribute's length and type,
	// then the name a word at a time (in the message's byte order: a
	// string), NUL and padding included; any difference drops it.
	alone("elemAlone", pass)
	label("elemAlone")
	if name := append([]byte(table), 0); len(table) > 0 && len(table) <= maxFilteredTable {
		for len(name)%4 != 0 {
			name = append(name, 0)
		}
		for i, v := range []uint32{uint32(4 + len(table) + 1), 0, unix.NFTA_SET_ELEM_LIST_TABLE, 0} {
			add(bpf.LoadAbsolute{Off: hostByte(order, elemTableAttrOff+uint32(i/2)*2, 2, uint32(i%2)), Size: 1})
			jne(v, drop)
		}
		for off := 0; off < len(name); off += 4 {
			add(bpf.LoadAbsolute{Off: elemTableNameOff + uint32(off), Size: 4})
			jne(binary.BigEndian.Uint32(name[off:]), drop)
		}
	}
	add(bpf.RetConstant{Val: 0xffffffff})
	label(single)
	alone(drop, pass)
	label(pass)
	add(bpf.RetConstant{Val: 0xffffffff})
	label(drop)
	add(bpf.RetConstant{Val: 0})

	out := make([]bpf.Instruction, len(prog))
	for i, in := range prog {
		skip := func(to string) uint8 {
			if to == "" {
				return 0
			}
			return uint8(labels[to] - i - 1)
		}
		switch j := in.i.(type) {
		case bpf.JumpIf:
			j.SkipTrue, j.SkipFalse = skip(in.jtrue), skip(in.jfals)
			out[i] = j
		case bpf.JumpIfX:
			j.SkipTrue, j.SkipFalse = skip(in.jtrue), skip(in.jfals)
			out[i] = j
		default:
			out[i] = in.i
		}
	}
	if len(out) > 255 {
		return nil, fmt.Errorf("pinhole: watch filter too long (%d)", len(out))
	}
	return bpf.Assemble(out)
}

// watcher is one Watch: its socket, reopened after errors.
type watcher struct {
	b    *Backend
	fn   func(WatchEvent)
	mu   sync.Mutex
	conn *netlink.Conn
}

// Watch reads the kernel's nftables notifications in the Backend's
// namespace until ctx ends, and calls fn (on Watch's goroutine, in order)
// with what someone else deleted or changed of pcpd's objects, one call
// per batch read. Only pcpd's objects are judged (attached: its own
// chains and sets in the admin's table, and the table). After a receive
// error (ENOBUFS: notifications lost) the socket is reopened (an error to
// open it retried every second) and then fn gets Lost: every change
// after fn's call is told. It returns
// ctx's error, or the first error to open the socket.
func (b *Backend) Watch(ctx context.Context, fn func(WatchEvent)) error {
	return b.WatchJoined(ctx, fn, nil)
}

// WatchJoined is Watch, calling joined (if not nil) once its socket has
// joined the notifications' group, before any fn: every change committed
// after joined's call is told. A caller that dumps the sets (the audit)
// after joined leaves no change unseen by both. Before (h/auditend), the
// caller could not tell when Watch listened: the server's start audit
// could dump a set, a change come, and the watch join after it.
func (b *Backend) WatchJoined(ctx context.Context, fn func(WatchEvent), joined func()) error {
	if b.conn.TestDial != nil {
		return fmt.Errorf("pinhole: watch: %w: a fake-dialled connection", ErrInvalid)
	}
	// The Backend writes on a lasting socket of its own, whose port the
	// filter knows: on the caller's connection (New could not dial one),
	// each flush dials a socket of a new port, and every write of pcpd's
	// would be told as someone else's (review h/revnftmon,
	// TestWatchWithoutOwnConn). Dialled now, or no watch.
	b.mu.Lock()
	if !b.ownConn {
		b.resetConn()
	}
	own := b.ownConn
	b.mu.Unlock()
	if !own {
		return fmt.Errorf("pinhole: watch: %w: no lasting connection of the Backend's own (its writes could not be told from others')", ErrUnhealthy)
	}
	w := &watcher{b: b, fn: fn}
	if err := w.open(); err != nil {
		return err
	}
	if joined != nil {
		joined()
	}
	b.ports.mu.Lock()
	b.ports.watchers = append(b.ports.watchers, w)
	b.ports.mu.Unlock()
	defer func() {
		b.ports.mu.Lock()
		b.ports.watchers = slices.DeleteFunc(b.ports.watchers, func(x *watcher) bool { return x == w })
		b.ports.mu.Unlock()
		w.close()
	}()
	stop := context.AfterFunc(ctx, w.close)
	defer stop()
	// lost is the receive error not told yet: Lost is told once the new
	// socket has joined the group, so that what fn does for it (a check,
	// an audit) comes after the last change not told. Before (review
	// h/revnftmon), Lost came before the reopen: a change committed while
	// fn handled it, or while the reopen failed, was told neither then
	// nor later (TestWatchLostTellsAfterRejoin).
	var lost error
	for ctx.Err() == nil {
		w.mu.Lock()
		c := w.conn
		w.mu.Unlock()
		if c == nil {
			if err := w.open(); err != nil {
				select {
				case <-ctx.Done():
				case <-time.After(time.Second):
				}
			}
			continue
		}
		if lost != nil {
			b.flowedTampered() // a flush of flowed6 may be among what was lost
			fn(WatchEvent{Lost: lost})
			lost = nil
			continue
		}
		msgs, err := receiveHook(c)
		if ctx.Err() != nil {
			break
		}
		if err != nil {
			w.close()
			lost = fmt.Errorf("pinhole: watch: %w", err)
			continue
		}
		if b.flowedChanged(msgs) {
			b.flowedTampered() // flowedlife.go
		}
		ev, foreign, ok := b.judge(msgs)
		if foreign {
			b.foreignGen.taint()
			if h := b.onForeign.Load(); h != nil {
				(*h)()
			}
		}
		if ok {
			fn(ev)
		}
	}
	return ctx.Err()
}

// receiveHook reads c (tests: WatchFailNext makes it fail once).
var receiveHook = func(c *netlink.Conn) ([]netlink.Message, error) { return c.Receive() }

// open dials the watcher's socket in the Backend's namespace, with its
// filter, and joins the nftables group.
func (w *watcher) open() error {
	c, err := netlink.Dial(unix.NETLINK_NETFILTER, &netlink.Config{NetNS: w.b.netns})
	if err != nil {
		return fmt.Errorf("pinhole: watch: %w", err)
	}
	if rc, err := c.SyscallConn(); err == nil {
		var serr error
		_ = rc.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, watchBuffer)
		})
		if serr != nil {
			_ = c.SetReadBuffer(watchBuffer)
		}
	}
	if err := w.setFilter(c, w.b.ports.list()); err != nil {
		_ = c.Close()
		return err
	}
	if err := c.JoinGroup(unix.NFNLGRP_NFTABLES); err != nil {
		_ = c.Close()
		return fmt.Errorf("pinhole: watch: join NFNLGRP_NFTABLES: %w", err)
	}
	w.mu.Lock()
	w.conn = c
	w.mu.Unlock()
	return nil
}

func (w *watcher) setFilter(c *netlink.Conn, ports []uint32) error {
	if !watchOwnPorts.Load() {
		ports = nil
	}
	prog, err := watchFilter(ports, w.b.cfg.Table)
	if err != nil {
		return err
	}
	if err := c.SetBPF(prog); err != nil {
		return fmt.Errorf("pinhole: watch: filter: %w", err)
	}
	return nil
}

// refilter sets the filter anew for the Backend's ports (a socket of its
// own dialled: ownPorts.note). A failure leaves the old filter: the
// messages it passes are judged in userspace as well.
func (w *watcher) refilter(ports []uint32) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.conn != nil {
		_ = w.setFilter(w.conn, ports)
	}
}

func (w *watcher) close() {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.conn != nil {
		_ = w.conn.Close()
		w.conn = nil
	}
}

// ours reports whether an object named name in table is pcpd's:
// standalone, anything in its table; attached, its entry chain and the
// objects named with its prefix.
func (b *Backend) ours(table string) bool { return table == b.cfg.Table }

func (b *Backend) ownName(name string) bool {
	if !b.cfg.Attached {
		return true
	}
	return name == b.cfg.Chain || strings.HasPrefix(name, b.cfg.Chain+"_")
}

// judge turns the messages of one read into a WatchEvent (ok false:
// nothing of pcpd's).
// foreign is whether someone else added, changed or deleted a table,
// chain, rule or set of the ip or inet family that is not pcpd's
// (foreignKind: a host DNAT rule may have come or gone; element changes
// are not, the periodic read looks at the sets it read).
func (b *Backend) judge(msgs []netlink.Message) (ev WatchEvent, foreign, ok bool) {
	var damage []string
	filterOwn := watchOwnPorts.Load()
	for _, m := range msgs {
		if m.Header.Type>>8 != unix.NFNL_SUBSYS_NFTABLES || len(m.Data) < 4 {
			continue
		}
		own := b.ports.has(m.Header.PID)
		if m.Header.PID == 0 || own && filterOwn {
			continue
		}
		fam := m.Data[0]
		if fam != unix.NFPROTO_INET && fam != unix.NFPROTO_IPV4 {
			continue
		}
		typ := int(m.Header.Type & 0xff)
		attrs, err := netlink.NewAttributeDecoder(m.Data[4:])
		if err != nil {
			continue
		}
		attrs.ByteOrder = binary.BigEndian
		var table, name string
		var elems []byte
		tableAttr, nameAttr := uint16(0), uint16(0)
		switch typ {
		case unix.NFT_MSG_NEWTABLE, unix.NFT_MSG_DELTABLE, nftMsgDestroyTable:
			tableAttr = unix.NFTA_TABLE_NAME
		case unix.NFT_MSG_NEWCHAIN, unix.NFT_MSG_DELCHAIN, nftMsgDestroyChain:
			tableAttr, nameAttr = unix.NFTA_CHAIN_TABLE, unix.NFTA_CHAIN_NAME
		case unix.NFT_MSG_NEWRULE, unix.NFT_MSG_DELRULE, nftMsgDestroyRule:
			tableAttr, nameAttr = unix.NFTA_RULE_TABLE, unix.NFTA_RULE_CHAIN
		case unix.NFT_MSG_DELSET, nftMsgDestroySet:
			tableAttr, nameAttr = unix.NFTA_SET_TABLE, unix.NFTA_SET_NAME
		case unix.NFT_MSG_DELSETELEM, nftMsgDestroySetElem, unix.NFT_MSG_NEWSETELEM:
			tableAttr, nameAttr = unix.NFTA_SET_ELEM_LIST_TABLE, unix.NFTA_SET_ELEM_LIST_SET
		default:
			continue // a set or object added; a generation
		}
		for attrs.Next() {
			switch t := attrs.Type(); {
			case t == tableAttr:
				table = attrs.String()
			case t == nameAttr:
				name = attrs.String()
			case nameAttr == unix.NFTA_SET_ELEM_LIST_SET && t == unix.NFTA_SET_ELEM_LIST_ELEMENTS:
				elems = attrs.Bytes()
			}
		}
		if attrs.Err() != nil {
			continue
		}
		if !own && foreignKind(typ) && (fam != unix.NFPROTO_INET || !b.ours(table) || (nameAttr != 0 && !b.ownName(name))) {
			foreign = true
		}
		if fam != unix.NFPROTO_INET || !b.ours(table) || own && typ != unix.NFT_MSG_DELSETELEM && typ != nftMsgDestroySetElem {
			continue
		}
		what := ""
		switch typ {
		case unix.NFT_MSG_NEWTABLE:
			what = "table " + table + " changed"
		case unix.NFT_MSG_DELTABLE, nftMsgDestroyTable:
			what = "table " + table + " deleted"
		case unix.NFT_MSG_NEWCHAIN:
			if b.ownName(name) {
				what = "chain " + name + " changed"
			}
		case unix.NFT_MSG_DELCHAIN, nftMsgDestroyChain:
			if b.ownName(name) {
				what = "chain " + name + " deleted"
			}
		case unix.NFT_MSG_NEWRULE:
			if b.ownName(name) {
				what = "rule added to chain " + name
			}
		case unix.NFT_MSG_DELRULE, nftMsgDestroyRule:
			if b.ownName(name) {
				what = "rule deleted from chain " + name
			}
		case unix.NFT_MSG_DELSET, nftMsgDestroySet:
			if b.ownName(name) {
				what = "set " + name + " deleted"
			}
		case unix.NFT_MSG_NEWSETELEM: // someone else's (own: skipped above)
			var add []Entry
			add, what = b.addedElements(name, elems)
			ev.Added = append(ev.Added, add...)
			if len(add) > 0 && !slices.Contains(ev.By, m.Header.PID) {
				ev.By = append(ev.By, m.Header.PID)
			}
		default: // elements deleted
			del, dmg := b.deletedElements(name, elems)
			ev.Deleted = append(ev.Deleted, del...)
			what = dmg
			if own {
				// Only with SetWatchOwnPorts(false): pcpd's own element
				// deletes reach the caller; its own sentinel
				// transactions (Healthy) are never damage.
				what = ""
			}
			if len(del) > 0 && !slices.Contains(ev.By, m.Header.PID) {
				ev.By = append(ev.By, m.Header.PID)
			}
		}
		if what != "" {
			if !slices.Contains(damage, what) {
				damage = append(damage, what)
			}
			if !slices.Contains(ev.By, m.Header.PID) {
				ev.By = append(ev.By, m.Header.PID)
			}
		}
	}
	ev.Damage = summary(damage)
	return ev, foreign, ev.Damage != "" || len(ev.Deleted) > 0 || len(ev.Added) > 0
}

// OnForeignChange sets fn (nil: none) to be called, on Watch's goroutine,
// whenever a watch is told someone else's change of a table, chain, rule
// or set of the ip or inet family that is not pcpd's: a DNAT rule of the
// host's may have come or gone, and the next ForeignDNAT reads (its last
// answer is not kept). The server reads the host's DNAT rules at once
// (h/prio: before, at its next background read, up to 2.5 s later).
// WatchEvent, which tells only pcpd's objects, is not sent for them.
func (b *Backend) OnForeignChange(fn func()) {
	if fn == nil {
		b.onForeign.Store(nil)
		return
	}
	b.onForeign.Store(&fn)
}

// foreignKind reports whether a notification of type typ, of another
// table's, may change what ForeignDNAT reads: a table, chain, rule or set
// added, changed or deleted.
func foreignKind(typ int) bool {
	switch typ {
	case unix.NFT_MSG_NEWTABLE, unix.NFT_MSG_DELTABLE, nftMsgDestroyTable,
		unix.NFT_MSG_NEWCHAIN, unix.NFT_MSG_DELCHAIN, nftMsgDestroyChain,
		unix.NFT_MSG_NEWRULE, unix.NFT_MSG_DELRULE, nftMsgDestroyRule,
		unix.NFT_MSG_DELSET, nftMsgDestroySet:
		return true
	}
	return false
}

// deletedElements judges elements deleted from set: a pinhole set's (or
// SNAT map's) are returned as pinholes, their sentinel's deletion is
// damage (a flush), as is any element of a set Healthy compares (the
// protected, served and owner sets); the meters' are not pcpd's to keep.
func (b *Backend) deletedElements(set string, list []byte) (del []Pinhole, damage string) {
	es, damage := b.changedElements(set, list, "deleted from", true)
	for _, e := range es {
		del = append(del, e.Pinhole)
	}
	return del, damage
}

// addedElements judges elements someone added to set: a pinhole set's (or
// SNAT map's) are returned as pinholes with the expiry they were given;
// any element added to a set Healthy compares is damage (the check puts
// that set back as pcpd wants it); a sentinel's or probe's, or the
// meters', are not told (pcpd's own are never added by another socket).
func (b *Backend) addedElements(set string, list []byte) ([]Entry, string) {
	return b.changedElements(set, list, "added to", false)
}

// changedElements is deletedElements and addedElements: verb says which
// for damage, sentinelGone whether a pinhole set's sentinel among them
// is damage (a flush deletes it).
func (b *Backend) changedElements(set string, list []byte, verb string, sentinelGone bool) (out []Entry, damage string) {
	flushed := "set " + set + " flushed (its sentinel deleted)"
	if !sentinelGone {
		flushed = ""
	}
	for k := range numKinds {
		if b.sets[k].Name != set {
			continue
		}
		for _, e := range elementsOf(list) {
			switch {
			case isSentinel(k, e):
				damage = flushed
			case isProbe(k, e):
			default:
				if p, err := decode(k, e); err == nil {
					out = append(out, Entry{Pinhole: p, Remaining: e.Expires})
				}
			}
		}
		return out, damage
	}
	for i := range numSNAT {
		if b.snat[i].Name != set {
			continue
		}
		for _, e := range elementsOf(list) {
			if isSNATSentinel(i, e) {
				damage = flushed
				continue
			}
			// A companion is told as its NAPT mapping; any other element
			// (by hand: a catch-all, a port range, a mapping to
			// 0.0.0.0:0) as an odd Pinhole, whose Delete removes exactly
			// it (decodeSNAT). Before (h/oddsnat), those but the
			// catch-all were dropped: never told, never undone.
			if p, ok := decodeSNAT(i, e); ok {
				out = append(out, Entry{Pinhole: p, Remaining: e.Expires})
			}
		}
		return out, damage
	}
	for _, s := range []*nftables.Set{b.protected6, b.protected4, b.owners6, b.owners4, b.served6, b.served4, b.servingIfs} {
		if s != nil && s.Name == set {
			return nil, "elements " + verb + " set " + set
		}
	}
	if sentinelGone && b.flowed6 != nil && set == b.flowed6.Name {
		// The record of addresses with flows lost some: the watch has
		// untrusted it (flowedTampered: every delete walks conntrack),
		// and the check this damage asks for rebuilds it from
		// conntrack, so it is said in the log and trusted again within
		// the watch's check gap. Before (h/flushflake's left item), a
		// flush of flowed6 was logged nowhere and the record stayed
		// untrusted until the periodic check (--tamper-interval).
		return nil, "elements deleted from set " + set + " (the record of addresses with flows; rebuilt from conntrack)"
	}
	return nil, ""
}

// elementsOf decodes an NFTA_SET_ELEM_LIST_ELEMENTS attribute: each
// element's key, key end and data (google/nftables decodes them only
// inside its own dumps).
func elementsOf(list []byte) []nftables.SetElement {
	ad, err := netlink.NewAttributeDecoder(list)
	if err != nil {
		return nil
	}
	ad.ByteOrder = binary.BigEndian
	var out []nftables.SetElement
	for ad.Next() {
		if ad.Type() != unix.NFTA_LIST_ELEM {
			continue
		}
		var e nftables.SetElement
		ad.Nested(func(nd *netlink.AttributeDecoder) error {
			for nd.Next() {
				var dst *[]byte
				switch nd.Type() {
				case unix.NFTA_SET_ELEM_KEY:
					dst = &e.Key
				case nftaSetElemKeyEnd:
					dst = &e.KeyEnd
				case unix.NFTA_SET_ELEM_DATA:
					dst = &e.Val
				case unix.NFTA_SET_ELEM_EXPIRATION: // ms, as the kernel was given it (an add's notification)
					e.Expires = time.Duration(nd.Uint64()) * time.Millisecond
					continue
				default:
					continue
				}
				nd.Nested(func(vd *netlink.AttributeDecoder) error {
					for vd.Next() {
						if vd.Type() == unix.NFTA_DATA_VALUE {
							*dst = vd.Bytes()
						}
					}
					return nil
				})
			}
			return nil
		})
		out = append(out, e)
	}
	if ad.Err() != nil {
		return out
	}
	return out
}

// summary is damage for a log line: a deleted table alone (it takes every
// rule, chain and set with it), else the first three and how many more.
func summary(damage []string) string {
	for _, d := range damage {
		if strings.HasPrefix(d, "table ") && strings.HasSuffix(d, " deleted") {
			return d
		}
	}
	if len(damage) > 3 {
		return strings.Join(damage[:3], "; ") + fmt.Sprintf("; and %d more", len(damage)-3)
	}
	return strings.Join(damage, "; ")
}
