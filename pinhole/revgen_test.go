package pinhole_test

import (
	"io"
	"net"
	"net/netip"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

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

// TestForeignDNATKeptPortReused (root, review h/revgen): the generation
// socket's filter drops the NEWGENs of the Backend's kept sockets' port
// ids. A kept socket closed (Healthy's, after a check that failed, until
// the next check dials another; List's and flowed6's likewise; the main
// one between resetConn's close and dial) left its port id in the filter,
// and a netlink port id is free for another socket once its socket is
// closed (an explicit bind: libnl's pid + n<<22 scheme; autobind: a
// process's tgid, another pid namespace's). That process's commits were
// dropped as pcpd's own: its forward was never reserved. Here a socket
// bound to Healthy's closed port adds "tcp dport 444 dnat" to the
// admin's chain (a rule: an element of a set the read looked into is
// caught by the set's dump whatever the filter drops).
// Before: "another socket's commit on the closed port id: read false
// (reads 1, skipped 2), TCP "443,6000"; want read true, TCP
// "443-444,6000"".
func TestForeignDNATKeptPortReused(t *testing.T) {
	ns := netlab.NewNS(t, "fport")
	b := newBackend(t, ns, pinhole.Config{})
	loadNft(t, ns, genRuleset)
	if err := b.Healthy(); err != nil { // dials Healthy's kept socket
		t.Fatal(err)
	}
	foreignCheck(t, b, "first", true, "443,6000")
	foreignCheck(t, b, "nothing changed", false, "443,6000")
	port := pinhole.CloseHealthConn(b)
	if port == 0 {
		t.Fatal("Healthy kept no socket")
	}
	h, err := ns.Handle()
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	other, err := netlink.Dial(unix.NETLINK_NETFILTER, &netlink.Config{NetNS: int(h), PID: port})
	if err != nil {
		t.Fatalf("bind to the closed socket's port id %d: %v", port, err)
	}
	defer other.Close()
	// The batch google/nftables encodes for the element, sent over other.
	var batch []netlink.Message
	enc, err := nftables.New(nftables.WithTestDial(func(req []netlink.Message) ([]netlink.Message, error) {
		batch = append(batch, req...)
		return req, nil
	}))
	if err != nil {
		t.Fatal(err)
	}
	admin := &nftables.Table{Family: nftables.TableFamilyIPv4, Name: "admin"}
	enc.AddRule(&nftables.Rule{Table: admin, Chain: &nftables.Chain{Table: admin, Name: "pre"}, Exprs: []expr.Any{
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_TCP}},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.BigEndian.PutUint16(444)},
		&expr.Immediate{Register: 1, Data: net.ParseIP("10.100.2.7").To4()},
		&expr.NAT{Type: expr.NATTypeDestNAT, Family: unix.NFPROTO_IPV4, RegAddrMin: 1},
	}})
	if err := enc.Flush(); err != nil {
		t.Fatal(err)
	}
	for i := range batch {
		batch[i].Header.Length, batch[i].Header.Sequence, batch[i].Header.PID = 0, 0, 0
	}
	if _, err := other.SendMessages(batch); err != nil {
		t.Fatal(err)
	}
	if _, err := other.Receive(); err != nil {
		t.Fatalf("the element's commit: %v", err)
	}
	if out := ns.MustRun(t, "nft", "list chain ip admin pre"); !strings.Contains(out, "444") {
		t.Fatalf("the rule is not in the chain: %s", out)
	}
	foreignCheck(t, b, "another socket's commit on the closed port id", true, "443-444,6000")
	// Healthy's next check dials its socket again: its commits are pcpd's.
	if err := b.Healthy(); err != nil {
		t.Fatal(err)
	}
	foreignCheck(t, b, "after Healthy's socket dialled again", false, "443-444,6000")
}

// TestForeignDNATGenFilterInKernel (root, review h/revgen): the
// generation socket's filter drops pcpd's own commits' NEWGENs in the
// kernel (pcpd commits per MAP: queued, they would fill the socket's
// buffer between reads, an overrun, a read each time), and passes
// another process's. drain's own check (othersGen) drops them too, so
// no other test tells a filter that passes them. Mutant (genFilter's
// port comparison on the port ids as the host stores them, not as BPF
// loads them): "queued after pcpd's own transactions".
func TestForeignDNATGenFilterInKernel(t *testing.T) {
	ns := netlab.NewNS(t, "fgenf")
	b := newBackend(t, ns, pinhole.Config{})
	loadNft(t, ns, genRuleset)
	foreignCheck(t, b, "first", true, "443,6000")
	ext := netip.MustParseAddr("198.51.100.1")
	ownTransactions(t, b, ext, 10)
	if pinhole.ForeignGenQueued(b) {
		t.Fatal("queued after pcpd's own transactions")
	}
	ns.MustRun(t, "nft", "add table ip other")
	if !pinhole.ForeignGenQueued(b) {
		t.Fatal("nothing queued after nft's commit")
	}
	foreignCheck(t, b, "after nft's commit", true, "443,6000")
}

// ownTransactions makes n installs and n deletes of pinholes on ext, each
// a transaction of pcpd's own, and a health check.
func ownTransactions(t *testing.T, b *pinhole.Backend, ext netip.Addr, n int) {
	t.Helper()
	for i := range n {
		p := pinhole.Pinhole{Protocol: tcp, ExternalAddr: ext, ExternalPort: uint16(8500 + i),
			InternalAddr: netip.MustParseAddr("10.100.2.9"), InternalPort: 8500}
		for _, k := range []pinhole.OpKind{pinhole.Install, pinhole.Delete} {
			if err := b.Apply([]pinhole.Op{{Kind: k, Timeout: time.Hour, Pinhole: p}}); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := b.Healthy(); err != nil {
		t.Fatal(err)
	}
}
