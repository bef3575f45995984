package server

import (
	"net/netip"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/policy"
)

// TestRestoreRefusedSharedPinhole: a MAP with FILTER R/128:p and a PEER to
// R:p on one internal tuple share one kernel element. When a restart's
// rules refuse one of them (its opcode disabled, THIRD_PARTY off) and keep
// the other, the refused lease's deletion (reconcile's kernel batches)
// must leave the element the kept lease holds, and the kept lease must
// stay with every pinhole it had.
func TestRestoreRefusedSharedPinhole(t *testing.T) {
	r4 := netip.MustParseAddrPort("203.0.113.9:4000")
	tests := []struct {
		name   string
		client netip.Addr
		rem    netip.AddrPort
		tp     bool // the MAP is THIRD_PARTY, sent from another address of the owner
		rules  func(*Config, *policy.Config)
		kept   pcp.Opcode
	}{
		{"disable-map keeps PEER", addrA, remote, false, func(c *Config, _ *policy.Config) { c.DisableMap = true }, pcp.OpPeer},
		{"disable-peer keeps MAP", addrA, remote, false, func(c *Config, _ *policy.Config) { c.DisablePeer = true }, pcp.OpMap},
		{"third-party off keeps PEER", addrA, remote, true, func(_ *Config, p *policy.Config) { p.ThirdParty = policy.ThirdPartyOff }, pcp.OpPeer},
		{"IPv4 disable-map keeps PEER", v4A, r4, false, func(c *Config, _ *policy.Config) { c.DisableMap = true }, pcp.OpPeer},
		{"IPv4 disable-peer keeps MAP", v4A, r4, false, func(c *Config, _ *policy.Config) { c.DisablePeer = true }, pcp.OpMap},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t)
			pr := h.do(peerReq(tc.client, pcp.ProtoTCP, 5000, tc.rem, time.Hour, 1))
			h.expect(pr, pcp.Success)
			src := tc.client
			if tc.tp {
				src = addrA2
			}
			m := mapReq(src, pcp.ProtoTCP, 5000, pr.Map.ExternalPort, time.Hour, 2)
			m.Options.Filters = []pcp.Filter{{Remote: netip.PrefixFrom(tc.rem.Addr(), tc.rem.Addr().BitLen()), RemotePort: tc.rem.Port()}}
			if tc.tp {
				m.Options.ThirdParty = tc.client
			}
			mr := h.doFrom(src, m)
			h.expect(mr, pcp.Success)
			if mr.Map.ExternalPort != pr.Map.ExternalPort {
				t.Skipf("MAP got external port %d, PEER %d: no shared element", mr.Map.ExternalPort, pr.Map.ExternalPort)
			}
			before := h.fw.Holes()
			if len(before) != 1 {
				t.Fatalf("want one shared pinhole, kernel holds %v", before)
			}
			tc.rules(&h.cfg, &h.pcfg)
			var deleted []pinhole.Pinhole // not even for a moment (a flow's new packets dropped until the install)
			h.fw.FailApply = func(ops []pinhole.Op) error {
				for _, op := range ops {
					if _, shared := before[op.Pinhole]; shared && op.Kind == pinhole.Delete {
						deleted = append(deleted, op.Pinhole)
					}
				}
				return nil
			}
			h.start()
			h.fw.FailApply = nil
			if len(deleted) > 0 {
				t.Errorf("the shared element was deleted at start (then re-installed): %v", deleted)
			}
			ls := h.s.Leases()
			if len(ls) != 1 {
				t.Fatalf("%d leases after the restart, want the %v alone: %v", len(ls), tc.kept, ls)
			}
			after := h.fw.Holes()
			for p := range before {
				if _, ok := after[p]; !ok {
					t.Errorf("the kept %v's pinhole %v was deleted with the refused lease's; kernel: %v", tc.kept, p, after)
				}
			}
		})
	}
}
