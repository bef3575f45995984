package server

import (
	"errors"
	"maps"
	"net/netip"
	"slices"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/pcpd/pcpd/internal/ctnl"
	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/store"
)

// A retaken external endpoint (review h/revnatcut, finding 3). natcut
// (pinhole/natcut.go) re-checks a DNAT-ed flow by its external endpoint
// (and remote) alone: once an ended IPv4 NAPT mapping's or IPv6
// redirect's endpoint is mapped again to another internal endpoint, the
// old flow's packets hit the new element, and conntrack's binding still
// delivers them to the old target. Until the walk of the ended mapping
// ran, and for good with KeepConnections (no walk; the ruleset was to
// cut inbound flows). The ruleset cannot tell: the flow's DNAT target is
// in its reply tuple, and a ct expression with a direction is one the
// nftables library (v0.3.0) cannot read back (NFTA_CT_DIRECTION is a u8,
// the library decodes a u32: GetRules of the chain fails, and so would
// Healthy), nor write for the typed keys ("ct reply ip saddr": no
// direction sent, EINVAL), while the untyped address key aborts nft
// 1.0.6's listing in a concatenation. So the server ends those flows
// itself, before the install that retakes the endpoint commits: a walk
// of that endpoint's flows (kernel-filtered, as the flush's), sparing
// those a live lease admits where the kernel delivers them (the new
// mapping's own, a PEER's: ctAdmits.admitted), so that only the flows
// sent elsewhere end; for an IPv4 endpoint also the old targets' own
// outbound flows SNAT-ed to it (appendSNATCuts: conntrack's reply binding
// sent the endpoint's packets from their remotes to the old target). Only when the endpoint may have such flows
// (natPrior): a NAT mapping ended there with another target and no walk
// has ended its flows since; with KeepConnections, also the flows of
// pcpd's DNAT found at the start (seedNATPrior). Only where the ruleset cuts the kind
// (FlowCutter): elsewhere established flows pass the guard anyway until
// the walk.

// natPrior is what an external endpoint's flows may be DNAT-ed to,
// besides what its live mappings deliver to: the internal endpoint of the
// NAT mapping that ended there (many: several), until seq's flush
// (ctFlusher; 0: none will, KeepConnections or found at the start) or
// a retarget walk of the endpoint ends them, or pruneNATPrior found no
// NAT-ed flow left on the endpoint.
// gen is the record's number (Server.natPriorGen), for pruneNATPrior.
type natPrior struct {
	to   netip.AddrPort
	many bool
	seq  uint64
	gen  uint64
}

// dnatOf is p's external endpoint and internal target if p DNATs (an
// IPv4 NAPT mapping, an IPv6 redirect to another port).
func dnatOf(p pinhole.Pinhole) (ctTarget, netip.AddrPort, bool) {
	in := p.InternalAddr.Unmap()
	ext := p.ExternalAddr.Unmap()
	if !ext.IsValid() {
		ext = in
	}
	if p.InternalPort == 0 || p.ExternalPort == 0 || in.Is6() && p.ExternalPort == p.InternalPort {
		return ctTarget{}, netip.AddrPort{}, false
	}
	return ctTarget{addr: ext, proto: p.Protocol, port: p.ExternalPort}, netip.AddrPortFrom(in, p.InternalPort), true
}

func dnatOfLease(l *store.Lease) (ctTarget, netip.AddrPort, bool) {
	return dnatOf(pinhole.Pinhole{Protocol: l.Protocol, InternalAddr: l.InternalAddr, InternalPort: l.InternalPort,
		ExternalAddr: l.ExternalAddr, ExternalPort: l.ExternalPort})
}

