package pinhole_test

import (
	"errors"
	"net/netip"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// adminRuleset is the worked example of README.md: an admin's default-drop
// forward chain that hands protected traffic to pcpd by jumping to its
// chain. pcpd's own table could not help here: its accept would end only
// its own chain, and this chain's policy would still drop.
const adminRuleset = `table inet filter {
	chain pcpd {
	}

	chain forward {
		type filter hook forward priority filter; policy drop;
		ct state established,related accept
		iifname "lan0" accept
		jump pcpd
	}
}
`

// TestAttachedBeneathDefaultDrop: in attached mode pcpd's pinholes, port
// redirects and IPv4 mappings work beneath the admin's default-drop forward
// chain, pcpd changes none of the admin's objects, and Teardown gives the
// admin back exactly the ruleset they wrote.
func TestAttachedBeneathDefaultDrop(t *testing.T) {
	topo := netlab.NewTopology(t, netlab.TopologyOptions{})
	loadNft(t, topo.Host, adminRuleset)
	adminBefore := nftList(t, topo.Host, "ruleset")
	forwardBefore := nftList(t, topo.Host, "chain", "inet", "filter", "forward")

	cfg := pinhole.Config{Table: "filter", Attached: true, Chain: "pcpd"}
	b := newBackend(t, topo.Host, cfg)
	if err := b.SetProtected([]netip.Prefix{topo.ClientPrefix6, topo.ClientPrefix4}); err != nil {
		t.Fatal(err)
	}
	if err := b.Setup(); err != nil { // idempotent here too
		t.Fatalf("second Setup: %v", err)
	}
	if err := b.Healthy(); err != nil {
		t.Fatalf("Healthy: %v", err)
	}
	if diff := cmp.Diff(forwardBefore, nftList(t, topo.Host, "chain", "inet", "filter", "forward")); diff != "" {
		t.Errorf("admin's forward chain changed (-before +after):\n%s", diff)
	}
	t.Logf("attached layout:\n%s", nftList(t, topo.Host, "ruleset"))

	v6 := netip.AddrPortFrom(topo.ClientV6, 9000)
	redirected := netip.AddrPortFrom(topo.ClientV6, 9443)
	v4 := netip.AddrPortFrom(topo.ClientV4, 9001)
	pub := netip.AddrPortFrom(topo.HostPublicV4, 19001)
	topo.Client.ServeTCP(t, v6.String())
	topo.Client.ServeTCP(t, redirected.String())
	topo.Client.ServeTCP(t, v4.String())
	pins := []pinhole.Pinhole{
		{Protocol: tcp, InternalAddr: topo.ClientV6, InternalPort: v6.Port()},
		{Protocol: tcp, InternalAddr: topo.ClientV6, InternalPort: redirected.Port(), ExternalPort: 9080},
		{Protocol: tcp, InternalAddr: topo.ClientV4, InternalPort: v4.Port(), ExternalAddr: topo.HostPublicV4, ExternalPort: pub.Port()},
	}
	targets := []netip.AddrPort{v6, netip.AddrPortFrom(topo.ClientV6, 9080), pub}

	for i, dst := range targets {
		mustNotReach(t, "before install "+pins[i].String(), topo.Internet, tcp, netip.Addr{}, dst)
	}
	var ops, dels []pinhole.Op
	for _, p := range pins {
		ops = append(ops, install(p, time.Minute))
		dels = append(dels, del(p))
	}
	apply(t, b, ops...)
	for i, dst := range targets {
		mustReach(t, "installed "+pins[i].String(), topo.Internet, tcp, netip.Addr{}, dst)
	}
	mustNotReach(t, "redirect target directly", topo.Internet, tcp, netip.Addr{}, redirected)
	apply(t, b, dels...)
	for i, dst := range targets {
		mustNotReach(t, "after delete "+pins[i].String(), topo.Internet, tcp, netip.Addr{}, dst)
	}

	if err := b.Teardown(); err != nil {
		t.Fatalf("Teardown: %v", err)
	}
	if diff := cmp.Diff(adminBefore, nftList(t, topo.Host, "ruleset")); diff != "" {
		t.Errorf("ruleset after Teardown (-admin's +now):\n%s", diff)
	}
}

// TestAttachedNeedsTable: attached mode never creates the admin's table.
func TestAttachedNeedsTable(t *testing.T) {
	ns := netlab.NewNS(t, "notab")
	conn, err := ns.NftConn()
	if err != nil {
		t.Fatal(err)
	}
	b, err := pinhole.New(conn, pinhole.Config{Table: "filter", Attached: true})
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Setup(); !errors.Is(err, pinhole.ErrNoTable) {
		t.Fatalf("Setup without the admin's table: %v, want ErrNoTable", err)
	}
	if out := nftList(t, ns, "ruleset"); out != "" {
		t.Fatalf("Setup left objects behind:\n%s", out)
	}
}
