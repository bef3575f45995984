package conformance

import (
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"time"
)

// Checks returns the whole suite in run order. The overload check runs
// last because it spends the client's rate budget.
func Checks() []Check {
	var all, last []Check
	for _, group := range [][]Check{packetChecks, optionChecks, mapChecks, pmpChecks, dataChecks, restartChecks} {
		for _, c := range group {
			if c.ID == "PKT-08" {
				last = append(last, c)
				continue
			}
			all = append(all, c)
		}
	}
	return append(all, last...)
}

// Outcome is one check's result in a run.
type Outcome struct {
	Check  Check
	Result Result
	Took   time.Duration
}

// RunAll runs checks in order, calling progress (if set) after each.
func (e *Env) RunAll(checks []Check, progress func(Outcome)) []Outcome {
	var out []Outcome
	for _, c := range checks {
		t0 := time.Now()
		r := e.Run(&c)
		o := Outcome{Check: c, Result: r, Took: time.Since(t0)}
		if progress != nil {
			progress(o)
		}
		out = append(out, o)
	}
	return out
}

// Counts returns how many outcomes passed, failed and were n.a.
func Counts(outs []Outcome) (pass, fail, na int) {
	for _, o := range outs {
		switch o.Result.Status {
		case Pass:
			pass++
		case Fail:
			fail++
		default:
			na++
		}
	}
	return
}

// cell makes text safe for one markdown table cell.
func cell(s string) string {
	s = strings.ReplaceAll(s, "|", `\|`)
	s = strings.Join(strings.Fields(s), " ")
	const max = 400
	if len(s) > max {
		s = s[:max] + "…"
	}
	return s
}

// WriteMarkdown writes one target's report: a summary line and a table
// of test ID, RFC section, level, name, verdict and detail.
func WriteMarkdown(w io.Writer, target string, outs []Outcome) error {
	p, f, n := Counts(outs)
	fmt.Fprintf(w, "### %s\n\n%d checks: %d pass, %d fail, %d n.a.\n\n", target, len(outs), p, f, n)
	fmt.Fprintln(w, "| ID | RFC section | level | check | result | detail |")
	fmt.Fprintln(w, "| --- | --- | --- | --- | --- | --- |")
	for _, o := range outs {
		c := o.Check
		fmt.Fprintf(w, "| %s | %s | %s | %s | %s | %s |\n", c.ID, cell(c.Section), c.Level, cell(c.Name), verdict(o.Result.Status), cell(o.Result.Detail))
	}
	_, err := fmt.Fprintln(w)
	return err
}

func verdict(s Status) string {
	if s == Fail {
		return "**FAIL**"
	}
	return s.String()
}

// WriteComparison writes targets side by side: one row per check, one
// verdict column per target, details below the table are left to the
// per-target reports.
func WriteComparison(w io.Writer, targets []string, runs [][]Outcome) error {
	fmt.Fprintf(w, "| ID | RFC section | level | check |")
	for _, t := range targets {
		fmt.Fprintf(w, " %s |", cell(t))
	}
	fmt.Fprintln(w)
	fmt.Fprint(w, "| --- | --- | --- | --- |")
	for range targets {
		fmt.Fprint(w, " --- |")
	}
	fmt.Fprintln(w)
	if len(runs) == 0 {
		return nil
	}
	for i, o := range runs[0] {
		c := o.Check
		fmt.Fprintf(w, "| %s | %s | %s | %s |", c.ID, cell(c.Section), c.Level, cell(c.Name))
		for _, run := range runs {
			v := "–"
			if i < len(run) && run[i].Check.Name == c.Name {
				v = verdict(run[i].Result.Status)
			}
			fmt.Fprintf(w, " %s |", v)
		}
		fmt.Fprintln(w)
	}
	fmt.Fprint(w, "| | | | **totals** (pass / fail / n.a.) |")
	for _, run := range runs {
		p, f, n := Counts(run)
		fmt.Fprintf(w, " %d / %d / %d |", p, f, n)
	}
	_, err := fmt.Fprintln(w)
	return err
}

// Report is a run in a form that can be saved and compared later
// (pcp-conformance -compare).
type Report struct {
	Target  string   `json:"target"`
	Results []Record `json:"results"`
}

// Record is one check's outcome without its code.
type Record struct {
	ID      string `json:"id"`
	Section string `json:"section"`
	Level   Level  `json:"level"`
	Name    string `json:"name"`
	Status  string `json:"status"` // pass, FAIL, n.a.
	Detail  string `json:"detail"`
}

// NewReport converts a run.
func NewReport(target string, outs []Outcome) *Report {
	r := &Report{Target: target}
	for _, o := range outs {
		c := o.Check
		r.Results = append(r.Results, Record{c.ID, c.Section, c.Level, c.Name, o.Result.Status.String(), o.Result.Detail})
	}
	return r
}

// WriteJSON writes the report as indented JSON.
func (r *Report) WriteJSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(r)
}

// ReadReport reads a report written by WriteJSON.
func ReadReport(rd io.Reader) (*Report, error) {
	var r Report
	if err := json.NewDecoder(rd).Decode(&r); err != nil {
		return nil, fmt.Errorf("conformance: read report: %w", err)
	}
	return &r, nil
}

// Outcomes converts the report back (checks without Run functions), for
// WriteMarkdown and WriteComparison.
func (r *Report) Outcomes() []Outcome {
	var outs []Outcome
	for _, x := range r.Results {
		st := Pass
		switch x.Status {
		case Fail.String():
			st = Fail
		case NA.String():
			st = NA
		}
		outs = append(outs, Outcome{Check: Check{ID: x.ID, Section: x.Section, Level: x.Level, Name: x.Name}, Result: Result{st, x.Detail}})
	}
	return outs
}
