package main

import (
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/pcpd/pcpd/control"
	"github.com/pcpd/pcpd/internal/netlab"
)

// readmeBlock returns the first fenced block of README.md after the line
// containing marker, so the documentation's examples are the ones tested.
func readmeBlock(t *testing.T, marker string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "..", "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	s := string(b)
	i := strings.Index(s, marker)
	if i < 0 {
		t.Fatalf("README.md lacks %q", marker)
	}
	s = s[i:]
	start := strings.Index(s, "```")
	s = s[start:]
	s = s[strings.Index(s, "\n")+1:]
	return s[:strings.Index(s, "```")]
}

// The README's attached-mode worked example, as written: the admin's
// ruleset (forward policy drop, jump pcpd) and pcpd with nft-attach. A
// mapped port is reachable through the admin's drop, an unmapped one is
// not, and after the admin reloads the ruleset (flush ruleset) pcpd
// restores its objects and the pinhole by itself.
func TestReadmeAttachedExample(t *testing.T) {
	netlab.RequireRoot(t)
	bin := binary(t)
	topo := netlab.NewTopology(t, netlab.TopologyOptions{})
	ruleset := readmeBlock(t, "Worked\nexample, `/etc/nftables.conf`")
	// The lab's client sits behind lan0, not wg0.
	ruleset = "flush ruleset\n" + strings.ReplaceAll(ruleset, `"wg0"`, `"`+topo.HostLANIf+`"`)
	dir := t.TempDir()
	rules := filepath.Join(dir, "nftables.conf")
	os.WriteFile(rules, []byte(ruleset), 0o600)
	topo.Host.MustRun(t, "nft", "-f", rules)

	toml := readmeBlock(t, "and in `/etc/pcpd/pcpd.toml`")
	toml = strings.ReplaceAll(toml, `"wg0"`, `"`+topo.HostLANIf+`"`)
	cfgPath := filepath.Join(dir, "pcpd.toml")
	os.WriteFile(cfgPath, []byte(toml), 0o600)
	sock := filepath.Join(dir, "pcpd.sock")
	var log logBuffer
	if _, err := topo.Host.Start(func(c *exec.Cmd) { c.Stdout, c.Stderr = &log, &log }, bin, "serve", "--config", cfgPath,
		"--socket", sock, "--state-dir", filepath.Join(dir, "state"), "--client", "home="+topo.ClientPrefix6.String()); err != nil {
		t.Fatal(err)
	}
	if err := netlab.Eventually(10*time.Second, func() error {
		_, err := (&control.Client{Path: sock}).Status(context.Background())
		return err
	}); err != nil {
		t.Fatalf("pcpd not up: %v\n%s", err, log.String())
	}
	open, closed := net.JoinHostPort(topo.ClientV6.String(), "8080"), net.JoinHostPort(topo.ClientV6.String(), "8081")
	topo.Client.ServeTCP(t, open)
	topo.Client.ServeTCP(t, closed)

	out, err := topo.Client.Run(bin, "map", "--server", topo.HostTunnelV6.String(), "--proto", "tcp", "--port", "8080", "--lifetime", "10m")
	if err != nil || !strings.Contains(out, "SUCCESS") {
		t.Fatalf("map: %v\n%s\n%s", err, out, log.String())
	}
	if err := netlab.Eventually(5*time.Second, func() error { return topo.Internet.DialTCP(open, time.Second) }); err != nil {
		t.Fatalf("mapped port not reachable through the admin's drop policy: %v\n%s", err, topo.Host.MustRun(t, "nft", "list", "ruleset"))
	}
	if err := topo.Internet.DialTCP(closed, time.Second); err == nil {
		t.Fatal("unmapped port reachable")
	}
	rs := topo.Host.MustRun(t, "nft", "list", "table", "inet", "filter")
	for _, want := range []string{"chain pcpd {", "set pcpd_pin6", "jump pcpd", "policy drop"} {
		if !strings.Contains(rs, want) {
			t.Errorf("ruleset lacks %q:\n%s", want, rs)
		}
	}
	if tables := topo.Host.MustRun(t, "nft", "list", "tables"); strings.Contains(tables, "inet pcpd") {
		t.Errorf("attached mode created its own table too:\n%s", tables)
	}

	// The admin reloads the firewall: pcpd's objects are gone, then back.
	topo.Host.MustRun(t, "nft", "-f", rules)
	if err := topo.Internet.DialTCP(open, time.Second); err == nil {
		t.Log("pinhole still open right after the reload (pcpd was quick)")
	}
	if err := netlab.Eventually(15*time.Second, func() error { return topo.Internet.DialTCP(open, time.Second) }); err != nil {
		t.Fatalf("pinhole not restored after the admin reloaded the ruleset: %v\n%s", err, log.String())
	}
	if !strings.Contains(log.String(), "restoring") {
		t.Errorf("log does not mention the restore:\n%s", log.String())
	}
	if err := topo.Internet.DialTCP(closed, time.Second); err == nil {
		t.Fatal("unmapped port reachable after the restore")
	}
}

