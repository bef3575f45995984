package reliability

import (
	"context"
	"crypto/rand"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/pcpd/pcpd/control"
	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/internal/tmpfs"
	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/store"
)

// restoreBound is how long pcpd may take to notice tampering and restore
// its firewall: its check runs every 5 s by default (server.Config.
// TamperInterval, --firewall-check-interval).
const restoreBound = 10 * time.Second

// TestTamperRestore: someone deletes pcpd's nftables table, flushes its
// pinhole set, flushes its forward chain or deletes one element while pcpd
// runs (issue 9 "someone deletes pcpd's nftables table"). Each time pcpd
// must, within restoreBound and without a restart: put the pinhole back in
// the kernel, pass traffic through it again, guard the client's other
// ports again, and say so in its log.
func TestTamperRestore(t *testing.T) {
	// A check every second: each case waits for the next check, four
	// times 5 s (up to 20 s) at the default. What is checked and restored
	// is the same.
	l := newLab(t, labOptions{extra: []string{"--firewall-check-interval", "1s"}})
	l.start()
	cli := l.topo.ClientV6
	l.topo.Client.ServeTCP(t, netip.AddrPortFrom(cli, servicePort).String())
	const closedPort = 8082 // a listening service nobody mapped
	l.topo.Client.ServeTCP(t, netip.AddrPortFrom(cli, closedPort).String())
	l.mustMap(l.pcpClient(cli), cli, pcp.ProtoTCP, servicePort, time.Hour)
	if err := l.dialService(cli, servicePort); err != nil {
		t.Fatal(err)
	}
	if l.dialService(cli, closedPort) == nil {
		t.Fatal("unmapped port reachable before any tampering: the guard does not work")
	}
	pid := l.pid()
	for _, c := range []struct {
		name string
		cmd  string
	}{
		{"delete table", "nft delete table inet pcpd"},
		{"flush pinhole set", "nft flush set inet pcpd pin6"},
		{"flush forward chain", "nft flush chain inet pcpd forward"},
		{"flush guard chain", "nft flush chain inet pcpd guard6"},
	} {
		t.Run(c.name, func(t *testing.T) {
			off := l.log.len()
			l.topo.Host.MustRun(t, "sh", "-c", c.cmd)
			took, ok := waitFor(restoreBound, func() bool {
				fwd, err1 := l.topo.Host.Run("nft", "list", "chain", "inet", "pcpd", "forward")
				guard, err2 := l.topo.Host.Run("nft", "list", "chain", "inet", "pcpd", "guard6")
				if err1 != nil || err2 != nil || !strings.Contains(fwd, "goto guard6") || !strings.Contains(guard, "drop") {
					return false
				}
				es, err := l.fw.List()
				if err != nil {
					return false
				}
				for _, e := range es {
					if e.Pinhole.InternalAddr == cli && e.Pinhole.InternalPort == servicePort {
						return true
					}
				}
				return false
			})
			if !ok {
				t.Fatalf("%s: pinhole and guard not restored after %v", c.name, restoreBound)
			}
			if err := netlab.Eventually(2*time.Second, func() error { return l.dialService(cli, servicePort) }); err != nil {
				t.Fatalf("%s: restored pinhole passes no traffic: %v", c.name, err)
			}
			if l.dialService(cli, closedPort) == nil {
				t.Fatalf("%s: unmapped port reachable after the restore: the guard is not back", c.name)
			}
			if l.pid() != pid || !l.running() {
				t.Fatalf("%s: pcpd restarted or died", c.name)
			}
			logged := l.log.since(off)
			if !strings.Contains(logged, "restoring") && !strings.Contains(logged, "re-installed") {
				t.Fatalf("%s: restore not logged; log since tampering:\n%s", c.name, logged)
			}
			t.Logf("%s: restored %v after tampering (bound %v), logged", c.name, took.Round(10*time.Millisecond), restoreBound)
		})
	}
	// One element deleted by hand: pcpd's check looks at objects, rule
	// counts and sentinel elements, not every pinhole (the full comparison
	// is the hourly audit, server.Config.AuditInterval); the firewall
	// watch (on by default: server/fwwatch.go) puts it back as the kernel
	// tells of the delete, with no renewal. Before it, only the client's
	// next renewal did (or the audit).
	t.Run("delete the element, put back unrenewed", func(t *testing.T) {
		l.topo.Host.MustRun(t, "sh", "-c", fmt.Sprintf("nft delete element inet pcpd pin6 '{ %s . tcp . %d }'", cli, servicePort))
		took, ok := waitFor(restoreBound, func() bool { return l.kernelHas(cli, pcp.ProtoTCP, servicePort) })
		if !ok {
			t.Fatalf("deleted element not back after %v without a renewal", restoreBound)
		}
		if err := netlab.Eventually(2*time.Second, func() error { return l.dialService(cli, servicePort) }); err != nil {
			t.Fatalf("put-back pinhole passes no traffic: %v", err)
		}
		l.mustMap(l.pcpClient(cli), cli, pcp.ProtoTCP, servicePort, time.Hour)
		if !l.kernelHas(cli, pcp.ProtoTCP, servicePort) {
			t.Fatal("renewal answered SUCCESS but the pinhole is not in the kernel")
		}
		t.Logf("delete the element: back after %v with no renewal, traffic passes", took.Round(time.Millisecond))
	})
}

