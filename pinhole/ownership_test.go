package pinhole_test

import (
	"errors"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// adminFilter is an admin's own table: a default-drop forward chain with
// rules, and a regular chain holding an admin rule.
const adminFilter = `table inet filter {
	chain mine {
		ip6 saddr 2001:db8::1 counter accept
	}

	chain forward {
		type filter hook forward priority filter; policy drop;
		ct state established,related accept
		iifname "lan0" accept
		jump mine
	}
}
`

// TestForeignObjectsRefused (DESIGN.md "pcpd touches only its own nftables
// objects"): pointed at objects it did not create — standalone at the
// admin's table, attached at the admin's base forward chain or at a regular
// chain holding the admin's rules — Setup and Teardown fail with ErrNotOurs
// and the ruleset is left exactly as it was (no flushed chain, no changed
// policy, no deleted table).
func TestForeignObjectsRefused(t *testing.T) {
	netlab.RequireRoot(t)
	for _, tc := range []struct {
		name string
		cfg  pinhole.Config
	}{
		{"standalone on the admin's table", pinhole.Config{Table: "filter"}},
		{"attached to a base chain", pinhole.Config{Table: "filter", Attached: true, Chain: "forward"}},
		{"attached to a chain with admin rules", pinhole.Config{Table: "filter", Attached: true, Chain: "mine"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ns := netlab.NewNS(t, "own")
			loadNft(t, ns, adminFilter)
			before := nftList(t, ns, "ruleset")
			conn, err := ns.NftConn()
			if err != nil {
				t.Fatal(err)
			}
			b, err := pinhole.New(conn, tc.cfg)
			if err != nil {
				t.Fatal(err)
			}
			if err := b.Setup(); !errors.Is(err, pinhole.ErrNotOurs) {
				t.Errorf("Setup: %v, want ErrNotOurs", err)
			}
			if err := b.Teardown(); !errors.Is(err, pinhole.ErrNotOurs) {
				t.Errorf("Teardown: %v, want ErrNotOurs", err)
			}
			if diff := cmp.Diff(before, nftList(t, ns, "ruleset")); diff != "" {
				t.Errorf("admin's ruleset changed (-before +after):\n%s", diff)
			}
		})
	}
}

// TestOwnObjectsRecognised: pcpd's own table and attached chain are
// recognised after a restart (a new Backend), and a tampered chain is
// still repaired by the Backend that created it.
func TestOwnObjectsRecognised(t *testing.T) {
	netlab.RequireRoot(t)
	for _, tc := range []struct {
		name  string
		cfg   pinhole.Config
		admin string
		chain []string
	}{
		{"standalone", pinhole.Config{}, "", []string{"inet", "pcpd", "forward"}},
		{"attached", pinhole.Config{Table: "filter", Attached: true, Chain: "pcpd"}, adminRuleset, []string{"inet", "filter", "pcpd"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ns := netlab.NewNS(t, "ownok")
			if tc.admin != "" {
				loadNft(t, ns, tc.admin)
			}
			b := newBackend(t, ns, tc.cfg)
			apply(t, b, install(everyShape[0], time.Minute))
			newBackend(t, ns, tc.cfg) // restart

			ns.MustRun(t, append([]string{"nft", "add", "rule"}, append(tc.chain, "counter")...)...)
			if err := b.Healthy(); !errors.Is(err, pinhole.ErrUnhealthy) {
				t.Fatalf("Healthy after an extra rule: %v", err)
			}
			if err := b.Setup(); err != nil {
				t.Fatalf("repair: %v", err)
			}
			if err := b.Healthy(); err != nil {
				t.Fatalf("Healthy after repair: %v", err)
			}
			if err := b.Teardown(); err != nil {
				t.Fatalf("Teardown: %v", err)
			}
		})
	}
}
