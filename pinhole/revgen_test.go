package pinhole_test

import (
	"io"
	"net/netip"
	"os/exec"
	"strings"
	"testing"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// foreignCheck calls b.ForeignDNAT and fails unless it read (or skipped,
// read false) and its TCP ports are tcpWant.
func foreignCheck(t *testing.T, b *pinhole.Backend, step string, read bool, tcpWant string) {
	t.Helper()
	r0, _ := b.ForeignReads()
	f, err := b.ForeignDNAT(netip.MustParseAddr("198.51.100.1"), 1024, 65535)
	if err != nil {
		t.Fatalf("%s: %v", step, err)
	}
	r, s := b.ForeignReads()
	if (r != r0) != read || f.TCP.String() != tcpWant {
		t.Fatalf("%s: read %v (reads %d, skipped %d), TCP %q; want read %v, TCP %q", step, r != r0, r, s, f.TCP.String(), read, tcpWant)
	}
	t.Logf("%s: read %v (reads %d, skipped %d): TCP %s", step, r != r0, r, s, f.TCP.String())
}

// TestForeignDNATOwnedTableReleased (root, review h/revgen): a table with
// the owner flag (NFT_TABLE_F_OWNER: a daemon's, held by its netlink
// socket) is destroyed by the kernel when that socket closes (the owner
// exits or crashes), without a commit: no NFT_MSG_NEWGEN, no
// notification at all (nft_rcv_nl_event). Its DNAT rules then forward
// nothing, and the next ForeignDNAT must read again and release their
// ports. Before: the last read was kept, "after the owner exited: read
// false (reads 1, skipped 2), TCP "443"; want read true, TCP """: 443
// stayed reserved until some other process's commit, for ever on a quiet
// host.
func TestForeignDNATOwnedTableReleased(t *testing.T) {
	ns := netlab.NewNS(t, "fown")
	b := newBackend(t, ns, pinhole.Config{})
	var in io.WriteCloser
	cmd, err := ns.Start(func(c *exec.Cmd) {
		var perr error
		if in, perr = c.StdinPipe(); perr != nil {
			t.Fatal(perr)
		}
	}, "nft", "-i")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.WriteString(in, "table ip own { flags owner; chain pre { type nat hook prerouting priority dstnat; tcp dport 443 dnat to 10.100.2.7; }; }\n"); err != nil {
		t.Fatal(err)
	}
	// The table is there once nft -i has committed it (a state, polled).
	for i := 0; !strings.Contains(ns.MustRun(t, "nft", "list tables"), "table ip own"); i++ {
		if i == 1000 {
			t.Fatal("nft -i did not create the owned table")
		}
	}
	foreignCheck(t, b, "the owned table", true, "443")
	foreignCheck(t, b, "nothing changed", false, "443")
	_ = in.Close() // nft -i exits: its socket closes, the kernel drops the table
	_ = cmd.Wait()
	if out := ns.MustRun(t, "nft", "list tables"); strings.Contains(out, "table ip own") {
		t.Fatalf("the owned table outlived its owner: %s", out)
	}
	foreignCheck(t, b, "after the owner exited", true, "")
	foreignCheck(t, b, "nothing changed", false, "")
}
