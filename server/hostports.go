package server

import (
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/wgctrl"

	"github.com/pcpd/pcpd/internal/ifname"
	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/pinhole"
)

// hostPortsTTL is how long a scan of the host's ports is trusted, unless
// Config.HostPortsTTL says otherwise (tests; review h/revpr: a package
// variable a test rewrote raced with any other server of the binary). A
// port opened by a service is protected from new mappings within this
// time; the scan is a netlink dump, cheap enough for the rare allocation.
const hostPortsTTL = 2 * time.Second

// ttl is the server's hostPortsTTL.
func (h *hostPorts) ttl() time.Duration {
	if t := h.s.cfg.HostPortsTTL; t > 0 {
		return t
	}
	return hostPortsTTL
}

// tcpListen is TCP_LISTEN in sock_diag's state field.
const tcpListen = 10

// hostPorts knows which IPv4 ports the host itself uses, so that no NAPT
// mapping takes one: a mapping's DNAT would steal the service's traffic
// (a client mapping UDP 51820 would carry the WireGuard tunnel itself
// away). Reserved are pcpd's own 5350/5351, Config.ReservedPorts, the
// listen port of every WireGuard interface among Config.Interfaces, and
// every port with a listening TCP or a bound UDP socket on the host, any
// address, either family (an IPv6 wildcard socket takes IPv4 too), and
// every port the host's own DNAT rules forward on the external address
// (dnatTCP, dnatUDP: read with the sockets, at the same times).
//
// It fails closed, each protocol on its own: until a dump of a protocol's
// sockets succeeds, none of its ports is known free (ready is false,
// reserved says every port is taken) and its new IPv4 mappings are
// refused with NO_RESOURCES (errHostPortsUnread; Server.external). Before,
// a failed first scan left the sets empty and a client could map a host
// service's port until a scan succeeded. A failed dump after a good one
// keeps the last good ports reserved (store). Per protocol: a kernel that
// never answers one protocol's dump (udp_diag absent) still serves the
// other's mappings, which a single flag refused for ever (review revedge,
// TestHostPortsReadPerProtocol). The WireGuard listen ports are UDP's.
type hostPorts struct {
	s *Server

	// static holds the ports reserved whatever the host does: 5350, 5351
	// and Config.ReservedPorts, made once (the configuration is fixed).
	// A bitmap, so a candidate costs one lookup however long the list.
	staticOnce sync.Once
	static     *portSet

	mu     sync.Mutex
	at     time.Time // of the last scan; zero: none yet
	tcp    *portSet  // nil until a dump of TCP sockets succeeds
	udp    *portSet  // nil until a dump of UDP sockets (and WireGuard's ports) succeeds
	warned bool      // a failed scan was logged

	// background: housekeep rescans every hostPortsTTL while reserved is
	// asked (lastUse within hostPortsIdle), so allocations, in the engine
	// under s.mu, do not wait for the dump: 2.6-3 ms even on a host with a
	// handful of sockets (wgctrl's probe is most of it), every 2 s.
	lastUse    time.Time
	background bool

	// dnatTCP and dnatUDP are the ports the host's own DNAT and redirect
	// rules translate on the external IPv4 address (another table's port
	// forward, a container runtime's or CNI hostPort's DNAT, iptables-nft:
	// s.foreign, pinhole/foreign.go), read with the sockets, reserved
	// like them. Such a port holds no socket: before, a client was granted
	// it, told SUCCESS, and got nothing (the admin's chain at dstnat runs
	// before pcpd's) or took the admin's forward (a chain after pcpd's).
	// nil until a read succeeds; a failed read keeps the last good ports.
	// A first read that fails reserves none of them (as before this
	// read existed, logged), unlike the sockets' fail-closed: it
	// refines what --reserved-ports (the authoritative list) leaves out,
	// and a ruleset pcpd cannot parse must not refuse every IPv4 mapping
	// of the host; no read failing while pcpd's own nftables writes work
	// has been seen.
	dnatTCP, dnatUDP *portSet
	// dnatGuessTCP and dnatGuessUDP: those of them that only rules with a
	// condition not read forward (pinhole.ForeignDNAT.GuessTCP): reserved,
	// but no proof to end a lease (forwardedSure; review h/revf4).
	dnatGuessTCP, dnatGuessUDP *portSet
	dnatFailed                 bool   // the last read failed (logged)
	dnatSum                    string // the last read's summary, logged when it changes
	// dnatNews: a read found the forwarded ports other than the one
	// before (the first read too), and Server.endForwarded has not yet
	// looked at them (forwardNews).
	dnatNews       bool
	dnatLogged     map[string]struct{} // rules logged once (catch-all, undecoded)
	dnatLoggedFull bool                // dnatLogged reached dnatLoggedMax (logged)
	// dnatAllTCP and dnatAllUDP: the last good read found a catch-all
	// DNAT of the host's before pcpd's chain that takes every new
	// connection of the protocol to the external address (ForeignRule
	// with Before and no Why). A client's new IPv4 mapping of it could
	// carry nothing: it is refused (errDNATCatchAll) while the rule is
	// there. dnatAllSum is what was last logged of them ("": none).
	dnatAllTCP, dnatAllUDP bool
	dnatAllSum             string

	// kick asks housekeep for a read of the host's DNAT rules now
	// (kickDNAT: the firewall watch was told another table's change).
	// Before (h/prio), a DMZ rule added was read at the next background
	// read, up to hostPortsTTL + hostPortsSlack (2.5 s) later, new
	// mappings granted meanwhile. dnatReadAt and dnatReadTook are the
	// last kicked read's end and length (kickedDNAT's gap), dnatSeq and
	// dnatStored order the reads' stores (dnatRead).
	kick                chan struct{}
	dnatReadAt          time.Time
	dnatReadTook        time.Duration
	dnatSeq, dnatStored uint64
	// kickPending: a timer is set to kick again once the gap has passed
	// (onKick): one for all the kicks of the gap (review h/revpr: each
	// set its own). afterFunc starts it (nil: time.AfterFunc; tests).
	kickPending bool
	afterFunc   func(time.Duration, func())
	// sockSeq and sockStored order the socket dumps' stores as dnatSeq
	// and dnatStored the reads': refresh dumps without h.mu, and an
	// inline scan begun after its dump may store first.
	sockSeq, sockStored uint64
}

