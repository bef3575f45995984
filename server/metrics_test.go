package server

import (
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/pcpd/pcpd/pcp"
)

// TestMetrics: requests by protocol, opcode and result; leases;
// revocations.
func TestMetrics(t *testing.T) {
	h := newHarness(t)
	reg := prometheus.NewRegistry()
	for _, c := range h.s.Collectors() {
		reg.MustRegister(c)
	}
	h.do(mapReq(addrA, pcp.ProtoTCP, 443, 0, time.Hour, 1))
	h.do(mapReq(addrA, pcp.ProtoSCTP, 443, 0, time.Hour, 1))
	h.pmp(v4A, pcp.PMPOpMapUDP, 53, 0, time.Hour)
	h.s.Revoke(RevokeFilter{Owner: ownerA})
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			key := mf.GetName()
			for _, l := range m.GetLabel() {
				key += "," + l.GetName() + "=" + l.GetValue()
			}
			switch {
			case m.GetCounter() != nil:
				got[key] = m.GetCounter().GetValue()
			case m.GetGauge() != nil:
				got[key] = m.GetGauge().GetValue()
			case m.GetHistogram() != nil:
				got[key] = float64(m.GetHistogram().GetSampleCount())
			}
		}
	}
	for k, v := range map[string]float64{
		"pcpd_requests_total,opcode=MAP,protocol=pcp,result=SUCCESS":         1,
		"pcpd_requests_total,opcode=MAP,protocol=pcp,result=UNSUPP_PROTOCOL": 1,
		"pcpd_requests_total,opcode=MAP_UDP,protocol=natpmp,result=SUCCESS":  1,
		"pcpd_revocations_total,cause=operator":                              2,
		"pcpd_leases":                                                        0,
		"pcpd_batch_requests":                                                2,
		"pcpd_kernel_apply_seconds":                                          3,
	} {
		if got[k] != v {
			t.Errorf("%s = %v, want %v (all: %v)", k, got[k], v, got)
		}
	}
}