// The README documents every serve flag and the example config file.
func TestReadmeDocumentsEveryFlag(t *testing.T) {
	b, err := os.ReadFile(filepath.Join("..", "..", "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	serve, _, _ := newRoot(nil, nil).Find([]string{"serve"})
	for _, name := range flagNames(serve) {
		if !strings.Contains(string(b), "`--"+name) {
			t.Errorf("README.md does not document --%s", name)
		}
	}
	for _, cmd := range []string{"pcpd leases", "pcpd revoke", "pcpd status", "pcpd map", "pcpd announce", "pcpd lab", "dist/pcpd.service", "dist/pcpd.toml"} {
		if !strings.Contains(string(b), cmd) {
			t.Errorf("README.md does not mention %s", cmd)
		}
	}
}

func flagNames(c *cobra.Command) []string {
	var names []string
	c.Flags().VisitAll(func(f *pflag.Flag) {
		if f.Name != "help" {
			names = append(names, f.Name)
		}
	})
	return names
}

// readmeOtherFlags are the flags README.md names that flagNames leaves
// out (cobra's --help) or that belong to other programs (systemctl enable
// --now, pcpload floor --batch, the bench driver's --rounds).
var readmeOtherFlags = map[string]bool{"help": true, "now": true, "batch": true, "rounds": true}

// Every --flag README.md names is a flag of some pcpd command (or of
// another program it shows, readmeOtherFlags), and every metric it names
// is one pcpd serves and the reverse, so a renamed or removed flag or
// metric cannot linger in the operator's documentation.
func TestReadmeNamesRealFlagsAndMetrics(t *testing.T) {
	b, err := os.ReadFile(filepath.Join("..", "..", "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	readme := string(b)

	flags := map[string]bool{}
	var visit func(c *cobra.Command)
	visit = func(c *cobra.Command) {
		for _, name := range flagNames(c) {
			flags[name] = true
		}
		for _, sub := range c.Commands() {
			visit(sub)
		}
	}
	visit(newRoot(nil, nil))
	for _, m := range regexp.MustCompile(`--([a-z][a-z0-9-]+)`).FindAllStringSubmatch(readme, -1) {
		if !flags[m[1]] && !readmeOtherFlags[m[1]] {
			t.Errorf("README.md names --%s, which no pcpd command has", m[1])
		}
	}

	// The metrics: the engine's (server/metrics.go names each in full)
	// and the WireGuard ownership counters built here.
	src, err := os.ReadFile(filepath.Join("..", "..", "server", "metrics.go"))
	if err != nil {
		t.Fatal(err)
	}
	served := map[string]bool{}
	for _, m := range regexp.MustCompile(`"(pcpd_[a-z0-9_]+)"`).FindAllStringSubmatch(string(src), -1) {
		served[m[1]] = true
	}
	for _, c := range wireGuardCollectors(nil) {
		ch := make(chan *prometheus.Desc, 1)
		c.Describe(ch)
		m := regexp.MustCompile(`fqName: "([a-z0-9_]+)"`).FindStringSubmatch((<-ch).String())
		if m == nil {
			t.Fatal("no name in a WireGuard collector's description")
		}
		served[m[1]] = true
	}
	if len(served) < 20 {
		t.Fatalf("found only %d metrics: %v", len(served), served)
	}
	named := map[string]bool{}
	for _, m := range regexp.MustCompile(`pcpd_[a-z0-9_]+`).FindAllString(readme, -1) {
		named[m] = true
		if !served[m] {
			t.Errorf("README.md names metric %s, which pcpd does not serve", m)
		}
	}
	for m := range served {
		if !named[m] {
			t.Errorf("README.md does not document metric %s", m)
		}
	}
}
