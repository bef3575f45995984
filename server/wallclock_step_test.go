package server

import (
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/policy"
)

// steppedClock is the real clock with the wall time stepped by off, as
// after an NTP step of CLOCK_REALTIME (a box without an RTC that booted
// with its clock behind and synced later). Its monotonic clock (Mono),
// like the kernel's element timeouts, does not see the step.
type steppedClock struct {
	start time.Time
	off   atomic.Int64
}

func newSteppedClock() *steppedClock { return &steppedClock{start: time.Now()} }

func (c *steppedClock) Now() time.Time {
	return time.Now().Round(0).Add(time.Duration(c.off.Load()))
}

func (c *steppedClock) Mono() time.Duration { return time.Since(c.start) }

func (c *steppedClock) step(d time.Duration) { c.off.Add(int64(d)) }

// wallStepLab is a lab whose engine and store run on a steppedClock, with
// leases as short as one second, and a TCP service on the client's port
// 443.
func wallStepLab(t *testing.T) (*lab, *steppedClock, netip.AddrPort) {
	l := newLab(t, func(_ *Config, p *policy.Config) { p.MinLifetime = time.Second })
	clock := newSteppedClock()
	l.stop()
	l.now, l.mono = clock.Now, clock.Mono
	l.start()
	svc := netip.AddrPortFrom(l.topo.ClientV6, 443)
	l.topo.Client.ServeTCP(t, svc.String())
	return l, clock, svc
}

func (l *lab) kernelHas(svc netip.AddrPort) (time.Duration, bool) {
	for _, e := range l.kernelHoles() {
		if e.Pinhole.InternalAddr == svc.Addr() && e.Pinhole.InternalPort == svc.Port() {
			return e.Remaining, true
		}
	}
	return 0, false
}

// TestWallClockStepForwardKeepsPinholes: a lease granted for 600 s keeps
// its kernel pinhole for 600 s of real time when CLOCK_REALTIME steps 20
// minutes forward meanwhile. The client was promised 600 s (PCP lifetimes
// are durations), the kernel's own timeout has 600 s, and the epoch
// continues (a wall step never moves it), so the client has no reason to
// re-map before its renewal at half the lifetime. The engine's expiry
// compares wall times (the table keeps Unix nanoseconds), so on main it
// expires the lease at the step and deletes the element: the pinhole is
// shut for up to half the lifetime, with no ANNOUNCE and no epoch reset.
// (The engine now runs on the monotonic clock and moves its lease times
// with a step: server/clock.go.)
func TestWallClockStepForwardKeepsPinholes(t *testing.T) {
	l, clock, svc := wallStepLab(t)
	resp := l.pcp(mapReq(svc.Addr(), pcp.ProtoTCP, svc.Port(), 0, 600*time.Second, 1))
	if resp.Result != pcp.Success || resp.Lifetime != 600*time.Second {
		t.Fatalf("MAP: %+v", resp)
	}
	if !l.reach(svc) {
		t.Fatal("pinhole does not pass traffic after the MAP")
	}
	clock.step(20 * time.Minute)
	// The engine re-arms its expiry timer at every wake (sweep ticker
	// every 125 ms); give it well over that.
	time.Sleep(time.Second)
	left, ok := l.kernelHas(svc)
	if !ok {
		t.Errorf("kernel pinhole deleted ~1 s into a 600 s lease after a 20 min wall-clock step (leases listed: %d)", len(l.srv.Leases()))
	} else {
		t.Logf("kernel element: %v left", left)
	}
	if !l.reach(svc) {
		t.Error("traffic refused ~1 s into a 600 s lease after a 20 min wall-clock step")
	}
}

