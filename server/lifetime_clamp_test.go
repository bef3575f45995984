package server

import (
	"errors"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/policy"
)

// TestMaxLifetimeBeyondAYear: every granted lifetime becomes a kernel
// element timeout, and pinhole.Op refuses timeouts over 365 days
// (maxTimeout). The configuration used to accept a max lifetime up to the
// 32-bit lifetime field (4 294 967 295 s) and the policy granted it, so
// with --max-lifetime 9600h every request for more than a year (a client
// asking for the largest lifetime, 0xFFFFFFFF, is one) failed with
// NO_RESOURCES, though a year's was granted. The bound is now the
// kernel's: a max lifetime over 365 days is refused as configuration
// (policy.New here; config's --max-lifetime in config_test.go), and at
// 365 days every request, the largest included, gets its lease into the
// kernel with the promised timeout.
func TestMaxLifetimeBeyondAYear(t *testing.T) {
	own, err := policy.NewStatic(nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range []time.Duration{400 * 24 * time.Hour, time.Duration(1<<32-1) * time.Second} {
		if _, err := policy.New(policy.Config{MaxLifetime: d}, own); !errors.Is(err, policy.ErrInvalidConfig) {
			t.Errorf("max lifetime %v (beyond the kernel's 365 days): policy.New error %v, want ErrInvalidConfig", d, err)
		}
	}
	const maxLife = policy.LongestMaxLifetime
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
		// The kernel element for that port (not l.kernelHas, which
		// wallclock_step_test.go on h/revlife adds: this file stands alone).
		var left time.Duration
		ok := false
		for _, e := range l.kernelHoles() {
			if e.Pinhole.InternalAddr == c && e.Pinhole.InternalPort == tc.port {
				left, ok = e.Remaining, true
			}
		}
		if !ok || left < tc.want-time.Minute || left > tc.want {
			t.Errorf("MAP %d granted %v: kernel element present %v, %v left", tc.port, tc.want, ok, left)
		}
	}
}
