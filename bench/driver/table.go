package main

import (
	"fmt"
	"sort"
	"strconv"
	"strings"
)

// row is one line of the table: a figure measured on each server, the
// ratio the target is about, and the target itself.
type row struct {
	label string
	key   string
	// floorKey is the floors' figure pcpd is compared with (default key).
	floorKey string
	// minFloor: pcpd / floor must be >= this (0: no floor target), judged
	// against the bare floor (issue 8's), the batched floor's beside it;
	// minMini: pcpd/miniupnpd must be >= this; maxAbs: pcpd <= this.
	minFloor, minMini, maxAbs float64
	target                    string
}

var rows = []row{
	{label: "new MAP, closed loop", key: "new", minFloor: 0.30, minMini: 100, target: "≥ 30 % of floor, ≥ 100× miniupnpd"},
	{label: "renewal, closed loop", key: "renew", minFloor: 0.50, target: "≥ 50 % of floor"},
	{label: "renewal written through (4 s lifetime, not absorbed), closed loop", key: "renew-wt"},
	{label: "malformed, closed loop", key: "malformed", minFloor: 0.80, target: "≥ 80 % of floor"},
	{label: "unauthorised, closed loop", key: "unauth", minFloor: 0.80, target: "≥ 80 % of floor"},
	{label: "mixed 20/60/10/5/5, closed loop", key: "mixed"},
	{label: "new MAP p99, closed loop", key: "new-p99"},
	{label: "new MAP p99, open loop at 80 % of own max", key: "open80-p99", maxAbs: 5000, target: "< 5 ms"},
	{label: "new MAP p99, open loop at pcpd's open-loop rate (the floor: what the bed adds at pcpd's load)", key: "open80-at-pcpd-p99"},
	// The steady rows (steady.go): each at 80 % of pcpd's closed-loop
	// rate for its own kind, the floors at pcpd's rate.
	{label: "churn, new MAP 50 / delete 50 at a constant lease count, closed loop", key: churnKind},
	{label: "renewal p99, open loop at 80 % of own renewal max, steady lease count (floors at pcpd's rate)", key: "open80-renew-p99", maxAbs: 5000, target: "< 5 ms"},
	{label: "malformed p99, open loop at 80 % of own malformed max (floors at pcpd's rate)", key: "open80-malformed-p99", maxAbs: 5000, target: "< 5 ms"},
	{label: "unauthorised p99, open loop at 80 % of own unauthorised max (floors at pcpd's rate)", key: "open80-unauth-p99", maxAbs: 5000, target: "< 5 ms"},
	{label: "churn p99 (new MAP 50 / delete 50), open loop at 80 % of own churn max, constant lease count (floors at pcpd's rate)", key: "open80-churn-p99", maxAbs: 5000, target: "< 5 ms"},
	{label: "new MAP while growing 0 → 100 000 leases", key: "grow100k", floorKey: "new", minFloor: 0.30, target: "≥ 30 % of floor"},
	{label: "wait after the growth for its fold (the rows below run settled, errors first)", key: "settle100k"},
	{label: "new MAP, 100 000 live leases", key: "new100k", floorKey: "new", minFloor: 0.30, target: "≥ 30 % of floor"},
	{label: "renewal, 100 000 live leases", key: "renew100k", floorKey: "renew", minFloor: 0.50, target: "≥ 50 % of floor"},
	{label: "malformed, 100 000 live leases", key: "malformed100k", floorKey: "malformed", minFloor: 0.80, target: "≥ 80 % of floor"},
	{label: "unauthorised, 100 000 live leases", key: "unauth100k", floorKey: "unauth", minFloor: 0.80, target: "≥ 80 % of floor"},
	{label: "RSS, 100 000 live leases", key: "rss100k"},
	{label: "`pcpd leases --json`, 100 000 leases", key: "leases-json", maxAbs: 2, target: "≤ 2 s"},
	{label: "new MAP while growing to the big lease count", key: "growbig"},
	{label: "RSS, big lease count", key: "rssbig", maxAbs: 400, target: "≤ 400 MB at 1 000 000"},
	{label: "start to serving, big lease count", key: "startbig", maxAbs: 10, target: "≤ 10 s at 1 000 000"},
	{label: "RSS after that restart", key: "rssbig-restart", maxAbs: 400, target: "≤ 400 MB"},
	{label: "peak RSS during that restart (VmHWM)", key: "rssbig-restart-peak", maxAbs: 400, target: "≤ 400 MB"},
	{label: "peak RSS during a start from the backup copy (state file damaged; VmHWM)", key: "rssbig-backup-peak", maxAbs: 400, target: "≤ 400 MB"},
	{label: "peak RSS during a start on a read-only state directory (VmHWM)", key: "rssbig-readonly-peak", maxAbs: 400, target: "≤ 400 MB"},
	{label: "`pcpd leases --json`, big lease count", key: "leases-json-big"},
}

