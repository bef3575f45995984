package server

import (
	"github.com/vishvananda/netns"
	"net/netip"
	"runtime"
	rtmetrics "runtime/metrics"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/policy"
	"github.com/pcpd/pcpd/server/servertest"
	"github.com/pcpd/pcpd/store"
)

// benchServer builds an engine on fw and st owning 2001:db8::/32.
func benchServer(b *testing.B, fw Firewall, st LeaseStore, state store.State) *Server {
	return benchServerCfg(b, fw, st, state, Config{})
}

// benchServerCfg is benchServer with cfg's ExternalIPv4.
func benchServerCfg(b testing.TB, fw Firewall, st LeaseStore, state store.State, cfg Config) *Server {
	own, err := policy.NewStatic(map[string][]netip.Prefix{"bench": {netip.MustParsePrefix("2001:db8::/32")}})
	if err != nil {
		b.Fatal(err)
	}
	pol, err := policy.New(policy.Config{MaxLeasesPerClient: 1 << 20, MaxLeases: 1 << 20}, own)
	if err != nil {
		b.Fatal(err)
	}
	s, err := New(Config{RateLimit: 1e12, RateBurst: 1 << 30, KeepConnections: true, ExternalIPv4: cfg.ExternalIPv4}, Deps{Firewall: fw, Store: st, State: state, Policy: pol}, zap.NewNop())
	if err != nil {
		b.Fatal(err)
	}
	if err := s.Start(); err != nil {
		b.Fatal(err)
	}
	return s
}

// requests are n MAP requests from n distinct addresses (new mappings).
func requests(n, round int) []Request {
	out := make([]Request, n)
	for i := range out {
		a := netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0, 1, byte(round >> 24), byte(round >> 16), byte(round >> 8), byte(round), 0, 0, 0, 0, byte(i >> 8), byte(i)})
		r := mapReq(a, pcp.ProtoTCP, 443, 443, time.Hour, 1)
		out[i] = Request{Local: local6, Source: netip.AddrPortFrom(a, 5000), Data: pcp.AppendRequest(nil, r)}
	}
	return out
}

func benchBatches(b *testing.B, s *Server, batch int) {
	b.ReportAllocs()
	b.ResetTimer()
	done := 0
	var pending [][]Request
	round := 0
	for done < b.N {
		if len(pending) == 0 {
			// Building the requests is the client's work, not the
			// engine's; stopping the timer for each batch would cost more
			// than a batch (it reads the memory statistics).
			b.StopTimer()
			for range max(1, 1024/batch) {
				pending = append(pending, requests(batch, round))
				round++
			}
			b.StartTimer()
		}
		reqs := pending[0]
		pending = pending[1:]
		for i, r := range s.HandleBatch(reqs) {
			if len(r) < 4 || r[3] != 0 {
				b.Fatalf("request %d: % x", i, r)
			}
		}
		done += batch
	}
	b.ReportMetric(float64(done)/b.Elapsed().Seconds(), "maps/s")
}

// BenchmarkEngineMap is the engine's own cost per new MAP (decode, policy,
// allocation, table, reply) over in-memory kernel and store.
func BenchmarkEngineMap(b *testing.B) {
	fw := servertest.NewFirewall(time.Now)
	st := servertest.NewStore()
	s := benchServer(b, fw, st, st.State())
	benchBatches(b, s, 1)
}

// BenchmarkEngineRenew is a renewal of one mapping, the steady-state load.
func BenchmarkEngineRenew(b *testing.B) {
	fw := servertest.NewFirewall(time.Now)
	st := servertest.NewStore()
	s := benchServer(b, fw, st, st.State())
	req := requests(1, 0)[0]
	b.ReportAllocs()
	for b.Loop() {
		if r := s.Handle(req.Local, req.Source, req.Data); r[3] != 0 {
			b.Fatalf("% x", r)
		}
	}
}

