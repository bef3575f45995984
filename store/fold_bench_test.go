package store

import (
	"fmt"
	"net/netip"
	"runtime"
	"syscall"
	"testing"
	"time"
)

// spreadClients is how many client addresses the spread benchmarks use:
// bench/driver's 4 096, each with its own leases, so that new leases land
// between the old ones all over the key space, as a run of new MAPs from
// many clients does (leaseN's keys, ordered by n, append at the end).
const spreadClients = 4096

// spreadLease is lease n of the spread layout: client n % spreadClients,
// port base + n / spreadClients, one owner (bench/driver's "load").
func spreadLease(n, base int) Lease {
	c := n % spreadClients
	a := netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0, 1, 0x40, 0, 0, 0, 0, 0, 0, 0, byte(c >> 8), byte(c)})
	port := uint16(base + n/spreadClients)
	return Lease{
		Key:          Key{Owner: "load", Protocol: 17, InternalAddr: a, InternalPort: port},
		Kind:         KindMap,
		Nonce:        [12]byte{byte(n), byte(n >> 8), byte(n >> 16)},
		ExternalAddr: a,
		ExternalPort: port,
		ClientAddr:   netip.AddrPortFrom(a, 5350),
		ServerAddr:   netip.MustParseAddrPort("[2001:db8:1:2::1]:5351"),
		Created:      t0,
		Expires:      t0.Add(time.Duration(n%3600+120) * time.Second),
	}
}

func spreadLeases(from, to, base int) []Lease {
	ls := make([]Lease, 0, to-from)
	for i := from; i < to; i++ {
		ls = append(ls, spreadLease(i, base))
	}
	return ls
}

// spreadDir is a closed state directory holding n spread leases (port
// base 1024), built once per process.
func spreadDir(b *testing.B, n int) string {
	return cachedStateDir(b, fmt.Sprintf("spread/%d", n), n, func(from, to int) []Lease { return spreadLeases(from, to, 1024) })
}

func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkCheckpointSpread: the fold of a log of `leases` new leases
// (committed 32 at a time, as the engine's batches do; 130 000 are about
// one 16 MiB segment) into a state file of `have` leases, with the new
// keys between the old ones (spreadLease): what bench/driver's new-MAP row
// at 100 000 leases leaves to the background, against the same at 0.
// Reported per new lease: wall time, process CPU (the fold's goroutine,
// the collections it causes and the store's syncs), collections.
func BenchmarkCheckpointSpread(b *testing.B) {
	for _, c := range []struct{ have, leases int }{{0, 130_000}, {100_000, 130_000}, {200_000, 130_000}} {
		b.Run(fmt.Sprintf("have=%d/leases=%d", c.have, c.leases), func(b *testing.B) {
			var cpu time.Duration
			var gcs uint32
			for b.Loop() {
				b.StopTimer()
				var src string
				if c.have > 0 {
					src = spreadDir(b, c.have)
				}
				s := openFoldCopy(b, src)
				for i := 0; i < c.leases; i += 32 {
					if err := s.Commit(spreadLeases(i, min(i+32, c.leases), 30000), nil); err != nil {
						b.Fatal(err)
					}
				}
				runtime.GC()
				var ms runtime.MemStats
				runtime.ReadMemStats(&ms)
				gc0, cpu0 := ms.NumGC, cpuTime()
				b.StartTimer()
				if err := s.checkpoint(ckAll); err != nil {
					b.Fatal(err)
				}
				b.StopTimer()
				cpu += cpuTime() - cpu0
				runtime.ReadMemStats(&ms)
				gcs += ms.NumGC - gc0
				if err := s.Close(); err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
			}
			n := float64(b.N * c.leases)
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/n, "ns/lease")
			b.ReportMetric(float64(cpu.Nanoseconds())/n, "cpu-ns/lease")
			b.ReportMetric(float64(gcs)/float64(b.N), "gcs/op")
		})
	}
}
