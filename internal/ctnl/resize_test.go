package ctnl_test

import (
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/pcpd/pcpd/internal/ctnl"
	"github.com/pcpd/pcpd/internal/netlab"
)

// TestScanResized (root; review h/revarm's left item "hash resize during
// natPrior prune dump"): a dump during which the conntrack hash table's
// size changed (nf_conntrack_buckets written: the kernel moves every
// entry while the dump walks the buckets by index, and may skip some)
// and that found nothing fails with ErrResized, so that no caller takes
// "none found" from it (pruneNATPrior drops nothing, the labelled and
// unlabelled checks take the safe answer). A dump that found a flow, or
// saw no change, is as before. The table's size is read from a file the
// test writes during the dump (the real one is global: resizing it would
// rehash every namespace's conntrack on the machine); the dumps are of a
// real namespace's 2000 entries. Fails without the check: "a dump across
// a resize: err <nil>, want ErrResized".
func TestScanResized(t *testing.T) {
	ns := netlab.NewNS(t, "ctscan")
	netlab.FillConntrack(t, ns, 2000, func(i int) netlab.ConntrackEntry {
		return netlab.ConntrackEntry{Proto: unix.IPPROTO_UDP,
			Src: netip.AddrPortFrom(netip.MustParseAddr("192.0.2.1"), uint16(1024+i)),
			Dst: netip.AddrPortFrom(netip.MustParseAddr("198.51.100.1"), 53), Status: 2 | 4}
	})
	fd, err := os.Open("/var/run/netns/" + ns.Name)
	if err != nil {
		t.Fatal(err)
	}
	defer fd.Close()
	file := filepath.Join(t.TempDir(), "nf_conntrack_buckets")
	write := func(v string) {
		if err := os.WriteFile(file, []byte(v), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	defer ctnl.SetBucketsFile(file)()
	for _, c := range []struct {
		name    string
		resize  bool
		find    bool // fn wants the 1000th flow
		wantErr bool
	}{
		{"no resize", false, false, false},
		{"a resize, none found", true, false, true},
		{"a resize, a flow found", true, true, false},
	} {
		write("262144\n")
		n := 0
		found, err := ctnl.Scan(int(fd.Fd()), unix.AF_UNSPEC, 0, 0, func(*ctnl.Flow) bool {
			n++
			if n == 10 && c.resize {
				write("524288\n")
			}
			return c.find && n == 1000
		})
		switch {
		case c.wantErr && !errors.Is(err, ctnl.ErrResized):
			t.Errorf("%s: a dump across a resize: err %v, want ErrResized (found %v, %d flows)", c.name, err, found, n)
		case !c.wantErr && err != nil:
			t.Errorf("%s: %v", c.name, err)
		case !c.wantErr && found != c.find:
			t.Errorf("%s: found %v, want %v", c.name, found, c.find)
		}
		if n < 10 {
			t.Fatalf("%s: %d flows seen, want ≥ 10", c.name, n)
		}
	}
}
