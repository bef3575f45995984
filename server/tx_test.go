package server

import (
	"context"
	"errors"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/server/servertest"
	"github.com/pcpd/pcpd/store"
)

// TestCommitOverlaps: a batch's kernel transaction and store commit run at
// the same time (a batch costs the slower of the two, not their sum). The
// kernel waits for the store commit to begin; run one after the other,
// the kernel would give up and the request fail.
func TestCommitOverlaps(t *testing.T) {
	h := newHarness(t)
	storeIn := make(chan struct{})
	var once sync.Once
	h.st.FailCommit = func([]store.Lease, []store.Key) error {
		once.Do(func() { close(storeIn) })
		return nil
	}
	h.fw.FailApply = func([]pinhole.Op) error {
		select {
		case <-storeIn:
			return nil
		case <-time.After(5 * time.Second):
			return errors.New("the store commit did not start while the kernel transaction ran")
		}
	}
	h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 443, 0, time.Hour, 1)), pcp.Success)
	if _, ok := h.lease(ownerA, 6, addrA, 443); !ok {
		t.Fatal("no stored lease after SUCCESS")
	}
	if _, ok := h.fw.Holes()[hole(6, addrA, 443, addrA, 443)]; !ok {
		t.Fatal("no pinhole after SUCCESS")
	}
}

// TestCommitUndo: when one side of the commit fails, the other side's
// change is undone, for a new mapping, a renewal (the store gets the
// previous lease back, not a deletion) and a delete, and the request is
// answered NO_RESOURCES with nothing changed (HDR-06).
func TestCommitUndo(t *testing.T) {
	for _, side := range []string{"kernel", "store"} {
		t.Run(side, func(t *testing.T) {
			h := newHarness(t)
			h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 443, 0, time.Hour, 1)), pcp.Success)
			h.clock.Advance(10 * time.Minute)
			before := h.snap()
			fail := func(on bool) {
				f := func([]pinhole.Op) error { return servertest.ErrInjected }
				g := func([]store.Lease, []store.Key) error { return servertest.ErrInjected }
				switch {
				case !on:
					h.fw.FailApply, h.st.FailCommit = nil, nil
				case side == "kernel":
					h.fw.FailApply = f
				default:
					h.st.FailCommit = g
				}
			}
			fail(true)
			for _, r := range []*pcp.Request{
				mapReq(addrA, pcp.ProtoTCP, 22, 0, time.Hour, 1),    // new
				mapReq(addrA, pcp.ProtoTCP, 443, 0, 2*time.Hour, 1), // renewal
				mapReq(addrA, pcp.ProtoTCP, 443, 0, 0, 1),           // delete
			} {
				h.expect(h.do(r), pcp.NoResources)
				h.unchanged(before)
			}
			fail(false)
			h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 443, 0, 2*time.Hour, 1)), pcp.Success)
			l, ok := h.lease(ownerA, 6, addrA, 443)
			if !ok || !l.Expires.Equal(h.clock.Now().Add(2*time.Hour)) {
				t.Fatalf("renewal after the failures: %+v %v", l, ok)
			}
		})
	}
}

// counterValue reads a Prometheus counter.
func counterValue(t *testing.T, c prometheus.Counter) float64 {
	t.Helper()
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetCounter().GetValue()
}

