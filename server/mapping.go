package server

import (
	"fmt"
	"net/netip"
	"slices"
	"time"
	"unicode/utf8"

	"go.uber.org/zap"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/policy"
	"github.com/pcpd/pcpd/store"
)

// TIME_WAIT added to a conflicting mapping's remaining lifetime in a
// CANNOT_PROVIDE_EXTERNAL reply (PF-05, RFC 6887 §13.2).
const timeWait = 240 * time.Second

// ask is a request for an inbound mapping, whatever protocol carried it
// (PCP MAP or PEER, NAT-PMP).
type ask struct {
	kind     store.Kind
	key      store.Key
	nonce    [12]byte
	suggAddr netip.Addr // unmapped; invalid or unspecified: no suggestion
	suggPort uint16
	pf       bool
	grant    time.Duration // clamped lifetime
	filters  []pcp.Filter
	hasDesc  bool
	desc     []byte
	tp       bool
}

// authorize runs the policy for a request to open addr and maps the
// outcome. For deletes only ownership matters: a delete of what the port
// and protocol rules now refuse answers SUCCESS (MAP-18), not an error;
// so does one while the host's addresses are unread (HostUnread: a
// delete opens nothing).
// Rules change only with a restart, and Start revokes the restored leases
// they refuse (restore_policy.go: an operator adding a port to
// --deny-ports expects it closed, not open until the lease expires), so
// such a delete finds nothing left to delete.
func (s *Server) authorize(c *call, addr netip.Addr, tp bool, proto uint8, port uint16, deleting bool) (policy.Owner, error) {
	owner, reason := s.pol.Authorize(policy.Request{
		Source: c.src.Addr(), Iface: c.iface, Target: addr, ThirdParty: tp, Delete: deleting, Protocol: proto, InternalPort: port,
	})
	if deleting {
		switch reason {
		case policy.ProtocolDenied, policy.PortDenied, policy.AllPortsDenied, policy.AllProtocolsDenied, policy.HostUnread:
			reason = policy.Allowed
		}
	}
	if reason != policy.Allowed {
		return owner, &policyError{reason}
	}
	return owner, nil
}

// requestInternal is the internal address a MAP or PEER request from src
// is for: its THIRD_PARTY address, unmapped, when it has one (tp; TP-04),
// else the request's source address.
func requestInternal(src netip.AddrPort, req *pcp.Request) (internal netip.Addr, tp bool) {
	if a := req.Options.ThirdParty; a.IsValid() {
		return a.Unmap(), true
	}
	return src.Addr(), false
}

