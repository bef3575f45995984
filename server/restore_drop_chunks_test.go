package server

import (
	"net/netip"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/policy"
	"github.com/pcpd/pcpd/server/servertest"
	"github.com/pcpd/pcpd/store"
)

// commitLog is the harness's store, recording each CommitQuar: how many
// keys it deleted, whether it carried quarantine changes; fail, if set,
// fails the i-th (from 0).
type commitLog struct {
	*servertest.Store
	dels []int
	quar []bool
	fail func(i int) bool
}

func (c *commitLog) CommitQuar(put []store.Lease, del []store.Key, q *store.QuarChange) error {
	i := len(c.dels)
	c.dels = append(c.dels, len(del))
	c.quar = append(c.quar, q != nil)
	if c.fail != nil && c.fail(i) {
		return servertest.ErrInjected
	}
	return c.Store.CommitQuar(put, del, q)
}

func (c *commitLog) Commit(put []store.Lease, del []store.Key) error {
	return c.CommitQuar(put, del, nil)
}

// TestRestoreDropsInChunks: a start after downtime drops the expired
// leases from the store in commits of at most dropChunk keys, the MAP-22
// quarantine of a lease that expired while pcpd was down (restoring.lapse)
// in the first, so that a kill between two commits never leaves the port
// freed without its quarantine: the next start drops the rest and keeps
// the quarantine. A failed commit leaves its keys and every later chunk's
// owed (storeDebt), the quarantine too if it was the first; payStoreDebt
// writes them. Before the chunks, one commit carried every key (a 1M-key
// record, and a key slice growing to 80 MB).
func TestRestoreDropsInChunks(t *testing.T) {
	for _, tc := range []struct {
		name     string
		expired  int            // IPv6 leases expired while down, besides client B's IPv4 one
		fail     func(int) bool // which commits of the start fail
		restart  bool           // killed after the start: the next start from the store as it is
		commits  []int          // keys deleted by each commit of the start
		owedKeys int            // left owed by the start
		owedQuar bool
	}{
		{name: "one chunk", expired: 3, commits: []int{4}},
		{name: "across the chunk boundary", expired: dropChunk + 5, commits: []int{dropChunk, 6}},
		{name: "two chunks and one key", expired: 2 * dropChunk, commits: []int{dropChunk, dropChunk, 1}},
		{name: "second commit fails", expired: dropChunk + 5, fail: func(i int) bool { return i == 1 },
			commits: []int{dropChunk, 6}, owedKeys: 6},
		{name: "first commit fails", expired: dropChunk + 5, fail: func(i int) bool { return i == 0 },
			commits: []int{dropChunk}, owedKeys: dropChunk + 6, owedQuar: true},
		{name: "killed after the first commit", expired: dropChunk + 5, fail: func(i int) bool { return i == 1 },
			restart: true, commits: []int{dropChunk, 6}, owedKeys: 6},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, func(c *Config, p *policy.Config) {
				c.IPv4Ports = PortRange{First: 40000, Last: 40003}
			})
			h.expect(h.do(mapReq(v4A, pcp.ProtoTCP, 22, 40001, 24*time.Hour, 1)), pcp.Success)
			rb := h.do(mapReq(v4B, pcp.ProtoTCP, 5000, 40000, time.Hour, 2))
			if rb.Result != pcp.Success || rb.Map.ExternalPort != 40000 {
				t.Fatalf("MAP of B: %v, external %d", rb.Result, rb.Map.ExternalPort)
			}
			now := h.clock.Now()
			ls := make([]store.Lease, tc.expired)
			for i := range ls {
				a := netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0, 0xe, 0, 0, 0, 0, 0, 0, byte(i >> 24), byte(i >> 16), byte(i >> 8), byte(i)})
				ls[i] = store.Lease{Key: store.Key{Owner: "static:gone", InternalAddr: a, InternalPort: 443, Protocol: 6},
					ExternalAddr: a, ExternalPort: 443, Created: now.Add(-time.Hour), Expires: now.Add(time.Minute), Kind: store.KindMap}
			}
			if err := h.st.Commit(ls, nil); err != nil {
				t.Fatal(err)
			}
			ls = nil
			h.clock.Advance(70 * time.Minute) // B's lease and the IPv6 ones expire while pcpd is down

			cl := &commitLog{Store: h.st, fail: tc.fail}
			start := func() { h.startWith(func(d *Deps) { d.Store = cl }, nil) }
			start()
			if !equalInts(cl.dels, tc.commits) {
				t.Fatalf("the start's commits deleted %v keys, want %v", cl.dels, tc.commits)
			}
			if !cl.quar[0] || len(cl.quar) > 1 && cl.quar[1] {
				t.Errorf("quarantine changes in commits %v: want them in the first alone", cl.quar)
			}
			if got := len(h.s.storeDebt); got != tc.owedKeys {
				t.Errorf("%d keys owed, want %d", got, tc.owedKeys)
			}
			q40000 := endpoint{addr: ext4, proto: protoTCP, port: 40000}
			if _, owed := h.s.quarDebt[q40000]; owed != tc.owedQuar {
				t.Errorf("quarantine of 40000 owed: %v, want %v", owed, tc.owedQuar)
			}
			if tc.restart {
				cl.fail, cl.dels, cl.quar = nil, nil, nil
				start()
				if got := len(h.s.storeDebt); got != 0 {
					t.Errorf("after the restart, %d keys owed", got)
				}
			} else {
				cl.fail = nil
				h.s.payStoreDebt()
			}
			if got := len(h.st.Leases()); got != 1 {
				t.Errorf("store holds %d leases, want client A's alone", got)
			}
			if _, ok := h.st.Quarantines()[store.Endpoint{Addr: ext4, Protocol: protoTCP, Port: 40000}]; !ok {
				t.Errorf("store lost the quarantine of B's expired port 40000")
			}
			if !quarPorts(h.s)[40000] {
				t.Errorf("port 40000 not quarantined")
			}
			mirrored(t, h, "after the drops")
		})
	}
}

