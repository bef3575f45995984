package pinhole_test

import (
	"fmt"
	"net/netip"
	"sync"
	"testing"

	"github.com/google/nftables"

	"github.com/pcpd/pcpd/pinhole"
)

// TestFlowedDumpShrunkBetweenWalks (root, namespace; review h/revfo of
// h/flushone's flowedsmall.go): an address in flowed6 all along is never
// answered "absent" by the dump, whatever another writer of the set
// does meanwhile. The kernel walks the set once a datagram, resuming by
// a count (nf_tables_dump_set's skip); elements only in the first
// datagram do not mean the first walk reached the end: when it filled
// its datagram (here ≈ 1 150 elements) and elements left the set before
// the next walk, that walk counts no more than it skips and sends
// nothing, and the first walk's unsent elements are never seen. Here the
// set holds 1 100 addresses all along and 200 others come and go (a
// commit each way on another socket, as nft would); any of the 1 100
// answered absent fails. Before the fix, within a few hundred reads:
// "2001:db8:ff00::...: in flowed6 all along, answered absent".
func TestFlowedDumpShrunkBetweenWalks(t *testing.T) {
	topo, be := guardedTopology(t, pinhole.Config{})
	if n, ok := pinhole.FlowedSetCount(be); !ok || n < 0 {
		t.Skipf("the kernel gives no set count (NFTA_SET_COUNT, Linux 6.16): %v %v", n, ok)
	}
	defer pinhole.SetFlowedDumpMax(1 << 16)()
	const kept, churned = 1100, 200
	fillFlowedFrom(t, topo.Host, 0, kept)
	var asked []netip.Addr
	for j := range kept {
		asked = append(asked, netip.MustParseAddr(fmt.Sprintf("2001:db8:ff00::%x:%x", j>>16, j&0xffff)))
	}
	var churn []nftables.SetElement
	for j := range churned {
		k := netip.MustParseAddr(fmt.Sprintf("2001:db8:fc00::%x", j+1)).As16()
		churn = append(churn, nftables.SetElement{Key: k[:]})
	}
	c, _ := topo.Host.LastingNftConn(t)
	set := &nftables.Set{Table: &nftables.Table{Name: "pcpd", Family: nftables.TableFamilyINet},
		Name: "flowed6", KeyType: nftables.TypeIP6Addr}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			for _, op := range []func(*nftables.Set, []nftables.SetElement) error{c.SetAddElements, c.SetDeleteElements} {
				if err := op(set, churn); err != nil {
					t.Error(err)
					return
				}
				if err := c.Flush(); err != nil {
					t.Error(err)
					return
				}
			}
		}
	}()
	defer wg.Wait()
	defer close(stop)
	wholes := 0
	defer pinhole.SetFlowedDumpHook(func(_ int, whole bool) {
		if whole {
			wholes++
		}
	})()
	for i := 0; i < 400 && !t.Failed(); i++ {
		seen := pinhole.FlowedFromDump(be, asked)
		for _, a := range asked {
			if v, ok := seen[a]; ok && !v {
				t.Errorf("read %d: %v: in flowed6 all along, answered absent (%d reads whole so far)", i, a, wholes)
				break
			}
		}
	}
	t.Logf("%d reads taken as whole", wholes)
}
