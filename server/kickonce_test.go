package server

import (
	"net/netip"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

// TestKickGapOneTimer (review h/revpr of h/prio): kicks that come in the
// gap after a kicked read of the host's DNAT rules (the firewall watch
// telling another process's commits, one after another) set one timer to
// kick again once the gap has passed, not one each, and make no read;
// the timer's kick, once it fires, reads, and a kick in the gap after
// that sets one timer again. Counted: reads of the fake reader, timers
// started (afterFunc; none fires on its own: no time is asserted).
// Before (housekeep's time.AfterFunc per kick), with onKick doing as
// housekeep did: "100 kicks in the gap: 100 timers started, want 1".
func TestKickGapOneTimer(t *testing.T) {
	ff := &fakeForeign{}
	s := &Server{log: zap.NewNop(), foreign: ff}
	s.cfg.ExternalIPv4 = netip.MustParseAddr("198.51.100.1")
	s.cfg.IPv4Ports = PortRange{First: 1024, Last: 65535}
	h := &s.hostPorts
	h.s = s
	h.kick = make(chan struct{}, 1)
	var timers []func()
	h.afterFunc = func(_ time.Duration, f func()) { timers = append(timers, f) }
	h.lastUse = time.Now() // allocations asked: the rules are in use

	h.onKick() // the first kick reads at once
	if r := ff.reads.Load(); r != 1 || len(timers) != 0 {
		t.Fatalf("first kick: %d reads, %d timers; want 1, 0", r, len(timers))
	}
	h.mu.Lock()
	h.dnatReadAt = time.Now().Add(time.Hour) // the gap lasts the test (no clock read asserted)
	h.mu.Unlock()
	for range 100 {
		h.onKick()
	}
	if r := ff.reads.Load(); r != 1 || len(timers) != 1 {
		t.Fatalf("100 kicks in the gap: %d reads, %d timers started, want 1 read, 1 timer", r, len(timers))
	}
	timers[0]() // the gap passed: the timer kicks
	select {
	case <-h.kick:
	default:
		t.Fatal("the timer did not kick")
	}
	for range 10 {
		h.onKick() // still in the (test's) gap: a timer again, one
	}
	if len(timers) != 2 {
		t.Errorf("10 kicks after the timer fired: %d timers in all, want 2", len(timers))
	}
}

// TestRefreshOlderDumpNotStored (issue 9, h/revf4's "every path" check
// of the stores' order): a background refresh dumps the host's sockets
// without the lock; an inline scan (an allocation finding the sets stale)
// that begins during that dump and sees a service's new listening port
// stores first; the refresh's older dump, which did not see it, must not
// replace it. The DNAT reads were ordered (dnatSeq); the socket dumps
// were not: before, "port 40001 the inline scan found listening is not
// reserved after the older background dump stored".
func TestRefreshOlderDumpNotStored(t *testing.T) {
	oldTCP, oldUDP := socketDiagTCP, socketDiagUDP
	t.Cleanup(func() { socketDiagTCP, socketDiagUDP = oldTCP, oldUDP })
	s := &Server{log: zap.NewNop()}
	h := &s.hostPorts
	h.s = s
	h.lastUse = time.Now() // in use: refresh dumps
	const port = 40001
	inline, scanned := false, false
	socketDiagUDP = func(uint8) ([]*netlink.Socket, error) { return nil, nil }
	socketDiagTCP = func(fam uint8) ([]*netlink.Socket, error) {
		if inline {
			// The inline scan's dump: the service listens now.
			sk := &netlink.Socket{State: tcpListen}
			sk.ID.SourcePort = port
			return []*netlink.Socket{sk}, nil
		}
		if fam == unix.AF_INET && !scanned {
			// The background dump has read the (old) IPv4 list; the
			// service listens, an allocation scans inline.
			inline, scanned = true, true
			ok := h.reserved(protoTCP, port)
			inline = false
			if !ok {
				t.Error("the inline scan did not see the new listener")
			}
		}
		return nil, nil // the background's: as before the listener
	}
	h.refresh() // the background's step: its dump begun before the inline scan
	if !h.reserved(protoTCP, port) {
		t.Errorf("port %d the inline scan found listening is not reserved after the older background dump stored", port)
	}
}
