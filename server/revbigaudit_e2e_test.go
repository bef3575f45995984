package server

import (
	"errors"
	"net"
	"reflect"
	"sync/atomic"
	"testing"
	"time"
	"unsafe"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/policy"
)

// TestE2EAuditAboveMaxWatchedKeepsFlows (review h/revbigaudit; root,
// lab): with the firewall watch on (TestE2EAuditAboveMaxRestores runs it
// off) and the threshold lowered to 4, three of Serve's audits above it
// (every second) re-install every live lease's pinholes (IPv6 MAP, IPv4
// NAPT MAP and its SNAT companion, PEERs of both families, an IPv6
// redirect, a NAT-PMP mapping), each refreshed in place on this kernel,
// and re-created (add, delete, add in one transaction: what kernels
// before 6.10 get; the backend's probe result forced off here): an
// established connection through each still carries data, and the
// watch is told nothing of the audit's own writes (no restore, no undone
// add, no lost notification: the audit's installs would otherwise come
// back as foreign adds, or overflow the watch at 1 000 000 leases).
func TestE2EAuditAboveMaxWatchedKeepsFlows(t *testing.T) {
	netlab.RequireRoot(t)
	t.Run("in place", func(t *testing.T) { auditWatchedKeepsFlows(t, true) })
	t.Run("re-created", func(t *testing.T) { auditWatchedKeepsFlows(t, false) })
}

// setUpdatesInPlace forces the backend's probe result (pinhole's
// SetUpdatesInPlace is its own package's test export), before any lease.
func setUpdatesInPlace(t *testing.T, l *lab, v bool) {
	f := reflect.ValueOf(l.fw).Elem().FieldByName("inPlace")
	*(*bool)(unsafe.Pointer(f.UnsafeAddr())) = v
	if l.fw.UpdatesInPlace() != v {
		t.Fatalf("UpdatesInPlace %v, want %v", l.fw.UpdatesInPlace(), v)
	}
}

func auditWatchedKeepsFlows(t *testing.T, inPlace bool) {
	var audits atomic.Int64
	saved, hook := auditMaxLeases, auditLargeHook
	t.Cleanup(func() { auditMaxLeases, auditLargeHook = saved, hook })
	auditMaxLeases = 4
	auditLargeHook = func(int) { audits.Add(1) }
	l := newLab(t, func(c *Config, _ *policy.Config) {
		c.TamperInterval, c.AuditInterval = time.Hour, time.Second
	})
	if !l.fw.UpdatesInPlace() {
		t.Fatal("this kernel does not update elements in place (Linux ≥ 6.10 does)")
	}
	setUpdatesInPlace(t, l, inPlace)
	kinds := []string{"map6", "map4", "peer6", "peer4", "redir6", "pmp"}
	var conns []net.Conn
	for i, k := range kinds {
		c, _, _ := l.inbound(t, k, uint16(5101+10*i), time.Hour)
		conns = append(conns, c)
	}
	if n := len(l.srv.Leases()); n <= auditMaxLeases {
		t.Fatalf("%d leases, want more than the threshold %d", n, auditMaxLeases)
	}
	from := audits.Load()
	if err := netlab.Eventually(watchBound, func() error {
		if audits.Load() < from+3 {
			return errors.New("audit not run")
		}
		return nil
	}); err != nil {
		t.Fatalf("%d audits above the threshold in %v, want 3", audits.Load()-from, watchBound)
	}
	for i, c := range conns {
		if err := echoOnce(c); err != nil {
			t.Errorf("%s's connection after the audits: %v", kinds[i], err)
		}
	}
	for name, c := range map[string]float64{
		"pcpd_firewall_watch_restored_total":    counterValue(t, l.srv.m.watchRestored),
		"pcpd_firewall_watch_undone_adds_total": counterValue(t, l.srv.m.watchUndone),
		"pcpd_firewall_watch_lost_total":        counterValue(t, l.srv.m.watchLost),
	} {
		if c != 0 {
			t.Errorf("%s %v after the audits, want 0 (the audit's own writes told to the watch)", name, c)
		}
	}
	if n := len(l.srv.Leases()); n != len(kinds) {
		t.Errorf("%d leases after the audits, want %d", n, len(kinds))
	}
}
