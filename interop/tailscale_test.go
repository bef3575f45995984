package interop

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/pcpdtest"
	"github.com/pcpd/pcpd/pcp"
)

var tsBuild struct {
	once       sync.Once
	dir, path  string
	skip, fail string
}

// tsportmapBinary builds ./tsportmap, a separate module wrapping
// tailscale.com/net/portmapper, so Tailscale's dependencies stay out of
// pcpd's go.mod. Without the Go module proxy (an offline machine) the
// test skips; any other build failure fails it.
func tsportmapBinary(t *testing.T) string {
	t.Helper()
	tsBuild.once.Do(func() {
		dir, err := os.MkdirTemp("", "pcpd-interop-ts-")
		if err != nil {
			tsBuild.fail = err.Error()
			return
		}
		tsBuild.dir = dir
		path := filepath.Join(dir, "tsportmap")
		cmd := exec.Command("go", "build", "-o", path, ".")
		cmd.Dir = "tsportmap"
		cmd.Env = append(os.Environ(), "GOFLAGS=-buildvcs=false")
		out, err := cmd.CombinedOutput()
		if err != nil {
			msg := fmt.Sprintf("interop: go build ./interop/tsportmap: %v: %s", err, out)
			if bytes.Contains(out, []byte("reading https://")) || bytes.Contains(out, []byte("dial tcp")) ||
				bytes.Contains(out, []byte("no such host")) || bytes.Contains(out, []byte("requires go >=")) {
				tsBuild.skip = msg + " (Tailscale's module cannot be fetched or built with this Go)"
			} else {
				tsBuild.fail = msg
			}
			return
		}
		tsBuild.path = path
	})
	switch {
	case tsBuild.skip != "":
		t.Skip(tsBuild.skip)
	case tsBuild.fail != "":
		t.Fatal(tsBuild.fail)
	}
	return tsBuild.path
}

// TestTailscalePortmapperPCP: a PCP client we did not write —
// tailscale.com/net/portmapper, the mapper inside tailscaled, restricted to
// PCP — asks pcpd for a UDP mapping of its WireGuard-style port over IPv4
// (RFC 6887 §11, MAP-12: NAPT to the external IPv4), the mapping carries
// internet traffic to the client, and the client's release (lifetime 0,
// with a fresh nonce: MAP-19's default honours it) closes it.
func TestTailscalePortmapperPCP(t *testing.T) {
	requireRoot(t)
	bin := tsportmapBinary(t)
	l := newLab(t)
	topo := l.topo
	const port = 41641 // tailscaled's default UDP port
	topo.Client.ServeUDPEcho(t, netip.AddrPortFrom(topo.ClientV4, port).String())

	var stdin io.WriteCloser
	var stdout io.Reader
	logs := &pcpdtest.Log{}
	cmd, err := topo.Client.Start(func(c *exec.Cmd) {
		stdin, _ = c.StdinPipe()
		stdout, _ = c.StdoutPipe()
		c.Stderr = logs
	}, bin, "-gw", topo.HostTunnelV4.String(), "-self", topo.ClientV4.String(), "-port", fmt.Sprint(port))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		stdin.Close()
		if t.Failed() {
			t.Logf("tsportmap log:\n%s", logs.String())
		}
	})
	lines := make(chan string, 16)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
	}()
	waitLine := func(prefix string) string {
		t.Helper()
		timeout := time.After(20 * time.Second)
		for {
			select {
			case line, ok := <-lines:
				if !ok {
					t.Fatalf("tsportmap exited before printing %q", prefix)
				}
				t.Logf("tsportmap: %s", line)
				if strings.HasPrefix(line, prefix) {
					return strings.TrimPrefix(line, prefix)
				}
			case <-timeout:
				t.Fatalf("tsportmap printed no %q within 20 s", prefix)
			}
		}
	}

	if probe := waitLine("probe "); !strings.Contains(probe, "pcp=true") {
		t.Fatalf("ANN-01: Tailscale's probe did not see PCP: %s", probe)
	}
	external, err := netip.ParseAddrPort(waitLine("external "))
	if err != nil {
		t.Fatal(err)
	}
	// Tailscale suggests no port on a first mapping; MAP-12 then gives
	// the internal port when free.
	if want := netip.AddrPortFrom(topo.HostPublicV4, port); external != want {
		t.Fatalf("MAP-12: external %s, want %s", external, want)
	}
	if err := l.reachUDP(external); err != nil {
		t.Fatalf("internet → udp %s does not reach the client's %d: %v", external, port, err)
	}

	stdin.Close() // tsportmap releases the mapping
	waitLine("released")
	for range lines { // until tsportmap closes its output: Wait must follow the reads
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("tsportmap: %v", err)
	}
	// Tailscale's release does not wait for pcpd's answer (a fresh-clone
	// CI run probed before pcpd had processed it: "still reachable").
	l.waitReleased(t, external, topo.ClientV4, pcp.ProtoUDP, port)
	if err := l.blocked("udp", external); err != nil {
		t.Fatalf("MAP-16 (Tailscale's release): %v", err)
	}
}
