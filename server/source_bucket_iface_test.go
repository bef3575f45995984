package server

import (
	"net/netip"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/policy"
)

// TestSourceBucketOtherInterface (review of the F3 fix, h/revown): since
// F3 a peer of a second served interface (a full-tunnel ::/0 one, which
// WireGuard lets send from any address) can no longer act as a client of
// the first interface: its requests from the client's address are
// NOT_AUTHORIZED. But they still spend the per-source bucket (admit,
// keyed by the source address, or its /64, alone), which is the client's:
// 100 spoofed datagrams with the fake clock standing still, and the
// client's own MAP, from its own interface, is dropped as rate-limited.
// A trickle at the refill rate keeps it so. In standalone mode with the
// strict reverse-path check the kernel's owner chain drops the spoofed
// datagrams first; attached (no kernel meter) or with ReversePath loose
// or off, pcpd's bucket is all there is. Fails on main: no reply.
func TestSourceBucketOtherInterface(t *testing.T) {
	st, err := policy.NewStatic(map[string][]netip.Prefix{"p": {netip.MustParsePrefix("2001:db8:a::/48")}})
	if err != nil {
		t.Fatal(err)
	}
	h := newHarness(t)
	victim := netip.MustParseAddr("2001:db8:a::5")
	h.own = boundOwnership{own: st, on: map[policy.OwnerID]string{"static:p": "wg0"}}
	h.start()
	send := func(iface string, n byte) []byte {
		b := pcp.AppendRequest(nil, mapReq(victim, pcp.ProtoTCP, 2222, 0, time.Hour, n))
		return h.s.HandleBatch([]Request{{Local: local6, Source: netip.AddrPortFrom(victim, 40000), Iface: iface, Data: b}})[0]
	}
	// The interface binding holds: from wg1 the address is nobody's.
	out := send("wg1", 1)
	if out == nil {
		t.Fatal("first spoofed request: no reply")
	}
	var resp pcp.Response
	if err := pcp.ParseResponse(out, &resp); err != nil || resp.Result != pcp.NotAuthorized {
		t.Fatalf("spoofed request from wg1: %v %v, want NOT_AUTHORIZED", resp.Result, err)
	}
	for range 200 {
		send("wg1", 1)
	}
	out = send("wg0", 2)
	if out == nil {
		t.Fatal("the client's own MAP from wg0 dropped after another interface's peer spent its source's bucket")
	}
	if err := pcp.ParseResponse(out, &resp); err != nil || resp.Result != pcp.Success {
		t.Fatalf("client's MAP from wg0: %v %v, want SUCCESS", resp.Result, err)
	}
}
