package policy

import (
	"encoding/binary"
	"net/netip"
	"runtime"
	"testing"
	"time"
	"unsafe"
)

// TestRateLimiterPKT08: a flood from A spends only A's tokens; B is still
// served; A recovers at the configured rate.
func TestRateLimiterPKT08(t *testing.T) {
	l := NewRateLimiter(10, 5, 100)
	t0 := time.Unix(1_000_000, 0)
	a, b := addr("2001:db8:a::1"), addr("2001:db8:b::1")
	allowed := 0
	for range 1000 {
		if l.Allow(a, t0) {
			allowed++
		}
	}
	if allowed != 5 {
		t.Errorf("flood from A at one instant: %d allowed, want the burst 5", allowed)
	}
	if !l.Allow(b, t0) {
		t.Error("B refused while A floods")
	}
	if l.Allow(a, t0.Add(50*time.Millisecond)) {
		t.Error("A allowed after 50 ms at 10/s (half a token)")
	}
	if !l.Allow(a, t0.Add(100*time.Millisecond)) {
		t.Error("A refused after 100 ms at 10/s (one token)")
	}
	// A long pause refills only up to the burst.
	n := 0
	for range 100 {
		if l.Allow(a, t0.Add(time.Hour)) {
			n++
		}
	}
	if n != 5 {
		t.Errorf("after an hour: %d allowed, want burst 5", n)
	}
	// An IPv4-mapped source is the same source as its IPv4 form.
	l4 := NewRateLimiter(1, 1, 10)
	if !l4.Allow(addr("10.0.0.1"), t0) || l4.Allow(addr("::ffff:10.0.0.1"), t0) {
		t.Error("mapped and plain IPv4 counted separately")
	}
	// Time going backwards neither refills nor panics.
	if l4.Allow(addr("10.0.0.1"), t0.Add(-time.Hour)) {
		t.Error("clock step back refilled the bucket")
	}
	// Two readers: the one with the earlier reading may come second. It
	// spends nothing it has not got and does not move the refill's start
	// back: a second at 1/s after the later reading is one token, not one
	// and a bit (it was, while the limiter resynced to a clock that went
	// back; the server's clock no longer steps, server/clock.go).
	l1 := NewRateLimiter(1, 1, 10)
	src := addr("10.0.0.2")
	if !l1.Allow(src, t0) || !l1.Allow(src, t0.Add(time.Second)) {
		t.Fatal("a token a second at 1/s: refused")
	}
	if l1.Allow(src, t0.Add(time.Second-time.Millisecond)) {
		t.Error("an earlier reading after a later one: allowed with the bucket empty")
	}
	if l1.Allow(src, t0.Add(2*time.Second-time.Millisecond)) {
		t.Error("999 ms after the last refill at 1/s: allowed (the earlier reading moved the refill's start back)")
	}
}

// TestRateLimiterFloodBoundedSEC04: a million distinct sources keep the LRU
// at its cap and the heap bounded, and a steady legitimate client sending
// within its rate is never refused during the flood.
func TestRateLimiterFloodBoundedSEC04(t *testing.T) {
	const limit = 10_000
	l := NewRateLimiter(1, 3, limit)
	legit := addr("2001:db8:ffff::1")
	var before runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	now := time.Unix(2_000_000, 0)
	var b [16]byte
	b[0], b[1] = 0x20, 0x01
	for i := range 1_000_000 {
		binary.BigEndian.PutUint64(b[8:], uint64(i))
		now = now.Add(time.Microsecond)
		// Spread over interfaces too (AllowOn): keys of (interface,
		// source) are bounded by the same table.
		if !l.AllowOn(netip.AddrFrom16(b), uint32(i%4), now) {
			t.Fatalf("fresh source %d refused", i)
		}
		if i%2000 == 0 { // legit: one request per 2 ms of flood time ≪ its bucket
			now = now.Add(time.Second)
			if !l.Allow(legit, now) {
				t.Fatalf("legitimate client refused at flood packet %d", i)
			}
		}
		if n := l.Len(); n > limit {
			t.Fatalf("LRU holds %d sources, cap %d", n, limit)
		}
	}
	if n := l.Len(); n != limit {
		t.Errorf("LRU holds %d sources after the flood, want exactly the cap %d", n, limit)
	}
	var after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&after)
	// 10 000 entries cost well under 10 MiB; a million would cost ~100 MiB.
	if grow := int64(after.HeapAlloc) - int64(before.HeapAlloc); grow > 10<<20 {
		t.Errorf("heap grew by %d bytes during the flood", grow)
	}
}

