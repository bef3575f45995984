package server

import (
	"net/netip"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/policy"
	"github.com/pcpd/pcpd/server/servertest"
	"github.com/pcpd/pcpd/store"
)

var (
	_ Firewall   = (*servertest.Firewall)(nil)
	_ LeaseStore = (*servertest.Store)(nil)
)

// Addresses of the unit tests: two static clients, each with IPv6 and
// IPv4 prefixes on the tunnel.
var (
	addrA  = netip.MustParseAddr("2001:db8:a::10")
	addrA2 = netip.MustParseAddr("2001:db8:a::11")
	addrB  = netip.MustParseAddr("2001:db8:b::10")
	v4A    = netip.MustParseAddr("10.0.0.2")
	v4A2   = netip.MustParseAddr("10.0.0.3")
	v4B    = netip.MustParseAddr("10.0.0.18")
	ext4   = netip.MustParseAddr("198.51.100.1")
	local6 = netip.MustParseAddrPort("[2001:db8::1]:5351")
	local4 = netip.MustParseAddrPort("10.0.0.1:5351")
	remote = netip.MustParseAddrPort("[2001:db8:99::1]:4000")
)

const (
	ownerA = "static:a"
	ownerB = "static:b"
)

type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

type harness struct {
	t     testing.TB
	s     *Server
	fw    *servertest.Firewall
	st    *servertest.Store
	clock *fakeClock
	logs  *observer.ObservedLogs
	cfg   Config
	pcfg  policy.Config
	own   policy.Ownership
}

type option func(*Config, *policy.Config)

func newHarness(t testing.TB, opts ...option) *harness {
	t.Helper()
	clock := &fakeClock{t: time.Date(2026, 11, 23, 9, 0, 0, 0, time.UTC)}
	h := &harness{t: t, clock: clock, fw: servertest.NewFirewall(clock.Now), st: servertest.NewStore()}
	h.cfg = Config{ExternalIPv4: ext4, Interfaces: []string{"lo"}, KeepConnections: true}
	for _, o := range opts {
		o(&h.cfg, &h.pcfg)
	}
	h.own = staticOwners(t, false)
	h.start()
	return h
}

// staticOwners is the harness's ownership: clients a and b, and with bench
// also the owner of startLeases' leases (2001:db8:2::/48).
func staticOwners(t testing.TB, bench bool) policy.Ownership {
	t.Helper()
	m := map[string][]netip.Prefix{
		"a": {netip.MustParsePrefix("2001:db8:a::/48"), netip.MustParsePrefix("10.0.0.0/28")},
		"b": {netip.MustParsePrefix("2001:db8:b::/48"), netip.MustParsePrefix("10.0.0.16/28")},
	}
	if bench {
		m["bench"] = []netip.Prefix{netip.MustParsePrefix("2001:db8:2::/48")}
	}
	own, err := policy.NewStatic(m)
	if err != nil {
		t.Fatal(err)
	}
	return own
}

// start (re)builds the server on the harness's firewall and store, as a
// restart of the daemon would.
func (h *harness) start() {
	h.t.Helper()
	h.startWith(nil, nil)
}

// startWith is start with deps changed by deps before New (nil: the
// harness's own; a test's clocks, say) and the server changed by tweak
// before its Start (nil: none).
func (h *harness) startWith(deps func(*Deps), tweak func(*Server)) {
	h.t.Helper()
	pol, err := policy.New(h.pcfg, h.own)
	if err != nil {
		h.t.Fatal(err)
	}
	core, logs := observer.New(zap.DebugLevel)
	h.logs = logs
	d := Deps{Firewall: h.fw, Store: h.st, State: h.st.State(), Policy: pol, Now: h.clock.Now}
	if deps != nil {
		deps(&d)
	}
	s, err := New(h.cfg, d, zap.New(core))
	if err != nil {
		h.t.Fatal(err)
	}
	if tweak != nil {
		tweak(s)
	}
	if err := s.Start(); err != nil {
		h.t.Fatal(err)
	}
	h.s = s
}

// stepClocks sets a test's wall and monotonic clocks (stepClocks) in Deps.
func (c *stepClocks) deps(d *Deps) { d.Now, d.Mono = c.Now, c.Mono }

// raw sends b from src and returns the reply bytes.
func (h *harness) raw(src netip.Addr, b []byte) []byte {
	local := local6
	if src.Is4() {
		local = local4
	}
	return h.s.Handle(local, netip.AddrPortFrom(src, 40000), b)
}

// do sends a PCP request from its Client IP and decodes the reply.
func (h *harness) do(r *pcp.Request) pcp.Response {
	h.t.Helper()
	return h.doFrom(r.ClientAddr, r)
}

func (h *harness) doFrom(src netip.Addr, r *pcp.Request) pcp.Response {
	h.t.Helper()
	b := pcp.AppendRequest(nil, r)
	out := h.raw(src, b)
	if out == nil {
		h.t.Fatalf("no reply")
	}
	if len(out) > len(b) {
		h.t.Fatalf("reply of %d octets to a request of %d (no amplification, choice (f))", len(out), len(b))
	}
	var resp pcp.Response
	if err := pcp.ParseResponse(out, &resp); err != nil {
		h.t.Fatalf("parse reply % x: %v", out, err)
	}
	return resp
}

