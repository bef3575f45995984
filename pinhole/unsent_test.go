package pinhole_test

import (
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// TestFailedWriteLeavesNothingQueued (review h/revenomem): google/nftables
// keeps the messages queued on a connection until the next Flush, which
// sends them all. A write of the Backend's that failed between queueing
// its transaction and flushing it (a read in between failing: Setup's
// reads after its AddTable and sets, attached Teardown's presentSets after
// its FlushChain and DelChains) left them queued, and the next transaction,
// whoever made it, committed them as its own: an Apply after a failed
// attached Teardown deleted pcpd's guard chains. Each read of the write is
// made to fail in turn (CutReadAt, until the write gets through); after
// each failure an Apply of one pinhole must send only its own message and
// leave the ruleset healthy.
func TestFailedWriteLeavesNothingQueued(t *testing.T) {
	mk := func(port uint16) pinhole.Pinhole {
		p := everyShape[0]
		p.InternalPort, p.ExternalPort = port, port
		return p
	}
	for _, tc := range []struct {
		name  string
		cfg   pinhole.Config
		admin string // ruleset loaded before the Backend's Setup
		write func(*pinhole.Backend) error
	}{
		{"standalone Setup", pinhole.Config{}, "", (*pinhole.Backend).Setup},
		{"attached Setup", pinhole.Config{Table: "filter", Attached: true, Chain: "pcpd"}, adminRuleset, (*pinhole.Backend).Setup},
		{"attached Teardown", pinhole.Config{Table: "filter", Attached: true, Chain: "pcpd"}, adminRuleset, (*pinhole.Backend).Teardown},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ns := netlab.NewNS(t, "revenomem")
			if tc.admin != "" {
				loadNft(t, ns, tc.admin)
			}
			b := newBackend(t, ns, tc.cfg)
			last, restoreSent := pinhole.CountSent()
			defer restoreSent()
			port := uint16(4000)
			apply(t, b, install(mk(port), time.Minute))
			alone := last() // the messages of one Apply of this shape
			for k := 1; ; k++ {
				restore := pinhole.CutReadAt(b, k)
				err := tc.write(b)
				restore()
				if err == nil {
					t.Logf("%s got through with read %d cut (%d reads)", tc.name, k, k-1)
					break
				}
				if k > 50 {
					t.Fatalf("%s still failing with read %d cut: %v", tc.name, k, err)
				}
				port++
				if err := b.Apply([]pinhole.Op{install(mk(port), time.Minute)}); err != nil {
					t.Errorf("read %d cut: Apply after the failed write: %v", k, err)
					continue
				}
				if got := last(); got != alone {
					t.Errorf("read %d cut (%v): the next Apply sent %d messages, one alone sends %d: the failed write's were queued", k, err, got, alone)
				}
				if err := b.Healthy(); err != nil {
					t.Errorf("read %d cut: Healthy after the failed write and an Apply: %v", k, err)
				}
			}
		})
	}
}
