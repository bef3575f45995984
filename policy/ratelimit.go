package policy

import (
	"math"
	"net/netip"
	"sync"
	"time"

	"github.com/hashicorp/golang-lru/v2/simplelru"
)

// RateLimiter is a per-source token bucket with bounded memory (PKT-08,
// SEC-04). Buckets live in an LRU of at most maxSources entries, so a flood
// from any number of sources cannot grow memory, and one source's flood
// spends only its own tokens. A source whose bucket was evicted comes back
// with a full bucket: eviction can only favour a legitimate client, never
// starve it. It is safe for concurrent use.
type RateLimiter struct {
	b     buckets[netip.Addr]
	bits6 int // IPv6 sources are counted per /bits6 (128: per address)
}

// buckets is the token buckets of one limiter, keyed by source or owner.
type buckets[K comparable] struct {
	mu    sync.Mutex
	rate  float64 // tokens per second
	burst float64
	lru   *simplelru.LRU[K, *bucket]
	free  []*bucket // evicted buckets, reused to avoid an allocation per new key
}

// RateLimiterOption adjusts NewRateLimiter.
type RateLimiterOption func(*RateLimiter)

// WithIPv6Prefix counts IPv6 sources per /bits prefix instead of per
// address. A WireGuard peer may send from any address of its AllowedIPs, so
// per address it could mint a fresh bucket per request; per /64 it cannot
// (short of owning many /64s), at the price of hosts in one /64 sharing a
// bucket. bits outside [1, 128] leave the default, 128.
func WithIPv6Prefix(bits int) RateLimiterOption {
	return func(l *RateLimiter) {
		if bits >= 1 && bits <= 128 {
			l.bits6 = bits
		}
	}
}

type bucket struct {
	tokens float64
	last   time.Time
}

// NewRateLimiter returns a limiter allowing each source rate requests per
// second with bursts of burst, remembering at most maxSources sources.
// Invalid arguments (rate ≤ 0 or NaN, burst < 1, maxSources < 1) are raised
// to the smallest meaningful value: a limiter is never unlimited by mistake.
func NewRateLimiter(rate float64, burst int, maxSources int, opts ...RateLimiterOption) *RateLimiter {
	l := &RateLimiter{bits6: 128}
	l.b.init(rate, burst, maxSources)
	for _, o := range opts {
		o(l)
	}
	return l
}

func (l *buckets[K]) init(rate float64, burst, maxKeys int) {
	if !(rate > 0) || math.IsInf(rate, 0) {
		rate = 1
	}
	l.rate, l.burst = rate, float64(max(burst, 1))
	l.lru, _ = simplelru.NewLRU(max(maxKeys, 1), func(_ K, b *bucket) {
		if len(l.free) < 64 {
			l.free = append(l.free, b)
		}
	})
}

// Allow reports whether src may be served at now, spending one token.
func (l *RateLimiter) Allow(src netip.Addr, now time.Time) bool {
	src = src.Unmap().WithZone("")
	if src.Is6() && l.bits6 < 128 {
		p, _ := src.Prefix(l.bits6)
		src = p.Addr()
	}
	return l.b.allow(src, now)
}

func (l *buckets[K]) allow(k K, now time.Time) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	b, ok := l.lru.Get(k)
	if !ok {
		if n := len(l.free); n > 0 {
			b, l.free = l.free[n-1], l.free[:n-1]
		} else {
			b = new(bucket)
		}
		*b = bucket{tokens: l.burst - 1, last: now}
		l.lru.Add(k, b)
		return true
	}
	if dt := now.Sub(b.last); dt > 0 {
		b.tokens = min(l.burst, b.tokens+dt.Seconds()*l.rate)
		b.last = now
	}
	if b.tokens < 1 {
		return false
	}
	b.tokens--
	return true
}

// Len returns the number of sources currently remembered.
func (l *RateLimiter) Len() int { return l.b.len() }

func (l *buckets[K]) len() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.lru.Len()
}

// OwnerRateLimiter is a token bucket per owner, in addition to the
// per-source one: an owner with many prefixes (a peer holding a /48 has
// 65 536 /64 source buckets) cannot crowd the queue or the source LRU
// beyond its own bucket (PKT-08, SEC-04). Memory is bounded like
// RateLimiter's; it is safe for concurrent use.
type OwnerRateLimiter struct{ b buckets[OwnerID] }

// NewOwnerRateLimiter returns a limiter allowing each owner rate requests
// per second with bursts of burst, remembering at most maxOwners owners.
// Invalid arguments are raised as NewRateLimiter's are.
func NewOwnerRateLimiter(rate float64, burst, maxOwners int) *OwnerRateLimiter {
	l := &OwnerRateLimiter{}
	l.b.init(rate, burst, maxOwners)
	return l
}

// Allow reports whether owner may be served at now, spending one token.
func (l *OwnerRateLimiter) Allow(owner OwnerID, now time.Time) bool { return l.b.allow(owner, now) }

// Len returns the number of owners currently remembered.
func (l *OwnerRateLimiter) Len() int { return l.b.len() }