// notePrior records that t's flows may go to `to` until seq's flush.
// Under s.mu.
func (s *Server) notePrior(t ctTarget, to netip.AddrPort, seq uint64) {
	if s.natPrior == nil {
		s.natPrior = map[ctTarget]natPrior{}
	}
	if len(s.natPrior) >= max(s.natPriorPrune, 1024) {
		// Without KeepConnections most entries are of endpoints whose
		// flush's walk ran: dropped here, at most once per doubling,
		// so that the map does not grow with every endpoint ever freed.
		clean := s.ct.cleanSeq()
		maps.DeleteFunc(s.natPrior, func(_ ctTarget, e natPrior) bool { return e.seq != 0 && e.seq <= clean })
		s.natPriorPrune = 2 * len(s.natPrior)
	}
	e, ok := s.natPrior[t]
	switch {
	case !ok:
		e = natPrior{to: to, seq: seq}
	case e.to != to:
		e.many = true
		fallthrough
	default:
		if e.seq != 0 && seq != 0 {
			e.seq = max(e.seq, seq)
		} else {
			e.seq = 0
		}
	}
	s.natPriorGen++
	e.gen = s.natPriorGen
	s.natPrior[t] = e
}

// dropWalkedPriors drops natPrior's entries whose flush's walk ended
// every flow of theirs (seq ≤ the flusher's clean mark: as notePrior's
// drop at a doubling) and makes the map anew with what is left (a Go map
// keeps its buckets when entries go). Called once a start's walk is done
// (notePriors). Takes s.mu.
func (s *Server) dropWalkedPriors() {
	s.mu.Lock()
	defer s.mu.Unlock()
	clean := s.ct.cleanSeq()
	if at := s.priorDropAt.Load(); at != 0 && at <= clean {
		s.priorDropAt.CompareAndSwap(at, 0) // the start's walk is clean: owed no more
	}
	done := func(e natPrior) bool { return e.seq != 0 && e.seq <= clean }
	keep := 0
	for _, e := range s.natPrior {
		if !done(e) {
			keep++
		}
	}
	if keep == len(s.natPrior) {
		return
	}
	var left map[ctTarget]natPrior
	if keep > 0 {
		left = make(map[ctTarget]natPrior, keep)
		for t, e := range s.natPrior {
			if !done(e) {
				left[t] = e
			}
		}
	}
	s.log.Debug("dropped the walked ended NAT mappings' record", zap.Int("before", len(s.natPrior)), zap.Int("after", keep))
	s.natPrior = left
	s.natPriorPrune = 2 * keep
}

// natPriorDumpMin is natPrior's size below which pruneNATPrior does not
// dump conntrack (a variable for tests).
var natPriorDumpMin = 1024

// pruneNATPrior bounds natPrior where no walk does (KeepConnections; an
// IPv4 PEER's entry, seq 0; the start's seed): an entry is needed only
// while a NAT-ed flow whose external endpoint is its endpoint may live,
// and that flow is one conntrack lists. Once natPrior reached
// natPriorDumpAt (at least natPriorDumpMin; after a dump, its size plus
// the entries the dump found alive), one listing of the NAT-ed flows' external endpoints (two
// status-filtered dumps, NATLister), outside the lock; then, under it,
// the entries of endpoints no flow had go, if recorded before the
// previous call (natPriorTick): an entry recorded since, or a flow
// confirmed by a packet in flight when the mapping's element went, may
// not be in the dump. Housekeeping calls it every storeDebtRetry, so the
// map holds about twice the endpoints with flows plus what was recorded
// in two periods. A failed dump drops nothing (next at twice the size).
func (s *Server) pruneNATPrior() {
	s.mu.Lock()
	lister := s.natLister
	cut := s.natPriorTick
	s.natPriorTick = s.natPriorGen
	if lister == nil || len(s.natPrior) < max(s.natPriorDumpAt, natPriorDumpMin) {
		s.mu.Unlock()
		return
	}
	seen := make(map[ctTarget]bool, len(s.natPrior))
	for t, e := range s.natPrior {
		if e.gen <= cut {
			seen[t] = false
		}
	}
	s.mu.Unlock()
	err := lister.NATEndpoints(func(proto uint8, ext netip.AddrPort) {
		t := ctTarget{addr: ext.Addr(), proto: proto, port: ext.Port()}
		if _, ok := seen[t]; ok {
			seen[t] = true
		}
	})
	s.mu.Lock()
	defer s.mu.Unlock()
	before := len(s.natPrior)
	if err != nil {
		s.log.Warn("cannot read conntrack to prune the ended NAT mappings' record", zap.Error(err))
		s.natPriorDumpAt = 2 * before
		return
	}
	judged := 0 // kept for a flow
	maps.DeleteFunc(s.natPrior, func(t ctTarget, e natPrior) bool {
		if live, ok := seen[t]; ok && e.gen <= cut {
			judged++
			if live {
				return false
			}
			judged--
			return true
		}
		return false
	})
	// Again once the map grew by what the dump found alive: the entries
	// too recent to judge are judged at the next call if nothing else
	// came (a burst), else at the next doubling.
	s.natPriorDumpAt = len(s.natPrior) + judged
	s.log.Debug("pruned the ended NAT mappings' record", zap.Int("before", before), zap.Int("after", len(s.natPrior)))
}

