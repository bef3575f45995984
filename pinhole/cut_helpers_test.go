package pinhole_test

import (
	"errors"
	"fmt"
	"net/netip"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// Helpers shared by the flow-cut tests (cutflows, natcut, attcut).

// guardedPinhole is guardedTopology with a TCP pinhole of the client's
// port installed for an hour; it returns the client's endpoint and the
// pinhole too.
func guardedPinhole(t *testing.T, port uint16) (*netlab.Topology, *pinhole.Backend, netip.AddrPort, pinhole.Pinhole) {
	t.Helper()
	topo, b := guardedTopology(t, pinhole.Config{})
	client := netip.AddrPortFrom(topo.ClientV6, port)
	p := pinhole.Pinhole{Protocol: tcp, InternalAddr: client.Addr(), InternalPort: client.Port()}
	apply(t, b, install(p, time.Hour))
	return topo, b, client, p
}

// checkFlowCut echoes over f within wait: a cut flow must be dropped (a
// timeout), any other must carry data. A failure names step and the
// flow, and lists ns's inet table (where the cut rules are).
func checkFlowCut(t *testing.T, ns *netlab.NS, table, step, name string, f *echoFlow, cut bool, wait time.Duration) {
	t.Helper()
	err := f.echo(wait)
	switch {
	case cut && err == nil:
		t.Errorf("%s: the %s flow still carries data:\n%s", step, name, nftList(t, ns, "table", "inet", table))
	case cut && !isTimeout(err):
		t.Errorf("%s: the %s flow: %v, want a timeout (dropped)", step, name, err)
	case !cut && err != nil:
		t.Errorf("%s: the %s flow: %v, want it to go on", step, name, err)
	}
}

// wantConntrackEntry wants ns's conntrack table to hold an entry with
// destination port port (a cut flow's entry is left: no walk at this
// level); what prefixes the failure.
func wantConntrackEntry(t *testing.T, ns *netlab.NS, what string, port uint16) {
	t.Helper()
	if out := ns.MustRun(t, "cat", "/proc/net/nf_conntrack"); !strings.Contains(out, fmt.Sprintf("dport=%d ", port)) {
		t.Errorf("%sno conntrack entry of the flow left:\n%s", what, out)
	}
}

// waitNoElements waits up to 10 s for b to list no element (the kernel
// timed them all out).
func waitNoElements(t *testing.T, b *pinhole.Backend) {
	t.Helper()
	if err := netlab.Eventually(10*time.Second, func() error {
		es, err := b.List()
		if err != nil {
			return err
		}
		if len(es) > 0 {
			return fmt.Errorf("%d elements left", len(es))
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
}

// refusingBackend is a Backend on ns whose kernel refuses part of the
// layout (refuse: pinhole.RefuseLabels, pinhole.RefuseNATCut), set up;
// what names the refusal in Setup's failure. The caller tears it down.
func refusingBackend(t *testing.T, ns *netlab.NS, refuse func(*pinhole.Backend), what string) *pinhole.Backend {
	t.Helper()
	conn, err := ns.NftConn()
	if err != nil {
		t.Fatal(err)
	}
	b, err := pinhole.New(conn, pinhole.Config{Routes: nsRoutes(t, ns)})
	if err != nil {
		t.Fatal(err)
	}
	refuse(b)
	if err := b.Setup(); err != nil {
		t.Fatalf("Setup with %s: %v", what, err)
	}
	return b
}

// replaceRule replaces the rule of chain in ns's inet pcpd table whose
// listed line re matches up to its handle (re is followed by " # handle
// N") with rule; fatal when none matches.
func replaceRule(t *testing.T, ns *netlab.NS, chain, re string, rule ...string) {
	t.Helper()
	out := ns.MustRun(t, "nft", "-a", "list", "chain", "inet", "pcpd", chain)
	m := regexp.MustCompile(re + ` # handle (\d+)`).FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("no %s in %s:\n%s", re, chain, out)
	}
	ns.MustRun(t, append([]string{"nft", "replace", "rule", "inet", "pcpd", chain, "handle", m[1]}, rule...)...)
}

// tamperedThenRepaired runs each tamper, then wants Healthy to report
// ErrUnhealthy (listing what list returns if not) and, after Setup, the
// table healthy again.
func tamperedThenRepaired(t *testing.T, b *pinhole.Backend, what string, list func() string, tampers ...func()) {
	t.Helper()
	for _, tamper := range tampers {
		tamper()
		if err := b.Healthy(); !errors.Is(err, pinhole.ErrUnhealthy) {
			t.Errorf("Healthy = %v after %s:\n%s", err, what, list())
		}
		if err := b.Setup(); err != nil {
			t.Fatal(err)
		}
		if err := b.Healthy(); err != nil {
			t.Fatalf("Healthy after Setup: %v", err)
		}
	}
}
