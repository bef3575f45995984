package pinhole

import (
	"errors"
	"net/netip"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"

	"github.com/pcpd/pcpd/internal/netlab"
)

// TestDropUnsentEncodingError (review h/revenomem): google/nftables keeps
// an encoding error of a queued message and returns it from every Flush
// after, sending nothing; dropUnsent, which drops a failed write's queue,
// replaces the connection then, so the next write goes through.
func TestDropUnsentEncodingError(t *testing.T) {
	ns := netlab.NewNS(t, "revenomem")
	conn, err := ns.NftConn()
	if err != nil {
		t.Fatal(err)
	}
	b, err := New(conn, Config{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(b.Close)
	if err := b.Setup(); err != nil {
		t.Fatal(err)
	}
	b.mu.Lock()
	before := b.conn
	// An expression google/nftables cannot encode: it keeps the error.
	b.conn.AddRule(&nftables.Rule{Table: b.table, Chain: &nftables.Chain{Table: b.table, Name: "forward"},
		Exprs: []expr.Any{&expr.Numgen{Type: 99}}})
	failed := errors.New("a write failed with that queued")
	b.dropUnsent(&failed)
	replaced := b.conn != before
	b.mu.Unlock()
	if !replaced {
		t.Errorf("connection kept after dropping a queue with an encoding error")
	}
	c6 := netip.MustParseAddr("2001:db8:1:2::10")
	p := Pinhole{Protocol: 6, InternalAddr: c6, InternalPort: 80, ExternalAddr: c6, ExternalPort: 80}
	if err := b.Apply([]Op{{Kind: Install, Pinhole: p, Timeout: time.Minute}}); err != nil {
		t.Errorf("Apply after: %v", err)
	}
}