// noteNATEnded records the endpoints of the NAT mappings in ended
// (flushConntrack; seq: the flush queued for them, 0 for none). Under s.mu.
func (s *Server) noteNATEnded(ended []store.Lease, seq uint64) {
	if s.cutter == nil {
		return
	}
	for i := range ended {
		if t, to, ok := dnatOfLease(&ended[i]); ok {
			q := seq
			if ended[i].Kind == store.KindPeer && t.addr.Is4() {
				// Its client's own flow SNAT-ed to t outlives the
				// flush (appendCtFilters: no SNAT filter for a
				// PEER): only a retarget walk ends it.
				q = 0
			}
			s.notePrior(t, to, q)
		}
	}
}

// appendSNATCuts appends, for an IPv4 endpoint t that an install retakes,
// the SNAT filters of the outbound flows the old targets opened from
// their mapped port (reply destination t): prior's, and those of the NAT
// mappings ended (in the batch) there with another target than now. Such
// a flow outlives its mapping's end (a PEER's, its client's own; all with
// KeepConnections; any until the flush's walk), and once t is another
// internal endpoint's, conntrack still sends t's packets from that remote
// to the old target (review h/revnatleft; TestE2ERetakeEndsOldSNATFlow).
// A live lease's SNAT-ed flows are spared (ctAdmits.snatted).
func appendSNATCuts(fs []ctFilter, t ctTarget, prior natPrior, havePrior bool, now netip.AddrPort, ended []store.Lease) []ctFilter {
	if !t.addr.Is4() {
		return fs
	}
	add := func(to netip.AddrPort) {
		if !to.Addr().Is4() || to == now {
			return
		}
		f := ctFilter{v4: true, t: t, nat: true, src4: to.Addr().As4(), sport: to.Port()}
		if !slices.Contains(fs, f) {
			fs = append(fs, f)
		}
	}
	if havePrior {
		add(prior.to)
	}
	for i := range ended {
		if et, eto, ok := dnatOfLease(&ended[i]); ok && et == t {
			add(eto)
		}
	}
	return fs
}

// appendRetargetCuts appends, for an IPv4 or IPv6 endpoint t that an
// install retakes, the filters of the inbound flows its old targets were
// delivered: prior's, and those of the NAT mappings ended (in the batch)
// there; one of every flow to t, wherever delivered, when prior recorded
// several. Not those an admin's own DNAT of t delivered elsewhere
// (ctFilter.delivered; h/revprio: before, a client retaking the endpoint
// of a port the admin forwards deleted the forward's connections). A
// live lease's flows are spared (ctAdmits).
func appendRetargetCuts(fs []ctFilter, t ctTarget, prior natPrior, havePrior bool, ended []store.Lease) []ctFilter {
	add := func(to netip.AddrPort) {
		if f := inboundFilter(t, to); !slices.Contains(fs, f) {
			fs = append(fs, f)
		}
	}
	n := len(fs)
	if havePrior {
		if prior.many {
			return append(fs, ctFilter{v4: t.addr.Is4(), t: t})
		}
		add(prior.to)
	}
	for i := range ended {
		if et, eto, ok := dnatOfLease(&ended[i]); ok && et == t {
			add(eto)
		}
	}
	if len(fs) == n {
		add(netip.AddrPort{}) // none known: every flow to t
	}
	return fs
}