// measured reports whether any server has a figure for key.
func (b *bench) measured(key string) bool {
	for _, m := range b.res {
		if m[key] != nil {
			return true
		}
	}
	return false
}

func (b *bench) get(server, key string) *figure {
	if m := b.res[server]; m != nil {
		return m[key]
	}
	return nil
}

func fmtFig(f *figure) string {
	if f == nil {
		return "–"
	}
	s := fmtValue(f.value, f.unit)
	if f.note != "" {
		s += " (" + f.note + ")"
	}
	return s
}

// fmtValue formats a figure's value with its unit.
func fmtValue(v float64, unit string) string {
	switch unit {
	case "/s":
		return fmt.Sprintf("%.0f /s", v)
	case "µs":
		if v >= 1000 {
			return fmt.Sprintf("%.2f ms", v/1000)
		}
		return fmt.Sprintf("%.0f µs", v)
	case "s":
		return fmt.Sprintf("%.2f s", v)
	case "MB":
		return fmt.Sprintf("%.0f MB", v)
	default:
		return fmt.Sprintf("%g %s", v, unit)
	}
}

// The two floors pcpd's rates are divided by, both run in the same lab
// under the same load. bareFloor is issue 8's reference ("a bare Go UDP
// server that answers every datagram and does nothing else"): pcpload
// floor --batch 1, one recvfrom and one sendto a datagram, GOMAXPROCS
// readers; the targets are judged against it. batchedFloor keeps the name
// and meaning "floor" has had since 66b3c81 (BENCHMARKS.md, 2026-12-02):
// recvmmsg/sendmmsg, 64 datagrams a call, as pcpd's own readers do; a
// stricter reference, reported beside the other so that neither hides
// the other and the history stays comparable.
const (
	bareFloor    = "bare-floor"
	batchedFloor = "floor"
)

// tableRow is one row of the table as computed from the results: what
// table() prints and table.json holds.
type tableRow struct {
	Label string `json:"figure"`
	Key   string `json:"key"`
	// FloorKey is the floors' figure pcpd's is divided by when it is not
	// Key (the 100 000-lease rows use the fresh server's).
	FloorKey string                `json:"floor_key,omitempty"`
	Values   map[string]figureJSON `json:"values"` // server → its figure for Key
	// pcpd's rate divided by each reference's (absent: not measured).
	// For a row measured in rounds (--rounds), the floor ratios are the
	// medians of the rounds' own ratios (RatioOf says so, Rounds holds
	// each), and Values the medians of each server's rates.
	PerBareFloor    *float64    `json:"pcpd_per_bare_floor,omitempty"`
	PerBatchedFloor *float64    `json:"pcpd_per_batched_floor,omitempty"`
	PerMiniupnpd    *float64    `json:"pcpd_per_miniupnpd,omitempty"`
	RatioOf         string      `json:"ratio_of,omitempty"`
	Rounds          []roundJSON `json:"rounds,omitempty"`
	Target          string      `json:"target,omitempty"`
	// Each judgement against the row's target, where it has one and the
	// figures were measured.
	MetBareFloor    *bool `json:"met_bare_floor,omitempty"`
	MetBatchedFloor *bool `json:"met_batched_floor,omitempty"`
	MetMiniupnpd    *bool `json:"met_miniupnpd,omitempty"`
	MetAbs          *bool `json:"met_abs,omitempty"`
	// Met is the row's verdict: the floor ratio against the bare
	// floor (against the batched one only when no bare floor ran, named
	// in MetFloor), with miniupnpd's and the absolute bound.
	Met      *bool  `json:"met,omitempty"`
	MetFloor string `json:"met_floor,omitempty"`
	// minFloor is the row's floor target (0: none): a ratio is shown
	// with a decimal where whole percent would round it across it.
	minFloor float64
}

