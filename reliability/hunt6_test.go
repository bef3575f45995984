package reliability

import (
	"context"
	"net/netip"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
)

// TestRevokeWhileStateReadOnly (h/hunt6, issue 9): pcpd runs with its
// state directory read-only (as the kernel leaves a file system after an
// I/O error with errors=remount-ro; pcpd serves its stored leases), and
// the admin gives a client's addresses to a new device: the old peer
// removed, a new key with the same AllowedIPs. The old peer's pinholes,
// an IPv6 MAP and a NAT-PMP DNAT of a public port, now open the new
// peer's addresses, which never asked: the ownership sweep must take them
// out of the kernel (LIFE-05), whether or not the store can record it.
// Judged by pcpd's sets and by connections from the internet to the new
// peer's service. Then pcpd restarts writable: the leases the store still
// holds are revoked again by the start's sweep.
//
// On main the sweep's store commit failed, the kernel's deletes were
// undone (tx.commit's rollback) and retried at every sweep, for as long as
// the directory stayed read-only: the old peer's pinholes lived until
// their leases expired.
func TestRevokeWhileStateReadOnly(t *testing.T) {
	l := newLab(t, labOptions{wireGuard: true})
	l.start()
	cli6, cli4 := l.topo.ClientV6, l.topo.ClientV4
	l.topo.Client.ServeTCP(t, netip.AddrPortFrom(cli6, servicePort).String())
	l.topo.Client.ServeTCP(t, netip.AddrPortFrom(cli4, servicePort).String())
	l.mustMap(l.pcpClient(cli6), cli6, pcp.ProtoTCP, servicePort, time.Hour)
	ext := l.mustPMP(l.pcpClient(cli4), pcp.PMPOpMapTCP, servicePort, time.Hour)
	for _, a := range []netip.AddrPort{netip.AddrPortFrom(cli6, servicePort), ext} {
		if err := l.topo.Internet.DialTCP(a.String(), time.Second); err != nil {
			t.Fatalf("control: the mapping %v does not reach the client: %v", a, err)
		}
	}

	l.stop()
	if err := syscall.Mount(l.dir, l.dir, "", syscall.MS_BIND, ""); err != nil {
		t.Fatal(err)
	}
	mounted := true
	unmount := func() {
		if mounted {
			syscall.Unmount(l.dir, syscall.MNT_DETACH)
			mounted = false
		}
	}
	t.Cleanup(unmount)
	if err := syscall.Mount("", l.dir, "", syscall.MS_REMOUNT|syscall.MS_BIND|syscall.MS_RDONLY, ""); err != nil {
		t.Fatal(err)
	}
	l.start()
	if !l.kernelHas(cli6, pcp.ProtoTCP, servicePort) || !l.kernelHas(cli4, pcp.ProtoTCP, servicePort) {
		t.Fatal("stored leases not served from a read-only state directory")
	}

	off := l.log.len()
	l.swapDevice()
	swapped := time.Now()
	// The new device speaks first (an ANNOUNCE: no lease), so that its
	// session with the host is up and the internet's connections reach it.
	if _, ok := waitFor(10*time.Second, func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
		defer cancel()
		_, err := l.announce(ctx, cli6)
		return err == nil
	}); !ok {
		t.Fatal("the new device's tunnel carries no traffic")
	}
	oldHeld := func() bool {
		return l.kernelHas(cli6, pcp.ProtoTCP, servicePort) || l.kernelHas(cli4, pcp.ProtoTCP, servicePort)
	}
	took, gone := waitFor(12*time.Second, func() bool { return !oldHeld() })
	if !gone {
		var reached []string
		for _, a := range []netip.AddrPort{netip.AddrPortFrom(cli6, servicePort), ext} {
			if l.topo.Internet.DialTCP(a.String(), time.Second) == nil {
				reached = append(reached, a.String())
			}
		}
		t.Fatalf("%v after the old peer was removed and its addresses given to a new one, with the state directory read-only, "+
			"the kernel still holds the old peer's pinholes (IPv6 %v, NAT-PMP %v); connections from the internet reached the new peer's service through them: %v; %d log lines since the swap, the last: %s",
			time.Since(swapped).Round(time.Millisecond), l.kernelHas(cli6, pcp.ProtoTCP, servicePort), l.kernelHas(cli4, pcp.ProtoTCP, servicePort),
			reached, strings.Count(l.log.since(off), "\n"), l.log.tail(1))
	}
	for _, a := range []netip.AddrPort{netip.AddrPortFrom(cli6, servicePort), ext} {
		if l.topo.Internet.DialTCP(a.String(), time.Second) == nil {
			t.Errorf("a connection from the internet to %v reached the new peer, which holds no lease", a)
		}
	}
	if ls := l.leases(); len(ls) != 0 {
		t.Errorf("leases after the revocation: %v", ls)
	}
	if !strings.Contains(l.log.since(off), "revoked: address no longer owned") {
		t.Errorf("revocation not logged:\n%s", l.log.since(off))
	}
	if testing.Verbose() {
		t.Logf("log since the swap:\n%s", l.log.since(off))
	}
	t.Logf("read-only state directory: the old peer's pinholes left the kernel %v after the swap (%v after the new device's first packet)",
		time.Since(swapped).Round(time.Millisecond), took.Round(time.Millisecond))

	// A restart, writable: whatever the store still holds of the old peer
	// is revoked again.
	l.kill9()
	unmount()
	l.start()
	if took, ok := waitFor(5*time.Second, func() bool { return !oldHeld() && len(l.leases()) == 0 }); !ok {
		t.Fatalf("after a restart the old peer's leases are back: kernel %v, leases %v", oldHeld(), l.leases())
	} else {
		t.Logf("restart: no old lease in the kernel %v after pcpd answered", took.Round(time.Millisecond))
	}
}
