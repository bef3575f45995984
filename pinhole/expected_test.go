package pinhole_test

import (
	"bufio"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/pcpd/pcpd/internal/ctnl"
	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// TestCutsFlowsRestartSparesExpectedFlow (root, namespaces; the kernel's
// FTP conntrack helper): a helper's expected flow is no flow an admission
// rule let in, and a start's conntrack check (pinFlowsUnlabelled) does not
// count it, as it claims (IPS_EXPECTED: its first packet is "related",
// accepted with the established ones, never labelled). The client opens
// an FTP control connection to a remote with the host's own table
// assigning the "ftp" helper, asks for an active data connection (EPRT),
// and the remote connects to the client's data port: the host's conntrack
// then holds that inbound, unlabelled flow into the protected prefix,
// marked IPS_EXPECTED by the kernel. A start over an unmarked recheck6
// must still say CutsFlows true. Without the exclusion (IPS_EXPECTED
// dropped from the dump's status filter and the check) it says false.
func TestCutsFlowsRestartSparesExpectedFlow(t *testing.T) {
	topo, _ := guardedTopology(t, pinhole.Config{})
	rules := filepath.Join(t.TempDir(), "ftp.nft")
	if err := os.WriteFile(rules, []byte(`table ip6 ctnlftp {
	ct helper ftpstd {
		type "ftp" protocol tcp;
	}
	chain forward {
		type filter hook forward priority -10; policy accept;
		tcp dport 21 ct helper set "ftpstd"
	}
}
`), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := topo.Host.Run("nft", "-f", rules); err != nil {
		t.Skipf("no FTP conntrack helper here: %v: %s", err, out)
	}
	if err := topo.Host.Do(func() error { return netlink.ConntrackTableFlush(netlink.ConntrackTable) }); err != nil {
		t.Fatal(err)
	}
	ctrl := netip.AddrPortFrom(topo.InternetV6, 21)
	data := netip.AddrPortFrom(topo.ClientV6, 50021)

	listen := func(ns *netlab.NS, a netip.AddrPort) (l net.Listener) {
		if err := ns.Do(func() (err error) { l, err = net.Listen("tcp6", a.String()); return err }); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { l.Close() })
		return l
	}
	// The remote's FTP server: reads the client's USER, then EPRT, then
	// connects to the port it names.
	srv, dataLn := listen(topo.Internet, ctrl), listen(topo.Client, data)
	type result struct {
		c   net.Conn
		err error
	}
	dialed := make(chan result, 1)
	done := make(chan struct{})
	defer close(done)
	go func() {
		c, err := srv.Accept()
		if err != nil {
			dialed <- result{nil, err}
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		rd := bufio.NewReader(c)
		line, err := rd.ReadString('\n')
		if err != nil || !strings.HasPrefix(line, "USER ") {
			dialed <- result{nil, fmt.Errorf("control: %q %v", line, err)}
			return
		}
		fmt.Fprintf(c, "331 Please specify the password.\r\n")
		line, err = rd.ReadString('\n')
		if err != nil || !strings.HasPrefix(line, "EPRT ") {
			dialed <- result{nil, fmt.Errorf("control: %q %v", line, err)}
			return
		}
		fmt.Fprintf(c, "200 EPRT command successful.\r\n")
		var d net.Conn
		err = topo.Internet.Do(func() (err error) {
			d, err = net.DialTimeout("tcp6", data.String(), 5*time.Second)
			return err
		})
		dialed <- result{d, err}
		<-done // the control connection stays up meanwhile
	}()
	var ctl net.Conn
	if err := topo.Client.Do(func() (err error) {
		ctl, err = net.DialTimeout("tcp6", ctrl.String(), 5*time.Second)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer ctl.Close()
	// The helper reads a command only after a line's end in its
	// direction (find_nl_seq): a first line, its answer, then EPRT.
	ctl.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(ctl, "USER anonymous\r\n")
	if line, err := bufio.NewReader(ctl).ReadString('\n'); err != nil || !strings.HasPrefix(line, "331") {
		t.Fatalf("control: %q %v", line, err)
	}
	fmt.Fprintf(ctl, "EPRT |2|%s|%d|\r\n", data.Addr(), data.Port())
	accepted := make(chan result, 1)
	go func() { c, err := dataLn.Accept(); accepted <- result{c, err} }()
	r := <-dialed
	if r.err != nil {
		t.Fatalf("the remote's data connection to %v: %v (the helper's expectation is what lets it through)", data, r.err)
	}
	defer r.c.Close()
	a := <-accepted
	if a.err != nil {
		t.Fatal(a.err)
	}
	defer a.c.Close()

	// The host's conntrack holds the data flow, marked expected.
	h, err := topo.Host.Handle()
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	var status uint32
	found := false
	if _, err := ctnl.Scan(int(h), unix.AF_INET6, 0, 0, func(f *ctnl.Flow) bool {
		if f.Orig.Dst == data.Addr() && f.Orig.Dport == data.Port() {
			status, found = f.Status, true
		}
		return false
	}); err != nil {
		t.Fatal(err)
	}
	if !found || status&ctnl.IPSExpected == 0 {
		t.Fatalf("the data flow to %v: found %v, status %#x; want IPS_EXPECTED", data, found, status)
	}

	unmarkChecked(t, topo.Host, "recheck6") // else the start does not ask
	p := pinhole.Pinhole{Protocol: tcp, InternalAddr: topo.ClientV6, InternalPort: 80}
	if !newBackend(t, topo.Host, pinhole.Config{}).CutsFlows(p) {
		t.Error("a start with a helper's expected flow into the client: CutsFlows = false; want true (no admission rule let it in)")
	}
}
