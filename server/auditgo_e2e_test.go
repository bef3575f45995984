package server

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/pinhole"
)

// heldList is the lab's Backend (with a deafWatch's Watch) whose List,
// once armed, reads the kernel for real and then holds until the test
// releases it: an audit's dump in progress for as long as the test needs
// (at 100 000 IPv4 mappings a dump takes 4.5-10 s, BENCHMARKS.md item
// 68). Every other method is the real Backend's.
type heldList struct {
	*deafWatch
	armed   atomic.Bool
	dumped  chan struct{} // a held List has read the kernel
	release chan struct{}
	once    sync.Once
	// before, once armed, holds the next List before it reads the
	// kernel too: it tells entered and waits for read.
	before  atomic.Bool
	entered chan struct{}
	read    chan struct{}
	// installs counts the Install ops applied while counting is on.
	counting atomic.Bool
	installs atomic.Int64
}

func newHeldList(b *pinhole.Backend) *heldList {
	return &heldList{deafWatch: &deafWatch{Backend: b}, dumped: make(chan struct{}, 1), release: make(chan struct{}),
		entered: make(chan struct{}, 1), read: make(chan struct{})}
}

func (h *heldList) List() ([]pinhole.Entry, error) {
	return h.ListContext(context.Background())
}

// ListContext is the Backend's, held as List; a hold ends with ctx too
// (then ctx's error, as the Backend's dump cut short: the held dump
// stands for one in progress).
func (h *heldList) ListContext(ctx context.Context) ([]pinhole.Entry, error) {
	if h.before.CompareAndSwap(true, false) {
		h.entered <- struct{}{}
		select {
		case <-h.read:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	es, err := h.Backend.ListContext(ctx)
	if h.armed.CompareAndSwap(true, false) {
		h.dumped <- struct{}{}
		select {
		case <-h.release:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	return es, err
}

func (h *heldList) Apply(ops []pinhole.Op) error {
	err := h.Backend.Apply(ops)
	if h.counting.Load() && err == nil {
		for _, op := range ops {
			if op.Kind == pinhole.Install {
				h.installs.Add(1)
			}
		}
	}
	return err
}

// let ends the hold (once).
func (h *heldList) let() { h.once.Do(func() { close(h.release) }) }

// heldAuditLab is a watchLab whose server's firewall is a heldList, armed
// before the start: the start's audit (watchFirewall) dumps and holds.
// It returns once the audit's dump has read the kernel. The hold ends at
// the test's end at the latest (before the lab's stop).
func heldAuditLab(t *testing.T) (*lab, *heldList) {
	t.Helper()
	l := watchLab(t)
	l.stop()
	h := newHeldList(l.fw)
	h.armed.Store(true)
	l.firewall = h
	t.Cleanup(h.let) // before the lab's stop (cleanups run last first)
	l.start()
	select {
	case <-h.dumped:
	case <-time.After(watchBound):
		t.Fatal("the start's audit did not dump")
	}
	return l, h
}

// TestE2EWatchServesDuringAudit (h/auditgo): while the firewall audit's
// dump is in progress (the start's audit, its dump held after reading
// the kernel: a dump takes 4.5-10 s at 100 000 IPv4 mappings), the watch
// goes on: a hole added by hand ("nft add element", 1 h) is undone, a
// live lease's element deleted by hand is put back and a deleted table is
// restored, all before the audit ends. Then the audit ends and leaves
// exactly the live leases' pinholes. Before, the audit ran on the watch's
// goroutine: nothing the watch told was acted on until the dump ended.
func TestE2EWatchServesDuringAudit(t *testing.T) {
	l, h := heldAuditLab(t)
	c := l.topo.ClientV6
	l.topo.Client.ServeTCP(t, netip.AddrPortFrom(c, 443).String())
	if r := l.pcp(mapReq(c, pcp.ProtoTCP, 443, 0, time.Hour, 1)); r.Result != pcp.Success {
		t.Fatalf("MAP during the audit's dump: %+v", r)
	}
	during := func(what string, check func() error) {
		t.Helper()
		if err := netlab.Eventually(watchBound, check); err != nil {
			h.let()
			t.Fatalf("%s while the audit's dump is held: %v after %v (the watch waits for the audit)", what, err, watchBound)
		}
	}
	l.addByHand(t, 444)
	during("hole added by hand not undone", func() error {
		if _, held := l.holds(6, c, 444); held {
			return errors.New("port 444 still in the kernel")
		}
		return nil
	})
	l.topo.Host.MustRun(t, "nft", "delete", "element", "inet", "pcpd", "pin6", fmt.Sprintf("{ %s . tcp . 443 }", c))
	during("live lease's element deleted by hand not put back", func() error {
		if _, held := l.holds(6, c, 443); !held {
			return errors.New("port 443 not back")
		}
		return nil
	})
	l.topo.Host.MustRun(t, "nft", "delete", "table", "inet", "pcpd")
	during("deleted table not restored", func() error {
		if _, held := l.holds(6, c, 443); !held {
			return errors.New("table or port 443 not back")
		}
		return nil
	})
	select {
	case <-h.release:
		t.Fatal("the hold ended before the checks (test setup)")
	default:
	}
	h.let()
	if !l.reach(netip.AddrPortFrom(c, 443)) {
		t.Fatal("the live lease passes no traffic")
	}
	// The audit ends (its snapshot is stale: a dump again) and leaves
	// exactly the live lease's pinhole.
	if err := netlab.Eventually(watchBound, func() error {
		es := l.kernelHoles()
		if len(es) != 1 || es[0].Pinhole.InternalPort != 443 {
			return fmt.Errorf("kernel holds %v", es)
		}
		return nil
	}); err != nil {
		t.Fatalf("after the audit: %v, want the live lease's pinhole alone", err)
	}
}
