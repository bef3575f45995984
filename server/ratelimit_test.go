package server

import (
	"net/netip"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"go.uber.org/zap/zapcore"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/policy"
)

// TestPKT08UnsupportedVersionSpendsTokens: a packet answered with
// UNSUPP_VERSION (version 3, or version 0 where NAT-PMP is not served)
// spends a token like any other, so a client cannot fill the shared queue
// with them for free; another client is still admitted (PKT-08).
func TestPKT08UnsupportedVersionSpendsTokens(t *testing.T) {
	const burst = 10
	h := newHarness(t, func(c *Config, _ *policy.Config) { c.RateLimit, c.RateBurst = 1, burst })
	now := h.clock.Now()
	v3 := make([]byte, 1100)
	v3[0], v3[1] = 3, 1
	v0 := []byte{0, 0} // from IPv6: NAT-PMP is not served there (PMP-01)
	mapB := pcp.AppendRequest(nil, mapReq(addrB, pcp.ProtoTCP, 80, 80, time.Hour, 1))
	for _, tc := range []struct {
		name string
		pkt  []byte
		src  netip.Addr
	}{
		{"version 3", v3, addrA},
		{"version 0 without NAT-PMP", v0, addrA2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			src := netip.AddrPortFrom(tc.src, 5350)
			admitted := 0
			for range 1000 {
				if h.s.admit(tc.pkt, src, 0, now) == "" {
					admitted++
				}
			}
			if admitted > burst {
				t.Errorf("PKT-08: %d of 1000 admitted from one source, want ≤ %d", admitted, burst)
			}
			mapA := pcp.AppendRequest(nil, mapReq(tc.src, pcp.ProtoTCP, 80, 80, time.Hour, 1))
			if r := h.s.admit(mapA, src, 0, now); r != "rate-limit" {
				t.Errorf("PKT-08: the flooder's MAP after its flood: %q, want rate-limit", r)
			}
			if r := h.s.admit(mapB, netip.AddrPortFrom(addrB, 5350), 0, now); r != "" {
				t.Errorf("PKT-08: another client's MAP: %q, want admitted", r)
			}
		})
	}
}

// TestPKT08OwnerBucket: an owner sending from many /64s (each its own
// source bucket) spends its owner bucket on every request for the engine;
// the bucket binds as soon as another owner wants the engine too (within
// ownerContendWindow) or the queue fills, and the excess is dropped by the
// reader before it is queued. Alone, with a short queue, the owner may use
// the whole engine (a LAN behind one static client).
func TestPKT08OwnerBucket(t *testing.T) {
	const burst = 2
	h := newHarness(t, func(c *Config, _ *policy.Config) { c.RateLimit, c.RateBurst, c.QueueLen = 1, burst, 16 })
	now := h.clock.Now()
	ownerBurst := ownerRateFactor * burst
	// send offers n MAPs from owner a's /64s to the reader's checks and
	// counts those that would be queued for the engine.
	next := 0
	send := func(n int) (queued int) {
		for range n {
			next++
			src := netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0, 0x0a, 0, byte(next), 15: 1}) // 2001:db8:a:<i>::1, owner a
			m := pcp.AppendRequest(nil, mapReq(src, pcp.ProtoTCP, 80, 80, time.Hour, 1))
			ap := netip.AddrPortFrom(src, 5350)
			if h.s.admit(m, ap, 0, now) != "" {
				t.Fatalf("source %s refused by its own bucket", src)
			}
			if r, handled := h.s.early(nil, m, ap, now); !handled {
				queued++
			} else if r != nil {
				t.Fatalf("allowed MAP answered early: % x", r)
			}
		}
		return queued
	}
	queuedB := func() bool {
		m := pcp.AppendRequest(nil, mapReq(addrB, pcp.ProtoTCP, 80, 80, time.Hour, 1))
		_, handled := h.s.early(nil, m, netip.AddrPortFrom(addrB, 5350), now)
		return !handled
	}
	dropped := func() float64 {
		var m dto.Metric
		if err := h.s.m.dropped.WithLabelValues("owner-rate-limit").Write(&m); err != nil {
			t.Fatal(err)
		}
		return m.GetCounter().GetValue()
	}

	if n := send(200); n != 200 {
		t.Fatalf("alone, short queue: %d of 200 requests of one owner queued, want all", n)
	}
	if !queuedB() {
		t.Fatal("PKT-08: another owner's first MAP dropped")
	}
	// a's bucket was spent while it was alone: with b around it binds at once.
	if n := send(200); n != 0 {
		t.Errorf("PKT-08: another owner active: %d of 200 queued, a's bucket was already spent", n)
	}
	now = now.Add(time.Second) // refills ownerRateFactor × rate tokens
	if n, want := send(200), ownerRateFactor*1; n != want {
		t.Errorf("PKT-08: 1 s later, another owner active: %d of 200 queued, want the refill %d", n, want)
	}
	if !queuedB() {
		t.Error("PKT-08: the other owner dropped while a floods")
	}
	if d := dropped(); d != 200+200-ownerRateFactor {
		t.Errorf("owner-rate-limit drops counted: %v, want %d", d, 400-ownerRateFactor)
	}
	// b quiet for longer than the window: a is alone again.
	now = now.Add(ownerContendWindow + time.Second)
	if n := send(200); n != 200 {
		t.Errorf("b quiet for %v: %d of 200 queued, want all", ownerContendWindow+time.Second, n)
	}
	// Alone but the queue filling: the bucket binds again (its tokens: the
	// burst, refilled during the quiet spell, minus what the 200 spent).
	for range cap(h.s.in) / ownerQueueShare {
		h.s.in <- packet{}
	}
	now = now.Add(time.Hour)
	if n := send(200); n != ownerBurst {
		t.Errorf("PKT-08: queue 1/%d full: %d of 200 queued, want the owner burst %d", ownerQueueShare, n, ownerBurst)
	}
}

// TestPerRequestLogsSampled (SEC-04: bounded CPU): per-request log lines
// go through the sampled logger (at most 20 a second each, then 1 in
// 1000) and renewals only at debug, so a busy or hostile client cannot
// make pcpd log one line per request.
func TestPerRequestLogsSampled(t *testing.T) {
	h := newHarness(t, func(c *Config, _ *policy.Config) { c.RateBurst = 1000 })
	for i := range 100 {
		h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, uint16(2000+i), 0, time.Hour, 1)), pcp.Success)
	}
	for i := range 100 {
		h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, uint16(2000+i), 0, time.Hour, 1)), pcp.Success)
	}
	for i := range 100 {
		h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, uint16(2000+i), 0, 0, 1)), pcp.Success)
	}
	info := h.logs.FilterLevelExact(zapcore.InfoLevel)
	for _, msg := range []string{"mapped", "deleted"} {
		if n := info.FilterMessage(msg).Len(); n == 0 || n > 40 {
			t.Errorf("%d %q lines at info for 100 requests, want 1-40 (sampled)", n, msg)
		}
	}
	if n := info.FilterMessage("renewed").Len(); n != 0 {
		t.Errorf("%d renewals logged at info, want them at debug", n)
	}
}
