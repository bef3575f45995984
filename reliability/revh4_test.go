package reliability

import (
	"errors"
	"net"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"
)

// TestLocalUserForgesRemoteToClient (h/revh4, issue 9: review of h/hunt4).
// h/hunt4's local_out drops what a host process sends from a client's
// address; the same flow can be started from the other end. User nobody
// binds (IPV6_FREEBIND) to an internet host's address and port, not a
// protected one, and sends to a client's UDP service: conntrack records
// the flow at the output hook with the remote as its original side. The
// client's service answers the remote (forwarded, the flow's reply), and
// from then on the internet host's own datagrams to the client's port are
// the flow's original direction, established: they pass the guard with
// no lease. Judged by what the client's service receives from the
// internet; the control is the same datagrams before the forged one.
func TestLocalUserForgesRemoteToClient(t *testing.T) {
	l := newLab(t, labOptions{wireGuard: true})
	l.start()
	client := netip.AddrPortFrom(l.topo.ClientV6, 40010)
	remote := netip.AddrPortFrom(l.topo.InternetV6, 4445)

	// The client's UDP service answers every datagram (as DNS, QUIC,
	// STUN or a game server would), counting those from the remote.
	var fromRemote atomic.Int32
	var svc *net.UDPConn
	if err := l.topo.Client.Do(func() (err error) {
		svc, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(client))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { svc.Close() })
	go func() {
		buf := make([]byte, 1500)
		for {
			n, from, err := svc.ReadFromUDPAddrPort(buf)
			if errors.Is(err, net.ErrClosed) {
				return
			}
			if err != nil {
				continue
			}
			if from == remote && string(buf[:n]) == "inbound" {
				fromRemote.Add(1)
			}
			svc.WriteToUDPAddrPort(buf[:n], from)
		}
	}()
	var atRemote atomic.Int32
	in := udpIn(t, l.topo.Internet, remote, &atRemote)
	inbound := func(n int) { t.Helper(); sendInbound(t, in, client, n) }

	inbound(5)
	time.Sleep(300 * time.Millisecond)
	if n := fromRemote.Load(); n != 0 {
		t.Fatalf("control: %d unsolicited datagrams from the internet's %v reached the client's %v with no pinhole", n, remote, client)
	}

	err := sendFromAsNobody(l.topo.Host, remote, client, []byte("forged"))
	t.Logf("user nobody sent from the internet's %v to the client's %v: %v", remote, client, err)
	waitFor(time.Second, func() bool { return atRemote.Load() > 0 })
	echoed := atRemote.Load()
	inbound(5)
	waitFor(time.Second, func() bool { return fromRemote.Load() > 0 })
	if n := fromRemote.Load(); n != 0 || err == nil {
		t.Errorf("user nobody's datagram from the internet's %v to the client's %v: send = %v (the remote received the client's answer %d times), and then %d of 5 datagrams from the internet's %v reached the client's service through pcpd's guard, with no lease: %v",
			remote, client, err, echoed, n, remote, l.leases())
	}
}
