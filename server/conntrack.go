package server

import (
	"bytes"
	"cmp"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	mdnl "github.com/mdlayher/netlink"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/pcpd/pcpd/internal/ctnl"
	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/store"
)

// flushConntrack ends the connections of mappings that ended: deleted by
// their client, revoked, expired, or moved to another external port (the guard lets established flows
// pass, so without this a deleted NAT-PMP mapping (PMP-12), a revoked
// address (LIFE-05) or an expired lease kept its open connections for as
// long as they lasted). Two kinds of flows are ended:
//   - inbound: those whose original destination is the mapping's external
//     endpoint (connections the client opened itself are left alone), or
//     for an IPv6 all-ports (all-protocols) MAP any port (and protocol)
//     of its address, as its set element admitted them (wildcard
//     filters), but not those a lease live when the walk decides admits
//     where the kernel delivered them (spareLive, under s.mu once the
//     dump found them), such as a PEER on the same endpoint, an IPv6
//     all-ports mapping of the address, or the mapping made again on the
//     endpoint before the walk ran (issue 9, h/holder: before, only
//     leases live when the mapping ended spared flows, and the
//     connections opened through a mapping made again before the walk
//     lost their entries: TestE2ERetakenBeforeFlushKeepsNewFlow);
//   - for an IPv4 NAPT mapping (not a PEER), the outbound flows its SNAT companion
//     translated to the external endpoint (two-way NAPT, PMP-11): their
//     reply destination is the external endpoint and their original
//     source the mapped internal one. Unless a live lease's SNAT
//     companion covers the flow (ctAdmits.snatted: a PEER of the same
//     tuple, to its remote only), or the mapping itself lives on at the
//     endpoint (FILTERs narrowed, or made again in the batch: the client
//     keeps its port and its own outbound flows). Before (review
//     h/revpeer), any live holder of the endpoint kept every remote's.
//
// An inbound filter never ends a flow whose original source is one of the
// host's own addresses (Server.hostAddrs, both walks): the host opened it
// to the client, no pinhole admitted it, and since h/spoofsrc the guard
// drops a forwarded packet from such an address, so the WAN cannot make
// one. Before, an IPv6 all-ports MAP's end flushed the host's every
// connection to the client's address, a port MAP's its one to that port
// (h/revall "Left"). A LAN client's flows to the address passed the
// guard's pinholes and still end.
//
// A PEER's end flushes its endpoint's inbound flows as a MAP's does (the
// flows from its remote, IPv4 DNAT-ed ones included, unless a lease live
// throughout admits them); before, it flushed nothing, so a flow it
// admitted, one a MAP's flush spared for it included, outlived both
// (issue 9). A PEER's SNAT-ed outbound flows (its client's own connection
// to the remote) are left. A renewal or replacement that narrows a
// mapping's FILTERs (tx.set, filtersNarrowed) flushes the endpoint's
// inbound flows too, but for those a live lease, the mapping as it is now
// included, admits: the flows of the remotes it no longer admits end.
// Expiry flushes too, in addition to the
// kernel ending the pinholes on time by itself (which holds with pcpd
// dead); the flows of leases that expired while pcpd was down are flushed
// at the next start (restoring.flushExpired).
//
// It only queues the flush (the tx calls it under s.mu); the conntrack
// flusher runs it, coalesced with the others queued meanwhile, so neither
// the engine nor an expiry waits for the walk. A connection must not
// carry data after its delete was acknowledged (PMP-12, found by the
// conformance suite): standalone, the ruleset cuts an IPv6 pinhole's
// flows itself the moment its element goes (pinhole/cutflows.go), and
// the DNAT-ed flows of an IPv4 NAPT mapping or IPv6 redirect
// (pinhole/natcut.go), and only the replies of requests that ended other
// mappings (an IPv4 NAPT mapping that is not a PEER, for its SNAT-ed
// outbound flows; attached mode, a kernel without conntrack labels, a
// layout found unlabelled) wait for the walk (mustWaitFlush; serveBatch,
// HandleBatch: waitConntrack). The walk runs for every ended mapping all
// the same: it frees the entries and their TCP state, and spares and ends
// exactly what it did before (a remade mapping spares nothing); but for
// an IPv6 pinhole's whose address the ruleset recorded no admitted flow
// to (skipUnflowed, pinhole/flowed.go: it can have none), until a
// firewall check finds damage. Walks no reply waits for start at least
// ctWalkGap apart.
func (s *Server) flushConntrack(ended []store.Lease) {
	if s.cfg.KeepConnections || len(ended) == 0 {
		s.noteNATEnded(ended, 0)
		return
	}
	var fs []ctFilter
	var cur store.Lease
	for i := range ended {
		n := len(fs)
		fs = appendCtFilters(fs, &ended[i])
		if s.recordsFlows(&ended[i]) {
			for j := n; j < len(fs); j++ {
				fs[j].flowed = true
			}
		}
		if l := &ended[i]; len(fs) > n+1 && s.tab.getInto(l.Key, &cur) && endpointOf(&cur) == endpointOf(l) {
			// The mapping lives on at its endpoint (its FILTERs
			// narrowed, or deleted and made again in the batch):
			// the client keeps its port, and its own outbound flows
			// stay whatever remote they go to.
			fs = append(fs[:n], slices.DeleteFunc(fs[n:], func(f ctFilter) bool { return f.nat })...)
		}
	}
	if len(fs) > 0 {
		s.ct.add(fs)
	}
	// After the add: its sequence number, or a later one (retarget.go).
	s.noteNATEnded(ended, s.ct.seq())
}

// recordsFlows: l's flows are all admitted by the ruleset's admission
// rules, which record their address (FlowRecorder.RecordsFlows: an IPv6
// pinhole, not a redirect, the record trusted now). Not an IPv4 mapping
// (its SNAT companion's and DNAT-ed flows are not recorded). Its filters
// may be left out of a walk whose record lacks their address
// (skipUnflowed).
func (s *Server) recordsFlows(l *store.Lease) bool {
	if s.recorder == nil || !l.ExternalAddr.Is6() || !l.InternalAddr.Is6() || l.ExternalAddr != l.InternalAddr {
		return false
	}
	return s.recorder.RecordsFlows(pinhole.Pinhole{Protocol: l.Protocol, InternalAddr: l.InternalAddr, InternalPort: l.InternalPort,
		ExternalAddr: l.ExternalAddr, ExternalPort: l.ExternalPort})
}

