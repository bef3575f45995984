package reliability

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
)

// ack is one SUCCESS pcpd sent: the lease it promised, its epoch, and the
// span in which pcpd read that epoch: after the request went out (sent),
// before the answer was seen (at). at may be late by the worker's wait for
// the CPU, so the epoch is judged against the whole span (epochWindow).
type ack struct {
	key   leaseKey
	epoch pcp.Epoch
	sent  time.Time
	at    time.Time
}

// span is the time elapsed since an ack's span: since at (the least) and
// since sent (the most).
type span struct{ least, most time.Duration }

// sinceAck is the time elapsed at now since a's span, on the monotonic clock
// and on the wall clock.
func sinceAck(a ack, now time.Time) (mono, wall span) {
	mono = span{now.Sub(a.at), now.Sub(a.sent)}
	// Round(0) drops the monotonic reading: Sub compares wall readings.
	n := now.Round(0)
	wall = span{n.Sub(a.at.Round(0)), n.Sub(a.sent.Round(0))}
	return mono, wall
}

// epochWindow is the range an epoch read now may take if it went on from
// epoch, read by pcpd in a span that ended mono.least and began mono.most
// ago (EPO-02, EPO-04): epoch plus the time since, ±2 s. The time is that of
// the monotonic clock, which pcpd's epoch follows while it runs
// (server/clock.go). If the box's wall clock moved against the monotonic one
// meanwhile by more than a second (a step: this test's box is a VM whose
// wall clock is stepped after a pause the monotonic clock does not count),
// a restarted pcpd that did not see the step before the kill, or that was
// down when it happened, continues from its stored wall-clock origin
// (RELIABILITY.md "wall-clock steps", limits): then the range on the wall
// clock, [wlo, whi], is accepted as well, and step is the step (0 when the
// clocks agree, and [wlo, whi] = [lo, hi]).
func epochWindow(epoch pcp.Epoch, mono, wall span) (lo, hi float64, step time.Duration, wlo, whi float64) {
	e := float64(epoch)
	lo, hi = e+mono.least.Seconds()-2, e+mono.most.Seconds()+2
	if step = wall.least - mono.least; step > -time.Second && step < time.Second {
		return lo, hi, 0, lo, hi
	}
	return lo, hi, step, e + wall.least.Seconds() - 2, e + wall.most.Seconds() + 2
}