func equalInts(a, b []int) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// TestRestorePresizeExact: presize counts the expired and moved leases,
// and the connections add will queue for them, exactly (restoring.drop's
// first chunk and restoring.expEnds are made whole once, never grown): one filter for an IPv6 MAP, two for an IPv4
// NAPT lease (inbound and SNAT-ed), one for a PEER (inbound; none before
// h/peerend, issue 9), none for a live one.
func TestRestorePresizeExact(t *testing.T) {
	h := newHarness(t, func(c *Config, p *policy.Config) { c.KeepConnections = false })
	now := h.clock.Now()
	past, later := now.Add(-time.Minute), now.Add(time.Hour)
	lease := func(in, ext netip.Addr, port uint16, kind store.Kind, exp time.Time) store.Lease {
		return store.Lease{Key: store.Key{Owner: ownerA, InternalAddr: in, InternalPort: port, Protocol: 6},
			ExternalAddr: ext, ExternalPort: port, Expires: exp, Kind: kind}
	}
	moved := netip.MustParseAddr("198.51.100.9")
	for _, tc := range []struct {
		name  string
		ls    []store.Lease
		want  int // filters
		drops int
	}{
		{"IPv6 MAP expired", []store.Lease{lease(addrA, addrA, 80, store.KindMap, past)}, 1, 1},
		{"IPv4 NAPT expired", []store.Lease{lease(v4A, ext4, 40000, store.KindMap, past)}, 2, 1},
		{"PEER expired", []store.Lease{lease(addrA, addrA, 81, store.KindPeer, past)}, 1, 1},
		{"IPv4 PEER expired", []store.Lease{lease(v4A, ext4, 40002, store.KindPeer, past)}, 1, 1},
		{"moved", []store.Lease{lease(v4A, moved, 40001, store.KindNATPMP, later)}, 2, 1},
		{"mixed with live", []store.Lease{
			lease(addrA, addrA, 80, store.KindMap, past), lease(v4A, ext4, 40000, store.KindMap, past),
			lease(addrA, addrA, 82, store.KindMap, later), lease(v4A, moved, 40001, store.KindMap, later),
		}, 5, 3},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := h.s.restoring(now)
			if err := r.presize(eachOf(tc.ls)); err != nil {
				t.Fatal(err)
			}
			if cap(r.expEnds) != tc.want {
				t.Fatalf("presized for %d filters, want %d", cap(r.expEnds), tc.want)
			}
			for i := range tc.ls {
				if tc.ls[i].Expires.After(now) && tc.ls[i].ExternalAddr != moved {
					continue // live: add would put it in the table
				}
				r.add(&tc.ls[i])
			}
			if len(r.expEnds) != cap(r.expEnds) {
				t.Errorf("add queued %d filters, presized %d", len(r.expEnds), cap(r.expEnds))
			}
			if len(r.drop) != 1 || len(r.drop[0]) != tc.drops || cap(r.drop[0]) != tc.drops {
				t.Errorf("drop chunks %d, first %d keys of %d presized; want %d", len(r.drop), len(r.drop[0]), cap(r.drop[0]), tc.drops)
			}
		})
	}
}
