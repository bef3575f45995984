package server

import (
	"errors"
	"net/netip"
	"time"

	"go.uber.org/zap"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/policy"
)

// early answers, in the socket reader and without the engine, the PCP
// requests whose answer depends on no lease: malformed ones (the codec's
// error, PKT-05..07, OPT-03, VER-01) and MAP or PEER requests the policy
// refuses at the first step of MAP-01 (ownership: NOT_AUTHORIZED and the
// other policy codes). Such answers then neither queue behind the engine
// nor wait for a batch's kernel transaction and fsync, and the socket's
// reader answers them as fast as it reads (the engine is one goroutine).
//
// It returns handled=false for anything else, which goes to the engine:
// NAT-PMP, ANNOUNCE, requests the policy allows, and configurations where
// a refusal would come from an earlier step (MAP or PEER switched off).
// A nil reply with handled=true is a silent drop. The checks are the
// engine's own (pcp.Parser with the same settings, Server.authorize,
// resultCode), so both paths give the same answer.
func (s *Server) early(b []byte, src netip.AddrPort, now time.Time) (reply []byte, handled bool) {
	if len(b) < 2 {
		return nil, false
	}
	if b[0] == pcp.PMPVersion && s.natpmpOn(src.Addr()) {
		return nil, false // NAT-PMP: the engine's (handle's dispatch)
	}
	epoch := s.epoch.at(now)
	p := pcp.Parser{
		DisableThirdParty: s.pol.ThirdPartyMode() == policy.ThirdPartyOff,
		IgnorePortSet:     true,
		DeferOptionChecks: true,
	}
	var req pcp.Request
	if err := p.ParseRequest(b, src.Addr(), &req); err != nil {
		var pe *pcp.ParseError
		if !errors.As(err, &pe) || pe.Silent {
			s.drop("malformed", src)
			return nil, true
		}
		s.m.requests.WithLabelValues("pcp", opName(b), pe.Result.String()).Inc()
		s.plog.Debug("refused", zap.Stringer("from", src), zap.Stringer("result", pe.Result), zap.Error(err))
		return pcp.AppendErrorResponse(nil, b, pe.Result, pe.Result.ErrorLifetime(), epoch), true
	}
	switch {
	case req.Opcode == pcp.OpMap && !s.cfg.DisableMap, req.Opcode == pcp.OpPeer && !s.cfg.DisablePeer:
	default:
		return nil, false
	}
	internal := src.Addr()
	tp := req.Options.ThirdParty.IsValid()
	if tp {
		internal = req.Options.ThirdParty.Unmap()
	}
	deleting := req.Opcode == pcp.OpMap && req.Lifetime == 0
	c := &call{src: src, data: b, now: now, epoch: epoch}
	_, err := s.authorize(c, internal, tp, uint8(req.Map.Protocol), req.Map.InternalPort, deleting)
	if err == nil {
		return nil, false
	}
	code := resultCode(err)
	s.m.requests.WithLabelValues("pcp", req.Opcode.String(), code.String()).Inc()
	s.plog.Debug("refused", zap.Stringer("from", src), zap.Stringer("opcode", req.Opcode), zap.Stringer("result", code), zap.Error(err))
	return pcp.AppendErrorResponse(nil, b, code, code.ErrorLifetime(), epoch), true
}