// skipUnflowed leaves out of fs the filters of recorded mappings
// (ctFilter.flowed) whose address no admitted flow went to, as the
// ruleset recorded it (FlowRecorder.FlowedAddrs, read now, after the
// filters were queued: a flow admitted before its mapping ended is in the
// record by then, its address added in the packet path before its
// conntrack entry was confirmed). Those mappings can have no flow to end:
// their walk would only lock the machine-wide conntrack hash for ≈ 9 ms
// (BENCHMARKS.md items 64, 69). Any doubt (no recorder, the record
// untrusted or unreadable) keeps every filter: the walk runs as before.
// Filters not flowed (IPv4, redirects, SNAT companions, attached mode, a
// kernel without labels, a mapping that ended while the record was not
// trusted) always stay.
//
// What it leaves out is kept (unflowed) until a firewall check that
// started after it found the layout intact: damage to the admission
// rules not yet seen (a rule an admin made accept without the record)
// lets flows in unrecorded, and the check that sees it walks everything
// left out since (releaseUnflowed). Before that check, such a filter is
// walked late, not never.
func (s *Server) skipUnflowed(fs []ctFilter) []ctFilter {
	if s.recorder == nil {
		return fs
	}
	u := &s.unflowed
	if !slices.ContainsFunc(fs, func(f ctFilter) bool { return f.flowed }) {
		return fs
	}
	var asked []netip.Addr // looked up together (a batch a round trip)
	for i := range fs {
		if fs[i].flowed {
			asked = append(asked, fs[i].t.addr)
		}
	}
	flowed, ok := s.recorder.FlowedAddrs(asked...)
	if !ok {
		u.mu.Lock()
		fs = append(fs, u.takeLocked()...) // walked now, with the rest
		u.mu.Unlock()
		return fs
	}
	gen := u.checks.Load()
	n := len(fs)
	u.mu.Lock()
	fs = slices.DeleteFunc(fs, func(f ctFilter) bool {
		if !f.flowed || flowed(f.t.addr) {
			return false
		}
		f.flowed = false // walked as any other filter if ever walked
		u.held = append(u.held, heldFilter{f: f, gen: gen})
		return true
	})
	if len(u.held) > maxUnflowed {
		fs = append(fs, u.takeLocked()...)
	}
	u.mu.Unlock()
	if k := n - len(fs); k > 0 {
		s.m.ctSkipped.Add(float64(k))
	}
	return fs
}

// maxUnflowed bounds the filters kept while no clean firewall check came
// (checks off, or failing): past it they are walked.
const maxUnflowed = 1 << 20

// unflowed holds the filters skipUnflowed left out, each with the number
// of firewall checks started before it was (checks).
type unflowed struct {
	checks atomic.Uint64
	mu     sync.Mutex
	held   []heldFilter
}

type heldFilter struct {
	f   ctFilter
	gen uint64
}

// takeLocked empties held and returns its filters. Caller holds u.mu.
func (u *unflowed) takeLocked() []ctFilter {
	out := make([]ctFilter, len(u.held))
	for i := range u.held {
		out[i] = u.held[i].f
	}
	u.held = nil
	return out
}

// releaseUnflowed: firewall check number gen (unflowed.checks after its
// start) found the layout intact (damaged false): the filters left out
// before it started are done. Found damaged: every filter left out is
// walked now (the record is untrusted from there on: FlowedAddrs); so
// too when the record is untrusted when the check ends.
func (s *Server) releaseUnflowed(gen uint64, damaged bool) {
	if g, ok := s.recorder.(FlowRegainer); ok && !damaged && !g.FlowedTrusted() {
		// The record untrusted since (a flush of flowed6 told by the
		// watch, a failed add): what was left out over it is walked,
		// as after damage (h/flowedlife).
		damaged = true
	}
	if damaged {
		s.walkUnflowed()
		return
	}
	u := &s.unflowed
	u.mu.Lock()
	u.held = slices.DeleteFunc(u.held, func(h heldFilter) bool { return h.gen < gen })
	u.mu.Unlock()
}

// walkUnflowed queues every filter skipUnflowed left out for a walk.
func (s *Server) walkUnflowed() {
	u := &s.unflowed
	u.mu.Lock()
	fs := u.takeLocked()
	u.mu.Unlock()
	if len(fs) > 0 {
		s.ct.add(fs)
	}
}

// mustWaitFlush reports whether a reply that ended these leases must wait
// for their conntrack flush: some lease's flows the ruleset does not cut
// by itself once its pinholes are gone (FlowCutter). With
// KeepConnections nothing is flushed, and nothing waits.
func (s *Server) mustWaitFlush(ended []store.Lease) bool {
	if s.cfg.KeepConnections {
		return false
	}
	for i := range ended {
		l := &ended[i]
		if snatFlows(l) {
			// Its SNAT companion's outbound flows (the client's own,
			// from the mapped port) only the walk ends: the ruleset
			// cuts the DNAT-ed ones alone (pinhole/natcut.go).
			return true
		}
		// The kind of pinhole decides (pinhole.Backend.CutsFlows), and
		// a lease's pinholes are all of one, filtered or not.
		p := pinhole.Pinhole{Protocol: l.Protocol, InternalAddr: l.InternalAddr, InternalPort: l.InternalPort,
			ExternalAddr: l.ExternalAddr, ExternalPort: l.ExternalPort}
		if s.cutter == nil || !s.cutter.CutsFlows(p) {
			return true
		}
	}
	return false
}

// snatFlows: l is a mapping whose end flushes the outbound flows its SNAT
// companion translated (appendCtFilters' nat filter): an IPv4 NAPT
// mapping that is not a PEER.
func snatFlows(l *store.Lease) bool {
	return l.Kind != store.KindPeer && l.ExternalAddr.Is4() && l.InternalAddr.Is4() && l.InternalPort != 0
}

// liveAdmits appends to dst the pinholes of the live leases that may
// admit flows to t (under s.mu): those holding t's endpoint (the ended
// mapping's PEER, or another lease sharing it), and on an IPv6 address
// its all-ports and all-protocols mappings, whose set elements hold every
// port (pinhole.Pinhole.AdmitsFlow tells which flows each admits). Live
// is at now (s.now(), the engine's running clock, which expireLocked
// reads): a lease whose lifetime has ended is not, even while the table
// still holds it because expireLocked has not run since (the expiry
// timer, a busy engine). Before (review h/revholder, LOW 2a), such a
// lease spared what it admitted until its own flush ran later
// (TestSpareLiveExpiredUnswept, TestE2EExpiredUnsweptSparesNothing).
func (s *Server) liveAdmits(dst []pinhole.Pinhole, t ctTarget, now time.Time, buf []store.Lease) ([]pinhole.Pinhole, []store.Lease) {
	es := [...]endpoint{{addr: t.addr, proto: t.proto, port: t.port}, {addr: t.addr, proto: t.proto}, {addr: t.addr}}
	n := 1
	if t.addr.Is6() {
		n = len(es)
	}
	for i, e := range es[:n] {
		if slices.Contains(es[:i], e) {
			continue
		}
		h, held := s.tab.holder(e)
		if !held {
			continue
		}
		buf = s.tab.onTupleInto(tuple{proto: e.proto, addr: h.addr, port: h.port}, buf)
		for j := range buf {
			if endpointOf(&buf[j]) == e && buf[j].Expires.After(now) {
				dst = appendPinholes(dst, &buf[j])
			}
		}
	}
	return dst, buf
}

// ctHit is a flow a filter of the flusher's walk matched (ctDeleter.end;
// a wildcard filter's, whatever the walk): to t (its own protocol and
// port, wildcard or not) from src; inbound, to is where the kernel
// delivered it (the reply's source); with nat (a SNAT filter's outbound
// flow, t its reply destination), src is the internal endpoint and to
// the remote. keep: a live lease admits it (spareLive).
type ctHit struct {
	t       ctTarget
	src, to netip.AddrPort
	nat     bool
	keep    bool
}

