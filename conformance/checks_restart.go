package conformance

import (
	"fmt"
	"net/netip"
	"sort"
	"sync"
	"time"

	"github.com/pcpd/pcpd/pcp"
)

// Restart checks (ANN-03..06, EPO-04, PMP-13). A restart is slow and
// the unsolicited announcements it triggers go on for minutes, so the
// checks share one restart: the first of them to run performs it and
// records everything; each judges its own part.

type restartCapture struct {
	once sync.Once
	err  string

	before, after     uint32 // epochs from ANNOUNCE requests
	beforeAt, afterAt time.Time
	restartAt         time.Time // Restart() called
	lease, lease4     netip.AddrPort
	onLease, onLease4 []datagram // arrivals on the lease holders' sockets
	on5350            []datagram // arrivals on port 5350 (multicast or unicast)
	listen5350        error
	mapBefore         netip.AddrPort
	mapAfter          string // renewal result after the restart
	dataAfter         error  // inbound probe after restart (nil: works)
	dataTried         bool
}

// restarted performs the shared restart once and returns the record.
func (e *Env) restarted() *restartCapture {
	c := &e.shared.restart
	c.once.Do(func() {
		defer func() {
			if p := recover(); p != nil {
				if a, ok := p.(abort); ok {
					c.err = a.r.Detail
					return
				}
				c.err = fmt.Sprint(p)
			}
		}()
		e.captureRestart(c)
	})
	if c.err != "" {
		e.failf("restart capture: %s", c.err)
	}
	return c
}

func (e *Env) captureRestart(c *restartCapture) {
	s := e.sock()
	m := s.mapTCP()
	c.lease, c.mapBefore = s.local, ext(m.r)
	if e.Data != nil {
		e.serve(protoTCP, m.req.IntPort)
	}
	var s4 *sock
	if e.NATPMP && e.Server4.IsValid() && e.Client4.IsValid() {
		s4 = e.sock4()
		p := e.port()
		s4.pmpMapping(2, p, p, 3600)
		c.lease4 = s4.local
	}
	var l *sock
	lc, err := e.ListenPacket(netip.AddrPortFrom(netip.IPv6Unspecified(), pcp.ClientPort))
	if err != nil {
		c.listen5350 = err
	} else {
		e.cleanup(func() { lc.Close() })
		l = &sock{e: e, c: lc}
	}

	a := s.ask(announce(e.Client))
	if a.Epoch < 10 {
		// A server that just started cannot show whether its epoch
		// continues or restarts: let the epoch grow past the restart
		// delay first.
		time.Sleep(time.Duration(10-a.Epoch) * time.Second)
		a = s.ask(announce(e.Client))
	}
	c.before, c.beforeAt = a.Epoch, time.Now()

	// Readers record arrivals while the server restarts, with the
	// kernel's stamps where it gives them (ANN-05 judges gaps: when a
	// reader got to a datagram on a loaded box is no measure of them).
	for _, k := range []*sock{s, s4, l} {
		if k != nil {
			k.stamped = stampArrivals(k.c)
		}
	}
	var wg sync.WaitGroup
	stop := time.Now().Add(time.Hour)
	read := func(k *sock, out *[]datagram) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				d, err := k.recv(stop)
				if err != nil {
					return
				}
				*out = append(*out, d)
			}
		}()
	}
	read(s, &c.onLease)
	if s4 != nil {
		read(s4, &c.onLease4)
	}
	if l != nil {
		read(l, &c.on5350)
	}
	c.restartAt = time.Now()
	rerr := e.Restart()
	time.Sleep(4 * time.Second)
	for _, k := range []*sock{s, s4, l} {
		if k != nil {
			k.c.SetReadDeadline(time.Now())
		}
	}
	wg.Wait()
	if rerr != nil {
		e.failf("restart: %v", rerr)
	}

	b := s.ask(announce(e.Client))
	c.after, c.afterAt = b.Epoch, time.Now()
	r := s.ask(m.req.bytes())
	c.mapAfter = fmt.Sprintf("%s %s", r.Result, ext(r))
	if r.Result == pcp.Success && ext(r) == c.mapBefore {
		c.mapAfter = "same"
	}
	if e.Data != nil {
		c.dataTried = true
		c.dataAfter = e.probe(protoTCP, netip.Addr{}, c.mapBefore)
	}
}

