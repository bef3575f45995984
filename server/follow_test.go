package server

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"
	"unsafe"

	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"go.uber.org/zap/zaptest"
	"golang.org/x/sys/unix"

	"github.com/pcpd/pcpd/internal/netlab"
)

// followNever bounds a wait that should end: a hang, not a slow machine.
// It is no latency bound.
const followNever = 10 * time.Second

// stacks returns the stacks of every goroutine whose stack mentions match.
func stacks(match string) []string {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			buf = buf[:n]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	var out []string
	for _, g := range strings.Split(string(buf), "\n\n") {
		if strings.Contains(g, match) {
			out = append(out, g)
		}
	}
	return out
}

// TestSubscriptionFollowsChanges: with the pass an hour apart, only the
// subscription can bring each change, and it brings every class the
// listener follows: IPv6 and IPv4 addresses added and removed, and a link
// going down and up with no address change (pcp1 has IPv4 only, whose
// address stays on a downed link). run leaves no goroutine behind.
func TestSubscriptionFollowsChanges(t *testing.T) {
	netlab.RequireRoot(t)
	srv := netlab.NewNS(t, "follow")
	srv.MustRun(t, "ip", "link", "add", "pcp0", "type", "veth", "peer", "name", "pcp0p")
	srv.MustRun(t, "ip", "link", "add", "pcp1", "type", "veth", "peer", "name", "pcp1p")
	srv.MustRun(t, "sysctl", "-qw", "net.ipv6.conf.pcp1.disable_ipv6=1")
	srv.MustRun(t, "ip", "addr", "add", "192.0.2.1/24", "dev", "pcp1")
	for _, d := range []string{"pcp0", "pcp0p", "pcp1", "pcp1p"} {
		srv.MustRun(t, "ip", "link", "set", d, "up")
	}
	h, _ := nsHandles(t, srv)
	l := &listener{log: zaptest.NewLogger(t), ifaces: []string{"pcp0", "pcp1"}, port: Port, ns: h,
		out: make(chan packet, 1), pass: time.Hour}
	stop := runListener(t, l)
	serving := func(a netip.Addr) bool {
		for _, ap := range l.addrs() {
			if ap.Addr() == a {
				return true
			}
		}
		return false
	}
	other := netip.MustParseAddr("192.0.2.1")
	if err := netlab.Eventually(followNever, func() error {
		if !serving(other) {
			return fmt.Errorf("not serving %v: %v", other, l.addrs())
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if gs := stacks("server.(*listener).follow("); len(gs) != 1 {
		t.Fatalf("%d subscription readers, want 1", len(gs))
	}
	v6 := netip.MustParseAddr("2001:db8:c0::7")
	v4 := netip.MustParseAddr("198.51.100.1")
	for _, step := range []struct {
		name   string
		do     []string
		served netip.Addr
		want   bool
	}{
		{"IPv6 address added", []string{"ip", "addr", "add", v6.String() + "/64", "dev", "pcp0", "nodad"}, v6, true},
		{"IPv6 address removed", []string{"ip", "addr", "del", v6.String() + "/64", "dev", "pcp0"}, v6, false},
		{"IPv4 address added", []string{"ip", "addr", "add", v4.String() + "/24", "dev", "pcp0"}, v4, true},
		{"IPv4 address removed", []string{"ip", "addr", "del", v4.String() + "/24", "dev", "pcp0"}, v4, false},
		{"link down", []string{"ip", "link", "set", "pcp1", "down"}, other, false},
		{"link up", []string{"ip", "link", "set", "pcp1", "up"}, other, true},
	} {
		srv.MustRun(t, step.do...)
		if err := netlab.Eventually(5*time.Second, func() error {
			if got := serving(step.served); got != step.want {
				return fmt.Errorf("serving %v: %v, want %v (serving %v)", step.served, got, step.want, l.addrs())
			}
			return nil
		}); err != nil {
			t.Fatalf("%s: %v", step.name, err)
		}
	}
	stop()
	if gs := stacks("server.(*listener)"); len(gs) > 0 {
		t.Fatalf("listener goroutines left after run returned:\n%s", strings.Join(gs, "\n\n"))
	}
}

// followBed is a subscription in a fresh namespace with an interface
// pcp0, and follow reading it into pokes once start is called.
type followBed struct {
	ns    *netlab.NS
	sock  *nl.NetlinkSocket
	pid   uint32
	pokes chan struct{}
}

func newFollowBed(t *testing.T, role string) *followBed {
	t.Helper()
	netlab.RequireRoot(t)
	ns := netlab.NewNS(t, role)
	ns.MustRun(t, "ip", "link", "add", "pcp0", "type", "veth", "peer", "name", "pcp0p")
	ns.MustRun(t, "ip", "link", "set", "pcp0", "up")
	h, _ := nsHandles(t, ns)
	sock, err := nl.SubscribeAt(h, netns.None(), unix.NETLINK_ROUTE, unix.RTNLGRP_LINK, unix.RTNLGRP_IPV4_IFADDR, unix.RTNLGRP_IPV6_IFADDR)
	if err != nil {
		t.Fatal(err)
	}
	pid, err := sock.GetPid()
	if err != nil {
		sock.Close()
		t.Fatal(err)
	}
	return &followBed{ns: ns, sock: sock, pid: pid, pokes: make(chan struct{}, 1000)}
}

// start runs follow as run does, and stops it (done, then the socket) with
// the test; the test fails if follow does not return then.
func (b *followBed) start(t *testing.T) {
	l := &listener{log: zaptest.NewLogger(t)}
	done, ended := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(ended)
		l.follow(b.sock, done, func() { b.pokes <- struct{}{} })
	}()
	t.Cleanup(func() {
		close(done)
		b.sock.Close()
		select {
		case <-ended:
		case <-time.After(followNever):
			t.Error("follow did not return after its socket closed")
		}
	})
}

// procNetlink reads column col (4 Rmem, 8 Drops) of the subscription's
// row of /proc/net/netlink in its namespace.
func (b *followBed) procNetlink(t *testing.T, col int) int {
	t.Helper()
	for _, line := range strings.Split(b.ns.MustRun(t, "cat", "/proc/net/netlink"), "\n")[1:] {
		f := strings.Fields(line)
		// sk Eth Pid Groups Rmem Wmem Dump Locks Drops Inode
		if len(f) >= 10 && f[2] == strconv.FormatUint(uint64(b.pid), 10) {
			n, err := strconv.Atoi(f[col])
			if err != nil {
				t.Fatal(err)
			}
			return n
		}
	}
	t.Fatalf("socket %d not in /proc/net/netlink", b.pid)
	return 0
}

// quiet waits for a poke, then for a moment without one.
func (b *followBed) quiet(t *testing.T, what string) {
	t.Helper()
	select {
	case <-b.pokes:
	case <-time.After(followNever):
		t.Fatalf("%s: no poke", what)
	}
	for {
		select {
		case <-b.pokes:
			continue
		case <-time.After(200 * time.Millisecond):
		}
		return
	}
}

// sendAsUser sends msgs to the subscription from a user socket in its
// namespace, as any process there may (its port id is public).
func (b *followBed) sendAsUser(t *testing.T, msgs [][]byte) {
	t.Helper()
	if err := b.ns.Do(func() error {
		fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_ROUTE)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		for _, m := range msgs {
			if err := unix.Sendto(fd, m, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK, Pid: b.pid}); err != nil {
				return fmt.Errorf("sendto port %d: %w", b.pid, err)
			}
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
}

// pokesWhenRead waits until follow has read everything queued, then
// counts its pokes (it pokes right after each Receive).
func (b *followBed) pokesWhenRead(t *testing.T) int {
	t.Helper()
	if err := netlab.Eventually(followNever, func() error {
		if r := b.procNetlink(t, 4); r != 0 {
			return fmt.Errorf("%d bytes still queued (%d pokes so far)", r, len(b.pokes))
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond)
	return len(b.pokes)
}

// TestFollowOverrun: an address storm overruns the subscription (the
// kernel drops notifications and fails the next receive with ENOBUFS).
// netlink's Addr- and LinkSubscribe, which pcpd used before, ended their
// goroutine at that error, and pcpd then followed changes only at its
// pass; follow pokes (the pass makes the loss good) and sees the next
// change.
func TestFollowOverrun(t *testing.T) {
	b := newFollowBed(t, "followovr")
	// The smallest buffer, and nobody reading yet: 200 addresses'
	// notifications overrun it.
	if err := b.sock.SetReceiveBufferSize(0, false); err != nil {
		t.Fatal(err)
	}
	var batch strings.Builder
	for i := range 200 {
		fmt.Fprintf(&batch, "addr add 2001:db8:d::%x/128 dev pcp0 nodad\n", i+1)
	}
	f := t.TempDir() + "/batch"
	if err := os.WriteFile(f, []byte(batch.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	b.ns.MustRun(t, "ip", "-batch", f)
	// The kernel sends an IPv6 address's RTM_NEWADDR from its addrconf
	// work (DAD, run even for nodad), not from the request: ip returns
	// before the notifications are sent, and on a loaded box none had
	// come when the drops were read at once (3 in 200 runs: 0 drops, 198
	// half a second later).
	drops := 0
	if err := netlab.Eventually(followNever, func() error {
		if drops = b.procNetlink(t, 8); drops == 0 {
			return fmt.Errorf("no overrun: 0 drops on the subscription")
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	t.Logf("%d notifications dropped", drops)
	b.start(t)
	b.quiet(t, "overrun")
	b.ns.MustRun(t, "ip", "addr", "add", "2001:db8:d::ffff/128", "dev", "pcp0", "nodad")
	b.quiet(t, "a change after the overrun")
}

// TestFollowIgnoresUserMessages: only the kernel's notifications ask for
// a pass. Any process in the namespace may send to the subscription's
// port id (it is in /proc/net/netlink); each such message would make the
// listener dump every link and address. Well-formed ones name their
// sender, and netlink's subscriptions skipped them, as follow does;
// malformed ones (too short for a header, or a header claiming more than
// was sent) fail Receive before it names the sender, and before the fix
// each poked a pass and held follow a second (40 of them held a real
// change 40 s). Either way, the messages and then one real change give
// the change's pokes only.
func TestFollowIgnoresUserMessages(t *testing.T) {
	wellFormed := make([]byte, unix.SizeofNlMsghdr+unix.SizeofIfInfomsg)
	*(*unix.NlMsghdr)(unsafe.Pointer(&wellFormed[0])) = unix.NlMsghdr{Len: uint32(len(wellFormed)), Type: unix.RTM_NEWLINK, Seq: 1}
	long := make([]byte, unix.SizeofNlMsghdr)
	*(*unix.NlMsghdr)(unsafe.Pointer(&long[0])) = unix.NlMsghdr{Len: 4096, Type: unix.RTM_NEWLINK}
	short := []byte{1, 2, 3, 4}
	for _, tc := range []struct {
		name string
		msgs [][]byte // sent in turn, n times over
		n    int
	}{
		{"well-formed", [][]byte{wellFormed}, 50},
		{"malformed", [][]byte{short, long}, 20},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := newFollowBed(t, "followusr")
			var msgs [][]byte
			for range tc.n {
				msgs = append(msgs, tc.msgs...)
			}
			b.sendAsUser(t, msgs)
			// The real change, queued behind them. Its notification
			// comes from the kernel's addrconf work after ip returns
			// (see TestFollowOverrun): wait until it is queued, or
			// pokesWhenRead may count before it came.
			queued := b.procNetlink(t, 4)
			b.ns.MustRun(t, "ip", "addr", "add", "2001:db8:e::1/128", "dev", "pcp0", "nodad")
			if err := netlab.Eventually(followNever, func() error {
				if r := b.procNetlink(t, 4); r <= queued {
					return fmt.Errorf("address notification not queued: %d bytes, %d before", r, queued)
				}
				return nil
			}); err != nil {
				t.Fatal(err)
			}
			b.start(t)
			if n := b.pokesWhenRead(t); n < 1 || n > 5 {
				t.Fatalf("%d pokes for %d user messages and one address added, want 1-5 (the kernel's)", n, len(msgs))
			}
		})
	}
}

// TestFollowStartStopCycles: run started and cancelled 40 times, half of
// them while a notification storm is being read, leaves no listener
// goroutine and no file descriptor behind, and each cancel returns.
func TestFollowStartStopCycles(t *testing.T) {
	netlab.RequireRoot(t)
	srv := netlab.NewNS(t, "followcyc")
	srv.MustRun(t, "ip", "link", "add", "pcp0", "type", "veth", "peer", "name", "pcp0p")
	srv.MustRun(t, "ip", "link", "set", "pcp0", "up")
	h, _ := nsHandles(t, srv)
	fds := func() int {
		es, err := os.ReadDir("/proc/self/fd")
		if err != nil {
			t.Fatal(err)
		}
		return len(es)
	}
	before := fds()
	for i := range 40 {
		l := &listener{log: zaptest.NewLogger(t), ifaces: []string{"pcp0"}, port: Port, ns: h,
			out: make(chan packet, 1), pass: time.Hour}
		ctx, cancel := context.WithCancel(context.Background())
		errc := make(chan error, 1)
		go func() { errc <- l.run(ctx) }()
		if i%2 == 1 {
			srv.MustRun(t, "ip", "addr", "add", fmt.Sprintf("2001:db8:9::%x/128", i), "dev", "pcp0", "nodad")
		}
		cancel()
		select {
		case err := <-errc:
			if err != nil {
				t.Fatalf("cycle %d: run: %v", i, err)
			}
		case <-time.After(followNever):
			t.Fatalf("cycle %d: run did not return after cancel:\n%s", i, strings.Join(stacks("server.(*listener)"), "\n\n"))
		}
	}
	if gs := stacks("server.(*listener)"); len(gs) > 0 {
		t.Fatalf("listener goroutines left after 40 cycles:\n%s", strings.Join(gs, "\n\n"))
	}
	if after := fds(); after > before {
		t.Errorf("%d file descriptors open after 40 cycles, %d before", after, before)
	}
}

// runListener runs l until the returned stop is called (at the end of t
// at the latest), which wants run to return nil soon after.
func runListener(t *testing.T, l *listener) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- l.run(ctx) }()
	stopped := false
	stop = func() {
		if stopped {
			return
		}
		stopped = true
		cancel()
		select {
		case err := <-errc:
			if err != nil {
				t.Errorf("run: %v", err)
			}
		case <-time.After(followNever):
			t.Errorf("run did not return after cancel:\n%s", strings.Join(stacks("server.(*listener)"), "\n\n"))
		}
	}
	t.Cleanup(stop)
	return stop
}