// TestReviewKernelFailUndoFails: the kernel transaction fails, the store
// commit beside it succeeds, and writing the previous leases back to the
// store fails too. The store then holds a state the client was told
// NO_RESOURCES about (a new lease, restored with its pinhole at the next
// start; or, for a delete, no lease while the table keeps it). The next
// successful store commit, or housekeeping's retry, must write the
// table's state for those keys, so a restart restores what the table
// held.
func TestReviewKernelFailUndoFails(t *testing.T) {
	for _, tc := range []struct {
		name   string
		delete bool // the failing request deletes an existing lease
		pay    string
	}{
		{"new lease, next commit", false, "commit"},
		{"new lease, housekeeping", false, "housekeep"},
		{"delete, next commit", true, "commit"},
		{"delete, housekeeping", true, "housekeep"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t)
			lifetime := time.Hour
			if tc.delete {
				h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 22, 0, time.Hour, 1)), pcp.Success)
				lifetime = 0
			}
			storeErrs := counterValue(t, h.s.m.storeErrors)
			failWriteBack(h)
			h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 22, 0, lifetime, 1)), pcp.NoResources)
			h.fw.FailApply, h.st.FailCommit = nil, nil
			want := 0
			if tc.delete {
				want = 1
			}
			if n := h.s.tab.len(); n != want {
				t.Fatalf("table holds %d leases after NO_RESOURCES, want %d", n, want)
			}
			if got := counterValue(t, h.s.m.storeErrors) - storeErrs; got != 1 {
				t.Errorf("pcpd_store_errors_total rose by %v, want 1 (the failed write-back)", got)
			}
			// The failure is in place: the store disagrees with the table.
			if _, ok := h.lease(ownerA, 6, addrA, 22); ok == tc.delete {
				t.Fatalf("store holds the lease: %v; the injected failure did not happen", ok)
			}
			switch tc.pay {
			case "commit":
				// Any other change goes with the debt.
				h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 443, 0, time.Hour, 1)), pcp.Success)
			case "housekeep":
				defer func(d time.Duration) { storeDebtRetry = d }(storeDebtRetry)
				storeDebtRetry = 10 * time.Millisecond
				ctx, cancel := context.WithCancel(context.Background())
				done := make(chan struct{})
				go func() { defer close(done); h.s.housekeep(ctx) }()
				deadline := time.Now().Add(5 * time.Second)
				for {
					h.s.mu.Lock()
					n := len(h.s.storeDebt)
					h.s.mu.Unlock()
					if n == 0 || time.Now().After(deadline) {
						break
					}
					time.Sleep(5 * time.Millisecond)
				}
				cancel()
				<-done
			}
			if _, ok := h.lease(ownerA, 6, addrA, 22); ok != tc.delete {
				t.Errorf("store holds the lease: %v, want %v (as the table)", ok, tc.delete)
			}
			h.start() // kill and restart
			_, hole := h.fw.Holes()[hole(6, addrA, 22, addrA, 22)]
			if hole != tc.delete {
				t.Errorf("after restart: pinhole for port 22: %v, want %v: %v", hole, tc.delete, h.fw.Holes())
			}
			if _, ok := h.s.tab.get(store.Key{Owner: ownerA, Protocol: 6, InternalAddr: addrA, InternalPort: 22}); ok != tc.delete {
				t.Errorf("after restart: lease for port 22: %v, want %v", ok, tc.delete)
			}
		})
	}
}

// TestStoreDebtRetried: while the store keeps failing, the debt stays and
// goes with every commit; a housekeeping retry that fails is counted.
func TestStoreDebtRetried(t *testing.T) {
	h := newHarness(t)
	failWriteBack(h)
	h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 22, 0, time.Hour, 1)), pcp.NoResources)
	h.fw.FailApply = nil
	before := counterValue(t, h.s.m.storeErrors)
	h.s.payStoreDebt()
	if got := counterValue(t, h.s.m.storeErrors) - before; got != 1 {
		t.Errorf("failed retry counted %v times, want 1", got)
	}
	h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 443, 0, time.Hour, 1)), pcp.NoResources)
	h.st.FailCommit = nil
	var put []store.Lease
	var del []store.Key
	h.st.FailCommit = func(p []store.Lease, d []store.Key) error { put, del = slices.Clone(p), slices.Clone(d); return nil }
	h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 443, 0, time.Hour, 1)), pcp.Success)
	h.st.FailCommit = nil
	if len(put) != 1 || put[0].InternalPort != 443 || len(del) != 1 || del[0].InternalPort != 22 {
		t.Errorf("commit after the failures: put %v, del %v; want the new lease and the debt's deletion", put, del)
	}
	if _, ok := h.lease(ownerA, 6, addrA, 22); ok {
		t.Error("the store still holds the lease answered NO_RESOURCES")
	}
	h.s.mu.Lock()
	n := len(h.s.storeDebt)
	h.s.mu.Unlock()
	if n != 0 {
		t.Errorf("debt of %d keys after a successful commit", n)
	}
}

