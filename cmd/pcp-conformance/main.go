// Command pcp-conformance runs the RFC 6887 / RFC 6886 conformance suite
// (package conformance) against a PCP server and prints a markdown
// report: test ID, RFC section, level, check, pass / FAIL / n.a., detail.
//
//	pcp-conformance -server '[2001:db8:1:2::1]:5351' -server4 10.100.0.1 \
//	    -external-ipv4 198.51.100.1 -natpmp 1 > report.md
//
// Every flag can also come from the PCP_* environment variable named in
// -help. The command sends from the current network namespace and has no
// data-plane, restart or outside hooks, so the checks that need them
// report n.a.; `go test ./conformance` runs the full suite in a lab.
// Exit status: 0 all checks passed or n.a., 1 some failed, 2 bad usage.
package main

import (
	"flag"
	"fmt"
	"io"
	"os"
	"regexp"
	"strings"

	"github.com/pcpd/pcpd/conformance"
)

func main() { os.Exit(run(os.Args[1:], os.Stdout, os.Stderr)) }

func run(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("pcp-conformance", flag.ContinueOnError)
	fs.SetOutput(stderr)
	target := conformance.Flags(fs)
	name := fs.String("name", "", "target name for the report heading (default: the server address)")
	only := fs.String("run", "", "run only checks whose ID matches this regular expression, e.g. '^(PKT|VER)-'")
	list := fs.Bool("list", false, "list the checks and exit")
	trace := fs.Bool("v", false, "trace every packet on stderr")
	jsonOut := fs.String("json", "", "also write the results as JSON to this file (for -compare)")
	compare := fs.String("compare", "", "instead of running, print saved JSON reports FILE[,FILE...] side by side, then each in full")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *compare != "" {
		return compareReports(strings.Split(*compare, ","), stdout, stderr)
	}
	checks := conformance.Checks()
	if *list {
		for _, c := range checks {
			fmt.Fprintf(stdout, "%-8s %-32s %-6s %s\n", c.ID, c.Section, c.Level, c.Name)
		}
		return 0
	}
	if *only != "" {
		re, err := regexp.Compile(*only)
		if err != nil {
			fmt.Fprintf(stderr, "pcp-conformance: -run: %v\n", err)
			return 2
		}
		var keep []conformance.Check
		for _, c := range checks {
			if re.MatchString(c.ID) {
				keep = append(keep, c)
			}
		}
		checks = keep
	}
	env, err := target.Finish()
	if err != nil {
		fmt.Fprintln(stderr, err)
		return 2
	}
	env.Name = *name
	if env.Name == "" {
		env.Name = env.Server.String()
	}
	if *trace {
		env.Logf = func(format string, args ...any) { fmt.Fprintf(stderr, format+"\n", args...) }
	}
	outs := env.RunAll(checks, func(o conformance.Outcome) {
		fmt.Fprintf(stderr, "%-8s %-5s %s\n", o.Check.ID, o.Result.Status, o.Check.Name)
	})
	if err := conformance.WriteMarkdown(stdout, env.Name, outs); err != nil {
		fmt.Fprintln(stderr, err)
		return 1
	}
	if *jsonOut != "" {
		f, err := os.Create(*jsonOut)
		if err == nil {
			err = conformance.NewReport(env.Name, outs).WriteJSON(f)
			if cerr := f.Close(); err == nil {
				err = cerr
			}
		}
		if err != nil {
			fmt.Fprintf(stderr, "pcp-conformance: -json: %v\n", err)
			return 1
		}
	}
	if _, fail, _ := conformance.Counts(outs); fail > 0 {
		return 1
	}
	return 0
}

// compareReports prints saved reports side by side, then each in full.
func compareReports(files []string, stdout, stderr io.Writer) int {
	var names []string
	var runs [][]conformance.Outcome
	for _, name := range files {
		f, err := os.Open(name)
		if err != nil {
			fmt.Fprintf(stderr, "pcp-conformance: %v\n", err)
			return 2
		}
		r, err := conformance.ReadReport(f)
		f.Close()
		if err != nil {
			fmt.Fprintf(stderr, "pcp-conformance: %s: %v\n", name, err)
			return 2
		}
		names = append(names, r.Target)
		runs = append(runs, r.Outcomes())
	}
	conformance.WriteComparison(stdout, names, runs)
	for i := range runs {
		fmt.Fprintln(stdout)
		conformance.WriteMarkdown(stdout, names[i], runs[i])
	}
	return 0
}