// BenchmarkEngineRenewWritten is a renewal that is written through (not
// absorbed, absorb.go): the lifetime alternates between 1 h and 2 h, so
// each renewal either shortens the lease or leaves less than 5/8 of the
// new grant synced. Kernel op and store commit are in memory.
func BenchmarkEngineRenewWritten(b *testing.B) {
	fw := servertest.NewFirewall(time.Now)
	st := servertest.NewStore()
	s := benchServer(b, fw, st, st.State())
	a := netip.MustParseAddr("2001:db8:1::1")
	var reqs [2][]byte
	for i, lt := range []time.Duration{time.Hour, 2 * time.Hour} {
		reqs[i] = pcp.AppendRequest(nil, mapReq(a, pcp.ProtoTCP, 443, 443, lt, 1))
	}
	src := netip.AddrPortFrom(a, 5000)
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		if r := s.Handle(local6, src, reqs[i&1]); r[3] != 0 {
			b.Fatalf("% x", r)
		}
		i++
	}
	if len(s.dirty) != 0 {
		b.Fatalf("%d renewals absorbed", len(s.dirty))
	}
}

// BenchmarkRealMap: new MAPs through the real nftables backend (in a
// throwaway namespace) and the real bbolt store (fsync per commit), one
// request per batch versus 64 sharing one transaction and one fsync.
func BenchmarkRealMap(b *testing.B) {
	netlab.RequireRoot(b)
	for _, batch := range []int{1, 64} {
		b.Run("batch="+itoa(batch), func(b *testing.B) {
			fw := lastingFirewall(b, "bench")
			st, state, err := store.Open(b.TempDir(), zap.NewNop())
			if err != nil {
				b.Fatal(err)
			}
			defer st.Close()
			s := benchServer(b, fw, st, state)
			benchBatches(b, s, batch)
		})
	}
}

// lastingFirewall is a pinhole.Backend (no Setup: the server's Start
// does it) in a throwaway namespace named after name, on a lasting
// netlink connection, as cmd/pcpd holds it: a socket per transaction
// costs 5-14 ms in close(2), which would hide the engine.
func lastingFirewall(b testing.TB, name string) *pinhole.Backend {
	b.Helper()
	fw, _ := lastingFirewallNS(b, name)
	return fw
}

// lastingFirewallNS is lastingFirewall with its namespace's handle, for a
// server that works in it (Config.NetNS: the conntrack walk).
func lastingFirewallNS(b testing.TB, name string) (*pinhole.Backend, netns.NsHandle) {
	b.Helper()
	ns := netlab.NewNS(b, name)
	conn, h := ns.LastingNftConn(b)
	fw, err := pinhole.New(conn, pinhole.Config{})
	if err != nil {
		b.Fatal(err)
	}
	return fw, h
}

func itoa(n int) string {
	if n < 10 {
		return string(rune('0' + n))
	}
	return itoa(n/10) + string(rune('0'+n%10))
}

// startLeases are n stored MAP leases as the engine writes them (IPv6,
// distinct addresses, one owner), expiring in an hour.
func startLeases(n int, now time.Time) []store.Lease {
	out := make([]store.Lease, n)
	srv := netip.MustParseAddrPort("[2001:db8::1]:5351")
	for i := range out {
		a := netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0, 2, 0, 0, 0, 0, 0, 0, byte(i >> 24), byte(i >> 16), byte(i >> 8), byte(i)})
		out[i] = store.Lease{
			Key:          store.Key{Owner: "static:bench", Protocol: 6, InternalAddr: a, InternalPort: 443},
			ExternalAddr: a, ExternalPort: 443, ClientAddr: netip.AddrPortFrom(a, 5350), ServerAddr: srv,
			Created: now, Expires: now.Add(time.Hour), Kind: store.KindMap, Nonce: [12]byte{byte(i)},
		}
	}
	return out
}

var benchExt4 = netip.MustParseAddr("198.51.100.1")

// startQuarantines are n stored quarantines on distinct ports of
// benchExt4 (TCP, then UDP), of 1000 owners, ending in an hour.
func startQuarantines(n int, now time.Time) []store.Quarantine {
	out := make([]store.Quarantine, n)
	for i := range out {
		out[i] = store.Quarantine{
			Endpoint:     store.Endpoint{Addr: benchExt4, Port: uint16(1024 + i%60000), Protocol: []uint8{protoTCP, protoUDP}[i/60000%2]},
			Owner:        "static:q" + itoa(i%1000),
			InternalAddr: netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}),
			InternalPort: 443,
			Until:        now.Add(time.Hour + time.Duration(i)*time.Millisecond),
		}
	}
	return out
}

