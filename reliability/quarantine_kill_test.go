package reliability

import (
	"net/netip"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
)

// TestKill9KeepsQuarantineMAP22: a delete answered SUCCESS frees its IPv4
// external port into quarantine (MAP-22: for 124 min only its last holder
// may take a freed TCP port again), and the quarantine is in the same
// durable store commit as the delete (store/quarantine.go). So SIGKILL
// right after the answer, and a restart, must not hand the port to
// another internal endpoint; its last holder (same internal port and
// nonce) still gets it back. Nor when the lease ends while pcpd is dead
// (restore quarantines its port from its expiry: the second row fails
// without restoring.lapse).
func TestKill9KeepsQuarantineMAP22(t *testing.T) {
	for _, tc := range []struct {
		name string
		life time.Duration
		// free frees the mapping's port: a delete then SIGKILL, or
		// SIGKILL and its lease expiring while pcpd is down.
		free func(l *lab, mapReq func(port, sugg uint16, life time.Duration, nonce byte) *pcp.Response)
	}{
		{"deleted, killed", time.Hour, func(l *lab, mapReq func(uint16, uint16, time.Duration, byte) *pcp.Response) {
			if r := mapReq(7000, 0, 0, 1); r.Result != pcp.Success {
				l.t.Fatalf("delete: %v", r.Result)
			}
			l.kill9()
		}},
		{"killed, lease expired while down", 2 * time.Second, func(l *lab, _ func(uint16, uint16, time.Duration, byte) *pcp.Response) {
			l.kill9()
			time.Sleep(3 * time.Second) // the 2 s lease ends while pcpd is dead
		}},
	} {
		t.Run(tc.name, func(t *testing.T) { testKill9KeepsQuarantine(t, tc.life, tc.free) })
	}
}

func testKill9KeepsQuarantine(t *testing.T, life time.Duration, free func(*lab, func(uint16, uint16, time.Duration, byte) *pcp.Response)) {
	const (
		oldPort, newPort = 7000, 7001
		freed            = 17000
	)
	l := newLab(t, labOptions{extra: []string{"--min-lifetime", "1s"}})
	l.start()
	cli := l.topo.ClientV4
	c := l.pcpClient(cli)
	mapReq := func(port, sugg uint16, life time.Duration, nonce byte) *pcp.Response {
		t.Helper()
		req := pcp.NewMap(cli, pcp.ProtoTCP, port, life)
		req.Map.ExternalPort = sugg
		req.Map.Nonce = pcp.Nonce{nonce}
		resp, err := do(c, req)
		if err != nil {
			t.Fatalf("MAP tcp/%d (suggesting %d, lifetime %v): %v", port, sugg, life, err)
		}
		return resp
	}
	if r := mapReq(oldPort, freed, life, 1); r.Result != pcp.Success || r.Map.ExternalPort != freed {
		t.Fatalf("MAP: %v, external %d, want %d", r.Result, r.Map.ExternalPort, freed)
	}
	free(l, mapReq)
	l.start()
	if r := mapReq(newPort, freed, time.Hour, 3); r.Result != pcp.Success || r.Map.ExternalPort == freed {
		t.Fatalf("MAP-22 after kill -9: another internal port got %v, external %d (freed %v)",
			r.Result, r.Map.ExternalPort, netip.AddrPortFrom(l.topo.HostPublicV4, freed))
	}
	if r := mapReq(oldPort, freed, time.Hour, 1); r.Result != pcp.Success || r.Map.ExternalPort != freed {
		t.Fatalf("last holder re-maps after kill -9: %v, external %d, want %d", r.Result, r.Map.ExternalPort, freed)
	}
}