// announces filters PCP unsolicited ANNOUNCEs from a capture.
func announces(ds []datagram) []datagram {
	var out []datagram
	for _, d := range ds {
		if len(d.b) >= 24 && d.b[0] == pcp.Version && d.b[1] == 0x80 {
			out = append(out, d)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].at.Before(out[j].at) })
	return out
}

// Path jitter the ANN-05 pacing judgement allows (announcePacing): how
// much the time from the server's send to the recorded arrival may vary
// between two datagrams of one path. With kernel arrival stamps that is
// the network alone: on the lab's veth link the stamp is taken inside the
// server's own sendmsg (microseconds), a LAN or a tunnel adds queueing of
// a few ms; 10 ms covers them. Without stamps the reader goroutine's
// wake-up adds to it: the flake this replaced saw a read 30 ms late on a
// loaded 2-core box, so 50 ms.
const (
	annJitterStamped = 10 * time.Millisecond
	annJitterRead    = 50 * time.Millisecond
)

// announcePacing judges the arrivals of one path's unsolicited ANNOUNCEs
// by RFC 6887 §14.1.3 (ANN-05): the first gap at least 250 ms, each later
// gap at least twice the one before. The rule is about the server's
// sends; an arrival is the send plus a path delay d that varies by up to
// J (annJitter*). A measured gap is the sent one plus d(i) − d(i−1), so a
// conforming server's arrivals satisfy first ≥ 250 ms − J and
// gap(i) ≥ 2·gap(i−1) − 3J (the sent gap(i) ≥ 2·sent gap(i−1) with the
// delays at their worst: d(i) low, d(i−1) high, d(i−2) low). Nothing else
// is allowed for: a server that sends late and then keeps its nominal
// schedule fails.
func announcePacing(seq []datagram) ([]time.Duration, error) {
	j := annJitterStamped
	for _, d := range seq {
		if !d.stamped {
			j = annJitterRead
		}
	}
	var gaps, shown []time.Duration
	for i := 1; i < len(seq); i++ {
		g := seq[i].at.Sub(seq[i-1].at)
		gaps = append(gaps, g)
		shown = append(shown, g.Round(100*time.Microsecond))
		if i == 1 && g < 250*time.Millisecond-j {
			return shown, fmt.Errorf("first gap %v < 250 ms (gaps %v, path jitter allowed %v)", shown[0], shown, j)
		}
		if i > 1 && g < 2*gaps[i-2]-3*j {
			return shown, fmt.Errorf("gap %v not ≥ twice the previous %v (gaps %v, path jitter allowed %v)", shown[i-1], shown[i-2], shown, j)
		}
	}
	return shown, nil
}

func pmpAnnounces(ds []datagram) []datagram {
	var out []datagram
	for _, d := range ds {
		if len(d.b) == 12 && d.b[0] == 0 && d.b[1] == 0x80 {
			out = append(out, d)
		}
	}
	return out
}

