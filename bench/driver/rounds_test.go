package main

import (
	"encoding/json"
	"slices"
	"strings"
	"testing"
)

func TestMedian(t *testing.T) {
	for _, c := range []struct {
		in   []float64
		want float64
	}{
		{nil, 0},
		{[]float64{7}, 7},
		{[]float64{3, 1, 2}, 2},
		{[]float64{0.85, 0.70, 0.75}, 0.75},
		{[]float64{4, 1, 3, 2}, 2.5}, // even: the middle two's mean
		{[]float64{5, 5, 1, 9, 9}, 5},
	} {
		in := slices.Clone(c.in)
		if got := median(c.in); got != c.want {
			t.Errorf("median(%v) = %v, want %v", c.in, got, c.want)
		}
		if !slices.Equal(in, c.in) {
			t.Errorf("median reordered its argument: %v, was %v", c.in, in)
		}
	}
}

// TestRoundOrder: round 0 runs the servers in the order given; each
// round rotates it, so that over as many rounds as servers each server
// holds every place once (none is always first or last), and the rotation
// goes on past that.
func TestRoundOrder(t *testing.T) {
	srv := []string{batchedFloor, bareFloor, "pcpd"}
	for _, c := range []struct {
		r    int
		want []string
	}{
		{0, []string{batchedFloor, bareFloor, "pcpd"}},
		{1, []string{bareFloor, "pcpd", batchedFloor}},
		{2, []string{"pcpd", batchedFloor, bareFloor}},
		{3, []string{batchedFloor, bareFloor, "pcpd"}},
		{4, []string{bareFloor, "pcpd", batchedFloor}},
	} {
		if got := roundOrder(srv, c.r); !slices.Equal(got, c.want) {
			t.Errorf("roundOrder(%v, %d) = %v, want %v", srv, c.r, got, c.want)
		}
	}
	if !slices.Equal(srv, []string{batchedFloor, bareFloor, "pcpd"}) {
		t.Errorf("roundOrder changed its argument: %v", srv)
	}
	for _, n := range []int{1, 2, 3, 4} {
		servers := []string{"a", "b", "c", "d"}[:n]
		places := map[string]map[int]bool{}
		for r := range n {
			order := roundOrder(servers, r)
			if len(order) != n {
				t.Fatalf("round %d of %v: %v", r, servers, order)
			}
			for i, s := range order {
				if places[s] == nil {
					places[s] = map[int]bool{}
				}
				places[s][i] = true
			}
		}
		for _, s := range servers {
			if len(places[s]) != n {
				t.Errorf("%d servers, %d rounds: %s held places %v, want each of 0..%d", n, n, s, places[s], n-1)
			}
		}
	}
	if got := roundOrder(nil, 2); len(got) != 0 {
		t.Errorf("roundOrder(nil) = %v", got)
	}
}

// TestRoundServers: the floors and pcpd run in rounds, in the order
// given; miniupnpd does not (it runs once), nor pcpd with --scale-only.
func TestRoundServers(t *testing.T) {
	o := options{servers: []string{bareFloor, "pcpd", "miniupnpd", batchedFloor}}
	if got, want := o.roundServers(), []string{bareFloor, "pcpd", batchedFloor}; !slices.Equal(got, want) {
		t.Errorf("roundServers = %v, want %v", got, want)
	}
	o.scaleOnly = true
	if got, want := o.roundServers(), []string{bareFloor, batchedFloor}; !slices.Equal(got, want) {
		t.Errorf("--scale-only: roundServers = %v, want %v", got, want)
	}
}

// roundsBench: three rounds of closed-loop rates as closedLoop puts them
// (nil: not measured in that round), folded as run does.
func roundsBench(rounds map[string]map[string][]float64) *bench {
	b := &bench{o: options{rounds: 3}, res: map[string]map[string]*figure{}}
	for srv, m := range rounds {
		for key, vals := range m {
			for r, v := range vals {
				if v >= 0 {
					b.putRound(srv, key, r, v, "/s", "")
				}
			}
		}
	}
	b.roundOrders = [][]string{
		roundOrder([]string{batchedFloor, bareFloor, "pcpd"}, 0),
		roundOrder([]string{batchedFloor, bareFloor, "pcpd"}, 1),
		roundOrder([]string{batchedFloor, bareFloor, "pcpd"}, 2),
	}
	b.foldRounds()
	return b
}

