package server

import (
	"net/netip"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/policy"
	"github.com/pcpd/pcpd/store"
)

// Issue 9 (h/peerend): no pinhole outlives its lease by more than 1 s,
// PEERs' and narrowed FILTERs' included.

// TestE2EPeerEndEndsFlow (root, namespaces): a PEER's end (revoked here;
// expiry and expiry while stopped: TestE2EExpiryEndsConnections,
// TestE2EExpiryWhileStoppedEndsConnections) ends the inbound connection
// from its remote, IPv6 or IPv4 (DNAT-ed to the client), unless a lease
// live throughout admits it: a MAP of the endpoint, or one with a FILTER
// of the remote. A connection a MAP's delete spared because the PEER
// held it ends with the PEER. Before, a PEER's end flushed nothing: the
// "ended" rows fail with the flow still tracked and carrying data.
func TestE2EPeerEndEndsFlow(t *testing.T) {
	for i, c := range []struct {
		name string
		kind string // of the PEER (lab.inbound)
		// beside is a MAP made beside the PEER ("": none; "map": no
		// FILTER; "filter": FILTERed to the PEER's remote; "deleted":
		// none FILTERed, deleted before the PEER ends).
		beside string
		ended  bool
	}{
		{"PEER IPv6 ended", "peer6", "", true},
		{"PEER IPv4 (DNAT) ended", "peer4", "", true},
		{"PEER IPv6 ended, MAP live", "peer6", "map", false},
		{"PEER IPv4 ended, MAP live", "peer4", "map", false},
		{"PEER IPv6 ended, MAP with the remote's FILTER live", "peer6", "filter", false},
		{"PEER IPv6 ended after the MAP's delete spared it", "peer6", "deleted", true},
		{"PEER IPv4 ended after the MAP's delete spared it", "peer4", "deleted", true},
	} {
		t.Run(c.name, func(t *testing.T) {
			l := newLab(t, func(_ *Config, p *policy.Config) { p.MinLifetime = time.Second })
			port := uint16(9900 + i)
			conn, src, dst := l.inbound(t, c.kind, port, time.Hour)
			client := l.topo.ClientV6
			if c.kind == "peer4" {
				client = l.topo.ClientV4
			}
			if c.beside != "" {
				r := mapReq(client, pcp.ProtoTCP, port, 0, time.Hour, 2)
				if c.beside == "filter" {
					r.Options.Filters = []pcp.Filter{{Remote: netip.PrefixFrom(src.Addr(), src.Addr().BitLen()), RemotePort: src.Port()}}
				}
				if resp := l.pcp(r); resp.Result != pcp.Success ||
					netip.AddrPortFrom(resp.Map.ExternalAddr.Unmap(), resp.Map.ExternalPort) != dst {
					t.Fatalf("MAP beside the PEER: %+v, want external %v", resp, dst)
				}
			}
			if c.beside == "deleted" {
				if resp := l.pcp(mapReq(client, pcp.ProtoTCP, port, 0, 0, 2)); resp.Result != pcp.Success {
					t.Fatalf("MAP delete: %+v", resp)
				}
				if l.ctFlow(t, src, dst) == nil {
					t.Fatal("the MAP's delete flushed the PEER's flow; nothing to test")
				}
			}
			var peer *store.Key
			for _, le := range l.srv.Leases() {
				if le.Kind == store.KindPeer {
					peer = &le.Key
				}
			}
			if peer == nil {
				t.Fatal("no PEER lease")
			}
			if n, err := l.srv.Revoke(RevokeFilter{Key: peer}); n != 1 || err != nil {
				t.Fatalf("revoke the PEER: %d %v", n, err)
			}
			l.srv.waitConntrack()
			f := l.ctFlow(t, src, dst)
			err := echoOnce(conn)
			t.Logf("flow tracked after the PEER's end: %v; carries data: %v", f != nil, err == nil)
			if c.ended {
				if f != nil {
					t.Errorf("the ended PEER's flow is still tracked: %s", f)
				}
				if err == nil {
					t.Error("the ended PEER's connection still carries data")
				}
				return
			}
			if f == nil {
				t.Error("a flow a live MAP admits was flushed with the PEER's end")
			}
			if err != nil {
				t.Errorf("a connection a live MAP admits ended with the PEER: %v", err)
			}
		})
	}
}
