package server

import (
	"net/netip"
	"slices"

	"go.uber.org/zap"

	"github.com/pcpd/pcpd/policy"
	"github.com/pcpd/pcpd/store"
)

// The rules (policy) change only with a restart. A restored lease the new
// rules refuse (its port now in --deny-ports or outside --allow-ports, its
// protocol no longer allowed, an all-ports lease with --allow-all-ports
// off or no longer whole, its address now never openable, e.g. one of the
// host's own, a THIRD_PARTY lease with --third-party off) would have its
// renewal refused, but kept its pinhole until it expired: up to the max
// lifetime of what the operator had just closed. Start revokes them
// instead (TestRestartDropsLeasesPolicyRefuses), as the ownership sweep
// revokes leases no longer owned (LIFE-05); ownership itself (NoOwner,
// and an owner other than the lease's) is left to that sweep, which runs
// when serving starts. A lease whose external IPv4 port the server's
// configuration now reserves (configForbids) is revoked in the same pass,
// although before this its renewals were granted and kept the port.

// refusedNow is what the current rules answer a renewal of l (Allowed if
// they grant it; ownership is sweepOwnership's). Policy.Rules, not
// Authorize: a restored lease has no arrival interface, and Authorize
// finds a WireGuard owner's source nobody's without one (NoOwner), which
// skipped the rules for every WireGuard lease
// (TestRestartDropsLeasesPolicyRefusesBound).
func (s *Server) refusedNow(l *store.Lease) policy.Reason {
	return s.pol.Rules(policy.Request{
		Source: l.InternalAddr, Target: l.InternalAddr, ThirdParty: l.ThirdParty,
		Protocol: l.Protocol, InternalPort: l.InternalPort,
	})
}

// refusedLease is a restored lease the rules refuse, and why.
type refusedLease struct {
	key          store.Key
	reason       policy.Reason // Allowed if only reservedPort refuses it
	reservedPort bool          // its external IPv4 port is one the configuration reserves (configForbids)
}

// configForbids reports whether a stored lease holds an external IPv4 port
// the configuration now forbids (Config.ReservedPorts, outside
// Config.IPv4Ports, pcpd's own 5350/5351): an operator reserves a port a
// client holds and restarts pcpd. Start revokes such leases with those the
// rules refuse (revokeRefused: pinholes, store, connections), and the
// client's next request maps another port (TestReservedPortsAfterRestart).
// The configuration is fixed for a Server's life and new mappings never
// get such a port (usable), so restore is the only place such a lease can
// appear: renewals need not ask.
//
// The host's own sockets (hostPorts.reserved) are not consulted here, nor
// on renewal: the scan counts every bound UDP socket, ephemeral client
// sockets included, so held mappings would move at random. A service that
// starts on a mapped port after the fact has to be reserved in the
// configuration (or the lease revoked).
func (s *Server) configForbids(l *store.Lease) bool {
	return l.ExternalAddr.Is4() && s.hostPorts.configReserved(l.ExternalPort)
}

// maxRefusedLogs bounds the per-lease log lines of revokeRefused (an
// operator denying a port many clients use); the count is always logged.
const maxRefusedLogs = 100

// revokeRefused ends the restored leases the rules refuse, in one
// transaction (kernel, store, their connections), and logs them. The
// caller holds s.mu. On failure the leases stay until they expire or are
// renewed (refused) and the failure is logged.
func (s *Server) revokeRefused(refused []refusedLease) {
	if len(refused) == 0 {
		return
	}
	slices.SortFunc(refused, func(a, b refusedLease) int { return compareKeys(a.key, b.key) })
	t := s.begin(s.now())
	type logged struct {
		l      store.Lease
		reason string
	}
	logs := make([]logged, 0, min(len(refused), maxRefusedLogs))
	n := 0
	for _, r := range refused {
		if l, ok := s.tab.get(r.key); ok {
			if len(logs) < maxRefusedLogs {
				why := r.reason.String()
				if r.reservedPort && r.reason == policy.Allowed {
					why = "external-port-reserved" // --reserved-ports, --ipv4-port-range
				}
				logs = append(logs, logged{*l, why})
			}
			t.set(r.key, nil, true)
			n++
		}
	}
	if err := t.commit(); err != nil {
		t.rollback()
		s.release(t)
		s.log.Error("cannot revoke restored leases the rules refuse; they stay until they expire",
			zap.Int("count", len(refused)), zap.Error(err))
		return
	}
	s.release(t)
	s.m.revocations.WithLabelValues("policy").Add(float64(n))
	for _, g := range logs {
		l := &g.l
		s.log.Info("revoked at start: the rules refuse this lease now",
			zap.String("peer", l.Owner), zap.Stringer("address", l.InternalAddr),
			zap.Uint16("port", l.InternalPort), zap.String("protocol", protoName(l.Protocol)),
			zap.Stringer("external", netip.AddrPortFrom(l.ExternalAddr, l.ExternalPort)),
			zap.String("reason", g.reason))
	}
	s.log.Warn("restored leases the rules refuse now were revoked", zap.Int("count", n))
}
