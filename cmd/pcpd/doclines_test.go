package main

import (
	"context"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/pcpd/pcpd/config"
	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/internal/pcpdtest"
	"github.com/pcpd/pcpd/pcp"
)

// docCmdRe finds a pcpd command line in documentation: "pcpd SUB" and what
// follows on the line, up to the end of a code span, a comment, a pipe or
// another command, an aside in parentheses or a comma and a blank (a list
// in prose; a comma inside a word, --client a=P1,P2, is kept).
var docCmdRe = regexp.MustCompile("(?:^|[\\s`'\"=/])pcpd (serve|leases|revoke|status|map|announce|lab)((?:[ \\t](?:[^`|;#()\\n,]|,[^\\s])*)?)(?:$|[^\\w'-])")

var docFlagRe = regexp.MustCompile(`(?:^|\s|\[)--([a-z][a-z0-9-]*)`)

// docLine is one pcpd command line found in a document.
type docLine struct {
	where string // file:line, or the command's help text
	sub   string // the subcommand
	rest  string // what follows it on the line
	code  bool   // a line of a code block or an example: parsed in full
}

// docLines returns the pcpd command lines of text; those inside fenced
// code blocks, or on lines code says are code, are marked code.
func docLines(where, text string, code func(line string) bool) []docLine {
	var out []docLine
	fenced := false
	for i, line := range strings.Split(text, "\n") {
		if strings.HasPrefix(strings.TrimSpace(line), "```") {
			fenced = !fenced
			continue
		}
		for _, m := range docCmdRe.FindAllStringSubmatch(line, -1) {
			out = append(out, docLine{where: fmt.Sprintf("%s:%d", where, i+1), sub: m[1], rest: m[2], code: fenced || code(line)})
		}
	}
	return out
}

func prose(string) bool { return false }

// helpTexts is every command's --help text but the flag table: its Use,
// Long and Example (the examples marked code), and its flags' usages.
func helpTexts(root *cobra.Command) []docLine {
	var out []docLine
	var visit func(c *cobra.Command)
	visit = func(c *cobra.Command) {
		where := "pcpd " + c.Name() + " --help"
		out = append(out, docLines(where, c.Use+"\n"+c.Long, prose)...)
		out = append(out, docLines(where+" (Example)", c.Example, func(string) bool { return true })...)
		c.Flags().VisitAll(func(f *pflag.Flag) {
			out = append(out, docLines(where+" (--"+f.Name+")", f.Usage, prose)...)
		})
		for _, sub := range c.Commands() {
			visit(sub)
		}
	}
	visit(root)
	return out
}

// shellWords splits a command line as sh would for the simple words the
// documentation uses: blanks, 'single' and "double" quotes.
func shellWords(s string) []string {
	var words []string
	var w strings.Builder
	in, quote := false, rune(0)
	for _, r := range s {
		switch {
		case quote != 0 && r == quote:
			quote = 0
		case quote != 0:
			w.WriteRune(r)
		case r == '\'' || r == '"':
			quote, in = r, true
		case r == ' ' || r == '\t':
			if in {
				words = append(words, w.String())
				w.Reset()
				in = false
			}
		default:
			w.WriteRune(r)
			in = true
		}
	}
	if in {
		words = append(words, w.String())
	}
	return words
}

