package pinhole_test

import (
	"errors"
	"net/netip"
	"strings"
	"testing"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// TestServingInterfacesOnlyL1 (review7 L1): control_in hands control_local
// only the datagrams to a served address that arrive on an interface pcpd
// serves, or loopback. The same 200 datagrams to the served tunnel
// addresses from the Internet (arriving on wan0, where no socket of
// pcpd's is bound) are neither metered nor counted by the unowned bucket,
// so they no longer drain the bucket an owned client whose prefix lags in
// the owner maps falls back on; the client's own on the serving
// interface still are. Before: the per-source meter let about 40 of the
// Internet's 200 through and held elements for its addresses.
func TestServingInterfacesOnlyL1(t *testing.T) {
	const (
		rate, burst = 20, 40
		n           = 200
		most        = burst + rate + 20 // metered: the burst, the rate over the send, slack
	)
	topo := netlab.NewTopology(t, netlab.TopologyOptions{})
	b := newBackend(t, topo.Host, pinhole.Config{Meter: pinhole.Meter{Rate: rate, Burst: burst, Ports: []uint16{5351},
		OwnerRate: rate, OwnerBurst: burst, UnownedRate: rate, UnownedBurst: burst}})
	setServed(t, b, []string{topo.HostLANIf}, topo.HostTunnelV6, topo.HostTunnelV4)
	if err := b.SetOwners([]pinhole.Owner{{ID: "lan:client", Prefixes: []netip.Prefix{topo.ClientPrefix6, topo.ClientPrefix4}}}, nil); err != nil {
		t.Fatalf("SetOwners: %v", err)
	}
	// The Internet reaches the tunnel's IPv4 address through wan0 too.
	topo.Internet.MustRun(t, "ip", "route", "add", topo.HostTunnelV4.String()+"/32", "via", topo.HostPublicV4.String())
	if got := nftList(t, topo.Host, "set", "inet", "pcpd", "serving_ifs"); !strings.Contains(got, `"lo"`) || !strings.Contains(got, `"`+topo.HostLANIf+`"`) {
		t.Fatalf("serving_ifs lacks lo or %s:\n%s", topo.HostLANIf, got)
	}

	for _, c := range []struct {
		name    string
		ns      *netlab.NS
		src     netip.Addr
		dst     netip.Addr
		metered bool
	}{
		{"Internet over wan0, IPv6", topo.Internet, topo.InternetV6, topo.HostTunnelV6, false},
		{"Internet over wan0, IPv4", topo.Internet, topo.InternetV4, topo.HostTunnelV4, false},
		{"client on the serving interface, IPv6", topo.Client, topo.ClientV6, topo.HostTunnelV6, true},
		{"client on the serving interface, IPv4", topo.Client, topo.ClientV4, topo.HostTunnelV4, true},
		{"the host itself over loopback", topo.Host, topo.HostTunnelV6, topo.HostTunnelV6, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			dst := netip.AddrPortFrom(c.dst, 5351)
			srv := countUDP(t, topo.Host, dst) // unbound: it sees what any interface delivers
			got := received(t, c.ns, c.src, dst, n, srv)
			meters := nftList(t, topo.Host, "set", "inet", "pcpd", "meter6") + nftList(t, topo.Host, "set", "inet", "pcpd", "meter4")
			if c.metered {
				// The owner's bucket is shared by both families (and by the
				// host's own address, inside the client's /64): some, not
				// all.
				if got > most || got < 1 {
					t.Errorf("%d from %v: socket got %d, want 1..%d (metered, answered)", n, c.src, got, most)
				}
				return
			}
			if got != n {
				t.Errorf("%d from %v: socket got %d, want all (not metered)", n, c.src, got)
			}
			if strings.Contains(meters, c.src.String()) || (c.src.Is6() && strings.Contains(meters, netip.PrefixFrom(c.src, 64).Masked().Addr().String())) {
				t.Errorf("%v is in the per-source meter:\n%s", c.src, meters)
			}
			if d := unownedDrops(t, topo.Host); d != 0 {
				t.Errorf("the unowned bucket dropped %d", d)
			}
		})
	}
}

// TestServingIfsHealthyL1: Healthy notices serving_ifs flushed, short of
// an interface or holding one too many, and Setup restores it.
func TestServingIfsHealthyL1(t *testing.T) {
	ns := netlab.NewNS(t, "servingifs")
	b := newBackend(t, ns, pinhole.Config{Meter: pinhole.Meter{Rate: 200}})
	setServed(t, b, []string{"wg0", "lan0", "wg0"}, netip.MustParseAddr("2001:db8::1"))
	if err := b.Healthy(); err != nil {
		t.Fatalf("Healthy: %v", err)
	}
	if err := b.SetServed(nil, []string{""}); !errors.Is(err, pinhole.ErrInvalid) {
		t.Errorf("SetServed of an empty interface name: %v, want ErrInvalid", err)
	}
	if err := b.SetServed(nil, []string{"a-name-far-too-long"}); !errors.Is(err, pinhole.ErrInvalid) {
		t.Errorf("SetServed of a name over IFNAMSIZ: %v, want ErrInvalid", err)
	}
	for _, tamper := range []string{
		"flush set inet pcpd serving_ifs",
		`delete element inet pcpd serving_ifs { "lo" }`,
		`delete element inet pcpd serving_ifs { "wg0" }`,
		`add element inet pcpd serving_ifs { "wan0" }`,
	} {
		ns.MustRun(t, "nft", tamper)
		if err := b.Healthy(); !errors.Is(err, pinhole.ErrUnhealthy) {
			t.Errorf("nft %s: Healthy %v, want ErrUnhealthy", tamper, err)
			continue
		}
		if err := b.Setup(); err != nil {
			t.Fatalf("Setup after nft %s: %v", tamper, err)
		}
		if err := b.Healthy(); err != nil {
			t.Errorf("Healthy after repairing nft %s: %v", tamper, err)
		}
		got := nftList(t, ns, "set", "inet", "pcpd", "serving_ifs")
		for _, want := range []string{`"lo"`, `"lan0"`, `"wg0"`} {
			if !strings.Contains(got, want) {
				t.Errorf("after repairing nft %s: serving_ifs lacks %s:\n%s", tamper, want, got)
			}
		}
		if strings.Contains(got, "wan0") {
			t.Errorf("after repairing nft %s: serving_ifs keeps wan0:\n%s", tamper, got)
		}
	}
}