// spareLive marks the flows of hits that a lease live now admits, under
// s.mu, after the dump found them: a flow stays only if such a lease
// admits it where the kernel delivered it (pinhole.Pinhole.AdmitsFlow:
// the same endpoint, the remote its PEER or FILTERs admit, delivered to
// its internal endpoint), or, a SNAT filter's, its SNAT companion covers
// it (ctAdmits.snatted). What ended is then exactly what no live lease
// admits when the walk decides. Before (issue 9, h/holder), only leases
// live when the mapping ended (heldAdmits, pruneLive) or made by then (a
// wildcard's, spareWild) spared flows: a mapping made again on the
// endpoint before the walk ran (the same client, after an expiry, a
// delete, a revocation) lost the connections opened through it in
// between (TestE2ERetakenBeforeFlushKeepsNewFlow). An old flow the new
// mapping admits stays too: once its entry was deleted, the remote's
// next segment made a new one through that mapping anyway (TCP's loose
// pick-up), so ending it only cost the entry's state; one it does not
// admit (another remote than its PEER's or FILTERs', delivered
// elsewhere) ends. A flow found by the dump and admitted by no lease as
// it is decided is a flow of an ended mapping: a lease made after the
// decision admits new flows, not it. Flows opened after the dump are
// not in it. Takes s.mu a chunk of hits at a time: once for all, a dump
// of 1M flows to ended all-ports MAPs held the engine 360 ms (review
// h/revall).
func (s *Server) spareLive(hits []ctHit) {
	const step = 1024 // flows a hold of s.mu: ≈ 1 ms of lookups at 10 000 live leases
	var buf []store.Lease
	var ps []pinhole.Pinhole // the live pinholes of a chunk's targets, a run each
	// The targets looked up in a chunk, by a hash of the target: a
	// dump gives a target's flows in hash order, interleaved with
	// others'. A miss looks the leases up again (as before).
	type key struct {
		a     [16]byte
		is4   bool // As16 maps an IPv4 address onto ::ffff:0:0/96
		proto uint8
		port  uint16
	}
	type seen struct {
		k  key
		r  [2]int
		ok bool
	}
	var runs [256]seen
	of := make([][2]int, 0, min(len(hits), step)) // each hit's run
	for c := 0; c < len(hits); c += step {
		chunk := hits[c:min(c+step, len(hits))]
		clear(runs[:])
		ps = ps[:0]
		// Under s.mu only what is live: the pinholes of each target's
		// leases, once per target. Which flows they admit is asked
		// after (review h/revholder): asked under s.mu, each flow
		// against each pinhole (and the leases looked up again for
		// each flow whose target was not the previous one's), a
		// chunk of flows to an endpoint a client's 256 PEERs share
		// held the engine 63 ms, 180 ms with two such endpoints'
		// flows interleaved as a dump gives them
		// (BenchmarkSpareLivePeers). Deciding on this snapshot is
		// deciding as it is taken: a lease that ends after it queues
		// its own flush, walked after this one.
		of = of[:0]
		s.mu.Lock()
		now := s.now() // under s.mu: a rebase moves the table's times
		for i := range chunk {
			t := chunk[i].t
			if i > 0 && t == chunk[i-1].t {
				of = append(of, of[i-1])
				continue
			}
			k := key{a: t.addr.As16(), is4: t.addr.Is4(), proto: t.proto, port: t.port}
			e := &runs[(k.a[15] ^ k.a[14] ^ k.a[13] ^ k.a[11] ^ byte(k.port) ^ byte(k.port>>8) ^ k.proto)]
			r := e.r
			if !e.ok || e.k != k {
				n := len(ps)
				ps, buf = s.liveAdmits(ps, t, now, buf)
				r = [2]int{n, len(ps)}
				*e = seen{k: k, r: r, ok: true}
			}
			of = append(of, r)
		}
		s.mu.Unlock()
		for i := range chunk {
			h := &chunk[i]
			live := ps[of[i][0]:of[i][1]]
			if h.nat {
				h.keep = snattedBy(live, h.t, h.src, h.to)
			} else {
				h.keep = slices.ContainsFunc(live, func(p pinhole.Pinhole) bool { return p.AdmitsFlow(h.t.proto, h.src, h.t.dst(), h.to) })
			}
		}
	}
}

// appendCtFilters appends the flush filters of l's connections
// (flushConntrack) to dst: none for an IPv4 lease without an external
// port, one for the inbound flows (a PEER's too, since issue 9: the
// endpoint's, as a MAP's; the walk spares what a live lease admits, so of
// a PEER's remote's flows too those another lease admits), and for an
// IPv4 NAPT MAP or NAT-PMP lease one more for the outbound flows SNAT-ed
// to its external endpoint. An IPv6 all-ports MAP (port 0)
// or all-protocols one (protocol 0) gets a wildcard filter (ctTarget.wild):
// every inbound flow to its address, of its protocol or of any, as its
// set element (pin6_proto, pin6_addr) admitted them. Before, it got
// none, and those flows outlived it through the guard's "ct state
// established accept" (h/ctall).
func appendCtFilters(dst []ctFilter, l *store.Lease) []ctFilter {
	if !l.ExternalAddr.IsValid() || l.ExternalPort == 0 && !l.ExternalAddr.Is6() {
		return dst
	}
	t := ctTarget{addr: l.ExternalAddr, proto: l.Protocol, port: l.ExternalPort}
	if t.wild() {
		return append(dst, ctFilter{t: t})
	}
	dst = append(dst, inboundFilter(t, netip.AddrPortFrom(l.InternalAddr.Unmap(), l.InternalPort)))
	if snatFlows(l) {
		dst = append(dst, ctFilter{v4: true, t: t, nat: true, src4: l.InternalAddr.As4(), sport: l.InternalPort})
	}
	return dst
}

// inboundFilter is the filter of the inbound flows to t that its mapping
// delivered at to (ctFilter.delivered): to's port in sport, its address,
// IPv4, in src4 (IPv6: t's own address, as pcpd never translates an IPv6
// address). One whose to cannot be kept so (another family, another IPv6
// address, port 0) matches wherever a flow to t was delivered.
func inboundFilter(t ctTarget, to netip.AddrPort) ctFilter {
	f := ctFilter{v4: t.addr.Is4(), t: t}
	switch a := to.Addr().Unmap(); {
	case to.Port() == 0 || a.Is4() != t.addr.Is4() || !a.Is4() && a != t.addr:
	case a.Is4():
		f.src4, f.sport = a.As4(), to.Port()
	default:
		f.sport = to.Port()
	}
	return f
}

// delivered reports whether the inbound filter f's mapping delivered a
// flow to f.t at to, the flow's reply source: its internal endpoint (an
// IPv4 NAPT mapping's, an IPv6 redirect's; an IPv6 pinhole's is its
// external one, untranslated). Security (issue 9, h/revprio): an admin's
// own DNAT of a public endpoint (a port forward, which wins over pcpd's
// DNAT since h/natprio) makes flows whose original destination is that
// of a client's mapping there (granted: pcpd cannot see other tables'
// rules); matched by original destination alone, the walk of the
// mapping's end deleted them, and with nf_conntrack_tcp_loose=0 the
// admin's forwarded connections were reset, as often as a client mapped
// and deleted the port (TestNAPTBesideAdminPortForwardEndKeepsAdminFlows).
// A filter without one (sport 0: a wildcard, a retarget walk's of an
// endpoint with several former targets, tests) matches wherever the
// kernel delivered the flow.
func (f ctFilter) delivered(to netip.AddrPort) bool {
	if f.nat || f.sport == 0 {
		return true
	}
	a := f.t.addr
	if a.Is4() {
		a = netip.AddrFrom4(f.src4)
	}
	return to.Port() == f.sport && to.Addr().Unmap() == a
}