// serveMap is MAP (RFC 6887 §11, §15), steps in MAP-01's order.
func (s *Server) serveMap(c *call, req *pcp.Request, resp *pcp.Response, o *outcome) (pcp.ResultCode, error) {
	if s.cfg.DisableMap {
		return fail(errDisabled) // MAP-23
	}
	internal, tp := requestInternal(c.src, req)
	m := &req.Map
	proto := uint8(m.Protocol)
	deleting := req.Lifetime == 0
	owner, err := s.authorize(c, internal, tp, proto, m.InternalPort, deleting)
	if err != nil {
		return fail(err)
	}
	if proto != protoTCP && proto != protoUDP && proto != 0 {
		// MAP-04, before the delete step (MAP-01): an SCTP delete is as
		// unsupported as an SCTP map. (Policy may allow more protocols;
		// the engine maps only these.)
		return fail(errUnsuppProtocol)
	}
	if !deleting && (proto == 0 || m.InternalPort == 0) && !(proto == protoTCP && internal.Is6()) {
		// MAP-05, MAP-10: UDP and all-traffic wildcards include UDP
		// 5350/5351, which are never mapped, so they cannot be granted
		// whole; nor can all ports of a NAPT address. A TCP all-ports
		// wildcard on an IPv6 address is granted where the policy allows
		// all ports (it refused above otherwise).
		return fail(errUnsuppProtocol)
	}
	if internal.Is4() && !s.cfg.ExternalIPv4.IsValid() && !deleting {
		return fail(errNoExternalIPv4) // MAP-12
	}
	if err := req.CheckOptions(); err != nil {
		return fail(err)
	}
	key := store.Key{Owner: string(owner.ID), Protocol: proto, InternalAddr: internal, InternalPort: m.InternalPort}
	s.updateAnswered(key) // it gets its answer now (updates.go)
	sugg := m.ExternalAddr.Unmap()
	// MAP-13: the suggested address's family picks the mapping; pcpd maps
	// each family to itself only.
	familyMet := !sugg.IsValid() || sugg.Is4() == internal.Is4()
	resp.Map = req.Map
	resp.Peer = req.Peer

	if deleting {
		// MAP-16..MAP-20. The reply copies the request's opcode data
		// (MAP-17), whether or not anything was deleted (MAP-18).
		resp.Lifetime = 0
		if !familyMet {
			return pcp.Success, nil
		}
		l, ok := s.tab.get(key)
		if !ok {
			for _, other := range s.tab.onTuple(tupleOf(key)) {
				if other.Owner == key.Owner && other.Kind == store.KindPeer {
					return fail(errPeerOnly) // MAP-20
				}
			}
			return pcp.Success, nil
		}
		if s.cfg.StrictNonce && l.Kind == store.KindMap && l.Nonce != m.Nonce {
			resp.Lifetime = remaining(l, c.now)
			return fail(errNonce) // MAP-19
		}
		o.log = logRec{msg: msgDeleted, lease: *l, from: c.src}
		c.t.set(key, nil, true)
		return pcp.Success, nil
	}

	a := ask{
		kind: store.KindMap, key: key, nonce: m.Nonce,
		suggAddr: sugg, suggPort: m.ExternalPort, pf: req.Options.PreferFailure,
		grant:   s.pol.ClampLifetime(req.Lifetime),
		filters: req.Options.Filters, hasDesc: req.Options.HasDescription, desc: req.Options.Description, tp: tp,
	}
	if !familyMet {
		if a.pf {
			return fail(fmt.Errorf("server: suggested family differs from the internal address's: %w", errCannotProvide))
		}
		a.suggAddr, a.suggPort = netip.Addr{}, 0
	}
	code, err := s.mapInbound(c, &a, resp, o)
	if code != pcp.Success {
		return code, err
	}
	l := &o.log.lease
	resp.Lifetime = a.grant
	resp.Map.ExternalPort = l.ExternalPort
	resp.Map.ExternalAddr = l.ExternalAddr
	resp.Options = req.Options
	if a.hasDesc {
		resp.Options.Description = []byte(l.Description)
	}
	return pcp.Success, nil
}

