package server

import (
	"errors"
	"net/netip"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/store"
)

// TestE2EAbsorbedRenewal: with the nftables backend and the durable store,
// an early renewal is absorbed, and once due the flush brings the kernel
// element's timeout and the stored expiry to the told one within the
// flush interval;
// a renewal absorbed just before shutdown is written before Serve returns.
func TestE2EAbsorbedRenewal(t *testing.T) {
	l := newLab(t)
	c := l.topo.ClientV6
	laddr := netip.AddrPortFrom(c, 40000)
	renew := func(lifetime time.Duration) time.Time {
		t.Helper()
		out, err := l.exchange(laddr, l.server6(), pcp.AppendRequest(nil, mapReq(c, pcp.ProtoTCP, 443, 0, lifetime, 1)))
		if err != nil || len(out) < 4 || out[3] != 0 {
			t.Fatalf("MAP %v: % x %v", lifetime, out, err)
		}
		return time.Now()
	}
	kernel := func() time.Duration {
		for _, e := range l.kernelHoles() {
			if e.Pinhole.InternalAddr == c && e.Pinhole.InternalPort == 443 {
				return e.Remaining
			}
		}
		return 0
	}
	// stored reads the lease's expiry from the state directory (pcpd
	// stopped).
	stored := func() time.Time {
		t.Helper()
		st, state, err := store.Open(l.dir, zap.NewNop())
		if err != nil {
			t.Fatal(err)
		}
		defer st.Close()
		for _, le := range state.Leases {
			if le.InternalAddr == c && le.InternalPort == 443 {
				return le.Expires
			}
		}
		t.Fatal("lease not stored")
		return time.Time{}
	}
	absorbed := func() float64 { return counterValue(t, l.srv.m.absorbed) }

	// Every dirty lease due at once: the periodic step writes it.
	defer func(d time.Duration) { flushLead = d }(flushLead)
	flushLead = 24 * time.Hour
	renew(2 * time.Hour)
	at := renew(3 * time.Hour)
	if n := absorbed(); n != 1 {
		t.Fatalf("renewals absorbed: %v, want 1", n)
	}
	if err := netlab.Eventually(absorbFlush+time.Second, func() error {
		if d := kernel(); d < 3*time.Hour-time.Minute {
			return errors.New("kernel element not refreshed: " + d.String())
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	l.stop()
	if got := stored(); got.Sub(at.Add(3*time.Hour)).Abs() > 5*time.Second {
		t.Fatalf("stored expiry %v, want the told %v", got, at.Add(3*time.Hour))
	}

	// Shutdown: nothing due, no periodic flush in time.
	defer func(d time.Duration) { absorbFlush = d }(absorbFlush)
	absorbFlush, flushLead = time.Hour, 0
	l.start()
	at = renew(4 * time.Hour)
	if n := absorbed(); n != 1 {
		t.Fatalf("renewals absorbed after the restart: %v, want 1", n)
	}
	l.stop()
	if got := stored(); got.Sub(at.Add(4*time.Hour)).Abs() > 5*time.Second {
		t.Fatalf("stored expiry after shutdown %v, want the told %v", got, at.Add(4*time.Hour))
	}
	if d := kernel(); d < 4*time.Hour-time.Minute {
		t.Fatalf("kernel element after shutdown: %v, want about 4h", d)
	}
}