// deliveredBy reports whether an inbound filter of fs (sorted by
// cmpCtFilter) of exactly t's flows matches a flow delivered at to.
func deliveredBy(fs []ctFilter, t ctTarget, to netip.AddrPort) bool {
	i, _ := slices.BinarySearchFunc(fs, ctFilter{t: t}, cmpCtTarget)
	for ; i < len(fs) && !fs[i].nat && fs[i].t == t; i++ {
		if fs[i].delivered(to) {
			return true
		}
	}
	return false
}

// ctFilter is one ended mapping's flows: those whose original destination
// is t, delivered where its mapping delivered them (src4:sport, see
// inboundFilter; none: anywhere) or, with nat, those whose reply destination is t and original
// source src4:sport (SNAT-ed to t; IPv4 only, so 6 bytes in the padding
// beside the flags: 40 bytes a filter, as before the SNAT filters, where a
// netip.AddrPort made it 72). The generic walk's netlink filter is made
// from it when that walk runs (kernels before 5.8): made for every ended
// mapping up front, it cost ≈ 0.5 KB of heap each until the walk (maps
// and a net.IP), 1M of them at a start revoking 1 000 000 leases.
// (Until h/holder an inbound wildcard filter kept in src4 and sport when
// its mapping ended: the walk spares by what is live when it decides now,
// spareLive.)
type ctFilter struct {
	v4  bool
	nat bool
	// flowed: its mapping's admitted flows are recorded (recordsFlows);
	// skipUnflowed may leave it out. In the padding too.
	flowed bool
	sport  uint16
	src4   [4]byte
	t      ctTarget
}

// source is the original source of a nat filter's flows.
func (f ctFilter) source() netip.AddrPort {
	return netip.AddrPortFrom(netip.AddrFrom4(f.src4), f.sport)
}

// group is the dump f's flows come back in (ctDeleter.end).
func (f ctFilter) group() ctGroup {
	return ctGroup{v4: f.t.addr.Is4(), proto: f.t.proto, nat: f.nat}
}

// cmpCtFilter orders filters by group, then by what a flow is matched
// against (ctDeleter.end binary-searches a group's run).
func cmpCtFilter(a, b ctFilter) int {
	if a.t.addr.Is4() != b.t.addr.Is4() {
		if a.t.addr.Is4() {
			return -1
		}
		return 1
	}
	if c := cmp.Compare(a.t.proto, b.t.proto); c != 0 {
		return c
	}
	if a.nat != b.nat {
		if !a.nat {
			return -1
		}
		return 1
	}
	if c := a.t.addr.Compare(b.t.addr); c != 0 {
		return c
	}
	if c := cmp.Compare(a.t.port, b.t.port); c != 0 {
		return c
	}
	if c := bytes.Compare(a.src4[:], b.src4[:]); c != 0 {
		return c
	}
	return cmp.Compare(a.sport, b.sport)
}

// netlinkFilter is f as the generic walk's filter; nil if netlink refuses it.
func (f ctFilter) netlinkFilter() netlink.CustomConntrackFilter {
	if f.nat {
		return natFlowFilter{f}
	}
	nf := &netlink.ConntrackFilter{}
	if f.t.proto != 0 && nf.AddProtocol(f.t.proto) != nil ||
		nf.AddIP(netlink.ConntrackOrigDstIP, net.IP(f.t.addr.AsSlice())) != nil ||
		!f.t.wild() && nf.AddPort(netlink.ConntrackOrigDstPort, f.t.port) != nil {
		return nil
	}
	if f.sport != 0 {
		return deliveredFilter{nf: nf, f: f}
	}
	return nf
}

// deliveredFilter is a generic walk's inbound filter of the flows its
// mapping delivered (ctFilter.delivered): not an admin's own DNAT-ed ones
// to the same endpoint.
type deliveredFilter struct {
	nf netlink.CustomConntrackFilter
	f  ctFilter
}

func (d deliveredFilter) MatchConntrackFlow(fl *netlink.ConntrackFlow) bool {
	return d.nf.MatchConntrackFlow(fl) && d.f.delivered(ctEnd(fl.Reverse.SrcIP, fl.Reverse.SrcPort))
}

// ctEnd is the endpoint ip:port of a generic walk's flow tuple, the
// address unmapped (the zero address if ip is none).
func ctEnd(ip net.IP, port uint16) netip.AddrPort {
	a, _ := netip.AddrFromSlice(ip)
	return netip.AddrPortFrom(a.Unmap(), port)
}

// natFlowFilter matches the flows of a SNAT filter (netlink's own filter
// has no reply ports).
type natFlowFilter struct{ f ctFilter }

func (n natFlowFilter) MatchConntrackFlow(fl *netlink.ConntrackFlow) bool {
	fw, rv := fl.Forward, fl.Reverse
	src, _ := netip.AddrFromSlice(fw.SrcIP)
	dst, _ := netip.AddrFromSlice(rv.DstIP)
	return fw.Protocol == n.f.t.proto &&
		dst.Unmap() == n.f.t.addr && rv.DstPort == n.f.t.port &&
		src.Unmap() == netip.AddrFrom4(n.f.src4) && fw.SrcPort == n.f.sport
}

// ctFlusher coalesces conntrack flushes. A flush walks (dumps) the whole
// conntrack table in user space whatever the number of mappings ended, so
// one per batch, each in its own goroutine, overlapped ~30 at a time under
// 10 % deletes and took 94 % of pcpd's CPU (BENCHMARKS.md). Now at most one
// walk is in flight; filters queued meanwhile go together in the next one.
// Sequence numbers tell a waiter when its filters were covered.
//
// A walk that could not end every flow (a dump failed: EINTR, EBUSY,
// ENOBUFS, ENOMEM, an interrupted dump, or its deletes) hands back the
// filters it left; they stay pending and are walked again after a
// backoff (retryFirst, doubling up to retryMax), or at once with the next
// filters queued, until a walk ends them: before, they were dropped and
// those flows outlived their mapping by their conntrack timeout (TCP
// established: 5 days). Waiters are held through the first holdAttempts
// walks, then released (a reply is not held for good by a failing
// kernel); the retries go on.
type ctFlusher struct {
	// walk deletes what matches any filter, sparing what a live lease
	// admits (Server.walkLive); it returns the filters whose flows it may
	// have left (their dump or deletes failed) and why.
	walk func(fs []ctFilter) (left []ctFilter, err error)
	// report is told of every failed walk (attempt ≥ 1) and of the
	// success that ends a run of them (left 0).
	report func(attempt, left int, err error)
	// settle, if set, runs after a walk that left no filter, once its
	// waiters are released, before the next walk (Server.pruneAfterWalk);
	// settled is the last filters set whose walk's release (and settle)
	// are done.
	settle func()
	// Backoff between retries of a failing walk (0: the defaults).
	retryFirst, retryMax time.Duration
	mu                   sync.Mutex
	pending              []ctFilter
	queued               uint64 // filters sets queued so far
	done                 uint64 // all sets up to this one are flushed
	settled              uint64 // ... and settle has run after their walk
	clean                uint64 // ... and walked without a filter left (cleanSeq)
	running              bool
	closed               bool // Serve returned: no more retries (close)
	waiters              []ctWaiter
	settleWaiters        []ctWaiter    // afterSettled's
	wake                 chan struct{} // an add cuts a retry's backoff short

	// gap spaces walks nobody waits for (0: ctWalkGap; negative: none);
	// lastWalk is when the last one started (run's goroutine only).
	gap      time.Duration
	lastWalk time.Time
}