// dnatKickGap is the least time between the end of a kicked read of the
// host's DNAT rules and the start of the next (a process committing
// without pause reads no more than this often), and dnatKickShare the
// most of the time they may take: the gap grows to dnatKickShare times
// a read's length (a read of 10 000 rules, 112-116 ms, gaps 350 ms:
// a quarter of a core at most).
const (
	dnatKickGap   = 100 * time.Millisecond
	dnatKickShare = 3
)

// kickDNAT asks housekeep for a read of the host's DNAT rules (never
// blocks: one kick pending is enough).
func (h *hostPorts) kickDNAT() {
	select {
	case h.kick <- struct{}{}:
	default:
	}
}

// kickedDNAT is housekeep's answer to a kick: it reads the host's DNAT
// rules now, off the engine, if the rules are in use (as refresh: an
// allocation asked within hostPortsIdle, or an IPv4 lease held;
// otherwise the next allocation reads them when it finds them stale),
// or returns how long to wait first (the gap since the last kicked
// read).
func (h *hostPorts) kickedDNAT() (wait time.Duration) {
	h.mu.Lock()
	active := !h.lastUse.IsZero() && time.Since(h.lastUse) < hostPortsIdle
	gap := max(dnatKickGap, dnatKickShare*h.dnatReadTook)
	wait = gap - time.Since(h.dnatReadAt)
	h.mu.Unlock()
	if t := h.s.tab; !active && (t == nil || t.held4n.Load() == 0) {
		return 0
	}
	if wait > 0 && !h.dnatReadAt.IsZero() {
		return wait
	}
	start := time.Now()
	h.dnatRead()
	h.mu.Lock()
	h.dnatReadAt, h.dnatReadTook = time.Now(), time.Since(start)
	h.mu.Unlock()
	return 0
}

// onKick is housekeep's step for a kick: the kicked read now, or, in the
// gap after the last, one timer to kick again when it has passed, however
// many kicks come meanwhile.
func (h *hostPorts) onKick() {
	wait := h.kickedDNAT()
	if wait <= 0 {
		return
	}
	h.mu.Lock()
	if h.kickPending {
		h.mu.Unlock()
		return
	}
	h.kickPending = true
	after := h.afterFunc
	h.mu.Unlock()
	if after == nil {
		after = func(d time.Duration, f func()) { time.AfterFunc(d, f) }
	}
	after(wait, func() {
		h.mu.Lock()
		h.kickPending = false
		h.mu.Unlock()
		h.kickDNAT()
	})
}

