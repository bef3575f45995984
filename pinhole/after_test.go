package pinhole_test

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// TestApplyAfterOverlapping (h/watchleft): ops on overlapping elements of a
// concatenated-range set take effect in order when marked After, in one
// transaction. Without After, Apply sends a phase's adds before its deletes
// (queueOps), and the kernel refuses an element that starts inside another
// one still there:
//   - a foreign pin6_filter element (from ::/0) deleted and the live one it
//     covers (from a /48, deleted by hand) put back: the put-back is refused
//     ErrConflict (op 1) unless After;
//   - a foreign napt4_filter element (pub:8081 from a /25 -> c4:80, no SNAT
//     companion) on the internal endpoint of a live one (pub:8080 from the
//     /24): its Delete's guard adds its companion (c4:80 from the /25),
//     which starts inside the live companion (c4:80 from the /24): refused
//     unless the live mapping is taken out first and the Delete is After.
//
// With queueOps's After mutated out, both After batches FAIL as the plain
// ones do.
func TestApplyAfterOverlapping(t *testing.T) {
	ns := netlab.NewNS(t, "after")
	b := newBackend(t, ns, pinhole.Config{})
	after := func(op pinhole.Op) pinhole.Op { op.After = true; return op }
	conflict := func(err error, index int) bool {
		var oe *pinhole.OpError
		return errors.As(err, &oe) && oe.Index == index && errors.Is(err, pinhole.ErrConflict)
	}
	t.Run("pin6_filter", func(t *testing.T) {
		live, foreign := filtered22("2001:db8:5::/48"), filtered22("::/0")
		apply(t, b, install(foreign, time.Minute))
		if err := b.Apply([]pinhole.Op{del(foreign), install(live, time.Minute)}); !conflict(err, 1) {
			t.Fatalf("put-back with the foreign delete, not After: %v, want op 1 ErrConflict", err)
		}
		if err := b.Apply([]pinhole.Op{del(foreign), after(install(live, time.Minute))}); err != nil {
			t.Fatalf("put-back After the foreign delete: %v", err)
		}
		got, _ := listPinholes(t, b)
		if diff := cmp.Diff([]pinhole.Pinhole{live}, got, cmpAddr, cmpPrefix, cmpOdd); diff != "" {
			t.Errorf("kernel (-want +got):\n%s", diff)
		}
		apply(t, b, del(live))
	})
	t.Run("napt4_filter companion", func(t *testing.T) {
		live := pinhole.Pinhole{Protocol: tcp, InternalAddr: c4, InternalPort: 80, ExternalAddr: pub, ExternalPort: 8080,
			RemotePrefix: netip.MustParsePrefix("203.0.113.0/24")}
		foreign := live
		foreign.ExternalPort, foreign.RemotePrefix = 8081, netip.MustParsePrefix("203.0.113.0/25")
		apply(t, b, install(live, time.Minute))
		ns.MustRun(t, "nft", "add", "element", "inet", "pcpd", "napt4_filter",
			fmt.Sprintf("{ %s . tcp . 8081 . 203.0.113.0/25 . 0-65535 : %s . 80 }", pub, c4))
		if err := b.Apply([]pinhole.Op{del(foreign)}); !conflict(err, 0) {
			t.Fatalf("foreign delete alone: %v, want op 0 ErrConflict", err)
		}
		if err := b.Apply([]pinhole.Op{del(live), del(foreign), install(live, time.Minute)}); !conflict(err, 1) {
			t.Fatalf("foreign delete between the live one's out and back, not After: %v, want op 1 ErrConflict", err)
		}
		if err := b.Apply([]pinhole.Op{del(live), after(del(foreign)), after(install(live, time.Minute))}); err != nil {
			t.Fatalf("foreign delete After the live one's out: %v", err)
		}
		got, es := listPinholes(t, b)
		if diff := cmp.Diff([]pinhole.Pinhole{live}, got, cmpAddr, cmpPrefix, cmpOdd); diff != "" {
			t.Errorf("kernel (-want +got):\n%s", diff)
		}
		if i := slices.IndexFunc(es, func(e pinhole.Entry) bool { return e.Pinhole == live }); i < 0 || es[i].Remaining > time.Minute {
			t.Errorf("live mapping %v", es)
		}
		out := ns.MustRun(t, "nft", "list", "map", "inet", "pcpd", "snat4_filter")
		if want := fmt.Sprintf("%s . tcp . 80 . 203.0.113.0/24 . 0-65535", c4); !strings.Contains(out, want) || strings.Contains(out, "203.0.113.0/25") {
			t.Errorf("snat4_filter: want the live companion alone (%s):\n%s", want, out)
		}
	})
}
