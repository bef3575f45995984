package reliability

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
)

// TestRestartUnownedWindow (h/hunt6, figures; issue 9, "a lease restored
// for an address its owner no longer owns"): the client's device is
// swapped while pcpd is down (old peer removed, new key, same AllowedIPs)
// and the host reboots (pcpd's table gone). The start restores the old
// peer's leases into the kernel, and its first sweep, once serving,
// revokes them: the test reports from `nft monitor` (each line stamped as
// read, so an upper bound) how long the old peer's pinholes were in the
// kernel, and fails if any is left after the start. Without a reboot the
// kernel keeps them through the downtime anyway (it cannot know of the
// swap); the sweep ends them the same way.
func TestRestartUnownedWindow(t *testing.T) {
	l := newLab(t, labOptions{wireGuard: true})
	l.start()
	cli6, cli4 := l.topo.ClientV6, l.topo.ClientV4
	l.mustMap(l.pcpClient(cli6), cli6, pcp.ProtoTCP, servicePort, time.Hour)
	l.mustPMP(l.pcpClient(cli4), pcp.PMPOpMapTCP, servicePort, time.Hour)
	l.stop()
	l.swapDevice()
	l.topo.Host.MustRun(t, "nft", "delete", "table", "inet", "pcpd")

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
	l.start()
	if _, ok := waitFor(5*time.Second, func() bool {
		return !l.kernelHas(cli6, pcp.ProtoTCP, servicePort) && !l.kernelHas(cli4, pcp.ProtoTCP, servicePort)
	}); !ok {
		t.Fatalf("the old peer's pinholes are still in the kernel 5 s after the start; leases %v", l.leases())
	}
	time.Sleep(200 * time.Millisecond) // the monitor's last lines
	seen, err := os.ReadFile(out.Name())
	if err != nil {
		t.Fatal(err)
	}
	var first, last float64
	n := 0
	for _, ln := range strings.Split(string(seen), "\n") {
		f := strings.Fields(ln)
		if len(f) < 2 || !strings.Contains(ln, " pin6 ") && !strings.Contains(ln, " napt4 ") {
			continue
		}
		if !strings.Contains(ln, cli6.String()) && !strings.Contains(ln, cli4.String()) {
			continue
		}
		at, err := strconv.ParseFloat(f[0], 64)
		if err != nil {
			continue
		}
		if n == 0 {
			first = at
		}
		last, n = at, n+1
	}
	if n == 0 {
		t.Fatalf("nft monitor saw none of the old peer's pinholes:\n%s", seen)
	}
	t.Logf("the old peer's pinholes (pin6, napt4) were in the kernel for at most %.1f ms after the start restored them (%d monitor lines); leases now %v",
		(last-first)*1000, n, l.leases())
}
