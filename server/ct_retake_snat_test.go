package server

import (
	"context"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/policy"
)

// TestE2ERetakeEndsOldSNATFlow (root, namespaces; review h/revnatleft):
// the client's own outbound TCP connection from its mapped port X:p to a
// remote R leaves SNAT-ed from the external endpoint E (the companion of
// an IPv4 PEER to R, or of a MAP). The mapping ends (revoked, deleted) and its flush leaves
// that flow (a PEER's end leaves its client's own flow; with
// KeepConnections nothing is flushed). Once MAP-22's quarantine is over
// (cleared here: 124 min of a long-lived connection), E is mapped again to
// another internal endpoint X:p+1. R's packets to E must not reach X:p
// any more: E is X:p+1's now. On main the old connection still echoes
// through E (conntrack's reply binding; neither natcut nor the retarget
// walk, which ends original-direction flows to E only, looks at it).
func TestE2ERetakeEndsOldSNATFlow(t *testing.T) {
	for i, c := range []struct {
		name string
		peer bool
		keep bool
	}{
		{"PEER ended", true, false},
		{"MAP ended, KeepConnections", false, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			l := newLab(t, func(cfg *Config, p *policy.Config) {
				p.MinLifetime = time.Second
				cfg.KeepConnections = c.keep
			})
			l.masquerade(t, "retakesnat")
			port := uint16(8500 + 2*i)
			client := l.topo.ClientV4
			r1 := netip.AddrPortFrom(l.topo.InternetV4, 7500+uint16(i))
			req := mapReq(client, pcp.ProtoTCP, port, port+10000, time.Hour, 1)
			if c.peer {
				req = peerReq(client, pcp.ProtoTCP, port, r1, time.Hour, 1)
				req.Map.ExternalPort = port + 10000
			}
			resp := l.pcp(req)
			if resp.Result != pcp.Success {
				t.Fatalf("mapping: %+v", resp)
			}
			ext := netip.AddrPortFrom(resp.Map.ExternalAddr.Unmap(), resp.Map.ExternalPort)
			serveEcho(t, l.topo.Internet, r1)
			mapped := netip.AddrPortFrom(client, port)
			conn := dialShared(t, l.topo.Client, mapped, r1)
			if f := l.ctFlow(t, mapped, r1); f == nil || leavesFrom(f) != ext {
				t.Fatalf("outbound flow not SNAT-ed to %v: %v", ext, f)
			}
			if err := echoOnce(conn); err != nil {
				t.Fatalf("outbound: %v", err)
			}
			if c.peer { // an admin's revoke
				if n, err := l.srv.Revoke(context.Background(), RevokeFilter{Owner: l.srv.Leases()[0].Owner}); n != 1 || err != nil {
					t.Fatalf("revoke the PEER: %d %v", n, err)
				}
			} else {
				req.Lifetime = 0
				if resp := l.pcp(req); resp.Result != pcp.Success {
					t.Fatalf("delete: %+v", resp)
				}
			}
			l.srv.waitConntrack()
			if err := echoOnce(conn); err != nil {
				t.Fatalf("the end ended the client's own flow (not what this test is about): %v", err)
			}
			// The prune (h/natprior) keeps the entry: the old target's
			// SNAT-ed flow still uses ext (NATEndpoints' second dump).
			defer func(m int) { natPriorDumpMin = m }(natPriorDumpMin)
			natPriorDumpMin = 1
			l.srv.pruneNATPrior()
			l.srv.pruneNATPrior()
			l.srv.mu.Lock()
			if _, ok := l.srv.natPrior[ctTarget{addr: ext.Addr(), proto: protoTCP, port: ext.Port()}]; !ok {
				t.Errorf("%v, whose old outbound flow lives, pruned", ext)
			}
			l.srv.quarDel(endpoint{addr: ext.Addr(), proto: protoTCP, port: ext.Port()})
			l.srv.mu.Unlock()
			serveEcho(t, l.topo.Client, netip.AddrPortFrom(client, port+1))
			if resp := l.pcp(mapReq(client, pcp.ProtoTCP, port+1, ext.Port(), time.Hour, 2)); resp.Result != pcp.Success ||
				netip.AddrPortFrom(resp.Map.ExternalAddr.Unmap(), resp.Map.ExternalPort) != ext {
				t.Fatalf("MAP of %d for %v: %+v", port+1, ext, resp)
			}
			if err := echoOnce(conn); err == nil {
				t.Errorf("the old outbound connection of %v still reaches it through %v, now mapped to port %d", mapped, ext, port+1)
			}
			if f := l.ctFlow(t, mapped, r1); f != nil && leavesFrom(f) == ext {
				t.Errorf("still tracked through %v: %s", ext, f)
			}
		})
	}
}

