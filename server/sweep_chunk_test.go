package server

import (
	"context"
	"net"
	"net/netip"
	"sync/atomic"
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

// sweepLeases are leases of static:gone (its addresses in static:a's
// prefix once it is lost: sweepServeWith) and of static:a, stored in st.
func sweepLeases(t *testing.T, st *servertest.Store, unowned, owned int) {
	t.Helper()
	now := time.Now()
	srv := netip.MustParseAddrPort("[2001:db8::1]:5351")
	var ls []store.Lease
	for i := range unowned + owned {
		owner, sub := "static:gone", byte(1)
		if i >= unowned {
			owner, sub = "static:a", 2
		}
		a := netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0, 0xa, 0, 0, 0, sub, 0, 0, 0, byte(i >> 16), byte(i >> 8), byte(i)})
		ls = append(ls, store.Lease{
			Key:          store.Key{Owner: owner, Protocol: 6, InternalAddr: a, InternalPort: 443},
			ExternalAddr: a, ExternalPort: 443, ClientAddr: netip.AddrPortFrom(a, 5350), ServerAddr: srv,
			Created: now, Expires: now.Add(time.Hour), Kind: store.KindMap, Nonce: [12]byte{byte(i)},
		})
	}
	if err := st.Commit(ls, nil); err != nil {
		t.Fatal(err)
	}
}

// sweepServe serves, in a namespace of its own on its loopback, a
// server restored from unowned+owned leases (sweepLeases, the unowned
// ones lost after the start) on a fake
// firewall whose every transaction first calls hook, and returns a
// client socket from addrA, the firewall, the store and Serve's stop.
func sweepServe(t *testing.T, name string, unowned, owned int, hook func(s *Server, ops []pinhole.Op)) (*net.UDPConn, *Server, *servertest.Firewall, *servertest.Store, context.CancelFunc, chan error) {
	t.Helper()
	return sweepServeWith(t, name, unowned, owned, hook, nil)
}

// sweepServeWith is sweepServe with the server changed by tweak (nil:
// none) between New and Start.
func sweepServeWith(t *testing.T, name string, unowned, owned int, hook func(s *Server, ops []pinhole.Op), tweak func(*Server)) (*net.UDPConn, *Server, *servertest.Firewall, *servertest.Store, context.CancelFunc, chan error) {
	t.Helper()
	ns, nh, after := loopbackNS(t, name)
	// static:gone owns its leases' addresses when they are restored, and
	// loses them to static:a before Serve's sweep.
	own := &lossOwnership{after: after, before: &mutableOwnership{owners: map[policy.OwnerID][]netip.Prefix{
		"static:a":    {netip.MustParsePrefix("2001:db8:a::/48")},
		"static:gone": {netip.MustParsePrefix("2001:db8:a:0:1::/80")},
	}}}
	pol, err := policy.New(policy.Config{MaxLeasesPerClient: 1 << 20, MaxLeases: 1 << 21}, own)
	if err != nil {
		t.Fatal(err)
	}
	fw, st := servertest.NewFirewall(time.Now), servertest.NewStore()
	sweepLeases(t, st, unowned, owned)
	s, err := New(Config{Interfaces: []string{"lo"}, Listen: []netip.AddrPort{netip.AddrPortFrom(loopbackSrv, 0)}, NetNS: nh, loopbackLab: true,
		RateLimit: 1e6, RateBurst: 1e6, KeepConnections: true}, Deps{Firewall: fw, Store: st, State: st.State(), Policy: pol}, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	if tweak != nil {
		tweak(s)
	}
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	if got := len(fw.Holes()); got != unowned+owned {
		t.Fatalf("restored: %d pinholes, want %d", got, unowned+owned)
	}
	own.lost.Store(true)
	fw.FailApply = func(ops []pinhole.Op) error { hook(s, ops); return nil }
	c := dialLoopback(t, ns)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	return c, s, fw, st, cancel, done
}

// deletes counts the Delete ops of a transaction.
func deletes(ops []pinhole.Op) int {
	n := 0
	for _, op := range ops {
		if op.Kind == pinhole.Delete {
			n++
		}
	}
	return n
}

// TestSweepAnswersRequests (h/sweepchunk): Serve's ownership sweep at
// start over many restored leases no longer owned runs a step at a time
// between requests: a request sent while it runs (queued to the engine
// during its first kernel transaction) is answered before the sweep
// ends, pinholes of unowned leases still in the kernel. At the end every
// unowned lease is gone from the kernel and the store, every owned one
// kept.
//
// Fails before (the whole sweep one hold and one transaction, before
// Serve even listened): the reply came with 0 of 20 000 unowned pinholes
// left.
func TestSweepAnswersRequests(t *testing.T) {
	netlab.RequireRoot(t)
	const unowned, owned = 20000, 500
	var deleted atomic.Int64
	first := true
	c, _, fw, st, _, _ := sweepServe(t, "sweepchunk-ans", unowned, owned, func(s *Server, ops []pinhole.Op) {
		d := deletes(ops)
		if d == 0 {
			return
		}
		if first {
			first = false
			// Until the request is queued to the engine (bounded: before
			// the fix Serve did not listen yet).
			for deadline := time.Now().Add(10 * time.Second); len(s.in) == 0 && time.Now().Before(deadline); {
				time.Sleep(time.Millisecond)
			}
		}
		deleted.Add(int64(d))
	})
	// A MAP (the engine's; ANNOUNCE is answered by the listener).
	req := pcp.AppendRequest(nil, mapReq(addrA, pcp.ProtoTCP, 8080, 0, time.Hour, 1))
	buf := make([]byte, 1100)
	left := int64(-1)
	// Retransmitted (refused until Serve listens) for 30 s at most.
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		c.Write(req)
		c.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
		if n, err := c.Read(buf); err == nil && n >= 4 {
			left = unowned - deleted.Load()
			if buf[3] != 0 {
				t.Fatalf("reply % x", buf[:n])
			}
			break
		}
	}
	if left < 0 {
		t.Fatal("no reply")
	}
	t.Logf("answered with %d of %d unowned pinholes left", left, unowned)
	if left == 0 {
		t.Errorf("answered only after the whole sweep (0 of %d unowned pinholes left)", unowned)
	}
	if err := netlab.Eventually(60*time.Second, func() error {
		if len(st.Leases()) != owned+1 {
			return context.DeadlineExceeded
		}
		return nil
	}); err != nil {
		t.Fatalf("%d stored leases, want %d", len(st.Leases()), owned+1)
	}
	if holes := fw.Holes(); len(holes) != owned+1 {
		t.Errorf("%d pinholes, want the %d owned and the new one", len(holes), owned+1)
	}
	for k := range st.Leases() {
		if k.Owner != "static:a" {
			t.Fatalf("lease %v kept", k)
		}
	}
}

