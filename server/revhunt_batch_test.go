package server

import (
	"net/netip"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/policy"
)

// TestBatchDeleteThenOverlapKernel (review h/revhunt): a batch in which
// one request ends a FILTER element and a later one adds an element
// overlapping it in part (pinhole.Conflicts) commits as one transaction.
// overlapsHeld rightly grants the second (the table no longer holds the
// first), but tx.diff marked an install After only against the deletes of
// its own lease's diff: the new element went in before the other lease's
// delete (Apply sends a phase's adds first), the kernel refused it, the
// whole batch (other clients' requests in it too) was rolled back and
// every request handled again alone, a kernel transaction and a store
// commit each: a client sending such pairs made every batch they met
// fail. Root, real kernel.
func TestBatchDeleteThenOverlapKernel(t *testing.T) {
	b := newOverlapBed(t, "batchovl", policy.Config{})
	pf := netip.MustParsePrefix
	del := func(port uint16) *pcp.Request { return mapReq(addrA, pcp.ProtoTCP, port, 0, 0, 1) }
	peerAt := netip.MustParseAddrPort("[2001:db8:5::]:4000")
	for i, tc := range []struct {
		name string
		from pcp.Filter
		then func(port uint16) *pcp.Request
		want pinhole.Pinhole // the kernel's element for the port after
	}{
		{
			name: "MAP deleted, a PEER inside its FILTER",
			from: pcp.Filter{Remote: wide6},
			then: func(port uint16) *pcp.Request { return peerReq(addrA, pcp.ProtoTCP, port, peerAt, time.Hour, 1) },
			want: pinhole.Pinhole{RemotePrefix: pf("2001:db8:5::/128"), RemotePort: 4000},
		},
		{
			name: "MAP deleted, made again with a narrower FILTER",
			from: pcp.Filter{Remote: wide6},
			then: func(port uint16) *pcp.Request { return filteredMap(port, pcp.Filter{Remote: pf("2001:db8:5::/64")}) },
			want: pinhole.Pinhole{RemotePrefix: pf("2001:db8:5::/64")},
		},
	} {
		port := uint16(9000 + i)
		if got := b.do(filteredMap(port, tc.from)); got != pcp.Success {
			t.Fatalf("%s: MAP with FILTER: %v", tc.name, got)
		}
		before := counterValue(t, b.s.m.kernelErrors)
		var reqs []Request
		for _, r := range []*pcp.Request{del(port), tc.then(port), mapReq(addrB, pcp.ProtoTCP, port, 0, time.Hour, 1)} {
			reqs = append(reqs, Request{Local: local6, Source: netip.AddrPortFrom(r.ClientAddr, 40000), Data: pcp.AppendRequest(nil, r), admitted: true})
		}
		for j, out := range b.s.HandleBatch(reqs) {
			var resp pcp.Response
			if err := pcp.ParseResponse(out, &resp); err != nil || resp.Result != pcp.Success {
				t.Errorf("%s: request %d of the batch: %v %v, want SUCCESS", tc.name, j, resp.Result, err)
			}
		}
		if d := counterValue(t, b.s.m.kernelErrors) - before; d != 0 {
			t.Errorf("%s: the batch met %v kernel refusals (the batch rolled back, its 3 requests handled again one by one), want 0", tc.name, d)
		}
		want := hole(protoTCP, addrA, port, addrA, port)
		want.RemotePrefix, want.RemotePort = tc.want.RemotePrefix, tc.want.RemotePort
		if got := b.heldAt(port); len(got) != 1 || got[0] != want {
			t.Errorf("%s: kernel holds %v for client a's port, want only %v", tc.name, got, want)
		}
	}
}
