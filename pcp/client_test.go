package pcp

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"
)

// fakeServer is an in-process PCP/NAT-PMP server on loopback built from
// this package's codec, with knobs for misbehaving.
type fakeServer struct {
	conn     *net.UDPConn
	other    *net.UDPConn // a second socket: replies from it must be ignored (§8.3)
	drop     int32        // drop this many requests first
	decoys   bool         // before the real reply, send a spoofed and a wrong-nonce one
	silent   bool         // never answer
	requests atomic.Int32
}

func newFakeServer(t *testing.T) *fakeServer {
	t.Helper()
	listen := func() *net.UDPConn {
		c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	s := &fakeServer{conn: listen(), other: listen()}
	return s
}

func (s *fakeServer) addr() netip.AddrPort { return s.conn.LocalAddr().(*net.UDPAddr).AddrPort() }

func (s *fakeServer) serve() {
	buf := make([]byte, 2048)
	for {
		n, from, err := s.conn.ReadFromUDPAddrPort(buf)
		if err != nil {
			return
		}
		pkt := buf[:n]
		if s.requests.Add(1) <= s.drop || s.silent {
			continue
		}
		if pkt[0] == PMPVersion {
			var r PMPRequest
			if ParsePMPRequest(pkt, &r) != nil {
				continue
			}
			var out []byte
			if r.Opcode == PMPOpAddress {
				out = AppendPMPAddressResponse(nil, PMPSuccess, 1, netip.MustParseAddr("203.0.113.1"))
			} else {
				out = AppendPMPMapResponse(nil, r.Opcode, PMPSuccess, 1, r.InternalPort, r.InternalPort+1, r.Lifetime)
			}
			s.conn.WriteToUDPAddrPort(out, from)
			continue
		}
		var req Request
		if err := ParseRequest(pkt, from.Addr().Unmap(), &req); err != nil {
			var pe *ParseError
			if errors.As(err, &pe) && !pe.Silent {
				s.conn.WriteToUDPAddrPort(AppendErrorResponse(nil, pkt, pe.Result, pe.Result.ErrorLifetime(), 1), from)
			}
			continue
		}
		resp := Response{Opcode: req.Opcode, Lifetime: req.Lifetime, Epoch: 1, Map: req.Map, Peer: req.Peer}
		resp.Map.ExternalPort = req.Map.InternalPort
		resp.Map.ExternalAddr = netip.MustParseAddr("203.0.113.1")
		if s.decoys {
			s.other.WriteToUDPAddrPort(AppendResponse(nil, &resp), from) // wrong source port
			wrong := resp
			wrong.Map.Nonce[0] ^= 0xff
			wrong.Map.ExternalPort = 1
			s.conn.WriteToUDPAddrPort(AppendResponse(nil, &wrong), from) // wrong nonce
			s.conn.WriteToUDPAddrPort([]byte{2, 0x81, 0, 0}, from)       // undecodable
		}
		s.conn.WriteToUDPAddrPort(AppendResponse(nil, &resp), from)
	}
}

func newClient(t *testing.T, s *fakeServer) *Client {
	c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	go s.serve()
	return &Client{Conn: c, Server: s.addr(), InitialTimeout: 50 * time.Millisecond}
}

// TestClientRetransmit_6887_8_1_1: a lost request is retransmitted and
// the reply matched; ClientAddr is taken from the socket.
func TestClientRetransmit_6887_8_1_1(t *testing.T) {
	s := newFakeServer(t)
	s.drop = 2
	c := newClient(t, s)
	req := NewMap(netip.Addr{}, ProtoTCP, 8080, time.Hour)
	req.ClientAddr = netip.Addr{}
	var resp Response
	if err := c.Do(context.Background(), req, &resp); err != nil {
		t.Fatal(err)
	}
	if got := s.requests.Load(); got != 3 {
		t.Errorf("server saw %d requests, want 3", got)
	}
	if resp.Result != Success || resp.Map.ExternalPort != 8080 || resp.Map.Nonce != req.Map.Nonce {
		t.Errorf("resp %+v", resp)
	}
	if req.ClientAddr != netip.MustParseAddr("127.0.0.1") {
		t.Errorf("ClientAddr filled as %v", req.ClientAddr)
	}
}

// TestClientMatch_6887_8_3: replies from another port, with another nonce
// or undecodable are ignored.
func TestClientMatch_6887_8_3(t *testing.T) {
	s := newFakeServer(t)
	s.decoys = true
	c := newClient(t, s)
	req := NewPeer(netip.MustParseAddr("127.0.0.1"), ProtoUDP, 5000, netip.MustParseAddrPort("198.51.100.7:53"), time.Hour)
	var resp Response
	if err := c.Do(context.Background(), req, &resp); err != nil {
		t.Fatal(err)
	}
	if resp.Map.ExternalPort != 5000 || resp.Map.Nonce != req.Map.Nonce || resp.Peer != req.Peer {
		t.Errorf("matched a decoy: %+v", resp)
	}
}

// TestClientGivesUp: retransmissions are bounded by MaxAttempts and by
// the context.
func TestClientGivesUp(t *testing.T) {
	s := newFakeServer(t)
	s.silent = true
	c := newClient(t, s)
	c.InitialTimeout, c.MaxAttempts = 20*time.Millisecond, 3
	start := time.Now()
	var resp Response
	err := c.Do(context.Background(), NewAnnounce(netip.MustParseAddr("127.0.0.1")), &resp)
	if !errors.Is(err, ErrNoResponse) {
		t.Fatalf("err = %v, want ErrNoResponse", err)
	}
	if got := s.requests.Load(); got != 3 {
		t.Errorf("%d transmissions, want 3", got)
	}
	// 20 + 40 + 80 ms, but the -10 % jitter compounds (each RT is
	// jitter(2·previous RT), §8.1.1), so the shortest legal total is
	// 18 + 32.4 + 58.3 = 108.7 ms; the upper bound is slack for a busy machine.
	if el := time.Since(start); el < 108*time.Millisecond || el > 2*time.Second {
		t.Errorf("gave up after %v", el)
	}
	c.MaxAttempts = 100
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if err := c.Do(ctx, NewAnnounce(netip.MustParseAddr("127.0.0.1")), &resp); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("err = %v, want DeadlineExceeded", err)
	}
}

