package conformance

import (
	"fmt"
	"io"
	"net"
	"net/netip"
	"time"

	"github.com/pcpd/pcpd/pcp"
)

// Checks that prove FILTER semantics and state roll-back with real
// traffic, and the overload check (run last: it spends the rate budget).

// needSources ends the check as NA unless the data plane offers n
// internet sources of the client's family.
func (e *Env) needSources(n int) []netip.Addr {
	src := e.sources()
	if len(src) < n {
		e.naf("data plane has %d internet sources of the client's family, need %d", len(src), n)
	}
	return src
}

func host(a netip.Addr) netip.Prefix { return netip.PrefixFrom(a, a.BitLen()) }

// reach reports, for each source, whether it reaches dst.
func (e *Env) reach(dst netip.AddrPort, srcs ...netip.Addr) []bool {
	out := make([]bool, len(srcs))
	for i, s := range srcs {
		out[i] = e.probe(protoTCP, s, dst) == nil
	}
	return out
}

func (e *Env) wantReach(dst netip.AddrPort, srcs []netip.Addr, want []bool, what string) {
	got := e.reach(dst, srcs...)
	for i := range srcs {
		if got[i] != want[i] {
			e.failf("%s: from %s reach=%t, want %t", what, srcs[i], got[i], want[i])
		}
	}
}

