package server

import (
	"math/bits"
	"net/netip"
	"slices"

	"go.uber.org/zap"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/store"
)

// The IPv4 leases that cannot leave a port the host's own DNAT rules
// forward (issue 9, h/fwd4). A MAP or NAT-PMP mapping granted a port
// before the admin forwarded it moves to another port at its renewal,
// the same lease (mapInbound, h/hunt2): its client learns the new port
// from the reply. Two kinds cannot move:
//
//   - a MAP made with PREFER_FAILURE: the server must not give it another
//     port (RFC 6887 §13.2; PF-03, PF-04), and a mapping that loses its
//     external port is answered CANNOT_PROVIDE_EXTERNAL (§14.2, UPD-02);
//   - an IPv4 PEER: its external endpoint is what its remote peer was
//     told (§12); another one serves nothing, and a PEER request whose
//     suggested endpoint cannot be had is CANNOT_PROVIDE_EXTERNAL
//     (§12.3, PEER-04).
//
// Kept, they held the admin's port until they expired (or for as long as
// a PEER was renewed): with the admin's chain hooked after pcpd's
// (dstnat + 2) pcpd's DNAT took the forward's new connections (every one
// for a PREFER_FAILURE MAP, the remote peer's for a PEER), at dstnat the
// mapping was dead. So the read of the rules that finds the forward ends
// them, as LIFE-05 ends a lease whose address is no longer owned: out of
// the kernel and the store in one transaction, logged and counted
// (pcpd_revocations_total{cause="forwarded"}), and the client is sent an
// unsolicited CANNOT_PROVIDE_EXTERNAL for it (UPD-02, updates.go). Their
// renewals, until then and after, are refused CANNOT_PROVIDE_EXTERNAL
// with no change (HDR-06): the PREFER_FAILURE one by mapInbound (the
// suggested port is the host's), the PEER by servePeer.

// endForwarded ends the PREFER_FAILURE MAPs and PEERs on a port of the
// external IPv4 address the last read of the host's DNAT rules forwards,
// when that read changed what they forward (housekeep, after each
// refresh). They are found under s.mu and ended revokeChunk at a time,
// s.mu taken again for each (a forwarded range may hold thousands), each
// lease only if it still holds a forwarded port. A commit that fails is
// retried at the next tick.
func (s *Server) endForwarded() {
	tcp, udp, ok := s.hostPorts.forwardNews()
	if !ok {
		return
	}
	ext := s.cfg.ExternalIPv4
	s.mu.Lock()
	var keys []store.Key
	if !s.serveEnded && s.tab != nil {
		keys = s.tab.cannotMove(ext, &tcp, &udp)
	}
	s.mu.Unlock()
	slices.SortFunc(keys, compareKeys)
	still := func(l *store.Lease) bool {
		set := &tcp
		if l.Protocol != protoTCP {
			set = &udp
		}
		return l.ExternalAddr == ext && set.has(l.ExternalPort) && (l.Kind == store.KindPeer || l.PreferFailure)
	}
	for len(keys) > 0 {
		chunk := keys[:min(len(keys), revokeChunk)]
		keys = keys[len(chunk):]
		s.mu.Lock()
		if s.serveEnded {
			s.mu.Unlock()
			return
		}
		gone, err := s.revokeKeysLocked(chunk, still, false)
		if err == nil {
			s.queueUpdates(gone, pcp.CannotProvideExternal) // UPD-02 (updates.go)
		}
		s.mu.Unlock()
		if err != nil {
			s.hostPorts.forwardAgain()
			s.log.Error("cannot end the mappings on ports the host's DNAT rules forward now; retrying", zap.Error(err))
			return
		}
		s.logForwardedEnds(gone)
	}
}

// logForwardedEnds logs and counts leases ended because the host's own
// DNAT rules forward their external port.
func (s *Server) logForwardedEnds(gone []store.Lease) {
	for i := range gone {
		l := &gone[i]
		s.m.revocations.WithLabelValues("forwarded").Inc()
		why := "a PEER keeps its external port"
		if l.Kind != store.KindPeer {
			why = "PREFER_FAILURE: no other port"
		}
		s.log.Info("revoked: the host's own DNAT rules forward its external port now",
			append(leaseFields(l, l.ClientAddr), zap.String("why", why))...)
	}
}

// cannotMove is the keys of the leases on ext (an IPv4 address) that
// hold a port of tcp or udp (by protocol) and cannot move off it: PEERs
// and PREFER_FAILURE MAPs. It walks the held ports' bitmaps (held4), not
// the forwarded ports, so a forwarded range costs nothing more.
func (t *table) cannotMove(ext netip.Addr, tcp, udp *portSet) []store.Key {
	if !ext.Is4() {
		return nil
	}
	var keys []store.Key
	for _, pp := range []struct {
		proto uint8
		set   *portSet
	}{{protoTCP, tcp}, {protoUDP, udp}} {
		b := t.held4[port4{a: ext.As4(), proto: pp.proto}]
		if b == nil || b.n == 0 {
			continue
		}
		for i := range b.w {
			for w := b.w[i] & pp.set[i]; w != 0; w &= w - 1 {
				port := uint16(i*64 + bits.TrailingZeros64(w))
				h, ok := t.holder(endpoint{addr: ext, proto: pp.proto, port: port})
				if !ok {
					continue
				}
				for _, l := range t.onTuple(tuple{proto: pp.proto, addr: h.addr, port: h.port}) {
					if l.ExternalAddr == ext && l.ExternalPort == port && (l.Kind == store.KindPeer || l.PreferFailure) {
						keys = append(keys, l.Key)
					}
				}
			}
		}
	}
	return keys
}