// TestWallClockStepBackAbsorbedRenewal: CLOCK_REALTIME steps 12 s back
// 1 s into a 20 s lease; the client renews (20 s) 13 s into it and is
// promised 20 s more, up to 33 s. The renewal looks absorbable (its
// expiry is later than the table's and the table's synced expiry seems
// 19 s away), so no kernel op is made: the absorb logic assumes the kernel
// holds the synced wall expiry, but the element was given a 20-s timeout
// on the kernel's monotonic clock and ends 20 s in. The flush comes only
// when the synced wall expiry is within flushLead (10 s), 22 s in: from
// 20 s to 22 s the client's promised pinhole is gone. With a step of hours
// and leases of hours, the gap runs until the client's next renewal
// (tens of minutes).
func TestWallClockStepBackAbsorbedRenewal(t *testing.T) {
	l, clock, svc := wallStepLab(t)
	// One client socket for both: a renewal from another port is written
	// through.
	laddr := netip.AddrPortFrom(svc.Addr(), 40000)
	mapping := func() pcp.Response {
		t.Helper()
		out, err := l.exchange(laddr, l.server6(), pcp.AppendRequest(nil, mapReq(svc.Addr(), pcp.ProtoTCP, svc.Port(), 0, 20*time.Second, 1)))
		if err != nil {
			t.Fatal(err)
		}
		var resp pcp.Response
		if err := pcp.ParseResponse(out, &resp); err != nil || resp.Result != pcp.Success || resp.Lifetime != 20*time.Second {
			t.Fatalf("MAP: %+v %v", resp, err)
		}
		return resp
	}
	start := time.Now()
	mapping()
	time.Sleep(time.Second)
	clock.step(-12 * time.Second)
	time.Sleep(time.Until(start.Add(13 * time.Second)))
	before := counterValue(t, l.srv.m.absorbed)
	resp := mapping()
	promised := time.Now().Add(resp.Lifetime)
	absorbed := counterValue(t, l.srv.m.absorbed) - before
	// 21 s in: past the first grant's kernel timeout, well before the
	// renewal's end.
	time.Sleep(time.Until(start.Add(21 * time.Second)))
	if time.Until(promised) < 5*time.Second {
		t.Fatalf("test too slow: only %v of the promised lifetime left", time.Until(promised))
	}
	_, ok := l.kernelHas(svc)
	reached := l.reach(svc)
	if !ok || !reached {
		t.Errorf("%v left of the renewed lease (renewal absorbed: %v): kernel element present %v, traffic passes %v",
			time.Until(promised).Round(100*time.Millisecond), absorbed, ok, reached)
	}
}

// TestWallClockStepForwardRestart: after a 20 min forward step of the
// wall clock and a restart of pcpd, a 600 s lease is still there with
// ≈ 600 s less the real time elapsed, in the table, the kernel and on the
// wire: the engine rewrote the stored expiry in the new wall base (the
// store's clock, like the restart's, is the stepped one). Without the
// rewrite the stored expiry is 20 min behind the clock at the restart and
// the lease is dropped as expired. Rows: the step noticed at a sweep tick
// (a second before the stop), and at Serve's return (the stop right
// after the step).
func TestWallClockStepForwardRestart(t *testing.T) {
	for _, tc := range []struct {
		name string
		wait time.Duration
	}{
		{"noticed-at-tick", time.Second},
		{"noticed-at-stop", 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l, clock, svc := wallStepLab(t)
			resp := l.pcp(mapReq(svc.Addr(), pcp.ProtoTCP, svc.Port(), 0, 600*time.Second, 1))
			if resp.Result != pcp.Success || resp.Lifetime != 600*time.Second {
				t.Fatalf("MAP: %+v", resp)
			}
			granted := time.Now()
			epoch := resp.Epoch
			clock.step(20 * time.Minute)
			time.Sleep(tc.wait)
			l.stop()
			l.start()
			elapsed := time.Since(granted)
			ls := l.srv.Leases()
			if len(ls) != 1 {
				t.Fatalf("%d leases after the step and a restart, want 1", len(ls))
			}
			// 600 s less what passed, to within a second either way
			// (Expires is from the engine's clock, the wall is now
			// stepped like it).
			left := ls[0].Expires.Sub(clock.Now())
			if want := 600*time.Second - elapsed; left < want-time.Second || left > want+time.Second {
				t.Errorf("lease has %v left after the restart, want ≈ %v", left.Round(time.Millisecond), want.Round(time.Millisecond))
			}
			if k, ok := l.kernelHas(svc); !ok || k < 590*time.Second {
				t.Errorf("kernel element after the restart: present %v, %v left; want ≈ 598 s", ok, k)
			}
			if !l.reach(svc) {
				t.Error("traffic refused after the step and a restart")
			}
			st := l.srv.Status()
			if !st.Restarted || st.Epoch < epoch || st.Epoch > epoch+pcp.Epoch(elapsed/time.Second)+2 {
				t.Errorf("epoch after the restart: %d (restarted %v), want it continued from %d, %v later", st.Epoch, st.Restarted, epoch, elapsed.Round(time.Second))
			}
		})
	}
}
