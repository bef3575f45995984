package reliability

import (
	"context"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
)

// TestNAPTBesideAdminPortForwardAddedWhileAllocating (h/nftgen): pcpd
// reads the host's other DNAT rules only when another process committed
// to nftables (or a set it looked into changed) since its last read; its
// own transactions, one or two per mapping, do not count. Here a client
// maps and deletes NAT-PMP mappings without pause (pcpd commits all the
// while, its background read of the host's ports runs every 2 s) when the
// admin adds a port forward of public TCP 40500: pcpd logs the read that
// reserves it (the figure: how long after the nft command; the design's
// bound is the background period, 2 s + 0.5 s slack), after which a MAP
// suggesting 40500 gets another port and with PREFER_FAILURE
// CANNOT_PROVIDE_EXTERNAL, and the forward still reaches the admin's
// host. Before (a skip that did not hear others' commits, the check
// mutated to ignore its notifications): "no read of the host's DNAT rules
// reserved 40500 within 10s of the admin's rule".
func TestNAPTBesideAdminPortForwardAddedWhileAllocating(t *testing.T) {
	l := newLab(t, labOptions{extra: []string{"--ipv4-port-range", "400-65535"}})
	pub := l.topo.HostPublicV4
	lanHost := netip.AddrPortFrom(netip.MustParseAddr("10.100.2.7"), 80)
	for _, cmd := range []string{
		"add table ip admin",
		"add chain ip admin pre { type nat hook prerouting priority dstnat; }",
		"add rule ip admin pre ip daddr " + pub.String() + " tcp dport 443 dnat to " + lanHost.String(),
	} {
		l.topo.Host.MustRun(t, "nft", cmd)
	}
	l.start()
	admin := acceptCounter(t, l.topo.Client, lanHost.String())

	// The churn: NAT-PMP map and delete, UDP 20000-20099 in turn.
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	var ok, failed atomic.Int64
	wg.Add(1)
	go func() {
		defer wg.Done()
		c := l.pcpClient(l.topo.ClientV4)
		for i := 0; ctx.Err() == nil; i++ {
			port := uint16(20000 + i%100)
			for _, life := range []time.Duration{time.Minute, 0} {
				rctx, rcancel := context.WithTimeout(ctx, 3*time.Second)
				var r pcp.PMPResponse
				err := c.DoPMP(rctx, &pcp.PMPRequest{Opcode: pcp.PMPOpMapUDP, InternalPort: port, SuggestedExternalPort: port, Lifetime: life}, &r)
				rcancel()
				if err == nil && r.Result == pcp.PMPSuccess {
					ok.Add(1)
				} else if ctx.Err() == nil {
					failed.Add(1)
				}
			}
			time.Sleep(5 * time.Millisecond)
		}
	}()
	stop := func() { cancel(); wg.Wait() }
	defer stop()
	if _, up := waitFor(10*time.Second, func() bool { return ok.Load() >= 200 }); !up {
		t.Fatalf("the churn: %d answered SUCCESS, %d not, in 10s", ok.Load(), failed.Load())
	}

	const port = 40500
	off := l.log.len()
	before := ok.Load()
	l.topo.Host.MustRun(t, "nft", "add rule ip admin pre ip daddr "+pub.String()+" tcp dport 40500 dnat to "+lanHost.String())
	took, seen := waitFor(10*time.Second, func() bool {
		for _, line := range strings.Split(l.log.since(off), "\n") {
			if strings.Contains(line, "read the host's DNAT rules") && strings.Contains(line, "40500") {
				return true
			}
		}
		return false
	})
	during := ok.Load() - before
	if !seen {
		t.Fatalf("no read of the host's DNAT rules reserved %d within 10s of the admin's rule (%d mappings and deletes meanwhile); log:\n%s", port, during, l.log.since(off))
	}
	stop()
	c := l.pcpClient(l.topo.ClientV4)
	svc := acceptCounter(t, l.topo.Client, netip.AddrPortFrom(l.topo.ClientV4, port).String())
	got := l.mustMapTo(c, l.topo.ClientV4, pcp.ProtoTCP, port, port, time.Hour).Map.ExternalPort
	if got == port {
		t.Fatalf("the client was granted %d, which the admin forwards since %v", got, took)
	}
	pf := pcp.NewMap(l.topo.ClientV4, pcp.ProtoTCP, port+1, time.Hour)
	pf.Map.ExternalPort, pf.Options.PreferFailure = port, true
	if r, err := do(c, pf); err != nil || r.Result != pcp.CannotProvideExternal {
		t.Fatalf("MAP + PREFER_FAILURE suggesting the forwarded %d: %v, %v", port, r, err)
	}
	if err := l.topo.Internet.DialTCP(netip.AddrPortFrom(pub, port).String(), time.Second); err != nil || admin.Load() != 1 {
		t.Fatalf("the admin's forward of %d: %v, its host accepted %d (want 1)", port, err, admin.Load())
	}
	if err := l.topo.Internet.DialTCP(netip.AddrPortFrom(pub, got).String(), time.Second); err != nil || svc.Load() != 1 {
		t.Fatalf("the client's mapping %d -> %d: %v, its service accepted %d", got, port, err, svc.Load())
	}
	t.Logf("the admin's rule reserved in pcpd's log %v after the nft command, %d NAT-PMP maps and deletes answered meanwhile (%d in all, %d not SUCCESS); MAP suggesting %d granted %d",
		took.Round(10*time.Millisecond), during, ok.Load(), failed.Load(), port, got)
}