// TestClientErrorResult: an error reply is a response, not a Do error
// (ADDR-01 through the whole path).
func TestClientErrorResult(t *testing.T) {
	s := newFakeServer(t)
	c := newClient(t, s)
	req := NewMap(netip.MustParseAddr("127.0.0.2"), ProtoTCP, 80, time.Hour) // not our source
	var resp Response
	if err := c.Do(context.Background(), req, &resp); err != nil {
		t.Fatal(err)
	}
	if resp.Result != AddressMismatch || resp.Lifetime != LongErrorLifetime || resp.Map.Nonce != req.Map.Nonce {
		t.Errorf("resp %+v", resp)
	}
}

// TestClientPMP_6886_3_1: NAT-PMP address and mapping exchanges.
func TestClientPMP_6886_3_1(t *testing.T) {
	s := newFakeServer(t)
	s.drop = 1
	c := newClient(t, s)
	var resp PMPResponse
	if err := c.DoPMP(context.Background(), &PMPRequest{Opcode: PMPOpAddress}, &resp); err != nil {
		t.Fatal(err)
	}
	if resp.ExternalAddr != netip.MustParseAddr("203.0.113.1") || resp.Epoch != 1 {
		t.Errorf("address resp %+v", resp)
	}
	if err := c.DoPMP(context.Background(), &PMPRequest{Opcode: PMPOpMapTCP, InternalPort: 22, Lifetime: time.Hour}, &resp); err != nil {
		t.Fatal(err)
	}
	if resp.Opcode != PMPOpMapTCP || resp.InternalPort != 22 || resp.ExternalPort != 23 || resp.Lifetime != time.Hour {
		t.Errorf("map resp %+v", resp)
	}
}
