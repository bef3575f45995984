package server

import (
	"errors"
	"net/netip"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/pinhole"
)

// TestE2EAuditStaleOrphanNowLive (review h/revgo): the audit's dump is
// stale by the time of its fix now that the watch acts during it. Here
// the dump reads a hole added by hand (no lease: an orphan in the dump);
// then, while the dump is held, the watch undoes that hole, and a client
// maps the same pinhole (its lease installs the very element). The
// audit's fix, decided under s.mu from the lease table of its hold, must
// leave the live lease's element: judged from the dump (or from a table
// read before it) it would delete it, and the client, told SUCCESS, would
// have no pinhole until its renewal.
func TestE2EAuditStaleOrphanNowLive(t *testing.T) {
	l, h, ends := heldAfterStartLab(t)
	c := l.topo.ClientV6
	h.before.Store(true)
	h.armed.Store(true)
	h.heldLost(t)
	l.addByHand(t, 443)
	close(h.read)
	select {
	case <-h.dumped: // the dump shows port 443, no lease holds it
	case <-time.After(watchBound):
		t.Fatal("the audit's dump did not read")
	}
	var added []pinhole.Entry
	es, err := l.fw.List()
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range es {
		if e.Pinhole.InternalAddr == c && e.Pinhole.InternalPort == 443 {
			added = append(added, e)
		}
	}
	if len(added) != 1 {
		t.Fatalf("the hole by hand: %v (test setup)", added)
	}
	h.deaf.Store(false)
	(*h.fn.Load())(pinhole.WatchEvent{Added: added}) // told late: the watch undoes it
	if err := netlab.Eventually(watchBound, func() error {
		if _, held := l.holds(6, c, 443); held {
			return errors.New("port 443 still in the kernel")
		}
		return nil
	}); err != nil {
		t.Fatalf("the watch's undo during the audit's dump: %v", err)
	}
	l.topo.Client.ServeTCP(t, netip.AddrPortFrom(c, 443).String())
	if r := l.pcp(mapReq(c, pcp.ProtoTCP, 443, 0, time.Hour, 1)); r.Result != pcp.Success {
		t.Fatalf("MAP during the audit's dump: %+v", r)
	}
	if _, held := l.holds(6, c, 443); !held {
		t.Fatal("the lease's pinhole not installed (test setup)")
	}
	h.let()
	select {
	case <-ends:
	case <-time.After(watchBound):
		t.Fatal("the audit did not end")
	}
	if _, held := l.holds(6, c, 443); !held {
		t.Fatal("the audit deleted the live lease's pinhole: it judged the element by its stale dump, not by the lease table of its hold")
	}
	if !l.reach(netip.AddrPortFrom(c, 443)) {
		t.Fatal("the live lease passes no traffic after the audit")
	}
}