// TestKill9UnderLoadEPO04 kills pcpd with SIGKILL while clients are mapping
// as fast as they can, again and again (issue 9 "kill -9 under load";
// PROTOCOL.md EPO-04, LIFE-04, choice (g)). After every restart:
//   - every lease answered SUCCESS before the kill is listed by
//     `pcpd leases --json` and its pinhole is in the kernel;
//   - the epoch continued: epoch after ≥ epoch before + elapsed − 2 (and
//     not ahead of real time by more than 2 s, EPO-02), elapsed counted
//     from the span in which pcpd read the epoch before (epochWindow; on the
//     wall clock too if the box's wall clock stepped meanwhile);
//   - a pinhole opened before the first cycle passes TCP traffic while
//     pcpd is dead and after it is back.
//
// Then a short lease (3 s, allowed by --min-lifetime 1s) is taken and pcpd
// killed: the kernel element must vanish and traffic fail within lifetime
// + 1 s of the request with no pcpd running, and the restarted pcpd must
// not bring it back. And connections from the internet through such
// leases (an IPv6 pinhole, an IPv6 port redirect, an IPv4 NAT-PMP mapping;
// TCP and UDP), opened before the kill and echoing every 100 ms, must stop
// carrying data by lifetime + 1 s of their requests, pcpd dead, and not
// carry any after (openLifeFlows, checkLifeFlows).
func TestKill9UnderLoadEPO04(t *testing.T) {
	cycles := 20
	if os.Getenv("PCPD_LONG") != "" {
		cycles = 200
	}
	if n, err := strconv.Atoi(os.Getenv("PCPD_CYCLES")); err == nil && n > 0 {
		cycles = n
	}
	l := newLab(t, labOptions{extra: []string{"--max-leases-per-client", "1000000", "--max-leases", "1000000", "--min-lifetime", "1s"}})
	// An epoch that began an hour ago: a reset (to ≈0) cannot hide inside
	// the ±2 s tolerance.
	seedEpoch(t, l.dir)
	runLog := l.log.len() // where the running pcpd's output begins
	l.start()
	cli := l.topo.ClientV6
	l.topo.Client.ServeTCP(t, netip.AddrPortFrom(cli, servicePort).String())
	l.mustMap(l.pcpClient(cli), cli, pcp.ProtoTCP, servicePort, time.Hour)
	if err := l.dialService(cli, servicePort); err != nil {
		t.Fatalf("pinhole does not pass traffic before any kill: %v", err)
	}
	// And an IPv4 NAPT mapping made with NAT-PMP: the DNAT path must live
	// through the kills too.
	l.topo.Client.ServeTCP(t, netip.AddrPortFrom(l.topo.ClientV4, servicePort).String())
	pmpc := &pcp.Client{Conn: l.clientSocket(l.topo.ClientV4), Server: l.server4(), InitialTimeout: 250 * time.Millisecond}
	ext4 := l.mustPMP(pmpc, pcp.PMPOpMapTCP, servicePort, time.Hour)
	probe := func(when string) {
		t.Helper()
		if err := l.dialService(cli, servicePort); err != nil {
			t.Fatalf("%s: IPv6 pinhole passes no traffic: %v", when, err)
		}
		if err := l.topo.Internet.DialTCP(ext4.String(), time.Second); err != nil {
			t.Fatalf("%s: IPv4 NAPT mapping %s passes no traffic: %v", when, ext4, err)
		}
	}
	probe("before any kill")

	var (
		mu       sync.Mutex
		acked    = map[leaseKey]ack{}
		last     ack
		probes   int
		restarts []time.Duration
		// stepResets: restarts whose epoch reset after a wall-clock step
		// the killed pcpd had not finished rewriting (rewriteReset).
		stepResets int
	)
	// The load: workers mapping udp/5000 for ever new sources of the flood
	// client, each in its own /64 (pcpd rate-limits per /64), so every
	// request reaches the store and the kernel.
	const workers = 4
	var nextSrc atomic.Uint32
	for cycle := 0; cycle < cycles; cycle++ {
		ctx, cancel := context.WithCancel(context.Background())
		var wg sync.WaitGroup
		for w := 0; w < workers; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for ctx.Err() == nil {
					src := floodSrc(nextSrc.Add(1))
					conn, err := socketIn(l.topo.Client, src)
					if err != nil {
						t.Error(err)
						return
					}
					c := &pcp.Client{Conn: conn, Server: l.server6(), InitialTimeout: 200 * time.Millisecond, MaxAttempts: 2}
					var resp pcp.Response
					sent := time.Now()
					err = c.Do(ctx, pcp.NewMap(src, pcp.ProtoUDP, 5000, time.Hour), &resp)
					conn.Close()
					if err != nil {
						continue
					}
					at := time.Now()
					if resp.Result != pcp.Success {
						t.Errorf("cycle %d: MAP udp/5000 from %s: %v", cycle, src, resp.Result)
						continue
					}
					a := ack{key: leaseKey{src, "udp", 5000}, epoch: resp.Epoch, sent: sent, at: at}
					mu.Lock()
					acked[a.key] = a
					if a.at.After(last.at) {
						last = a
					}
					mu.Unlock()
				}
			}()
		}
		time.Sleep(time.Duration(100+rand.IntN(300)) * time.Millisecond)
		mu.Lock()
		before := last
		mu.Unlock()
		l.kill9()
		cancel()
		wg.Wait()

		// The kernel holds the pinholes: traffic passes with pcpd dead.
		probe(fmt.Sprintf("cycle %d, pcpd killed", cycle))
		probes++
		start := time.Now()
		killedLog, startLog := l.log.since(runLog), l.log.len()
		l.start()
		runLog = startLog
		restarts = append(restarts, time.Since(start))
		if os.Getenv("PCPD_DEBUG") != "" {
			t.Logf("cycle %d restart %v\n%s", cycle, time.Since(start), l.log.tail(15))
		}
		ctx2, cancel2 := context.WithTimeout(context.Background(), 2*time.Second)
		resp, err := l.announce(ctx2, cli)
		cancel2()
		now := time.Now()
		if err != nil {
			t.Fatalf("cycle %d: ANNOUNCE after restart: %v", cycle, err)
		}
		if before.at.IsZero() {
			t.Fatalf("cycle %d: no MAP answered SUCCESS under load", cycle)
		}
		mono, wall := sinceAck(before, now)
		lo, hi, step, wlo, whi := epochWindow(before.epoch, mono, wall)
		e := float64(resp.Epoch)
		switch {
		case e >= lo && e <= hi, e >= wlo && e <= whi:
		case rewriteReset(resp.Epoch, now.Sub(start), killedLog, l.log.since(startLog)):
			// The killed pcpd saw a wall-clock step (the box's) and was
			// killed before it had rewritten every lease: the stored
			// leases may be of two frames, and the epoch reset by design
			// (server/clock.go). Not a loss: the leases are checked
			// below; the next cycle judges from the new epoch.
			stepResets++
			t.Logf("cycle %d: epoch %d after restart, %d before: reset, the killed pcpd's rewrite after a wall-clock step unfinished (RELIABILITY.md known bug 8, edge (b))",
				cycle, resp.Epoch, before.epoch)
		default:
			t.Fatalf("cycle %d: epoch %d after restart, %d before (%.1fs ago): want %.0f–%.0f (EPO-04: no reset while state is intact)%s",
				cycle, resp.Epoch, before.epoch, now.Sub(before.at).Seconds(), lo, hi, stepNote(step, wlo, whi))
		}
		if step != 0 {
			t.Logf("cycle %d: epoch %d after restart, %d before: the box's wall clock stepped %v against the monotonic clock meanwhile%s",
				cycle, resp.Epoch, before.epoch, step.Round(time.Millisecond), stepNote(step, wlo, whi))
		}
		ls := leaseSet(l.leases())
		kern := map[leaseKey]bool{}
		for _, e := range l.kernel() {
			kern[leaseKey{e.Pinhole.InternalAddr, protoName(e.Pinhole.Protocol), e.Pinhole.InternalPort}] = true
		}
		mu.Lock()
		lost, missing := 0, 0
		var example leaseKey
		for k := range acked {
			if _, ok := ls[k]; !ok {
				lost++
				example = k
			}
			if !kern[k] {
				missing++
				example = k
			}
		}
		n := len(acked)
		mu.Unlock()
		if lost > 0 || missing > 0 {
			t.Fatalf("cycle %d: of %d leases answered SUCCESS, %d are not in pcpd leases and %d not in the kernel (e.g. %v)", cycle, n, lost, missing, example)
		}
		probe(fmt.Sprintf("cycle %d, after restart", cycle))
		probes++
	}
	slices.Sort(restarts)
	t.Logf("kill -9 cycles survived: %d; leases answered SUCCESS: %d, lost: 0; epoch resets after a wall-clock step: %d; traffic probes passed (IPv6 pinhole + IPv4 NAT-PMP mapping each): %d; restart to first ANNOUNCE answered: median %v, max %v",
		cycles, len(acked), stepResets, probes, restarts[len(restarts)/2].Round(time.Millisecond), restarts[len(restarts)-1].Round(time.Millisecond))

	t.Run("LIFE-04 no pinhole outlives its lease with pcpd dead", func(t *testing.T) {
		const port, life = 8081, 3 * time.Second
		l.topo.Client.ServeTCP(t, netip.AddrPortFrom(cli, port).String())
		l.topo.Client.ServeTCP(t, netip.AddrPortFrom(l.topo.ClientV4, port).String())
		// An IPv4 NAPT mapping by NAT-PMP with the same lifetime.
		t4 := time.Now()
		ext := l.mustPMP(pmpc, pcp.PMPOpMapTCP, port, life).String()
		t0 := time.Now()
		resp := l.mustMap(l.pcpClient(cli), cli, pcp.ProtoTCP, port, life)
		if resp.Lifetime != life {
			t.Fatalf("granted %v, asked %v (--min-lifetime 1s)", resp.Lifetime, life)
		}
		flows := l.openLifeFlows(t, pmpc, 8090, life)
		var watching sync.WaitGroup
		for _, f := range flows {
			watching.Add(1)
			go func() { defer watching.Done(); f.echo = watchEcho(f.c, f.asked.Add(life+2*time.Second)) }()
		}
		l.kill9()
		killed := time.Now()
		if err := l.dialService(cli, port); err != nil {
			t.Fatalf("short lease does not pass traffic before expiry: %v", err)
		}
		if err := l.topo.Internet.DialTCP(ext, time.Second); err != nil {
			t.Fatalf("short NAT-PMP mapping %s does not pass traffic before expiry: %v", ext, err)
		}
		// Gone by life + 1 s: a listing that begins after that moment
		// and still shows the element proves it outlived its lease.
		// (When a poll saw it gone is no measure: on a loaded box one
		// listing can take longer than the second allowed.)
		time.Sleep(time.Until(t4.Add(life + time.Second)))
		if l.kernelHas(l.topo.ClientV4, pcp.ProtoTCP, port) {
			t.Fatalf("NAPT element for %s still present %v after the request (lifetime %v; allowed +1s)", ext, time.Since(t4).Round(time.Millisecond), life)
		}
		time.Sleep(time.Until(t0.Add(life + time.Second)))
		if l.kernelHas(cli, pcp.ProtoTCP, port) {
			t.Fatalf("kernel element for tcp/%d still present %v after the request (lifetime %v; allowed +1s)", port, time.Since(t0).Round(time.Millisecond), life)
		}
		if err := l.dialService(cli, port); err == nil {
			t.Fatalf("traffic to tcp/%d still passes after its lease expired", port)
		}
		if err := l.topo.Internet.DialTCP(ext, time.Second); err == nil {
			t.Fatalf("traffic to %s still passes after its NAT-PMP lease expired", ext)
		}
		after := time.Since(t0)
		watching.Wait() // before the start: it would flush the flows
		flowFigures := checkLifeFlows(t, flows, killed, life)
		l.start()
		if l.kernelHas(cli, pcp.ProtoTCP, port) {
			t.Fatal("restarted pcpd re-installed an expired pinhole")
		}
		if _, ok := leaseSet(l.leases())[leaseKey{cli, "tcp", port}]; ok {
			t.Fatal("restarted pcpd lists an expired lease")
		}
		t.Logf("lifetime %v, pcpd dead: IPv6 pinhole and IPv4 NAPT elements gone by %v after their requests; traffic refused on both at %v; connections opened before the kill, echo every 100 ms, after their requests: %s",
			life, life+time.Second, after.Round(10*time.Millisecond), flowFigures)
	})
}