// TestRetargetBatchCost (root; PCPD_RETARGET_COST=1): how long one
// HandleBatch of 256 MAPs takes that retake 256 just-deleted IPv6
// redirects' external ports for other internal ports (one retarget walk
// for the batch: cutRetargeted), beside the same batch re-making the same
// redirects (no walk). KeepConnections (no other walk runs). Reports only.
func TestRetargetBatchCost(t *testing.T) {
	if os.Getenv("PCPD_RETARGET_COST") == "" {
		t.Skip("PCPD_RETARGET_COST=1 to measure")
	}
	const n = 256
	l := newLab(t, func(cfg *Config, p *policy.Config) {
		p.MinLifetime = time.Second
		p.MaxLeasesPerClient = 4 * n
		cfg.KeepConnections = true
		cfg.RateLimit, cfg.RateBurst, cfg.OwnerBurst = 1e12, 1<<30, 1<<30
	})
	batch := func(in, ext uint16, life time.Duration, nonce byte) time.Duration {
		rs := make([]Request, n)
		for i := range rs {
			r := mapReq(l.topo.ClientV6, pcp.ProtoTCP, in+uint16(i), ext+uint16(i), life, nonce)
			rs[i] = Request{Local: l.server6(), Source: netip.AddrPortFrom(l.topo.ClientV6, 5351), Iface: l.topo.HostLANIf, Data: pcp.AppendRequest(nil, r)}
		}
		start := time.Now()
		out := l.srv.HandleBatch(rs)
		d := time.Since(start)
		for i, b := range out {
			var r pcp.Response
			if err := pcp.ParseResponse(b, &r); err != nil || r.Result != pcp.Success || life > 0 && r.Map.ExternalPort != ext+uint16(i) {
				t.Fatalf("request %d: %+v %v", i, r, err)
			}
		}
		return d
	}
	const in, ext = 20000, 30000
	for round := range 12 {
		other := round%2 == 1
		nonce := byte(2*round + 1)
		batch(in, ext, time.Hour, nonce)
		batch(in, ext, 0, nonce)
		to := uint16(in)
		if other {
			to = in + n
		}
		d := batch(to, ext, time.Hour, nonce+1)
		batch(to, ext, 0, nonce+1)
		t.Logf("another target %v: one batch of %d re-MAPs: %.2f ms", other, n, ms(d))
	}
}

// TestE2ERetakeWhileDamagedCutAfterRepair (root, namespaces; review
// h/revnatleft): with KeepConnections, an IPv6 redirect (external port P
// to the client's port X) carries a connection and is deleted; the
// layout is then damaged (recheck_nat and the DNAT chain flushed, napt4
// replaced by a foreign set, so that the repairing Setup fails: CutsFlows
// is false, noteDamage) and P is mapped again to port Y meanwhile: the
// retarget walk is skipped (natRetargets asks CutsFlows). Once the
// foreign set is gone the firewall check repairs the layout, and P's new
// element lets the old flow through recheck_nat again: on main the old
// connection echoes from X after the repair (until Y's mapping next
// writes its element). Now the repair walks the endpoints a live lease
// retook while the walk was skipped (cutHeldRetargets).
func TestE2ERetakeWhileDamagedCutAfterRepair(t *testing.T) {
	l := newLab(t, func(cfg *Config, p *policy.Config) {
		p.MinLifetime = time.Second
		cfg.KeepConnections = true
		cfg.TamperInterval = time.Hour // the test runs the checks
		cfg.NoFirewallWatch = true     // and only the test (no firewall watch)
	})
	const port = 9890
	conn, _, dst := l.inbound(t, "redir6", port, time.Hour)
	serveEcho(t, l.topo.Client, netip.AddrPortFrom(l.topo.ClientV6, port+1))
	if d := l.pcp(mapReq(l.topo.ClientV6, pcp.ProtoTCP, port, dst.Port(), 0, 1)); d.Result != pcp.Success {
		t.Fatalf("delete: %+v", d)
	}
	l.topo.Host.MustRun(t, "nft", "flush chain inet pcpd recheck_nat; flush chain inet pcpd prerouting; delete set inet pcpd napt4; add set inet pcpd napt4 { type ipv4_addr; }")
	l.srv.checkFirewall() // Healthy: damage; Setup fails on the foreign napt4
	if r := l.pcp(mapReq(l.topo.ClientV6, pcp.ProtoTCP, port+1, dst.Port(), time.Hour, 2)); r.Result != pcp.Success || r.Map.ExternalPort != dst.Port() {
		t.Fatalf("MAP of %d for external port %d: %+v", port+1, dst.Port(), r)
	}
	l.topo.Host.MustRun(t, "nft", "delete set inet pcpd napt4")
	l.srv.checkFirewall() // repaired
	if err := l.fw.Healthy(); err != nil {
		t.Fatalf("not repaired: %v", err)
	}
	if err := echoOnce(conn); err == nil {
		t.Errorf("the old connection still reaches port %d after the repair, %v being port %d's", port, dst, port+1)
	}
}