// mapInbound creates, renews or replaces the MAP or NAT-PMP lease a.key.
// It stages the change in c.t and leaves the new lease in o.log (the
// "mapped" or "renewed" line), or refuses with nothing staged.
func (s *Server) mapInbound(c *call, a *ask, resp *pcp.Response, o *outcome) (pcp.ResultCode, error) {
	now := c.now
	ex := &c.ex
	found := s.tab.getInto(a.key, ex)
	nonced := a.kind == store.KindMap && found && ex.Kind == store.KindMap
	if s.cfg.StrictNonce && a.kind == store.KindNATPMP && found && pmpCannotTouch(*ex) {
		code, err := fail(errPMPNoNonce) // NAT-PMP renewing a MAP (pmp.go)
		return code, err
	}
	if nonced && ex.Nonce != a.nonce && s.cfg.StrictNonce {
		resp.Lifetime = remaining(ex, now)
		code, err := fail(errNonce) // MAP-14
		return code, err
	}
	// Choice (c): the owner's new nonce replaces the mapping (a rebooted
	// client); the same nonce, or NAT-PMP, renews it.
	renew := found && !(nonced && ex.Nonce != a.nonce)
	// A renewal keeps its external endpoint without asking usable: ports
	// the configuration forbids are never in the table (restore drops
	// them, configForbids), and the host's socket scan counts ephemeral
	// UDP sockets, so re-checking it here would move mappings at random.
	// But an IPv4 port the host's own DNAT rules forward now (the admin
	// added a port forward after the mapping) is the admin's: the
	// mapping moves, as a replacement would (h/hunt2). Kept, the admin's
	// forward at dstnat took every connection of a mapping renewed with
	// SUCCESS, or one hooked after pcpd's never got any while the client
	// renewed (TestNAPTAdminForwardAddedAfterMapping).
	// It stays the same mapping otherwise: its FILTERs and description
	// are kept (a new lease would drop a FILTER the renewal does not
	// repeat, opening the new port to every remote).
	moved := renew && ex.ExternalAddr.Is4() && s.hostPorts.forwarded(ex.Protocol, ex.ExternalPort)
	if moved {
		renew = false
	}
	var next store.Lease
	if renew {
		if a.pf && (a.suggPort != ex.ExternalPort || (specified(a.suggAddr) && a.suggAddr != ex.ExternalAddr)) {
			resp.Lifetime = remaining(ex, now) + timeWait // PF-03, PF-05
			code, err := fail(errCannotProvide)
			return code, err
		}
		next = *ex
		next.Filters = slices.Clone(ex.Filters)
	} else {
		ext, lt, err := s.external(c, a)
		if err != nil {
			if lt > 0 {
				resp.Lifetime = lt
			}
			code, err := fail(err)
			return code, err
		}
		if !found {
			if r := s.pol.CheckQuota(s.tab.byOwner[a.key.Owner], s.tab.len()); r != policy.Allowed {
				code, err := fail(&policyError{r}) // MAP-15
				return code, err
			}
		}
		if moved {
			next = *ex
			next.Filters = slices.Clone(ex.Filters)
			next.ExternalAddr, next.ExternalPort = ext.Addr(), ext.Port()
		} else {
			next = store.Lease{Key: a.key, Created: now, ExternalAddr: ext.Addr(), ExternalPort: ext.Port()}
		}
	}
	next.Filters = applyFilters(next.Filters, a.filters)
	if len(next.Filters) > s.cfg.MaxFilters {
		code, err := fail(errTooManyFilters) // FLT-06
		return code, err
	}
	next.Kind = a.kind
	next.Nonce = a.nonce
	next.Expires = now.Add(a.grant) // LIFE-03: a renewal may shorten
	next.ClientAddr = c.src
	next.ServerAddr = c.local
	next.ThirdParty = a.tp
	next.PreferFailure = a.pf
	if a.hasDesc {
		next.Description = truncateUTF8(a.desc, s.cfg.DescriptionCap) // OPT-09
	}
	var prev *store.Lease
	if found {
		prev = ex
	}
	if s.overlapsHeld(now, prev, &next) {
		code, err := fail(errKernelOverlap)
		return code, err
	}
	msg := msgMapped
	if renew {
		msg = msgRenewed
	}
	o.log = logRec{msg: msg, lease: next, from: c.src, grant: a.grant}
	if found && s.absorb(c.t, ex, &o.log.lease, a.grant) {
		return pcp.Success, nil // an early renewal or bare replacement: no commit needed (absorb.go)
	}
	if !renew {
		s.endForwardedPeers(c, o, &next) // external chose the endpoint: it may have passed a forwarded one over
	}
	c.t.set(a.key, &o.log.lease, true)
	return pcp.Success, nil
}

// endForwardedPeers stages the end of the PEERs on next's tuple that hold
// an IPv4 endpoint other than next's which the host's own DNAT rules
// forward (external gave next another): one tuple, one external
// endpoint, and a PEER cannot move (forwardend.go). Each is logged after
// the commit. Only on a path that answers SUCCESS (HDR-06).
func (s *Server) endForwardedPeers(c *call, o *outcome, next *store.Lease) {
	if !next.ExternalAddr.Is4() {
		return
	}
	var gone []store.Lease
	for _, other := range s.tab.onTuple(tupleOf(next.Key)) {
		if other.Kind != store.KindPeer || !other.ExternalAddr.Is4() ||
			(other.ExternalAddr == next.ExternalAddr && other.ExternalPort == next.ExternalPort) ||
			!s.hostPorts.forwardedSure(other.Protocol, other.ExternalPort) {
			continue
		}
		c.t.set(other.Key, nil, true)
		gone = append(gone, *other)
	}
	if len(gone) > 0 {
		o.after = func() {
			s.logForwardedEnds(gone)
			s.queueUpdates(gone, pcp.CannotProvideExternal) // UPD-02 (updates.go)
		}
	}
}