// checkDocLine checks one documented command line against the binary's
// commands: every --flag it names is one of that subcommand's, and a code
// line parses as the binary would parse it (flag values included). A
// serve line's configuration must load, but for the README's example of
// mistakes, whose messages must be the ones README.md shows (wantErrs).
func checkDocLine(t *testing.T, l docLine, wantErrs map[string][]string) {
	t.Helper()
	root := newRoot(nil, nil)
	cmd, _, err := root.Find([]string{l.sub})
	if err != nil {
		t.Fatalf("%s: %v", l.where, err)
	}
	for _, m := range docFlagRe.FindAllStringSubmatch(l.rest, -1) {
		if m[1] != "help" && cmd.Flags().Lookup(m[1]) == nil {
			t.Errorf("%s: pcpd %s has no --%s: %q", l.where, l.sub, m[1], "pcpd "+l.sub+l.rest)
		}
	}
	if !l.code {
		return
	}
	args := shellWords(l.rest)
	// The shipped config file, as README.md installs it.
	for i, a := range args {
		if a == "/etc/pcpd/pcpd.toml" {
			args[i] = filepath.Join("..", "..", "dist", "pcpd.toml")
		}
	}
	if err := cmd.ParseFlags(args); err != nil {
		t.Errorf("%s: %q does not parse: %v", l.where, "pcpd "+l.sub+l.rest, err)
		return
	}
	if l.sub != "serve" || slices.Contains(args, "--help") {
		return
	}
	_, err = config.Load(cmd.Flags())
	want, isExample := wantErrs[strings.TrimSpace(l.rest)]
	switch {
	case !isExample && err != nil:
		t.Errorf("%s: %q: the configuration does not load: %v", l.where, "pcpd serve"+l.rest, err)
	case isExample:
		var got []string
		if errs, ok := err.(config.Errors); ok {
			for _, e := range errs {
				got = append(got, "pcpd: "+e.Error())
			}
		}
		if !slices.Equal(got, want) {
			t.Errorf("%s: %q: pcpd says\n%s\nREADME.md shows\n%s", l.where, "pcpd serve"+l.rest, strings.Join(got, "\n"), strings.Join(want, "\n"))
		}
	}
}

// readmeConfigMistakes is README.md's example of configuration mistakes:
// the serve command line after "$ " and the "pcpd: config:" lines below it.
func readmeConfigMistakes(t *testing.T) map[string][]string {
	block := readmeBlock(t, "reported on its own line, with exit status 2")
	lines := strings.Split(block, "\n")
	cmd, ok := strings.CutPrefix(lines[0], "$ pcpd serve")
	if !ok {
		t.Fatalf("README.md's configuration mistakes example begins %q", lines[0])
	}
	var want []string
	for _, l := range lines[1:] {
		if strings.HasPrefix(l, "pcpd: ") {
			want = append(want, l)
		}
	}
	return map[string][]string{strings.TrimSpace(cmd): want}
}

// Every pcpd command line in README.md, dist/ and the commands' own
// --help texts names only flags of that subcommand; those in code blocks
// and the help's examples parse with their values, and a serve line's
// configuration loads (the example of mistakes fails with the messages
// README.md shows). TestReadmeNamesRealFlagsAndMetrics only asks that a
// flag be some command's.
func TestDocCommandLines(t *testing.T) {
	var lines []docLine
	for _, f := range []string{"README.md", "dist/pcpd.service", "dist/pcpd.toml"} {
		b, err := os.ReadFile(filepath.Join("..", "..", f))
		if err != nil {
			t.Fatal(err)
		}
		// The unit's command lines are its Exec lines.
		lines = append(lines, docLines(f, string(b), func(line string) bool {
			return f == "dist/pcpd.service" && strings.HasPrefix(line, "Exec")
		})...)
	}
	lines = append(lines, helpTexts(newRoot(nil, nil))...)
	if len(lines) < 30 {
		t.Fatalf("found only %d pcpd command lines", len(lines))
	}
	wantErrs := readmeConfigMistakes(t)
	code := 0
	for _, l := range lines {
		if l.code {
			code++
		}
		checkDocLine(t, l, wantErrs)
	}
	if code < 15 {
		t.Errorf("found only %d pcpd command lines in code blocks and examples", code)
	}
}

