package server

import (
	"errors"
	"fmt"
	"net/netip"
	"runtime"
	"slices"
	"time"

	"go.uber.org/zap"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/store"
)

// handlePMP serves NAT-PMP v0 (RFC 6886). NAT-PMP and PCP share one lease
// table (PMP-05): a NAT-PMP mapping is a MAP lease without a nonce.
func (s *Server) handlePMP(c *call) outcome {
	o := outcome{proto: "natpmp"}
	var req pcp.PMPRequest
	if err := pcp.ParsePMPRequest(c.data, &req); err != nil {
		var pe *pcp.ParseError
		if errors.As(err, &pe) && !pe.Silent && pe.Result == pcp.UnsuppOpcode {
			o.op, o.res = "other", pcp.PMPUnsupportedOpcode.String()
			o.reply = pcp.AppendPMPUnsupportedOpcode(nil, c.data, c.epoch) // PMP-02
			return o
		}
		return s.drop("malformed", c.src)
	}
	o.op = req.Opcode.String()
	if req.Opcode == pcp.PMPOpAddress {
		o.res = pcp.PMPSuccess.String()
		o.reply = pcp.AppendPMPAddressResponse(nil, pcp.PMPSuccess, c.epoch, s.cfg.ExternalIPv4)
		return o
	}
	mark := c.t.mark()
	ext, lt, code, err := s.servePMPMap(c, &req, &o)
	res := pmpResult(code)
	o.res = res.String()
	if res != pcp.PMPSuccess {
		// PMP-09: the full reply, internal port copied, nothing mapped.
		s.plog.Debug("refused", zap.Stringer("from", c.src), zap.Stringer("result", res), zap.Error(err))
		o.reply = pcp.AppendPMPMapResponse(nil, req.Opcode, res, c.epoch, req.InternalPort, 0, 0)
		if c.t.mark() != mark {
			// A partial delete-all (PMP-08, strict nonces): what it
			// deleted is logged and committed, its reply a failure's.
			o.fail = failReply{kind: failPMP, epoch: c.epoch, pmpOp: req.Opcode, port: req.InternalPort}
			return o
		}
		o.after, o.log.msg = nil, ""
		return o
	}
	o.reply = pcp.AppendPMPMapResponse(nil, req.Opcode, res, c.epoch, req.InternalPort, ext, lt)
	if o.after != nil || o.log.msg != "" {
		o.fail = failReply{kind: failPMP, epoch: c.epoch, pmpOp: req.Opcode, port: req.InternalPort}
	}
	return o
}

// servePMPMap handles NAT-PMP mapping requests (§3.3, §3.4). It returns
// the external port and lifetime to report.
func (s *Server) servePMPMap(c *call, req *pcp.PMPRequest, o *outcome) (uint16, time.Duration, pcp.ResultCode, error) {
	proto := uint8(req.Opcode.Protocol())
	internal := c.src.Addr() // PMP-04: always the source
	deleting := req.Lifetime == 0
	if !deleting && req.InternalPort == 0 {
		code, err := fail(errInternalPortZero) // PMP-10 (impl)
		return 0, 0, code, err
	}
	owner, err := s.authorize(c, internal, false, proto, req.InternalPort, deleting)
	if err != nil {
		code, err := fail(err)
		return 0, 0, code, err
	}
	key := store.Key{Owner: string(owner.ID), Protocol: proto, InternalAddr: internal, InternalPort: req.InternalPort}
	if deleting {
		// PMP-07, PMP-08: result 0, external port 0, lifetime 0, also when
		// nothing existed. Internal port 0 deletes every mapping of this
		// client and protocol.
		var gone []store.Lease
		kept := 0 // PCP MAPs a delete-all leaves (strict nonces)
		if req.InternalPort == 0 {
			gone = s.tab.mappingsOf(key.Owner, internal, proto, gone)
			if s.cfg.StrictNonce {
				n := len(gone)
				gone = slices.DeleteFunc(gone, pmpCannotTouch)
				kept = n - len(gone)
			}
			slices.SortFunc(gone, func(a, b store.Lease) int { return compareKeys(a.Key, b.Key) })
		} else if l, ok := s.tab.get(key); ok {
			if s.cfg.StrictNonce && pmpCannotTouch(*l) {
				code, err := fail(errPMPNoNonce) // as MAP-19 refuses another nonce
				return 0, 0, code, err
			}
			gone = append(gone, *l)
		}
		for _, l := range gone {
			c.t.set(l.Key, nil, true)
		}
		switch len(gone) {
		case 0:
		case 1:
			o.log = logRec{msg: msgDeleted, lease: gone[0], from: c.src}
		default:
			src := c.src // not c: the closure would move every call to the heap
			o.after = func() {
				for _, l := range gone {
					s.plog.Info(msgDeleted, leaseFields(&l, src)...)
				}
			}
		}
		if kept > 0 {
			// RFC 6886 §3.4: a delete-all that cannot delete every
			// mapping deletes the rest and answers a non-zero code
			// (PMP-08): NOT_AUTHORIZED/REFUSED (§3.5, 2), as for a
			// mapping it may not delete.
			code, err := fail(fmt.Errorf("delete-all left %d PCP mapping(s): %w", kept, errPMPNoNonce))
			return 0, 0, code, err
		}
		return 0, 0, pcp.Success, nil
	}
	a := ask{kind: store.KindNATPMP, key: key, suggPort: req.SuggestedExternalPort, grant: s.pol.ClampLifetime(req.Lifetime)}
	var resp pcp.Response
	code, err := s.mapInbound(c, &a, &resp, o)
	if code != pcp.Success {
		return 0, 0, code, err
	}
	return o.log.lease.ExternalPort, a.grant, pcp.Success, nil
}