type figureJSON struct {
	Value float64 `json:"value"`
	Unit  string  `json:"unit"`
	Note  string  `json:"note,omitempty"`
}

// tableRows computes every row that has a figure.
func (b *bench) tableRows() []tableRow {
	var out []tableRow
	for _, r := range rows {
		p := b.get("pcpd", r.key)
		fk := r.floorKey
		if fk == "" {
			fk = r.key
		}
		bare, batched, mi := b.get(bareFloor, fk), b.get(batchedFloor, fk), b.get("miniupnpd", r.key)
		// A row is shown when some server measured its own figure: the
		// floors' fresh figures (floorKey) alone do not make a 100 000-
		// lease row that pcpd never ran (--scale=false).
		if !b.measured(r.key) {
			continue
		}
		t := tableRow{Label: r.label, Key: r.key, FloorKey: r.floorKey, Target: r.target, Values: map[string]figureJSON{}, minFloor: r.minFloor}
		for _, srv := range []string{batchedFloor, bareFloor, "pcpd", "miniupnpd"} {
			if f := b.get(srv, r.key); f != nil {
				t.Values[srv] = figureJSON{Value: f.value, Unit: f.unit, Note: f.note}
			}
		}
		rate := p != nil && p.unit == "/s"
		ratio := func(ref *figure) *float64 {
			if !rate || ref == nil || ref.value <= 0 {
				return nil
			}
			q := p.value / ref.value
			return &q
		}
		atLeast := func(q *float64, min float64) *bool {
			if q == nil || min <= 0 {
				return nil
			}
			ok := *q >= min
			return &ok
		}
		t.PerBareFloor, t.PerBatchedFloor, t.PerMiniupnpd = ratio(bare), ratio(batched), ratio(mi)
		// A row measured in rounds: each round's pcpd rate over the same
		// round's floor rate, and their median (not the medians' ratio),
		// which the target is judged on. The 100 000-lease rows (floorKey)
		// ran once and divide by the floors' median fresh rate.
		if rounds, qBare, qBatched := b.rowRounds(r.key); rate && rounds != nil && r.floorKey == "" {
			t.Rounds, t.PerBareFloor, t.PerBatchedFloor = rounds, qBare, qBatched
			t.RatioOf = fmt.Sprintf("median of the ratios of %d rounds (each pcpd's rate over the same round's floor rate)", len(rounds))
		}
		t.MetBareFloor = atLeast(t.PerBareFloor, r.minFloor)
		t.MetBatchedFloor = atLeast(t.PerBatchedFloor, r.minFloor)
		t.MetMiniupnpd = atLeast(t.PerMiniupnpd, r.minMini)
		if p != nil && r.maxAbs > 0 {
			ok := p.value <= r.maxAbs
			t.MetAbs = &ok
		}
		floorMet := t.MetBareFloor
		t.MetFloor = bareFloor
		if floorMet == nil {
			floorMet, t.MetFloor = t.MetBatchedFloor, batchedFloor
		}
		if floorMet == nil {
			t.MetFloor = ""
		}
		for _, m := range []*bool{floorMet, t.MetMiniupnpd, t.MetAbs} {
			if m == nil {
				continue
			}
			if t.Met == nil {
				t.Met = new(bool)
				*t.Met = true
			}
			*t.Met = *t.Met && *m
		}
		out = append(out, t)
	}
	return out
}

