package pinhole

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/pcpd/pcpd/internal/netlab"
)

// TestRouteWatchOverrun: a watch whose socket overran (ENOBUFS: the kernel
// dropped notifications) counts the loss as a change, stays live, sees the
// next change, and closes.
func TestRouteWatchOverrun(t *testing.T) {
	ns := netlab.NewNS(t, "revsp")
	h, err := netns.GetFromName(ns.Name)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	sock, err := nl.SubscribeAt(h, netns.None(), unix.NETLINK_ROUTE, watchGroups...)
	if err != nil {
		t.Fatal(err)
	}
	// The smallest receive buffer, filled before anyone reads: overrun.
	if err := sock.SetReceiveBufferSize(1, false); err != nil {
		t.Fatal(err)
	}
	batch := filepath.Join(t.TempDir(), "batch")
	f, err := os.Create(batch)
	if err != nil {
		t.Fatal(err)
	}
	del, err := os.Create(batch + "del")
	if err != nil {
		t.Fatal(err)
	}
	for i := range 200 {
		fmt.Fprintf(f, "route add 2001:db8:%x::/48 dev lo\n", i)
		fmt.Fprintf(del, "route del 2001:db8:%x::/48 dev lo\n", i)
	}
	f.Close()
	del.Close()
	ns.MustRun(t, "ip", "-6", "-batch", batch)
	ns.MustRun(t, "ip", "-6", "-batch", batch+"del")
	// The socket's drops, from its namespace's /proc/net/netlink (not
	// SO_ERROR: reading it would clear the ENOBUFS the watch must see).
	var st unix.Stat_t
	if err := unix.Fstat(sock.GetFd(), &st); err != nil {
		t.Fatal(err)
	}
	drops := -1
	for _, line := range strings.Split(ns.MustRun(t, "cat", "/proc/net/netlink"), "\n") {
		f := strings.Fields(line)
		if len(f) >= 10 && f[9] == strconv.FormatUint(st.Ino, 10) {
			drops, _ = strconv.Atoi(f[8])
		}
	}
	if drops <= 0 {
		t.Fatalf("socket drops %d after 400 changes into the smallest buffer: the test did not overrun", drops)
	}
	t.Logf("%d notifications dropped", drops)
	w := startWatch(sock)
	n := &netlinkRoutes{watch: w}
	defer n.Close()
	deadline := time.Now().Add(10 * time.Second)
	for w.gen.Load() == 0 {
		if time.Now().After(deadline) {
			t.Fatal("the overrun socket's backlog was never read")
		}
		time.Sleep(time.Millisecond)
	}
	if _, ok := n.Generation(); !ok {
		t.Fatal("watch not live after an overrun")
	}
	// Quiet: then one more change must be seen.
	time.Sleep(50 * time.Millisecond)
	select {
	case <-w.changed:
	default:
	}
	g0 := w.gen.Load()
	ns.MustRun(t, "ip", "-6", "route", "add", "2001:db8:ffff::/48", "dev", "lo")
	select {
	case <-w.changed:
	case <-time.After(10 * time.Second):
		t.Fatal("a change after the overrun was not seen")
	}
	if g, ok := n.Generation(); !ok || g <= g0 {
		t.Fatalf("generation %d (live %v), was %d", g, ok, g0)
	}
	closed := make(chan struct{})
	go func() { n.Close(); close(closed) }()
	select {
	case <-closed:
	case <-time.After(10 * time.Second):
		t.Fatal("Close did not return")
	}
}
