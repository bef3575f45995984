package main

import (
	"fmt"
	"sort"
	"strings"
)

// row is one line of the table: a figure measured on each server, the
// ratio the target is about, and the target itself.
type row struct {
	label string
	key   string
	// floorKey is the floor figure pcpd is compared with (default key).
	floorKey string
	// minFloor: pcpd/floor must be >= this (0: no floor target);
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
	{label: "`pcpd leases --json`, big lease count", key: "leases-json-big"},
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
	var s string
	switch f.unit {
	case "/s":
		s = fmt.Sprintf("%.0f /s", f.value)
	case "µs":
		if f.value >= 1000 {
			s = fmt.Sprintf("%.2f ms", f.value/1000)
		} else {
			s = fmt.Sprintf("%.0f µs", f.value)
		}
	case "s":
		s = fmt.Sprintf("%.2f s", f.value)
	case "MB":
		s = fmt.Sprintf("%.0f MB", f.value)
	default:
		s = fmt.Sprintf("%g %s", f.value, f.unit)
	}
	if f.note != "" {
		s += " (" + f.note + ")"
	}
	return s
}

func (b *bench) table() string {
	var sb strings.Builder
	fmt.Fprintf(&sb, "Machine: %s\n\n", machine())
	fmt.Fprintf(&sb, "Load: %d clients (source addresses), %d in flight (closed loop), %s per run, timeout %s; open loop at most %d in flight.\n\n",
		b.o.clients, b.o.concurrency, b.o.duration, b.o.timeout, min(b.o.openInFlight, b.o.clients))
	sb.WriteString("| figure | floor | pcpd | miniupnpd | pcpd / floor | pcpd / miniupnpd | target | met |\n")
	sb.WriteString("| --- | --- | --- | --- | --- | --- | --- | --- |\n")
	for _, r := range rows {
		p := b.get("pcpd", r.key)
		fk := r.floorKey
		if fk == "" {
			fk = r.key
		}
		fl, mi := b.get("floor", fk), b.get("miniupnpd", r.key)
		if p == nil && fl == nil && mi == nil {
			continue
		}
		flCell, miCell := fmtFig(b.get("floor", r.key)), fmtFig(mi)
		if r.floorKey != "" {
			flCell = "–"
		}
		ratioF, ratioM := "", ""
		met := []string{}
		if p != nil && fl != nil && fl.value > 0 && p.unit == "/s" {
			q := p.value / fl.value
			ratioF = fmt.Sprintf("%.0f %%", 100*q)
			if r.minFloor > 0 {
				met = append(met, yes(q >= r.minFloor))
			}
		}
		if p != nil && mi != nil && mi.value > 0 && p.unit == "/s" {
			q := p.value / mi.value
			ratioM = fmt.Sprintf("%.0f×", q)
			if r.minMini > 0 {
				met = append(met, yes(q >= r.minMini))
			}
		}
		if p != nil && r.maxAbs > 0 {
			met = append(met, yes(p.value <= r.maxAbs))
		}
		fmt.Fprintf(&sb, "| %s | %s | %s | %s | %s | %s | %s | %s |\n",
			r.label, flCell, fmtFig(p), miCell, ratioF, ratioM, r.target, strings.Join(met, ", "))
	}
	// Anything measured that no row names (kept, not lost).
	var extra []string
	for srv, m := range b.res {
		for k, f := range m {
			if !known(k) {
				extra = append(extra, fmt.Sprintf("- %s %s: %s", srv, k, fmtFig(f)))
			}
		}
	}
	sort.Strings(extra)
	if len(extra) > 0 {
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