// The defaults of ctFlusher's retries: ≈ 20+40+80 ms of waiting before
// held replies go out anyway, then at most 10 s between walks.
const (
	ctRetryFirst   = 20 * time.Millisecond
	ctRetryMax     = 10 * time.Second
	ctHoldAttempts = 3
)

// ctWalkGap is the least time from one walk's start to the next's when no
// reply waits for it (mustWaitFlush): since the ruleset cuts IPv6
// pinholes' flows itself, most walks only free conntrack entries, and
// each is a dump of the namespace's whole table (≈ 9 ms of a core:
// BENCHMARKS.md item 41). Back to back at high churn they took ≈ 90 % of
// a core beside the engine (item 43: ≈ 100 walks a second). A waiter
// (after: an IPv4 NAPT delete, HandleBatch) cuts the gap short.
const ctWalkGap = 100 * time.Millisecond

type ctWaiter struct {
	seq uint64
	fn  func()
}

// add queues filters and starts a walk if none is in flight. What a
// lease admits is not looked at here: the walk asks the leases live as it
// decides (spareLive; before h/holder, those live as the filters were
// queued, and still as the walk started). fs is the flusher's from then on (the walk
// sorts and prunes it in place): with nothing pending it is kept as is,
// not copied (1M filters at a start dropping 1M expired leases, 40 MB).
func (c *ctFlusher) add(fs []ctFilter) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.pending == nil {
		c.pending = fs
	} else {
		c.pending = append(c.pending, fs...)
	}
	c.queued++
	if c.wake == nil {
		c.wake = make(chan struct{}, 1)
	}
	if !c.running {
		c.running = true
		go c.run()
		return
	}
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

// seq is the sequence number of the last filters queued.
func (c *ctFlusher) seq() uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.queued
}

// cleanSeq is the last filters set a walk ended every flow of, and all
// before it (done also counts sets whose walks failed for good).
func (c *ctFlusher) cleanSeq() uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.clean
}

// after calls fn (at once, or from the flusher) when every filter set up to
// seq has been flushed.
func (c *ctFlusher) after(seq uint64, fn func()) {
	c.mu.Lock()
	if c.done >= seq {
		c.mu.Unlock()
		fn()
		return
	}
	c.waiters = append(c.waiters, ctWaiter{seq: seq, fn: fn})
	if c.wake != nil { // a walk spaced out (ctWalkGap) runs now
		select {
		case c.wake <- struct{}{}:
		default:
		}
	}
	c.mu.Unlock()
}

// spaced waits, when nobody waits for a walk, until ctWalkGap has passed
// since the last one started; a waiter or close ends the wait.
func (c *ctFlusher) spaced() {
	gap := cmp.Or(c.gap, ctWalkGap)
	for gap > 0 && !c.lastWalk.IsZero() {
		c.mu.Lock()
		idle := len(c.waiters) == 0 && !c.closed
		c.mu.Unlock()
		left := gap - time.Since(c.lastWalk)
		if !idle || left <= 0 {
			return
		}
		t := time.NewTimer(left)
		select {
		case <-t.C:
		case <-c.wake: // an add, a waiter or close: look again
			t.Stop()
		}
	}
}

func (c *ctFlusher) run() {
	var retry []ctFilter // left by the last walk
	attempt := 0         // failed walks in a row
	backoff := cmp.Or(c.retryFirst, ctRetryFirst)
	for {
		if attempt == 0 {
			c.spaced()
		}
		c.mu.Lock()
		fs, upTo := c.pending, c.queued
		c.pending = nil
		if len(fs) == 0 && len(retry) == 0 {
			c.running = false
			c.mu.Unlock()
			return
		}
		c.mu.Unlock()
		select { // what it announced is taken
		case <-c.wake:
		default:
		}
		fs = append(fs, retry...)

		var left []ctFilter
		var err error
		if len(fs) > 0 {
			c.lastWalk = time.Now()
			left, err = c.walk(fs)
		}
		if len(left) == 0 {
			c.mu.Lock()
			c.clean = max(c.clean, upTo)
			c.mu.Unlock()
			if attempt > 0 && c.report != nil {
				c.report(0, 0, nil)
			}
			attempt, retry = 0, nil
			backoff = cmp.Or(c.retryFirst, ctRetryFirst)
		} else {
			attempt++
			retry = left
			if c.report != nil {
				c.report(attempt, len(left), err)
			}
		}
		if attempt > 0 && c.isClosed() {
			// Serve returned: no retries (close).
			c.release(upTo)
			c.settledTo(upTo)
			attempt, retry = 0, nil
			continue
		}

		if attempt == 0 || attempt >= ctHoldAttempts {
			c.release(upTo)
		}
		if attempt == 0 && c.settle != nil {
			c.settle() // after the release: nobody waits for it
		}
		if attempt == 0 || attempt >= ctHoldAttempts {
			c.settledTo(upTo)
		}
		if attempt > 0 {
			t := time.NewTimer(backoff)
			select {
			case <-t.C:
			case <-c.wake:
				t.Stop()
			}
			backoff = min(2*backoff, cmp.Or(c.retryMax, ctRetryMax))
			if c.isClosed() {
				c.release(upTo)
				c.settledTo(upTo)
				attempt, retry = 0, nil
			}
		}
	}
}

// settledTo marks every set up to upTo settled and calls
// their afterSettled waiters.
func (c *ctFlusher) settledTo(upTo uint64) {
	c.mu.Lock()
	c.settled = max(c.settled, upTo)
	ready := takeReady(&c.settleWaiters, c.settled)
	c.mu.Unlock()
	for _, fn := range ready {
		fn()
	}
}

// takeReady removes from *ws the waiters for sets up to upTo and returns
// their functions, for the caller to call once it has let go of c.mu.
func takeReady(ws *[]ctWaiter, upTo uint64) (ready []func()) {
	kept := (*ws)[:0]
	for _, w := range *ws {
		if w.seq <= upTo {
			ready = append(ready, w.fn)
		} else {
			kept = append(kept, w)
		}
	}
	*ws = kept
	return ready
}

// afterSettled is after, but fn is called once the settle after the walk
// (Server.pruneAfterWalk) has run too: nothing of the flusher's work for
// every set up to seq is left (endConntrack). Unlike after, it does not
// cut a spaced walk's gap short (endConntrack's close does).
func (c *ctFlusher) afterSettled(seq uint64, fn func()) {
	c.mu.Lock()
	if c.settled >= seq {
		c.mu.Unlock()
		fn()
		return
	}
	c.settleWaiters = append(c.settleWaiters, ctWaiter{seq: seq, fn: fn})
	c.mu.Unlock()
}

