package reliability

import (
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pcp"
)

// TestRestartUnownedWindow (h/hunt6's figure, h/restore9's assertion;
// issue 9, "no pinhole for an address its client does not own"): the
// client's device is swapped while pcpd is down (old peer removed, a new
// key with the same AllowedIPs) and the host reboots (pcpd's table gone).
// The start must not put the old peer's pinholes into the kernel at all:
// `nft monitor`, listening from before pcpd starts, must see no element of
// the old peer's (pin6, napt4), and the new peer's service must take no
// connection from the internet through the old peer's NAT-PMP mapping
// (its external IPv4 port: reachable only through that DNAT) while pcpd
// starts; afterwards, neither address is reachable, the leases are gone,
// revoked as the sweep revokes them (log line, cause="ownership").
//
// On main (9c5b3e1) the start restored both leases into the kernel and
// the first sweep, once serving, deleted them 13-49 ms later: the monitor
// saw their add lines.
func TestRestartUnownedWindow(t *testing.T) {
	l := newLab(t, labOptions{wireGuard: true})
	l.start()
	cli6, cli4 := l.topo.ClientV6, l.topo.ClientV4
	l.mustMap(l.pcpClient(cli6), cli6, pcp.ProtoTCP, servicePort, time.Hour)
	ext := l.mustPMP(l.pcpClient(cli4), pcp.PMPOpMapTCP, servicePort, time.Hour)
	l.stop()
	l.swapDevice()
	l.topo.Host.MustRun(t, "nft", "delete", "table", "inet", "pcpd")
	// The new device's tunnel up (the host learns its endpoint), so that
	// a connection through a pinhole would reach it.
	for _, a := range []netip.Addr{l.topo.HostTunnelV6, l.topo.HostTunnelV4} {
		l.topo.Client.Run("ping", "-c", "2", "-W", "1", a.String())
	}
	var accepted atomic.Int64
	var reached sync.Map // the addresses the new peer's service took a connection on
	for _, a := range []netip.Addr{cli6, cli4} {
		ln, err := l.topo.Client.ListenTCP(netip.AddrPortFrom(a, servicePort).String())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ln.Close() })
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				accepted.Add(1)
				reached.Store(c.LocalAddr().String()+" from "+c.RemoteAddr().String(), true)
				c.Close()
			}
		}()
	}
	if err := l.topo.Internet.DialTCP(ext.String(), 300*time.Millisecond); err == nil {
		t.Fatalf("control: %v reaches the client with pcpd down and its table gone", ext)
	}

	out, err := os.Create(filepath.Join(t.TempDir(), "monitor"))
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	mon, err := l.topo.Host.Start(func(c *exec.Cmd) { c.Stdout = out },
		"sh", "-c", `nft monitor elements | while IFS= read -r ln; do echo "$(date +%s.%N) $ln"; done`)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Kill(-mon.Process.Pid, syscall.SIGKILL); mon.Wait() })
	time.Sleep(300 * time.Millisecond) // the monitor listening
	stop := make(chan struct{})
	probed := make(chan int, 1)
	go func() { probed <- synProbes(t, l.topo.Internet, ext, 2*time.Millisecond, stop) }()
	time.Sleep(50 * time.Millisecond)
	l.start()
	took, ok := waitFor(5*time.Second, func() bool {
		return !l.kernelHas(cli6, pcp.ProtoTCP, servicePort) && !l.kernelHas(cli4, pcp.ProtoTCP, servicePort) && len(l.leases()) == 0
	})
	time.Sleep(200 * time.Millisecond) // the monitor's last lines, the probes' last answers
	close(stop)
	n := <-probed
	if !ok {
		t.Fatalf("the old peer's pinholes or leases are still there 5 s after the start: kernel IPv6 %v, NAT-PMP %v; leases %v",
			l.kernelHas(cli6, pcp.ProtoTCP, servicePort), l.kernelHas(cli4, pcp.ProtoTCP, servicePort), l.leases())
	}
	seen, err := os.ReadFile(out.Name())
	if err != nil {
		t.Fatal(err)
	}
	added := installsOf(string(seen), []string{"pin6", "napt4"}, cli6, cli4)
	var through []string
	reached.Range(func(k, _ any) bool { through = append(through, k.(string)); return true })
	if len(added) > 0 || len(through) > 0 {
		t.Errorf("the start put the old peer's pinholes into the kernel (nft monitor, stamped as read):\n%s\nthe new peer's service took %d connection(s) from the internet (%d SYN probes of %v every 2 ms): %v",
			strings.Join(added, "\n"), accepted.Load(), n, ext, through)
	}
	for _, a := range []netip.AddrPort{netip.AddrPortFrom(cli6, servicePort), ext} {
		if l.topo.Internet.DialTCP(a.String(), time.Second) == nil {
			t.Errorf("after the start, a connection from the internet to %v reached the new peer, which holds no lease", a)
		}
	}
	if log := l.log.since(0); strings.Count(log, "revoked: address no longer owned by the client") < 2 {
		t.Errorf("the two revocations not logged as the sweep logs them:\n%s", l.log.tail(20))
	}
	if m, err := l.metrics(); err != nil {
		t.Error(err)
	} else if v := m[`pcpd_revocations_total{cause="ownership"}`]; v != 2 {
		t.Errorf(`pcpd_revocations_total{cause="ownership"} = %v, want 2`, v)
	}
	t.Logf("old-peer elements installed: %d (%d monitor lines in all); %d SYN probes of %v, %d reached the new peer; leases gone %v after pcpd answered",
		len(added), strings.Count(string(seen), "\n"), n, ext, accepted.Load(), took.Round(time.Millisecond))
}