var dataChecks = []Check{
	{ID: "FLT-03", Section: "RFC 6887 §13.3, EID 3891", Level: Impl, Name: "prefix length 0 clears filters, earlier ones in the request too", Needs: []Need{NeedData}, Run: func(e *Env) Result {
		src := e.needSources(2)
		s := e.sock()
		p := e.port()
		_, r := s.mapFiltered(p, "[A, 0, B]", filterPrefix(host(src[0]), 0), filter(0, 0, zeroAddr(e.Client)), filterPrefix(host(src[1]), 0))
		e.serve(protoTCP, p)
		e.wantReach(ext(r), src[:2], []bool{false, true}, "[A, 0, B]")
		return pass("[A, 0, B]: only B (%s) reaches %s", src[1], ext(r))
	}},
	{ID: "FLT-04", Section: "RFC 6887 §13.3", Level: Impl, Name: "FILTERs add up across renewals; a renewal without FILTER keeps them", Needs: []Need{NeedData}, Run: func(e *Env) Result {
		src := e.needSources(3)
		s := e.sock()
		p := e.port()
		m, r := s.mapFiltered(p, "MAP + FILTER A", filterPrefix(host(src[0]), 0))
		e.serve(protoTCP, p)
		e.wantReach(ext(r), src[:3], []bool{true, false, false}, "FILTER A")
		m.Opts = [][]byte{filterPrefix(host(src[1]), 0)}
		e.expectResult(s.ask(m.bytes()), pcp.Success, "renewal + FILTER B")
		e.wantReach(ext(r), src[:3], []bool{true, true, false}, "FILTER A then B")
		m.Opts = nil
		e.expectResult(s.ask(m.bytes()), pcp.Success, "renewal without FILTER")
		e.wantReach(ext(r), src[:3], []bool{true, true, false}, "renewal without FILTER")
		return pass("A; +B → A,B; renewal → A,B; C always dropped")
	}},
	{ID: "FLT-07", Section: "RFC 6887 §13.3", Level: Must, Name: "inbound traffic matching no FILTER is dropped", Needs: []Need{NeedData}, Run: func(e *Env) Result {
		src := e.needSources(2)
		s := e.sock()
		p := e.port()
		_, r := s.mapFiltered(p, "MAP + FILTER", filterPrefix(host(src[0]), 0))
		e.serve(protoTCP, p)
		e.wantReach(ext(r), src[:2], []bool{true, false}, "FILTER "+host(src[0]).String())
		return pass("filter %s: it connects, %s dropped", host(src[0]), src[1])
	}},
	{ID: "HDR-06", Section: "RFC 6887 §7.3", Level: Must, Name: "a failed request changes nothing (too many FILTERs on a live mapping)", Needs: []Need{NeedData}, Run: func(e *Env) Result {
		src := e.needSources(2)
		s := e.sock()
		m := s.mapTCP()
		e.serve(protoTCP, m.req.IntPort)
		e.wantReach(ext(m.r), src[:1], []bool{true}, "before")
		n := e.FilterLimit + 1
		if e.FilterLimit == 0 {
			n = 43
		}
		bad := m.req
		bad.Opts = nil
		for i := 0; i < n; i++ {
			bad.Opts = append(bad.Opts, filterPrefix(host(src[1]), uint16(3000+i)))
		}
		r := s.ask(bad.bytes())
		e.unsupported(r, "FILTER")
		if r.Result == pcp.Success {
			e.naf("%d FILTERs accepted: cannot provoke EXCESSIVE_REMOTE_PEERS", n)
		}
		e.wantReach(ext(m.r), src[:1], []bool{true}, fmt.Sprintf("after %s", r.Result))
		return pass("%d FILTERs → %s; mapping still open to %s", n, r.Result, src[0])
	}},
	{ID: "PMP-12", Section: "RFC 6886 §3.4, RFC 6887 §15", Level: Should, Name: "deleting a mapping ends its open TCP connections", Needs: []Need{NeedHold}, Run: func(e *Env) Result {
		s := e.sock()
		m := s.mapTCP()
		c, err := e.Data.EchoTCP(m.req.IntPort)
		if err != nil {
			return failr("echo server: %v", err)
		}
		e.cleanup(func() { c.Close() })
		conn, err := e.Data.DialTCP(ext(m.r))
		if err != nil {
			return failr("connect to %s: %v", ext(m.r), err)
		}
		e.cleanup(func() { conn.Close() })
		echo := func(msg string) error {
			conn.SetDeadline(time.Now().Add(1500 * time.Millisecond))
			if _, err := conn.Write([]byte(msg)); err != nil {
				return err
			}
			buf := make([]byte, len(msg))
			if _, err := io.ReadFull(conn, buf); err != nil {
				return err
			}
			if string(buf) != msg {
				return fmt.Errorf("echo %q, sent %q", buf, msg)
			}
			return nil
		}
		if err := echo("before"); err != nil {
			return failr("echo through the live mapping: %v", err)
		}
		e.expectResult(s.ask(m.deleteReq().bytes()), pcp.Success, "delete")
		if err := echo("after"); err == nil {
			return failr("the connection through %s still carries data after the delete", ext(m.r))
		} else {
			return pass("after delete the open connection stopped: %v", err)
		}
	}},
	{ID: "PKT-08", Section: "RFC 6887 §8.2, §17.2", Level: May, Name: "a flood from one source does not deny service to another", Run: func(e *Env) Result {
		// The second source: another client's address, else the second
		// owned address if the suite can send from it.
		var sb *sock
		var b netip.Addr
		for _, cand := range []netip.Addr{e.OtherClient, e.ThirdParty} {
			if !cand.IsValid() {
				continue
			}
			if c, err := e.ListenPacket(netip.AddrPortFrom(cand, 0)); err == nil {
				e.cleanup(func() { c.Close() })
				l := c.LocalAddr().(*net.UDPAddr).AddrPort()
				sb, b = &sock{e: e, c: c, server: e.Server, local: netip.AddrPortFrom(l.Addr().Unmap(), l.Port())}, cand
				break
			}
		}
		if sb == nil {
			e.naf("no second source address to send from")
		}
		a := e.sock()
		req := announce(e.Client)
		for i := 0; i < 400; i++ {
			a.send(req)
		}
		got := len(a.collect(500 * time.Millisecond))
		// A server without shedding may need a while to drain its queue;
		// give it three rounds of retransmissions.
		var reply []byte
		for i := 0; i < 3 && reply == nil; i++ {
			reply = sb.try(announce(b))
		}
		if reply == nil {
			return failr("400 ANNOUNCEs from %s (%d answered); then %s got no answer in 9 s", e.Client, got, b)
		}
		r, _ := parseResponse(reply)
		e.expectResult(r, pcp.Success, "ANNOUNCE from "+b.String()+" after the flood")
		// Let the flooded source's budget refill before other checks.
		time.Sleep(3 * time.Second)
		return pass("400 ANNOUNCEs from %s: %d answered; %s still served", e.Client, got, b)
	}},
}
