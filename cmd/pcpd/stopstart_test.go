package main

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/nftables"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/internal/pcpdtest"
	"github.com/pcpd/pcpd/store"
)

// seedStore writes n live MAP leases of the static client "home" (one a
// host address of pfx, port 5000 TCP) and an epoch that began an hour ago.
func seedStore(t *testing.T, dir string, pfx netip.Prefix, n int) time.Time {
	t.Helper()
	st, _, err := store.Open(dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	origin := time.Now().Add(-time.Hour).Truncate(time.Second)
	if err := st.ResetEpoch(origin); err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	base := pfx.Addr().As16()
	base[11] = 1 // clear of the host's ::1 and the subnet-router anycast ::
	chunk := make([]store.Lease, 0, 1<<14)
	for i := 0; i < n; i++ {
		a := base
		a[12], a[13], a[14], a[15] = byte(i>>24), byte(i>>16), byte(i>>8), byte(i)
		addr := netip.AddrFrom16(a)
		chunk = append(chunk, store.Lease{
			Key:          store.Key{Owner: "static:home", InternalAddr: addr, InternalPort: 5000, Protocol: 6},
			ExternalAddr: addr, ExternalPort: 5000, Kind: store.KindMap, Created: now, Expires: now.Add(2 * time.Hour)})
		if len(chunk) == cap(chunk) || i == n-1 {
			if err := st.Commit(chunk, nil); err != nil {
				t.Fatal(err)
			}
			chunk = chunk[:0]
		}
	}
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	return origin
}

// TestServeStopDuringStart: SIGTERM while pcpd restores a large state
// (1 000 000 leases: ≈ 6-9 s on the shared box; systemctl stop during a
// slow start) ends the start there, cleanly. Sent once pcpd's table is in
// the kernel (Setup, the restore's first step; seconds of restore
// follow), pcpd must exit 0 without having restored (no "state restored",
// no "serving"), having released the state directory (the store opens
// with a 100 ms lock wait) and the control socket, leaving no temporary
// file, and every lease and the epoch as they were in the store.
//
// Fails without StartContext (serve calling srv.Start): the whole restore
// ran ("state restored; epoch continues", then "serving") and pcpd
// stopped only after it.
func TestServeStopDuringStart(t *testing.T) {
	netlab.RequireRoot(t)
	const n = 1_000_000
	topo := netlab.NewTopology(t, netlab.TopologyOptions{})
	dir := t.TempDir()
	state, sock := filepath.Join(dir, "state"), filepath.Join(dir, "pcpd.sock")
	origin := seedStore(t, state, topo.ClientPrefix6, n)

	var out pcpdtest.Log
	cmd, exited := startServe(t, topo, state, sock, &out)
	nft, err := topo.Host.NftConn()
	if err != nil {
		t.Fatal(err)
	}
	if err := netlab.Eventually(60*time.Second, func() error {
		tabs, err := nft.ListTablesOfFamily(nftables.TableFamilyINet)
		if err != nil {
			return err
		}
		for _, tb := range tabs {
			if tb.Name == "pcpd" {
				return nil
			}
		}
		return errors.New("pcpd's table not in the kernel yet")
	}); err != nil {
		t.Fatal(err)
	}
	stopServe(t, cmd, exited, fmt.Sprintf("SIGTERM during the restore (%d leases stored)", n))
	log := out.String()
	for _, s := range []string{"state restored", "serving"} {
		if strings.Contains(log, s) {
			t.Errorf("pcpd logged %q after SIGTERM during its restore: the start was not stopped", s)
		}
	}
	if !strings.Contains(log, "stopped while starting") {
		t.Errorf("no \"stopped while starting\" line")
	}
	wantNothingLeft(t, sock, state)
	wantStored(t, state, n, origin, "after the stopped start")
}

// TestServeStopDuringOpen (h/ops2): SIGTERM while pcpd reads its state
// file (store.Open: its page walk, bbolt's check, the leases' check;
// 300 000 leases) ends the start there, before the firewall is touched:
// sent once pcpd has leases.db open (/proc/PID/fd), pcpd must exit 0
// saying "stopped while starting, reading the state", with no "state
// restored" or "serving", no pcpd table in the kernel, the control socket
// removed and nothing left in the state directory (.tmp, .corrupt-); the
// next start then restores every lease with the epoch continuing ("state
// restored; epoch continues", no "state recovery"), and after it the
// store holds the n leases and the same epoch origin, not Fresh.
//
// Fails without store.WithContext in serve (Open read to its end): no
// "stopped while starting, reading the state" line (the stop came later,
// from StartContext; exit 466 ms after SIGTERM, 41 ms with it).
func TestServeStopDuringOpen(t *testing.T) {
	netlab.RequireRoot(t)
	const n = 300_000
	topo := netlab.NewTopology(t, netlab.TopologyOptions{})
	dir := t.TempDir()
	state, sock := filepath.Join(dir, "state"), filepath.Join(dir, "pcpd.sock")
	origin := seedStore(t, state, topo.ClientPrefix6, n)
	db := filepath.Join(state, store.DBName)

	var out pcpdtest.Log
	cmd, exited := startServe(t, topo, state, sock, &out)
	fds := fmt.Sprintf("/proc/%d/fd", cmd.Process.Pid)
	for opened := false; !opened; {
		select {
		case err := <-exited:
			t.Fatalf("pcpd exited (%v) before it opened its state file", err)
		default:
		}
		ents, _ := os.ReadDir(fds)
		for _, e := range ents {
			if l, _ := os.Readlink(filepath.Join(fds, e.Name())); l == db {
				opened = true
			}
		}
		time.Sleep(100 * time.Microsecond)
	}
	stopServe(t, cmd, exited, fmt.Sprintf("SIGTERM while reading the state (%d leases stored)", n))
	log := out.String()
	if !strings.Contains(log, "stopped while starting, reading the state") {
		t.Errorf("no \"stopped while starting, reading the state\" line: not stopped in store.Open")
	}
	for _, s := range []string{"state restored", "serving", "state recovery"} {
		if strings.Contains(log, s) {
			t.Errorf("pcpd logged %q after SIGTERM while reading its state", s)
		}
	}
	nft, err := topo.Host.NftConn()
	if err != nil {
		t.Fatal(err)
	}
	tabs, err := nft.ListTablesOfFamily(nftables.TableFamilyINet)
	if err != nil {
		t.Fatal(err)
	}
	for _, tb := range tabs {
		if tb.Name == "pcpd" {
			t.Errorf("pcpd's table is in the kernel: the start went past store.Open")
		}
	}
	wantNothingLeft(t, sock, state)

	// The next start: the whole state, the epoch continuing.
	var out2 pcpdtest.Log
	cmd, exited = startServe(t, topo, state, sock, &out2)
	if err := netlab.Eventually(120*time.Second, func() error {
		if strings.Contains(out2.String(), "serving") {
			return nil
		}
		select {
		case err := <-exited:
			exited <- err
			return fmt.Errorf("pcpd exited (%v)", err)
		default:
		}
		return errors.New("not serving yet")
	}); err != nil {
		t.Fatal(err)
	}
	stopServe(t, cmd, exited, "the next start, serving")
	log = out2.String()
	if !strings.Contains(log, "state restored; epoch continues") || strings.Contains(log, "state recovery") {
		t.Errorf("the next start did not restore the state with the epoch continuing")
	}
	wantStored(t, state, n, origin, "after the next start")
}

// startServe starts pcpd serve on topo's host (static client "home" of
// ClientPrefix6) over the state directory state, its output to out;
// killed at the test's end, the log's tail shown if the test failed.
// exited gets its exit.
func startServe(t *testing.T, topo *netlab.Topology, state, sock string, out *pcpdtest.Log) (*exec.Cmd, chan error) {
	t.Helper()
	cmd, err := topo.Host.Start(func(c *exec.Cmd) { c.Stdout, c.Stderr = out, out },
		pcpdtest.Binary(t), "serve", "--interface", topo.HostLANIf,
		"--client", "home="+topo.ClientPrefix6.String(),
		"--state-dir", state, "--socket", sock)
	if err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
		}
		if t.Failed() {
			t.Logf("pcpd log:\n%s", out.Tail(40))
		}
	})
	return cmd, exited
}