// mapReq builds a MAP request with nonce n.
func mapReq(client netip.Addr, proto pcp.Protocol, port, sugg uint16, lifetime time.Duration, n byte) *pcp.Request {
	r := pcp.NewMap(client, proto, port, lifetime)
	r.Map.Nonce = pcp.Nonce{n}
	r.Map.ExternalPort = sugg
	return r
}

func peerReq(client netip.Addr, proto pcp.Protocol, port uint16, rem netip.AddrPort, lifetime time.Duration, n byte) *pcp.Request {
	r := pcp.NewPeer(client, proto, port, rem, lifetime)
	r.Map.Nonce = pcp.Nonce{n}
	return r
}

func (h *harness) expect(resp pcp.Response, code pcp.ResultCode) {
	h.t.Helper()
	if resp.Result != code {
		h.t.Fatalf("result %v, want %v (reply %+v)", resp.Result, code, resp)
	}
}

// hole is the kernel pinhole a plain MAP lease installs.
func hole(proto uint8, in netip.Addr, inPort uint16, ext netip.Addr, extPort uint16) pinhole.Pinhole {
	return pinhole.Pinhole{Protocol: proto, InternalAddr: in, InternalPort: inPort, ExternalAddr: ext, ExternalPort: extPort}
}

// snapshot captures every piece of state a refused request must not touch
// (HDR-06).
type snapshot struct {
	leases map[store.Key]store.Lease
	holes  map[pinhole.Pinhole]time.Duration
	table  int
}

func (h *harness) snap() snapshot {
	return snapshot{leases: h.st.Leases(), holes: h.fw.Holes(), table: h.s.tab.len()}
}

func (h *harness) unchanged(before snapshot) {
	h.t.Helper()
	after := h.snap()
	if len(after.leases) != len(before.leases) || len(after.holes) != len(before.holes) || after.table != before.table {
		h.t.Fatalf("state changed: leases %d→%d, pinholes %d→%d, table %d→%d",
			len(before.leases), len(after.leases), len(before.holes), len(after.holes), before.table, after.table)
	}
	for k, l := range before.leases {
		if a, ok := after.leases[k]; !ok || !leaseEqual(&a, &l) {
			h.t.Fatalf("lease %v changed", k)
		}
	}
	for p, d := range before.holes {
		if a, ok := after.holes[p]; !ok || a != d {
			h.t.Fatalf("pinhole %v changed", p)
		}
	}
}

func (h *harness) lease(owner string, proto uint8, addr netip.Addr, port uint16) (store.Lease, bool) {
	l, ok := h.st.Leases()[store.Key{Owner: owner, Protocol: proto, InternalAddr: addr, InternalPort: port}]
	return l, ok
}

// startRecordingFlushes starts h's server as h.start does (but logging
// nowhere), with the conntrack walk recorded: each flush of addr:port
// notes whether the firewall still held p. wait returns once the flushes
// queued so far are done (failing t after 5 s); flushes waits so, then
// returns a copy of the notes.
func (h *harness) startRecordingFlushes(t *testing.T, addr netip.Addr, port uint16, p pinhole.Pinhole) (s *Server, wait func(), flushes func() []bool) {
	t.Helper()
	pol, err := policy.New(h.pcfg, h.own)
	if err != nil {
		t.Fatal(err)
	}
	s, err = New(h.cfg, Deps{Firewall: h.fw, Store: h.st, State: h.st.State(), Policy: pol, Now: h.clock.Now}, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var notes []bool
	s.ct.walk = func(fs []ctFilter) ([]ctFilter, error) {
		for _, f := range fs {
			if !f.nat && f.t.addr == addr && f.t.port == port {
				_, open := h.fw.Holes()[p]
				mu.Lock()
				notes = append(notes, open)
				mu.Unlock()
			}
		}
		return nil, nil
	}
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	h.s = s
	wait = func() {
		done := make(chan struct{})
		s.ct.after(s.ct.seq(), func() { close(done) })
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Fatal("conntrack flush did not finish")
		}
	}
	flushes = func() []bool {
		wait()
		mu.Lock()
		defer mu.Unlock()
		return append([]bool(nil), notes...)
	}
	return s, wait, flushes
}

// failDeletes is a servertest.Firewall.FailApply that refuses every batch
// with a deletion in it.
func failDeletes(ops []pinhole.Op) error {
	for _, op := range ops {
		if op.Kind == pinhole.Delete {
			return servertest.ErrInjected
		}
	}
	return nil
}

// runPeriodic runs the engine's periodic paths as Serve would over the
// given minutes, once each a minute of the fake clock: the ownership
// sweep and steps sweep steps, the store debt, the firewall check and the
// expiry.
func (h *harness) runPeriodic(minutes, steps int) {
	for range minutes {
		h.clock.Advance(time.Minute)
		h.s.sweepOwnership()
		for range steps {
			h.s.sweepStep()
		}
		h.s.payStoreDebt()
		h.s.checkFirewall()
		h.s.mu.Lock()
		h.s.expireLocked(h.clock.Now())
		h.s.mu.Unlock()
	}
}