// applyFilters adds the request's FILTERs to a mapping's in order
// (FLT-03, FLT-04): a prefix-length-0 filter clears all before it.
func applyFilters(have []store.Filter, req []pcp.Filter) []store.Filter {
	for _, f := range req {
		if f.Clear() {
			have = have[:0]
			continue
		}
		sf := store.Filter{Prefix: f.Remote.Masked(), Port: f.RemotePort}
		if !slices.Contains(have, sf) {
			have = append(have, sf)
		}
	}
	if len(have) == 0 {
		return nil
	}
	return have
}

// filterCovered reports whether filter i of fs admits no remote that
// another filter of fs does not: one whose prefix contains i's and whose
// port is i's or any (0); of equal filters the first one stays. Such
// filters stay in the lease (FLT-04: filters may overlap, the reply echoes
// them, the operator lists them), but get no kernel element of their own:
// the kernel's concatenated-range sets refuse an element that starts
// inside another (2001:db8:5:1::/64 inside 2001:db8:5::/48), which would
// fail a legitimate request with NO_RESOURCES.
func filterCovered(fs []store.Filter, i int) bool {
	f := fs[i].Prefix.Masked()
	for j := range fs {
		g := fs[j].Prefix.Masked()
		switch {
		case j == i,
			g.Bits() > f.Bits() || !g.Contains(f.Addr()),
			fs[j].Port != 0 && fs[j].Port != fs[i].Port,
			j > i && g == f && fs[j].Port == fs[i].Port: // equal: the first stays
			continue
		}
		return true
	}
	return false
}

