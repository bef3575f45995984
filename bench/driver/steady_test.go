package main

import (
	"slices"
	"strconv"
	"strings"
	"testing"
)

// wantOnly is options asking for the comma-separated scenarios.
func wantOnly(scenarios string) options {
	o := options{scenarios: map[string]bool{}}
	for _, k := range strings.Split(scenarios, ",") {
		o.scenarios[k] = true
	}
	return o
}

// TestSteadyRowsRunTheirKind: a steady row runs at 80 % of pcpd's
// closed-loop rate for its own kind, so asking for it alone runs that
// closed loop, and not the new-MAP one (the growth row's).
func TestSteadyRowsRunTheirKind(t *testing.T) {
	for _, c := range []struct {
		scenarios, key string
		want           bool
	}{
		{"open80-renew", "renew", true},
		{"open80-renew", "new", false},
		{"open80-renew", "malformed", false},
		{"open80-malformed", "malformed", true},
		{"open80-malformed", "unauth", false},
		{"open80-unauth", "unauth", true},
		{"open80-unauth", "new", false},
		// Churn's closed loop is openSteady's own (no runServer scenario).
		{"open80-churn", "new", false},
		{"open80-churn", "renew", false},
		{"open80-churn", "mixed", false},
		{"renew", "malformed", false},
	} {
		o := wantOnly(c.scenarios)
		if got := o.runs(c.key); got != c.want {
			t.Errorf("--scenarios %s: runs(%s) = %v, want %v", c.scenarios, c.key, got, c.want)
		}
	}
}

// TestSteadyRate: each steady row's rate is 80 % of pcpd's closed-loop
// rate for the row's kind in the same run (not of the new-MAP rate, the
// growth row's, nor a floor's); no rate of that kind is an error, not a
// run at some other rate.
func TestSteadyRate(t *testing.T) {
	full := results{
		"pcpd":       {"new": rate(20000), "renew": rate(40000), "malformed": rate(60000), "unauth": rate(50000), churnKind: rate(10000)},
		batchedFloor: {"renew": rate(90000), "malformed": rate(95000), "unauth": rate(95000)},
	}
	want := map[string]float64{"open80-renew": 32000, "open80-malformed": 48000, "open80-unauth": 40000, "open80-churn": 8000}
	b := &bench{res: full}
	for _, s := range steadyRows {
		got, err := b.steadyRateFor(s)
		if err != nil || got != want[s.key] {
			t.Errorf("%s: rate %v, %v; want %v", s.key, got, err, want[s.key])
		}
	}
	// --steady-rate: every row at that rate, no closed loop needed.
	fixed := &bench{res: results{}, o: options{steadyRate: 25000}}
	for _, s := range steadyRows {
		if got, err := fixed.steadyRateFor(s); err != nil || got != 25000 {
			t.Errorf("--steady-rate 25000, %s: rate %v, %v", s.key, got, err)
		}
		if fixed.o.steadyNeeds(s.kind) {
			t.Errorf("--steady-rate: closed loop %s still run for %s", s.kind, s.key)
		}
	}
	for _, c := range []struct {
		name string
		res  results
		key  string
	}{
		{"pcpd ran no renewals", results{"pcpd": {"new": rate(20000)}, batchedFloor: {"renew": rate(90000)}}, "open80-renew"},
		{"churn not measured", results{"pcpd": {"new": rate(20000), "renew": rate(40000)}}, "open80-churn"},
		{"a latency is not a rate", results{"pcpd": {"unauth": lat(300)}}, "open80-unauth"},
	} {
		b := &bench{res: c.res}
		i := slices.IndexFunc(steadyRows, func(s steadyRow) bool { return s.key == c.key })
		if got, err := b.steadyRateFor(steadyRows[i]); err == nil {
			t.Errorf("%s: rate %v, want an error", c.name, got)
		}
	}
}

// TestSteadyShape: what each row sends. The kinds runServer measures
// send only that kind; renewals and churn start from a prefilled
// population that fits their slots; churn creates and deletes in equal
// shares, so the lease count stays where the prefill put it; the error
// rows create nothing.
func TestSteadyShape(t *testing.T) {
	o := &options{clients: 4096}
	for _, s := range steadyRows {
		a := s.shape(o)
		arg := func(name string) string {
			if i := slices.Index(a, name); i >= 0 && i+1 < len(a) {
				return a[i+1]
			}
			return ""
		}
		weights := map[string]int{}
		for _, part := range strings.Split(arg("--mix"), ",") {
			k, v, _ := strings.Cut(part, "=")
			weights[k], _ = strconv.Atoi(v)
		}
		prefill, _ := strconv.Atoi(arg("--prefill"))
		ports, _ := strconv.Atoi(arg("--ports"))
		switch s.kind {
		case "renew":
			if len(weights) != 1 || weights["renew"] == 0 || prefill != o.clients {
				t.Errorf("%s: %v: want renewals only of %d prefilled leases", s.key, a, o.clients)
			}
		case "malformed", "unauth":
			if len(weights) != 1 || weights[s.kind] == 0 || prefill != 0 {
				t.Errorf("%s: %v: want %s only, no prefill", s.key, a, s.kind)
			}
		case churnKind:
			if len(weights) != 2 || weights["new"] == 0 || weights["new"] != weights["delete"] || prefill != o.clients {
				t.Errorf("%s: %v: want new = delete from %d prefilled leases", s.key, a, o.clients)
			}
			// Room to create as many as were prefilled: new MAPs do not
			// run out of free slots and turn into renewals.
			if ports*o.clients < 2*prefill {
				t.Errorf("%s: %v: %d slots for %d leases", s.key, a, ports*o.clients, prefill)
			}
		default:
			t.Errorf("%s: unknown kind %s", s.key, s.kind)
		}
		if prefill > 0 && (ports == 0 || ports*o.clients < prefill) {
			t.Errorf("%s: %v: prefill %d does not fit --ports %d × %d clients", s.key, a, prefill, ports, o.clients)
		}
	}
}