// release marks every set up to upTo flushed and calls their waiters.
func (c *ctFlusher) release(upTo uint64) {
	c.mu.Lock()
	c.done = max(c.done, upTo)
	ready := takeReady(&c.waiters, c.done)
	c.mu.Unlock()
	for _, fn := range ready {
		fn()
	}
}

// walkConntrack deletes the flows matching any of fs, sparing those
// admits admits (ctFlusher.walk). First with the kernel filtering
// (CTA_FILTER: one dump per family, protocol and direction, the kernel
// returns only the flows of that protocol to that IPv4 address, or of
// that port when there is one target, instead of every entry copied and
// parsed here); if the kernel refuses CTA_FILTER, with the generic walk.
// The kernel-filtered walk runs on the ctnetlink socket kept from the
// walk before while Serve runs, dialled (in Config.NetNS) only for the
// first walk and after a failed one (ctSocket); before, every walk dialled
// one and closed it, 16 ms of a 37 ms walk (BENCHMARKS.md item 41).
// It returns the filters of the dumps that failed (their flows may be
// left: the flusher walks them again) and the errors.
func (s *Server) walkConntrack(fs []ctFilter, admits ctAdmits) ([]ctFilter, error) {
	return s.walkCt(fs, admits, false)
}

// walkLive is the flusher's walk (ctFlusher.walk): walkConntrack, but what
// stays is decided by the leases live once each dump's flows are read
// (spareLive, which takes s.mu), not by a set of pinholes given.
// A walk that succeeded leaves the addresses it covered to prune from the
// record (pruneFlowed) once the flusher has released the replies waiting
// for it (ctFlusher.settle: pruneAfterWalk). Before (h/auditlife, review
// h/revrem), the prune ran here: an IPv4 NAPT delete's reply waited for
// its two holds of s.mu and its transaction besides the walk
// (TestE2EFlowedPruneAfterRelease).
func (s *Server) walkLive(fs []ctFilter) ([]ctFilter, error) {
	s.flowedPrune = nil
	if fs = s.skipUnflowed(fs); len(fs) == 0 {
		return nil, nil
	}
	as := flowedOf(fs) // before the walk sorts fs
	left, err := s.walkCt(fs, nil, true)
	if err == nil && len(left) == 0 {
		s.flowedPrune = as
	}
	return left, err
}

// pruneAfterWalk prunes what the last walk that succeeded left to prune
// (walkLive): the flusher's settle, after its release and before its next
// walk, on its goroutine, which pruneFlowed's argument rests on (no other
// walk runs meanwhile; a lease made and ended since has its filter
// queued, walked next).
func (s *Server) pruneAfterWalk() {
	as := s.flowedPrune
	s.flowedPrune = nil
	s.pruneFlowed(as)
}

// takeCtSock takes a walk's conntrack socket (ctSock.take) in
// Config.NetNS, or in pcpd's own namespace when none is set.
func (s *Server) takeCtSock() (*mdnl.Conn, error) {
	fd := 0
	if nsSet(s.cfg.NetNS) {
		fd = int(s.cfg.NetNS)
	}
	return s.ctSock.take(fd)
}

func (s *Server) walkCt(fs []ctFilter, admits ctAdmits, live bool) ([]ctFilter, error) {
	// The socket kept from the last walk while serving (ctSocket); a
	// new deleter around it every walk: nothing else of the last walk's
	// (what it spared, the host's addresses then) carries over.
	c, err := s.takeCtSock()
	if err != nil {
		s.log.Debug("conntrack flush (kernel filter)", zap.Error(err))
		return s.walkConntrackGeneric(fs, admits, live)
	}
	d := &ctDeleter{c: c, admits: admits, fault: s.ctDumpFault, spare: s.spareLive, host: s.hostAddrs(), live: live}
	// One dump per family, protocol and direction (each walks the
	// whole table), over its run of fs sorted, duplicates out: maps
	// of the keys took ≈ 400 MB at a start dropping 1 000 000
	// expired leases (BenchmarkStartExpired).
	slices.SortFunc(fs, cmpCtFilter)
	fs = slices.CompactFunc(fs, func(a, b ctFilter) bool { return cmpCtFilter(a, b) == 0 })
	n := 0
	var left []ctFilter
	var errs []error
	for i := 0; i < len(fs); {
		g := fs[i].group()
		j := i + 1
		for j < len(fs) && fs[j].group() == g {
			j++
		}
		k, err := d.end(g, fs[i:j])
		n += k
		if err != nil {
			s.log.Debug("conntrack flush (kernel filter)", zap.Error(err))
			if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.EOPNOTSUPP) {
				if len(errs) > 0 || d.overflowed || !errors.Is(err, errCtFilterRefused) {
					s.ctSock.put(c, false)
					return s.walkConntrackGeneric(fs, admits, live)
				}
				// The kernel refused the filter and every exchange on c
				// was read to its end (the refusal is the dump's only
				// answer): the generic walk goes on on c. Before (review
				// h/revgenwalk), c was closed and the generic walk dialled
				// another, so on such a kernel every walk closed a
				// NETLINK_NETFILTER socket, the stall ctSocket is there
				// to avoid (TestE2ECtGenericWalkKeepsSocket).
				return s.walkGenericOn(c, fs, admits, live)
			}
			// Anything else (EINTR, EBUSY, ENOBUFS, ENOMEM, an
			// interrupted dump, a failed delete) may have left
			// flows of this group: walked again.
			left = append(left, fs[i:j]...)
			errs = append(errs, err)
		}
		i = j
	}
	// Kept for the next walk only if every exchange on it succeeded
	// (ctSocket: a failed one may have left answers queued).
	s.ctSock.put(c, len(errs) == 0 && !d.overflowed)
	s.m.ctWalks.Inc()
	if n > 0 {
		s.log.Info("ended connections of removed mappings", zap.Int("flows", n))
	}
	return left, errors.Join(errs...)
}

// ctAdmits are, for an endpoint a walk ends the flows to, the pinholes of
// the live leases that admit some of them, as a walk run under s.mu
// (cutRetargeted) looked them up: a PEER, a FILTERed MAP, a FILTERed IPv6
// all-ports MAP of the address. The flows they admit stay. The flusher's
// walk asks the live leases itself once the dump found the flows
// (spareLive, walkLive).
type ctAdmits map[ctTarget][]pinhole.Pinhole

// admitted reports whether a pinhole a[t] admits a flow from src to t
// that the kernel delivered at to (its reply source), as the kernel's set
// element and DNAT would now (pinhole.Pinhole.AdmitsFlow): a mapping that
// took over t DNAT-ing it elsewhere spares none of the flows of the one
// that ended there.
func (a ctAdmits) admitted(t ctTarget, src, to netip.AddrPort) bool {
	for _, p := range a[t] {
		if p.AdmitsFlow(t.proto, src, t.dst(), to) {
			return true
		}
	}
	return false
}

// keepAdmitted is a generic walk's inbound filter that spares the flows
// a live lease admits (ctAdmits).
type keepAdmitted struct {
	nf     netlink.CustomConntrackFilter
	t      ctTarget
	admits ctAdmits
}

func (k keepAdmitted) MatchConntrackFlow(fl *netlink.ConntrackFlow) bool {
	return k.nf.MatchConntrackFlow(fl) &&
		!k.admits.admitted(k.t, ctEnd(fl.Forward.SrcIP, fl.Forward.SrcPort), ctEnd(fl.Reverse.SrcIP, fl.Reverse.SrcPort))
}

