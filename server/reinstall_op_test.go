package server

import (
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/pinhole"
)

// TestReinstallFailedBatchOpByOp (issue 9, h/hunt): a re-install of every
// lease whose transaction the kernel refuses for one element (one it will
// not hold: a pair of conflicting intervals stored before overlapsHeld,
// or anything else) still puts back every other lease's pinhole. Before,
// the whole batch stayed out: all of them, at every retry.
func TestReinstallFailedBatchOpByOp(t *testing.T) {
	h := newHarness(t)
	bad := hole(6, addrA, 443, addrA, 443)
	for i := range 20 {
		h.do(mapReq(addrB.Next(), pcp.ProtoTCP, uint16(1000+i), 0, time.Hour, 1))
	}
	h.do(mapReq(addrA, pcp.ProtoTCP, 443, 0, time.Hour, 1))
	h.fw.FailApply = func(ops []pinhole.Op) error {
		if slices.ContainsFunc(ops, func(op pinhole.Op) bool { return op.Pinhole == bad }) {
			return fmt.Errorf("injected: %w", pinhole.ErrConflict) // the kernel's refusal of one element
		}
		return nil
	}
	h.fw.Tamper()
	h.s.checkFirewall()
	holes := h.fw.Holes()
	if _, ok := holes[bad]; ok {
		t.Fatalf("the refused pinhole is in place")
	}
	var lost []string
	for i := range 20 {
		if p := hole(6, addrB.Next(), uint16(1000+i), addrB.Next(), uint16(1000+i)); holes[p] == 0 {
			lost = append(lost, fmt.Sprint(p.InternalPort))
		}
	}
	if len(lost) != 0 {
		t.Errorf("after a re-install one of whose pinholes the kernel refuses, client b's pinholes on ports %v are missing (%d of 20)", lost, len(lost))
	}
}