// natRetargets is the external endpoints t's installs retake (and the
// internal endpoint each is retaken for): a NAT
// pinhole whose endpoint's flows may go elsewhere (natPrior, or a NAT
// mapping this batch ends there with another target: again, walked after
// the commit too, since the ended element DNATs until it). Under s.mu.
func (s *Server) natRetargets(t *tx) (ts []ctTarget, tos []netip.AddrPort, again bool) {
	if s.cutter == nil || len(s.natPrior) == 0 && len(t.ended) == 0 {
		return nil, nil, false
	}
	clean := s.ct.cleanSeq()
	for _, op := range t.ops {
		if op.Kind == pinhole.Delete {
			continue
		}
		tg, to, ok := dnatOf(op.Pinhole)
		if !ok || slices.Contains(ts, tg) {
			continue
		}
		prior := false
		if e, ok := s.natPrior[tg]; ok {
			if e.seq != 0 && e.seq <= clean {
				delete(s.natPrior, tg) // its flush's walk ended them
			} else {
				prior = e.many || e.to != to
			}
		}
		here := false
		for i := range t.ended {
			if et, eto, ok := dnatOfLease(&t.ended[i]); ok && et == tg && eto != to {
				here = true
			}
		}
		if (prior || here) && s.cutter.CutsFlows(op.Pinhole) {
			ts, tos = append(ts, tg), append(tos, to)
			again = again || here
		}
	}
	return ts, tos, again
}

// cutRetargeted ends the flows to ts that no live lease admits where the
// kernel delivers them: before the install that retakes them commits
// (and after it, when the batch ended a mapping there). On success the
// endpoints' natPrior goes; on failure it stays (the next install or
// refresh there walks again) and the walk is queued on the flusher too.
// Under s.mu.
func (s *Server) cutRetargeted(ts []ctTarget, tos []netip.AddrPort, ended []store.Lease) {
	fs := make([]ctFilter, 0, len(ts))
	admits := ctAdmits{}
	var buf []store.Lease
	now := s.now()
	for i, t := range ts {
		e, ok := s.natPrior[t]
		fs = appendRetargetCuts(fs, t, e, ok, ended)
		fs = appendSNATCuts(fs, t, e, ok, tos[i], ended)
		var live []pinhole.Pinhole
		live, buf = s.liveAdmits(nil, t, now, buf)
		admits[t] = live
	}
	left, err := s.walkConntrack(slices.Clone(fs), admits)
	if err != nil || len(left) > 0 {
		s.log.Warn("cannot end the flows of a retaken external endpoint; retrying with the next walk", zap.Error(err))
		if !s.cfg.KeepConnections {
			s.ct.add(left) // its walk asks the live leases (spareLive)
		}
		return
	}
	for _, t := range ts {
		delete(s.natPrior, t)
	}
}

