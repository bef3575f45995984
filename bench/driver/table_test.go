package main

import (
	"encoding/json"
	"net/netip"
	"strings"
	"testing"
)

// rate, lat: figures as runServer and runScale put them.
func rate(v float64) *figure { return &figure{value: v, unit: "/s"} }
func lat(v float64) *figure  { return &figure{value: v, unit: "µs"} }

// results builds bench results: server → key → figure.
type results map[string]map[string]*figure

// TestTableRatiosBothFloors: pcpd's rate is divided by the bare floor's
// (issue 8's reference) and by the batched floor's of the same run, each
// in its own column; met is judged against the bare floor with the
// batched floor's verdict beside it, and falls back to the batched floor,
// saying so, when no bare floor ran. The 100 000-lease rows divide by
// the fresh floors' figure (floorKey) and leave the floor cells empty.
func TestTableRatiosBothFloors(t *testing.T) {
	both := results{
		batchedFloor: {"new": rate(119191), "malformed": rate(110000), "open80-p99": lat(25300)},
		bareFloor:    {"new": rate(70000), "malformed": rate(80000), "open80-p99": lat(30000)},
		"pcpd":       {"new": rate(31741), "malformed": rate(82230), "new100k": rate(30000), "open80-p99": lat(15660), "renew": rate(40000)},
		"miniupnpd":  {"new": rate(10)},
	}
	for _, c := range []struct {
		name string
		res  results
		key  string
		want string // the row's line; "" when the row must be absent
	}{
		{"new MAP: both floors and miniupnpd", both, "new",
			"| new MAP, closed loop | 119191 /s | 70000 /s | 31741 /s | 10 /s | 45 % | 27 % | 3174× | ≥ 30 % of floor, ≥ 100× miniupnpd | yes, yes (batched floor: **no**) |"},
		{"malformed: above the bare floor, below the batched", both, "malformed",
			"| malformed, closed loop | 110000 /s | 80000 /s | 82230 /s | – | 103 % | 75 % |  | ≥ 80 % of floor | yes (batched floor: **no**) |"},
		{"100 000 leases: ratios to the fresh floors' new MAP", both, "new100k",
			"| new MAP, 100 000 live leases | – | – | 30000 /s | – | 43 % | 25 % |  | ≥ 30 % of floor | yes (batched floor: **no**) |"},
		{"latency: each server's own figure, no ratio", both, "open80-p99",
			"| new MAP p99, open loop at 80 % of own max | 25.30 ms | 30.00 ms | 15.66 ms | – |  |  |  | < 5 ms | **no** |"},
		{"renewal: pcpd only, no floor ran it", both, "renew",
			"| renewal, closed loop | – | – | 40000 /s | – |  |  |  | ≥ 50 % of floor |  |"},
		{"a miss that whole percent would round up to the target: one decimal",
			results{bareFloor: {"malformed": rate(100000)}, batchedFloor: {"malformed": rate(100000)}, "pcpd": {"malformed": rate(79800)}}, "malformed",
			"| malformed, closed loop | 100000 /s | 100000 /s | 79800 /s | – | 79.8 % | 79.8 % |  | ≥ 80 % of floor | **no** (batched floor: **no**) |"},
		{"a miss one decimal would still round up: two",
			results{bareFloor: {"new": rate(100000)}, "pcpd": {"new": rate(29960)}}, "new",
			"| new MAP, closed loop | – | 100000 /s | 29960 /s | – | 29.96 % |  |  | ≥ 30 % of floor, ≥ 100× miniupnpd | **no** |"},
		{"a pass at the target: whole percent",
			results{bareFloor: {"new": rate(100000)}, "pcpd": {"new": rate(30000)}}, "new",
			"| new MAP, closed loop | – | 100000 /s | 30000 /s | – | 30 % |  |  | ≥ 30 % of floor, ≥ 100× miniupnpd | yes |"},
		{"no row without a figure", both, "unauth", ""},
		// --scale=false: the floors' malformed figure does not make a row
		// of a 100 000-lease run that never ran.
		{"no 100 000-lease row without pcpd's", both, "malformed100k", ""},
		{"only the batched floor ran: met against it, labelled",
			results{batchedFloor: {"malformed": rate(110000)}, "pcpd": {"malformed": rate(82230)}}, "malformed",
			"| malformed, closed loop | 110000 /s | – | 82230 /s | – |  | 75 % |  | ≥ 80 % of floor | **no** (batched floor; no bare floor ran) |"},
		{"only the bare floor ran",
			results{bareFloor: {"unauth": rate(80000)}, "pcpd": {"unauth": rate(60000)}}, "unauth",
			"| unauthorised, closed loop | – | 80000 /s | 60000 /s | – | 75 % |  |  | ≥ 80 % of floor | **no** |"},
		{"a floor without pcpd: no ratio, no verdict",
			results{bareFloor: {"mixed": rate(90000)}, batchedFloor: {"mixed": rate(100000)}}, "mixed",
			"| mixed 20/60/10/5/5, closed loop | 100000 /s | 90000 /s | – | – |  |  |  |  |  |"},
	} {
		t.Run(c.name, func(t *testing.T) {
			b := &bench{res: c.res}
			md := markdown(b.tableRows())
			lines := strings.Split(strings.TrimSuffix(md, "\n"), "\n")
			if lines[0]+"\n"+lines[1]+"\n" != tableHeader {
				t.Fatalf("table starts\n%s\n%s\nwant the header\n%s", lines[0], lines[1], tableHeader)
			}
			var label string
			for _, r := range rows {
				if r.key == c.key {
					label = r.label
				}
			}
			var got string
			for _, l := range lines[2:] {
				if strings.HasPrefix(l, "| "+label+" |") {
					got = l
				}
			}
			if got != c.want {
				t.Fatalf("row %s:\n got %q\nwant %q\ntable:\n%s", c.key, got, c.want, md)
			}
			if n := strings.Count(got, "|"); got != "" && n != strings.Count(lines[0], "|") {
				t.Fatalf("row %s has %d cell borders, the header %d", c.key, n, strings.Count(lines[0], "|"))
			}
		})
	}
}

