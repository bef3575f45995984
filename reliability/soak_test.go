package reliability

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pcpd/pcpd/control"
	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/pinhole"
)

// TestSoakChurn runs pcpd under mixed churn (issue 9 "a soak test with
// churn"): PCP MAP/renew/delete, PEER, ANNOUNCE from one client; MAP and
// delete from a thousand sources of another; NAT-PMP map/delete over IPv4;
// bad packets of every PROTOCOL.md class; `pcpd leases --json`, status and
// /metrics scrapes; a TCP probe through a long-lived pinhole. Lifetimes are
// 1–8 s (--max-lifetime 10s), so once the churn stops everything but the
// probe's lease expires. Then the test fails on any leak: leases or kernel
// elements left over, more goroutines (go_goroutines) or file descriptors
// (/proc/PID/fd) than before the churn, or RSS still growing in the last
// third of the run. 60 s by default; PCPD_SOAK=10m for longer.
func TestSoakChurn(t *testing.T) {
	dur := 60 * time.Second
	if s := os.Getenv("PCPD_SOAK"); s != "" {
		d, err := time.ParseDuration(s)
		if err != nil {
			t.Fatalf("PCPD_SOAK: %v", err)
		}
		dur = d
	}
	l := newLab(t, labOptions{extra: []string{"--min-lifetime", "1s", "--max-lifetime", "10s"}})
	l.start()
	started := time.Now()
	pid := l.pid()
	cli, cli4 := l.topo.ClientV6, l.topo.ClientV4
	l.topo.Client.ServeTCP(t, netip.AddrPortFrom(cli, servicePort).String())
	probe := l.pcpClient(cli)
	// The probe's lease is renewed throughout; --max-lifetime caps it at 10 s.
	l.mustMap(probe, cli, pcp.ProtoTCP, servicePort, 10*time.Second)

	// pcpd keeps netlink sockets from their first use on (the conntrack
	// walk's, the tamper check's and the audit's: BENCHMARKS.md items
	// 41–42; the host DNAT read's generation listener: item 83), so the
	// baseline is taken after each has been used once: a delete of an
	// address with a flow (a conntrack walk: flowed6 holds the address
	// once a connection went through the probe's pinhole; without one the
	// walk is left out), an IPv4 mapping (the host's DNAT rules read) and
	// the first tamper check (5 s after the start). A fresh-clone CI run
	// counted them as a leak (25 descriptors before the churn, 28 after;
	// CI 42, with the walk left out and the DNAT read's listener new: 31
	// before, 35 after).
	if err := l.dialService(cli, servicePort); err != nil {
		t.Fatalf("connection through the probe's pinhole: %v", err)
	}
	l.mustMap(probe, cli, pcp.ProtoUDP, servicePort, 10*time.Second)
	l.mustMap(probe, cli, pcp.ProtoUDP, servicePort, 0)
	probe4 := &pcp.Client{Conn: l.clientSocket(cli4), Server: l.server4(), InitialTimeout: 250 * time.Millisecond, MaxAttempts: 3}
	l.mustMap(probe4, cli4, pcp.ProtoUDP, servicePort, 10*time.Second)
	l.mustMap(probe4, cli4, pcp.ProtoUDP, servicePort, 0)
	if _, walked := waitFor(10*time.Second, func() bool {
		m, err := l.metrics()
		return err == nil && m["pcpd_conntrack_flushes_total"] >= 1
	}); !walked {
		t.Log("no conntrack walk counted 10 s after a delete: the baseline may lack its socket")
	}
	time.Sleep(time.Until(started.Add(6 * time.Second)))
	time.Sleep(time.Second)
	g0, f0 := l.idleFigures(t, pid)

	ctx, cancel := context.WithTimeout(context.Background(), dur)
	defer cancel()
	var (
		wg                  sync.WaitGroup
		requests, noAnswer  atomic.Int64
		mu                  sync.Mutex
		results             = map[string]int{}
		rss                 []int
		controlCalls, dials int
	)
	count := func(what string) {
		mu.Lock()
		results[what]++
		mu.Unlock()
	}
	pace := func(perSec float64) { time.Sleep(time.Duration(float64(time.Second) / perSec)) }
	life := func() time.Duration { return time.Duration(1+rand.IntN(8)) * time.Second }
	run := func(fn func()) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				fn()
			}
		}()
	}
	exchange := func(c *pcp.Client, req *pcp.Request) {
		requests.Add(1)
		resp, err := do(c, req)
		if err != nil {
			noAnswer.Add(1)
			count("no answer: " + req.Opcode.String())
			return
		}
		count(req.Opcode.String() + " " + resp.Result.String())
	}
	// Client "cli": MAP, renew, delete, PEER, ANNOUNCE (≤ 40/s: under its
	// /64's rate limit).
	cc := l.pcpClient(cli)
	run(func() {
		port := uint16(10000 + rand.IntN(200))
		proto := []pcp.Protocol{pcp.ProtoTCP, pcp.ProtoUDP}[rand.IntN(2)]
		switch rand.IntN(5) {
		case 0, 1:
			exchange(cc, pcp.NewMap(cli, proto, port, life()))
		case 2:
			exchange(cc, pcp.NewMap(cli, proto, port, 0))
		case 3:
			exchange(cc, pcp.NewPeer(cli, proto, port, netip.AddrPortFrom(l.topo.InternetV6, uint16(1+rand.IntN(60000))), life()))
		case 4:
			exchange(cc, pcp.NewAnnounce(cli))
		}
		pace(35)
	})
	// Client "flood": a thousand sources mapping and deleting.
	floodWorker := func() {
		src := floodSrc(uint32(rand.IntN(1000)))
		conn, err := socketIn(l.topo.Client, src)
		if err != nil {
			t.Error(err)
			return
		}
		defer conn.Close()
		c := &pcp.Client{Conn: conn, Server: l.server6(), InitialTimeout: 250 * time.Millisecond, MaxAttempts: 3}
		lt := life()
		if rand.IntN(3) == 0 {
			lt = 0
		}
		exchange(c, pcp.NewMap(src, pcp.ProtoUDP, uint16(20000+rand.IntN(50)), lt))
		pace(60)
	}
	run(floodWorker)
	run(floodWorker)
	// NAT-PMP over IPv4.
	pmp := &pcp.Client{Conn: l.clientSocket(cli4), Server: l.server4(), InitialTimeout: 250 * time.Millisecond, MaxAttempts: 3}
	run(func() {
		op := []pcp.PMPOpcode{pcp.PMPOpMapUDP, pcp.PMPOpMapTCP}[rand.IntN(2)]
		req := &pcp.PMPRequest{Opcode: op, InternalPort: uint16(30000 + rand.IntN(100)), Lifetime: life()}
		if rand.IntN(3) == 0 {
			req.Lifetime = 0
		}
		req.SuggestedExternalPort = req.InternalPort
		requests.Add(1)
		cctx, ccancel := context.WithTimeout(context.Background(), 3*time.Second)
		var resp pcp.PMPResponse
		err := pmp.DoPMP(cctx, req, &resp)
		ccancel()
		if err != nil {
			noAnswer.Add(1)
			count("no answer: NAT-PMP")
		} else {
			count("NAT-PMP " + resp.Result.String())
		}
		pace(35)
	})
	// Bad input of every class, from fresh sources.
	bad := badCases()
	var badN atomic.Uint32
	badWorker := func() {
		c := bad[rand.IntN(len(bad))]
		if c.live {
			return
		}
		src := floodSrc(2000 + badN.Add(1)%100000)
		if c.v4 {
			src = netip.AddrFrom4([4]byte{10, 100, 1, byte(1 + rand.IntN(254))})
		}
		conn, err := socketIn(l.topo.Client, src)
		if err != nil {
			t.Error(err)
			return
		}
		rawExchange(conn, l.serverFor(src), c.build(src), 100*time.Millisecond)
		conn.Close()
		count("bad input")
		pace(80)
	}
	run(badWorker)
	run(badWorker)
	// Operator and scraper; the probe's renewals and TCP probes; RSS.
	third := dur / 3
	start := time.Now()
	tick := time.NewTicker(2 * time.Second)
	defer tick.Stop()
	var rssFirst, rssLast []int
