package pinhole_test

import (
	"errors"
	"fmt"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// readNfSockets adds to seen the inode of every NETLINK_NETFILTER socket
// open in the calling thread's network namespace (/proc/net/netlink: any
// process's, so the test's namespace must be its own).
func readNfSockets(seen map[uint64]bool) error {
	socks, err := netlab.NetlinkSockets()
	for _, k := range socks {
		if k.Protocol == unix.NETLINK_NETFILTER {
			seen[k.Inode] = true
		}
	}
	return err
}

// nfSockets is the NETLINK_NETFILTER sockets open in ns now, by inode.
func nfSockets(t *testing.T, ns *netlab.NS) map[uint64]bool {
	t.Helper()
	seen := map[uint64]bool{}
	if err := ns.Do(func() error { return readNfSockets(seen) }); err != nil {
		t.Fatal(err)
	}
	return seen
}

// watchNfSockets runs fn while another thread lists ns's NETLINK_NETFILTER
// sockets over and over, and returns every one it saw open (a socket
// dialled and closed within fn is seen unless it lived less than one
// listing, ≈ 20-50 µs here; Healthy's reads hold theirs for ms).
func watchNfSockets(t *testing.T, ns *netlab.NS, fn func()) map[uint64]bool {
	t.Helper()
	seen := map[uint64]bool{}
	stop := make(chan struct{})
	done := make(chan error, 1)
	go func() {
		done <- ns.Do(func() error {
			for {
				if err := readNfSockets(seen); err != nil {
					return err
				}
				select {
				case <-stop:
					return nil
				default:
				}
			}
		})
	}()
	func() {
		defer close(stop)
		fn()
	}()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	return seen
}

func notIn(got, base map[uint64]bool) []uint64 {
	var out []uint64
	for ino := range got {
		if !base[ino] {
			out = append(out, ino)
		}
	}
	return out
}

// TestSideReadsKeepTheirSockets: Healthy and List read the kernel on
// NETLINK_NETFILTER sockets of their own, and keep them from call to
// call. Closing such a socket makes nf_tables take the namespace's commit
// lock and wait an RCU grace period under it (NETLINK_URELEASE), ≈ 10-16
// ms under load, and every Apply's transaction waits meanwhile: Healthy
// dialled and closed one per tamper check, List one per pinhole set (8)
// per call (BENCHMARKS.md item 42). After an error the socket is closed
// and the next call dials another; Close closes them.
func TestSideReadsKeepTheirSockets(t *testing.T) {
	netlab.RequireRoot(t)
	ns := netlab.NewNS(t, "nlsock")
	conn, _ := ns.LastingNftConn(t)
	base := nfSockets(t, ns) // conn's
	b, err := pinhole.New(conn, pinhole.Config{Table: "pcpd_nlsock", Routes: noRoutes{}})
	if err != nil {
		t.Fatal(err)
	}
	closed := false
	t.Cleanup(func() {
		if !closed {
			b.Close()
		}
	})
	if err := b.Setup(); err != nil {
		t.Fatalf("Setup: %v", err)
	}
	p := pinhole.Pinhole{Protocol: tcp, InternalAddr: c6, InternalPort: 22, ExternalAddr: c6, ExternalPort: 22}
	apply(t, b, install(p, time.Minute))

	const calls = 20
	for _, c := range []struct {
		name string
		call func() error
	}{
		{"Healthy", b.Healthy},
		{"List", func() error {
			got, err := b.List()
			if err == nil && (len(got) != 1 || got[0].Pinhole != p) {
				err = fmt.Errorf("List: %v, want %v", got, p)
			}
			return err
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			if err := c.call(); err != nil { // dials what it keeps
				t.Fatal(err)
			}
			kept := nfSockets(t, ns)
			var errs []error
			seen := watchNfSockets(t, ns, func() {
				for range calls {
					if err := c.call(); err != nil {
						errs = append(errs, err)
					}
				}
			})
			if err := errors.Join(errs...); err != nil {
				t.Fatal(err)
			}
			if opened := notIn(seen, kept); len(opened) > 0 {
				t.Errorf("%d calls of %s: %d NETLINK_NETFILTER sockets seen beside the %d open before; want none (each one's close waits for nftables' commit lock)",
					calls, c.name, len(opened), len(kept))
			}
			if gone := notIn(kept, nfSockets(t, ns)); len(gone) > 0 {
				t.Errorf("%d calls of %s closed %d of the sockets open before; want them kept", calls, c.name, len(gone))
			}
		})
	}

	// A failed read: the connection it read on is closed, the next call
	// dials another, and reads through it.
	ns.MustRun(t, "nft", "delete", "table", "inet", "pcpd_nlsock")
	for _, c := range []struct {
		name string
		call func() error
	}{
		{"Healthy", b.Healthy},
		{"List", func() error { _, err := b.List(); return err }},
	} {
		kept := nfSockets(t, ns)
		if err := c.call(); err == nil {
			t.Fatalf("%s with the table deleted: no error", c.name)
		}
		if gone := notIn(kept, nfSockets(t, ns)); len(gone) != 1 {
			t.Errorf("%s with the table deleted closed %d of the sockets open before; want 1 (its connection)", c.name, len(gone))
		}
	}
	if err := b.Setup(); err != nil {
		t.Fatalf("Setup: %v", err)
	}
	if err := b.Healthy(); err != nil {
		t.Fatalf("Healthy after Setup: %v", err)
	}
	if _, err := b.List(); err != nil {
		t.Fatalf("List after Setup: %v", err)
	}

	closed = true
	b.Close()
	if left := notIn(nfSockets(t, ns), base); len(left) > 0 {
		t.Errorf("Close left %d NETLINK_NETFILTER sockets open beside the caller's connection", len(left))
	}
}

// TestNetlinkRoutesAtRouteOnly: NetlinkRoutesAt's lookups use a route
// socket only; netlink.NewHandleAt without families opened a
// NETLINK_NETFILTER socket beside it, whose close waits for the
// namespace's nftables commit lock.
func TestNetlinkRoutesAtRouteOnly(t *testing.T) {
	netlab.RequireRoot(t)
	ns := netlab.NewNS(t, "nlsockrt")
	h, err := ns.Handle()
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	before := nfSockets(t, ns)
	r, err := pinhole.NetlinkRoutesAt(h)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if opened := notIn(nfSockets(t, ns), before); len(opened) > 0 {
		t.Errorf("NetlinkRoutesAt opened %d NETLINK_NETFILTER sockets; want none", len(opened))
	}
	if _, err := r.Interfaces(netip.PrefixFrom(c6, 128)); err != nil {
		t.Errorf("route lookup: %v", err)
	}
}
