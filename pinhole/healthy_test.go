package pinhole_test

import (
	"fmt"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// TestHealthyDuringWrites: Healthy reads the kernel without the Backend's
// lock (RELIABILITY.md bug 4, review N3), so SetOwners, SetProtected and
// Setup run while it reads; a write in progress must not be reported as
// damage (the server would answer it with a repair, or a full Setup and a
// re-install of every lease). And Apply goes on meanwhile.
func TestHealthyDuringWrites(t *testing.T) {
	ns := netlab.NewNS(t, "hwrite")
	b := newBackend(t, ns, pinhole.Config{Meter: pinhole.Meter{Rate: 200}})
	mk := func(base, n int) ([]pinhole.Owner, []netip.Prefix) {
		var owners []pinhole.Owner
		var pfx []netip.Prefix
		for i := range n {
			j := base + 2*i
			p6 := netip.PrefixFrom(netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0, 1, byte(j >> 8), byte(j)}), 64)
			p4 := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 1, byte(j >> 8), byte(j)}), 32)
			owners = append(owners, pinhole.Owner{ID: fmt.Sprintf("wg:peer%d", j), Prefixes: []netip.Prefix{p6, p4}})
			pfx = append(pfx, p6, p4)
		}
		return owners, pfx
	}
	o1, p1 := mk(0, 150)
	o2, p2 := mk(1, 150)
	if err := b.SetProtected(p1); err != nil {
		t.Fatal(err)
	}
	if err := b.SetOwners(o1, nil); err != nil {
		t.Fatal(err)
	}
	var stop atomic.Bool
	done := make(chan []error)
	go func() {
		var errs []error
		for n := 0; !stop.Load(); n++ {
			if err := b.Healthy(); err != nil {
				errs = append(errs, fmt.Errorf("Healthy %d: %w", n, err))
			}
		}
		done <- errs
	}()
	deadline := time.Now().Add(3 * time.Second)
	for i := 0; time.Now().Before(deadline); i++ {
		o, p := o1, p1
		if i%2 == 1 {
			o, p = o2, p2
		}
		if err := b.SetProtected(p); err != nil {
			t.Fatal(err)
		}
		if err := b.SetOwners(o, nil); err != nil {
			t.Fatal(err)
		}
		if i%5 == 4 {
			if err := b.Setup(); err != nil {
				t.Fatal(err)
			}
		}
		apply(t, b, install(benchPinhole(i), time.Minute))
	}
	stop.Store(true)
	for _, err := range <-done {
		t.Error(err)
	}
	if err := b.Healthy(); err != nil {
		t.Errorf("Healthy after the writes: %v", err)
	}
}
