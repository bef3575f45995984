package server

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
)

// updateClient is a client's socket in the Client namespace, connected to
// the serving address: it sees only what comes from there (HDR-02).
type updateClient struct {
	t *testing.T
	c *net.UDPConn
}

func (l *lab) updateClient(t *testing.T) *updateClient {
	t.Helper()
	var c *net.UDPConn
	if err := l.topo.Client.Do(func() (err error) {
		c, err = net.DialUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(l.topo.ClientV4, 0)), net.UDPAddrFromAddrPort(l.server4()))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return &updateClient{t: t, c: c}
}

// do sends r until a MAP/PEER answer comes (every 500 ms, 60 times).
func (u *updateClient) do(r *pcp.Request) pcp.Response {
	u.t.Helper()
	b := pcp.AppendRequest(nil, r)
	buf := make([]byte, 2048)
	for range pcpTries {
		if _, err := u.c.Write(b); err != nil {
			u.t.Fatal(err)
		}
		u.c.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
		for {
			n, err := u.c.Read(buf)
			if err != nil {
				break
			}
			if otherOpcode(b, buf[:n]) {
				continue // the start's ANNOUNCE
			}
			var resp pcp.Response
			if err := pcp.ParseResponse(buf[:n], &resp); err != nil {
				u.t.Fatalf("reply % x: %v", buf[:n], err)
			}
			return resp
		}
	}
	u.t.Fatalf("PCP %v: no reply", r.Opcode)
	return pcp.Response{}
}

// next is the next MAP/PEER response that comes within wait, unsolicited
// (the client sends nothing); false if none.
func (u *updateClient) next(wait time.Duration) (pcp.Response, time.Time, bool) {
	u.t.Helper()
	buf := make([]byte, 2048)
	u.c.SetReadDeadline(time.Now().Add(wait))
	for {
		n, err := u.c.Read(buf)
		if err != nil {
			return pcp.Response{}, time.Time{}, false
		}
		at := time.Now()
		var resp pcp.Response
		if err := pcp.ParseResponse(buf[:n], &resp); err != nil {
			u.t.Fatalf("unsolicited % x: %v", buf[:n], err)
		}
		if resp.Opcode == pcp.OpAnnounce {
			continue
		}
		return resp, at, true
	}
}

// expectUpdates reads the three sends of one unsolicited update (UPD-02)
// and checks each with check; then nothing more for 2 s. The gaps are
// logged, not judged here (TestForwardedEndSendsCannotProvideExternal
// does, on a fake clock).
func (u *updateClient) expectUpdates(what string, check func(pcp.Response) error) {
	u.t.Helper()
	var ats []time.Time
	for i := range updateSends {
		wait := 3 * time.Second
		if i == 0 {
			wait = 15 * time.Second // the forward's read: every 2 s, or the watch's kick
		}
		r, at, ok := u.next(wait)
		if !ok {
			u.t.Fatalf("%s: send %d of %d: no datagram within %v", what, i+1, updateSends, wait)
		}
		if err := check(r); err != nil {
			u.t.Fatalf("%s: send %d: %v", what, i+1, err)
		}
		ats = append(ats, at)
	}
	if r, _, ok := u.next(2 * time.Second); ok {
		u.t.Fatalf("%s: a fourth datagram: %v %+v", what, r.Result, r.Map)
	}
	u.t.Logf("%s: gaps %v, %v (≥ 250 ms, ≥ 500 ms wanted)", what, ats[1].Sub(ats[0]), ats[2].Sub(ats[1]))
}

// TestE2EUnsolicitedUpdates (root, namespaces; UPD-02, UPD-03, h/upd): a
// client's socket, after its mapping was granted, receives without
// asking: CANNOT_PROVIDE_EXTERNAL for its PREFER_FAILURE MAP once the
// admin adds a DNAT forward of its external port (pcpd ends the mapping:
// forwardend.go), and NOT_AUTHORIZED for a MAP the operator revokes;
// three times each, from the serving address, with the mapping's nonce,
// protocol, internal port and external; nothing more after. The kernel
// holds neither pinhole after. Before h/upd both waits ended with 'send 1
// of 3: no datagram within 15s'.
func TestE2EUnsolicitedUpdates(t *testing.T) {
	l := newLab(t)
	pub := l.topo.HostPublicV4
	pfc, rvc := l.updateClient(t), l.updateClient(t)

	pf := mapReq(l.topo.ClientV4, pcp.ProtoTCP, 9500, 9500, time.Hour, 21)
	pf.Map.ExternalAddr = pub
	pf.Options.PreferFailure = true
	if r := pfc.do(pf); r.Result != pcp.Success || r.Map.ExternalPort != 9500 {
		t.Fatalf("PREFER_FAILURE MAP: %v, external port %d", r.Result, r.Map.ExternalPort)
	}
	if r := rvc.do(mapReq(l.topo.ClientV4, pcp.ProtoTCP, 9501, 0, time.Hour, 22)); r.Result != pcp.Success {
		t.Fatalf("MAP to revoke: %v", r.Result)
	}
	ext9501 := uint16(0)
	for _, e := range l.kernelHoles() {
		if e.Pinhole.InternalPort == 9501 {
			ext9501 = e.Pinhole.ExternalPort
		}
	}

	form := func(code pcp.ResultCode, nonce byte, port, extPort uint16) func(pcp.Response) error {
		return func(r pcp.Response) error {
			if r.Opcode != pcp.OpMap || r.Result != code || r.Map.Nonce != (pcp.Nonce{nonce}) || r.Map.Protocol != pcp.ProtoTCP ||
				r.Map.InternalPort != port || r.Map.ExternalPort != extPort || r.Map.ExternalAddr != pub {
				return fmt.Errorf("%v %v nonce %x proto %v internal %d external %v:%d; want MAP %v nonce %x TCP %d external %v:%d",
					r.Opcode, r.Result, r.Map.Nonce, r.Map.Protocol, r.Map.InternalPort, r.Map.ExternalAddr, r.Map.ExternalPort,
					code, nonce, port, pub, extPort)
			}
			return nil
		}
	}

	l.topo.Host.MustRun(t, "nft", "add table ip admin")
	l.topo.Host.MustRun(t, "nft", "add chain ip admin pre { type nat hook prerouting priority dstnat; }")
	l.topo.Host.MustRun(t, "nft", "add rule ip admin pre ip daddr "+pub.String()+" tcp dport 9500 dnat to 10.100.2.7")
	pfc.expectUpdates("after the admin's forward of TCP 9500", form(pcp.CannotProvideExternal, 21, 9500, 9500))
	if _, ok := l.holds(6, l.topo.ClientV4, 9500); ok {
		t.Error("the PREFER_FAILURE mapping's pinhole is still in the kernel")
	}

	n, err := l.srv.Revoke(context.Background(), RevokeFilter{Opens: []Opening{{Protocol: 6, InternalAddr: l.topo.ClientV4, InternalPort: 9501}}})
	if n != 1 || err != nil {
		t.Fatalf("revoke: %d, %v", n, err)
	}
	rvc.expectUpdates("after the operator's revoke", form(pcp.NotAuthorized, 22, 9501, ext9501))
	if _, ok := l.holds(6, l.topo.ClientV4, 9501); ok {
		t.Error("the revoked mapping's pinhole is still in the kernel")
	}
	// The other client heard nothing of it.
	if r, _, ok := pfc.next(500 * time.Millisecond); ok {
		t.Errorf("the first client got %v for internal port %d", r.Result, r.Map.InternalPort)
	}
}
