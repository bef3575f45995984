package pinhole_test

import (
	"context"
	"fmt"
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
