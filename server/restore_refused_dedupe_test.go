package server

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/policy"
)

// TestRestoreRefusedDedupe: reconcile sorts the refused and moved leases'
// pinholes by tuple and compacts them, skipping those a kept lease on the
// same tuple holds. Against a model: random MAPs (with and without
// FILTERs), PEERs and denied ports on a few shared tuples, IPv6 and IPv4,
// restarted with one opcode disabled and a port denied; after the restart
// the kernel holds exactly the kept leases' pinholes (none lost, none left
// over) and each pinhole is deleted at most once.
func TestRestoreRefusedDedupe(t *testing.T) {
	clients := []netip.Addr{addrA, addrA2, v4A, v4A2}
	remotes6 := []netip.AddrPort{remote, netip.MustParseAddrPort("[2001:db8:99::2]:4000"), netip.MustParseAddrPort("[2001:db8:98::1]:53")}
	remotes4 := []netip.AddrPort{netip.MustParseAddrPort("203.0.113.9:4000"), netip.MustParseAddrPort("203.0.113.10:4000"), netip.MustParseAddrPort("198.18.0.1:53")}
	for seed := range uint64(40) {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			rng := rand.New(rand.NewPCG(seed, 7))
			h := newHarness(t)
			for i := range 60 {
				c := clients[rng.IntN(len(clients))]
				rems := remotes6
				if c.Is4() {
					rems = remotes4
				}
				port := uint16(5000 + rng.IntN(3))
				rem := rems[rng.IntN(len(rems))]
				n := byte(i)
				switch rng.IntN(3) {
				case 0:
					h.do(peerReq(c, pcp.ProtoTCP, port, rem, time.Hour, n))
				case 1:
					h.do(mapReq(c, pcp.ProtoTCP, port, 0, time.Hour, n))
				default:
					m := mapReq(c, pcp.ProtoTCP, port, 0, time.Hour, n)
					for range 1 + rng.IntN(2) {
						r := rems[rng.IntN(len(rems))]
						bits := r.Addr().BitLen() - rng.IntN(2)*8
						m.Options.Filters = append(m.Options.Filters, pcp.Filter{Remote: netip.PrefixFrom(r.Addr(), bits), RemotePort: r.Port() * uint16(rng.IntN(2))})
					}
					h.do(m)
				}
			}
			if seed%2 == 0 {
				h.cfg.DisableMap = true
			} else {
				h.cfg.DisablePeer = true
			}
			h.pcfg.DenyPorts = []policy.PortRange{{First: 5001, Last: 5001}}
			deletes := map[pinhole.Pinhole]int{}
			h.fw.FailApply = func(ops []pinhole.Op) error {
				for _, op := range ops {
					if op.Kind == pinhole.Delete {
						deletes[op.Pinhole]++
					}
				}
				return nil
			}
			h.start()
			h.fw.FailApply = nil
			want := map[pinhole.Pinhole]bool{}
			for _, l := range h.s.Leases() {
				for _, p := range pinholesOf(&l) {
					want[p] = true
				}
			}
			got := h.fw.Holes()
			for p := range want {
				if _, ok := got[p]; !ok {
					t.Errorf("kept lease's pinhole %v missing", p)
				}
			}
			for p := range got {
				if !want[p] {
					t.Errorf("pinhole %v left with no kept lease", p)
				}
			}
			for p, n := range deletes {
				if n > 1 || want[p] {
					t.Errorf("pinhole %v deleted %d times (kept: %v)", p, n, want[p])
				}
			}
		})
	}
}
