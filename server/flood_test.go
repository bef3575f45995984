package server

import (
	"context"
	"net"
	"net/netip"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/policy"
	"github.com/pcpd/pcpd/server/servertest"
)

// TestPKT08FloodIsolation: through real sockets, a client flooding at full
// speed is throttled to its token bucket while another client keeps being
// answered (PKT-08). Latencies are logged, not asserted: the machine is
// shared.
func TestPKT08FloodIsolation(t *testing.T) {
	ns := netlab.NewNS(t, "flood")
	srvAddr := netip.MustParseAddr("2001:db8::1")
	a, b := addrA, addrB
	for _, x := range []netip.Addr{srvAddr, a, b} {
		ns.MustRun(t, "ip", "addr", "add", x.String()+"/128", "dev", "lo")
	}
	h, err := ns.Handle()
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	own, _ := policy.NewStatic(map[string][]netip.Prefix{
		"a": {netip.MustParsePrefix("2001:db8:a::/48")}, "b": {netip.MustParsePrefix("2001:db8:b::/48")},
	})
	pol, _ := policy.New(policy.Config{}, own)
	fw, st := servertest.NewFirewall(time.Now), servertest.NewStore()
	s, err := New(Config{Interfaces: []string{"lo"}, Listen: []netip.AddrPort{netip.AddrPortFrom(srvAddr, 0)}, NetNS: h,
		RateLimit: 100, RateBurst: 100, KeepConnections: true},
		Deps{Firewall: fw, Store: st, State: st.State(), Policy: pol}, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx) }()
	defer func() { cancel(); <-done }()
	if err := netlab.Eventually(3*time.Second, func() error {
		if len(s.Status().Listen) == 0 {
			return context.DeadlineExceeded
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	dial := func(src netip.Addr) *net.UDPConn {
		var c *net.UDPConn
		if err := ns.Do(func() (err error) {
			c, err = net.DialUDP("udp6", &net.UDPAddr{IP: src.AsSlice()}, net.UDPAddrFromAddrPort(netip.AddrPortFrom(srvAddr, Port)))
			return err
		}); err != nil {
			t.Fatal(err)
		}
		return c
	}
	// rtts measures n sequential ANNOUNCE round trips from c.
	rtts := func(c *net.UDPConn, src netip.Addr, n int) (lat []time.Duration, lost int) {
		req := pcp.AppendRequest(nil, pcp.NewAnnounce(src))
		buf := make([]byte, 64)
		for range n {
			// Like a real client, retransmit after 250 ms (StartOS does);
			// lost means unanswered after 3 tries.
			start := time.Now()
			ok := false
			for try := 0; try < 3 && !ok; try++ {
				c.Write(req)
				c.SetReadDeadline(time.Now().Add(250 * time.Millisecond))
				_, err := c.Read(buf)
				ok = err == nil
			}
			if !ok {
				lost++
				continue
			}
			lat = append(lat, time.Since(start))
			time.Sleep(5 * time.Millisecond) // a well-behaved client: 200/s at most
		}
		slices.Sort(lat)
		return lat, lost
	}
	p99 := func(l []time.Duration) time.Duration {
		if len(l) == 0 {
			return 0
		}
		return l[len(l)*99/100]
	}
	cb := dial(b)
	defer cb.Close()
	idle, lost := rtts(cb, b, 50)
	if lost > 0 {
		t.Fatalf("idle: %d lost", lost)
	}

	ca := dial(a)
	defer ca.Close()
	var sent, answered atomic.Int64
	stop := make(chan struct{})
	go func() {
		buf := make([]byte, 64)
		for {
			ca.SetReadDeadline(time.Now().Add(time.Second))
			if _, err := ca.Read(buf); err == nil {
				answered.Add(1)
			} else {
				select {
				case <-stop:
					return
				default:
				}
			}
		}
	}()
	go func() {
		req := pcp.AppendRequest(nil, pcp.NewAnnounce(a))
		for {
			select {
			case <-stop:
				return
			default:
			}
			ca.Write(req)
			sent.Add(1)
		}
	}()
	time.Sleep(200 * time.Millisecond)
	start := time.Now()
	flood, lost := rtts(cb, b, 100)
	elapsed := time.Since(start)
	close(stop)
	time.Sleep(100 * time.Millisecond)
	t.Logf("B idle p99 %v, under flood p99 %v (lost %d); A sent %d, answered %d in %v",
		p99(idle), p99(flood), lost, sent.Load(), answered.Load(), elapsed+200*time.Millisecond)
	if lost > 0 {
		t.Fatalf("B lost %d of 100 requests under A's flood", lost)
	}
	// A's budget: burst 100 + 100/s.
	if max := 100 + int64(100*(elapsed+300*time.Millisecond).Seconds()) + 10; answered.Load() > max {
		t.Fatalf("flooder answered %d times, budget %d", answered.Load(), max)
	}
}