// dnatRead reads the host's DNAT rules without h.mu and stores the
// answer, unless a read begun later has stored its own meanwhile (a
// kicked, a background and an inline read may overlap; before, the
// older answer could be stored last).
func (h *hostPorts) dnatRead() {
	h.mu.Lock()
	h.dnatSeq++
	seq := h.dnatSeq
	h.mu.Unlock()
	f, err := h.readDNAT()
	h.mu.Lock()
	defer h.mu.Unlock()
	if seq > h.dnatStored {
		h.dnatStored = seq
		h.storeDNAT(f, err)
	}
}

// dnatLoggedMax bounds dnatLogged: past it no more rules are logged.
const dnatLoggedMax = 4096

// hostPortsIdle: the background rescans stop this long after the last
// allocation asked; the next one scans inline again.
const hostPortsIdle = 10 * time.Second

// hostPortsSlack is how much older than hostPortsTTL the background's
// last scan may be (timer and dump delays) before reserved scans itself.
const hostPortsSlack = 500 * time.Millisecond

// portSet is a set of ports: one bit each, 8 KiB for all 65 536.
type portSet [1 << 16 / 64]uint64

func (p *portSet) add(port uint16)      { p[port/64] |= 1 << (port % 64) }
func (p *portSet) has(port uint16) bool { return p[port/64]&(1<<(port%64)) != 0 }

// union adds every port of o.
func (p *portSet) union(o *portSet) {
	for i := range p {
		p[i] |= o[i]
	}
}

// staticSet returns the ports reserved whatever the host does.
func (h *hostPorts) staticSet() *portSet {
	h.staticOnce.Do(func() {
		h.static = new(portSet)
		h.static.add(pcp.Port)
		h.static.add(pcp.ClientPort)
		for _, p := range h.s.cfg.ReservedPorts {
			h.static.add(p)
		}
	})
	return h.static
}

// configReserved reports whether the configuration alone forbids port as
// an external IPv4 port: outside Config.IPv4Ports, pcpd's own 5350/5351,
// or in Config.ReservedPorts. Unlike reserved it does not look at the
// host's sockets, so it is fit for leases already held (restore: see
// Server.configForbids).
func (h *hostPorts) configReserved(port uint16) bool {
	return !h.s.cfg.IPv4Ports.contains(port) || h.staticSet().has(port)
}

// ready reports whether a scan of the host's ports of protocol proto has
// succeeded, scanning first as reserved does when none is fresh (after a
// failure, at most once every hostPortsTTL). Until it has, reserved holds
// every port of proto taken.
func (h *hostPorts) ready(proto uint8) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.fresh()
	return h.set(proto) != nil
}

// set is proto's ports (h.mu held): nil until read.
func (h *hostPorts) set(proto uint8) *portSet {
	if proto == protoTCP {
		return h.tcp
	}
	return h.udp
}

// reserved reports whether the host uses port for protocol proto: every
// port while no scan has succeeded.
func (h *hostPorts) reserved(proto uint8, port uint16) bool {
	if h.staticSet().has(port) {
		return true
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	h.fresh()
	set := h.set(proto)
	if set == nil {
		return true // fail closed: nothing known free
	}
	dnat := h.dnatTCP
	if proto != protoTCP {
		dnat = h.dnatUDP
	}
	return set.has(port) || (dnat != nil && dnat.has(port))
}

// forwarded reports whether the last read of the host's own DNAT rules
// has them forward port of protocol proto on the external address. For a
// lease already held (Server.mapInbound's renewal): unlike reserved it
// neither scans nor counts the host's sockets, whose ephemeral UDP ports
// would move held mappings at random; a forward is the admin's choice.
// The rules are read again every hostPortsTTL, allocating or not, while
// an IPv4 lease is held (refresh).
func (h *hostPorts) forwarded(proto uint8, port uint16) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	dnat := h.dnatTCP
	if proto != protoTCP {
		dnat = h.dnatUDP
	}
	return dnat != nil && dnat.has(port)
}

