package store

import (
	"strings"
	"testing"
	"time"
)

// TestEPO04UnseenStep: a step back of the wall clock that the caller
// measured since the state was written (WithUnseenStep: pcpd's boot
// anchor, same boot, matching origin) is not a clock gone backwards: Open
// keeps the epoch, where without the option it resets it ("clock
// doubtful"). A step it does not account for still does; a forward step
// changes nothing; the step is asked for the stored origin. "back 1 h,
// measured" fails without judge's use of the option (Fresh, "clock
// doubtful"), "forward 1 h, heartbeat after the step" if judge took a
// forward step off its clock too (the heartbeat is the wall clock's).
func TestEPO04UnseenStep(t *testing.T) {
	origin := t0.Add(-time.Hour)
	for _, tc := range []struct {
		name      string
		now       time.Time     // the wall clock at the restart
		unseen    time.Duration // what WithUnseenStep reports
		heartbeat time.Time     // the last heartbeat (zero: t0)
		fresh     bool
	}{
		{name: "back 1 h, measured", now: t0.Add(-time.Hour + 10*time.Second), unseen: -time.Hour},
		{name: "back 1 h, heartbeat after the step", now: t0.Add(-time.Hour + 10*time.Second), unseen: -time.Hour,
			heartbeat: t0.Add(-time.Hour + 5*time.Second)},
		{name: "back 2 h, 1 h measured", now: t0.Add(-2 * time.Hour), unseen: -time.Hour, fresh: true},
		{name: "back 1 h, none measured", now: t0.Add(-time.Hour + 10*time.Second), fresh: true},
		{name: "forward 1 h, measured", now: t0.Add(time.Hour), unseen: time.Hour},
		{name: "forward 1 h, heartbeat after the step", now: t0.Add(time.Hour + 2*time.Second), unseen: time.Hour,
			heartbeat: t0.Add(time.Hour + time.Second)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, _ := openT(t, t.TempDir(), fixedClock(t0))
			if err := s.ResetEpoch(origin); err != nil {
				t.Fatal(err)
			}
			if err := s.Commit([]Lease{leaseN(1)}, nil); err != nil { // heartbeat t0
				t.Fatal(err)
			}
			if !tc.heartbeat.IsZero() {
				if err := s.Touch(tc.heartbeat); err != nil {
					t.Fatal(err)
				}
			}
			var asked time.Time
			_, st := reopen(t, s, fixedClock(tc.now), WithUnseenStep(func(o time.Time) time.Duration {
				asked = o
				return tc.unseen
			}))
			if st.Fresh != tc.fresh || !tc.fresh && st.Recovered != "" || tc.fresh && !strings.Contains(st.Recovered, "clock doubtful") {
				t.Fatalf("Fresh = %v, Recovered = %q; want Fresh %v", st.Fresh, st.Recovered, tc.fresh)
			}
			if !asked.Equal(origin) {
				t.Errorf("step asked for origin %v, want %v", asked, origin)
			}
			if !tc.fresh && !st.EpochOrigin.Equal(origin) {
				t.Errorf("EpochOrigin = %v, want %v", st.EpochOrigin, origin)
			}
			wantLeases(t, st.Leases, []Lease{leaseN(1)})
		})
	}
}