// external chooses the external endpoint for a new mapping of a.key. On
// refusal it may return a lifetime for the error (PF-05).
func (s *Server) external(c *call, a *ask) (netip.AddrPort, time.Duration, error) {
	k := a.key
	tp := tupleOf(k)
	// A catch-all DNAT of the host's before pcpd's chain takes every new
	// connection to the external IPv4 address: a new inbound mapping
	// there would receive nothing (hostPorts.takenWhole). A PEER's flow
	// is the client's own, outbound: the DNAT does not see it.
	if k.InternalAddr.Is4() && a.kind != store.KindPeer && s.hostPorts.takenWhole(k.Protocol) {
		return netip.AddrPort{}, 0, errDNATCatchAll
	}
	// One tuple, one external endpoint: a MAP next to a PEER (MAP-08), or
	// a PEER next to a MAP (PEER-05: the suggestion is ignored and the
	// mapping's current external returned, RFC 6887 §12.3), takes over
	// the endpoint already in use. On IPv6 that is the internal endpoint
	// unless a MAP redirects a port; then the PEER reports, and its
	// pinhole admits the remote on, the MAP's external port.
	for _, other := range s.tab.onTuple(tp) {
		if other.Key == k || other.ExternalAddr.Is4() != k.InternalAddr.Is4() {
			continue
		}
		if other.ExternalAddr.Is4() && s.hostPorts.forwardedSure(other.Protocol, other.ExternalPort) {
			// The host's own DNAT rules forward that endpoint now: it is
			// the admin's, not the tuple's to share. A PEER cannot have
			// another (PEER-04); a MAP gets one of its own, and the
			// tuple's PEERs on the old one end with it (mapInbound).
			// Before, a MAP renewed next to such a PEER kept the
			// forwarded port (h/fwd4).
			if a.kind == store.KindPeer {
				return netip.AddrPort{}, 0, errCannotProvide
			}
			continue
		}
		ext := netip.AddrPortFrom(other.ExternalAddr, other.ExternalPort)
		if a.pf && (a.suggPort != ext.Port() || (specified(a.suggAddr) && a.suggAddr != ext.Addr())) {
			return netip.AddrPort{}, remaining(other, c.now) + timeWait, errCannotProvide
		}
		return ext, 0, nil
	}
	if k.InternalPort == 0 {
		// An all-ports wildcard (IPv6 TCP only): the whole address, no
		// external port to choose.
		e := endpoint{addr: k.InternalAddr, proto: k.Protocol}
		if a.suggPort != 0 && a.pf {
			return netip.AddrPort{}, 0, errCannotProvide
		}
		if h, ok := s.tab.holder(e); ok && (h.addr != k.InternalAddr || h.port != 0) {
			return netip.AddrPort{}, 0, errCannotProvide
		}
		return netip.AddrPortFrom(k.InternalAddr, 0), 0, nil
	}
	extAddr := k.InternalAddr // choice (d): IPv6 external = internal
	first, last := uint16(1024), uint16(65535)
	if k.InternalAddr.Is4() {
		extAddr = s.cfg.ExternalIPv4
		first, last = s.cfg.IPv4Ports.First, s.cfg.IPv4Ports.Last
		// Fail closed: until a scan of the host's sockets succeeds no
		// port is known free of a host service (hostPorts.ready).
		if !s.hostPorts.ready(k.Protocol) {
			return netip.AddrPort{}, 0, errHostPortsUnread
		}
	}
	suggOK := !specified(a.suggAddr) || a.suggAddr == extAddr
	if a.kind == store.KindPeer && k.InternalAddr.Is6() {
		// PEER-08: an IPv6 PEER's external is its internal endpoint.
		e := endpoint{addr: extAddr, proto: k.Protocol, port: k.InternalPort}
		if (a.suggPort != 0 && a.suggPort != k.InternalPort) || !suggOK || !s.usable(c, a, e) {
			return netip.AddrPort{}, 0, errCannotProvide // PEER-04
		}
		return netip.AddrPortFrom(extAddr, k.InternalPort), 0, nil
	}
	try := func(p uint16) bool {
		return s.usable(c, a, endpoint{addr: extAddr, proto: k.Protocol, port: p})
	}
	if a.suggPort != 0 && suggOK && try(a.suggPort) {
		return netip.AddrPortFrom(extAddr, a.suggPort), 0, nil
	}
	if a.pf || (a.kind == store.KindPeer && (a.suggPort != 0 || !suggOK)) {
		// PF-04, PEER-04: the suggestion had to be met.
		lt := time.Duration(0)
		if h, ok := s.tab.holder(endpoint{addr: extAddr, proto: k.Protocol, port: a.suggPort}); ok {
			for _, l := range s.tab.onTuple(tuple{proto: k.Protocol, addr: h.addr, port: h.port}) {
				lt = max(lt, remaining(l, c.now)+timeWait) // PF-05
			}
		}
		return netip.AddrPort{}, lt, errCannotProvide
	}
	// MAP-09, MAP-11, MAP-12: the internal port, else the lowest free.
	if try(k.InternalPort) {
		return netip.AddrPortFrom(extAddr, k.InternalPort), 0, nil
	}
	if p, ok := s.lowestFree(c.now, k, extAddr, first, last, try); ok {
		return netip.AddrPortFrom(extAddr, p), 0, nil
	}
	return netip.AddrPort{}, 0, errNoPorts
}

// lowestFree is the lowest port of first..last on extAddr that try
// accepts for k at now. On IPv4 it tries only the ports the pool's index
// leaves (freePorts4): walking the pool's every port cost 7 ms a request
// with it full, 17-31 ms with it quarantined (pool4.go).
func (s *Server) lowestFree(now time.Time, k store.Key, extAddr netip.Addr, first, last uint16, try func(uint16) bool) (uint16, bool) {
	if extAddr.Is4() {
		// The host's ports, one snapshot for the search: a forwarded range
		// (an admin's DNAT of 1024-60000) cost each allocation past it a
		// reserved call a port (lock, clock), 5.6 ms for 59 000 ports
		// under the engine lock (review h/revadmin,
		// BenchmarkMapPastForwardedRange). try still checks each port.
		res := s.hostPorts.snapshot(k.Protocol)
		for p := range s.freePorts4(now, extAddr, k.Protocol, k.InternalAddr, first, last) {
			if res != nil && res.has(p) {
				continue
			}
			if try(p) {
				return p, true
			}
		}
		return 0, false
	}
	for p := int(first); p <= int(last); p++ {
		if try(uint16(p)) {
			return uint16(p), true
		}
	}
	return 0, false
}