// rewriteReset reports whether an epoch after a restart, read since after
// the restart began, is the reset pcpd makes by design when it was killed
// during the rewrite after a wall-clock step (server/clock.go): a VM
// pause on the test's box steps the wall clock, the running pcpd (or the
// next start, by the boot anchor) rebases and rewrites its leases a chunk
// a sweep tick (thousands here: longer than a cycle), and the start after
// a kill meanwhile finds the stored origin cleared. All three must hold:
// the killed run logged the step, the start logged that reason for its
// reset, and the epoch is a reset's (≤ the time since the restart began +
// 2 s). A reset without them is a loss of state and fails the test.
func rewriteReset(after pcp.Epoch, since time.Duration, killedRun, started string) bool {
	return strings.Contains(killedRun, "wall clock stepped") &&
		strings.Contains(started, "rewrite of the stored leases after a wall-clock step") &&
		strings.Contains(started, "epoch reset to 0") &&
		float64(after) <= since.Seconds()+2
}

// stepNote says what epochWindow accepted for a wall-clock step ("" without).
func stepNote(step time.Duration, wlo, whi float64) string {
	if step == 0 {
		return ""
	}
	return fmt.Sprintf("; wall clock stepped %v meanwhile: %.0f–%.0f on the wall clock accepted too", step.Round(time.Millisecond), wlo, whi)
}