// TestTableJSONBothFloors: table.json carries both ratios and both
// verdicts under names that say which floor each is, and the row's
// verdict names the floor it was judged against.
func TestTableJSONBothFloors(t *testing.T) {
	b := &bench{res: results{
		batchedFloor: {"new": rate(100000), "malformed": rate(100000)},
		bareFloor:    {"new": rate(80000), "malformed": rate(90000)},
		"pcpd":       {"new": rate(28000), "malformed": rate(70000), "unauth100k": rate(72000)},
	}}
	data, err := json.Marshal(b.tableRows())
	if err != nil {
		t.Fatal(err)
	}
	var got []map[string]any
	if err := json.Unmarshal(data, &got); err != nil {
		t.Fatal(err)
	}
	byKey := map[string]map[string]any{}
	for _, r := range got {
		byKey[r["key"].(string)] = r
	}
	for _, c := range []struct {
		key   string
		field string
		want  any // nil: absent
	}{
		{"new", "pcpd_per_bare_floor", 0.35},
		{"new", "pcpd_per_batched_floor", 0.28},
		{"new", "met_bare_floor", true},
		{"new", "met_batched_floor", false},
		{"new", "met", true},
		{"new", "met_floor", bareFloor},
		{"new", "pcpd_per_miniupnpd", nil},
		{"malformed", "pcpd_per_bare_floor", 70000.0 / 90000},
		{"malformed", "pcpd_per_batched_floor", 0.7},
		{"malformed", "met", false},
		{"malformed", "met_batched_floor", false},
		// The 100 000-lease row: no floor figure of its own, ratios to
		// the floors' fresh unauthorised rate (none here: no ratio).
		{"unauth100k", "floor_key", "unauth"},
		{"unauth100k", "pcpd_per_bare_floor", nil},
		{"unauth100k", "met", nil},
	} {
		r, ok := byKey[c.key]
		if !ok {
			t.Fatalf("no row %s in %s", c.key, data)
		}
		v, ok := r[c.field]
		if c.want == nil {
			if ok {
				t.Errorf("%s.%s = %v, want absent", c.key, c.field, v)
			}
			continue
		}
		if f, isF := c.want.(float64); isF {
			if g, _ := v.(float64); g < f-1e-9 || g > f+1e-9 {
				t.Errorf("%s.%s = %v, want %v", c.key, c.field, v, f)
			}
			continue
		}
		if v != c.want {
			t.Errorf("%s.%s = %v, want %v", c.key, c.field, v, c.want)
		}
	}
	values := byKey["new"]["values"].(map[string]any)
	if len(values) != 3 || values[bareFloor] == nil || values[batchedFloor] == nil || values["pcpd"] == nil {
		t.Errorf("new.values = %v, want the bare floor's, the batched floor's and pcpd's", values)
	}
}

// TestFloorArgs: the bare floor is pcpload floor --batch 1 (issue 8's
// per-datagram server), the batched floor pcpload floor with its default
// batches, as every run since 66b3c81 measured it.
func TestFloorArgs(t *testing.T) {
	b := &bench{o: options{pcpload: "/bin/pcpload"}}
	for _, c := range []struct{ name, want string }{
		{batchedFloor, "/bin/pcpload floor --listen [2001:db8::1]:5351"},
		{bareFloor, "/bin/pcpload floor --listen [2001:db8::1]:5351 --batch 1"},
	} {
		b.server = netip.MustParseAddrPort("[2001:db8::1]:5351")
		if got := strings.Join(b.floorArgs(c.name), " "); got != c.want {
			t.Errorf("floorArgs(%s) = %q, want %q", c.name, got, c.want)
		}
	}
}