// TestFloorPlan: the floors run each steady row pcpd ran, at pcpd's
// rate for it, only floors that were asked for, never pcpd or miniupnpd.
func TestFloorPlan(t *testing.T) {
	rates := map[string]float64{"open80-renew": 32000, "open80-churn": 8000}
	for _, c := range []struct {
		servers []string
		want    []string
	}{
		{[]string{batchedFloor, bareFloor, "pcpd", "miniupnpd"}, []string{
			"floor open80-renew 32000", "bare-floor open80-renew 32000", "floor open80-churn 8000", "bare-floor open80-churn 8000"}},
		{[]string{"pcpd", bareFloor}, []string{"bare-floor open80-renew 32000", "bare-floor open80-churn 8000"}},
		{[]string{"pcpd", "miniupnpd"}, nil},
	} {
		var got []string
		for _, f := range floorPlan(c.servers, rates) {
			got = append(got, f.floor+" "+f.row.key+" "+strconv.FormatFloat(f.rate, 'f', -1, 64))
		}
		if !slices.Equal(got, c.want) {
			t.Errorf("servers %v: plan %q, want %q", c.servers, got, c.want)
		}
	}
}

// TestLeaseNote: a row's note gives the lease count at the start and the
// end of its measured phase, and pcpd's own count when listed.
func TestLeaseNote(t *testing.T) {
	for _, c := range []struct {
		r      *loadReport
		listed int
		want   string
	}{
		{&loadReport{LiveAtStart: 0, LiveLeases: 120160}, 120158, "; leases 0 → 120160 (pcpd lists 120158)"},
		{&loadReport{LiveAtStart: 4096, LiveLeases: 4013}, -1, "; leases 4096 → 4013"},
		{nil, 5, ""},
	} {
		if got := leaseNote(c.r, c.listed); got != c.want {
			t.Errorf("leaseNote(%+v, %d) = %q, want %q", c.r, c.listed, got, c.want)
		}
	}
}

// TestTableSteadyRows: the steady rows show pcpd's and the floors'
// figures side by side and judge pcpd's against the < 5 ms target.
func TestTableSteadyRows(t *testing.T) {
	b := &bench{res: results{
		batchedFloor: {"open80-renew-p99": lat(410), "open80-malformed-p99": lat(900)},
		bareFloor:    {"open80-renew-p99": lat(520)},
		"pcpd":       {"open80-renew-p99": lat(3100), "open80-malformed-p99": lat(13300), churnKind: rate(12000)},
	}}
	md := markdown(b.tableRows())
	for _, want := range []string{
		"| renewal p99, open loop at 80 % of own renewal max, steady lease count (floors at pcpd's rate) | 410 µs | 520 µs | 3.10 ms | – |  |  |  | < 5 ms | yes |",
		"| malformed p99, open loop at 80 % of own malformed max (floors at pcpd's rate) | 900 µs | – | 13.30 ms | – |  |  |  | < 5 ms | **no** |",
		"| churn, new MAP 50 / delete 50 at a constant lease count, closed loop | – | – | 12000 /s | – |  |  |  |  |  |",
	} {
		if !strings.Contains(md, want+"\n") {
			t.Errorf("table lacks\n%s\ntable:\n%s", want, md)
		}
	}
	if strings.Contains(md, "unauthorised p99") || strings.Contains(md, "churn p99") {
		t.Errorf("rows without a figure shown:\n%s", md)
	}
}

// TestOpsNote: a run of several kinds notes each kind's p99 (the churn
// row's new MAPs and deletes differ by a conntrack walk); a run of one
// kind notes nothing more.
func TestOpsNote(t *testing.T) {
	p99 := func(v float64) loadStats { return loadStats{Latency: map[string]float64{"p99": v}} }
	for _, c := range []struct {
		ops  map[string]loadStats
		want string
	}{
		{map[string]loadStats{"delete": p99(41000), "new": p99(2100)}, "; new p99 2100 µs, delete p99 41000 µs"},
		{map[string]loadStats{"renew": p99(900)}, ""},
		{nil, ""},
	} {
		if got := opsNote(&loadPhase{Ops: c.ops}); got != c.want {
			t.Errorf("opsNote(%v) = %q, want %q", c.ops, got, c.want)
		}
	}
}
