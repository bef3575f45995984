package conformance

import (
	"testing"
	"time"
)

// TestAnnouncePacing_6887_14_1_3: the ANN-05 judgement passes a server
// whose sends double however the path delays them (within the allowed
// jitter), and fails one that sent late and kept its nominal schedule —
// the old pcpd schedule, which the old check (30 ms slack) passed when
// the late wake-up was under 30 ms and failed at random when the reader
// was late instead (gaps 262, 524, 970 ms).
func TestAnnouncePacing_6887_14_1_3(t *testing.T) {
	ms := func(v ...float64) []time.Duration {
		var out []time.Duration
		for _, x := range v {
			out = append(out, time.Duration(x*float64(time.Millisecond)))
		}
		return out
	}
	j := annJitterStamped
	for _, tc := range []struct {
		name    string
		sends   []time.Duration // server send times
		delays  []time.Duration // path delay of each
		stamped bool
		ok      bool
	}{
		{"nominal", ms(0, 250, 750, 1750, 3750), ms(0, 0, 0, 0, 0), true, true},
		{"nominal, worst path jitter", ms(0, 250, 750, 1750, 3750), []time.Duration{0, j, 0, j, 0}, true, true},
		{"late wake-up, then doubled from it (pcpd now)", ms(0, 250, 774, 1822, 3918), ms(0, 0, 0, 0, 0), true, true},
		{"late wake-up, then doubled, worst jitter", ms(0, 250, 774, 1822, 3918), []time.Duration{j, 0, j, 0, j}, true, true},
		{"late wake-up, nominal after (old pcpd)", ms(0, 250, 774, 1774, 3774), ms(0, 0, 0, 0, 0), true, false},
		{"first gap short", ms(0, 230, 730), ms(0, 0, 0), true, false},
		{"flake's arrivals, as kernel stamps", ms(0, 262, 786, 1756), ms(0, 0, 0, 0), true, false},
		{"flake's arrivals, read times", ms(0, 262, 786, 1756), ms(0, 0, 0, 0), false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t0 := time.Unix(1e9, 0)
			var seq []datagram
			for i, s := range tc.sends {
				seq = append(seq, datagram{at: t0.Add(s + tc.delays[i]), stamped: tc.stamped})
			}
			gaps, err := announcePacing(seq)
			if (err == nil) != tc.ok {
				t.Fatalf("gaps %v: error %v, want ok=%v", gaps, err, tc.ok)
			}
		})
	}
}