const skip = -1 // a round that did not measure the figure

// The rounds of TestRoundsTable and TestRoundsJSON. new MAP: pcpd over
// the same round's bare floor is 33, 33, 27.5 % (median 33 %: met), while
// the medians' ratio would be 22 000 / 80 000 = 27.5 % (a miss).
// Malformed: the best round meets 80 % (85 %), the median (75 %) does
// not. Unauthorised: round 2 has no bare-floor figure; the median is
// over the other two (80 and 88 %: 84 %).
var testRounds = map[string]map[string][]float64{
	batchedFloor: {"new": {120000, 110000, 100000}},
	bareFloor: {
		"new":       {100000, 60000, 80000},
		"malformed": {100000, 100000, 100000},
		"unauth":    {90000, skip, 80000},
	},
	"pcpd": {
		"new":       {33000, 20000, 22000},
		"malformed": {85000, 70000, 75000},
		"unauth":    {72000, 70000, 70400},
	},
}

// TestRoundsTable: a row measured in rounds shows, per floor, the median
// of the rounds' ratios (each pcpd's rate over the same round's floor
// rate) followed by each round's, and met is judged on that median; the
// rates are medians; a 100 000-lease row, run once, divides by the
// floors' median fresh rate and lists no rounds.
func TestRoundsTable(t *testing.T) {
	b := roundsBench(testRounds)
	b.putRound(bareFloor, "unauth", 2, 80000, "/s", "others 0.30 cores") // a round's note
	b.foldRounds()
	b.put("pcpd", "new100k", 32000, "/s", "")
	b.put("miniupnpd", "new", 10, "/s", "")
	rowsByKey := map[string]tableRow{}
	for _, r := range b.tableRows() {
		rowsByKey[r.Key] = r
	}
	md := markdown(b.tableRows())
	cells := func(key string) []string {
		for _, r := range rows {
			if r.key != key {
				continue
			}
			for _, l := range strings.Split(md, "\n") {
				if strings.HasPrefix(l, "| "+r.label+" |") {
					return strings.Split(strings.Trim(l, "| "), " | ")
				}
			}
		}
		t.Fatalf("no row %s in\n%s", key, md)
		return nil
	}
	// Columns: figure, batched, bare, pcpd, miniupnpd, /bare, /batched,
	// /miniupnpd, target, met.
	for _, c := range []struct {
		key  string
		col  int
		want string
	}{
		{"new", 5, "33 % (rounds 33 / 33 / 28)"},
		{"new", 6, "22 % (rounds 28 / 18 / 22)"},
		{"new", 3, "22000 /s (median of 3 rounds: 33000 /s / 20000 /s / 22000 /s)"},
		{"new", 2, "80000 /s (median of 3 rounds: 100000 /s / 60000 /s / 80000 /s)"},
		{"new", 7, "2200×"},
		{"new", 9, "yes, yes (batched floor: **no**)"},
		{"malformed", 5, "75 % (rounds 85 / 70 / 75)"},
		{"malformed", 9, "**no**"},
		{"unauth", 5, "84 % (rounds 80 / – / 88)"},
		{"unauth", 2, "85000 /s (median of 2 rounds: 90000 /s / – / 80000 /s; round 3: others 0.30 cores)"},
		{"unauth", 9, "yes"},
		{"new100k", 5, "40 %"},
		{"new100k", 9, "yes (batched floor: **no**)"},
	} {
		got := cells(c.key)
		if len(got) != 10 {
			t.Fatalf("row %s has %d cells: %q", c.key, len(got), got)
		}
		if got[c.col] != c.want {
			t.Errorf("row %s, column %d: got %q, want %q", c.key, c.col, got[c.col], c.want)
		}
	}
	if r := rowsByKey["new100k"]; r.Rounds != nil || r.RatioOf != "" {
		t.Errorf("new100k ran once: rounds %v, ratio_of %q", r.Rounds, r.RatioOf)
	}
	// One round (--rounds 1): the plain ratio, no rounds listed.
	one := &bench{o: options{rounds: 1}, res: map[string]map[string]*figure{}}
	one.putRound(bareFloor, "new", 0, 100000, "/s", "")
	one.putRound("pcpd", "new", 0, 31000, "/s", "others 0.20 cores")
	one.foldRounds()
	r := one.tableRows()[0]
	if r.Rounds != nil || r.PerBareFloor == nil || *r.PerBareFloor != 0.31 || r.Values["pcpd"].Note != "others 0.20 cores" {
		t.Errorf("one round: %+v", r)
	}
	if md := markdown(one.tableRows()); !strings.Contains(md, "| 31 % |") {
		t.Errorf("one round: want the plain ratio cell:\n%s", md)
	}
}

