package reliability

import (
	"bufio"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pcp"
)

// The pinned flood bed (PCPD_FLOOD_PIN=1, RELIABILITY.md "The flood
// bound"): the two CPUs stand for two machines.
//
//   - CPU 0 is the server: pcpd (started on it, so its runtime has one P),
//     and the host namespace's receive path: RPS on the host's veth steers
//     the processing of every datagram from the clients (IP input, the
//     owner meter, the drop) to CPU 0, as a NIC interrupting the server's
//     CPU would. Without it veth does that work on the sending CPU, which
//     flatters the server: that was the earlier experiment's flaw.
//   - CPU 1 is the clients: the test process (the victim) and the flooder,
//     a separate process (this test binary re-executed with flooderEnv
//     set) at SCHED_IDLE, so that the victim, another machine in the
//     issue's terms, is never kept waiting by it; the flooder still has
//     CPU 1 whenever the victim sleeps (> 99 % of the time). RPS on the
//     client's veth keeps the replies' receive processing on CPU 1 too.
//
// An earlier try (removed in dddfded) ran the flooder as a goroutine of
// the test, its thread locked and moved to CPU 1 while the rest of the
// process was moved to CPU 0; 2 of 3 runs crawled or hung. Why it crawls:
// Go (≥ 1.25) follows the process's affinity, so about a second after
// `taskset -a` the test ran with GOMAXPROCS 1, and that one P was held by
// the flooding goroutine spinning in sendmsg on CPU 1; every other
// goroutine (the victim, its timers, the netpoller's wake-ups) ran only
// when the flooder was preempted, every 10 ms. A stand-alone reproduction
// (2026-12-03, RELIABILITY.md) gave timer oversleeps of 11-98 ms and
// loopback round trips of 26-56 ms at GOMAXPROCS 1; with GOMAXPROCS 2
// set explicitly, round trips ≤ 3.6 ms and oversleeps ≤ 2 ms after the
// first second. A separate process shares no Go scheduler
// with the victim.
//
// The control rounds are the same flood, same rate, to a port that a rule
// of the test's own in the host's raw prerouting drops: the kernel's cost
// of looking at and dropping the flood on the server's CPU, pcpd not
// involved (the default bed's control, a closed port, makes the kernel
// answer ICMP errors as well).
const flooderEnv = "PCPD_TEST_FLOODER"

// floodPin reports whether PCPD_FLOOD_PIN asks for the pinned bed.
func floodPin(t *testing.T) bool {
	t.Helper()
	switch p := os.Getenv("PCPD_FLOOD_PIN"); p {
	case "":
		return false
	case "1":
		if runtime.NumCPU() < 2 {
			t.Skip("PCPD_FLOOD_PIN needs 2 CPUs")
		}
		return true
	default:
		t.Fatalf("PCPD_FLOOD_PIN=%q: want 1", p)
		return false
	}
}

// The CPUs of the pinned bed.
const (
	serverCPU = 0 // pcpd, the host's receive path
	clientCPU = 1 // the victim (this process), the flooder, the client's receive path
)

// kernelSlack is what the pinned bed allows on top of 2 × idle: what the
// kernel's receive path alone costs the victim when it looks at and drops
// the same flood on the server's CPU, pcpd not involved (the control
// rounds: control − idle, never negative). No server in user space can
// avoid it: the victim's datagram waits in the server CPU's receive
// backlog behind flood datagrams before any rule or socket sees it. The
// control's rule is a plain port match, cheaper than the owner meter's
// lookups, so the meter's own cost is still charged to pcpd. No slack for
// timers: the round trips are timed with the monotonic clock and no timer
// is on their path.
func kernelSlack(idle, control time.Duration) time.Duration { return max(0, control-idle) }

// pinSelf moves every thread of the test process to cpu (children started
// afterwards inherit it) and restores all CPUs at the end of the test.
func pinSelf(t *testing.T, cpu int) {
	t.Helper()
	pid := strconv.Itoa(os.Getpid())
	if out, err := exec.Command("taskset", "-a", "-p", "-c", strconv.Itoa(cpu), pid).CombinedOutput(); err != nil {
		t.Fatalf("taskset: %v: %s", err, out)
	}
	t.Cleanup(func() {
		exec.Command("taskset", "-a", "-p", "-c", "0-"+strconv.Itoa(runtime.NumCPU()-1), pid).Run()
	})
}

// steerReceive sets RPS on every receive queue of ifc in ns to cpu.
func steerReceive(t *testing.T, ns *netlab.NS, ifc string, cpu int) {
	t.Helper()
	mask := strconv.FormatUint(1<<cpu, 16)
	ns.MustRun(t, "sh", "-c", "for q in /sys/class/net/"+ifc+"/queues/rx-*; do echo "+mask+" > $q/rps_cpus; done")
}

// controlDropPort is the pinned bed's control destination: the test's own
// rule drops it in the host's raw prerouting, where pcpd's owner meter
// drops the real flood.
const controlDropPort = 5399