// batchOf encodes requests as one batch from their clients.
func batchOf(rs ...*pcp.Request) []Request {
	var out []Request
	for _, r := range rs {
		local := local6
		if r.ClientAddr.Is4() {
			local = local4
		}
		out = append(out, Request{Local: local, Source: netip.AddrPortFrom(r.ClientAddr, 40000), Data: pcp.AppendRequest(nil, r)})
	}
	return out
}

// TestRetryFreshTime: the requests of a failed batch are retried one by
// one, each at the time of its retry, not the batch's: a kernel timeout
// computed from a stale now would outlast its lease by the delay.
func TestRetryFreshTime(t *testing.T) {
	h := newHarness(t)
	var applies atomic.Int32
	h.fw.FailApply = func([]pinhole.Op) error {
		if applies.Add(1) == 1 {
			// The failed batch took a while (a slow kernel, a blame
			// search): the retries start later.
			h.clock.Advance(10 * time.Minute)
			return servertest.ErrInjected
		}
		return nil
	}
	replies := h.s.HandleBatch(batchOf(
		mapReq(addrA, pcp.ProtoTCP, 22, 0, time.Hour, 1),
		mapReq(addrA, pcp.ProtoTCP, 443, 0, time.Hour, 1),
	))
	h.fw.FailApply = nil
	for i, b := range replies {
		var resp pcp.Response
		if err := pcp.ParseResponse(b, &resp); err != nil || resp.Result != pcp.Success {
			t.Fatalf("reply %d: %v %v", i, resp.Result, err)
		}
	}
	now := h.clock.Now()
	holes := h.fw.Holes()
	for _, port := range []uint16{22, 443} {
		l, ok := h.lease(ownerA, 6, addrA, port)
		if !ok {
			t.Fatalf("port %d: no stored lease", port)
		}
		if want := now.Add(time.Hour); !l.Expires.Equal(want) {
			t.Errorf("port %d: lease expires %v, want %v (the retry's now + 1h)", port, l.Expires, want)
		}
		left, ok := holes[hole(6, addrA, port, addrA, port)]
		if !ok {
			t.Fatalf("port %d: no pinhole", port)
		}
		if lease := l.Expires.Sub(now); left > lease {
			t.Errorf("port %d: pinhole left %v outlasts its lease (%v left)", port, left, lease)
		}
	}
}

// TestStoreDebtPaidByFailedBatch: a batch whose kernel transaction fails
// still paid the debt in its store commit; its write-back then restores
// only the batch's own keys, and the store ends as the table.
func TestStoreDebtPaidByFailedBatch(t *testing.T) {
	h := newHarness(t)
	failWriteBack(h)
	h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 22, 0, time.Hour, 1)), pcp.NoResources)
	h.st.FailCommit = nil // the kernel still fails
	h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 443, 0, time.Hour, 1)), pcp.NoResources)
	h.fw.FailApply = nil
	if ls := h.st.Leases(); len(ls) != 0 {
		t.Errorf("store holds %d leases, want none (as the table): %v", len(ls), ls)
	}
	h.s.mu.Lock()
	n := len(h.s.storeDebt)
	h.s.mu.Unlock()
	if n != 0 {
		t.Errorf("debt of %d keys after a successful write-back", n)
	}
}

// failWriteBack makes the next batch's kernel transaction fail while its
// concurrent store commit succeeds, and every later store commit (the
// write-back of the previous leases first) fail: the store is left
// disagreeing with the table, which the server must record as debt.
func failWriteBack(h *harness) {
	var commits atomic.Int32
	h.fw.FailApply = func([]pinhole.Op) error { return servertest.ErrInjected }
	h.st.FailCommit = func([]store.Lease, []store.Key) error {
		if commits.Add(1) == 1 {
			return nil
		}
		return servertest.ErrInjected
	}
}