// stopServe sends pcpd SIGTERM and wants it to exit 0 (what: the moment,
// for the log, which gives how long it took).
func stopServe(t *testing.T, cmd *exec.Cmd, exited chan error, what string) {
	t.Helper()
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	sent := time.Now()
	select {
	case err := <-exited:
		t.Logf("%s: pcpd exited %v after SIGTERM", what, time.Since(sent).Round(time.Millisecond))
		if err != nil {
			t.Errorf("%s: pcpd exited with %v after SIGTERM, want 0", what, err)
		}
	case <-time.After(120 * time.Second): // a hang, not a figure
		t.Fatalf("%s: pcpd still running 120 s after SIGTERM", what)
	}
}

// wantStored: the store in state (opened with a 100 ms lock wait: pcpd
// released it) holds n leases and the epoch origin, not Fresh, nothing
// recovered (when: the moment, for the messages).
func wantStored(t *testing.T, state string, n int, origin time.Time, when string) {
	t.Helper()
	st, got, err := store.Open(state, nil, store.WithLockTimeout(100*time.Millisecond), store.WithLeasesLater(), store.WithoutOpenSnapshot())
	if err != nil {
		t.Fatalf("state %s: %v", when, err)
	}
	defer st.Close()
	if got.Fresh || got.Recovered != "" || !got.EpochOrigin.Equal(origin) {
		t.Errorf("state %s: fresh %v, recovered %q, epoch origin %v, want %v",
			when, got.Fresh, got.Recovered, got.EpochOrigin, origin)
	}
	count := 0
	if err := got.Stream(func(*store.Lease) error { count++; return nil }); err != nil {
		t.Fatal(err)
	}
	if count != n {
		t.Errorf("%d leases in the store %s, want %d", count, when, n)
	}
}

// wantNothingLeft: after pcpd's exit the control socket sock is gone and
// the state directory holds no half-written (.tmp) or moved-aside
// (.corrupt-) file.
func wantNothingLeft(t *testing.T, sock, state string) {
	t.Helper()
	if _, err := os.Lstat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("control socket left behind: %v", err)
	}
	ents, err := os.ReadDir(state)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if strings.HasSuffix(e.Name(), ".tmp") || strings.Contains(e.Name(), ".corrupt-") {
			t.Errorf("left in the state directory: %s", e.Name())
		}
	}
}