func protoName(p uint8) string {
	switch p {
	case 6:
		return "tcp"
	case 17:
		return "udp"
	}
	return fmt.Sprint(p)
}

// lifeFlow is a connection from the internet through a short mapping of
// LIFE-04's, and its echo round trips (watchEcho).
type lifeFlow struct {
	name  string    // the mapping's kind and protocol
	asked time.Time // when the mapping was asked for
	c     net.Conn
	echo  echoWatch
}

// openLifeFlows maps, for life, an IPv6 pinhole, an IPv6 port redirect (a
// PCP MAP granted another external port than the internal: pinhole's
// redir6, DNAT-ed) and an IPv4 NAPT mapping (NAT-PMP, DNAT-ed) for echo
// services of the client, TCP and UDP, on ports from base on, and opens a
// connection from the internet through each, which must pass an echo.
func (l *lab) openLifeFlows(t *testing.T, pmpc *pcp.Client, base uint16, life time.Duration) []*lifeFlow {
	t.Helper()
	cli := l.topo.ClientV6
	var fs []*lifeFlow
	for i, proto := range []pcp.Protocol{pcp.ProtoTCP, pcp.ProtoUDP} {
		for j, kind := range []string{"IPv6 pinhole", "IPv6 redirect", "IPv4 NAPT"} {
			port := base + uint16(3*i+j)
			service := netip.AddrPortFrom(cli, port)
			if kind == "IPv4 NAPT" {
				service = netip.AddrPortFrom(l.topo.ClientV4, port)
			}
			if proto == pcp.ProtoTCP {
				l.topo.Client.ServeTCPEcho(t, service.String())
			} else {
				l.topo.Client.ServeUDPEcho(t, service.String())
			}
			f := &lifeFlow{name: kind + " " + protoName(uint8(proto)), asked: time.Now()}
			dst := service
			switch kind {
			case "IPv4 NAPT":
				op := pcp.PMPOpMapTCP
				if proto == pcp.ProtoUDP {
					op = pcp.PMPOpMapUDP
				}
				dst = l.mustPMP(pmpc, op, port, life)
			default:
				ext := port
				if kind == "IPv6 redirect" {
					ext = port + 100
				}
				r := l.mustMapTo(l.pcpClient(cli), cli, proto, port, ext, life)
				dst = netip.AddrPortFrom(r.Map.ExternalAddr.Unmap(), r.Map.ExternalPort)
				if r.Lifetime != life || dst != netip.AddrPortFrom(cli, ext) {
					t.Fatalf("%s: MAP granted %v for %v, asked %v for %v", f.name, dst, r.Lifetime, netip.AddrPortFrom(cli, ext), life)
				}
			}
			if err := l.topo.Internet.Do(func() (err error) {
				f.c, err = net.DialTimeout(protoName(uint8(proto)), dst.String(), time.Second)
				return err
			}); err != nil {
				t.Fatalf("%s: dial %v: %v", f.name, dst, err)
			}
			t.Cleanup(func() { f.c.Close() })
			if err := echoRound(f.c, 0, time.Second); err != nil {
				t.Fatalf("%s: no echo through %v with its lease live: %v", f.name, dst, err)
			}
			fs = append(fs, f)
		}
	}
	return fs
}

