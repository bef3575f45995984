package server

import (
	"cmp"
	"net/netip"
	"slices"

	"go.uber.org/zap"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/policy"
	"github.com/pcpd/pcpd/store"
)

// The rules (policy) change only with a restart. A restored lease the new
// rules refuse (its port now in --deny-ports or outside --allow-ports, its
// protocol no longer allowed, an all-ports lease with --allow-all-ports
// off or no longer whole, its address now never openable, e.g. one of the
// host's own, a THIRD_PARTY lease with --third-party off, its opcode
// disabled by --disable-map, --disable-peer or --disable-natpmp) would
// have its renewal refused (or, for NAT-PMP, not answered), but kept its
// pinhole until it expired: up to the max lifetime of what the operator
// had just closed. Start revokes them instead
// (TestRestartDropsLeasesPolicyRefuses, TestRestartDropsLeasesOfDisabledOpcode),
// as the ownership sweep revokes leases no longer owned (LIFE-05). A
// lease whose external
// IPv4 port the server's configuration now reserves (configForbids) is
// revoked in the same pass, although before this its renewals were
// granted and kept the port.
//
// A refused lease goes as one whose external IPv4 changed does
// (restoring.add): it never enters the table, its pinholes are deleted
// with the others' in kernel batches (reconcile), its key leaves the store
// with the expired ones (commitDrops: a commit per 65 536 keys, the
// quarantines in the first). Installing them all and revoking
// them in one tx afterwards took 24-33 s and a 3.5-3.7 GB peak heap at
// 1 000 000 refused, and the spare tx kept 1.5 GB (review h/revpol). A
// deletion the kernel refuses is retried at every firewall check and audit
// until it is done (retryUndeleted, any number of leases:
// TestRestartRevokeRetriedAfterFailure, TestRestoreRefusedRetryAboveAuditMax),
// and the lease's connections are flushed only then
// (TestRestoreRefusedFlushAfterDelete). Beyond maxUndeleted failed
// pinholes, the rest are left to the first audit (above auditMaxLeases
// leases, to their kernel timeouts) and their connections flushed at once.

//
// Ownership too (owned): a lease whose address the ownership (WireGuard
// peers as read at start, the static clients) does not give its owner
// now is revoked here, as the ownership sweep revokes it (its log line,
// pcpd_revocations_total{cause="ownership"}, the UPD-03 update queued,
// sent once serving), not installed first. Before (h/hunt6, issue 9), a
// device swapped while pcpd was down (old peer removed, its AllowedIPs
// given to a new one) and the table gone (a reboot): the start put the
// old peer's pinholes and DNATs into the new owner's address back into
// the kernel, and only the sweep, once serving, deleted them, 13-49 ms
// later (TestRestartUnownedWindow). The ownership is the sweep's
// (Policy.Ownership's Lookup): a gone interface's peers held for
// --wireguard-gone-grace still own their AllowedIPs, and keep their
// leases, as at the sweep. A failed WireGuard read at start fails
// NewWireGuard and pcpd's start (nothing restored); one failing later
// keeps the last good peers, which both this and the sweep go by.

// whyUnowned is refuse's reason for a lease its owner no longer owns.
const whyUnowned = "unowned"

// owned reports whether the ownership gives l's address to l's owner, as
// the sweep asks (table.unowned): one Lookup per run of leases on one
// address.
func (r *restoring) owned(l *store.Lease) bool {
	if !r.last.IsValid() || r.last != l.InternalAddr {
		r.last = l.InternalAddr
		r.lastOwn, r.lastOK = r.own.Lookup(l.InternalAddr)
	}
	return r.lastOK && string(r.lastOwn.ID) == l.Owner
}

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

// restoreRefusal is why the server would not keep the restored lease l
// now ("" if it would): its opcode disabled (MAP-23, PEER-08, VER-02),
// the rules refusing it (refusedNow), or its external IPv4 port reserved
// (configForbids).
func (s *Server) restoreRefusal(l *store.Lease) string {
	switch {
	case l.Kind == store.KindMap && s.cfg.DisableMap:
		return "map-disabled"
	case l.Kind == store.KindPeer && s.cfg.DisablePeer:
		return "peer-disabled"
	case l.Kind == store.KindNATPMP && s.cfg.DisableNATPMP:
		return "natpmp-disabled"
	}
	if why := s.refusedNow(l); why != policy.Allowed {
		return why.String()
	}
	if s.configForbids(l) {
		return "external-port-reserved" // --reserved-ports, --ipv4-port-range
	}
	return ""
}

// configForbids reports whether a stored lease holds an external IPv4 port
// the configuration now forbids (Config.ReservedPorts, outside
// Config.IPv4Ports, pcpd's own 5350/5351): an operator reserves a port a
// client holds and restarts pcpd. Start revokes such leases with those the
// rules refuse (restoreRefusal: pinholes, store, connections), and the
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

// maxRefusedLogs bounds the per-lease log lines of refused leases (an
// operator denying a port many clients use); the count is always logged.
const maxRefusedLogs = 100

// refusedLog is a refused lease to log, and why.
type refusedLog struct {
	l      store.Lease
	reason string
}

// freedPort is the MAP-22 quarantine of a refused (or unrestorable)
// lease's IPv4 external port, set once the table is whole (a restored
// lease may hold it).
type freedPort struct {
	e endpoint
	q quarantine
}