// BenchmarkStart is a restart with n stored leases: Start (objects set up,
// every lease's pinhole put back into a real nftables set in a namespace,
// the lease table built). It reports the heap the engine keeps per lease
// (heap after GC with the server, minus before the stored leases were
// made; they are released by the caller, as cmd/pcpd does), the heap
// after, and the peak heap during Start (the stored leases, 288 MB at
// 1 000 000, included: a streaming store would not hold them all).
// With quarantines=q, q stored MAP-22 quarantines (IPv4 ports, TCP then
// UDP, 1000 owners) are restored too.
//
//	go test ./server -run '^$' -bench Start -benchtime 1x
func BenchmarkStart(b *testing.B) {
	netlab.RequireRoot(b)
	for _, c := range []struct{ n, q int }{{100_000, 0}, {1_000_000, 0}, {1_000_000, 100_000}} {
		name := "leases=" + itoa(c.n)
		if c.q > 0 {
			name += "/quarantines=" + itoa(c.q)
		}
		n := c.n
		b.Run(name, func(b *testing.B) {
			fw := lastingFirewall(b, "start")
			for b.Loop() {
				st := servertest.NewStore()
				runtime.GC()
				var before, after runtime.MemStats
				runtime.ReadMemStats(&before)
				state := store.State{Leases: startLeases(n, time.Now()), Quarantines: startQuarantines(c.q, time.Now()), EpochOrigin: time.Now().Add(-time.Hour)}
				stop := peakHeap()
				start := time.Now()
				s := benchServerCfg(b, fw, st, state, Config{ExternalIPv4: benchExt4})
				took := time.Since(start)
				peak := stop()
				state.Leases, state.Quarantines = nil, nil
				s.deps.State.Leases = nil
				runtime.GC()
				runtime.ReadMemStats(&after)
				b.ReportMetric(took.Seconds(), "s/start")
				b.ReportMetric(float64(int64(after.HeapAlloc)-int64(before.HeapAlloc))/float64(n), "heapB/lease")
				b.ReportMetric(float64(peak)/1e6, "peakheapMB")
				b.ReportMetric(float64(after.HeapAlloc)/1e6, "afterheapMB")
				runtime.KeepAlive(s)
			}
		})
	}
}

// BenchmarkCommitWait is a renewal whose kernel transaction and store
// commit each take a fixed time (a sleep standing in for the netlink round
// trip and the fdatasync): it shows what a batch waits for, the sum of the
// two when they run one after the other, the larger when they overlap.
func BenchmarkCommitWait(b *testing.B) {
	const kernel, disk = 150 * time.Microsecond, 130 * time.Microsecond
	fw := servertest.NewFirewall(time.Now)
	st := servertest.NewStore()
	fw.FailApply = func([]pinhole.Op) error { time.Sleep(kernel); return nil }
	st.FailCommit = func([]store.Lease, []store.Key) error { time.Sleep(disk); return nil }
	s := benchServer(b, fw, st, st.State())
	req := requests(1, 0)[0]
	b.ReportAllocs()
	for b.Loop() {
		if r := s.Handle(req.Local, req.Source, req.Data); r[3] != 0 {
			b.Fatalf("% x", r)
		}
	}
}

// peakHeap samples the heap's allocated bytes (live and not yet collected:
// what the process must hold) every 10 ms until the returned func is
// called, which returns the highest sample.
func peakHeap() func() uint64 {
	done := make(chan struct{})
	res := make(chan uint64)
	go func() {
		sample := []rtmetrics.Sample{{Name: "/memory/classes/heap/objects:bytes"}}
		var peak uint64
		t := time.NewTicker(10 * time.Millisecond)
		defer t.Stop()
		for {
			rtmetrics.Read(sample)
			peak = max(peak, sample[0].Value.Uint64())
			select {
			case <-done:
				res <- peak
				return
			case <-t.C:
			}
		}
	}()
	return func() uint64 { close(done); return <-res }
}
