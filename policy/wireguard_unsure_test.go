package policy

import (
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// carvedLab is TestWireGuardFreshenThirdParty's setting: peer 1 holds
// 2001:db8:1::/48 on wg0 when the ownership is made (fresh bound: an
// hour, so that only the test makes the view stale), then peer 2 gets
// the more-specific 2001:db8:1:ff00::/56 inside it. tp is peer 1's
// THIRD_PARTY MAP into the carved part, own one for its own address.
func carvedLab(t *testing.T, d deviceReader, set func(name string, peers ...wgtypes.Peer)) (w *WireGuard, p *Policy, tp, own Request) {
	t.Helper()
	set("wg0", peer(1, "2001:db8:1::/48"))
	w, err := newWireGuard(d, []string{"wg0"}, time.Hour, nil, WithFreshBound(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	if p, err = New(Config{}, w); err != nil {
		t.Fatal(err)
	}
	src, carved := addr("2001:db8:1::5"), addr("2001:db8:1:ff00::5")
	tp = Request{Source: src, Iface: "wg0", Target: carved, ThirdParty: true, Protocol: 6, InternalPort: 443}
	own = Request{Source: src, Iface: "wg0", Target: src, Protocol: 6, InternalPort: 443}
	set("wg0", peer(1, "2001:db8:1::/48"), peer(2, "2001:db8:1:ff00::/56"))
	return w, p, tp, own
}

// TestWireGuardFreshenReadFails (review h/revtp): the read Freshen makes
// fails for wg0 (a UAPI or netlink error: the last good peers stay, as
// in any read). Its view is then as old as the last good read, however
// fresh readAt says it is, and peer 1's THIRD_PARTY MAP into the part
// carved out for peer 2 since was judged by it: allowed (fail open).
// It is refused now (PeersUnread, NO_RESOURCES: the client retries),
// with no re-read within the bound (a flood still costs one read per
// bound); peer 1's own address and a THIRD_PARTY delete stay allowed;
// the next read past the bound that succeeds judges it NotOwned.
func TestWireGuardFreshenReadFails(t *testing.T) {
	d := &devices{}
	w, p, tp, own := carvedLab(t, d, d.set)
	d.fail("wg0", errors.New("read unix @->/var/run/wireguard/wg0.sock: connection reset by peer"))
	w.readAt.Store(mono() - 2*int64(time.Hour))
	p.Freshen()
	if _, r := p.Authorize(tp); r == Allowed {
		t.Fatalf("THIRD_PARTY %s after a failed read of wg0 (peer 2 got 2001:db8:1:ff00::/56 before it): allowed by the last good view, read before peer 2 came; want refused", tp.Target)
	}
	if _, r := p.Authorize(own); r != Allowed {
		t.Errorf("peer 1's own address while wg0 cannot be read: %v, want %v", r, Allowed)
	}
	del := tp
	del.Delete = true
	if _, r := p.Authorize(del); r != Allowed {
		t.Errorf("THIRD_PARTY delete while wg0 cannot be read: %v, want %v", r, Allowed)
	}
	reads := d.calls.Load()
	p.Freshen()
	if k := d.calls.Load() - reads; k != 0 {
		t.Errorf("Freshen within the bound of a failed read read wg0 %d times, want 0", k)
	}
	d.fail("wg0", nil)
	w.readAt.Store(mono() - 2*int64(time.Hour))
	p.Freshen()
	if _, r := p.Authorize(tp); r != NotOwned {
		t.Errorf("THIRD_PARTY %s after wg0 reads again: %v, want %v", tp.Target, r, NotOwned)
	}
}

// hangingDevices is devices whose reads block, while hang is set, until
// release is closed: a userspace WireGuard daemon that is stopped
// (SIGSTOP, a debugger) or stuck accepts the UAPI connection in the
// kernel's backlog and never answers, and wgctrl's read has no deadline.
type hangingDevices struct {
	*devices
	hang    atomic.Bool
	entered atomic.Int64 // reads that started hanging
	release chan struct{}
}

func (h *hangingDevices) Device(name string) (*wgtypes.Device, error) {
	if h.hang.Load() {
		h.entered.Add(1)
		<-h.release
	}
	return h.devices.Device(name)
}

// TestWireGuardFreshenReadHangs (review h/revtp): the read Freshen makes
// hangs. Freshen held the refresh lock across it and waited for it
// without a bound, so the socket reader that called it answered nobody
// (its batch's other clients included) for as long as the read hung, and
// every other reader joined it at its next THIRD_PARTY request. Now each
// caller waits at most the fresh wait from the read's start (1 s) and
// the THIRD_PARTY target is refused (PeersUnread): the four "readers"
// here all come back, with one read started, not one each; peer 1's own
// address stays allowed meanwhile; once the read ends, its view (peer
// 2's /56) judges the target NotOwned.
func TestWireGuardFreshenReadHangs(t *testing.T) {
	d := &hangingDevices{devices: &devices{}, release: make(chan struct{})}
	w, p, tp, own := carvedLab(t, d, d.set)
	var released atomic.Bool
	release := func() {
		if released.CompareAndSwap(false, true) {
			close(d.release)
		}
	}
	t.Cleanup(release) // the hung read ends, whatever the test found
	d.hang.Store(true)
	w.readAt.Store(mono() - 2*int64(time.Hour))
	const readers = 4
	got := make(chan Reason, readers)
	for range readers {
		go func() {
			p.Freshen()
			_, r := p.Authorize(tp)
			got <- r
		}()
	}
	deadman := time.After(20 * time.Second) // 20 × the fresh wait: not a timing bound, a hang detector
	for i := range readers {
		select {
		case r := <-got:
			if r == Allowed {
				t.Fatalf("THIRD_PARTY %s while the read of wg0 hangs: allowed by the view read before peer 2 came, want refused", tp.Target)
			}
		case <-deadman:
			t.Fatalf("%d of %d socket readers still in Freshen 20 s after their read of wg0 hung (a stopped wireguard-go: wgctrl's read has no deadline): none answers any client meanwhile; want them back after the fresh wait, THIRD_PARTY refused",
				readers-i, readers)
		}
	}
	if k := d.entered.Load(); k != 1 {
		t.Errorf("%d reads of wg0 started for %d callers, want 1", k, readers)
	}
	if _, r := p.Authorize(own); r != Allowed {
		t.Errorf("peer 1's own address while the read hangs: %v, want %v", r, Allowed)
	}
	d.hang.Store(false)
	before := w.readAt.Load()
	release()
	for deadline := time.Now().Add(20 * time.Second); w.readAt.Load() == before; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the hung read did not end 20 s after it was released")
		}
	}
	p.Freshen()
	if _, r := p.Authorize(tp); r != NotOwned {
		t.Errorf("THIRD_PARTY %s once the hung read ended: %v, want %v", tp.Target, r, NotOwned)
	}
}

// TestWireGuardFreshenAsksRead (review h/revtp): a THIRD_PARTY target
// judged by a view within the fresh bound but read before the request
// (the lag the bound allows: up to 1 s by default) may lie in a prefix
// carved out for another peer since. The bound let it be opened; its
// pinhole then lived until some later read, which with no other
// THIRD_PARTY request is the periodic one (up to 5 s). Freshen now asks
// Run for a re-read (a miss: at most one a second), whose Changes revoke
// it about a second later.
func TestWireGuardFreshenAsksRead(t *testing.T) {
	d := &devices{}
	w, p, tp, _ := carvedLab(t, d, d.set)
	p.Freshen()
	if _, r := p.Authorize(tp); r != Allowed {
		t.Fatalf("THIRD_PARTY %s by the view read before peer 2 came, within the bound: %v, want %v (the lag the bound allows)", tp.Target, r, Allowed)
	}
	select {
	case <-w.missCh:
	default:
		t.Fatalf("THIRD_PARTY %s allowed by a view read before the request, and no re-read asked for: a pinhole it opens in peer 2's new /56 lives until the periodic read (5 s), not about the bound", tp.Target)
	}
}
