package pinhole_test

import (
	"errors"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pinhole"
)

// TestAttachedCutReloadWindow (review h/revattcut, finding 3, OPEN: skipped
// unless REVATTCUT_OPEN=1): the admin reloads their firewall ("nft -f" of
// a file that begins "flush ruleset", systemctl reload nftables), which
// deletes pcpd's objects; the tamper check's repair (server.checkFirewall)
// runs Setup, which lays out pcpd_cut and the re-checks over empty sets,
// and only then re-installs every lease's pinholes (Apply, in batches).
// Between the two, every established flow pcpd labelled, of mappings that
// all live, is dropped: a window as long as the re-install (thousands of
// leases: many transactions). Standalone has it too (its table deleted).
// Here the two flows fail their echo after Setup and carry data again
// only after the re-install.
func TestAttachedCutReloadWindow(t *testing.T) {
	if os.Getenv("REVATTCUT_OPEN") == "" {
		t.Skip("open finding (review h/revattcut, finding 3): set REVATTCUT_OPEN=1")
	}
	topo, b := attachedCut(t)
	pin := pinhole.Pinhole{Protocol: tcp, InternalAddr: topo.ClientV6, InternalPort: 7900}
	napt := pinhole.Pinhole{Protocol: udp, InternalAddr: topo.ClientV4, InternalPort: 7901, ExternalAddr: topo.HostPublicV4, ExternalPort: 17901}
	apply(t, b, install(pin, time.Hour), install(napt, time.Hour))
	flows := []attFlow{
		{name: "IPv6 pinhole", f: openEcho(t, tcp, topo.Client, topo.Internet, netip.AddrPortFrom(topo.InternetV6, 47900),
			netip.AddrPortFrom(pin.InternalAddr, pin.InternalPort))},
		{name: "IPv4 NAPT", f: openEchoVia(t, udp, topo.Client, netip.AddrPortFrom(napt.InternalAddr, napt.InternalPort), topo.Internet,
			netip.AddrPortFrom(topo.InternetV4, 47901), netip.AddrPortFrom(napt.ExternalAddr, napt.ExternalPort))},
	}
	checkAttFlows(t, topo.Host, "live", flows)
	topo.Host.MustRun(t, "nft", "flush", "ruleset")
	loadNft(t, topo.Host, strings.NewReplacer("HOSTPUB", topo.HostPublicV4.String(), "CLIENT4", topo.ClientV4.String(),
		"CLIENT6", topo.ClientV6.String()).Replace(attCutRuleset))
	checkAttFlows(t, topo.Host, "reloaded", flows)
	if err := b.Healthy(); !errors.Is(err, pinhole.ErrUnhealthy) {
		t.Fatalf("Healthy after the reload: %v", err)
	}
	if err := b.Setup(); err != nil {
		t.Fatal(err)
	}
	if err := b.SetProtected([]netip.Prefix{topo.ClientPrefix6, topo.ClientPrefix4}); err != nil {
		t.Fatal(err)
	}
	checkAttFlows(t, topo.Host, "repaired, pinholes not yet re-installed", flows)
	apply(t, b, install(pin, time.Hour), install(napt, time.Hour))
	checkAttFlows(t, topo.Host, "re-installed", flows)
}