// tableHeader names the columns; floorsNote says which floor is which.
const (
	tableHeader = "| figure | floor (batched) | bare floor | pcpd | miniupnpd | pcpd / bare floor (issue 8) | pcpd / batched floor | pcpd / miniupnpd | target | met (bare floor; batched floor in brackets) |\n" +
		"| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
	floorsNote = "Two floors: the bare floor (`pcpload floor --batch 1`: a recvfrom and a sendto a datagram, one reader per core) is issue 8's reference, " +
		"and `met` is judged against it; the batched floor (`pcpload floor`: recvmmsg/sendmmsg, 64 datagrams a call, as pcpd's readers) is a stricter reference, " +
		"its verdict in brackets. Without a bare floor in the run, `met` falls back to the batched floor and says so.\n\n"
)

// roundsNote says how a run in n rounds is read.
func roundsNote(n int) string {
	return fmt.Sprintf("Rounds: the closed-loop rows ran in %d rounds; in each, every server (miniupnpd only in the first) ran each closed-loop scenario on a fresh start, "+
		"the servers' order rotated from round to round. A ratio cell holds the median of the rounds' ratios (pcpd's rate over the same round's floor rate), "+
		"each round's after it, and `met` is judged on the median; a rate is that server's median over the rounds. "+
		"The open-loop and 100 000-lease rows ran once, the latter divided by the floors' median.\n\n", n)
}

// markdown renders rows as the table's lines (header included).
func markdown(rows []tableRow) string {
	var sb strings.Builder
	sb.WriteString(tableHeader)
	for _, t := range rows {
		cell := func(srv string) string {
			if t.FloorKey != "" && (srv == bareFloor || srv == batchedFloor) {
				return "–" // measured only on the fresh server (FloorKey)
			}
			v, ok := t.Values[srv]
			if !ok {
				return "–"
			}
			return fmtFig(&figure{value: v.Value, unit: v.Unit, note: v.Note})
		}
		pct := func(q *float64) string {
			if q == nil {
				return ""
			}
			return pctOf(*q, t.minFloor) + " %"
		}
		// A row measured in rounds: the median, then each round's ratio.
		roundsPct := func(q *float64, each func(roundJSON) *float64) string {
			s := pct(q)
			if s == "" || len(t.Rounds) < 2 {
				return s
			}
			var r []string
			for _, rj := range t.Rounds {
				if e := each(rj); e != nil {
					r = append(r, pctOf(*e, t.minFloor))
				} else {
					r = append(r, "–")
				}
			}
			return s + " (rounds " + strings.Join(r, " / ") + ")"
		}
		times := ""
		if t.PerMiniupnpd != nil {
			times = fmt.Sprintf("%.0f×", *t.PerMiniupnpd)
		}
		var met []string
		if t.MetFloor == bareFloor {
			met = append(met, yes(*t.MetBareFloor))
		} else if t.MetFloor == batchedFloor {
			met = append(met, yes(*t.MetBatchedFloor)+" (batched floor; no bare floor ran)")
		}
		for _, m := range []*bool{t.MetMiniupnpd, t.MetAbs} {
			if m != nil {
				met = append(met, yes(*m))
			}
		}
		metCell := strings.Join(met, ", ")
		if t.MetFloor == bareFloor && t.MetBatchedFloor != nil {
			metCell += " (batched floor: " + yes(*t.MetBatchedFloor) + ")"
		}
		fmt.Fprintf(&sb, "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n",
			t.Label, cell(batchedFloor), cell(bareFloor), cell("pcpd"), cell("miniupnpd"),
			roundsPct(t.PerBareFloor, func(r roundJSON) *float64 { return r.PerBareFloor }),
			roundsPct(t.PerBatchedFloor, func(r roundJSON) *float64 { return r.PerBatchedFloor }),
			times, t.Target, metCell)
	}
	return sb.String()
}

