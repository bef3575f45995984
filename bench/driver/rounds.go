package main

import (
	"fmt"
	"slices"
	"strings"
)

// Rounds (--rounds N): the closed-loop rows are measured N times in one
// run. In each round every server in the rounds (roundServers) runs each
// closed-loop scenario on a fresh start, in an order rotated from round
// to round (roundOrder), so that no server always runs first or last,
// beside whatever the box's other tenants do then. Each round's ratio is
// pcpd's rate over the same round's floor rate; the table reports every
// round's ratio and their median, and judges the target on the median.
// On the shared 2-core box one row's ratio swings by 20-40 points between
// single runs, so a single measurement missed some row in every run, a
// different one each time (BENCHMARKS.md "Two floors").

// defaultRounds: five rounds of the three servers' closed loops (≈ 33 s
// each) add ≈ 7 minutes to a full run; a median of five stands two
// outlying rounds, a median of three only one.
const defaultRounds = 5

// roundServers are the servers measured in rounds, in the order given:
// the floors and pcpd (not with --scale-only, which skips pcpd's closed
// loop). miniupnpd runs its closed loop once, after the rounds: its one
// ratio target is ≥ 100× and pcpd is > 3 000× it, and each of its runs
// costs ≈ 2.5 minutes (it stops answering two scenarios, and pcpload
// waits 60 s for each).
func (o *options) roundServers() []string {
	var out []string
	for _, s := range o.servers {
		switch s {
		case batchedFloor, bareFloor:
			out = append(out, s)
		case "pcpd":
			if !o.scaleOnly {
				out = append(out, s)
			}
		}
	}
	return out
}

// roundOrder is the order servers run in round r (0-based): the given
// order rotated left by r, so that over len(servers) rounds each server
// holds each place once.
func roundOrder(servers []string, r int) []string {
	n := len(servers)
	if n == 0 {
		return nil
	}
	k := r % n
	return append(slices.Clone(servers[k:]), servers[:k]...)
}

// median of v (the mean of the middle two for an even count); 0 for none.
func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	m := len(s) / 2
	if len(s)%2 == 1 {
		return s[m]
	}
	return (s[m-1] + s[m]) / 2
}

// putRound records server's figure key of round r (0-based).
func (b *bench) putRound(server, key string, r int, v float64, unit, note string) {
	if b.rounds == nil {
		b.rounds = map[string]map[string][]*figure{}
	}
	if b.rounds[server] == nil {
		b.rounds[server] = map[string][]*figure{}
	}
	f := b.rounds[server][key]
	for len(f) <= r {
		f = append(f, nil)
	}
	f[r] = &figure{value: v, unit: unit, note: note}
	b.rounds[server][key] = f
}

// roundValues is server's figure key in each round (nil where that round
// did not measure it).
func (b *bench) roundValues(server, key string) []*figure {
	if m := b.rounds[server]; m != nil {
		return m[key]
	}
	return nil
}

// foldRounds sets each figure measured in rounds to its median over the
// rounds that measured it; with more than one, the note lists each
// round's value and the rounds' own notes.
func (b *bench) foldRounds() {
	for srv, m := range b.rounds {
		for key, figs := range m {
			var vals []float64
			var unit string
			var each, notes []string
			for i, f := range figs {
				if f == nil {
					each = append(each, "–")
					continue
				}
				vals = append(vals, f.value)
				unit = f.unit
				each = append(each, fmtValue(f.value, f.unit))
				if f.note != "" && len(figs) > 1 {
					notes = append(notes, fmt.Sprintf("round %d: %s", i+1, f.note))
				} else if f.note != "" {
					notes = append(notes, f.note)
				}
			}
			if len(vals) == 0 {
				continue
			}
			note := strings.Join(notes, "; ")
			if len(figs) > 1 {
				note = strings.Join(append([]string{fmt.Sprintf("median of %d rounds: %s", len(vals), strings.Join(each, " / "))}, notes...), "; ")
			}
			b.put(srv, key, median(vals), unit, note)
		}
	}
}

// roundRatios is pcpd's figure key over ref's figure refKey in each
// round (nil where either is missing or the reference is 0).
func (b *bench) roundRatios(key, ref, refKey string) []*float64 {
	p, r := b.roundValues("pcpd", key), b.roundValues(ref, refKey)
	out := make([]*float64, len(p))
	for i, pf := range p {
		if pf == nil || pf.unit != "/s" || i >= len(r) || r[i] == nil || r[i].value <= 0 {
			continue
		}
		q := pf.value / r[i].value
		out[i] = &q
	}
	return out
}

// medianRatio is the median of the rounds' ratios that exist (nil if
// none does).
func medianRatio(qs []*float64) *float64 {
	var v []float64
	for _, q := range qs {
		if q != nil {
			v = append(v, *q)
		}
	}
	if len(v) == 0 {
		return nil
	}
	m := median(v)
	return &m
}

// roundJSON is one round of a closed-loop row in table.json.
type roundJSON struct {
	Round int      `json:"round"` // 1-based
	Order []string `json:"order,omitempty"`
	// Values: each server's figure in this round (absent: not measured).
	Values          map[string]float64 `json:"values"`
	PerBareFloor    *float64           `json:"pcpd_per_bare_floor,omitempty"`
	PerBatchedFloor *float64           `json:"pcpd_per_batched_floor,omitempty"`
}

// rowRounds is row key's rounds (for a row whose pcpd figure was measured
// in more than one round; nil otherwise) with the medians of pcpd's
// ratios to both floors over them.
func (b *bench) rowRounds(key string) (rounds []roundJSON, perBare, perBatched *float64) {
	p := b.roundValues("pcpd", key)
	if len(p) < 2 {
		return nil, nil, nil
	}
	bare, batched := b.roundRatios(key, bareFloor, key), b.roundRatios(key, batchedFloor, key)
	for i := range p {
		rj := roundJSON{Round: i + 1, Values: map[string]float64{}, PerBareFloor: bare[i], PerBatchedFloor: batched[i]}
		if i < len(b.roundOrders) {
			rj.Order = b.roundOrders[i]
		}
		for _, srv := range []string{batchedFloor, bareFloor, "pcpd"} {
			if f := b.roundValues(srv, key); i < len(f) && f[i] != nil {
				rj.Values[srv] = f[i].value
			}
		}
		rounds = append(rounds, rj)
	}
	return rounds, medianRatio(bare), medianRatio(batched)
}