func installControlDrop(t *testing.T, ns *netlab.NS) {
	t.Helper()
	ns.MustRun(t, "nft", "add table inet pcpdtestctl\n"+
		"add chain inet pcpdtestctl pre { type filter hook prerouting priority raw; }\n"+
		"add rule inet pcpdtestctl pre udp dport "+strconv.Itoa(controlDropPort)+" counter drop")
}

// floodProc is a running flooder process.
type floodProc struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	out   *bufio.Reader
}

// startFlooder runs the flooder process in ns on clientCPU at SCHED_IDLE, sending MAP
// requests to dst from floodSrc(1) (sources "one") or from a fresh /64
// per datagram starting at the first-th (sources "prefix"), until stop.
// It returns once the flooder's socket is open.
func startFlooder(t *testing.T, ns *netlab.NS, dst netip.AddrPort, sources string, first uint32) *floodProc {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("ip", "netns", "exec", ns.Name, "taskset", "-c", strconv.Itoa(clientCPU), "chrt", "--idle", "0", exe)
	cmd.Env = append(os.Environ(),
		flooderEnv+"="+strings.Join([]string{dst.String(), sources, strconv.FormatUint(uint64(first), 10)}, ","))
	cmd.Stderr = os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	p := &floodProc{cmd: cmd}
	if p.stdin, err = cmd.StdinPipe(); err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	p.out = bufio.NewReader(stdout)
	if err := cmd.Start(); err != nil {
		t.Fatalf("start flooder: %v", err)
	}
	if line, err := p.out.ReadString('\n'); err != nil || line != "ready\n" {
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatalf("flooder did not start: %q %v", line, err)
	}
	return p
}

// stop ends the flooder and returns how many datagrams it sent and at
// what rate (by its own clock, from its first datagram to its last).
func (p *floodProc) stop(t *testing.T) (sent uint64, rate float64) {
	t.Helper()
	p.stdin.Close()
	line, rerr := p.out.ReadString('\n')
	if err := p.cmd.Wait(); err != nil || rerr != nil {
		t.Fatalf("flooder: %v %v (%q)", err, rerr, line)
	}
	var secs float64
	if _, err := fmt.Sscanf(line, "sent %d in %g s", &sent, &secs); err != nil || secs <= 0 {
		t.Fatalf("flooder said %q: %v", line, err)
	}
	return sent, float64(sent) / secs
}

// flooderMain is the flooder process (see flooderEnv): it floods until its
// stdin closes, then prints what it sent. The exit code says whether it
// could send.
func flooderMain(arg string) int {
	f := strings.Split(arg, ",")
	if len(f) != 3 {
		fmt.Fprintf(os.Stderr, "flooder: bad %s=%q\n", flooderEnv, arg)
		return 2
	}
	dst, err := netip.ParseAddrPort(f[0])
	first, err2 := strconv.ParseUint(f[2], 10, 32)
	if err != nil || err2 != nil || (f[1] != "one" && f[1] != "prefix") {
		fmt.Fprintf(os.Stderr, "flooder: bad %s=%q: %v %v\n", flooderEnv, arg, err, err2)
		return 2
	}
	sp, err := openSpoofer(dst)
	if err != nil {
		fmt.Fprintf(os.Stderr, "flooder: %v\n", err)
		return 1
	}
	var done atomic.Bool
	go func() {
		io.Copy(io.Discard, os.Stdin)
		done.Store(true)
	}()
	fmt.Println("ready")
	start := time.Now()
	var n uint64
	for ; !done.Load(); n++ {
		src := floodSrc(1)
		if f[1] == "prefix" {
			src = floodSrc(2 + (uint32(first)+uint32(n))%(1<<23))
		}
		if err := sp.send(src, mapBytes(src, pcp.ProtoUDP, 7000, time.Hour)); err != nil {
			fmt.Fprintf(os.Stderr, "flooder: send: %v\n", err)
			return 1
		}
	}
	fmt.Printf("sent %d in %g s\n", n, time.Since(start).Seconds())
	return 0
}

// softnet is /proc/net/softnet_stat per CPU (machine-wide, not per
// namespace): packets each CPU's receive path processed, and how many of
// them RPS steered there from another CPU. It shows where the flood's
// receive processing ran.
type softnet struct{ processed, rps []uint64 }

func readSoftnet() softnet {
	var s softnet
	b, _ := os.ReadFile("/proc/net/softnet_stat")
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 10 {
			continue
		}
		p, _ := strconv.ParseUint(f[0], 16, 64)
		r, _ := strconv.ParseUint(f[9], 16, 64)
		s.processed, s.rps = append(s.processed, p), append(s.rps, r)
	}
	return s
}

// String gives the per-CPU differences s − o.
func (s softnet) minus(o softnet) string {
	var parts []string
	for i := range min(len(s.processed), len(o.processed)) {
		parts = append(parts, fmt.Sprintf("CPU %d processed %d (rps %d)", i, s.processed[i]-o.processed[i], s.rps[i]-o.rps[i]))
	}
	return strings.Join(parts, ", ")
}