// forwardedSure is forwarded for a port a rule with every condition on
// its path read forwards: one pcpd may end a lease that cannot move for
// (servePeer, external, endForwardedPeers). A forward under a condition
// not read ('iifname "lan0"': NAT reflection for the LAN only) may never
// see the connections of the lease, a PEER's internet peer's: it is only
// reserved (review h/revf4; before, it ended the PEER).
func (h *hostPorts) forwardedSure(proto uint8, port uint16) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	dnat, guess := h.dnatTCP, h.dnatGuessTCP
	if proto != protoTCP {
		dnat, guess = h.dnatUDP, h.dnatGuessUDP
	}
	return dnat != nil && dnat.has(port) && (guess == nil || !guess.has(port))
}

// forwardNews returns the TCP and UDP ports the last read of the host's
// DNAT rules forwards for sure (forwardedSure), if that read found them
// changed since the last call (the first read counts), and forgets the
// change; ok false
// otherwise. For Server.endForwarded: a read made inline by an
// allocation (fresh, under the engine's lock) is looked at by the next
// housekeeping tick. forwardAgain puts the change back (a sweep that
// could not commit).
func (h *hostPorts) forwardNews() (tcp, udp portSet, ok bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if !h.dnatNews || h.dnatTCP == nil || h.dnatUDP == nil {
		return tcp, udp, false
	}
	h.dnatNews = false
	tcp, udp = *h.dnatTCP, *h.dnatUDP
	if h.dnatGuessTCP != nil {
		for i := range tcp {
			tcp[i] &^= h.dnatGuessTCP[i]
			udp[i] &^= h.dnatGuessUDP[i]
		}
	}
	return tcp, udp, true
}

func (h *hostPorts) forwardAgain() {
	h.mu.Lock()
	h.dnatNews = true
	h.mu.Unlock()
}

// takenWhole reports whether a catch-all DNAT rule of the host's before
// pcpd's chain takes every new connection of protocol proto to the
// external address (the last good read's), scanning first as reserved
// does when the read is not fresh.
func (h *hostPorts) takenWhole(proto uint8) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.fresh()
	if proto == protoTCP {
		return h.dnatAllTCP
	}
	return h.dnatAllUDP
}

// snapshot is a copy of every port reserved for proto now (what reserved
// says port by port), nil while none is known free (fail closed: reserved
// says every port). For a search over many ports: one lock, one copy.
func (h *hostPorts) snapshot(proto uint8) *portSet {
	static := h.staticSet()
	h.mu.Lock()
	defer h.mu.Unlock()
	h.fresh()
	set := h.set(proto)
	if set == nil {
		return nil
	}
	out := *set
	out.union(static)
	dnat := h.dnatTCP
	if proto != protoTCP {
		dnat = h.dnatUDP
	}
	if dnat != nil {
		out.union(dnat)
	}
	return &out
}

// fresh rescans unless the sets are fresh enough (h.mu held), and marks
// the sets as in use (the background refresher keeps them fresh while
// they are).
func (h *hostPorts) fresh() {
	now := time.Now()
	h.lastUse = now
	// Inline only when the background refresher does not keep the sets
	// fresh: it does not run, has not started yet (first allocation after
	// an idle spell) or has fallen behind. Either way the sets are never
	// older than hostPortsTTL (+ hostPortsSlack) when asked.
	ttl := h.ttl()
	if h.background {
		ttl += hostPortsSlack
	}
	if h.at.IsZero() || now.Sub(h.at) > ttl {
		h.scan()
	}
}

