package server

import (
	"net/netip"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/policy"
	"github.com/pcpd/pcpd/store"
)

// BenchmarkIPv4PoolScan (h/pool4): a new IPv4 mapping whose internal port
// is taken (MAP-09/11/12: the lowest free port of the pool) beside n
// IPv4 TCP leases of other clients on ext4, holding the pool's lowest n
// ports (full = the whole pool, 64 512 ports: the request is refused,
// NO_RESOURCES). An op is the new mapping and its delete (lifetime 0,
// same client), each one request; a refused op is the MAP alone. What
// one such request costs the engine, under s.mu (ns/op).
func BenchmarkIPv4PoolScan(b *testing.B) {
	pool := 65535 - 1024 + 1
	for _, occ := range []struct {
		name string
		n    int
	}{{"0", 0}, {"50", pool / 2}, {"99", pool * 99 / 100}, {"100", pool}} {
		for _, pmp := range []bool{false, true} {
			name := "occupancy=" + occ.name + "%/pcp"
			if pmp {
				name = "occupancy=" + occ.name + "%/natpmp"
			}
			b.Run(name, func(b *testing.B) { benchIPv4PoolScan(b, occ.n, pmp, false) })
		}
	}
	// The pool's lowest 99 % quarantined (MAP-22) for other clients
	// instead: no lease holds them, usable refuses each.
	b.Run("quarantined=99%/pcp", func(b *testing.B) { benchIPv4PoolScan(b, pool*99/100, false, true) })
}

// poolLeases are n IPv4 TCP MAP leases of one owner on ext4, external
// ports 1024 up, internal addresses 10.1.0.0 up (port 8080 each).
func poolLeases(n int, now time.Time) []store.Lease {
	out := make([]store.Lease, n)
	srv := netip.AddrPortFrom(local4.Addr(), 5351)
	for i := range out {
		a := netip.AddrFrom4([4]byte{10, 1, byte(i >> 8), byte(i)})
		out[i] = store.Lease{
			Key:          store.Key{Owner: "static:bench", Protocol: 6, InternalAddr: a, InternalPort: 8080},
			ExternalAddr: ext4, ExternalPort: uint16(1024 + i), ClientAddr: netip.AddrPortFrom(a, 5350), ServerAddr: srv,
			Created: now, Expires: now.Add(time.Hour), Kind: store.KindMap, Nonce: [12]byte{byte(i)},
		}
	}
	return out
}

func benchIPv4PoolScan(b *testing.B, n int, pmp, quar bool) {
	h := newHarness(b, func(_ *Config, p *policy.Config) { p.MaxLeases = 1 << 22 })
	if quar {
		h.s.mu.Lock()
		for _, l := range poolLeases(n, h.clock.Now()) {
			e, q := quarantineOf(&l, h.clock.Now())
			q.owner = "static:q" + itoa(int(l.ExternalPort)) // each its own client: no cap
			h.s.quarPut(e, q)
		}
		h.s.mu.Unlock()
	} else {
		putAll(h.s, poolLeases(n, h.clock.Now()))
	}
	var add, del []byte
	if pmp {
		add = pcp.AppendPMPRequest(nil, &pcp.PMPRequest{Opcode: pcp.PMPOpMapTCP, InternalPort: 8080, Lifetime: time.Hour})
		del = pcp.AppendPMPRequest(nil, &pcp.PMPRequest{Opcode: pcp.PMPOpMapTCP, InternalPort: 8080})
	} else {
		add = pcp.AppendRequest(nil, mapReq(v4A, pcp.ProtoTCP, 8080, 0, time.Hour, 1))
		del = pcp.AppendRequest(nil, mapReq(v4A, pcp.ProtoTCP, 8080, 0, 0, 1))
	}
	src := netip.AddrPortFrom(v4A, 40000)
	req := func(data []byte) []byte {
		return h.s.HandleBatch([]Request{{Local: local4, Source: src, Data: data, admitted: true}})[0]
	}
	full := n == 65535-1024+1
	// The first op, checked: the port it gets, or its refusal.
	got := poolScanPort(b, req(add), pmp)
	if want := uint16(8080); n > 0 {
		want = uint16(1024 + n)
		if full {
			want = 0
		}
		if got != want {
			b.Fatalf("external port %d, want %d", got, want)
		}
	}
	if !full {
		req(del)
	}
	b.ResetTimer()
	for range b.N {
		req(add)
		if !full {
			req(del)
		}
	}
}

// poolScanPort is the external port a reply gives (0: not a success).
func poolScanPort(b *testing.B, out []byte, pmp bool) uint16 {
	if pmp {
		var r pcp.PMPResponse
		if err := pcp.ParsePMPResponse(out, &r); err != nil {
			b.Fatal(err)
		}
		if r.Result != pcp.PMPSuccess {
			return 0
		}
		return r.ExternalPort
	}
	var r pcp.Response
	if err := pcp.ParseResponse(out, &r); err != nil {
		b.Fatal(err)
	}
	if r.Result != pcp.Success {
		return 0
	}
	return r.Map.ExternalPort
}