// checkLifeFlows requires of every flow that an echo passed with pcpd dead
// (after killed: its lease carried data in the kernel alone), that none
// sent later than life + 1 s after the flow's request passed (LIFE-04),
// that one failed, and that none passed after it. (Judged on the last
// that passed, not the first that failed: the watcher sending late on a
// loaded box delays the first failure, not the pinhole's end; an echo
// that passes proves the pinhole open when it was sent, or later.) It returns the
// figures: when, after the request, the last echo that passed and the
// first that failed were sent.
func checkLifeFlows(t *testing.T, flows []*lifeFlow, killed time.Time, life time.Duration) string {
	t.Helper()
	var figs []string
	for _, f := range flows {
		w, since := f.echo, func(at time.Time) string {
			if at.IsZero() {
				return "never"
			}
			return at.Sub(f.asked).Round(10 * time.Millisecond).String()
		}
		figs = append(figs, fmt.Sprintf("%s last passed %s, first failed %s", f.name, since(w.lastOK), since(w.firstFail)))
		switch {
		case w.lastOK.Before(killed):
			t.Errorf("%s: no echo passed with pcpd dead (last %v after the request, killed %v after): nothing tested", f.name, since(w.lastOK), since(killed))
		case w.lastOK.Sub(f.asked) > life+time.Second:
			t.Errorf("%s: an echo sent %v after the request passed (lifetime %v; allowed +1s), first failed %v", f.name, since(w.lastOK), life, since(w.firstFail))
		case w.firstFail.IsZero():
			t.Errorf("%s: no echo failed, last passed %v after the request (lifetime %v): the watcher never ran past the lease", f.name, since(w.lastOK), life)
		case !w.okAfterFail.IsZero():
			t.Errorf("%s: an echo passed %v after the request, after one failed at %v (%v)", f.name, since(w.okAfterFail), since(w.firstFail), w.err)
		}
	}
	return strings.Join(figs, "; ")
}

