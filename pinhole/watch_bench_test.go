package pinhole_test

import (
	"context"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// BenchmarkApplyWatched is the kernel's cost of the firewall watch to
// pcpd's own writes: with a watcher subscribed, nf_tables builds a
// notification for every element a transaction adds or deletes (without
// a listener it builds none), which the watcher's socket filter then
// drops. Each op is a batch of 32 new pinholes installed, then a batch
// deleting them (as a new MAP's and a delete's transactions), beside
// 10 000 others; the same Backend with and without a watcher, in turns
// (three rounds, the order alternating); and, to show what the socket
// filter saves, with the own-port filter off (every own delete decoded).
//
//	go test ./pinhole -run '^$' -bench ApplyWatched -count 2
func BenchmarkApplyWatched(b *testing.B) {
	netlab.RequireRoot(b)
	ns := netlab.NewNS(b, "benchw")
	be := lastingBackend(b, ns)
	defer be.Close()
	prefill(b, be, 10_000)
	const batch = 32
	run := func(b *testing.B) {
		next := 1 << 20
		ins := make([]pinhole.Op, batch)
		dels := make([]pinhole.Op, batch)
		b.ResetTimer()
		for b.Loop() {
			for i := range batch {
				p := benchPinhole(next + i)
				ins[i], dels[i] = install(p, time.Hour), del(p)
			}
			next += batch
			if err := be.Apply(ins); err != nil {
				b.Fatal(err)
			}
			if err := be.Apply(dels); err != nil {
				b.Fatal(err)
			}
		}
		b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*2*batch), "ns/element-op")
	}
	watched := func(filter bool) func(b *testing.B) {
		return func(b *testing.B) {
			defer pinhole.SetWatchOwnPorts(pinhole.SetWatchOwnPorts(filter))
			receives, restore := pinhole.CountWatchReceives()
			defer restore()
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan struct{})
			told := 0
			go func() {
				defer close(done)
				_ = be.Watch(ctx, func(pinhole.WatchEvent) { told++ })
			}()
			time.Sleep(50 * time.Millisecond) // subscribed
			run(b)
			cancel()
			<-done
			b.ReportMetric(float64(receives.Load())/float64(b.N), "receives/op")
			if filter && told != 0 {
				b.Fatalf("the watcher was told of %d of pcpd's own writes", told)
			}
		}
	}
	on, nofilter := watched(true), watched(false)
	for r := range 3 { // in turns, the order alternating
		if r%2 == 0 {
			b.Run(fmt.Sprintf("r%d/watch=off", r), run)
			b.Run(fmt.Sprintf("r%d/watch=on", r), on)
			b.Run(fmt.Sprintf("r%d/watch=on,own-ports-unfiltered", r), nofilter)
		} else {
			b.Run(fmt.Sprintf("r%d/watch=on,own-ports-unfiltered", r), nofilter)
			b.Run(fmt.Sprintf("r%d/watch=on", r), on)
			b.Run(fmt.Sprintf("r%d/watch=off", r), run)
		}
	}
}

// BenchmarkWatchForeignAdds is what someone else's single-element adds
// cost the watcher since it tells adds (h/fwadd): each op is one element
// added by "nft add element" (a transaction and a socket of its own),
// to another table's set, then to pcpd's pin6 (ns/op is nft's fork). receives/add is the skbs that passed the socket filter
// (a wakeup and a judge each), told/add the events. The packet path's set
// updates (dynset, meters) notify nothing, and pcpd's own writes are
// dropped by their port (BenchmarkApplyWatched fails if one is told).
//
//	go test ./pinhole -run '^$' -bench WatchForeignAdds -benchtime 500x
func BenchmarkWatchForeignAdds(b *testing.B) {
	netlab.RequireRoot(b)
	ns := netlab.NewNS(b, "benchwa")
	be := lastingBackend(b, ns)
	defer be.Close()
	ns.MustRun(b, "nft", "add table inet other; add set inet other s { type ipv6_addr . inet_proto . inet_service; flags timeout; }")
	for _, table := range []string{"other", "pcpd"} {
		set := map[string]string{"other": "s", "pcpd": "pin6"}[table]
		b.Run("table="+table, func(b *testing.B) {
			receives, restore := pinhole.CountWatchReceives()
			defer restore()
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan struct{})
			var told atomic.Int64
			go func() {
				defer close(done)
				_ = be.Watch(ctx, func(ev pinhole.WatchEvent) { told.Add(int64(len(ev.Added))) })
			}()
			time.Sleep(50 * time.Millisecond) // subscribed
			n := 0
			for b.Loop() {
				// A new element each time (an identical re-add is not notified).
				foreignPort++
				ns.MustRun(b, "nft", "add", "element", "inet", table, set, fmt.Sprintf("{ 2001:db8::%x . tcp . %d timeout 1h }", 1+foreignPort/60000, 1+foreignPort%60000))
				n++
			}
			b.StopTimer()
			time.Sleep(200 * time.Millisecond) // the watcher drains its socket
			cancel()
			<-done
			b.ReportMetric(float64(receives.Load())/float64(n), "receives/add")
			b.ReportMetric(float64(told.Load())/float64(n), "told/add")
		})
	}
}

// foreignPort numbers BenchmarkWatchForeignAdds's elements across runs.
var foreignPort int