// seedEpoch creates a state directory whose epoch began an hour ago, so a
// continued epoch (≈3600) and a reset one (≈0) cannot be confused.
func seedEpoch(t *testing.T, dir string) {
	t.Helper()
	st, _, err := store.Open(dir, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	if err := st.ResetEpoch(time.Now().Add(-time.Hour)); err != nil {
		t.Fatal(err)
	}
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestCorruptStateANN03: the state file is truncated or damaged between
// runs (issue 9 "state file truncated or corrupted"; PROTOCOL.md ANN-03,
// EPO-03, EPO-04). pcpd must start, and either recover every lease it had
// (then the epoch may continue, ≈3600) or start with a NEW epoch (< 60) and
// an error-level log line saying state was recovered or lost; it must never
// continue the epoch while leases are missing. The kernel must hold no
// pinhole that no listed lease explains.
func TestCorruptStateANN03(t *testing.T) {
	l := newLab(t, labOptions{})
	cli := l.topo.ClientV6
	db := filepath.Join(l.dir, "leases.db")
	const n = 20
	// prepare leaves 20 leases on disk. stopped with SIGTERM, pcpd folds
	// its write-ahead log into leases.db on the way out, so damage to
	// leases.db hits the leases; killed with SIGKILL, they are only in the
	// log (store.LogName.0 / .1) until the next start.
	prepare := func(t *testing.T, kill bool) map[leaseKey]control.Lease {
		l.kill9()
		os.RemoveAll(l.dir)
		seedEpoch(t, l.dir)
		l.start()
		c := l.pcpClient(cli)
		for i := 0; i < n; i++ {
			l.mustMap(c, cli, pcp.ProtoUDP, uint16(2000+i), time.Hour)
		}
		if st := l.status(); st.Epoch < 3590 {
			t.Fatalf("seeded epoch not continued: %d", st.Epoch)
		}
		ls := leaseSet(l.leases())
		if len(ls) != n {
			t.Fatalf("%d leases before the damage, want %d", len(ls), n)
		}
		if kill {
			l.kill9()
		} else {
			l.stop()
		}
		return ls
	}
	logs := []string{filepath.Join(l.dir, store.LogName+".0"), filepath.Join(l.dir, store.LogName+".1")}
	damage := func(path string, at, size int64) func(t *testing.T) {
		return func(t *testing.T) {
			f, err := os.OpenFile(path, os.O_WRONLY, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			if at < 0 {
				fi, _ := f.Stat()
				at = fi.Size() / 2
			}
			b := make([]byte, size)
			rand.Read(b)
			if _, err := f.WriteAt(b, at); err != nil {
				t.Fatal(err)
			}
		}
	}
	truncate := func(path string, half bool) func(t *testing.T) {
		return func(t *testing.T) {
			size := int64(0)
			if half {
				fi, err := os.Stat(path)
				if err != nil {
					t.Fatal(err)
				}
				size = fi.Size() / 2
			}
			if err := os.Truncate(path, size); err != nil {
				t.Fatal(err)
			}
		}
	}
	cases := []struct {
		name    string
		kill    bool // leases only in the log
		corrupt []func(t *testing.T)
	}{
		{"truncated to 0", false, []func(*testing.T){truncate(db, false)}},
		{"truncated to half", false, []func(*testing.T){truncate(db, true)}},
		{"meta pages overwritten", false, []func(*testing.T){damage(db, 0, 8192)}},
		{"middle page overwritten", false, []func(*testing.T){damage(db, -1, 4096)}},
		{"one data byte flipped", false, []func(*testing.T){flipLeaseByte(db, false)}},
		{"file and backup both garbage", false, []func(*testing.T){damage(db, 0, 64<<10), damage(db+".bak", 0, 64<<10)}},
		{"file deleted", false, []func(*testing.T){func(t *testing.T) { os.Remove(db) }}},
		{"after kill -9: file truncated to half", true, []func(*testing.T){truncate(db, true)}},
		{"after kill -9: first logged lease's byte flipped", true, []func(*testing.T){flipLeaseByte(logs[0], true, logs[1])}},
		{"after kill -9: log deleted", true, []func(*testing.T){func(t *testing.T) { os.Remove(logs[0]); os.Remove(logs[1]) }}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			before := prepare(t, c.kill)
			for _, f := range c.corrupt {
				f(t)
			}
			off := l.log.len()
			l.start()
			st := l.status()
			after := leaseSet(l.leases())
			logged := l.log.since(off)
			missing := 0
			for k := range before {
				if _, ok := after[k]; !ok {
					missing++
				}
			}
			switch {
			case st.Epoch >= 3590:
				// Continuity claimed: nothing may be missing.
				if missing > 0 || !st.Restarted {
					t.Fatalf("epoch continued (%d, restarted %v) but %d of %d leases are gone: clients would never re-map", st.Epoch, st.Restarted, missing, n)
				}
				t.Logf("%s: all %d leases recovered, epoch continued (%d)", c.name, n, st.Epoch)
			case st.Epoch < 60:
				if !strings.Contains(logged, "\terror\t") || !strings.Contains(logged, "epoch reset") {
					t.Fatalf("epoch reset without an error-level log line saying so; log:\n%s", logged)
				}
				t.Logf("%s: new epoch %d, %d of %d leases recovered, error logged: %s", c.name, st.Epoch, n-missing, n, firstLine(logged, "\terror\t"))
			default:
				t.Fatalf("epoch %d: neither continued (≈3600) nor reset", st.Epoch)
			}
			// No orphan pinholes: every kernel element belongs to a listed
			// lease (pcpd's start-up audit removes the others in the
			// background; give it 5 s).
			var orphan string
			if _, ok := waitFor(5*time.Second, func() bool {
				orphan = ""
				for _, e := range l.kernel() {
					k := leaseKey{e.Pinhole.InternalAddr, protoName(e.Pinhole.Protocol), e.Pinhole.InternalPort}
					if _, ok := after[k]; !ok {
						orphan = e.Pinhole.String()
					}
				}
				return orphan == ""
			}); !ok {
				t.Fatalf("kernel holds pinhole %s that no lease explains, 5 s after the start", orphan)
			}
		})
	}
}

// flipLeaseByte flips one byte inside a stored lease record (found by the
// client address the records carry) in the first of paths holding one:
// the last such record, or with first the first one. (In the log, damage
// to the very last record can not be told from a write torn by a crash,
// which was never acknowledged; the first record has intact ones after
// it.)
func flipLeaseByte(path string, first bool, more ...string) func(t *testing.T) {
	return func(t *testing.T) {
		needle := netip.MustParseAddr("2001:db8:1:2::10").AsSlice()
		for _, p := range append([]string{path}, more...) {
			b, err := os.ReadFile(p)
			if err != nil {
				continue
			}
			i := strings.LastIndex(string(b), string(needle))
			if first {
				i = strings.Index(string(b), string(needle))
			}
			if i < 0 {
				continue
			}
			b[i+15] ^= 0x01
			if err := os.WriteFile(p, b, 0o600); err != nil {
				t.Fatal(err)
			}
			return
		}
		t.Fatalf("no lease record found in %s %v", path, more)
	}
}

func firstLine(s, sub string) string {
	for _, line := range strings.Split(s, "\n") {
		if strings.Contains(line, sub) {
			return line
		}
	}
	return ""
}

// TestDiskFullNoResources: the state directory's file system fills up while
// pcpd runs (issue 9 "disk full"; choice (g)). MAPs for new leases must get
// NO_RESOURCES with no pinhole in the kernel; any SUCCESS answered meanwhile
// must be durable (listed after kill -9 and restart); once space returns,
// MAP succeeds again without a restart.
func TestDiskFullNoResources(t *testing.T) {
	requireRoot(t)
	mnt := tmpfs.Mount(t, "2m")
	l := newLab(t, labOptions{stateDir: filepath.Join(mnt, "state")})
	l.start()
	cli := l.topo.ClientV6
	c := l.pcpClient(cli)
	for i := 0; i < 5; i++ {
		l.mustMap(c, cli, pcp.ProtoUDP, uint16(2000+i), time.Hour)
	}
	tmpfs.Fill(t, mnt, "fill")

	// Each request from its own source (the flood client's prefix), so the
	// per-source rate limit never hides an answer.
	var ok, refused []leaseKey
	for i := 0; i < 600 && len(refused) < 20; i++ {
		src := floodSrc(uint32(i))
		req := pcp.NewMap(src, pcp.ProtoUDP, 3000, time.Hour)
		resp, err := do(l.pcpClient(src), req)
		if err != nil {
			t.Fatalf("MAP %d on a full disk: %v", i, err)
		}
		k := leaseKey{src, "udp", 3000}
		switch resp.Result {
		case pcp.Success:
			ok = append(ok, k)
		case pcp.NoResources:
			refused = append(refused, k)
			if l.kernelHas(src, pcp.ProtoUDP, 3000) {
				t.Fatalf("NO_RESOURCES for %v but its pinhole is in the kernel", k)
			}
		default:
			t.Fatalf("MAP on a full disk: %v, want NO_RESOURCES or a durable SUCCESS", resp.Result)
		}
	}
	if len(refused) == 0 {
		t.Fatalf("600 MAPs on a full disk all succeeded: the store never hit ENOSPC (test precondition)")
	}
	ls := leaseSet(l.leases())
	for _, k := range refused {
		if _, ok := ls[k]; ok {
			t.Fatalf("NO_RESOURCES for %v but pcpd leases lists it", k)
		}
	}
	t.Logf("full disk: %d MAPs answered SUCCESS before the store ran out, %d NO_RESOURCES", len(ok), len(refused))

	os.Remove(filepath.Join(mnt, "fill"))
	src := refused[0].addr
	var resp *pcp.Response
	took, good := waitFor(5*time.Second, func() bool {
		var err error
		resp, err = do(l.pcpClient(src), pcp.NewMap(src, pcp.ProtoUDP, 3000, time.Hour))
		return err == nil && resp.Result == pcp.Success
	})
	if !good {
		t.Fatalf("space returned but MAP still fails (%v) after 5s", resp)
	}
	ok = append(ok, refused[0])
	if !l.kernelHas(src, pcp.ProtoUDP, 3000) {
		t.Fatal("SUCCESS after space returned but no pinhole in the kernel")
	}
	l.kill9()
	l.start()
	ls = leaseSet(l.leases())
	for _, k := range ok {
		if _, found := ls[k]; !found {
			t.Fatalf("lease %v answered SUCCESS is gone after kill -9 and restart: that SUCCESS was not durable", k)
		}
	}
	if len(ls) != 5+len(ok) {
		t.Fatalf("%d leases after restart, want %d", len(ls), 5+len(ok))
	}
	t.Logf("space returned: SUCCESS again after %v without restart; all %d SUCCESS leases survived kill -9", took.Round(time.Millisecond), 5+len(ok))
}

// TestReadOnlyStateDirNoResources: pcpd starts with a read-only state
// directory (issue 9 "state dir read-only"). It serves its stored leases,
// answers NO_RESOURCES (never SUCCESS) to new MAPs and renewals, installs
// nothing, and once the directory is writable again serves SUCCESS without
// a restart, durably.
func TestReadOnlyStateDirNoResources(t *testing.T) {
	l := newLab(t, labOptions{})
	l.start()
	cli := l.topo.ClientV6
	l.mustMap(l.pcpClient(cli), cli, pcp.ProtoUDP, 2000, time.Hour)
	l.stop()
	if err := syscall.Mount(l.dir, l.dir, "", syscall.MS_BIND, ""); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Unmount(l.dir, syscall.MNT_DETACH) })
	if err := syscall.Mount("", l.dir, "", syscall.MS_REMOUNT|syscall.MS_BIND|syscall.MS_RDONLY, ""); err != nil {
		t.Fatal(err)
	}
	off := l.log.len()
	l.start()
	if !l.kernelHas(cli, pcp.ProtoUDP, 2000) {
		t.Fatal("stored lease not served from a read-only state directory")
	}
	c := l.pcpClient(cli)
	for _, port := range []uint16{2001, 2002, 2000} { // two new, one renewal
		resp, err := do(c, pcp.NewMap(cli, pcp.ProtoUDP, port, 2*time.Hour))
		if err != nil {
			t.Fatal(err)
		}
		if resp.Result != pcp.NoResources {
			t.Fatalf("MAP udp/%d with a read-only state directory: %v, want NO_RESOURCES (a SUCCESS would not be durable)", port, resp.Result)
		}
		if port != 2000 && l.kernelHas(cli, pcp.ProtoUDP, port) {
			t.Fatalf("NO_RESOURCES for udp/%d but its pinhole is in the kernel", port)
		}
	}
	if !strings.Contains(l.log.since(off), "read-only") {
		t.Fatalf("read-only state directory not logged:\n%s", l.log.since(off))
	}
	// pcpd runs in the mount namespace ip netns exec gave it: make the
	// directory writable there.
	if out, err := exec.Command("nsenter", "-t", fmt.Sprint(l.pid()), "-m", "mount", "-o", "remount,bind,rw", l.dir).CombinedOutput(); err != nil {
		t.Fatalf("remount writable in pcpd's mount namespace: %v: %s", err, out)
	}
	var resp *pcp.Response
	took, ok := waitFor(5*time.Second, func() bool {
		var err error
		resp, err = do(c, pcp.NewMap(cli, pcp.ProtoUDP, 2001, time.Hour))
		return err == nil && resp.Result == pcp.Success
	})
	if !ok {
		t.Fatalf("state directory writable again but MAP still answered %v", resp)
	}
	l.kill9()
	syscall.Unmount(l.dir, syscall.MNT_DETACH)
	l.start()
	if _, found := leaseSet(l.leases())[leaseKey{cli, "udp", 2001}]; !found {
		t.Fatal("SUCCESS after the directory became writable was not durable")
	}
	t.Logf("read-only: 3 of 3 MAPs NO_RESOURCES, nothing installed; writable again: SUCCESS after %v without restart, durable", took.Round(time.Millisecond))
}