// usable reports whether e may become the external endpoint of a.key.
func (s *Server) usable(c *call, a *ask, e endpoint) bool {
	k := a.key
	switch {
	case e.port == 0:
		return false
	case e.proto == protoUDP && (e.port == pcp.ClientPort || e.port == pcp.Port):
		return false // MAP-10, on every external address
	case !s.pol.PortAllowed(e.port):
		return false
	}
	if h, ok := s.tab.holder(e); ok && (h.addr != k.InternalAddr || h.port != k.InternalPort) {
		return false
	}
	if !e.addr.Is4() {
		return true
	}
	if !s.cfg.IPv4Ports.contains(e.port) || s.hostPorts.reserved(e.proto, e.port) {
		return false // the host's own ports stay the host's
	}
	// PMP-06: the other protocol's same port is kept for its client.
	other := uint8(protoTCP)
	if e.proto == protoTCP {
		other = protoUDP
	}
	if h, ok := s.tab.holder(endpoint{addr: e.addr, proto: other, port: e.port}); ok && h.addr != k.InternalAddr {
		return false
	}
	// MAP-22: a freed port waits out its idle time for its last holder.
	if q, ok := s.quar[e]; ok {
		if !c.now.Before(q.until) {
			c.t.quarDrop(e) // written with the request's commit
		} else if q.addr != k.InternalAddr || q.port != k.InternalPort || (q.nonce != a.nonce && a.kind != store.KindNATPMP) {
			return false
		}
	}
	return true
}

// servePeer is PEER (RFC 6887 §12).
func (s *Server) servePeer(c *call, req *pcp.Request, resp *pcp.Response, o *outcome) (pcp.ResultCode, error) {
	if s.cfg.DisablePeer {
		return fail(errDisabled) // PEER-08
	}
	internal, tp := requestInternal(c.src, req)
	m := &req.Map
	proto := uint8(m.Protocol)
	owner, err := s.authorize(c, internal, tp, proto, m.InternalPort, false)
	if err != nil {
		return fail(err)
	}
	if proto != protoTCP && proto != protoUDP {
		return fail(errUnsuppProtocol)
	}
	if internal.Is4() && !s.cfg.ExternalIPv4.IsValid() {
		return fail(errNoExternalIPv4)
	}
	if err := req.CheckOptions(); err != nil {
		return fail(err)
	}
	remote := netip.AddrPortFrom(req.Peer.RemoteAddr.Unmap(), req.Peer.RemotePort)
	key := store.Key{Owner: string(owner.ID), Protocol: proto, InternalAddr: internal, InternalPort: m.InternalPort, Remote: remote}
	s.updateAnswered(key) // it gets its answer now (updates.go)
	resp.Map = req.Map
	resp.Peer = req.Peer
	resp.Options = req.Options
	now := c.now
	sugg := m.ExternalAddr.Unmap()
	if specified(sugg) && sugg.Is4() != internal.Is4() {
		sugg = netip.Addr{} // no family translation: an unmet hint
	}
	clamped := s.pol.ClampLifetime(req.Lifetime)
	ex, found := s.tab.get(key)
	if found {
		if s.cfg.StrictNonce && ex.Nonce != m.Nonce {
			resp.Lifetime = remaining(ex, now)
			return fail(errNonce) // PEER-06
		}
		if ex.ExternalAddr.Is4() && s.hostPorts.forwardedSure(ex.Protocol, ex.ExternalPort) {
			// The host's own DNAT rules forward its external port now:
			// a PEER cannot move (its remote peer knows that port), so
			// it is not renewed; endForwarded ends it (forwardend.go).
			// Before, it was renewed there for as long as its client
			// asked (h/fwd4).
			return fail(errCannotProvide) // PEER-04
		}
		// PEER-07: never shortens; lifetime 0 is a query.
		rem := remaining(ex, now)
		grant := max(clamped, rem)
		next := *ex
		next.Nonce = m.Nonce
		next.ClientAddr = c.src
		next.ServerAddr = c.local
		if req.Options.HasDescription {
			next.Description = truncateUTF8(req.Options.Description, s.cfg.DescriptionCap)
		}
		if grant > rem {
			next.Expires = now.Add(grant)
		}
		// While a re-install of every lease is owed the kernel may lack
		// its element: even an unchanged PEER is written (tx.diff
		// refreshes its elements then), so that SUCCESS means it is
		// there (review h/revleft10).
		if (!leaseEqual(&next, ex) || s.reinstallOwed) && !s.absorb(c.t, ex, &next, next.Expires.Sub(now)) {
			c.t.set(key, &next, true)
		}
		resp.Lifetime = next.Expires.Sub(now).Truncate(time.Second)
		resp.Map.ExternalAddr, resp.Map.ExternalPort = ex.ExternalAddr, ex.ExternalPort
		if req.Options.HasDescription {
			resp.Options.Description = []byte(next.Description)
		}
		return pcp.Success, nil
	}
	if clamped == 0 {
		// A query for a mapping that does not exist: nothing to report,
		// nothing created.
		resp.Lifetime = 0
		return pcp.Success, nil
	}
	a := ask{kind: store.KindPeer, key: key, nonce: m.Nonce, suggAddr: sugg, suggPort: m.ExternalPort, grant: clamped, tp: tp}
	ext, _, err := s.external(c, &a)
	if err != nil {
		return fail(err)
	}
	if r := s.pol.CheckQuota(s.tab.byOwner[key.Owner], s.tab.len()); r != policy.Allowed {
		return fail(&policyError{r})
	}
	next := store.Lease{
		Key: key, Kind: store.KindPeer, Nonce: m.Nonce,
		ExternalAddr: ext.Addr(), ExternalPort: ext.Port(),
		ClientAddr: c.src, ServerAddr: c.local, Created: now, Expires: now.Add(clamped), ThirdParty: tp,
	}
	if s.overlapsHeld(now, nil, &next) {
		return fail(errKernelOverlap)
	}
	if req.Options.HasDescription {
		next.Description = truncateUTF8(req.Options.Description, s.cfg.DescriptionCap)
		resp.Options.Description = []byte(next.Description)
	}
	o.log = logRec{msg: msgPeerMapped, lease: next, from: c.src, grant: clamped}
	c.t.set(key, &o.log.lease, true)
	resp.Lifetime = clamped
	resp.Map.ExternalAddr, resp.Map.ExternalPort = ext.Addr(), ext.Port()
	return pcp.Success, nil
}

