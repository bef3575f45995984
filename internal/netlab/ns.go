// Package netlab builds throwaway network namespaces, veth links and
// userspace WireGuard tunnels for pcpd's integration tests and its lab.
//
// Everything it creates carries a random name, is reachable only from inside
// the namespaces it made, and is removed by Close (tests register Close with
// t.Cleanup, so it runs on failure too). It drives topology set-up through
// iproute2 (`ip`): this is test and lab scaffolding, never product code.
package netlab

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/vishvananda/netns"
)

// RequireRoot skips the test when it cannot create namespaces.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("netlab: needs root (network namespaces, nftables); run the suite as root, as CI does")
	}
}

// Rand returns n random hex characters, for names unique across parallel runs.
func Rand(n int) string {
	b := make([]byte, (n+1)/2)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return hex.EncodeToString(b)[:n]
}

// UniqueIfName returns an interface name that is unique on the machine
// (at most 15 characters, the kernel's limit). WireGuard userspace control
// sockets live in /var/run/wireguard for every namespace, so WireGuard
// interfaces need machine-wide unique names.
func UniqueIfName(prefix string) string {
	if len(prefix) > 7 {
		prefix = prefix[:7]
	}
	return prefix + Rand(15-len(prefix))
}

// NS is a named network namespace (visible as /var/run/netns/NAME).
type NS struct {
	Name string

	mu     sync.Mutex
	procs  []*exec.Cmd
	closed bool
}

// New creates a namespace whose name contains role, with loopback up and
// IPv6 duplicate address detection off (so addresses are usable at once).
// Its name begins with $PCPD_NETNS_PREFIX when that is set (one run's
// namespaces told from another's on a shared machine), else "pcpdt-".
func New(role string) (*NS, error) {
	prefix := "pcpdt-"
	if p := os.Getenv("PCPD_NETNS_PREFIX"); p != "" {
		prefix = p
	}
	name := prefix + Rand(6) + "-" + role
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("netlab: ip netns add %s: %v: %s", name, err, bytes.TrimSpace(out))
	}
	n := &NS{Name: name}
	for _, args := range [][]string{
		{"ip", "link", "set", "lo", "up"},
		{"sh", "-c", "echo 0 > /proc/sys/net/ipv6/conf/all/accept_dad; echo 0 > /proc/sys/net/ipv6/conf/default/accept_dad"},
	} {
		if _, err := n.Run(args...); err != nil {
			n.Close()
			return nil, err
		}
	}
	return n, nil
}

// NewNS is New for tests: it skips without root, fails the test on error and
// removes the namespace when the test ends.
func NewNS(t testing.TB, role string) *NS {
	t.Helper()
	RequireRoot(t)
	n, err := New(role)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Close() })
	return n
}