// TestWireGuardInterfaceGone: the WireGuard interface pcpd serves on is
// deleted and later re-created (issue 9 "the WireGuard interface
// disappears"). pcpd keeps running, serves no address while it is gone
// (and answers nobody on the WAN side meanwhile), and serves again, with
// WireGuard ownership, without a restart once it is back.
func TestWireGuardInterfaceGone(t *testing.T) {
	l := newLab(t, labOptions{wireGuard: true})
	l.start()
	cli := l.topo.ClientV6
	l.topo.Client.ServeTCP(t, netip.AddrPortFrom(cli, servicePort).String())
	l.mustMap(l.pcpClient(cli), cli, pcp.ProtoTCP, servicePort, time.Hour)
	if err := l.dialService(cli, servicePort); err != nil {
		t.Fatal(err)
	}
	pid := l.pid()
	ifc := l.topo.HostLANIf
	l.topo.Host.MustRun(t, "ip", "link", "del", ifc)
	gone := time.Now()

	took, ok := waitFor(5*time.Second, func() bool { return len(l.status().Listen) == 0 })
	if !ok {
		t.Fatalf("interface deleted but pcpd still lists serving addresses: %v", l.status().Listen)
	}
	// Nothing answers from the WAN side either (pcpd must not fall back to
	// other interfaces).
	for _, dst := range []netip.AddrPort{
		netip.AddrPortFrom(l.topo.HostWANV6, pcp.Port),
		netip.AddrPortFrom(l.topo.HostPublicV4, pcp.Port),
	} {
		src := l.topo.InternetV6
		if dst.Addr().Is4() {
			src = l.topo.InternetV4
		}
		conn, err := socketIn(l.topo.Internet, src)
		if err != nil {
			t.Fatal(err)
		}
		req := pcp.AppendRequest(nil, pcp.NewAnnounce(src))
		got, err := rawExchange(conn, dst, req, 500*time.Millisecond)
		conn.Close()
		if err != nil || got != nil {
			t.Fatalf("with %s gone, pcpd answered an ANNOUNCE to %s from the WAN (%x, %v)", ifc, dst, got, err)
		}
	}
	time.Sleep(2 * time.Second) // a few of pcpd's poll and sweep rounds with the interface gone
	if !l.running() || l.pid() != pid {
		t.Fatal("pcpd died when its WireGuard interface disappeared")
	}

	recreateWireGuard(t, l)
	back := time.Now()
	took2, ok := waitFor(15*time.Second, func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
		defer cancel()
		resp, err := l.announce(ctx, cli)
		return err == nil && resp.Result == pcp.Success
	})
	if !ok {
		t.Fatalf("interface back for 15s but pcpd does not answer ANNOUNCE; log:\n%s", l.log.tail(20))
	}
	if l.pid() != pid {
		t.Fatal("pcpd was restarted")
	}
	l.mustMap(l.pcpClient(cli), cli, pcp.ProtoTCP, servicePort+1, time.Hour)
	l.topo.Client.ServeTCP(t, netip.AddrPortFrom(cli, servicePort+1).String())
	if err := netlab.Eventually(3*time.Second, func() error { return l.dialService(cli, servicePort+1) }); err != nil {
		t.Fatalf("MAP after the interface came back passes no traffic: %v", err)
	}
	// Whatever pcpd decided about the lease held while the interface was
	// gone, kernel and lease table must agree.
	ls := leaseSet(l.leases())
	kern := map[leaseKey]bool{}
	for _, e := range l.kernel() {
		kern[leaseKey{e.Pinhole.InternalAddr, protoName(e.Pinhole.Protocol), e.Pinhole.InternalPort}] = true
	}
	for k := range ls {
		if !kern[k] {
			t.Fatalf("lease %v listed but not in the kernel", k)
		}
	}
	for k := range kern {
		if _, ok := ls[k]; !ok {
			t.Fatalf("kernel pinhole %v without a lease", k)
		}
	}
	_, kept := ls[leaseKey{cli, "tcp", servicePort}]
	t.Logf("interface gone: serving stopped after %v, no WAN answers, pcpd alive; back: answering %v after re-creation (outage %v); lease held across the outage kept: %v",
		took.Round(time.Millisecond), took2.Round(time.Millisecond), back.Sub(gone).Round(time.Millisecond), kept)
}

// recreateWireGuard brings the host's WireGuard interface back with the
// same name, keys, peer, addresses and routes netlab gave it.
func recreateWireGuard(t *testing.T, l *lab) {
	t.Helper()
	recreateWireGuardPeer(t, l, l.topo.ClientKey.PublicKey())
	l.waitTunnel()
}

// recreateWireGuardPeer brings the host's WireGuard interface back as
// recreateWireGuard does, but with peer as its one peer (the client's
// AllowedIPs), and does not wait for the tunnel.
func recreateWireGuardPeer(t *testing.T, l *lab, peer wgtypes.Key) {
	t.Helper()
	topo := l.topo
	if err := topo.RecreateHostWireGuard(wgtypes.PeerConfig{
		PublicKey:         peer,
		ReplaceAllowedIPs: true,
		AllowedIPs:        []net.IPNet{ipnet(topo.ClientPrefix6), ipnet(topo.ClientPrefix4)},
	}, topo.HostWGPort); err != nil {
		t.Fatal(err)
	}
}

func ipnet(p netip.Prefix) net.IPNet {
	return net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}
