package server

import (
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/policy"
	"github.com/pcpd/pcpd/server/servertest"
)

// TestRestoreRefusedRetryUntilDone: a refused lease's pinhole whose
// deletion fails at start is deleted again at every firewall check while
// the kernel keeps refusing (each failure counted in
// pcpd_kernel_errors_total), its connections are not flushed meanwhile,
// and once a check's deletion goes through they are flushed, once, with
// the pinhole gone; later checks have nothing left to do.
func TestRestoreRefusedRetryUntilDone(t *testing.T) {
	for _, fails := range []int{0, 1, 3} {
		h := newHarness(t)
		h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 22, 0, time.Hour, 1)), pcp.Success)
		want := hole(6, addrA, 22, addrA, 22)
		h.pcfg.DenyPorts = []policy.PortRange{{First: 22, Last: 22}}
		h.cfg.KeepConnections = false
		failing := true
		h.fw.FailApply = func(ops []pinhole.Op) error {
			for _, op := range ops {
				if failing && op.Kind == pinhole.Delete {
					return servertest.ErrInjected
				}
			}
			return nil
		}
		// nflushes: per flush of addrA:22, whether the pinhole was still open.
		s, _, nflushes := h.startRecordingFlushes(t, addrA, 22, want)
		for i := range fails {
			before := counterValue(t, s.m.kernelErrors)
			s.checkFirewall()
			if d := counterValue(t, s.m.kernelErrors) - before; d != 1 {
				t.Errorf("fails=%d: check %d: pcpd_kernel_errors_total went up by %v for a failed retry, want 1", fails, i, d)
			}
			if _, open := h.fw.Holes()[want]; !open {
				t.Fatalf("fails=%d: check %d: the pinhole went although deletes fail", fails, i)
			}
			if f := nflushes(); len(f) != 0 {
				t.Fatalf("fails=%d: check %d: flushed while the deletion still fails: %v", fails, i, f)
			}
		}
		failing = false
		s.checkFirewall()
		if _, open := h.fw.Holes()[want]; open {
			t.Fatalf("fails=%d: the check after the kernel took deletes again left the pinhole", fails)
		}
		if f := nflushes(); len(f) != 1 || f[0] {
			t.Errorf("fails=%d: flushes of [%v]:22: %v, want one, with the pinhole gone ([false])", fails, addrA, f)
		}
		applies := h.fw.Applies
		s.checkFirewall()
		if h.fw.Applies != applies || len(s.undeleted) != 0 || len(s.undeletedEnds) != 0 {
			t.Errorf("fails=%d: the retry goes on when done: %d applies, %d pinholes, %d flushes pending",
				fails, h.fw.Applies-applies, len(s.undeleted), len(s.undeletedEnds))
		}
		if f := nflushes(); len(f) != 1 {
			t.Errorf("fails=%d: flushed again: %v", fails, f)
		}
	}
}