// echoWatch is what watchEcho saw: when the last round trip that passed
// before any failed was sent, the first that failed (and why), and the
// last that passed after one failed (zero: none).
type echoWatch struct {
	lastOK, firstFail, okAfterFail time.Time
	err                            error
}

// watchEcho sends an echo round trip on c every 100 ms (each waits up to
// 500 ms) until one would start after until.
func watchEcho(c net.Conn, until time.Time) (w echoWatch) {
	for seq := byte(1); ; seq++ {
		sent := time.Now()
		if sent.After(until) {
			return w
		}
		err := echoRound(c, seq, 500*time.Millisecond)
		switch {
		case err == nil && w.firstFail.IsZero():
			w.lastOK = sent
		case err == nil:
			w.okAfterFail = sent
		case w.firstFail.IsZero():
			w.firstFail, w.err = sent, err
		}
		time.Sleep(time.Until(sent.Add(100 * time.Millisecond)))
	}
}

// echoRound sends the byte seq on c (a TCP connection to an echo, or a
// connected UDP socket to netlab's UDP echo, which answers "echo:" and
// the payload) and waits up to wait for it to come back as the last byte
// of a read: an earlier round trip's late answer is skipped.
func echoRound(c net.Conn, seq byte, wait time.Duration) error {
	c.SetDeadline(time.Now().Add(wait))
	if _, err := c.Write([]byte{seq}); err != nil {
		return err
	}
	buf := make([]byte, 64)
	for {
		n, err := c.Read(buf)
		if err != nil {
			return err
		}
		if n > 0 && buf[n-1] == seq {
			return nil
		}
	}
}
