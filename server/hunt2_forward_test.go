package server

import (
	"net/netip"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/pinhole"
)

// TestRenewalMovesOffForwardedPort (h/hunt2): an IPv4 mapping granted a
// port the host's own DNAT rules did not forward then, renewed after the
// admin forwards it (pcpd's read of their rules: hostPorts.forwarded),
// moves to another port, as a replacement does: NAT-PMP, a PCP MAP with
// its nonce, and with PREFER_FAILURE the renewal is refused
// (CANNOT_PROVIDE_EXTERNAL, PF-03) and the mapping kept as it is (until
// housekeeping's sweep ends it: TestForwardedPortEndsUnmovable). The
// other protocol's same port is not the forward's: kept. Judged by the
// fake kernel's elements too. Before, every renewal kept the forwarded
// port: "NAT-PMP renewal: SUCCESS, external port 1443 (forwarded since)".
func TestRenewalMovesOffForwardedPort(t *testing.T) {
	h, ff := forwardHarness(t)

	type row struct {
		name  string
		proto uint8
		port  uint16
		renew func() (pcp.ResultCode, uint16) // result, external port
		moves bool
	}
	pcpMap := func(port uint16, n byte, pf bool) func() (pcp.ResultCode, uint16) {
		return func() (pcp.ResultCode, uint16) {
			r := mapReq(v4A, pcp.ProtoTCP, port, port, time.Hour, n)
			r.Map.ExternalAddr = ext4
			r.Options.PreferFailure = pf
			resp := h.do(r)
			return resp.Result, resp.Map.ExternalPort
		}
	}
	pmp := func(op pcp.PMPOpcode, port uint16) func() (pcp.ResultCode, uint16) {
		return func() (pcp.ResultCode, uint16) {
			r := h.pmp(v4A, op, port, port, time.Hour)
			if r.Result != pcp.PMPSuccess {
				return pcp.NotAuthorized, r.ExternalPort // any failure
			}
			return pcp.Success, r.ExternalPort
		}
	}
	filtered := func() (pcp.ResultCode, uint16) {
		r := mapReq(v4A, pcp.ProtoTCP, 1447, 1447, time.Hour, 9)
		r.Map.ExternalAddr = ext4
		if _, ok := h.lease(ownerA, protoTCP, v4A, 1447); !ok {
			r.Options.Filters = []pcp.Filter{{Remote: netip.MustParsePrefix("192.0.2.0/24")}} // only the first request
		}
		resp := h.do(r)
		return resp.Result, resp.Map.ExternalPort
	}
	rows := []row{
		{"PCP MAP with a FILTER, renewed without", protoTCP, 1447, filtered, true},
		{"NAT-PMP TCP", protoTCP, 1443, pmp(pcp.PMPOpMapTCP, 1443), true},
		{"PCP MAP, same nonce", protoTCP, 1444, pcpMap(1444, 7, false), true},
		{"PCP MAP, PREFER_FAILURE", protoTCP, 1445, pcpMap(1445, 8, true), false},
		{"NAT-PMP UDP, only TCP forwarded", protoUDP, 1446, pmp(pcp.PMPOpMapUDP, 1446), false},
	}
	for _, r := range rows {
		if code, ext := r.renew(); code != pcp.Success || ext != r.port {
			t.Fatalf("%s: first mapping: %v, external port %d", r.name, code, ext)
		}
	}
	var f pinhole.ForeignDNAT
	for _, r := range rows {
		f.TCP.Add(r.port)
	}
	ff.set(&f, nil)
	h.s.hostPorts.refresh()

	for _, r := range rows {
		code, ext := r.renew()
		switch {
		case r.moves && (code != pcp.Success || ext == r.port || ext == 0):
			t.Errorf("%s renewal: %v, external port %d (forwarded since): want SUCCESS on another port", r.name, code, ext)
		case r.name == "PCP MAP, PREFER_FAILURE" && code != pcp.CannotProvideExternal:
			t.Errorf("%s renewal: %v, external port %d: want CANNOT_PROVIDE_EXTERNAL", r.name, code, ext)
		case !r.moves && r.proto == protoUDP && (code != pcp.Success || ext != r.port):
			t.Errorf("%s renewal: %v, external port %d: want SUCCESS on %d", r.name, code, ext, r.port)
		}
		l, ok := h.lease(ownerA, r.proto, v4A, r.port)
		if !ok {
			t.Fatalf("%s: no lease after the renewal", r.name)
		}
		if r.port == 1447 && (len(l.Filters) != 1 || l.Filters[0].Prefix != netip.MustParsePrefix("192.0.2.0/24")) {
			t.Errorf("%s: the moved lease's FILTERs: %v, want 192.0.2.0/24 kept", r.name, l.Filters)
		}
		held := false
		for p := range h.fw.Holes() {
			if p.Protocol == r.proto && p.InternalPort == r.port && p.ExternalAddr == ext4 {
				held = held || p.ExternalPort == r.port
				if p.ExternalPort != l.ExternalPort || (r.port == 1447 && !p.RemotePrefix.IsValid()) {
					t.Errorf("%s: kernel element on %d, the lease on %d", r.name, p.ExternalPort, l.ExternalPort)
				}
			}
		}
		if held != !r.moves {
			t.Errorf("%s: kernel holds the renewed port %d: %v, want %v", r.name, r.port, held, !r.moves)
		}
	}
}
