package server

import (
	"net/netip"
	"testing"
	"time"

	"go.uber.org/zap"
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
