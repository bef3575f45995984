package server

import (
	"net"
	"net/netip"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/pcpd/pcpd/store"
)

// TestConntrackFlushCoalesced (PMP-12, LIFE-05): flushes queued while a
// conntrack walk runs share the next walk, at most one walk is in flight,
// and a batch's replies are released only after a walk that covered its
// filters.
func TestConntrackFlushCoalesced(t *testing.T) {
	release := make(chan struct{})
	started := make(chan struct{}, 10)
	var mu sync.Mutex
	var walks [][]ctFilter
	inFlight, maxInFlight := 0, 0
	c := &ctFlusher{walk: func(fs []ctFilter) ([]ctFilter, error) {
		mu.Lock()
		walks = append(walks, fs)
		inFlight++
		maxInFlight = max(maxInFlight, inFlight)
		mu.Unlock()
		started <- struct{}{}
		<-release
		mu.Lock()
		inFlight--
		mu.Unlock()
		return nil, nil
	}}
	var order []int
	var omu sync.Mutex
	done := make(chan int, 10)
	for i := range 10 {
		c.add([]ctFilter{{v4: i%2 == 0}})
		c.after(c.seq(), func() {
			omu.Lock()
			order = append(order, i)
			omu.Unlock()
			done <- i
		})
		if i == 0 {
			<-started
		}
	}
	select {
	case i := <-done:
		t.Fatalf("batch %d released before its walk ended", i)
	case <-time.After(50 * time.Millisecond):
	}
	close(release)
	for range 10 {
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Fatal("not every batch released")
		}
	}
	mu.Lock()
	defer mu.Unlock()
	// The first batch's walk started alone; the nine queued meanwhile
	// went in one more.
	if len(walks) != 2 || len(walks[0]) != 1 || len(walks[1]) != 9 || maxInFlight != 1 {
		t.Fatalf("walks of %v filters (at most %d in flight), want [1 9] one at a time", lens(walks), maxInFlight)
	}
	if n := len(order); n != 10 || order[0] != 0 {
		t.Fatalf("release order %v", order)
	}
	// Nothing queued: released at once.
	ran := false
	c.after(c.seq(), func() { ran = true })
	if !ran {
		t.Fatal("nothing pending, yet not released at once")
	}
}

func lens(w [][]ctFilter) []int {
	out := make([]int, len(w))
	for i := range w {
		out[i] = len(w[i])
	}
	return out
}

// TestCtFiltersOf: which flows an ended lease's flush covers
// (appendCtFilters): inbound to the external endpoint for MAP and NAT-PMP;
// for IPv4 NAPT also the outbound flows SNAT-ed to it, from the mapped
// internal endpoint only (the generic walk's natFlowFilter); for a PEER
// the inbound one only (issue 9; before, none), no SNAT filter for IPv6.
func TestCtFiltersOf(t *testing.T) {
	in4, ext4 := netip.MustParseAddr("10.0.0.2"), netip.MustParseAddr("198.51.100.1")
	in6 := netip.MustParseAddr("2001:db8::2")
	remote := netip.MustParseAddr("198.51.100.2")
	lease := func(kind store.Kind, in, ext netip.Addr) store.Lease {
		return store.Lease{Key: store.Key{Protocol: protoTCP, InternalAddr: in, InternalPort: 8080}, Kind: kind, ExternalAddr: ext, ExternalPort: 18080}
	}
	for _, c := range []struct {
		name    string
		l       store.Lease
		filters int
		nat     bool
	}{
		{"NAT-PMP", lease(store.KindNATPMP, in4, ext4), 2, true},
		{"MAP IPv4", lease(store.KindMap, in4, ext4), 2, true},
		{"MAP IPv6", lease(store.KindMap, in6, in6), 1, false},
		{"PEER IPv4", lease(store.KindPeer, in4, ext4), 1, false},
		{"PEER IPv6", lease(store.KindPeer, in6, in6), 1, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			fs := appendCtFilters(nil, &c.l)
			if len(fs) != c.filters {
				t.Fatalf("%d filters, want %d: %+v", len(fs), c.filters, fs)
			}
			if !c.nat {
				return
			}
			nf := fs[1].netlinkFilter()
			flow := func(src netip.Addr, sport uint16, natTo netip.Addr, nport uint16) *netlink.ConntrackFlow {
				f := &netlink.ConntrackFlow{}
				f.Forward = netlink.IPTuple{Protocol: protoTCP, SrcIP: net.IP(src.AsSlice()), SrcPort: sport, DstIP: net.IP(remote.AsSlice()), DstPort: 7000}
				f.Reverse = netlink.IPTuple{Protocol: protoTCP, SrcIP: net.IP(remote.AsSlice()), SrcPort: 7000, DstIP: net.IP(natTo.AsSlice()), DstPort: nport}
				return f
			}
			for _, m := range []struct {
				name string
				f    *netlink.ConntrackFlow
				want bool
			}{
				{"SNAT-ed from the mapped port", flow(in4, 8080, ext4, 18080), true},
				{"another port masqueraded", flow(in4, 8081, ext4, 8081), false},
				{"another client on the external port", flow(netip.MustParseAddr("10.0.0.3"), 8080, ext4, 18080), false},
				{"not NAT-ed", flow(in4, 8080, in4, 8080), false},
			} {
				if got := nf.MatchConntrackFlow(m.f); got != m.want {
					t.Errorf("%s: match %v, want %v", m.name, got, m.want)
				}
			}
		})
	}
}