// TestRateLimiterPerInterface: a source's bucket is its own on each
// interface (AllowOn): a flood from one interface (a WireGuard peer of
// another interface may send from a client's address) leaves the same
// source's bucket on another interface full, whatever the address family
// or prefix counting; on one interface it is still one bucket.
func TestRateLimiterPerInterface(t *testing.T) {
	if n := unsafe.Sizeof(slot{}); n != 32 {
		t.Errorf("slot is %d bytes, want 32 (a set of four in two cache lines)", n)
	}
	for _, tc := range []struct {
		name          string
		src, other    string // other: same bucket as src on one interface
		bits6         int
		flood, client uint32
	}{
		{"ipv6 per address", "2001:db8::5", "2001:db8::5", 128, 2, 1},
		{"ipv6 per /64", "2001:db8::5", "2001:db8::6", 64, 2, 1},
		{"ipv4", "10.0.0.5", "::ffff:10.0.0.5", 128, 7, 3},
		{"interface 0 (Allow) apart", "2001:db8::5", "2001:db8::5", 128, 1, 0},
		{"largest numbers", "2001:db8::5", "2001:db8::5", 128, 1<<32 - 2, 1 << 31},
	} {
		t.Run(tc.name, func(t *testing.T) {
			const burst = 5
			l := NewRateLimiter(1, burst, 1024, WithIPv6Prefix(tc.bits6))
			now := time.Unix(3_000_000, 0)
			for range 100 * burst {
				l.AllowOn(addr(tc.src), tc.flood, now)
			}
			if l.AllowOn(addr(tc.other), tc.flood, now) {
				t.Errorf("flooded bucket on interface %d still admits %s", tc.flood, tc.other)
			}
			for i := range burst {
				if !l.AllowOn(addr(tc.other), tc.client, now) {
					t.Fatalf("%s on interface %d refused after %d of its burst %d: the flood on interface %d spent it", tc.other, tc.client, i, burst, tc.flood)
				}
			}
			if l.AllowOn(addr(tc.src), tc.client, now) {
				t.Errorf("interface %d's bucket of %s admits beyond its burst", tc.client, tc.src)
			}
		})
	}
}

// TestRateLimiterIPv6PrefixPKT08: per-/64 counting stops a source from
// minting fresh buckets by cycling addresses inside its prefix.
func TestRateLimiterIPv6PrefixPKT08(t *testing.T) {
	t0 := time.Unix(3_000_000, 0)
	for _, c := range []struct {
		bits    int
		allowed int
	}{{0, 100}, {128, 100}, {64, 2}} {
		l := NewRateLimiter(1, 2, 1000, WithIPv6Prefix(c.bits))
		n := 0
		for i := range 100 {
			a := netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0, 0xa, 0, 0, 0, 0, 0, 0, 0, 0, 0, byte(i)})
			if l.Allow(a, t0) {
				n++
			}
		}
		if n != c.allowed {
			t.Errorf("/%d: %d of 100 addresses in one /64 allowed, want %d", c.bits, n, c.allowed)
		}
		if !l.Allow(addr("2001:db8:a:1::1"), t0) || !l.Allow(addr("10.0.0.1"), t0) {
			t.Errorf("/%d: another /64 or IPv4 source refused", c.bits)
		}
	}
}

func TestRateLimiterBadArguments(t *testing.T) {
	l := NewRateLimiter(0, 0, 0) // raised to 1/s, burst 1, one source
	t0 := time.Unix(0, 0)
	if !l.Allow(addr("10.0.0.1"), t0) || l.Allow(addr("10.0.0.1"), t0) {
		t.Error("zero arguments did not become burst 1")
	}
	if !l.Allow(addr("10.0.0.2"), t0) || l.Len() != 1 {
		t.Errorf("maxSources 0 did not become 1: len %d", l.Len())
	}
}

