package server

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/policy"
)

// TestRevokeStopsWithContext (h/opsleft): an operator's revoke whose
// context ends (control's: pcpd stopping) stops between two chunks: the
// leases of the chunks done are out of the kernel and the store, the
// others are leases still, in the table, the kernel and the store, and
// the error says it was cut short and how many were ended.
//
// Fails before (Revoke took no context, ran to its end): all 1000
// revoked, no error.
func TestRevokeStopsWithContext(t *testing.T) {
	const n = 1000
	h := newHarness(t, func(c *Config, p *policy.Config) { p.MaxLeasesPerClient, c.RateBurst = 2*n, 100*n })
	for i := range n {
		h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, uint16(1000+i), 0, time.Hour, 1)), pcp.Success)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	h.s.revokeStepHook = func(done int) {
		if done == revokeChunk {
			cancel() // SIGTERM after the first chunk
		}
	}
	got, err := h.s.Revoke(ctx, RevokeFilter{Owner: ownerA})
	t.Logf("Revoke: %d, %v", got, err)
	if got != revokeChunk || !errors.Is(err, ErrRevokeStopped) || !errors.Is(err, context.Canceled) ||
		!strings.Contains(err.Error(), "cut short") {
		t.Fatalf("Revoke: %d, %v; want %d and ErrRevokeStopped (context canceled)", got, err, revokeChunk)
	}
	if l, holes, st := len(h.s.Leases()), len(h.fw.Holes()), len(h.st.Leases()); l != n-got || holes != n-got || st != n-got {
		t.Fatalf("after the revoke: %d leases, %d pinholes, %d stored; want %d each", l, holes, st, n-got)
	}
	// A context ended before: nothing selected or ended.
	if got, err := h.s.Revoke(ctx, RevokeFilter{All: true}); got != 0 || !errors.Is(err, ErrRevokeStopped) {
		t.Fatalf("Revoke with an ended context: %d, %v", got, err)
	}
	if l := len(h.s.Leases()); l != n-revokeChunk {
		t.Fatalf("%d leases left, want %d", l, n-revokeChunk)
	}
}

// TestRevokeStopsWithServe (h/opsleft; root: Serve in a namespace of its
// own): a revoke still running when Serve returns (SIGTERM: control
// serves its connections until its own end) begins no chunk after it,
// whatever its context: Serve's end closed the conntrack flusher
// (endConntrack), and a flush queued after it is neither retried nor
// waited for, its walk's socket closed. Revoke stops with
// ErrRevokeStopped; no flush is queued after Serve returned (the
// flusher's sequence number unchanged); the leases not reached are kept.
//
// Fails before: the revoke ran on after Serve returned, all 2000
// revoked and 7 flushes queued to the closed flusher.
func TestRevokeStopsWithServe(t *testing.T) {
	netlab.RequireRoot(t)
	const n = 2000
	_, s, fw, st, stop, done := sweepServeWith(t, "opsleft-revstop", 0, n, func(*Server, []pinhole.Op) {}, func(s *Server) {
		s.cfg.KeepConnections = false
		s.ct.walk = func([]ctFilter) ([]ctFilter, error) { return nil, nil }
	})
	var seqAtEnd uint64
	s.revokeStepHook = func(done2 int) {
		if done2 != revokeChunk {
			return
		}
		stop() // SIGTERM after the first chunk: Serve returns
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
		done <- nil // for the cleanup
		seqAtEnd = s.ct.seq()
	}
	got, err := s.Revoke(context.Background(), RevokeFilter{Owner: "static:a"})
	late := s.ct.seq() - seqAtEnd
	t.Logf("Revoke: %d, %v; %d flush(es) queued after Serve returned", got, err, late)
	if got != revokeChunk || !errors.Is(err, ErrRevokeStopped) {
		t.Errorf("Revoke: %d, %v; want %d and ErrRevokeStopped", got, err, revokeChunk)
	}
	if late != 0 {
		t.Errorf("%d conntrack flush(es) queued to the flusher closed by Serve's end", late)
	}
	if holes, stored := len(fw.Holes()), len(st.Leases()); holes != n-got || stored != n-got {
		t.Errorf("after: %d pinholes, %d stored leases; want %d", holes, stored, n-got)
	}
}
