package policy

import (
	"context"
	"errors"
	"testing"
)

// The refresh counters feed pcpd_ownership_*_total: each re-read counts,
// a failed read counts as a failure, a changed view as a rebuild.
func TestWireGuardStats(t *testing.T) {
	d := &devices{}
	d.set("wg0", peer(1, "2001:db8:a::/48"))
	w, err := newWireGuard(d, []string{"wg0"}, 0, nil)
	if err != nil {
		t.Fatal(err)
	}
	base := w.Stats()
	ctx := context.Background()
	steps := []struct {
		name    string
		prepare func()
		want    WireGuardStats // increments over the previous step
	}{
		{"unchanged", func() {}, WireGuardStats{Refreshes: 1}},
		{"peer added", func() { d.set("wg0", peer(1, "2001:db8:a::/48"), peer(2, "2001:db8:b::/48")) }, WireGuardStats{Refreshes: 1, Rebuilds: 1}},
		{"read fails", func() {
			d.mu.Lock()
			d.err = map[string]error{"wg0": errors.New("transient")}
			d.mu.Unlock()
		}, WireGuardStats{Refreshes: 1, Failures: 1}},
	}
	prev := base
	for _, s := range steps {
		s.prepare()
		w.Refresh(ctx)
		got := w.Stats()
		inc := WireGuardStats{got.Refreshes - prev.Refreshes, got.Failures - prev.Failures, got.Rebuilds - prev.Rebuilds}
		if inc != s.want {
			t.Errorf("%s: counters moved by %+v, want %+v", s.name, inc, s.want)
		}
		prev = got
	}
}
