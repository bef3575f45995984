package server

import (
	"net/netip"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/policy"
)

// TestMaxLifetimeBeyondAYear: the configuration accepts a max lifetime up
// to the 32-bit lifetime field (config/validate.go: 4 294 967 295 s), and
// the policy clamps requests to it; a lease granted that long must then go
// into the kernel. pinhole.Op refuses timeouts over 365 days (maxTimeout,
// "leases are clamped long before this anyway"), so with --max-lifetime
// 9600h every request for more than a year (a client asking for the
// largest lifetime, 0xFFFFFFFF, is one) fails, though a year's is granted.
func TestMaxLifetimeBeyondAYear(t *testing.T) {
	const maxLife = 400 * 24 * time.Hour
	l := newLab(t, func(_ *Config, p *policy.Config) { p.MaxLifetime = maxLife })
	c := l.topo.ClientV6
	for _, tc := range []struct {
		port uint16
		ask  time.Duration
		want time.Duration
	}{
		{443, 300 * 24 * time.Hour, 300 * 24 * time.Hour},
		{444, maxLife, maxLife},
		{445, time.Duration(1<<32-1) * time.Second, maxLife},
	} {
		resp := l.pcp(mapReq(c, pcp.ProtoTCP, tc.port, 0, tc.ask, byte(tc.port)))
		if resp.Result != pcp.Success || resp.Lifetime != tc.want {
			t.Errorf("MAP %d asking %v: %v lifetime %v, want SUCCESS %v", tc.port, tc.ask, resp.Result, resp.Lifetime, tc.want)
			continue
		}
		left, ok := l.kernelHas(netip.AddrPortFrom(c, tc.port))
		if !ok || left < tc.want-time.Minute || left > tc.want {
			t.Errorf("MAP %d granted %v: kernel element present %v, %v left", tc.port, tc.want, ok, left)
		}
	}
}