var restartChecks = []Check{
	{ID: "ANN-03", Section: "RFC 6887 §14.1.3", Level: Must, Name: "unsolicited ANNOUNCE after a restart", Needs: []Need{NeedRestart}, Run: func(e *Env) Result {
		c := e.restarted()
		all := append(announces(c.onLease), announces(c.on5350)...)
		if len(all) == 0 {
			return failr("no ANNOUNCE within 4 s of the restart on the lease holder's %s or port 5350 (%v)", c.lease, c.listen5350)
		}
		for _, d := range all {
			if be.Uint32(d.b[4:]) != 0 || d.b[3] != 0 || len(d.b) != 24 {
				return failr("unsolicited ANNOUNCE %s: want 24 octets, SUCCESS, lifetime 0", hexdump(d.b))
			}
		}
		return pass("%d to the lease holder, %d to port 5350; e.g. %s", len(announces(c.onLease)), len(announces(c.on5350)), hexdump(all[0].b))
	}},
	{ID: "ANN-04", Section: "RFC 6887 §14.1.3", Level: Must, Name: "unsolicited ANNOUNCE from a unicast serving address, port 5351", Needs: []Need{NeedRestart}, Run: func(e *Env) Result {
		c := e.restarted()
		all := append(announces(c.onLease), announces(c.on5350)...)
		if len(all) == 0 {
			e.naf("no unsolicited ANNOUNCE seen (see ANN-03)")
		}
		for _, d := range all {
			if d.from.Port() != pcp.Port || d.from.Addr().IsMulticast() || d.from.Addr().IsUnspecified() {
				return failr("ANNOUNCE from %s", d.from)
			}
		}
		return pass("from %s", all[0].from)
	}},
	{ID: "ANN-05", Section: "RFC 6887 §14.1.3", Level: Must, Name: "unsolicited ANNOUNCE pacing: ≥ 250 ms, doubling, fresh epoch", Needs: []Need{NeedRestart}, Run: func(e *Env) Result {
		c := e.restarted()
		seq := announces(c.onLease)
		if len(seq) < 2 {
			seq = announces(c.on5350)
		}
		if len(seq) < 2 {
			e.naf("fewer than two unsolicited ANNOUNCEs on one path in 4 s")
		}
		gaps, err := announcePacing(seq)
		if err != nil {
			return failr("%v", err)
		}
		for i := 1; i < len(seq); i++ {
			if be.Uint32(seq[i].b[8:]) < be.Uint32(seq[i-1].b[8:]) {
				return failr("epoch went backwards between sends")
			}
		}
		how := "kernel arrival stamps"
		if !seq[0].stamped {
			how = "read times (no kernel stamps)"
		}
		return pass("%d sends in 4 s, gaps %v (%s)", len(seq), gaps, how)
	}},
	{ID: "ANN-06", Section: "PROTOCOL.md ANN-06", Level: Impl, Name: "unsolicited ANNOUNCE unicast to each known client", Needs: []Need{NeedRestart}, Run: func(e *Env) Result {
		c := e.restarted()
		if n := len(announces(c.onLease)); n == 0 {
			return failr("none reached the lease holder %s", c.lease)
		}
		return pass("%d to %s", len(announces(c.onLease)), c.lease)
	}},
	{ID: "EPO-04", Section: "RFC 6887 §8.5, PROTOCOL.md EPO-04", Level: Impl, Name: "restart with state kept: epoch continues, mappings survive", Needs: []Need{NeedRestart}, Run: func(e *Env) Result {
		c := e.restarted()
		el := c.afterAt.Sub(c.beforeAt).Seconds()
		d := float64(c.after) - float64(c.before)
		detail := fmt.Sprintf("epoch %d → %d over %.1f s; renewal: %s", c.before, c.after, el, c.mapAfter)
		if d < el*7/8-2 || d > el*9/8+2 {
			return failr("epoch reset or jumped: %s", detail)
		}
		if c.mapAfter != "same" {
			return failr("epoch continued but the mapping did not survive: %s", detail)
		}
		if c.dataTried {
			if c.dataAfter != nil {
				return failr("%s; inbound TCP after restart: %v", detail, c.dataAfter)
			}
			detail += "; pinhole kept working"
		}
		return pass("%s", detail)
	}},
	{ID: "PMP-13", Section: "RFC 6886 §3.2.1, §3.7", Level: Must, Name: "NAT-PMP address announcement after a restart", Needs: []Need{NeedRestart, NeedNATPMP}, Run: func(e *Env) Result {
		c := e.restarted()
		all := append(pmpAnnounces(c.onLease4), pmpAnnounces(c.on5350)...)
		if len(all) == 0 {
			return failr("no 12-octet 00 80 announcement on %s or port 5350 within 4 s", c.lease4)
		}
		for _, d := range all {
			if d.from.Port() != pcp.Port || netip.AddrFrom4([4]byte(d.b[8:12])) != e.ExternalV4 {
				return failr("announcement %s from %s", hexdump(d.b), d.from)
			}
		}
		return pass("%d announcements, e.g. %s from %s", len(all), hexdump(all[0].b), all[0].from)
	}},
	{ID: "EPO-03", Section: "RFC 6887 §8.5, RFC 6886 §3.6", Level: Must, Name: "epoch resets when mapping state is lost", Needs: []Need{NeedWipe}, Run: func(e *Env) Result {
		s := e.sock()
		a := s.ask(announce(e.Client))
		if a.Epoch < 10 {
			time.Sleep(time.Duration(10-a.Epoch) * time.Second)
			a = s.ask(announce(e.Client))
		}
		t0 := time.Now()
		if err := e.Wipe(); err != nil {
			return failr("wipe: %v", err)
		}
		b := s.ask(announce(e.Client))
		since := time.Since(t0).Seconds()
		if float64(b.Epoch) > since+2 {
			return failr("epoch %d before losing state, %d %.1f s after: not reset", a.Epoch, b.Epoch, since)
		}
		return pass("epoch %d → %d after the state was wiped", a.Epoch, b.Epoch)
	}},
}
