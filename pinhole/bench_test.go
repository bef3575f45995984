package pinhole_test

import (
	"fmt"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// benchPinhole is the i-th of many distinct plain IPv6 pinholes.
func benchPinhole(i int) pinhole.Pinhole {
	a := netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 2, 0, 0, 0, 0, byte(i >> 24), byte(i >> 16), byte(i >> 8), byte(i)})
	return pinhole.Pinhole{Protocol: tcp, InternalAddr: a, InternalPort: 443}
}

// lastingBackend is a Backend on a lasting netlink connection (one socket
// for all calls), as a daemon would hold it.
func lastingBackend(b testing.TB, ns *netlab.NS) *pinhole.Backend {
	b.Helper()
	conn, _ := ns.LastingNftConn(b)
	be, err := pinhole.New(conn, pinhole.Config{})
	if err != nil {
		b.Fatal(err)
	}
	if err := be.Setup(); err != nil {
		b.Fatal(err)
	}
	return be
}

// prefill installs n pinholes in chunks.
func prefill(b testing.TB, be *pinhole.Backend, n int) {
	b.Helper()
	const chunk = pinhole.MaxBatch
	for start := 0; start < n; start += chunk {
		var ops []pinhole.Op
		for i := start; i < min(n, start+chunk); i++ {
			ops = append(ops, install(benchPinhole(i), time.Hour))
		}
		if err := be.Apply(ops); err != nil {
			b.Fatalf("prefill at %d: %v", start, err)
		}
	}
}

// BenchmarkApply measures kernel operations per second: batches of Refresh
// (the steady-state op; in the kernel two in-place adds) on
// pinholes beside 0, 10 000 and 100 000 others already in the set, plus
// Install+Delete pairs of pinholes that were not there.
//
//	go test ./pinhole -run '^$' -bench Apply -benchtime 2s
func BenchmarkApply(b *testing.B) {
	netlab.RequireRoot(b)
	for _, present := range []int{0, 10_000, 100_000} {
		ns := netlab.NewNS(b, "bench")
		be := lastingBackend(b, ns)
		prefill(b, be, present)
		for _, batch := range []int{1, 32, 256} {
			b.Run(fmt.Sprintf("present=%d/batch=%d/refresh", present, batch), func(b *testing.B) {
				// Refresh targets: the present pinholes, or (present=0) a
				// batch of our own installed first.
				base := 0
				if present == 0 {
					base = 1 << 30
					var ops []pinhole.Op
					for i := range batch {
						ops = append(ops, install(benchPinhole(base+i), time.Hour))
					}
					apply(b, be, ops...)
				}
				pool := max(present, batch)
				ops := make([]pinhole.Op, batch)
				next := 0
				b.ResetTimer()
				for b.Loop() {
					for j := range ops {
						ops[j] = pinhole.Op{Kind: pinhole.Refresh, Pinhole: benchPinhole(base + next%pool), Timeout: time.Hour}
						next++
					}
					if err := be.Apply(ops); err != nil {
						b.Fatal(err)
					}
				}
				b.ReportMetric(float64(b.N*batch)/b.Elapsed().Seconds(), "ops/s")
			})
			b.Run(fmt.Sprintf("present=%d/batch=%d/install+delete", present, batch), func(b *testing.B) {
				ins := make([]pinhole.Op, batch)
				dels := make([]pinhole.Op, batch)
				for j := range batch {
					p := benchPinhole(1<<31 + j)
					ins[j], dels[j] = install(p, time.Hour), del(p)
				}
				b.ResetTimer()
				for b.Loop() {
					if err := be.Apply(ins); err != nil {
						b.Fatal(err)
					}
					if err := be.Apply(dels); err != nil {
						b.Fatal(err)
					}
				}
				b.ReportMetric(float64(2*b.N*batch)/b.Elapsed().Seconds(), "ops/s")
			})
		}
		b.Run(fmt.Sprintf("present=%d/list", present), func(b *testing.B) {
			for b.Loop() {
				if _, err := be.List(); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkHealthyOwners: what the tamper check (Healthy, every 5 s in
// pcpd) costs with many owners: one GetRules per owner chain, and since
// RELIABILITY.md known bug 4 a dump of both owner maps, compared with
// what SetOwners gave; "owners" is that dump alone (Owners reads the same
// two maps).
//
//	go test ./pinhole -run '^$' -bench HealthyOwners
func BenchmarkHealthyOwners(b *testing.B) {
	netlab.RequireRoot(b)
	for _, n := range []int{60, 1000} {
		ns := netlab.NewNS(b, "bench")
		conn, _ := ns.LastingNftConn(b)
		be, err := pinhole.New(conn, pinhole.Config{Meter: pinhole.Meter{Rate: 200}})
		if err != nil {
			b.Fatal(err)
		}
		if err := be.Setup(); err != nil {
			b.Fatal(err)
		}
		// n peers, each a /64 and an IPv4 /32, and a hole every tenth.
		var owners []pinhole.Owner
		var holes []netip.Prefix
		for i := range n {
			p6 := netip.PrefixFrom(netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0, 1, byte(i >> 8), byte(i)}), 64)
			p4 := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 1, byte(i >> 8), byte(i)}), 32)
			owners = append(owners, pinhole.Owner{ID: fmt.Sprintf("wg:peer%d", i), Prefixes: []netip.Prefix{p6, p4}})
			if i%10 == 0 {
				holes = append(holes, netip.PrefixFrom(p6.Addr(), 80))
			}
		}
		if err := be.SetOwners(owners, holes); err != nil {
			b.Fatal(err)
		}
		b.Run(fmt.Sprintf("owners=%d/healthy", n), func(b *testing.B) {
			for b.Loop() {
				if err := be.Healthy(); err != nil {
					b.Fatal(err)
				}
			}
		})
		// What Healthy costs the rest of pcpd: an Apply of one pinhole
		// (a new mapping) while Healthy runs back to back in another
		// goroutine, as checkFirewall's does beside the engine. Healthy
		// held the Backend's lock for all of its reads, so an Apply
		// waited for up to one whole Healthy (RELIABILITY.md bug 4, N3).
		b.Run(fmt.Sprintf("owners=%d/apply-during-healthy", n), func(b *testing.B) {
			stop := make(chan struct{})
			done := make(chan error, 1)
			go func() {
				for {
					select {
					case <-stop:
						done <- nil
						return
					default:
					}
					if err := be.Healthy(); err != nil {
						done <- err
						return
					}
				}
			}()
			var lat []time.Duration
			i := 0
			for b.Loop() {
				t0 := time.Now()
				if err := be.Apply([]pinhole.Op{{Kind: pinhole.Install, Pinhole: benchPinhole(i), Timeout: time.Minute}}); err != nil {
					b.Fatal(err)
				}
				lat = append(lat, time.Since(t0))
				i++
				time.Sleep(time.Millisecond) // not back to back: Healthy gets the lock between
			}
			close(stop)
			if err := <-done; err != nil {
				b.Fatal(err)
			}
			slices.Sort(lat)
			b.ReportMetric(float64(lat[len(lat)/2].Microseconds())/1000, "p50-ms")
			b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds())/1000, "p99-ms")
			b.ReportMetric(float64(lat[len(lat)-1].Microseconds())/1000, "max-ms")
		})
		b.Run(fmt.Sprintf("owners=%d/owners", n), func(b *testing.B) {
			for b.Loop() {
				if _, err := be.Owners(); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
