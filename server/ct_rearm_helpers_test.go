package server

import (
	"net"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/policy"
)

// Helpers shared by the firewall check's repair-and-arm tests
// (ct_rearm_test.go, ct_left9_test.go).

// checkedLab is a lab whose firewall checks the test runs itself
// (TamperInterval an hour).
func checkedLab(t *testing.T) *lab {
	t.Helper()
	return newLab(t, func(cfg *Config, _ *policy.Config) {
		cfg.TamperInterval = time.Hour // the test runs the checks
	})
}

// twoFlows opens an IPv6 MAP of port and a NAT-PMP mapping of port+1,
// each with a connection from the Internet through it, and returns the
// connections and the MAP's pinhole, which the ruleset must cut (fatal if
// not: nothing to test).
func (l *lab) twoFlows(t *testing.T, port uint16) (c6, c4 net.Conn, pin pinhole.Pinhole) {
	t.Helper()
	c6, _, dst6 := l.inbound(t, "map6", port, time.Hour)
	c4, _, _ = l.inbound(t, "pmp", port+1, time.Hour)
	pin = pinhole.Pinhole{Protocol: protoTCP, InternalAddr: dst6.Addr(), InternalPort: dst6.Port()}
	if !l.fw.CutsFlows(pin) {
		t.Fatal("CutsFlows false before the reload: nothing to test")
	}
	return c6, c4, pin
}

// flowsEcho wants both flows of twoFlows to carry data; when (" after
// the repair", or "") says at which step.
func flowsEcho(t *testing.T, c6, c4 net.Conn, when string) {
	t.Helper()
	if err := echoOnce(c6); err != nil {
		t.Errorf("the IPv6 MAP's flow%s: %v", when, err)
	}
	if err := echoOnce(c4); err != nil {
		t.Errorf("the NAT-PMP mapping's flow%s: %v", when, err)
	}
}