func leaseEqual(a, b *store.Lease) bool {
	return a.Key == b.Key && a.Kind == b.Kind && a.Nonce == b.Nonce && a.ExternalAddr == b.ExternalAddr &&
		a.ExternalPort == b.ExternalPort && slices.Equal(a.Filters, b.Filters) && a.ClientAddr == b.ClientAddr &&
		a.ServerAddr == b.ServerAddr && a.Created.Equal(b.Created) && a.Expires.Equal(b.Expires) &&
		a.Description == b.Description && a.ThirdParty == b.ThirdParty && a.PreferFailure == b.PreferFailure
}

// remaining is a lease's remaining lifetime in whole seconds, as the wire
// carries it.
func remaining(l *store.Lease, now time.Time) time.Duration {
	d := l.Expires.Sub(now)
	if d < 0 {
		return 0
	}
	return d.Truncate(time.Second)
}

func specified(a netip.Addr) bool { return a.IsValid() && !a.IsUnspecified() }

// truncateUTF8 keeps at most n octets of d, cut at a character boundary.
func truncateUTF8(d []byte, n int) string {
	if len(d) <= n {
		return string(d)
	}
	d = d[:n]
	for len(d) > 0 && !utf8.Valid(d) {
		d = d[:len(d)-1]
	}
	return string(d)
}

func leaseFields(l *store.Lease, client netip.AddrPort) []zap.Field {
	return []zap.Field{
		zap.String("client", l.Owner), zap.String("kind", l.Kind.String()),
		zap.String("protocol", protoName(l.Protocol)),
		zap.Stringer("internal", netip.AddrPortFrom(l.InternalAddr, l.InternalPort)),
		zap.Stringer("external", netip.AddrPortFrom(l.ExternalAddr, l.ExternalPort)),
		zap.Stringer("from", client),
	}
}
