package server

import (
	"net/netip"
	"testing"
	"time"

	"github.com/pcpd/pcpd/policy"
	"github.com/pcpd/pcpd/store"
)

// TestRestartRevokeKeepsNoBuffers: Start revokes the restored leases the
// rules refuse in one transaction (restore_policy.go), and a finished tx
// is kept for reuse with its buffers (Server.spare): the undo log holds a
// copy of every revoked lease, ended another, and the kernel ops and their
// inverses two per pinhole. After a restart that revokes many leases
// (--deny-ports naming a port most clients use), the daemon then keeps,
// for as long as it runs, buffers sized for all of them: at 1 000 000
// refused leases 1.5 GB of heap stays with no lease left
// (BenchmarkStartRefused: afterheapMB 1527, peak 3.5 GB, 32.5 s to start
// against 6.2-6.8 s with none refused). The spare tx must not keep buffers
// proportional to what one start revoked: here 4096 entries, far above a
// request batch's (Config.MaxBatch, 256 requests).
func TestRestartRevokeKeepsNoBuffers(t *testing.T) {
	const n = 20_000
	h := newHarness(t)
	now := h.clock.Now()
	ls := make([]store.Lease, n)
	for i := range ls {
		a := netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0, 0xa, 0, 0, 0, 0, 0, 0, 0, 1, byte(i >> 8), byte(i)})
		ls[i] = store.Lease{
			Key:          store.Key{Owner: ownerA, Protocol: 6, InternalAddr: a, InternalPort: 22},
			ExternalAddr: a, ExternalPort: 22, ClientAddr: netip.AddrPortFrom(a, 5350), ServerAddr: local6,
			Created: now, Expires: now.Add(time.Hour), Kind: store.KindMap, Nonce: [12]byte{byte(i)},
		}
	}
	if err := h.st.Commit(ls, nil); err != nil {
		t.Fatal(err)
	}
	h.start()
	if got := h.s.tab.len(); got != n {
		t.Fatalf("%d leases restored, want %d", got, n)
	}
	h.pcfg.DenyPorts = []policy.PortRange{{First: 22, Last: 22}}
	h.start()
	if got := h.s.tab.len(); got != 0 {
		t.Fatalf("%d leases left after a restart with --deny-ports 22, want 0", got)
	}
	sp := h.s.spare
	if sp == nil {
		return
	}
	const limit = 4096
	for _, b := range []struct {
		name string
		cap  int
	}{
		{"undo", cap(sp.undo)}, {"ended", cap(sp.ended)}, {"ops", cap(sp.ops)}, {"inv", cap(sp.inv)},
		{"put", cap(sp.put)}, {"del", cap(sp.del)}, {"qund", cap(sp.qund)},
	} {
		if b.cap > limit {
			t.Errorf("after revoking %d leases at start, the spare tx keeps a %s buffer of %d entries (limit %d)", n, b.name, b.cap, limit)
		}
	}
}
