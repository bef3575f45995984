package server

import (
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/server/servertest"
)

// verifyingFirewall is the fake firewall with a flow record whose
// conntrack read is owed (as *pinhole.Backend's after a start): it counts
// VerifyFlowed's calls, and the kernel transactions that ran before the
// first.
type verifyingFirewall struct {
	*servertest.Firewall
	verified atomic.Int64
}

func (f *verifyingFirewall) RecordsFlows(pinhole.Pinhole) bool { return true }
func (f *verifyingFirewall) FlowedAddrs(...netip.Addr) (func(netip.Addr) bool, bool) {
	return nil, false
}
func (f *verifyingFirewall) ForgetFlowed([]netip.Addr) bool { return false }
func (f *verifyingFirewall) Reflowed([]netip.Addr)          {}
func (f *verifyingFirewall) VerifyFlowed()                  { f.verified.Add(1) }

// TestServeVerifiesFlowedFirst (root, a namespace; BENCHMARKS.md item
// 81): Serve has the record's owed conntrack read done (FlowVerifier)
// once, before the engine's first kernel transaction: the first delete's
// walk then no longer does it while the engine commits (the churn row's
// first 40 ms, ≈ 25 ms in which every nftables transaction waited for the
// read's socket close). Fails before: VerifyFlowed was never called by
// the server ("0 calls").
func TestServeVerifiesFlowedFirst(t *testing.T) {
	netlab.RequireRoot(t)
	var fw *verifyingFirewall
	var before atomic.Int64 // transactions before the first VerifyFlowed
	c, _, _, _, _, _ := sweepServeWith(t, "flowverify", 0, 0, func(s *Server, ops []pinhole.Op) {
		if fw.verified.Load() == 0 {
			before.Add(1)
		}
	}, func(s *Server) {
		fw = &verifyingFirewall{Firewall: s.fw.(*servertest.Firewall)}
		s.recorder = fw
	})
	req := pcp.AppendRequest(nil, mapReq(addrA, pcp.ProtoTCP, 8080, 0, time.Hour, 1))
	buf := make([]byte, 1100)
	answered := false
	for deadline := time.Now().Add(30 * time.Second); !answered && time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		c.Write(req)
		c.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
		if n, err := c.Read(buf); err == nil && n >= 4 {
			answered = true
		}
	}
	if !answered {
		t.Fatal("no reply")
	}
	if n := fw.verified.Load(); n != 1 {
		t.Fatalf("VerifyFlowed: %d calls by the time a MAP was answered, want 1 (before serving)", n)
	}
	if n := before.Load(); n != 0 {
		t.Errorf("%d kernel transactions before VerifyFlowed, want 0", n)
	}
}
