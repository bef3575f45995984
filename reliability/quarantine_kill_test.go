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
// nonce) still gets it back.
func TestKill9KeepsQuarantineMAP22(t *testing.T) {
	const (
		oldPort, newPort = 7000, 7001
		freed            = 17000
	)
	l := newLab(t, labOptions{})
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
	if r := mapReq(oldPort, freed, time.Hour, 1); r.Result != pcp.Success || r.Map.ExternalPort != freed {
		t.Fatalf("MAP: %v, external %d, want %d", r.Result, r.Map.ExternalPort, freed)
	}
	if r := mapReq(oldPort, 0, 0, 1); r.Result != pcp.Success {
		t.Fatalf("delete: %v", r.Result)
	}
	l.kill9()
	l.start()
	if r := mapReq(newPort, freed, time.Hour, 3); r.Result != pcp.Success || r.Map.ExternalPort == freed {
		t.Fatalf("MAP-22 after kill -9: another internal port got %v, external %d (freed %v)",
			r.Result, r.Map.ExternalPort, netip.AddrPortFrom(l.topo.HostPublicV4, freed))
	}
	if r := mapReq(oldPort, freed, time.Hour, 1); r.Result != pcp.Success || r.Map.ExternalPort != freed {
		t.Fatalf("last holder re-maps after kill -9: %v, external %d, want %d", r.Result, r.Map.ExternalPort, freed)
	}
}
