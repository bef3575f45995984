package policy

import (
	"context"
	"errors"
	"net/netip"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// typedDevices is devices reporting its devices as of one type.
type typedDevices struct {
	*devices
	typ wgtypes.DeviceType
}

func (d typedDevices) Device(name string) (*wgtypes.Device, error) {
	dev, err := d.devices.Device(name)
	if dev != nil {
		dev.Type = d.typ
	}
	return dev, err
}

// TestWireGuardInterfacesRenamed (review of the F3 fix, h/revown): wg0
// (peer 1, the client) and wg1 (peer 2) trade names. The listener sees it
// first and calls InterfacesRenamed: from then on a request arriving under
// either name is nobody's (before, the stale per-interface table of wg0
// took peer 2's request from the client's address as peer 1's), while
// Lookup (sweeps) is unchanged. A clean re-read by the new names clears
// the marks for kernel devices (Run re-reads at once); a read error keeps
// them; a userspace device, which wgctrl finds by the name it was started
// with, stays refused.
func TestWireGuardInterfacesRenamed(t *testing.T) {
	a, b := netip.MustParseAddr("2001:db8:a::5"), netip.MustParseAddr("2001:db8:b::5")
	for _, tc := range []struct {
		name    string
		typ     wgtypes.DeviceType
		failWg1 bool // the first re-read fails on wg1
		cleared bool // after a clean re-read, the new names are served
		viaRun  bool // the re-read is Run's, asked by InterfacesRenamed
	}{
		{"kernel", wgtypes.LinuxKernel, false, true, false},
		{"kernel, Run re-reads at once", wgtypes.LinuxKernel, false, true, true},
		{"kernel, read error first", wgtypes.LinuxKernel, true, true, false},
		{"userspace", wgtypes.Userspace, false, false, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := &devices{}
			d.set("wg0", peer(1, "2001:db8:a::/48"))
			d.set("wg1", peer(2, "2001:db8:b::/48"))
			w, err := newWireGuard(typedDevices{d, tc.typ}, []string{"wg0", "wg1"}, time.Hour, nil,
				WithMissInterval(time.Hour), func(w *WireGuard) {
					w.kernel = func(name string) (string, int, bool, error) { return name, 0, true, nil }
				})
			if err != nil {
				t.Fatal(err)
			}
			p, err := New(Config{}, w)
			if err != nil {
				t.Fatal(err)
			}
			on := func(src netip.Addr, iface string) OwnerID {
				o, _ := w.LookupOn(src, iface)
				if ao, r := p.Authorize(Request{Source: src, Iface: iface, Target: src, Protocol: 6, InternalPort: 2000}); (r == NoOwner) != (o.ID == "") || (o.ID != "" && ao.ID != o.ID) {
					t.Errorf("Authorize(%s on %s) = %v %v, LookupOn %q", src, iface, ao.ID, r, o.ID)
				}
				return o.ID
			}
			if got := on(a, "wg0"); got != wgID(1) {
				t.Fatalf("before: %s on wg0 is %q, want peer 1", a, got)
			}
			// The trade, as the devices see it; nothing re-read yet.
			d.set("wg0", peer(2, "2001:db8:b::/48"))
			d.set("wg1", peer(1, "2001:db8:a::/48"))
			w.InterfacesRenamed([]string{"wg0", "wg1"})
			for _, c := range []struct {
				src   netip.Addr
				iface string
			}{{a, "wg0"}, {a, "wg1"}, {b, "wg0"}, {b, "wg1"}} {
				if got := on(c.src, c.iface); got != "" {
					t.Errorf("renamed, not re-read: %s on %s is %q, want nobody's", c.src, c.iface, got)
				}
			}
			if o, ok := w.Lookup(a); !ok || o.ID != wgID(1) {
				t.Errorf("renamed: Lookup(%s) = %v %v, want peer 1 (sweeps are unaffected)", a, o.ID, ok)
			}
			if tc.failWg1 {
				d.fail("wg1", errors.New("transient"))
				if err := w.Refresh(context.Background()); err == nil {
					t.Fatal("Refresh with wg1 failing: no error")
				}
				if got := on(b, "wg0"); got != "" {
					t.Errorf("after a failed re-read: %s on wg0 is %q, want nobody's", b, got)
				}
				d.fail("wg1", nil)
			}
			if tc.viaRun {
				ctx, cancel := context.WithCancel(context.Background())
				defer cancel()
				done := make(chan struct{})
				go func() { w.Run(ctx); close(done) }()
				defer func() { cancel(); <-done }()
				w.InterfacesRenamed([]string{"wg0"}) // Run is up now: asks it
				deadline := time.Now().Add(5 * time.Second)
				// Both interfaces' views: Run's own first read may race
				// the call above and clear wg1's mark before wg0's is set
				// again, so a on wg1 alone can be back before the re-read
				// this call asks for.
				for (on(a, "wg1") != wgID(1) || on(b, "wg0") != wgID(2)) && time.Now().Before(deadline) {
					time.Sleep(10 * time.Millisecond)
				}
			} else if err := w.Refresh(context.Background()); err != nil {
				t.Fatal(err)
			}
			want1, want2 := OwnerID(""), OwnerID("")
			if tc.cleared {
				want1, want2 = wgID(1), wgID(2)
			}
			if got := on(a, "wg1"); got != want1 {
				t.Errorf("re-read: %s on wg1 is %q, want %q", a, got, want1)
			}
			if got := on(b, "wg0"); got != want2 {
				t.Errorf("re-read: %s on wg0 is %q, want %q", b, got, want2)
			}
			if got := on(a, "wg0"); got != "" {
				t.Errorf("re-read: %s on wg0 (now peer 2's interface) is %q, want nobody's", a, got)
			}
		})
	}
}