// errPMPNoNonce refuses, with strict nonces, a NAT-PMP request that would
// delete, renew or take over a mapping PCP made (NOT_AUTHORIZED; NAT-PMP
// result 2, RFC 6886 §3.5).
var errPMPNoNonce = fmt.Errorf("NAT-PMP request (no nonce) for a mapping PCP created: %w", errNonce)

// pmpCannotTouch: with strict nonces, a NAT-PMP request may not delete,
// renew or replace l. Security (issue 9, found by h/attack): NAT-PMP
// carries no nonce, so strict mode's promise (MAP-14, MAP-19: only the
// holder of a MAP's nonce changes it; another process or host behind the
// same address, or a client after a reboot, cannot) held for PCP alone:
// from the MAP's own address a NAT-PMP delete removed it, a mapping
// request renewed it into a NAT-PMP lease with a zero nonce (which any
// PCP nonce then replaced or deleted), and a delete-all took it too. So
// only mappings NAT-PMP made are NAT-PMP's to change; without strict
// nonces (choice (c)) the owner's address may change any, as before.
func pmpCannotTouch(l store.Lease) bool { return l.Kind == store.KindMap }

// announceYield is how many leases announceTargets copies per hold of s.mu.
const announceYield = 512

// announceTargets lists where unsolicited announcements go: each known
// client's address and port, grouped by the serving address it used
// (ANN-04, ANN-06). NAT-PMP clients listen on port 5350 (RFC 6886 §3.2.1).
//
// The engine needs s.mu for every request, so the lock is held only to
// copy the leases' addresses, and given up every announceYield leases
// (walking 20 000 leases alone takes 1-5 ms on a loaded 2-core host); the
// grouping, with a set per serving address, runs after. Go lets a map
// change while it is ranged over: a lease added meanwhile may be missed
// (the next round has it), one seen twice is deduped. This used to dedupe
// with a linear search per lease, under the lock: O(leases × clients),
// 30-60 ms at 20 000 leases of 4 096 clients, a stall of every request in
// flight at each start-up round (the open-loop p99 of the benchmark).
func (s *Server) announceTargets() (pcpT, pmpT map[netip.AddrPort][]netip.AddrPort) {
	type target struct {
		server, client netip.AddrPort
		pmp            bool
	}
	// Deduplicated as the walk goes: a list of every lease's target and a
	// set sized for all of them held ≈ 180 MB at 1 000 000 leases just
	// after a restart, for a few thousand distinct clients.
	pcpT, pmpT = map[netip.AddrPort][]netip.AddrPort{}, map[netip.AddrPort][]netip.AddrPort{}
	seen := map[target]struct{}{}
	s.mu.Lock()
	i := 0
	for _, l := range s.tab.all() {
		if l.ClientAddr.IsValid() {
			t := target{l.ServerAddr, l.ClientAddr, l.Kind == store.KindNATPMP}
			m := pcpT
			if t.pmp {
				m = pmpT
				t.client = netip.AddrPortFrom(t.client.Addr(), pcp.ClientPort)
			}
			if _, dup := seen[t]; !dup {
				seen[t] = struct{}{}
				m[t.server] = append(m[t.server], t.client)
			}
		}
		if i++; i%announceYield == 0 {
			s.mu.Unlock()
			if s.announceYielded != nil {
				s.announceYielded()
			}
			runtime.Gosched()
			s.mu.Lock()
		}
	}
	s.mu.Unlock()
	return pcpT, pmpT
}