// README.md's count of the fuzz targets .ci/run runs is the number of
// fuzz targets in the repository's test files (it said 9 while there were
// 13, and so ran about 4½ minutes, not 3).
func TestReadmeFuzzTargetCount(t *testing.T) {
	b, err := os.ReadFile(filepath.Join("..", "..", "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`fuzz\s+target\s+\((\d+) targets`).FindSubmatch(b)
	if m == nil {
		t.Fatal(`README.md does not say "fuzz target (N targets"`)
	}
	fuzzRe := regexp.MustCompile(`(?m)^func Fuzz\w*\(\w+ \*testing\.F\)`)
	n := 0
	err = filepath.WalkDir(filepath.Join("..", ".."), func(path string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && (d.Name() == "testdata" || strings.HasPrefix(d.Name(), ".")) && path != filepath.Join("..", "..") {
			return filepath.SkipDir
		}
		if !strings.HasSuffix(path, "_test.go") {
			return nil
		}
		src, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		n += len(fuzzRe.FindAll(src, -1))
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if got := string(m[1]); got != fmt.Sprint(n) {
		t.Errorf("README.md says %s fuzz targets; the test files declare %d", got, n)
	}
}

// README.md's second fresh-machine command runs the tests as .ci/run
// does: the same go test arguments (.ci/run says "keep them equal").
func TestReadmeTestCommandIsCIs(t *testing.T) {
	goTest := regexp.MustCompile(`(?m)^[^#\n]*?\bgo\)?"? (test -count=1 [^#\n]*?)\s*(?:#|$)`)
	args := func(file, text string) string {
		m := goTest.FindAllStringSubmatch(text, -1)
		if len(m) != 1 {
			t.Fatalf("%s: want one 'go test -count=1' command line, found %d", file, len(m))
		}
		return strings.Join(strings.Fields(m[0][1]), " ")
	}
	readme := readmeBlock(t, "## Try it: two commands")
	ci, err := os.ReadFile(filepath.Join("..", "..", ".ci", "run"))
	if err != nil {
		t.Fatal(err)
	}
	r, c := args("README.md", readme), args(".ci/run", string(ci))
	if r != c {
		t.Errorf("README.md runs\n  go %s\n.ci/run runs\n  go %s", r, c)
	}
}

// Every metric README.md names is one a running pcpd serves on /metrics,
// and every pcpd_* metric it serves is in README.md: scraped from pcpd
// serve in a namespace (standalone, WireGuard ownership, the kernel meter
// on), after a MAP, a datagram too short to read and a revoke, so that the
// labelled counters, which appear with their first count, are there too.
// TestReadmeNamesRealFlagsAndMetrics reads the names from the source;
// this asks the binary, registration in serve.go included.
func TestReadmeMetricsServed(t *testing.T) {
	netlab.RequireRoot(t)
	b, err := os.ReadFile(filepath.Join("..", "..", "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	documented := map[string]bool{}
	for _, m := range regexp.MustCompile(`pcpd_[a-z0-9_]+`).FindAllString(string(b), -1) {
		documented[m] = true
	}
	topo := netlab.NewTopology(t, netlab.TopologyOptions{WireGuard: true})
	dir := t.TempDir()
	sock := filepath.Join(dir, "pcpd.sock")
	const metricsAddr = "127.0.0.1:9351"
	server := netip.AddrPortFrom(topo.HostTunnelV6, pcp.Port)
	d := pcpdtest.Start(t, pcpdtest.Config{
		NS: topo.Host,
		Args: []string{"serve", "--interface", topo.HostLANIf, "--metrics", metricsAddr,
			"--state-dir", filepath.Join(dir, "state"), "--socket", sock},
		Ready: pcpdtest.Announce(topo.Client, topo.ClientV6, server),
	})
	if out, err := topo.Client.Run(d.Bin(), "map", "--server", topo.HostTunnelV6.String(), "--port", "8080"); err != nil {
		t.Fatalf("map: %v\n%s", err, out)
	}
	if err := topo.Client.Do(func() error { // one octet: dropped, "short"
		c, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(server))
		if err != nil {
			return err
		}
		defer c.Close()
		_, err = c.Write([]byte{2})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if out, err := topo.Host.Run(d.Bin(), "revoke", "--socket", sock, "--all"); err != nil {
		t.Fatalf("revoke: %v\n%s", err, out)
	}
	// Mapped again at once: the revoke's NOT_AUTHORIZED updates still to
	// come are dropped as answered (pcpd_mapping_updates_dropped_total).
	if out, err := topo.Client.Run(d.Bin(), "map", "--server", topo.HostTunnelV6.String(), "--port", "8080"); err != nil {
		t.Fatalf("map after the revoke: %v\n%s", err, out)
	}
	hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		DisableKeepAlives: true,
		DialContext: func(ctx context.Context, network, addr string) (c net.Conn, err error) {
			err = topo.Host.Do(func() (err error) {
				c, err = (&net.Dialer{}).DialContext(ctx, network, addr)
				return err
			})
			return c, err
		},
	}}
	served := map[string]bool{}
	var body []byte
	err = netlab.Eventually(5*time.Second, func() error {
		resp, err := hc.Get("http://" + metricsAddr + "/metrics")
		if err != nil {
			return err
		}
		body, err = io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil {
			return err
		}
		clear(served)
		for _, m := range regexp.MustCompile(`(?m)^# TYPE (pcpd_[a-z0-9_]+) `).FindAllStringSubmatch(string(body), -1) {
			served[m[1]] = true
		}
		for m := range documented {
			if !served[m] {
				return fmt.Errorf("README.md names metric %s, which pcpd does not serve", m)
			}
		}
		return nil
	})
	if err != nil {
		t.Errorf("%v (served: %v)", err, slices.Sorted(maps.Keys(served)))
	}
	for m := range served {
		if !documented[m] {
			t.Errorf("pcpd serves metric %s, which README.md does not document", m)
		}
	}
	// The kernel meter's drop reasons, each served from the start, are
	// each named in README.md's row of the metric (h/lodrop:
	// loopback-rate-limit).
	row := ""
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "| `pcpd_kernel_requests_dropped_total") {
			row = l
		}
	}
	reasons := regexp.MustCompile(`(?m)^pcpd_kernel_requests_dropped_total\{reason="([^"]+)"\} `).FindAllStringSubmatch(string(body), -1)
	if len(reasons) < 4 {
		t.Errorf("pcpd serves %d reasons of pcpd_kernel_requests_dropped_total, want at least 4:\n%s", len(reasons), body)
	}
	for _, r := range reasons {
		if !strings.Contains(row, "`"+r[1]+"`") {
			t.Errorf("pcpd serves pcpd_kernel_requests_dropped_total{reason=%q}, which README.md's row of the metric does not name:\n%s", r[1], row)
		}
	}
}

// The systemd settings README.md's "Install with systemd" says
// dist/pcpd.service has (`DynamicUser=yes`, `StateDirectory`, …) are in
// the unit, with the value README.md gives.
func TestReadmeUnitDirectives(t *testing.T) {
	b, err := os.ReadFile(filepath.Join("..", "..", "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	s := string(b)
	i := strings.Index(s, "runs pcpd with least privilege")
	j := strings.Index(s, "**Userspace WireGuard**")
	if i < 0 || j < i {
		t.Fatal("README.md's list of the unit's settings not found")
	}
	unit, err := os.ReadFile(filepath.Join("..", "..", "dist", "pcpd.service"))
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(string(unit), "\n")
	directive := regexp.MustCompile("`([A-Z][a-z]+[A-Za-z]*=[^`\\s]+|[A-Z][a-z]+[A-Z][A-Za-z]*)`")
	n := 0
	for _, m := range directive.FindAllStringSubmatch(s[i:j], -1) {
		want := m[1]
		if strings.HasPrefix(want, "Test") { // a test's name
			continue
		}
		if !strings.Contains(want, "=") {
			want += "="
		}
		n++
		t.Logf("checked %s", want)
		if !slices.ContainsFunc(lines, func(l string) bool { return strings.HasPrefix(l, want) }) {
			t.Errorf("README.md says dist/pcpd.service has `%s`; it has no line %s…", m[1], want)
		}
	}
	if n < 6 {
		t.Errorf("found only %d unit settings in README.md's list", n)
	}
}
