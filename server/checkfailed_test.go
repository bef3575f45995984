package server

import (
	"fmt"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/pinhole"
)

// TestCheckFirewallFailedCheck (h/nftenomem): a Healthy that could not tell
// (its sentinel transaction aborted by ENOMEM: pinhole.ErrCheckFailed) found
// no damage, so the firewall check repairs nothing; before, any error ran
// Setup and re-installed every lease's pinholes under s.mu, for a transient
// ENOMEM. Damage still repairs.
func TestCheckFirewallFailedCheck(t *testing.T) {
	for _, tc := range []struct {
		name   string
		err    error
		repair bool
	}{
		{"check failed (ENOMEM)", fmt.Errorf("pinhole: sentinel transaction: %w: %w", pinhole.ErrCheckFailed, unix.ENOMEM), false},
		{"damage", fmt.Errorf("pinhole: a pinhole set lost its sentinel (flushed?): %w: %w", pinhole.ErrUnhealthy, unix.ENOENT), true},
		{"damage and a failed check", fmt.Errorf("%w (%w)", pinhole.ErrUnhealthy, pinhole.ErrCheckFailed), true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t)
			h.do(mapReq(addrA, pcp.ProtoTCP, 443, 80, time.Hour, 1))
			setups, applies := h.fw.Setups, h.fw.Applies
			h.fw.FailHealthy = func() error { return tc.err }
			h.s.checkFirewall()
			repaired := h.fw.Setups != setups || h.fw.Applies != applies
			if repaired != tc.repair {
				t.Errorf("Healthy %v: Setups %d -> %d, Applies %d -> %d; want a repair: %v",
					tc.err, setups, h.fw.Setups, applies, h.fw.Applies, tc.repair)
			}
		})
	}
}
