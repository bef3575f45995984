package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"maps"
	"math/rand/v2"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestParseMix(t *testing.T) {
	tests := []struct {
		in      string
		want    mix
		wantErr bool
	}{
		{in: "new=100", want: mix{opNew: 100}},
		{in: "new=20,renew=60,delete=10,malformed=5,unauth=5", want: mix{20, 60, 10, 5, 5}},
		{in: " renew = 3 , new=1 ,", want: mix{opNew: 1, opRenew: 3}},
		{in: "unauth=1,malformed=0", want: mix{opUnauth: 1}},
		{in: "", wantErr: true},
		{in: "new=0", wantErr: true},
		{in: "new", wantErr: true},
		{in: "create=5", wantErr: true},
		{in: "new=1,new=2", wantErr: true},
		{in: "new=-1", wantErr: true},
		{in: "new=x", wantErr: true},
		{in: "new=1.5", wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got, err := parseMix(tt.in)
			if tt.wantErr {
				if !errors.Is(err, errBadMix) {
					t.Fatalf("parseMix(%q) error = %v, want errBadMix", tt.in, err)
				}
				if got != (mix{}) {
					t.Fatalf("parseMix(%q) returned %v with an error", tt.in, got)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got != tt.want {
				t.Fatalf("parseMix(%q) = %v, want %v", tt.in, got, tt.want)
			}
			// String round-trips.
			again, err := parseMix(got.String())
			if err != nil || again != got {
				t.Fatalf("parseMix(%q) = %v, %v; want %v", got.String(), again, err, got)
			}
		})
	}
}

// TestMixPick: every r in [0, total) maps to an op in exact proportion.
func TestMixPick(t *testing.T) {
	m := mix{opNew: 2, opDelete: 3, opUnauth: 1}
	var got [numOps]int
	for r := range m.total() {
		got[m.pick(r)]++
	}
	if want := [numOps]int(m); got != want {
		t.Fatalf("pick counts = %v, want %v", got, want)
	}
}

func TestHistBuckets(t *testing.T) {
	// Buckets tile the values without gaps or overlaps, and every value
	// lands in a bucket at most 1/64 of itself wide.
	prevHi := int64(-1)
	for i := range numBuckets {
		lo, hi := bucketRange(i)
		if lo != prevHi+1 {
			t.Fatalf("bucket %d starts at %d, previous ended at %d", i, lo, prevHi)
		}
		if lo >= subN && float64(hi-lo+1) > float64(lo)/subN {
			t.Fatalf("bucket %d [%d, %d] wider than 1/%d of its start", i, lo, hi, subN)
		}
		prevHi = hi
	}
	for _, v := range []int64{0, 1, 63, 64, 65, 127, 128, 1000, 123456789, 1 << 40, 1<<46 - 1} {
		lo, hi := bucketRange(bucketOf(v))
		if v < lo || v > hi {
			t.Fatalf("value %d in bucket %d = [%d, %d]", v, bucketOf(v), lo, hi)
		}
	}
}

func TestHistQuantile(t *testing.T) {
	within := func(got, want time.Duration) bool {
		d := float64(got - want)
		return d <= float64(want)/subN && -d <= float64(want)/subN
	}
	t.Run("uniform 1..100000µs", func(t *testing.T) {
		var h hist
		vals := make([]time.Duration, 100000)
		for i := range vals {
			vals[i] = time.Duration(i+1) * time.Microsecond
		}
		rand.Shuffle(len(vals), func(i, j int) { vals[i], vals[j] = vals[j], vals[i] })
		for _, v := range vals {
			h.record(v)
		}
		for _, c := range []struct {
			q    float64
			want time.Duration
		}{{0.5, 50000 * time.Microsecond}, {0.9, 90000 * time.Microsecond}, {0.99, 99000 * time.Microsecond}, {0.999, 99900 * time.Microsecond}, {1, 100000 * time.Microsecond}} {
			if got := h.quantile(c.q); !within(got, c.want) {
				t.Errorf("quantile(%v) = %v, want %v ±1/64", c.q, got, c.want)
			}
		}
		if got, want := h.mean(), 50000500*time.Nanosecond; !within(got, want) {
			t.Errorf("mean = %v, want %v", got, want)
		}
	})
	t.Run("nearest rank, split by merge", func(t *testing.T) {
		// 990 fast, 10 slow: p99 is still fast (rank 990), p99.9 slow.
		var a, b hist
		for range 990 {
			a.record(100 * time.Microsecond)
		}
		for range 10 {
			b.record(7 * time.Millisecond)
		}
		a.merge(&b)
		if got := a.quantile(0.99); got != 100*time.Microsecond {
			t.Errorf("p99 = %v, want 100µs", got)
		}
		if got := a.quantile(0.991); !within(got, 7*time.Millisecond) {
			t.Errorf("p99.1 = %v, want 7ms ±1/64", got)
		}
		if got := a.quantile(0.5); got != 100*time.Microsecond {
			t.Errorf("p50 = %v, want 100µs", got)
		}
		if a.n != 1000 || a.max != int64(7*time.Millisecond) || a.min != int64(100*time.Microsecond) {
			t.Errorf("n, min, max = %d, %d, %d", a.n, a.min, a.max)
		}
	})
	t.Run("empty", func(t *testing.T) {
		var h hist
		if h.quantile(0.99) != 0 || h.mean() != 0 {
			t.Error("empty histogram should report 0")
		}
	})
}

func TestNthAddr(t *testing.T) {
	tests := []struct {
		pfx  string
		n    int
		want string
	}{
		{"2001:db8:1:2:0:1::/96", 1, "2001:db8:1:2:0:1:0:1"},
		{"2001:db8:1:2:0:1::/96", 0x10203, "2001:db8:1:2:0:1:1:203"},
		{"127.0.1.0/24", 255, "127.0.1.255"},
		{"10.0.0.7/16", 256, "10.0.1.0"},
	}
	for _, tt := range tests {
		got, err := nthAddr(netip.MustParsePrefix(tt.pfx), tt.n)
		if err != nil || got != netip.MustParseAddr(tt.want) {
			t.Errorf("nthAddr(%s, %d) = %v, %v; want %s", tt.pfx, tt.n, got, err, tt.want)
		}
	}
	if _, err := nthAddr(netip.MustParsePrefix("127.0.1.0/24"), 256); !errors.Is(err, errConfig) {
		t.Errorf("nthAddr past the prefix: err = %v, want errConfig", err)
	}
	subnets := []struct {
		pfx  string
		per  int
		n    int
		want string
	}{
		{"2001:db8:1:4000::/50", 64, 1, "2001:db8:1:4000::1"},
		{"2001:db8:1:4000::/50", 64, 2, "2001:db8:1:4001::1"},
		{"2001:db8:1:4000::/50", 64, 0x4000, "2001:db8:1:7fff::1"},
		{"2001:db8::/32", 56, 0x101, "2001:db8:1::1"},
		{"2001:db8::/32", 56, 0x102, "2001:db8:1:100::1"},
		{"2001:db8:1:2::/64", 120, 3, "2001:db8:1:2::201"},
		{"2001:db8:1:2::/64", 128, 3, "2001:db8:1:2::2"},
		{"10.0.0.0/8", 24, 2, "10.0.1.1"},
	}
	for _, tt := range subnets {
		got, err := nthSubnetAddr(netip.MustParsePrefix(tt.pfx), tt.per, tt.n)
		if err != nil || got != netip.MustParseAddr(tt.want) {
			t.Errorf("nthSubnetAddr(%s, /%d, %d) = %v, %v; want %s", tt.pfx, tt.per, tt.n, got, err, tt.want)
		}
	}
	for _, bad := range []struct {
		pfx    string
		per, n int
	}{{"2001:db8:1:4000::/50", 64, 0x4001}, {"2001:db8:1:4000::/50", 48, 1}, {"10.0.0.0/8", 24, 0x10001}} {
		if _, err := nthSubnetAddr(netip.MustParsePrefix(bad.pfx), bad.per, bad.n); !errors.Is(err, errConfig) {
			t.Errorf("nthSubnetAddr(%s, /%d, %d): err = %v, want errConfig", bad.pfx, bad.per, bad.n, err)
		}
	}
}

// TestRunAgainstFloor drives the echo floor on loopback with every kind of
// request and checks the books balance: every request sent is answered,
// timed out or failed to send, the per-op counts add up to the total and
// to --count, and the floor saw what was sent. No timing is asserted.
func TestRunAgainstFloor(t *testing.T) {
	f, err := listenFloor([]netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:0")})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { f.serve(ctx, 0, defaultFloorBatch); close(done) }()
	defer func() { cancel(); <-done }()
	server := f.conns[0].LocalAddr().(interface{ AddrPort() netip.AddrPort }).AddrPort()

	const count, prefill = 3000, 200
	m, _ := parseMix("new=20,renew=50,delete=10,malformed=10,unauth=10")
	rep, err := run(context.Background(), config{
		Server: server, Src: netip.MustParsePrefix("127.0.1.0/24"), Clients: 16,
		UnauthSrc: netip.MustParsePrefix("127.0.2.0/24"),
		Ports:     64, PortBase: 20000, Protocol: 6, Lifetime: time.Hour,
		Concurrency: 4, Count: count, Timeout: 2 * time.Second, Prefill: prefill,
		Mix: m, Seed: 7,
	})
	if err != nil {
		t.Fatal(err)
	}
	check := func(name string, p *phase, want uint64) {
		var sum opStats
		for _, s := range p.Ops {
			if s.Sent != s.Answered+s.Timeouts+s.SendErrors {
				t.Errorf("%s: sent %d != answered %d + timeouts %d + send errors %d", name, s.Sent, s.Answered, s.Timeouts, s.SendErrors)
			}
			var res uint64
			for _, c := range s.Results {
				res += c
			}
			if res != s.Answered {
				t.Errorf("%s: results %v add up to %d, answered %d", name, s.Results, res, s.Answered)
			}
			sum.Sent += s.Sent
			sum.Answered += s.Answered
		}
		if sum.Sent != want || p.Total.Sent != want || p.Total.Answered != sum.Answered {
			t.Errorf("%s: sent %d (total %d, answered %d), want %d", name, sum.Sent, p.Total.Sent, p.Total.Answered, want)
		}
		if p.Total.Results["echo"] != p.Total.Answered {
			t.Errorf("%s: results %v, want all echo", name, p.Total.Results)
		}
	}
	check("prefill", rep.Prefill, prefill)
	check("run", rep.Run, count)
	if _, ok := rep.Prefill.Ops["new"]; !ok || len(rep.Prefill.Ops) != 1 {
		t.Errorf("prefill ops = %v, want only new", slices.Collect(maps.Keys(rep.Prefill.Ops)))
	}
	for _, o := range []string{"new", "renew", "delete", "malformed", "unauth"} {
		if rep.Run.Ops[o] == nil || rep.Run.Ops[o].Sent == 0 {
			t.Errorf("run sent no %s", o)
		}
	}
	// Leases: prefill + new - delete, as the generator tracked them.
	if uint64(rep.LiveAtStart) != rep.Prefill.Total.Answered {
		t.Errorf("live leases at start %d, want the %d the prefill created", rep.LiveAtStart, rep.Prefill.Total.Answered)
	}
	created := rep.Prefill.Total.Answered + rep.Run.Ops["new"].Answered
	deleted := rep.Run.Ops["delete"].Sent
	if uint64(rep.LiveLeases) != created-deleted {
		t.Errorf("live leases %d, want %d created - %d deleted", rep.LiveLeases, created, deleted)
	}
	cancel()
	<-done
	if got := f.answered.Load(); got < rep.Prefill.Total.Answered+rep.Run.Total.Answered {
		t.Errorf("floor answered %d, generator counted %d", got, rep.Prefill.Total.Answered+rep.Run.Total.Answered)
	}

	// Both report forms carry the numbers.
	var txt, js bytes.Buffer
	writeText(&txt, rep)
	if !strings.Contains(txt.String(), "p99.9") || !strings.Contains(txt.String(), "malformed") {
		t.Errorf("text report lacks columns:\n%s", txt.String())
	}
	if err := json.NewEncoder(&js).Encode(rep); err != nil {
		t.Fatal(err)
	}
	var back struct {
		Run struct {
			Total struct {
				Sent    uint64
				Latency map[string]float64 `json:"latency_us"`
			}
		}
	}
	if err := json.Unmarshal(js.Bytes(), &back); err != nil {
		t.Fatal(err)
	}
	if back.Run.Total.Sent != count {
		t.Errorf("JSON run.total.sent = %d, want %d", back.Run.Total.Sent, count)
	}
	for _, k := range []string{"p50", "p90", "p99", "p99_9"} {
		if _, ok := back.Run.Total.Latency[k]; !ok {
			t.Errorf("JSON latency lacks %s: %v", k, back.Run.Total.Latency)
		}
	}
}

// TestOpenLoopCount: the open loop sends exactly --count requests at its rate.
func TestOpenLoopCount(t *testing.T) {
	f, err := listenFloor([]netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:0")})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { f.serve(ctx, 1, 1); close(done) }() // per datagram; TestRunAgainstFloor runs the batched floor
	defer func() { cancel(); <-done }()
	server := f.conns[0].LocalAddr().(interface{ AddrPort() netip.AddrPort }).AddrPort()
	rep, err := run(context.Background(), config{
		Server: server, Src: netip.MustParsePrefix("127.0.3.0/24"), Clients: 8,
		Ports: 16, PortBase: 20000, Protocol: 17, Lifetime: time.Hour,
		Concurrency: 8, Rate: 5000, Count: 500, Timeout: 2 * time.Second,
		Mix: mix{opNew: 1, opRenew: 1, opMalformed: 1},
	})
	if err != nil {
		t.Fatal(err)
	}
	if rep.Mode != "open" || rep.Run.Total.Sent != 500 || rep.Run.Total.Sent != rep.Run.Total.Answered+rep.Run.Total.Timeouts+rep.Run.Total.SendErrors {
		t.Errorf("open loop: mode %s, total %+v", rep.Mode, rep.Run.Total)
	}
}

func TestConfigErrors(t *testing.T) {
	good := config{
		Server: netip.MustParseAddrPort("127.0.0.1:5351"), Src: netip.MustParsePrefix("127.0.1.0/24"),
		Clients: 4, Ports: 4, PortBase: 1000, Concurrency: 2, Count: 1, Timeout: time.Second, Mix: mix{opNew: 1},
	}
	if err := good.validate(); err != nil {
		t.Fatal(err)
	}
	for name, mod := range map[string]func(*config){
		"no server":        func(c *config) { c.Server = netip.AddrPort{} },
		"family mismatch":  func(c *config) { c.Src = netip.MustParsePrefix("2001:db8::/64") },
		"clients < conc":   func(c *config) { c.Clients = 1 },
		"ports overflow":   func(c *config) { c.PortBase = 65535 },
		"no bound":         func(c *config) { c.Count = 0 },
		"unauth, no src":   func(c *config) { c.Mix[opUnauth] = 1 },
		"prefill too big":  func(c *config) { c.Prefill = 17 },
		"negative rate":    func(c *config) { c.Rate = -1 },
		"zero concurrency": func(c *config) { c.Concurrency = 0 },
	} {
		c := good
		mod(&c)
		if err := c.validate(); !errors.Is(err, errConfig) {
			t.Errorf("%s: validate() = %v, want errConfig", name, err)
		}
	}
}

// TestOpenLoopCountsFromIntendedTime: when the server cannot keep up with
// the open loop's rate, requests wait before they are sent, and that wait
// is latency (no coordinated omission); the generator's own lateness is
// reported apart (SendLag), and the timeline holds every request. The
// server is a real UDP echo on loopback that takes 10 ms per request (100
// per second) against 400 per second offered.
func TestOpenLoopCountsFromIntendedTime(t *testing.T) {
	pc, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.MustParseAddrPort("127.0.0.1:0")))
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	go func() {
		buf := make([]byte, 2048)
		for {
			n, from, err := pc.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			time.Sleep(10 * time.Millisecond)
			pc.WriteToUDPAddrPort(buf[:n], from)
		}
	}()
	const count = 40
	rep, err := run(context.Background(), config{
		Server: pc.LocalAddr().(*net.UDPAddr).AddrPort(), Src: netip.MustParsePrefix("127.0.4.0/24"), Clients: 1,
		Ports: 64, PortBase: 20000, Protocol: 17, Lifetime: time.Hour,
		Concurrency: 1, Rate: 400, Count: count, Timeout: 2 * time.Second,
		Mix: mix{opNew: 1}, Timeline: 50 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	run := rep.Run
	if run.Total.Answered != count {
		t.Fatalf("answered %d of %d: %+v", run.Total.Answered, count, run.Total)
	}
	// The last request was due at 97.5 ms and answered near 400 ms: from
	// its intended time it waited about 300 ms, though the server itself
	// took 10 ms.
	if p99 := run.Total.Latency.P99; p99 < 150_000 {
		t.Errorf("p99 %.0f µs: the queueing before the send is not counted", p99)
	}
	if run.SendLag == nil || run.SendLag.Max < 150_000 {
		t.Errorf("send lag %+v: the generator's lateness is not reported", run.SendLag)
	}
	var sent uint64
	for _, b := range run.Timeline {
		sent += b.Sent
	}
	if sent != count || len(run.Timeline) < 2 {
		t.Errorf("timeline holds %d requests in %d buckets, want %d", sent, len(run.Timeline), count)
	}
}

// TestOpenLoopBatchesAndStamps: at a long --tick every wake-up sends the
// requests due since the last one in one sendmmsg, and reads the replies
// that came in meanwhile; their latency ends at the kernel's receive
// stamp, not at the read up to a tick later (that wait is RecvLag, apart).
// The echo answers each datagram 2 ms after it came, so every reply
// arrives while the loop sleeps.
func TestOpenLoopBatchesAndStamps(t *testing.T) {
	pc, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.MustParseAddrPort("127.0.0.1:0")))
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	go func() {
		for {
			buf := make([]byte, 2048)
			n, from, err := pc.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			time.AfterFunc(2*time.Millisecond, func() { pc.WriteToUDPAddrPort(buf[:n], from) })
		}
	}()
	server := pc.LocalAddr().(*net.UDPAddr).AddrPort()
	const count, tick = 200, 20 * time.Millisecond
	rep, err := run(context.Background(), config{
		Server: server, Src: netip.MustParsePrefix("127.0.6.0/24"), Clients: 64,
		UnauthSrc: netip.MustParsePrefix("127.0.7.0/24"),
		Ports:     16, PortBase: 20000, Protocol: 17, Lifetime: time.Hour,
		Concurrency: 64, Rate: 1000, Count: count, Timeout: 2 * time.Second, Tick: tick,
		Mix: mix{opNew: 2, opRenew: 1, opMalformed: 1, opUnauth: 1},
	})
	if err != nil {
		t.Fatal(err)
	}
	r := rep.Run
	if r.Total.Answered != count {
		t.Fatalf("answered %d of %d: %+v", r.Total.Answered, count, r.Total)
	}
	// 1000/s at one wake-up per 20 ms: about 20 a call.
	if r.SendCalls == 0 || r.SendCalls > count/5 {
		t.Errorf("%d sendmmsg calls for %d requests: not batched by tick", r.SendCalls, count)
	}
	if r.RecvLag == nil || r.RecvLag.P50 < 10_000 {
		t.Fatalf("recv lag %+v: replies are read a tick after they come", r.RecvLag)
	}
	// Latency = the echo's 2 ms: the wait for the tick (up to 20 ms, p50
	// ≈ 10) is the send lag, outside it, and read times would add most
	// of another tick.
	if r.SendLag == nil || r.SendLag.P50 < 5_000 {
		t.Fatalf("send lag %+v: requests wait for the tick", r.SendLag)
	}
	if r.Total.Latency.P50 > 8_000 {
		t.Errorf("latency p50 %.0f µs, send lag p50 %.0f µs: latency does not run from the send to the kernel's stamp", r.Total.Latency.P50, r.SendLag.P50)
	}
	// The old measure, from the intended time, has the tick's wait in it.
	if d := r.LatencyFromDue; d == nil || d.P50 < r.Total.Latency.P50+r.SendLag.P50/2 {
		t.Errorf("latency from the intended time %+v, from the send p50 %.0f µs: the send lag is not in it", d, r.Total.Latency.P50)
	}
	if r.SendCall == nil || r.Burst == nil || r.Burst.Max < 10 {
		t.Errorf("send call %+v, burst %+v: not reported, or not batched by the tick", r.SendCall, r.Burst)
	}
	if r.CPU == nil || r.CPU.PerRequestUs <= 0 {
		t.Errorf("generator CPU %+v not reported", r.CPU)
	}
}

// TestInflightLatency: a request's latency runs from its send, unless its
// ticket waited for a free in-flight entry (the server's slowness: then
// from its intended time); the old measure always runs from the intended
// time.
func TestInflightLatency(t *testing.T) {
	const ms = int64(time.Millisecond)
	for _, c := range []struct {
		name             string
		e                inflight
		at               int64
		wantD, wantOfDue time.Duration
	}{
		{"on time", inflight{due: 10 * ms, sent: 10 * ms}, 11 * ms, time.Millisecond, time.Millisecond},
		{"generator late", inflight{due: 10 * ms, sent: 16 * ms}, 17 * ms, time.Millisecond, 7 * time.Millisecond},
		{"held by the window", inflight{due: 10 * ms, sent: 16 * ms, held: true}, 17 * ms, 7 * time.Millisecond, 7 * time.Millisecond},
		{"stamp before the send (clock step)", inflight{due: 10 * ms, sent: 12 * ms}, 11 * ms, 0, time.Millisecond},
		{"stamp before the intended time", inflight{due: 10 * ms, sent: 12 * ms}, 9 * ms, 0, 0},
	} {
		t.Run(c.name, func(t *testing.T) {
			d, ofDue := c.e.latency(c.at)
			if d != c.wantD || ofDue != c.wantOfDue {
				t.Errorf("latency(%d) = %s, %s; want %s, %s", c.at, d, ofDue, c.wantD, c.wantOfDue)
			}
		})
	}
}

// TestStampSent: the send time of the datagrams a sendmmsg call sent is
// the stamp taken before that call; datagrams it did not send, and
// entries reused since, keep theirs.
func TestStampSent(t *testing.T) {
	for _, c := range []struct {
		name    string
		off, n  int
		reused  int32 // entry whose stamp no longer matches (-1: none)
		wantNew []bool
	}{
		{"all sent", 0, 4, -1, []bool{true, true, true, true}},
		{"first two sent", 0, 2, -1, []bool{true, true, false, false}},
		{"rest after an error", 1, 3, -1, []bool{false, true, true, true}},
		{"reused entry", 0, 4, 2, []bool{true, true, false, true}},
		{"n past the batch", 2, 100, -1, []bool{false, false, true, true}},
	} {
		t.Run(c.name, func(t *testing.T) {
			l := &openLoop{slots: make([]inflight, 4)}
			b := new(sendBuf)
			for i := range 4 {
				// Datagram i is entry 3-i, stamp 100+i, sent at 1.
				b.idx[i], b.stamps[i] = int32(3-i), uint64(100+i)
				l.slots[3-i] = inflight{stamp: uint64(100 + i), sent: 1}
			}
			if c.reused >= 0 {
				l.slots[3-c.reused].stamp = 999
			}
			l.stampSent(b, c.off, c.n, 42)
			for i, want := range c.wantNew {
				if got := l.slots[3-i].sent == 42; got != want {
					t.Errorf("datagram %d: stamped %v, want %v", i, got, want)
				}
			}
		})
	}
}
