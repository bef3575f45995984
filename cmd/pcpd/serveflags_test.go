package main

import (
	"context"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/internal/pcpdtest"
	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/store"
)

// --reserved-ports, --touch-interval and --snapshot-interval reach the
// engine: a reserved external IPv4 port is not handed out even when
// suggested and free, while an unreserved one is; with 1 s intervals the
// idle daemon writes its state (Touch) and replaces its backup copy
// (Snapshot) within seconds, where the defaults take a minute and an hour.
func TestServeHousekeepingAndReservedFlags(t *testing.T) {
	netlab.RequireRoot(t)
	topo := netlab.NewTopology(t, netlab.TopologyOptions{})
	dir := t.TempDir()
	state := filepath.Join(dir, "state")
	pcpdtest.Start(t, pcpdtest.Config{
		NS: topo.Host,
		Args: []string{"serve", "--interface", topo.HostLANIf,
			"--client", "home=" + topo.ClientPrefix6.String() + "," + topo.ClientPrefix4.String(),
			"--external-ipv4", topo.HostPublicV4.String(),
			"--state-dir", state, "--socket", filepath.Join(dir, "pcpd.sock"),
			"--reserved-ports", "7000-7001,7003",
			"--touch-interval", "1s", "--snapshot-interval", "1s",
		},
		Ready: pcpdtest.Announce(topo.Client, topo.ClientV6, netip.AddrPortFrom(topo.HostTunnelV6, pcp.Port)),
	})

	t.Run("reserved-ports", func(t *testing.T) {
		var conn *net.UDPConn
		if err := topo.Client.Do(func() (err error) {
			conn, err = net.ListenUDP("udp4", net.UDPAddrFromAddrPort(netip.AddrPortFrom(topo.ClientV4, 0)))
			return err
		}); err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		c := &pcp.Client{Conn: conn, Server: netip.AddrPortFrom(topo.HostTunnelV4, pcp.Port)}
		for _, tt := range []struct {
			port     uint16
			reserved bool
		}{{7000, true}, {7001, true}, {7002, false}, {7003, true}} {
			// NAT-PMP: the suggested external port is the internal
			// one, granted when free (MAP-12's rule for NAT-PMP too).
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			var resp pcp.PMPResponse
			err := c.DoPMP(ctx, &pcp.PMPRequest{Opcode: pcp.PMPOpMapUDP, InternalPort: tt.port, SuggestedExternalPort: tt.port, Lifetime: time.Hour}, &resp)
			cancel()
			if err != nil || resp.Result != pcp.PMPSuccess {
				t.Fatalf("NAT-PMP map UDP %d: %v, %v", tt.port, err, resp.Result)
			}
			if got := resp.ExternalPort == tt.port; got == tt.reserved {
				t.Errorf("UDP %d (reserved %v): external port %d", tt.port, tt.reserved, resp.ExternalPort)
			}
		}
	})

	t.Run("touch-interval and snapshot-interval", func(t *testing.T) {
		db, bak := filepath.Join(state, store.DBName), filepath.Join(state, store.BackupName)
		var first os.FileInfo
		if err := netlab.Eventually(5*time.Second, func() (err error) {
			first, err = os.Stat(bak)
			return err
		}); err != nil {
			t.Fatalf("no backup copy: %v", err)
		}
		dbFirst, err := os.Stat(db)
		if err != nil {
			t.Fatal(err)
		}
		// Snapshot renames a fresh file over the copy: a new inode.
		ino := func(fi os.FileInfo) uint64 { return fi.Sys().(*syscall.Stat_t).Ino }
		if err := netlab.Eventually(5*time.Second, func() error {
			fi, err := os.Stat(bak)
			if err != nil {
				return err
			}
			if ino(fi) == ino(first) {
				return os.ErrExist
			}
			return nil
		}); err != nil {
			t.Errorf("backup copy not rewritten within 5 s with --snapshot-interval 1s")
		}
		// Nothing else writes the state file of an idle daemon.
		if err := netlab.Eventually(5*time.Second, func() error {
			fi, err := os.Stat(db)
			if err != nil {
				return err
			}
			if !fi.ModTime().After(dbFirst.ModTime()) {
				return os.ErrExist
			}
			return nil
		}); err != nil {
			t.Errorf("state file not written within 5 s with --touch-interval 1s")
		}
	})
}