loop:
	for {
		select {
		case <-ctx.Done():
			break loop
		case <-tick.C:
		}
		l.mustMap(probe, cli, pcp.ProtoTCP, servicePort, 10*time.Second)
		if err := l.dialService(cli, servicePort); err != nil {
			t.Errorf("pinhole stopped passing traffic under churn: %v", err)
		}
		dials++
		if _, err := l.tryLeases(); err != nil {
			t.Errorf("pcpd leases under churn: %v", err)
		}
		if _, err := (&control.Client{Path: l.socket, Timeout: 5 * time.Second}).Status(context.Background()); err != nil {
			t.Errorf("status under churn: %v", err)
		}
		if _, err := l.metrics(); err != nil {
			t.Errorf("metrics under churn: %v", err)
		}
		controlCalls += 3
		p, err := readProc(pid)
		if err != nil {
			t.Fatalf("pcpd gone: %v", err)
		}
		rss = append(rss, p.rssKiB/1024)
		switch el := time.Since(start); {
		case el < third:
			rssFirst = append(rssFirst, p.rssKiB)
		case el > 2*third:
			rssLast = append(rssLast, p.rssKiB)
		}
	}
	wg.Wait()

	// Everything but the probe's lease expires within --max-lifetime.
	l.mustMap(probe, cli, pcp.ProtoTCP, servicePort, 10*time.Second)
	var left []control.Lease
	_, drained := waitFor(12*time.Second, func() bool {
		left = l.leases()
		return len(left) == 1
	})
	if !drained {
		t.Errorf("leases left 12 s after the churn (max lifetime 10 s): %d, e.g. %+v", len(left), left[:min(3, len(left))])
	}
	// A kernel element may outlive its lease by at most 1 s (LIFE-02's
	// ±1 s: the element's timeout starts when the batch reaches the kernel,
	// the lease's when the request arrived).
	drainedAt := time.Now()
	var es []pinhole.Entry
	linger, clean := waitFor(time.Second, func() bool {
		es = l.kernel()
		return len(es) == 1
	})
	if !clean {
		var ex []string
		for _, e := range es {
			if e.Pinhole.InternalAddr != cli || e.Pinhole.InternalPort != servicePort {
				ex = append(ex, fmt.Sprintf("%v (kernel timeout left %v)", e.Pinhole, e.Remaining.Round(time.Millisecond)))
			}
		}
		t.Errorf("kernel elements without a lease %v after the last lease expired: %d, e.g. %v", time.Since(drainedAt).Round(time.Millisecond), len(ex), ex[:min(3, len(ex))])
	}
	// Idle again: the churn's goroutines and descriptors end as their
	// work does, later on a loaded box; a leak never does. Wait for it
	// (up to 10 s) rather than sample once a second on.
	var g1, f1 int
	waitFor(10*time.Second, func() bool {
		g1, f1 = l.idleFigures(t, pid)
		return g1 <= g0+3 && f1 <= f0+2
	})
	if g1 > g0+3 {
		t.Errorf("goroutines: %d before the churn, %d after", g0, g1)
	}
	if f1 > f0+2 {
		t.Errorf("file descriptors: %d before the churn, %d after", f0, f1)
	}
	maxFirst, maxLast := maxInt(rssFirst)/1024, maxInt(rssLast)/1024
	if maxLast > maxFirst+16 {
		t.Errorf("RSS still growing: max %d MiB in the first third, %d MiB in the last", maxFirst, maxLast)
	}
	if !l.running() || l.pid() != pid {
		t.Fatal("pcpd died or restarted during the soak")
	}
	keys := make([]string, 0, len(results))
	for k, v := range results {
		keys = append(keys, fmt.Sprintf("%s %d", k, v))
	}
	sort.Strings(keys)
	t.Logf("soak %v: %d requests (%.0f/s), %d unanswered; results: %s; %d control calls, %d TCP probes through the pinhole; leases after: %d, kernel elements: 1 (last orphan element gone %v after the leases); goroutines %d → %d, fds %d → %d; RSS MiB every 2 s: %v (max first third %d, last third %d)",
		dur, requests.Load(), float64(requests.Load())/dur.Seconds(), noAnswer.Load(), strings.Join(keys, ", "),
		controlCalls, dials, len(left), linger.Round(time.Millisecond), g0, g1, f0, f1, rss, maxFirst, maxLast)
	if n := noAnswer.Load(); n*100 > requests.Load() {
		t.Errorf("%d of %d valid requests unanswered (> 1%%)", n, requests.Load())
	}
}

// idleFigures reads pcpd's goroutine count (metrics) and open descriptors.
func (l *lab) idleFigures(t *testing.T, pid int) (goroutines, fds int) {
	t.Helper()
	m, err := l.metrics()
	if err != nil {
		t.Fatal(err)
	}
	p, err := readProc(pid)
	if err != nil {
		t.Fatal(err)
	}
	return int(m["go_goroutines"]), p.fds
}

func maxInt(v []int) int {
	m := 0
	for _, x := range v {
		m = max(m, x)
	}
	return m
}