// TestCtFlushRetried: a walk that could not end every flow (its dump
// failed: EBUSY, ENOMEM, an interrupted dump...) hands back the filters
// it left; they stay pending and are walked again, with a backoff, until
// a walk ends them, and each failure is reported. Waiters (held replies)
// wait through the first ctHoldAttempts walks, then go; the retries go on.
// A filter queued during a backoff is walked at once, with those left.
// Before, a failed dump was logged at debug level and its filters
// dropped: the flows lasted until their conntrack timeout.
func TestCtFlushRetried(t *testing.T) {
	a, b := ctFilter{t: ctTarget{port: 1}}, ctFilter{t: ctTarget{port: 2}}
	for _, c := range []struct {
		name       string
		failures   int           // walks failing before one succeeds
		backoff    time.Duration // the first one (retryFirst and retryMax)
		releasedAt int           // the walk after which the waiter went
	}{
		{"one failure", 1, time.Millisecond, 2},
		{"failures past the hold", 5, time.Millisecond, ctHoldAttempts},
		{"a queued filter cuts the backoff", 1, time.Hour, 2},
	} {
		t.Run(c.name, func(t *testing.T) {
			var mu sync.Mutex
			var walks [][]ctFilter
			var reports []int
			walked := make(chan int, 100)
			released := make(chan int, 1)
			fl := &ctFlusher{retryFirst: c.backoff, retryMax: c.backoff,
				walk: func(fs []ctFilter) ([]ctFilter, error) {
					mu.Lock()
					defer mu.Unlock()
					walks = append(walks, slices.Clone(fs))
					walked <- len(walks)
					if len(walks) <= c.failures {
						return fs, unix.EBUSY
					}
					return nil, nil
				},
				report: func(attempt, left int, err error) {
					mu.Lock()
					reports = append(reports, attempt)
					mu.Unlock()
				},
			}
			fl.add([]ctFilter{a})
			fl.after(fl.seq(), func() {
				mu.Lock()
				released <- len(walks)
				mu.Unlock()
			})
			if c.backoff == time.Hour {
				<-walked // failed; now in its backoff
				fl.add([]ctFilter{b})
			}
			select {
			case n := <-released:
				if n != c.releasedAt {
					t.Errorf("waiter released after walk %d, want %d", n, c.releasedAt)
				}
			case <-time.After(5 * time.Second):
				t.Fatal("waiter never released")
			}
			waitFor(t, func() bool {
				mu.Lock()
				defer mu.Unlock()
				return len(walks) == c.failures+1 && len(reports) == c.failures+1
			})
			time.Sleep(10 * time.Millisecond) // no walk after the success
			mu.Lock()
			defer mu.Unlock()
			if len(walks) != c.failures+1 {
				t.Fatalf("%d walks, want %d", len(walks), c.failures+1)
			}
			for i, w := range walks {
				if !slices.Contains(w, a) {
					t.Errorf("walk %d: %v, the failed filter not walked again", i+1, w)
				}
			}
			if c.backoff == time.Hour && !slices.Contains(walks[1], b) {
				t.Errorf("retry %v without the filter queued during its backoff", walks[1])
			}
			want := []int{}
			for i := range c.failures {
				want = append(want, i+1)
			}
			if want = append(want, 0); !slices.Equal(reports, want) {
				t.Errorf("reports %v, want %v", reports, want)
			}
		})
	}
}