// installsOf lists the elements of sets that nft monitor's output mon
// (`nft monitor elements`) shows added for any of addrs, but for a
// Delete's guard: pinhole.Backend deletes an element by adding it with a
// 1 s timeout and deleting it in the same transaction (an element
// already gone does not fail the batch), which never lets a packet see it.
func installsOf(mon string, sets []string, addrs ...netip.Addr) []string {
	var out []string
	for _, ln := range strings.Split(mon, "\n") {
		i := strings.Index(ln, "add element ")
		open, end := strings.IndexByte(ln, '{'), strings.LastIndexByte(ln, '}')
		if i < 0 || open < i || end < open {
			continue
		}
		f := strings.Fields(ln[i:open]) // add element FAMILY TABLE SET
		if len(f) < 5 || !slices.Contains(sets, f[4]) {
			continue
		}
		for _, e := range strings.Split(ln[open+1:end], ",") {
			e = strings.TrimSpace(e)
			ours := false
			for _, a := range addrs {
				ours = ours || strings.Contains(e, a.String())
			}
			if ours && !strings.Contains(e+" ", "timeout 1s ") {
				out = append(out, ln[:i]+f[4]+" "+e)
			}
		}
	}
	return out
}

// synProbes sends, from ns, a TCP SYN to to every every (a non-blocking
// connect on a socket of its own, left to finish by itself) until stop is
// closed, then closes the sockets; it returns how many it sent. A probe
// whose SYN meets a pinhole is answered, its connection completed by the
// kernel and accepted by the listener behind it.
func synProbes(t *testing.T, ns *netlab.NS, to netip.AddrPort, every time.Duration, stop <-chan struct{}) int {
	var fds []int
	sa := &syscall.SockaddrInet4{Port: int(to.Port()), Addr: to.Addr().As4()}
	err := ns.Do(func() error {
		for {
			select {
			case <-stop:
				return nil
			default:
			}
			fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM|syscall.SOCK_NONBLOCK|syscall.SOCK_CLOEXEC, 0)
			if err != nil {
				return err
			}
			fds = append(fds, fd)
			if err := syscall.Connect(fd, sa); err != nil && err != syscall.EINPROGRESS {
				return err
			}
			time.Sleep(every)
		}
	})
	for _, fd := range fds {
		syscall.Close(fd)
	}
	if err != nil {
		t.Errorf("SYN probes of %v: %v", to, err)
	}
	return len(fds)
}

// TestInstallsOf: a Delete's guard (timeout 1s) is no install; an element
// of another address or set is not listed; one of several elements is.
func TestInstallsOf(t *testing.T) {
	a6, a4 := netip.MustParseAddr("2001:db8:1:2::10"), netip.MustParseAddr("10.0.0.2")
	for _, tc := range []struct {
		line string
		want int
	}{
		{"1.5 add element inet pcpd pin6 { tcp . 2001:db8:1:2::10 . 8080 timeout 1s }", 0},
		{"1.5 add element inet pcpd pin6 { tcp . 2001:db8:1:2::10 . 8080 timeout 59m59s expires 59m59s }", 1},
		{"1.5 delete element inet pcpd pin6 { tcp . 2001:db8:1:2::10 . 8080 }", 0},
		{"1.5 add element inet pcpd napt4 { tcp . 8080 timeout 1h : 10.0.0.2 . 8080 }", 1},
		{"1.5 add element inet pcpd other { tcp . 2001:db8:1:2::10 . 8080 timeout 1h }", 0},
		{"1.5 add element inet pcpd pin6 { tcp . 2001:db8:1:2::11 . 80 timeout 1h, tcp . 2001:db8:1:2::10 . 8080 timeout 1h }", 1},
		{"1.5 add element inet pcpd pin6 { tcp . 2001:db8:1:2::10 . 8080 timeout 1s, tcp . 2001:db8:1:2::10 . 9 timeout 10s }", 1},
	} {
		if got := installsOf(tc.line, []string{"pin6", "napt4"}, a6, a4); len(got) != tc.want {
			t.Errorf("%q: %v, want %d", tc.line, got, tc.want)
		}
	}
}