// snatted reports whether a pinhole a[t] SNATs a new outbound flow from
// the internal endpoint src to the remote dst to t, as its companion in
// the kernel's snat4 / snat4_filter map does (keyed by the internal
// endpoint and, filtered, the remote range: a PEER's covers its remote
// only): such a flow is that live lease's, and stays.
func (a ctAdmits) snatted(t ctTarget, src, dst netip.AddrPort) bool {
	return snattedBy(a[t], t, src, dst)
}

// snattedBy is ctAdmits.snatted over the pinholes ps.
func snattedBy(ps []pinhole.Pinhole, t ctTarget, src, dst netip.AddrPort) bool {
	src = netip.AddrPortFrom(src.Addr().Unmap(), src.Port())
	for _, p := range ps {
		if netip.AddrPortFrom(p.InternalAddr.Unmap(), p.InternalPort) == src && p.Admits(t.proto, dst, t.dst()) {
			return true
		}
	}
	return false
}

// keepSNATted is a generic walk's SNAT filter that spares the flows a
// live lease's SNAT companion covers (ctAdmits.snatted): keepAdmitted's
// fields, for the outbound flows.
type keepSNATted keepAdmitted

func (k keepSNATted) MatchConntrackFlow(fl *netlink.ConntrackFlow) bool {
	return k.nf.MatchConntrackFlow(fl) &&
		!k.admits.snatted(k.t, ctEnd(fl.Forward.SrcIP, fl.Forward.SrcPort), ctEnd(fl.Forward.DstIP, fl.Forward.DstPort))
}

// keepLive is a generic walk's filter that spares the flows a lease live
// as it is asked admits (spareLive, one flow at a time): a wildcard
// filter's in any walk, every filter's in the flusher's (walkLive).
type keepLive struct {
	nf  netlink.CustomConntrackFilter
	s   *Server
	nat bool
}

func (k keepLive) MatchConntrackFlow(fl *netlink.ConntrackFlow) bool {
	if !k.nf.MatchConntrackFlow(fl) {
		return false
	}
	dst := ctEnd(fl.Forward.DstIP, fl.Forward.DstPort)
	h := ctHit{t: ctTarget{addr: dst.Addr(), proto: fl.Forward.Protocol, port: dst.Port()},
		src: ctEnd(fl.Forward.SrcIP, fl.Forward.SrcPort), nat: k.nat}
	if k.nat {
		// Its reply destination is the target; the remote its
		// original destination.
		rd := ctEnd(fl.Reverse.DstIP, fl.Reverse.DstPort)
		h.t = ctTarget{addr: rd.Addr(), proto: fl.Forward.Protocol, port: rd.Port()}
		h.to = dst
	} else {
		h.to = ctEnd(fl.Reverse.SrcIP, fl.Reverse.SrcPort)
	}
	hs := []ctHit{h}
	k.s.spareLive(hs)
	return !hs[0].keep
}

// hostAddrs is the set of the host's own addresses, as the walk starts:
// an inbound filter's flow whose original source is one of them was
// opened by the host itself (or by a process of it, to the client's
// address), not admitted by a pinhole, and outlives the mapping (keepHost,
// ctDeleter.host). Since h/spoofsrc the guard drops a forwarded packet
// with a local source before any pinhole accept ("fib saddr type 2-4",
// local among them: the kernel's local table, which holds every address
// the host holds on any interface; a protected one is dropped by the
// reverse-path rule), so no new flow from the WAN or a LAN can carry one. Before
// (h/revall, h/peerend "Left"), an IPv6 all-ports MAP's end flushed the
// host's own connections to the client's address, and a port MAP's its
// connection to that port. Read from the kernel as the walk starts: the
// addresses of every interface in Config.NetNS (tentative and DAD-failed
// ones out: the host cannot send from them) that have their local route
// in the local table, which the rule's lookup finds; not pcpd's served set: a host address on an
// interface pcpd does not serve (its WAN) is local to the rule too. A
// local route that is no interface's address (AnyIP: "ip route add local
// PREFIX dev lo") is not looked for: such flows are flushed, as before.
// Nil if the kernel cannot tell: nothing is spared then.
func (s *Server) hostAddrs() hostAddrs {
	h, err := routeHandle(s.cfg.NetNS)
	if err != nil {
		s.log.Debug("conntrack flush: host addresses", zap.Error(err))
		return nil
	}
	defer h.Close()
	as, err := h.AddrList(nil, netlink.FAMILY_ALL)
	if err != nil {
		s.log.Debug("conntrack flush: host addresses", zap.Error(err))
		return nil
	}
	// Local as the rule sees it: a route lookup of the address finds
	// its local route (an address whose local route is gone, its
	// interface down, is not: a spoof of it passes the guard). One
	// dump of the local table's local routes (strict checking: the
	// kernel sends that table only), not a lookup per address: those
	// cost ≈ 1 ms each here, 4.4-7 s a walk on a host with 4 000
	// addresses (review h/revspoof2, BenchmarkHostAddrs).
	h.SetStrictCheck(true) // best effort: the table and type are filtered here too
	rs, err := h.RouteListFiltered(netlink.FAMILY_ALL, &netlink.Route{Table: unix.RT_TABLE_LOCAL, Type: unix.RTN_LOCAL},
		netlink.RT_FILTER_TABLE|netlink.RT_FILTER_TYPE)
	if err != nil {
		s.log.Debug("conntrack flush: host addresses' local routes", zap.Error(err))
		return nil
	}
	local := make(map[netip.Addr]struct{}, len(rs))
	for _, r := range rs {
		if r.Dst == nil {
			continue
		}
		if ones, bits := r.Dst.Mask.Size(); ones != bits {
			continue // a local prefix (AnyIP): no interface's address
		}
		if ip, ok := netip.AddrFromSlice(r.Dst.IP); ok {
			local[ip.Unmap()] = struct{}{}
		}
	}
	m := make(hostAddrs, len(as))
	for _, a := range as {
		if a.Flags&(unix.IFA_F_TENTATIVE|unix.IFA_F_DADFAILED) != 0 {
			continue
		}
		ip, ok := netip.AddrFromSlice(a.IP)
		if !ok {
			continue
		}
		if _, ok := local[ip.Unmap()]; ok {
			m[ip.Unmap()] = struct{}{}
		}
	}
	return m
}

// hostAddrs are the host's own addresses (Server.hostAddrs).
type hostAddrs map[netip.Addr]struct{}

// has reports whether a is one of them (false on a nil set).
func (h hostAddrs) has(a netip.Addr) bool {
	_, ok := h[a.Unmap()]
	return ok
}

// keepHost is a generic walk's inbound filter that spares the flows the
// host opened itself (original source one of its addresses: hostAddrs).
type keepHost struct {
	nf   netlink.CustomConntrackFilter
	host hostAddrs
}

func (k keepHost) MatchConntrackFlow(fl *netlink.ConntrackFlow) bool {
	if !k.nf.MatchConntrackFlow(fl) {
		return false
	}
	src, _ := netip.AddrFromSlice(fl.Forward.SrcIP)
	return !k.host.has(src)
}