// refresh rescans if reserved was asked within hostPortsIdle: the
// background refresher's step (housekeep, every hostPortsTTL), off the
// engine. The dump runs without h.mu, so reserved goes on meanwhile with
// the previous sets.
func (h *hostPorts) refresh() {
	h.mu.Lock()
	active := !h.lastUse.IsZero() && time.Since(h.lastUse) < hostPortsIdle
	h.sockSeq++
	seq := h.sockSeq
	h.mu.Unlock()
	if !active {
		// The host's DNAT rules are read while idle too (a read finds
		// them unchanged at the cost of a look at its generation
		// listener: pinhole/foreigngen.go), so that a renewal moves a
		// mapping off a port the admin has forwarded since (forwarded;
		// h/hunt2: before, a renewal kept it as long as its client
		// renewed, with no new allocation to read the rules again).
		// Only while an IPv4 lease is held, the only kind forwarded is
		// asked for: a read is the whole ruleset's whenever another
		// process committed since the last (139-144 ms at 10 000 rules,
		// BENCHMARKS.md item 83), every 2 s on an idle pcpd with no IPv4
		// mapping otherwise (review h/revh2). One made later asks
		// reserved, which reads them inline when stale (fresh).
		if t := h.s.tab; t == nil || t.held4n.Load() == 0 {
			return
		}
		h.dnatRead()
		return
	}
	tcp, udp, tcpErr, udpErr := h.dump()
	h.mu.Lock()
	// Unless an inline scan begun since has stored its own (newer) sets:
	// before, this older dump replaced them, a service's port opened
	// meanwhile unreserved until the next scan.
	if seq > h.sockStored {
		h.sockStored = seq
		h.store(tcp, udp, tcpErr, udpErr)
	}
	h.mu.Unlock()
	h.dnatRead()
}

// scan refreshes the sets (h.mu held). On failure the previous ones are
// kept (and logged once), or, before any scan succeeded, none are
// installed: a scan that fails must not open the host's ports.
func (h *hostPorts) scan() {
	h.sockSeq++
	h.sockStored = h.sockSeq
	h.store(h.dump())
	h.dnatSeq++
	h.dnatStored = h.dnatSeq
	h.storeDNAT(h.readDNAT())
}

// readDNAT reads the host's other DNAT rules: nil, nil without a reader
// (a Firewall without ForeignDNAT) or an external IPv4 address.
func (h *hostPorts) readDNAT() (*pinhole.ForeignDNAT, error) {
	if h.s.foreign == nil || !h.s.cfg.ExternalIPv4.IsValid() {
		return nil, nil
	}
	return h.s.foreign.ForeignDNAT(h.s.cfg.ExternalIPv4, h.s.cfg.IPv4Ports.First, h.s.cfg.IPv4Ports.Last)
}

