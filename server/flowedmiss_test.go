package server

import (
	"errors"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/pcpd/pcpd/policy"
	"github.com/pcpd/pcpd/server/servertest"
)

// missFW is the harness's firewall with FlowedChecker's answer set.
type missFW struct {
	*servertest.Firewall
	named bool
	err   error
}

func (m *missFW) FlowedMissNamed() (bool, error) { return m.named, m.err }

// TestFlowedMissesUnnamedWarned (h/left9, issue 9): a kernel whose ENOENT
// to a missing flowed6 element names nothing (before Linux 5.19's
// b53c116642502: pinhole's TestFlowedVerdictOldKernel) makes every IPv6
// delete walk conntrack, silently until now. At start the server asks
// once: such a kernel is warned about once (the cost, that it is safe)
// and pcpd_conntrack_flowed_lookups_unnamed is 1; a kernel that names it,
// or a check that cannot tell, says nothing and shows 0.
func TestFlowedMissesUnnamedWarned(t *testing.T) {
	for _, tc := range []struct {
		name  string
		named bool
		err   error
		want  float64
	}{
		{"before 5.19", false, nil, 1},
		{"5.19 on", true, nil, 0},
		{"cannot tell", false, errors.New("injected: flowed6 not in use"), 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, func(*Config, *policy.Config) {})
			fw := &missFW{Firewall: h.fw, named: tc.named, err: tc.err}
			reg := prometheus.NewRegistry()
			h.startWith(func(d *Deps) { d.Firewall, d.Registerer = fw, reg }, nil)
			const warn = "this kernel does not name a missing element in its answer to a set lookup"
			if got := h.logs.FilterMessageSnippet(warn).Len(); got != int(tc.want) {
				t.Errorf("%d warnings %q, want %v", got, warn, tc.want)
			}
			mfs, err := reg.Gather()
			if err != nil {
				t.Fatal(err)
			}
			got := -1.0
			for _, mf := range mfs {
				if mf.GetName() == "pcpd_conntrack_flowed_lookups_unnamed" {
					got = mf.GetMetric()[0].GetGauge().GetValue()
				}
			}
			if got != tc.want {
				t.Errorf("pcpd_conntrack_flowed_lookups_unnamed %v (-1: none), want %v", got, tc.want)
			}
		})
	}
}
