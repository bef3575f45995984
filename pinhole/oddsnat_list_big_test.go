package pinhole_test

import (
	"net/netip"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// TestListNAPTFigure (h/oddsnat; root; PCPD_LIST_NAPT=N, BENCHMARKS.md
// item 68): what the audit's dump (Backend.List) costs over N IPv4 NAPT
// mappings (N napt4 elements and their N snat4 companions), read 3
// times. Since h/oddsnat List reads the SNAT maps too (their odd
// elements; the companions are read and dropped). A figure, no
// assertion but that List returns the N mappings.
func TestListNAPTFigure(t *testing.T) {
	n, _ := strconv.Atoi(os.Getenv("PCPD_LIST_NAPT"))
	if n <= 0 {
		t.Skip("PCPD_LIST_NAPT=N not set")
	}
	ns := netlab.NewNS(t, "listnapt")
	b := newBackend(t, ns, pinhole.Config{})
	ops := make([]pinhole.Op, 0, pinhole.MaxBatch)
	start := time.Now()
	for i := range n {
		in := netip.AddrFrom4([4]byte{10, 100 + byte(i>>16), byte(i >> 8), byte(i)})
		ext := netip.AddrFrom4([4]byte{198, 51, 100, 1 + byte(i/60000)})
		p := pinhole.Pinhole{Protocol: tcp, InternalAddr: in, InternalPort: 80, ExternalAddr: ext, ExternalPort: uint16(1024 + i%60000)}
		if ops = append(ops, install(p, time.Hour)); len(ops) == cap(ops) || i == n-1 {
			apply(t, b, ops...)
			ops = ops[:0]
		}
	}
	t.Logf("installed %d IPv4 NAPT mappings in %v", n, time.Since(start))
	for run := range 3 {
		start := time.Now()
		es, err := b.List()
		took := time.Since(start)
		if err != nil {
			t.Fatal(err)
		}
		// The dump of a hash map restarts its walk every message: one
		// that overlaps a resize may miss some elements and repeat others
		// (main's List too: the same count); a companion whose mapping it
		// missed reads as odd (SNATCompanionOf; the audit leaves it to
		// the live lease).
		// A mapping whose companion the snat4 dump missed is NoCompanion
		// (review h/revsnat): the audit re-installs it, as one whose
		// napt4 element the dump missed.
		seen, odd, noComp := map[pinhole.Pinhole]bool{}, 0, 0
		for _, e := range es {
			if e.Pinhole.Odd() {
				odd++
			}
			if e.NoCompanion {
				noComp++
			}
			seen[e.Pinhole] = true
		}
		t.Logf("run %d: %d entries, %d distinct, %d odd, %d without their companion read", run+1, len(es), len(seen), odd, noComp)
		t.Logf("run %d: List of %d mappings: %v", run+1, n, took)
	}
}
