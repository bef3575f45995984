package pinhole

import (
	"bytes"
	"fmt"
	"net/netip"
	"time"

	"github.com/google/nftables"
)

// The in-place update of Install and Refresh (two adds, see refreshNudge)
// needs the kernel to update an existing element's timeout when it is
// re-added without NLM_F_EXCL: Linux ≥ 6.10 (commit 4201f3938914, "set
// element timeout update support"). Older kernels (Debian 12: 6.1, Ubuntu
// 24.04: 6.8) keep the element as it is, silently: a renewal would not
// extend a pinhole and a shortening would not shorten it, so a pinhole
// could outlive its lease. Setup therefore probes the kernel once, and
// without the feature Apply keeps the add, delete, add sequence, which
// re-creates the element with exactly the timeout asked for on any kernel.

// probeAddr is the probe element's key in the all-protocols set: the IPv6
// loopback address, which no Pinhole may have (normalize refuses it; a
// forwarded packet is never addressed to it) and List leaves out.
var probeAddr = netip.IPv6Loopback()

// Timeouts of the probe: the element is added with probeLong, re-added
// with probeShort; only a kernel that updates in place then reports it
// expiring within probeShort. probeLong also bounds how long a probe
// element left by a crash lives.
const (
	probeLong  = 60 * time.Second
	probeShort = 2 * time.Second
)

func probeElement() nftables.SetElement { return element(kindAddr, Pinhole{InternalAddr: probeAddr}) }

// isProbe reports whether e (as the kernel lists it, in set k) is the
// probe element.
func isProbe(k kind, e nftables.SetElement) bool {
	return k == kindAddr && bytes.Equal(e.Key, probeElement().Key)
}

// probeInPlace asks the kernel whether re-adding an existing element
// updates its timeout: it adds the probe element with probeLong, re-adds
// it with probeShort, reads its expiry back and deletes it. Called under
// mu, after Setup created the sets.
func (b *Backend) probeInPlace() (bool, error) {
	set := b.sets[kindAddr]
	add := func(d time.Duration) error {
		el := probeElement()
		el.Timeout = d
		if err := b.conn.SetAddElements(set, []nftables.SetElement{el}); err != nil {
			return err
		}
		return b.flush()
	}
	if err := add(probeLong); err != nil {
		return false, fmt.Errorf("pinhole: probe element timeout update: add: %w", classify(err))
	}
	updated, perr := func() (bool, error) {
		if err := add(probeShort); err != nil {
			return false, fmt.Errorf("pinhole: probe element timeout update: re-add: %w", classify(err))
		}
		elems, err := b.readConn().GetSetElements(set)
		if err != nil {
			return false, fmt.Errorf("pinhole: probe element timeout update: read %s: %w", set.Name, classify(err))
		}
		for _, e := range elems {
			if isProbe(kindAddr, e) {
				return e.Expires > 0 && e.Expires <= probeShort, nil
			}
		}
		return false, fmt.Errorf("pinhole: probe element timeout update: the probe element is not in %s: %w", set.Name, ErrUnhealthy)
	}()
	// Delete as Apply does (add, then delete in one transaction), so an
	// element that expired meanwhile does not fail the removal.
	guard := probeElement()
	guard.Timeout = deleteGuardTimeout
	derr := b.conn.SetAddElements(set, []nftables.SetElement{guard})
	if derr == nil {
		derr = b.conn.SetDeleteElements(set, []nftables.SetElement{probeElement()})
	}
	if derr == nil {
		derr = b.flush()
	}
	if perr != nil {
		return false, perr
	}
	if derr != nil {
		return false, fmt.Errorf("pinhole: probe element timeout update: delete: %w", classify(derr))
	}
	return updated, nil
}

// UpdatesInPlace reports whether the kernel updates an element's timeout
// when it is re-added (found by Setup's probe; false before Setup): then
// Install and Refresh are two in-place adds, else add, delete, add.
func (b *Backend) UpdatesInPlace() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.inPlace
}
