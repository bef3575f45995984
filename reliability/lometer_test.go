package reliability

import (
	"regexp"
	"testing"
	"time"
)

// TestLocalFloodOwnerMeter (h/lometer, issue 9; h/local9's probe, judged
// by the kernel's state): in the static lab the host's LAN address
// 2001:db8:1:2::1, where pcpd serves, lies inside client cli's /64. User
// nobody's flood of ANNOUNCEs from it reaches pcpd through loopback, and
// pcpd's table charged it to cli: the owner map sent it to cli's chain,
// whose reverse-path rule passes loopback, so cli's limit (400/s, burst
// 800) dropped most of it and the per-source meter gained cli's /64, and
// a flood kept above 400/s would leave cli's own requests to nothing in
// the kernel. Now loopback has the host's own bucket in control_local
// (pinhole: loopbackRules): the owner chains count none of it, and the
// loopback rule counts the drops. (Whether meter6 gained the /64 cannot
// be told here: the lab's readiness ANNOUNCEs come from cli's /64;
// pinhole's TestLoopbackHostBucket checks it.)
func TestLocalFloodOwnerMeter(t *testing.T) {
	const flood = 3000
	l := newLab(t, labOptions{})
	l.start()
	server := l.server6()
	host := server.Addr()
	if !l.topo.ClientPrefix6.Contains(host) {
		t.Fatalf("the lab changed: the host's %s is not in the client's %s", host, l.topo.ClientPrefix6)
	}
	o0 := ownerMeterDrops(l.topo.Host)
	pkts := make([][]byte, flood)
	for i := range pkts {
		pkts[i] = announceBytes(host)
	}
	if _, err := sendAsNobody(l.topo.Host, host, server, 100*time.Millisecond, pkts...); err != nil {
		t.Fatal(err)
	}
	if d := ownerMeterDrops(l.topo.Host) - o0; d != 0 {
		t.Errorf("user nobody's %d ANNOUNCEs from the host's %s over loopback: the owner chains dropped %d, want none (%s):\n%s",
			flood, host, d, ownerMeterLimit(l.topo.Host), l.topo.Host.MustRun(t, "nft", "list", "table", "inet", "pcpd"))
	}
	local := l.topo.Host.MustRun(t, "nft", "list", "chain", "inet", "pcpd", "control_local")
	m := regexp.MustCompile(`iif "lo" limit rate over \S+ burst \d+ packets counter packets (\d+) `).FindStringSubmatch(local)
	if m == nil || m[1] == "0" {
		t.Errorf("after user nobody's %d ANNOUNCEs over loopback, control_local has no loopback bucket that dropped some:\n%s", flood, local)
	}
}