// refuse takes out the stored lease l, which the rules refuse now (why),
// or whose address its owner no longer owns (whyUnowned): out of the
// store and the kernel as a moved lease (finish), its connections
// flushed and its IPv4 port quarantined (MAP-22) as a revocation's
// (tx.set), counted and logged by revoked. An unowned one's client is
// told as the sweep tells it (UPD-03, queueUpdates: sent once serving).
func (r *restoring) refuse(l *store.Lease, why string) {
	r.drop.add(l.Key)
	r.gone = appendPinholes(r.gone, l)
	logged := len(r.logs) - r.ulogs
	if why == whyUnowned {
		r.unowned++
		logged = r.ulogs
		one := [1]store.Lease{*l}
		r.s.queueUpdates(one[:], pcp.NotAuthorized)
	} else {
		r.refused++
	}
	if logged < maxRefusedLogs {
		g := refusedLog{*l, why}
		g.l.Filters = slices.Clone(l.Filters) // l may be reused
		r.logs = append(r.logs, g)
		if why == whyUnowned {
			r.ulogs++
		}
	}
	if !r.s.cfg.KeepConnections {
		r.ends = appendCtFilters(r.ends, l)
	}
	r.noteNATEnd(l)
	if l.ExternalAddr.Is4() && !r.s.configForbids(l) { // a reserved port is never handed out
		e, q := quarantineOf(l, r.now)
		r.freed = append(r.freed, freedPort{e, q})
	}
}

// quarantineRefused quarantines the IPv4 ports of the refused leases once
// the table is whole, listing what it changed in r.qtouched (the store
// gets it with the refused leases' drop: restoring.finish).
func (r *restoring) quarantineRefused() {
	s := r.s
	for _, f := range r.freed {
		if _, held := s.tab.holder(f.e); !held {
			s.quarPut(f.e, f.q)
			r.qtouched = append(r.qtouched, f.e)
			s.quarCap(f.q.owner, r.now, func(e endpoint) {
				s.quarDel(e)
				r.qtouched = append(r.qtouched, e)
			})
		}
	}
	r.freed = nil
}

// quarChange is the store's part of r.qtouched: each endpoint's current
// quarantine or its end; nil when restore changed none.
func (r *restoring) quarChange() *store.QuarChange {
	if len(r.qtouched) == 0 {
		return nil
	}
	qc := &store.QuarChange{}
	seen := make(map[endpoint]struct{}, len(r.qtouched))
	for _, e := range r.qtouched {
		if _, dup := seen[e]; !dup {
			seen[e] = struct{}{}
			r.s.appendQuarState(qc, e)
		}
	}
	return qc
}

// revoked finishes the refused leases once reconcile has deleted their
// pinholes: their connections flushed (those whose pinhole deletion
// failed once retryUndeleted deletes it), the count in
// pcpd_revocations_total{cause="policy"} (the unowned ones':
// cause="ownership"), and the log (the unowned ones' line the sweep's,
// logUnowned's). Their IPv4 ports were quarantined before
// (quarantineRefused).
func (r *restoring) revoked() {
	if r.refused == 0 && r.unowned == 0 {
		return
	}
	s := r.s
	if ends := s.pendingEnds(r.ends); len(ends) > 0 {
		// Those of leases whose pinhole deletion failed wait for
		// retryUndeleted (TestRestoreRefusedFlushAfterDelete).
		s.ct.add(ends)
	}
	r.ends = nil
	if r.refused > 0 {
		s.m.revocations.WithLabelValues("policy").Add(float64(r.refused))
	}
	if r.unowned > 0 {
		s.m.revocations.WithLabelValues("ownership").Add(float64(r.unowned))
	}
	for _, g := range r.logs {
		l := &g.l
		if g.reason == whyUnowned {
			s.logRevokedUnowned(l)
			continue
		}
		s.log.Info("revoked at start: the rules refuse this lease now",
			zap.String("peer", l.Owner), zap.Stringer("address", l.InternalAddr),
			zap.Uint16("port", l.InternalPort), zap.String("protocol", protoName(l.Protocol)),
			zap.Stringer("external", netip.AddrPortFrom(l.ExternalAddr, l.ExternalPort)),
			zap.String("reason", g.reason))
	}
	r.logs = nil
	if r.refused > 0 {
		s.log.Warn("restored leases the rules refuse now were revoked", zap.Int("count", r.refused))
	}
	if r.unowned > 0 {
		s.log.Warn("restored leases whose addresses their clients no longer own were revoked", zap.Int("count", r.unowned))
	}
}

// comparePinholes orders pinholes by internal tuple first (reconcile reads
// each tuple's leases once), then by the rest.
func comparePinholes(a, b pinhole.Pinhole) int {
	return cmp.Or(
		cmp.Compare(a.Protocol, b.Protocol),
		a.InternalAddr.Compare(b.InternalAddr),
		cmp.Compare(a.InternalPort, b.InternalPort),
		a.ExternalAddr.Compare(b.ExternalAddr),
		cmp.Compare(a.ExternalPort, b.ExternalPort),
		a.RemotePrefix.Addr().Compare(b.RemotePrefix.Addr()),
		cmp.Compare(a.RemotePrefix.Bits(), b.RemotePrefix.Bits()),
		cmp.Compare(a.RemotePort, b.RemotePort),
	)
}