// storeDNAT installs a read of the host's other DNAT rules (h.mu held):
// on failure the last good ports stay (none before a first success), and
// the failure is logged once until a read succeeds again. Each catch-all
// and each rule whose ports could not be read is logged once.
func (h *hostPorts) storeDNAT(f *pinhole.ForeignDNAT, err error) {
	log := h.s.log
	if err != nil {
		if !h.dnatFailed {
			if h.dnatTCP == nil {
				log.Warn("cannot read the host's DNAT rules; the ports they forward are not reserved until a read succeeds (list them in --reserved-ports)", zap.Error(err))
			} else {
				log.Warn("cannot read the host's DNAT rules; keeping the last read's ports reserved", zap.Error(err))
			}
			h.dnatFailed = true
		}
		return
	}
	if f == nil {
		return
	}
	if f.Unsettled {
		h.storeUnsettled(f)
		return
	}
	if h.dnatFailed {
		log.Info("read the host's DNAT rules again")
		h.dnatFailed = false
	}
	h.dnatTCP, h.dnatUDP = (*portSet)(&f.TCP), (*portSet)(&f.UDP)
	h.dnatGuessTCP, h.dnatGuessUDP = (*portSet)(&f.GuessTCP), (*portSet)(&f.GuessUDP)
	tcp, udp := f.TCP.String(), f.UDP.String()
	// The guessed ports in the sum: a forward's condition read or not
	// since is news for endForwarded too.
	if sum := fmt.Sprint(f.Rules, tcp, "/", udp, " ", f.GuessTCP.String(), "/", f.GuessUDP.String()); sum != h.dnatSum {
		log.Info("read the host's DNAT rules: the ports they forward on the external address are reserved",
			zap.Int("rules", f.Rules), zap.String("tcp", tcp), zap.String("udp", udp))
		h.dnatSum = sum
		h.dnatNews = true
	}
	if h.dnatLogged == nil {
		h.dnatLogged = map[string]struct{}{}
	}
	// Past dnatLoggedMax rules logged, the rest are not, said once:
	// emptying the map instead logged them all again at every read (5 000
	// undecoded rules: 5 000 warnings every 2 s; review h/revadmin).
	once := func(r pinhole.ForeignRule) bool {
		k := r.String() + r.Why
		if _, ok := h.dnatLogged[k]; ok {
			return false
		}
		if len(h.dnatLogged) >= dnatLoggedMax {
			if !h.dnatLoggedFull {
				log.Warn("more of the host's DNAT rules are catch-alls or undecoded than are logged; not logging the rest", zap.Int("logged", len(h.dnatLogged)))
				h.dnatLoggedFull = true
			}
			return false
		}
		h.dnatLogged[k] = struct{}{}
		return true
	}
	// The catch-alls before pcpd's chain whose every condition was read
	// take every new connection of their protocols: a new mapping's
	// SUCCESS would be a lie, so new IPv4 mappings are refused
	// (Server.external) while one is there, and told when that changes.
	var allTCP, allUDP bool
	var whole []string
	for _, r := range f.CatchAll {
		if r.Before && r.Why == "" {
			allTCP, allUDP = allTCP || r.TCP, allUDP || r.UDP
			if len(whole) < 8 {
				whole = append(whole, r.String())
			}
			continue
		}
		switch {
		case !once(r):
		case r.Before:
			log.Warn("a DNAT rule of the host's may forward every port of the external address before pcpd's chain (a condition on its path is not read): the connections it matches are taken from clients' IPv4 mappings; hook its chain after pcpd's, at priority dstnat + 2 or later (README, --reserved-ports)",
				zap.Stringer("rule", r), zap.String("why", r.Why))
		default:
			log.Info("a DNAT rule of the host's forwards every port of the external address after pcpd's chain: clients' mappings come first, it takes the rest",
				zap.Stringer("rule", r))
		}
	}
	sum := ""
	if allTCP || allUDP {
		sum = fmt.Sprint(allTCP, allUDP, whole)
	}
	if sum != h.dnatAllSum {
		if sum != "" {
			log.Warn("a DNAT rule of the host's forwards every port of the external address before pcpd's chain: it takes the connections of every client's IPv4 mapping; new IPv4 mappings (PCP MAP, NAT-PMP) of its protocols are refused (NO_RESOURCES) while it is there, mappings held are kept; hook its chain after pcpd's, at priority dstnat + 2 or later (README, --reserved-ports)",
				zap.Strings("rules", whole), zap.Bool("tcp", allTCP), zap.Bool("udp", allUDP))
		} else {
			log.Info("no DNAT rule of the host's before pcpd's chain forwards every port of the external address now: new IPv4 mappings are granted again")
		}
		h.dnatAllSum = sum
	}
	h.dnatAllTCP, h.dnatAllUDP = allTCP, allUDP
	for _, r := range f.Undecoded {
		if once(r) {
			log.Warn("cannot read which ports a DNAT rule of the host's forwards: they are not reserved; list them in --reserved-ports",
				zap.Stringer("rule", r), zap.String("why", r.Why))
		}
	}
}

// storeUnsettled installs a read another process's commits moved under
// each try (pinhole.ForeignDNAT.Unsettled: it may mix two generations of
// the ruleset, a forward in none of them; review h/revf4) (h.mu held):
// its ports are reserved beside the last good read's ("reserve rather
// than miss"), those only it forwards as guesses (forwardedSure false),
// and nothing else changes: no news, so endForwarded ends no lease for
// it; the catch-alls, the summary and the log stay the last good read's.
// The next read that holds still replaces it all.
func (h *hostPorts) storeUnsettled(f *pinhole.ForeignDNAT) {
	tcp, udp, gTCP, gUDP := new(portSet), new(portSet), new(portSet), new(portSet)
	for _, p := range []struct{ dst, src *portSet }{{tcp, h.dnatTCP}, {udp, h.dnatUDP}, {gTCP, h.dnatGuessTCP}, {gUDP, h.dnatGuessUDP}} {
		if p.src != nil {
			*p.dst = *p.src
		}
	}
	for i := range tcp {
		gTCP[i] |= f.TCP[i] &^ tcp[i]
		gUDP[i] |= f.UDP[i] &^ udp[i]
		tcp[i] |= f.TCP[i]
		udp[i] |= f.UDP[i]
	}
	h.dnatTCP, h.dnatUDP, h.dnatGuessTCP, h.dnatGuessUDP = tcp, udp, gTCP, gUDP
	h.s.log.Debug("the host's DNAT rules changed during each read: their ports reserved, no mapping ended for them until a read holds still",
		zap.String("tcp", f.TCP.String()), zap.String("udp", f.UDP.String()))
}