// TestSweepStops (h/sweepchunk): Serve's context ending (SIGTERM) while
// its sweep at start runs ends Serve between two steps: unowned pinholes
// are left (the next start sweeps them). Fails before: Serve looked at
// its context only after the whole sweep (0 of 20 000 left).
func TestSweepStops(t *testing.T) {
	netlab.RequireRoot(t)
	const unowned, owned = 20000, 10
	var deleted atomic.Int64
	var once atomic.Bool
	started, stopped := make(chan struct{}), make(chan struct{})
	_, _, _, st, stop, done := sweepServe(t, "sweepchunk-stop", unowned, owned, func(s *Server, ops []pinhole.Op) {
		if d := deletes(ops); d > 0 {
			deleted.Add(int64(d))
			if once.CompareAndSwap(false, true) {
				// SIGTERM during the sweep's first kernel transaction.
				close(started)
				<-stopped
			}
		}
	})
	<-started
	stop()
	close(stopped)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	done <- nil // for the cleanup
	left := unowned - deleted.Load()
	t.Logf("Serve returned with %d of %d unowned pinholes left, %d stored leases", left, unowned, len(st.Leases()))
	if left == 0 {
		t.Errorf("Serve returned only after the whole sweep")
	}
}

// TestSweepKeepsLeaseOwnedAgain (h/sweepchunk): a lease the full sweep
// found unowned at one step and that is owned again by the step ending it
// (the ownership changed back between two holds) is kept; the others
// found with it are ended.
func TestSweepKeepsLeaseOwnedAgain(t *testing.T) {
	h := newHarness(t)
	own := &mutableOwnership{owners: map[policy.OwnerID][]netip.Prefix{
		"wg:A": {netip.MustParsePrefix("2001:db8:a::/48")},
	}}
	h.own = own
	h.start()
	h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 443, 0, time.Hour, 1)), pcp.Success)
	h.expect(h.do(mapReq(addrA2, pcp.ProtoTCP, 443, 0, time.Hour, 1)), pcp.Success)
	own.mu.Lock()
	own.owners["wg:A"] = nil
	own.mu.Unlock()
	h.s.beginSweep()
	if !h.s.sweepMore() || len(h.s.full.keys) != 2 {
		t.Fatalf("the walk's step found %d unowned", len(h.s.full.keys))
	}
	own.mu.Lock()
	own.owners["wg:A"] = []netip.Prefix{netip.PrefixFrom(addrA, 128)}
	own.mu.Unlock()
	for h.s.sweepMore() {
	}
	if ls := h.s.Leases(); len(ls) != 1 || ls[0].InternalAddr != addrA || len(h.fw.Holes()) != 1 || len(h.st.Leases()) != 1 {
		t.Fatalf("after the sweep: %v, %d pinholes, %d stored", ls, len(h.fw.Holes()), len(h.st.Leases()))
	}
}