// seedNATPrior, at a start with KeepConnections, records the endpoints
// of the DNAT-ed flows conntrack holds (original destination not the
// reply's source): mappings that ended before this start (before a
// restart, or while pcpd was down) left them, and no walk ends them.
// One streamed dump of both families, of the entries the kernel marks
// IPS_DST_NAT (ctnl.Scan: a kernel before 6.1 sends every entry, and the
// check below skips those not DNAT-ed). Before, netlink's
// ConntrackTableList held each family's whole table decoded: at
// 1 000 000 entries 1 GB allocated, 0.5 GB of heap and RSS, 8.8 s; now
// a read's worth at a time (BenchmarkSeedNATPrior; BENCHMARKS.md item 51).
// A dump across a resize of conntrack's hash table (ctnl.ErrResized: it
// may have skipped flows) is made again, at most seedTries in all; one
// that still fails is logged as an error (before h/left10 a warning, and
// the flows skipped went unrecorded: TestSeedNATPriorResizedRetried).
// Only the flows pcpd's own DNAT rules translated: those carrying the
// firewall's label (NATLabeller; a firewall that cannot tell: every
// DNAT-ed flow). Before (review h/revprio, left), an admin's own DNAT-ed
// flows were recorded too (a port forward in another table, at dstnat,
// which binds before pcpd's chain), and a client granted that public
// port later (pcpd cannot see the forward) had the retarget walk end
// the admin's connections (TestE2ESeedSparesAdminDNAT). A firewall whose
// DNAT rules set no label never cuts the DNAT kinds' flows (CutsFlows
// false for good): no retarget walk would ask, nothing is read.
// Under s.mu.
func (s *Server) seedNATPrior() {
	if !s.cfg.KeepConnections || s.cutter == nil {
		return
	}
	label := -1 // every DNAT-ed flow
	if nl, ok := s.cutter.(NATLabeller); ok {
		bit, labels := nl.NATLabel()
		if !labels {
			return
		}
		label = bit
	}
	ns := 0 // the caller's
	if nsSet(s.cfg.NetNS) {
		ns = int(s.cfg.NetNS)
	}
	var err error
	for try := 1; try <= seedTries; try++ {
		_, err = seedScan(ns, unix.AF_UNSPEC, ctnl.IPSDstNAT, ctnl.IPSDstNAT, func(f *ctnl.Flow) bool {
			d := netip.AddrPortFrom(f.Orig.Dst.Unmap(), f.Orig.Dport)
			r := netip.AddrPortFrom(f.Reply.Src.Unmap(), f.Reply.Sport)
			if !f.Reply.HasAddrs() || d == r || d.Port() == 0 || r.Port() == 0 {
				return false // not DNAT-ed, or no ports
			}
			if label >= 0 && !f.Labelled(label) {
				return false // not pcpd's DNAT: an admin's, another pcpd's
			}
			s.notePrior(ctTarget{addr: d.Addr(), proto: f.Orig.Proto, port: d.Port()}, r, 0)
			return false
		})
		if !errors.Is(err, ctnl.ErrResized) {
			break
		}
		// The hash table was resized during the dump, which may have
		// skipped flows (h/left10): dumped again. What it recorded
		// stays (a record only adds walks).
		s.log.Warn("conntrack resized while read for the flows of retaken endpoints; reading again", zap.Int("try", try))
	}
	if err != nil {
		s.log.Error("cannot read conntrack for the flows of retaken endpoints: flows of mappings ended before this start may pass a retaken endpoint's new mapping to their old target", zap.Error(err))
	}
}

// seedTries bounds seedNATPrior's dumps when each ends across a resize
// of conntrack's hash table (ctnl.ErrResized).
const seedTries = 3

// seedScan is seedNATPrior's dump (ctnl.Scan; a variable for tests).
var seedScan = ctnl.Scan

// cutHeldRetargets, after a repair of the layout (checkFirewall), walks
// the recorded endpoints (natPrior) that a live NAT lease holds for
// another target than the one recorded: an install while CutsFlows was
// false (a Healthy had found the layout damaged: noteDamage) skipped
// their walk, and once the layout is written again the lease's element
// lets the old flows through recheck_nat to their old target (review
// h/revnatleft; TestE2ERetakeWhileDamagedCutAfterRepair). Before, only
// that lease's next kernel write walked them. One pass over natPrior, at
// a repair only. Under s.mu.
func (s *Server) cutHeldRetargets() {
	if s.cutter == nil || len(s.natPrior) == 0 {
		return
	}
	clean := s.ct.cleanSeq()
	var ts []ctTarget
	var tos []netip.AddrPort
	var buf []store.Lease
	for t, e := range s.natPrior {
		if e.seq != 0 && e.seq <= clean {
			continue
		}
		ep := endpoint{addr: t.addr, proto: t.proto, port: t.port}
		h, held := s.tab.holder(ep)
		if !held {
			continue
		}
		buf = s.tab.onTupleInto(tuple{proto: ep.proto, addr: h.addr, port: h.port}, buf)
		for i := range buf {
			l := &buf[i]
			if endpointOf(l) != ep {
				continue
			}
			tg, to, ok := dnatOfLease(l)
			p := pinhole.Pinhole{Protocol: l.Protocol, InternalAddr: l.InternalAddr, InternalPort: l.InternalPort,
				ExternalAddr: l.ExternalAddr, ExternalPort: l.ExternalPort}
			if ok && tg == t && (e.many || e.to != to) && s.cutter.CutsFlows(p) {
				ts, tos = append(ts, t), append(tos, to)
				break
			}
		}
	}
	if len(ts) > 0 {
		s.cutRetargeted(ts, tos, nil)
	}
}