// store installs a dump's sets (h.mu held), each protocol on its own:
// after a failed dump the previous ports stay reserved too, and before any
// dump of the protocol succeeded its set stays nil (ready false): a
// partial dump is not the host's ports.
func (h *hostPorts) store(tcp, udp *portSet, tcpErr, udpErr error) {
	h.at = time.Now()
	if err := errors.Join(tcpErr, udpErr); err != nil && !h.warned {
		if (tcpErr != nil && h.tcp == nil) || (udpErr != nil && h.udp == nil) {
			h.s.log.Warn("cannot list the host's sockets; new IPv4 mappings of the protocols unlisted are refused (NO_RESOURCES) until a scan succeeds", zap.Error(err))
		} else {
			h.s.log.Warn("cannot list the host's sockets; keeping the last known ports reserved", zap.Error(err))
		}
		h.warned = true
	}
	unread := h.tcp == nil || h.udp == nil
	h.tcp = merge(h.tcp, tcp, tcpErr)
	h.udp = merge(h.udp, udp, udpErr)
	if unread && h.tcp != nil && h.udp != nil && h.warned {
		h.s.log.Info("listed the host's sockets; new IPv4 mappings are served again")
	}
}

// merge is a protocol's ports after a dump that found got: got if the dump
// succeeded; else got and the last good ports, or nil if none yet.
func merge(last, got *portSet, err error) *portSet {
	if err == nil {
		return got
	}
	if last == nil {
		return nil
	}
	got.union(last)
	return got
}

// kernelName resolves a configured interface name, and socketDiagTCP and
// socketDiagUDP dump the host's sockets (tests replace them).
var (
	kernelName    = ifname.Kernel
	socketDiagTCP = netlink.SocketDiagTCP
	socketDiagUDP = netlink.SocketDiagUDP
)

// dump lists the host's listening TCP and bound UDP ports, and the listen
// ports of the served WireGuard interfaces.
// Each protocol's error is its own (tcpErr, udpErr: the WireGuard listen
// ports are UDP's); failing to enter the namespace is both's.
func (h *hostPorts) dump() (tcp, udp *portSet, tcpErr, udpErr error) {
	tcp, udp = new(portSet), new(portSet)
	var tcpErrs []error
	ran := false
	err := inNS(h.s.cfg.NetNS, func() error {
		ran = true
		var errs []error // UDP's
		for _, fam := range []uint8{unix.AF_INET, unix.AF_INET6} {
			ts, err := socketDiagTCP(fam)
			if err != nil && !errors.Is(err, netlink.ErrDumpInterrupted) {
				tcpErrs = append(tcpErrs, err)
			}
			for _, s := range ts {
				if s.State == tcpListen {
					tcp.add(s.ID.SourcePort)
				}
			}
			us, err := socketDiagUDP(fam)
			if err != nil && !errors.Is(err, netlink.ErrDumpInterrupted) {
				errs = append(errs, err)
			}
			for _, s := range us {
				udp.add(s.ID.SourcePort)
			}
		}
		// Kernel WireGuard's socket may not be in the dump; ask WireGuard.
		if wg, err := wgctrl.New(); err == nil {
			for _, name := range h.s.cfg.Interfaces {
				// By its kernel name (name may be an altname, which
				// wgctrl does not know): the serving namespace's, as
				// this runs in it.
				// A failed resolution fails the dump, which keeps the
				// last known ports: skipping the interface would free
				// its listen port for a NAPT mapping (a client mapping
				// UDP 51820 would carry the tunnel away).
				k, found, err := kernelName(name)
				if err != nil {
					errs = append(errs, fmt.Errorf("resolving interface %q: %w", name, err))
					continue
				}
				if !found {
					k = name
				}
				if d, err := wg.Device(k); err == nil && d.ListenPort > 0 {
					udp.add(uint16(d.ListenPort))
				}
			}
			wg.Close()
		}
		return errors.Join(errs...)
	})
	if !ran {
		return tcp, udp, err, err // the namespace not entered: nothing dumped
	}
	return tcp, udp, errors.Join(tcpErrs...), err
}

// setBackground tells reserved whether a background refresher runs.
func (h *hostPorts) setBackground(on bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.background = on
}