// Run runs a command inside the namespace and returns its combined output.
//
// The command is forked from a thread switched into the namespace (Do), so
// it starts there: `ip netns exec` each time cost 35-75 ms on a busy 2-core
// box against 7-11 ms, and the suites run thousands (every `ip`, `nft` and
// `sh -c` of a test bed). What it adds beyond the network namespace, a
// mount namespace with /sys remounted for the namespace, only matters to a
// command that reads /sys (/sys/class/net/...): those still go through
// `ip netns exec`.
func (n *NS) Run(args ...string) (string, error) {
	var out []byte
	var err error
	if needsSysfs(args) {
		out, err = exec.Command("ip", append([]string{"netns", "exec", n.Name}, args...)...).CombinedOutput()
	} else if derr := n.Do(func() error {
		out, err = exec.Command(args[0], args[1:]...).CombinedOutput()
		return nil
	}); derr != nil {
		err = derr
	}
	if err != nil {
		return string(out), fmt.Errorf("netlab: in %s: %s: %v: %s", n.Name, strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return string(out), nil
}

// needsSysfs reports whether a command names a path under /sys, which
// shows the namespace's interfaces only in `ip netns exec`'s remount
// (/proc/sys/net is the caller's network namespace's either way).
func needsSysfs(args []string) bool {
	for _, a := range args {
		for i := strings.Index(a, "/sys/"); i >= 0; {
			if i < len("/proc") || a[i-len("/proc"):i] != "/proc" {
				return true
			}
			j := strings.Index(a[i+1:], "/sys/")
			if j < 0 {
				break
			}
			i += 1 + j
		}
	}
	return false
}

// MustRun is Run that fails the test on error.
func (n *NS) MustRun(t testing.TB, args ...string) string {
	t.Helper()
	out, err := n.Run(args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// Start starts a long-running command inside the namespace. Its output goes
// to the returned command's Stdout/Stderr if the caller set them via
// configure (may be nil). Close stops it.
func (n *NS) Start(configure func(*exec.Cmd), args ...string) (*exec.Cmd, error) {
	cmd := exec.Command("ip", append([]string{"netns", "exec", n.Name}, args...)...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if configure != nil {
		configure(cmd)
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closed {
		return nil, errors.New("netlab: namespace closed")
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("netlab: in %s: start %s: %w", n.Name, strings.Join(args, " "), err)
	}
	n.procs = append(n.procs, cmd)
	return cmd, nil
}

// Do runs fn on an OS thread switched into the namespace. Sockets created
// inside fn stay in the namespace after Do returns, so a test can open a
// listener or dial from "inside" a host without leaving Go.
func (n *NS) Do(fn func() error) error {
	target, err := netns.GetFromName(n.Name)
	if err != nil {
		return fmt.Errorf("netlab: open netns %s: %w", n.Name, err)
	}
	defer target.Close()
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		defer orig.Close()
		if err := netns.Set(target); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("netlab: setns %s: %w", n.Name, err)
			return
		}
		ferr := fn()
		if err := netns.Set(orig); err != nil {
			// Leave the thread locked: the runtime then discards it
			// instead of reusing a thread stuck in the wrong namespace.
			errc <- errors.Join(ferr, fmt.Errorf("netlab: restore netns: %w", err))
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// Handle opens the namespace; the caller closes it.
func (n *NS) Handle() (netns.NsHandle, error) {
	return netns.GetFromName(n.Name)
}

// NftConn returns an nftables connection aimed at this namespace.
func (n *NS) NftConn() (*nftables.Conn, error) {
	h, err := n.Handle()
	if err != nil {
		return nil, fmt.Errorf("netlab: open netns %s: %w", n.Name, err)
	}
	// nftables dups nothing: the fd must stay open for the Conn's life, so it
	// is deliberately not closed here (namespaces are few and short-lived).
	return nftables.New(nftables.WithNetNSFd(int(h)))
}

// LastingNftConn is an nftables connection aimed at this namespace on one
// lasting netlink socket (as a daemon holds it); the connection and the
// namespace's handle, which it returns too, are closed at the end of tb.
func (n *NS) LastingNftConn(tb testing.TB) (*nftables.Conn, netns.NsHandle) {
	tb.Helper()
	h, err := n.Handle()
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { h.Close() })
	conn, err := nftables.New(nftables.WithNetNSFd(int(h)), nftables.AsLasting())
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { conn.CloseLasting() })
	return conn, h
}

// Close stops the processes started in the namespace and deletes it.
func (n *NS) Close() error {
	n.mu.Lock()
	procs := n.procs
	n.procs = nil
	n.closed = true
	n.mu.Unlock()
	for _, p := range procs {
		if p.Process != nil {
			syscall.Kill(-p.Process.Pid, syscall.SIGTERM)
		}
	}
	for _, p := range procs {
		done := make(chan struct{})
		go func() { p.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(2 * time.Second):
			syscall.Kill(-p.Process.Pid, syscall.SIGKILL)
			<-done
		}
	}
	out, err := exec.Command("ip", "netns", "del", n.Name).CombinedOutput()
	if err != nil && !bytes.Contains(out, []byte("No such file")) {
		return fmt.Errorf("netlab: ip netns del %s: %v: %s", n.Name, err, bytes.TrimSpace(out))
	}
	return nil
}

// Veth links namespace a (interface aIf) with namespace b (interface bIf)
// and sets both ends up. The pair is created under random names in the
// current namespace and then moved, so names never collide with other runs.
func Veth(a *NS, aIf string, b *NS, bIf string) error {
	ta, tb := "vl"+Rand(10), "vl"+Rand(10)
	steps := [][]string{
		{"ip", "link", "add", ta, "type", "veth", "peer", "name", tb},
		{"ip", "link", "set", ta, "netns", a.Name},
		{"ip", "link", "set", tb, "netns", b.Name},
		{"ip", "-n", a.Name, "link", "set", ta, "name", aIf},
		{"ip", "-n", b.Name, "link", "set", tb, "name", bIf},
		{"ip", "-n", a.Name, "link", "set", aIf, "up"},
		{"ip", "-n", b.Name, "link", "set", bIf, "up"},
	}
	for _, s := range steps {
		if out, err := exec.Command(s[0], s[1:]...).CombinedOutput(); err != nil {
			exec.Command("ip", "link", "del", ta).Run()
			return fmt.Errorf("netlab: %s: %v: %s", strings.Join(s, " "), err, bytes.TrimSpace(out))
		}
	}
	return nil
}

// WaitLocal waits until each of addrs has its local route in the
// namespace, as a test that just added an address must before the address
// receives: the kernel delivers to an address only once its local route
// is in, and for IPv6 that route is added by the kernel's addrconf work
// after `ip addr add` returns (nodad too). Until then a datagram or SYN to
// it is dropped (Ip6InAddrErrors); on a loaded box the work ran late
// enough that a test's first SYN to an address it had just added was lost,
// and the retransmission came after the dial's timeout. IPv4 addresses
// have their local route when ip returns; they pass at once.
func (n *NS) WaitLocal(t testing.TB, addrs ...netip.Addr) {
	t.Helper()
	if err := n.waitLocal(10*time.Second, addrs...); err != nil {
		t.Fatal(err)
	}
}

func (n *NS) waitLocal(timeout time.Duration, addrs ...netip.Addr) error {
	for _, a := range addrs {
		fam := "-4"
		if a.Is6() {
			fam = "-6"
		}
		if err := Eventually(timeout, func() error {
			out, err := n.Run("ip", fam, "route", "show", "table", "local", a.String())
			if err != nil {
				return err
			}
			if strings.TrimSpace(out) == "" {
				return fmt.Errorf("netlab: %s has no local route in %s after %v", a, n.Name, timeout)
			}
			return nil
		}); err != nil {
			return err
		}
	}
	return nil
}
