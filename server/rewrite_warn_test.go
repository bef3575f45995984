package server

import (
	"testing"
	"time"

	"go.uber.org/zap/zapcore"

	"github.com/pcpd/pcpd/pcp"
)

// TestRewriteRefusedWarnsEveryRepeat: while the store refuses the
// rewrite after a wall-clock step (retried every sweep tick, 125 ms), the
// warning is logged at the first failure and then at most every
// repeatEvery with the failures held back ("repeats"), and the recovery
// once (RELIABILITY.md known bug 8, h/storeq). On main every tick logged
// it: 960 lines in the 2 minutes here, and no recovery line. Rows: the
// leases' rewrite refused; the same with a second step (back 1 h) while
// refused, which a window on the entries' wall-clock time (zap's sampler)
// stretched by the step; every lease owed (storeDebt), so the rewrite's
// last step writes the debt back, refused.
func TestRewriteRefusedWarnsEveryRepeat(t *testing.T) {
	const (
		tick  = 125 * time.Millisecond
		ticks = 960 // 2 min
	)
	const (
		rewriteMsg = "cannot rewrite leases after a wall-clock step; retrying"
		debtMsg    = "cannot write the lease table's state back to the store; retrying"
	)
	for _, tc := range []struct {
		name      string
		stepAt    int // a second step (back 1 h) before this tick; 0: none
		owed      bool
		msg, done string
	}{
		{"leases", 0, false, rewriteMsg, "the store takes the rewrite after the wall-clock step again"},
		{"second step back", 100, false, rewriteMsg, "the store takes the rewrite after the wall-clock step again"},
		{"debt", 0, true, debtMsg, "store is consistent with the lease table again"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rig := newBootRig(t, "8d1c2a4e-0000-4000-8000-000000000007")
			c := rig.c
			h, fst := rig.startErrStore(t)
			for _, port := range []uint16{8080, 8081, 8082} {
				h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, port, 0, 600*time.Second, 1)), pcp.Success)
			}
			if tc.owed {
				ls := h.s.Leases()
				h.s.mu.Lock()
				for _, l := range ls {
					h.s.storeDebt[l.Key] = struct{}{}
				}
				h.s.mu.Unlock()
			}
			c.step(time.Hour)
			fst.set(errInjected)
			h.logs.TakeAll() // count from here
			for i := 1; i <= ticks; i++ {
				if i == tc.stepAt {
					c.step(-time.Hour)
				}
				c.advance(tick)
				h.s.checkClock()
			}
			if h.s.rewriteAt == 0 {
				t.Fatal("rewrite done with the store refusing it")
			}
			// One line at the first failure (tick 1), then at ticks 241,
			// 481 and 721 (30 s later each), each with the 239 failures
			// held back since the one before.
			got := h.logs.TakeAll()
			per := map[string]int{}
			var lines []map[string]any
			for _, e := range got {
				if e.Level < zapcore.WarnLevel {
					continue
				}
				per[e.Message]++
				if e.Message == tc.msg {
					lines = append(lines, e.ContextMap())
				}
			}
			want := 1 + (ticks-1)/int(repeatEvery/tick)
			if len(lines) != want {
				t.Fatalf("%d warnings %q in %d ticks (%v), want %d", len(lines), tc.msg, ticks, ticks*tick, want)
			}
			for i, m := range lines[1:] {
				if r, _ := m["repeats"].(int64); r != int64(repeatEvery/tick)-1 {
					t.Errorf("line %d: repeats %v, want %d", i+2, m["repeats"], repeatEvery/tick-1)
				}
				if f, _ := m["failing_for"].(time.Duration); f != time.Duration(i+1)*repeatEvery {
					t.Errorf("line %d: failing_for %v, want %v", i+2, m["failing_for"], time.Duration(i+1)*repeatEvery)
				}
			}
			for msg, n := range per {
				if n > want {
					t.Errorf("%d warnings %q in %d ticks, want at most %d", n, msg, ticks, want)
				}
			}

			// The store takes writes again: the recovery once, the
			// rewrite done.
			fst.set(nil)
			for i := 0; i < 3; i++ {
				c.advance(tick)
				h.s.checkClock()
			}
			if h.s.rewriteAt != 0 {
				t.Errorf("rewrite not done 3 ticks after the store came back")
			}
			rec := h.logs.FilterMessage(tc.done).TakeAll()
			if len(rec) != 1 {
				t.Fatalf("%d lines %q after the store came back, want 1", len(rec), tc.done)
			}
			if f, _ := rec[0].ContextMap()["failures"].(int64); f != ticks {
				t.Errorf("recovery line: failures %v, want %d", rec[0].ContextMap()["failures"], ticks)
			}
			if n := h.logs.FilterMessage(tc.msg).Len(); n != 0 {
				t.Errorf("%d warnings %q after the store came back", n, tc.msg)
			}
		})
	}
}
