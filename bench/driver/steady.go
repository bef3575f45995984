package main

import (
	"context"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Issue 8's "p99 latency < 5 ms at 80 % of pcpd's own maximum rate" does
// not say of which request kind. open80 reads it for new MAPs from an
// empty server: the lease count grows from 0 to rate × duration during
// the run, through several doublings of pcpd's indexes and of the
// kernel set (BENCHMARKS.md item 39). The steady rows read it for the
// other kinds, each at 80 % of pcpd's own closed-loop rate for that same
// kind, at a lease count that stays put: renewals of the population the
// closed-loop renewal row prefills, error answers (malformed,
// unauthorised) and a churn of new MAPs and deletes at a constant count.
// The floors run each row at pcpd's rate, for what the bed adds at that
// load (BENCHMARKS.md item 40).

// steadyRow is one steady open-loop row.
type steadyRow struct {
	key string // scenario (--scenarios) and figure key (key-p99)
	// kind is the closed-loop figure of pcpd whose rate the row runs at
	// 80 % of: a runServer scenario, or churn (measured by openSteady).
	kind string
	mix  string
	// prefill: --clients leases are created before the measured phase,
	// as the closed-loop renewal scenario does.
	prefill     bool
	base, ports string // lease slots (--port-base, --ports); "": pcpload's
}

// churnKind is the closed-loop figure of the churn mix, which runServer
// does not run: openSteady measures it on a fresh pcpd before its open
// loop.
const churnKind = "churn"

var steadyRows = []steadyRow{
	// As the closed-loop renew scenario: one lease per client, renewed.
	{key: "open80-renew", kind: "renew", mix: "renew=100", prefill: true, base: "20000", ports: "1"},
	{key: "open80-malformed", kind: "malformed", mix: "malformed=100"},
	{key: "open80-unauth", kind: "unauth", mix: "unauth=100"},
	// New MAPs and deletes in equal shares from a prefilled population:
	// the count takes a random walk of ± √requests around --clients
	// (a few hundred in a run), far from a doubling of any index.
	{key: "open80-churn", kind: churnKind, mix: "new=50,delete=50", prefill: true, base: "21000", ports: "16"},
}

// steadyDelay is how long after a fresh start the steady rows wait
// before pcpload starts: past pcpd's start-up (the first batch, its
// start-up announcements; BENCHMARKS.md item 39 found 353 of 2 327
// slow requests of the growth row in its first 50 ms).
const steadyDelay = time.Second

// steadyNeeds reports whether closed-loop scenario key must run for a
// steady row asked for: each runs at 80 % of its own kind's rate.
func (o *options) steadyNeeds(key string) bool {
	if o.steadyRate > 0 {
		return false // --steady-rate: no closed loop needed
	}
	for _, s := range steadyRows {
		if s.kind == key && o.want(s.key) {
			return true
		}
	}
	return false
}

// shape is the row's pcpload arguments other than the rate, the
// duration and the in-flight limit (openRun's), the same for pcpd and
// the floors.
func (s steadyRow) shape(o *options) []string {
	a := []string{"--mix", s.mix}
	if s.prefill {
		a = append(a, "--prefill", strconv.Itoa(o.clients))
	}
	if s.base != "" {
		a = append(a, "--port-base", s.base, "--ports", s.ports)
	}
	return a
}

// churnArgs is the closed-loop run of the churn mix whose rate the
// churn row runs at 80 % of: the row's shape, flat out.
func (b *bench) churnArgs(s steadyRow) []string {
	return append(s.shape(&b.o), "--concurrency", strconv.Itoa(b.o.concurrency), "--duration", b.dur())
}

// steadyRateFor is 80 % of pcpd's closed-loop rate for the row's kind in
// this run.
func (b *bench) steadyRateFor(s steadyRow) (float64, error) {
	if b.o.steadyRate > 0 {
		return b.o.steadyRate, nil
	}
	f := b.get("pcpd", s.kind)
	if f == nil || f.unit != "/s" || f.value < 1 {
		return 0, fmt.Errorf("driver: no closed-loop %s rate for pcpd: no %s run", s.kind, s.key)
	}
	return 0.8 * f.value, nil
}

// openSteady runs pcpd's steady rows that are wanted; a row that fails
// is noted and the rest still run.
func (b *bench) openSteady(ctx context.Context, start func(fresh bool) (server, error)) {
	for _, s := range steadyRows {
		if !b.o.want(s.key) {
			continue
		}
		if err := b.openSteadyRow(ctx, s, start); err != nil {
			b.logf("pcpd %s: %v", s.key, err)
			b.notes = append(b.notes, fmt.Sprintf("pcpd %s: %v", s.key, err))
		}
	}
}

func (b *bench) openSteadyRow(ctx context.Context, s steadyRow, start func(fresh bool) (server, error)) error {
	if s.kind == churnKind && b.o.steadyRate <= 0 {
		if err := b.closedChurn(ctx, s, start); err != nil {
			return err
		}
	}
	rate, err := b.steadyRateFor(s)
	if err != nil {
		return err
	}
	if err := b.openRun(ctx, "pcpd", s.key, start, rate, steadyDelay, s.shape(&b.o)); err != nil {
		return err
	}
	if b.steadyRate == nil {
		b.steadyRate = map[string]float64{}
	}
	b.steadyRate[s.key] = rate
	return nil
}

// closedChurn measures pcpd's closed-loop churn rate on a fresh start
// (figure churn).
func (b *bench) closedChurn(ctx context.Context, s steadyRow, start func(fresh bool) (server, error)) error {
	p, err := start(true)
	if err != nil {
		return err
	}
	defer p.stop(syscall.SIGTERM)
	if _, err := b.waitServing(30 * time.Second); err != nil {
		return err
	}
	r, err := b.load(ctx, "pcpd", churnKind, b.churnArgs(s)...)
	if err != nil {
		return err
	}
	b.put("pcpd", churnKind, r.Run.Total.Rate, "/s", joinNote(rowNote(r.Run), strings.TrimPrefix(leaseNote(r, -1), "; ")))
	return nil
}

// floorRun is one floor's run of a steady row.
type floorRun struct {
	floor string
	row   steadyRow
	rate  float64
}

// floorPlan is what steadyFloors runs: each steady row pcpd ran (rates,
// by key), in steadyRows' order, on each floor in servers, at pcpd's
// rate for that row.
func floorPlan(servers []string, rates map[string]float64) []floorRun {
	var plan []floorRun
	for _, s := range steadyRows {
		rate, ok := rates[s.key]
		if !ok {
			continue
		}
		for _, fl := range []string{batchedFloor, bareFloor} {
			if slices.Contains(servers, fl) {
				plan = append(plan, floorRun{fl, s, rate})
			}
		}
	}
	return plan
}

// steadyFloors runs the floors in --servers through each steady row pcpd
// ran, at pcpd's rate.
func (b *bench) steadyFloors(ctx context.Context) {
	for _, f := range floorPlan(b.o.servers, b.steadyRate) {
		if err := b.openRun(ctx, f.floor, f.row.key, b.floorStarter(f.floor), f.rate, steadyDelay, f.row.shape(&b.o)); err != nil {
			b.notes = append(b.notes, fmt.Sprintf("%s %s: %v", f.floor, f.row.key, err))
		}
	}
}

// leaseNote is the lease count a run's figures were measured at: as
// pcpload saw it as the measured phase began and at its end, and the
// server's own count after it (listed, < 0: not listed).
func leaseNote(r *loadReport, listed int) string {
	if r == nil {
		return ""
	}
	n := fmt.Sprintf("; leases %d → %d", r.LiveAtStart, r.LiveLeases)
	if listed >= 0 {
		n += fmt.Sprintf(" (pcpd lists %d)", listed)
	}
	return n
}

// opsNote is each kind's p99 when a run mixed several (the churn row:
// a delete's reply waits for its conntrack walk, PMP-12, a new MAP's
// does not), in pcpload's order of kinds.
func opsNote(p *loadPhase) string {
	if len(p.Ops) < 2 {
		return ""
	}
	var n []string
	for _, k := range []string{"new", "renew", "delete", "malformed", "unauth"} {
		if o, ok := p.Ops[k]; ok {
			n = append(n, fmt.Sprintf("%s p99 %.0f µs", k, o.Latency["p99"]))
		}
	}
	return "; " + strings.Join(n, ", ")
}

func joinNote(a, b string) string {
	if a == "" {
		return b
	}
	return a + "; " + b
}