// TestRoundsJSON: table.json names what its ratios are (ratio_of), and
// lists each round with its order, each server's figure and pcpd's two
// ratios; met is the median's verdict.
func TestRoundsJSON(t *testing.T) {
	b := roundsBench(testRounds)
	data, err := json.Marshal(b.tableJSON())
	if err != nil {
		t.Fatal(err)
	}
	var got struct {
		Rounds      int        `json:"rounds"`
		RoundOrders [][]string `json:"round_orders"`
		Rows        []map[string]any
	}
	if err := json.Unmarshal(data, &got); err != nil {
		t.Fatal(err)
	}
	if got.Rounds != 3 || len(got.RoundOrders) != 3 || got.RoundOrders[1][0] != bareFloor {
		t.Errorf("rounds %d, orders %v", got.Rounds, got.RoundOrders)
	}
	byKey := map[string]map[string]any{}
	for _, r := range got.Rows {
		byKey[r["key"].(string)] = r
	}
	near := func(v any, want float64) bool {
		f, ok := v.(float64)
		return ok && f > want-1e-9 && f < want+1e-9
	}
	for _, c := range []struct {
		key, field string
		want       any // float64 compared within 1e-9; nil: absent
	}{
		{"new", "pcpd_per_bare_floor", 0.33},
		{"new", "pcpd_per_batched_floor", 0.22},
		{"new", "met", true},
		{"new", "met_bare_floor", true},
		{"new", "met_batched_floor", false},
		{"malformed", "pcpd_per_bare_floor", 0.75},
		{"malformed", "met", false},
		{"unauth", "pcpd_per_bare_floor", 0.84},
		{"unauth", "met", true},
		{"new-p99", "pcpd_per_bare_floor", nil},
	} {
		r := byKey[c.key]
		if r == nil {
			if c.want != nil {
				t.Errorf("no row %s", c.key)
			}
			continue
		}
		v, ok := r[c.field]
		switch w := c.want.(type) {
		case nil:
			if ok {
				t.Errorf("%s.%s = %v, want absent", c.key, c.field, v)
			}
		case float64:
			if !near(v, w) {
				t.Errorf("%s.%s = %v, want %v", c.key, c.field, v, w)
			}
		default:
			if v != w {
				t.Errorf("%s.%s = %v, want %v", c.key, c.field, v, w)
			}
		}
	}
	if s, _ := byKey["new"]["ratio_of"].(string); !strings.HasPrefix(s, "median of the ratios of 3 rounds") {
		t.Errorf("new.ratio_of = %q", s)
	}
	rounds, _ := byKey["unauth"]["rounds"].([]any)
	if len(rounds) != 3 {
		t.Fatalf("unauth.rounds = %v, want 3", byKey["unauth"]["rounds"])
	}
	r2 := rounds[1].(map[string]any)
	vals := r2["values"].(map[string]any)
	if r2["round"] != 2.0 || !near(vals["pcpd"], 70000) || vals[bareFloor] != nil || r2["pcpd_per_bare_floor"] != nil {
		t.Errorf("unauth round 2 = %v: want round 2, pcpd 70000, no bare floor figure nor ratio", r2)
	}
	if o, _ := r2["order"].([]any); len(o) != 3 || o[0] != bareFloor {
		t.Errorf("unauth round 2 order = %v", r2["order"])
	}
	r3 := rounds[2].(map[string]any)
	if !near(r3["pcpd_per_bare_floor"], 0.88) || !near(r3["values"].(map[string]any)[bareFloor], 80000) {
		t.Errorf("unauth round 3 = %v", r3)
	}
}