func BenchmarkRateLimiterAllow(b *testing.B) {
	l := NewRateLimiter(1e9, 1e9, 10_000)
	srcs := make([]netip.Addr, 1000)
	for i := range srcs {
		srcs[i] = netip.AddrFrom4([4]byte{10, 0, byte(i >> 8), byte(i)})
	}
	now := time.Now()
	b.ReportAllocs()
	done := cpuClock(b)
	for i := 0; b.Loop(); i++ {
		l.Allow(srcs[i%len(srcs)], now)
	}
	done()
}

// TestOwnerRateLimiterPKT08: one bucket per owner, independent of the
// others, refilled at its rate, with bounded memory.
func TestOwnerRateLimiterPKT08(t *testing.T) {
	l := NewOwnerRateLimiter(2, 3, 2)
	now := time.Date(2026, 11, 23, 9, 0, 0, 0, time.UTC)
	allowed := func(o OwnerID) int {
		n := 0
		for range 10 {
			if l.Allow(o, now) {
				n++
			}
		}
		return n
	}
	if n := allowed("wg:a"); n != 3 {
		t.Errorf("burst: %d allowed, want 3", n)
	}
	if n := allowed("wg:b"); n != 3 {
		t.Errorf("another owner: %d allowed, want 3", n)
	}
	now = now.Add(time.Second)
	if n := allowed("wg:a"); n != 2 {
		t.Errorf("after 1 s at 2/s: %d allowed, want 2", n)
	}
	allowed("wg:c")
	if l.Len() != 2 {
		t.Errorf("owners remembered: %d, want the bound 2", l.Len())
	}
}

// TestRateLimiterMemoryFlatSEC04: once the table holds maxSources sources,
// more distinct sources cost no memory at all: the live heap after 1 000 000
// sources is what it was after 250 000. (The golang-lru map it replaces,
// churned by a new key per packet, kept growing at its cap: live heap
// +13.6 MiB after 250 000 sources, +18.7 MiB after 1 000 000.)
func TestRateLimiterMemoryFlatSEC04(t *testing.T) {
	live := func() int64 {
		var ms runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&ms)
		return int64(ms.HeapAlloc)
	}
	before := live()
	l := NewRateLimiter(50, 100, 65536, WithIPv6Prefix(64))
	now := time.Unix(4_000_000, 0)
	var b [16]byte
	at := map[int]int64{}
	for i := range 1_000_000 {
		binary.BigEndian.PutUint64(b[:8], 0x2001_0db8_0100_0000|uint64(i)) // a new /64 each
		b[15] = 1
		l.Allow(netip.AddrFrom16(b), now)
		if n := i + 1; n == 250_000 || n == 1_000_000 {
			at[n] = live() - before
		}
	}
	if l.Len() != 65536 {
		t.Fatalf("%d sources remembered, want the cap 65536", l.Len())
	}
	t.Logf("live heap of the limiter: %d KiB after 250 000 sources, %d KiB after 1 000 000", at[250_000]>>10, at[1_000_000]>>10)
	if grow := at[1_000_000] - at[250_000]; grow > 64<<10 {
		t.Errorf("live heap grew %d KiB between 250 000 and 1 000 000 sources with the table full", grow>>10)
	}
	if at[1_000_000] > 4<<20 {
		t.Errorf("65 536 sources take %d KiB, want ≤ 4 MiB", at[1_000_000]>>10)
	}
}

// BenchmarkRateLimiterAllowParallel is both readers at once on distinct
// sources: the shards keep them off each other's lock.
func BenchmarkRateLimiterAllowParallel(b *testing.B) {
	l := NewRateLimiter(1e9, 1e9, 65536, WithIPv6Prefix(64))
	now := time.Now()
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		var a [16]byte
		a[0], a[1] = 0x20, 0x01
		for i := uint64(0); pb.Next(); i++ {
			binary.BigEndian.PutUint64(a[:8], 0x2001_0db8_0000_0000|(i%4096))
			l.Allow(netip.AddrFrom16(a), now)
		}
	})
}
