package server

import (
	"strings"
	"testing"

	"github.com/pcpd/pcpd/pinhole"
)

// attachRuleset is pinhole's adminRuleset (README.md's attached worked
// example): a default-drop forward chain that accepts established flows
// before it jumps to pcpd's chain; LANIF is the lab's client interface.
const attachRuleset = `table inet filter {
	chain pcpd {
	}

	chain forward {
		type filter hook forward priority filter; policy drop;
		ct state established,related accept
		iifname "LANIF" accept
		jump pcpd
	}
}
`

// attach makes the stopped lab's firewall pcpd attached to an admin's
// table (Config{Table: "filter", Attached: true}) in place of its own:
// the standalone table torn down, attachRuleset loaded. The next start
// lays out pcpd's objects in it.
func (l *lab) attach(t *testing.T) {
	t.Helper()
	if err := l.fw.Teardown(); err != nil {
		t.Fatal(err)
	}
	l.fw.Close()
	l.topo.Host.MustRun(t, "sh", "-c", "nft -f - <<'EOF'\n"+strings.ReplaceAll(attachRuleset, "LANIF", l.topo.HostLANIf)+"EOF\n")
	conn, err := l.topo.Host.NftConn()
	if err != nil {
		t.Fatal(err)
	}
	if l.fw, err = pinhole.New(conn, pinhole.Config{Table: "filter", Attached: true, Chain: "pcpd"}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(l.fw.Close)
}
