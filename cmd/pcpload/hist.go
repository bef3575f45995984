package main

import (
	"math"
	"math/bits"
	"time"
)

// hist is a log-linear latency histogram (the HdrHistogram idea): values
// below 2^subBits nanoseconds are exact, above that each power of two is
// cut into 2^subBits buckets, so any recorded value is known to within
// 1/64 (1.6 %) of itself. Each worker keeps its own and they are merged
// at the end, so recording is lock-free and allocation-free.
type hist struct {
	counts [numBuckets]uint64
	n      uint64
	sum    float64 // nanoseconds, for the mean
	min    int64
	max    int64
}

const (
	subBits = 6
	subN    = 1 << subBits
	// maxExp caps the histogram at 2^(maxExp+subBits+1) ns (about 38 h);
	// larger values are clamped into the top bucket.
	maxExp     = 40
	numBuckets = (maxExp + 2) * subN
)

// bucketOf returns the index of the bucket holding v (ns, v >= 0).
func bucketOf(v int64) int {
	if v < subN {
		if v < 0 {
			return 0
		}
		return int(v)
	}
	e := bits.Len64(uint64(v)) - subBits - 1 // v>>e is in [subN, 2*subN)
	if e > maxExp {
		return numBuckets - 1
	}
	return (e+1)*subN + int(v>>e) - subN
}

// bucketRange returns the smallest and largest value bucket i holds.
func bucketRange(i int) (lo, hi int64) {
	if i < subN {
		return int64(i), int64(i)
	}
	e := i/subN - 1
	m := int64(i%subN + subN)
	return m << e, (m+1)<<e - 1
}

func (h *hist) record(d time.Duration) {
	v := int64(d)
	if h.n == 0 || v < h.min {
		h.min = v
	}
	if v > h.max {
		h.max = v
	}
	h.counts[bucketOf(v)]++
	h.n++
	h.sum += float64(v)
}

func (h *hist) merge(o *hist) {
	if o.n == 0 {
		return
	}
	if h.n == 0 || o.min < h.min {
		h.min = o.min
	}
	if o.max > h.max {
		h.max = o.max
	}
	for i, c := range o.counts {
		h.counts[i] += c
	}
	h.n += o.n
	h.sum += o.sum
}

// quantile returns the q-quantile (0 < q <= 1) by the nearest-rank rule:
// the smallest recorded value v such that at least q*n values are <= v,
// reported as the middle of its bucket (clamped to the observed min and
// max, so a single-valued histogram answers exactly). 0 when empty.
func (h *hist) quantile(q float64) time.Duration {
	if h.n == 0 {
		return 0
	}
	rank := uint64(math.Ceil(q * float64(h.n)))
	if rank < 1 {
		rank = 1
	}
	if rank > h.n {
		rank = h.n
	}
	var cum uint64
	for i, c := range h.counts {
		cum += c
		if cum >= rank {
			lo, hi := bucketRange(i)
			v := lo + (hi-lo)/2
			v = max(v, h.min)
			v = min(v, h.max)
			return time.Duration(v)
		}
	}
	return time.Duration(h.max)
}

func (h *hist) mean() time.Duration {
	if h.n == 0 {
		return 0
	}
	return time.Duration(h.sum / float64(h.n))
}

// latency is the summary reported for a histogram, in microseconds.
type latency struct {
	P50  float64 `json:"p50"`
	P90  float64 `json:"p90"`
	P99  float64 `json:"p99"`
	P999 float64 `json:"p99_9"`
	Max  float64 `json:"max"`
	Mean float64 `json:"mean"`
}

func us(d time.Duration) float64 { return math.Round(float64(d)/10) / 100 }

func (h *hist) summary() latency {
	return latency{
		P50:  us(h.quantile(0.50)),
		P90:  us(h.quantile(0.90)),
		P99:  us(h.quantile(0.99)),
		P999: us(h.quantile(0.999)),
		Max:  us(time.Duration(h.max)),
		Mean: us(h.mean()),
	}
}