// pctOf writes ratio q in whole percent, or with one decimal where whole
// percent would put it on the other side of target min (0: none), with as
// many as it takes (up to 3): 0.798 against 80 % is "79.8", 0.2996 against
// 30 % "29.96", never an "80" or "30.0" beside a miss.
func pctOf(q, min float64) string {
	var s string
	for prec := 0; prec <= 3; prec++ {
		s = strconv.FormatFloat(100*q, 'f', prec, 64)
		shown, _ := strconv.ParseFloat(s, 64)
		if min <= 0 || (q >= min) == (shown/100 >= min) {
			break
		}
	}
	return s
}

func (b *bench) table() string {
	var sb strings.Builder
	fmt.Fprintf(&sb, "Machine: %s\n\n", machine())
	fmt.Fprintf(&sb, "Load: %d clients (source addresses), %d in flight (closed loop), %s per run, timeout %s; open loop at most %d in flight.\n\n",
		b.o.clients, b.o.concurrency, b.o.duration, b.o.timeout, min(b.o.openInFlight, b.o.clients))
	sb.WriteString(floorsNote)
	if b.o.rounds > 1 {
		sb.WriteString(roundsNote(b.o.rounds))
	}
	sb.WriteString(markdown(b.tableRows()))
	if extra := b.extra(); len(extra) > 0 {
		sb.WriteString("\nAlso measured:\n\n" + strings.Join(extra, "\n") + "\n")
	}
	if len(b.notes) > 0 {
		sb.WriteString("\nNot measured / failed:\n\n")
		for _, n := range b.notes {
			sb.WriteString("- " + n + "\n")
		}
	}
	fmt.Fprintf(&sb, "\nReports: %s\n", b.o.out)
	return sb.String()
}

// extra lists anything measured that no row names (kept, not lost).
func (b *bench) extra() []string {
	var extra []string
	for srv, m := range b.res {
		for k, f := range m {
			if !known(k) {
				extra = append(extra, fmt.Sprintf("- %s %s: %s", srv, k, fmtFig(f)))
			}
		}
	}
	sort.Strings(extra)
	return extra
}

// tableJSON is table.json: the rows with their ratios to both floors.
func (b *bench) tableJSON() any {
	return struct {
		Machine string            `json:"machine"`
		Floors  map[string]string `json:"floors"`
		// Rounds: how many rounds the closed-loop rows ran in, and each
		// round's server order.
		Rounds      int        `json:"rounds,omitempty"`
		RoundOrders [][]string `json:"round_orders,omitempty"`
		Rows        []tableRow `json:"rows"`
		Extra       []string   `json:"also_measured,omitempty"`
		Notes       []string   `json:"not_measured,omitempty"`
	}{
		Machine: machine(),
		Floors: map[string]string{
			bareFloor:    "issue 8's reference, the targets' (met): pcpload floor --batch 1, a recvfrom and a sendto a datagram",
			batchedFloor: "the stricter reference: pcpload floor, recvmmsg/sendmmsg 64 datagrams a call, as pcpd's readers",
		},
		Rounds:      b.o.rounds,
		RoundOrders: b.roundOrders,
		Rows:        b.tableRows(),
		Extra:       b.extra(),
		Notes:       b.notes,
	}
}

func known(k string) bool {
	for _, r := range rows {
		if r.key == k {
			return true
		}
	}
	return false
}

func yes(ok bool) string {
	if ok {
		return "yes"
	}
	return "**no**"
}
