package server

import (
	"net/netip"
	"testing"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// TestServedInterfaceTwoNames (review10, A1): an interface configured
// twice, by its kernel name and by an alternative name (a config that
// lists "eth0" and systemd's "enp0s3" for the same NIC), is one interface.
// want() keyed its link-local addresses by zone, i.e. by configured name,
// so the same fe80:: address was wanted twice: the second bind failed
// (EADDRINUSE, the same address, port and device) with a "cannot serve
// address" warning at every pass (each 2 s and each netlink event, for as
// long as pcpd runs), and which name won, i.e. the zone the link-local
// clients' leases are keyed by, followed Go's map order: it could change
// from one start to the next. Every address must be served once, quietly,
// zoned by the first configured name of its interface.
func TestServedInterfaceTwoNames(t *testing.T) {
	const kernelName = altnameKernel
	ll := netip.MustParseAddr("fe80::7:1")
	_, _, h, nh := altnameBed(t, []netip.Addr{ll, netip.MustParseAddr("2001:db8:7::1")}, nil, "pcpalt")

	for _, c := range []struct {
		name   string
		ifaces []string
	}{
		{"kernel name first", []string{kernelName, "pcpalt"}},
		{"altname first", []string{"pcpalt", kernelName}},
	} {
		t.Run(c.name, func(t *testing.T) {
			for start := range 8 { // map order varies between starts
				core, logs := observer.New(zapcore.WarnLevel)
				l := &listener{log: zap.New(core), ifaces: c.ifaces, port: Port, ns: h, out: make(chan packet, 64)}
				for range 3 {
					l.resync(nh)
				}
				var zones []string
				for _, s := range l.sockets() {
					if s.local.Addr().WithZone("") == ll {
						zones = append(zones, s.local.Addr().Zone())
					}
				}
				l.closeAll()
				if n := logs.FilterMessage("cannot serve address").Len(); n > 0 {
					t.Errorf("start %d, interfaces %q: %d \"cannot serve address\" warnings in 3 passes, want none: %v", start, c.ifaces, n, logs.All()[0].ContextMap())
				}
				if len(zones) != 1 || zones[0] != c.ifaces[0] {
					t.Fatalf("start %d, interfaces %q: %v served with zones %q, want once with %q (the first configured name)", start, c.ifaces, ll, zones, c.ifaces[0])
				}
			}
		})
	}
}