// routeHandle opens a netlink handle in ns (the caller's namespace if
// unset) with a route socket only. netlink.NewHandle without families
// opens every family it supports, a NETLINK_NETFILTER socket among them,
// and closing that one makes the kernel take the namespace's nftables
// commit lock and wait out an RCU grace period under it (nf_tables'
// NETLINK_URELEASE handler): hostAddrs, once a conntrack walk, spent
// 11.8 ms of a 37.4 ms walk in that close, and the engine's nftables
// transactions waited behind it (BENCHMARKS.md item 41).
func routeHandle(ns netns.NsHandle) (*netlink.Handle, error) {
	if nsSet(ns) {
		return netlink.NewHandleAt(ns, unix.NETLINK_ROUTE)
	}
	return netlink.NewHandle(unix.NETLINK_ROUTE)
}

// walkConntrackGeneric is the walk for kernels without CTA_FILTER: one
// dump of the whole table per address family that has filters, filtered
// here, its deletes as the kernel-filtered walk's (ctDeleter.deleteMatching:
// by reply tuple and CTA_ID, pipelined), on the walk's socket (ctSocket).
// It returns the filters of the families whose walk failed.
func (s *Server) walkConntrackGeneric(fs []ctFilter, admits ctAdmits, live bool) ([]ctFilter, error) {
	c, err := s.takeCtSock()
	if err != nil {
		s.log.Debug("conntrack flush", zap.Error(err))
		return fs, err
	}
	return s.walkGenericOn(c, fs, admits, live)
}

// walkGenericOn is walkConntrackGeneric on c, a socket ctSock.take
// returned with nothing queued on it; it hands c back (ctSock.put).
func (s *Server) walkGenericOn(c *mdnl.Conn, fs []ctFilter, admits ctAdmits, live bool) ([]ctFilter, error) {
	d := &ctDeleter{c: c}
	host := s.hostAddrs()
	n := 0
	var left []ctFilter
	var errs []error
	for _, fam := range []uint8{unix.AF_INET, unix.AF_INET6} {
		var filters []netlink.CustomConntrackFilter
		for _, f := range fs {
			if f.v4 == (fam == unix.AF_INET) {
				if nf := f.netlinkFilter(); nf != nil {
					if !f.nat && len(host) > 0 {
						nf = keepHost{nf: nf, host: host}
					}
					if f.t.wild() || live {
						nf = keepLive{nf: nf, s: s, nat: f.nat}
					} else if _, held := admits[f.t]; held && !f.nat {
						nf = keepAdmitted{nf: nf, t: f.t, admits: admits}
					} else if held {
						nf = keepSNATted{nf: nf, t: f.t, admits: admits}
					}
					filters = append(filters, nf)
				}
			}
		}
		if len(filters) == 0 {
			continue
		}
		buckets := ctHashSize()
		k, err := ctGenericDelete(d, fam, filters...)
		if ctHashSize() != buckets {
			// The hash table was resized during the dump, which may have
			// skipped flows (as the kernel-filtered walk's check,
			// h/left9): walked again (h/left10).
			err = errors.Join(err, fmt.Errorf("server: conntrack dump (generic): %w", ctnl.ErrResized))
		}
		if err != nil {
			s.log.Debug("conntrack flush", zap.Error(err))
			for _, f := range fs {
				if f.v4 == (fam == unix.AF_INET) {
					left = append(left, f)
				}
			}
			errs = append(errs, err)
		}
		n += k
	}
	// Kept for the next walk only if every exchange on it succeeded
	// (ctSocket).
	s.ctSock.put(c, len(errs) == 0 && !d.overflowed)
	s.m.ctWalks.Inc()
	if n > 0 {
		s.log.Info("ended connections of removed mappings", zap.Int("flows", n))
	}
	return left, errors.Join(errs...)
}

// ctGenericDelete is the generic walk's dump and deletes of a family
// (ctDeleter.deleteMatching); a variable for tests. Before h/genwalk it
// was netlink's Handle.ConntrackDeleteFilters.
var ctGenericDelete = (*ctDeleter).deleteMatching

// reportCtWalk logs and counts a failed walk (attempt ≥ 1: the first of
// a run as a warning, the retries at debug level) and the success ending
// a run of them.
func (s *Server) reportCtWalk(attempt, left int, err error) {
	switch {
	case attempt == 0:
		s.log.Info("conntrack flush succeeded after failed walks")
		if s.priorDropAt.Load() != 0 {
			// The start's walk released its waiter unclean (held
			// attempts over): its natPrior records go now if this
			// walk covered it (dropWalkedPriors; review h/revleft10).
			go s.dropWalkedPriors()
		}
	case attempt == 1:
		s.m.ctFailures.Inc()
		s.log.Warn("conntrack flush failed; the connections of ended mappings may last until it succeeds, retrying",
			zap.Int("filters", left), zap.Error(err))
	default:
		s.m.ctFailures.Inc()
		s.log.Debug("conntrack flush failed again", zap.Int("attempt", attempt), zap.Int("filters", left), zap.Error(err))
	}
}

// waitConntrack blocks until every flush queued so far has run.
func (s *Server) waitConntrack() {
	done := make(chan struct{})
	s.ct.after(s.ct.seq(), func() { close(done) })
	<-done
}

// close stops the retries (Serve returns): a walk that fails from now on
// is not walked again, and its waiters go. A flush queued after still
// runs once. Before, the flusher went on retrying every 10 s for good
// after Serve returned, dialling conntrack in Config.NetNS, a descriptor
// its owner may have closed by then (TestCtFlushClosedStopsRetrying).
func (c *ctFlusher) close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closed = true
	if c.wake != nil {
		select {
		case c.wake <- struct{}{}:
		default:
		}
	}
}

// ctEndWait bounds how long Serve's end waits for the walks queued
// before it (endConntrack).
const ctEndWait = 2 * time.Second

// endConntrack is Serve's end: it stops the retries (close) and waits, at
// most ctEndWait, for the walks queued so far, which close starts at once.
// A walk nobody waited for may be held back by ctWalkGap, and pcpd exits
// as soon as Serve returns: the walk of a mapping revoked or expired just
// before (an IPv4 NAPT one: the walk alone ends its DNAT-ed flows) died
// with the process, and its lease, gone from the store, is not flushed at
// the next start (review h/revctcut; TestEndConntrackRunsSpacedWalk).
//
// Under s.mu first, serveEnded is set: an operator's revoke still running
// (control serves until its own end) begins no chunk after this, so no
// flush is queued once the flusher is closed (h/opsleft).
func (s *Server) endConntrack() {
	s.mu.Lock()
	s.serveEnded = true
	s.mu.Unlock()
	s.ct.close()
	done := make(chan struct{})
	// Until the flowed6 prune after the last walk is done too: it runs
	// after the walk's release (pruneAfterWalk), and the caller closes the
	// firewall once Serve returns. Before (review h/revlife), the wait
	// ended with the release, and the prune (two holds of s.mu and a
	// transaction) ran after Serve had returned
	// (TestEndConntrackWaitsForSettle).
	s.ct.afterSettled(s.ct.seq(), func() { close(done) })
	t := time.NewTimer(ctEndWait)
	defer t.Stop()
	select {
	case <-done:
	case <-t.C:
		s.log.Warn("conntrack flush still running at shutdown; the connections of mappings ended last may outlive them")
	}
}

func (c *ctFlusher) isClosed() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.closed
}
