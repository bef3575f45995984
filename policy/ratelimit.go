package policy

import (
	"hash/maphash"
	"math"
	"math/bits"
	"net/netip"
	"sync"
	"time"
)

// RateLimiter is a per-source token bucket with bounded memory (PKT-08,
// SEC-04). Buckets live in a fixed table of at most maxSources entries,
// allocated once, so a flood from any number of sources cannot grow memory,
// and one source's flood spends only its own tokens. A new source takes the
// place of the least recently used bucket of its set (the table is
// set-associative); a source whose bucket was evicted comes back with a
// full bucket: eviction can only favour a legitimate client, never starve
// it. It is safe for concurrent use: the table is split into independently
// locked shards, so the socket readers (one per core) do not queue on one
// lock, and Allow does not allocate.
type RateLimiter struct {
	b     buckets
	bits6 int // IPv6 sources are counted per /bits6 (128: per address)
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

// Allow reports whether src may be served at now, spending one token. It
// is AllowOn for interface 0. The limiter measures durations between the
// calls' times: now must come from a clock that is not stepped (a
// monotonic one; time.Now's readings are, by their monotonic part).
// Behind the latest time of a source's bucket, it refills nothing.
func (l *RateLimiter) Allow(src netip.Addr, now time.Time) bool {
	return l.AllowOn(src, 0, now)
}

// AllowOn is Allow for src arriving on the interface iface (an interface
// index, or any other number the caller gives each interface; 0: not
// known): one source on two interfaces has two buckets. WireGuard checks a
// source only against the peers of the interface it arrives on, so a peer
// of another interface (a full-tunnel one) may send from a client's
// address: keyed by the source alone, its flood spent the client's bucket
// (TestSourceBucketOtherInterface). Keys are exact, never hashed
// together, so no (iface, source) can be chosen to meet another's bucket.
func (l *RateLimiter) AllowOn(src netip.Addr, iface uint32, now time.Time) bool {
	src = src.Unmap()
	k := key(src) // IPv4 as ::ffff:a.b.c.d, so it never meets an IPv6 key
	if src.Is6() && l.bits6 < 128 {
		m := hostMask(l.bits6)
		k = u128{k.hi &^ m.hi, k.lo &^ m.lo}
	}
	return l.b.allow(k, iface, now)
}

// Len returns the number of sources currently remembered.
func (l *RateLimiter) Len() int { return l.b.len() }

// OwnerRateFactor is how many times a source's rate and burst an owner's
// bucket holds, all its sources together: the server's OwnerRateLimiter
// and, by default, the kernel's owner meter (config, pinhole.Meter), so
// that the kernel lets through what this bucket admits and no more.
const OwnerRateFactor = 8

// OwnerRateLimiter is a token bucket per owner, in addition to the
// per-source one: an owner with many prefixes (a peer holding a /48 has
// 65 536 /64 source buckets) cannot crowd the queue or the source table
// beyond its own bucket (PKT-08, SEC-04). Memory is bounded like
// RateLimiter's; it is safe for concurrent use and Allow does not
// allocate.
type OwnerRateLimiter struct {
	b    buckets
	seed maphash.Seed
}

// NewOwnerRateLimiter returns a limiter allowing each owner rate requests
// per second with bursts of burst, remembering at most maxOwners owners.
// Invalid arguments are raised as NewRateLimiter's are.
func NewOwnerRateLimiter(rate float64, burst, maxOwners int) *OwnerRateLimiter {
	l := &OwnerRateLimiter{seed: maphash.MakeSeed()}
	l.b.init(rate, burst, maxOwners)
	return l
}

// Allow reports whether owner may be served at now, spending one token.
func (l *OwnerRateLimiter) Allow(owner OwnerID, now time.Time) bool {
	return l.AllowKey(l.Key(owner), now)
}

// OwnerKey is an owner as the limiter keys it: a 128-bit keyed hash of its
// ID (a collision between two owners is a 2⁻¹²⁸ event), cheap to compare
// and to keep in atomics.
type OwnerKey struct{ Hi, Lo uint64 }

// Key returns owner's key in this limiter.
func (l *OwnerRateLimiter) Key(owner OwnerID) OwnerKey {
	var h maphash.Hash
	h.SetSeed(l.seed)
	h.WriteString(string(owner))
	hi := h.Sum64()
	h.WriteByte(0)
	return OwnerKey{hi, h.Sum64()}
}

// AllowKey is Allow for an owner already hashed by Key.
func (l *OwnerRateLimiter) AllowKey(k OwnerKey, now time.Time) bool {
	return l.b.allow(u128{k.Hi, k.Lo}, 0, now)
}

// Len returns the number of owners currently remembered.
func (l *OwnerRateLimiter) Len() int { return l.b.len() }

// buckets is the token buckets of one limiter: a set-associative table of
// ways-entry sets, the sets spread over shards that each have a lock. The
// table is allocated once; nothing is allocated per key.
type buckets struct {
	rate   float64 // tokens per second
	burst  float64
	base   time.Time // entry times are offsets from it (monotonic when now is)
	sets   uint64
	ways   int
	seed   [2]uint64
	slots  []slot
	shards [nShards]shard
}

// slot is one bucket of the table: 32 bytes, so a set of four is two
// cache lines. float32 counts tokens exactly up to 2²⁴, far above any
// sane burst; a larger one is as good as unlimited anyway. The key is
// (k, iface); tag is iface+1, so that 0 marks a free slot (interface
// 2³²-1 shares interface 0's buckets: Linux indexes are int32).
type slot struct {
	k      u128
	last   int64 // now - base in nanoseconds at the last refill
	tokens float32
	tag    uint32 // iface+1; 0: free
}

// shard is the lock of the sets whose index is congruent to it modulo
// nShards, padded so two shards' locks never share a cache line.
type shard struct {
	mu sync.Mutex
	n  int // entries in use
	_  [64 - 16]byte
}

const (
	nShards = 64
	maxWays = 4 // entries compared per lookup: two cache lines
)

func (l *buckets) init(rate float64, burst, maxKeys int) {
	if !(rate > 0) || math.IsInf(rate, 0) {
		rate = 1
	}
	l.rate, l.burst = rate, float64(max(burst, 1))
	maxKeys = max(maxKeys, 1)
	l.ways = min(maxWays, maxKeys)
	l.sets = uint64(maxKeys / l.ways) // sets×ways ≤ maxKeys: the bound holds exactly
	l.slots = make([]slot, int(l.sets)*l.ways)
	l.base = time.Now()
	s := maphash.MakeSeed()
	l.seed[0] = maphash.Comparable(s, uint64(1)) | 1
	l.seed[1] = maphash.Comparable(s, uint64(2))
}

// set returns the index of k's set: a keyed mix, so a sender cannot pick
// keys that all land in one set.
func (l *buckets) set(k u128) uint64 {
	h := (k.hi ^ l.seed[1]) * 0x9e3779b97f4a7c15
	h ^= bits.RotateLeft64(k.lo, 31) ^ l.seed[0]
	h *= 0xbf58476d1ce4e5b9
	h ^= h >> 29
	hi, _ := bits.Mul64(h, l.sets) // uniform in [0, sets) without a division
	return hi
}

func (l *buckets) allow(k u128, iface uint32, now time.Time) bool {
	t := int64(now.Sub(l.base))
	tag := max(iface+1, 1) // 2³²-1 wraps to 0 (free): interface 0's
	si := l.set(u128{k.hi ^ uint64(iface)<<32, k.lo})
	sh := &l.shards[si%nShards]
	set := l.slots[int(si)*l.ways : int(si+1)*l.ways]
	sh.mu.Lock()
	defer sh.mu.Unlock()
	victim := 0
	for i := range set {
		e := &set[i]
		if e.tag == 0 {
			victim = i
			break
		}
		if e.k == k && e.tag == tag {
			// dt < 0: another reader's later reading came first (the
			// clock must not go back otherwise: a step back would make
			// idle entries look newest, never evicted; the server's is
			// steady, server/clock.go). No time passed.
			if dt := t - e.last; dt > 0 {
				e.tokens = float32(min(l.burst, float64(e.tokens)+float64(dt)*1e-9*l.rate))
				e.last = t
			}
			if e.tokens < 1 {
				return false
			}
			e.tokens--
			return true
		}
		if e.last < set[victim].last {
			victim = i
		}
	}
	e := &set[victim]
	if e.tag == 0 {
		// A free entry is only found after every used one of the set (they
		// fill in order, and entries are never freed), so k is not in it.
		sh.n++
	}
	*e = slot{k: k, last: t, tokens: float32(l.burst - 1), tag: tag}
	return true
}

func (l *buckets) len() int {
	n := 0
	for i := range l.shards {
		l.shards[i].mu.Lock()
		n += l.shards[i].n
		l.shards[i].mu.Unlock()
	}
	return n
}
