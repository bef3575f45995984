package server

import (
	"fmt"
	"net/netip"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/pcpd/pcpd/internal/netlab"
)

// pairsKept is the size of the listener's rename bookkeeping (byName,
// byIndex), read under the lock resync holds while it changes them.
func (l *listener) pairsKept() (names, indexes int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.byName), len(l.byIndex)
}

// TestListenerPrunesGoneInterfaces: the listener serves an interface
// configured by an altname (as systemd names NICs; a WireGuard interface
// re-created by a script under another kernel name) that is deleted and
// re-created under a new kernel name, 40 times, while it runs. Each
// kernel name is served in turn, and the name ↔ index pairs of the
// deleted interfaces are dropped beyond the last maxGonePairs (16, kept
// for an interface that comes back from another namespace:
// TestListenerRenamesAcrossNamespaces): the maps stay at most 17 pairs
// (the interface there and 16 gone), where they kept every kernel name
// ever served (40).
func TestListenerPrunesGoneInterfaces(t *testing.T) {
	netlab.RequireRoot(t)
	ns := netlab.NewNS(t, "ops3prune")
	h, _ := nsHandles(t, ns)
	const alt = "pcpd-ops3-served"
	addr := netip.MustParseAddr("10.93.0.1")
	l := &listener{log: zaptest.NewLogger(t), ifaces: []string{alt}, port: Port, ns: h,
		out: make(chan packet, 1), pass: 100 * time.Millisecond}
	runListener(t, l)
	servedBy := func() string {
		for _, c := range l.sockets() {
			if c.local.Addr() == addr {
				return c.kname
			}
		}
		return ""
	}
	const rounds = 40
	maxNames, maxIndexes := 0, 0
	for i := range rounds {
		kname := fmt.Sprintf("o3k%d", i)
		ns.MustRun(t, "ip", "link", "add", kname, "type", "veth", "peer", "name", fmt.Sprintf("o3p%d", i))
		ns.MustRun(t, "ip", "link", "property", "add", "dev", kname, "altname", alt)
		ns.MustRun(t, "ip", "addr", "add", addr.String()+"/24", "dev", kname)
		ns.MustRun(t, "ip", "link", "set", kname, "up")
		if err := netlab.Eventually(followNever, func() error {
			if k := servedBy(); k != kname {
				return fmt.Errorf("round %d: %v served by %q, want %q", i, addr, k, kname)
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		n, x := l.pairsKept()
		maxNames, maxIndexes = max(maxNames, n), max(maxIndexes, x)
		ns.MustRun(t, "ip", "link", "del", kname)
		if err := netlab.Eventually(followNever, func() error {
			if k := servedBy(); k != "" {
				return fmt.Errorf("round %d: %v still served by %q", i, addr, k)
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
	}
	n, x := l.pairsKept()
	t.Logf("%d interfaces served in turn: at most %d names, %d indexes kept; %d and %d at the end", rounds, maxNames, maxIndexes, n, x)
	if maxNames > maxGonePairs+1 || maxIndexes > maxGonePairs+1 || n > maxGonePairs || x > maxGonePairs {
		t.Errorf("after %d interfaces served in turn, each deleted: at most %d names and %d indexes kept while one was there, %d and %d with none: want at most %d, then %d",
			rounds, maxNames, maxIndexes, n, x, maxGonePairs+1, maxGonePairs)
	}
}
