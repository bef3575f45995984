// Package miniupnpd runs Debian's miniupnpd (nftables flavour, package
// miniupnpd-nftables) with PCP and NAT-PMP enabled inside a netlab
// namespace, as a reference server for the conformance suite and the
// performance comparison. It is test scaffolding, never product code.
//
// Start expects the namespace to be a router with a WAN and a LAN
// interface (netlab's Topology.Host: wan0 and lan0). miniupnpd 2.3.1
// refuses a reserved or documentation external IPv4 (198.51.100.1, the
// topology's own, is one) and then fails every IPv4 request, so Start
// adds a public-looking address (Options.ExternalIPv4, default
// 11.22.33.44/24) to the WAN interface inside the namespace only; it is
// never contacted outside it.
package miniupnpd

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
)

// Binary is where Debian installs miniupnpd.
const Binary = "/usr/sbin/miniupnpd"

// ErrNotInstalled is returned when the miniupnpd binary is missing.
var ErrNotInstalled = errors.New("miniupnpd: not installed (apt-get install miniupnpd-nftables)")

// Options configure the daemon. The zero value suits netlab's Topology.
type Options struct {
	// ExtIf and LANIf name the WAN and LAN interfaces (default wan0, lan0).
	ExtIf, LANIf string
	// ExternalIPv4 is added to ExtIf and used as the external address
	// (default 11.22.33.44/24). It must look public to miniupnpd.
	ExternalIPv4 netip.Prefix
	// Table is the nftables table (family inet) Start creates for the
	// daemon's filter and NAT chains (default "miniupnpd").
	Table string
	// MinLifetime and MaxLifetime bound PCP lifetimes (miniupnpd's
	// defaults when 0: 120 s and 86400 s).
	MinLifetime, MaxLifetime int
	// ThirdParty enables pcp_allow_thirdparty.
	ThirdParty bool
	// Dir holds the configuration and lease files (default: a new
	// temporary directory, removed by Close).
	Dir string
	// Log receives the daemon's output (default: discarded; Close returns
	// nothing of it).
	Log io.Writer
	// Binary overrides the binary path (default Binary).
	Binary string
}

// Daemon is a running miniupnpd.
type Daemon struct {
	// ExternalIPv4 is the address IPv4 mappings use.
	ExternalIPv4 netip.Addr

	ns      *netlab.NS
	cmd     *exec.Cmd
	done    chan struct{}
	dir     string
	ownDir  bool
	table   string
	extIf   string
	extPfx  netip.Prefix
	waitErr error
}

func (o *Options) defaults() {
	if o.ExtIf == "" {
		o.ExtIf = "wan0"
	}
	if o.LANIf == "" {
		o.LANIf = "lan0"
	}
	if !o.ExternalIPv4.IsValid() {
		o.ExternalIPv4 = netip.MustParsePrefix("11.22.33.44/24")
	}
	if o.Table == "" {
		o.Table = "miniupnpd"
	}
	if o.Binary == "" {
		o.Binary = Binary
	}
}

// ruleset is the firewall miniupnpd plugs into (modelled on Debian's
// nft_init.sh): a forward chain that drops by default but lets replies
// and LAN-originated traffic through and jumps to miniupnpd's chain, and
// NAT chains jumping to its DNAT/SNAT chains.
const ruleset = `table inet %[1]s {
	chain forward {
		type filter hook forward priority 0; policy drop;
		ct state established,related accept
		iifname "%[2]s" accept
		icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-advert, packet-too-big } accept
		jump miniupnpd
	}
	chain miniupnpd {
	}
	chain prerouting {
		type nat hook prerouting priority -100; policy accept;
		jump prerouting_miniupnpd
	}
	chain postrouting {
		type nat hook postrouting priority 100; policy accept;
		jump postrouting_miniupnpd
	}
	chain prerouting_miniupnpd {
	}
	chain postrouting_miniupnpd {
	}
}
`

func config(o Options) string {
	var b strings.Builder
	fmt.Fprintf(&b, "ext_ifname=%s\n", o.ExtIf)
	fmt.Fprintf(&b, "ext_ifname6=%s\n", o.ExtIf)
	fmt.Fprintf(&b, "ext_ip=%s\n", o.ExternalIPv4.Addr())
	fmt.Fprintf(&b, "listening_ip=%s\n", o.LANIf)
	b.WriteString("enable_natpmp=yes\nenable_upnp=no\nsecure_mode=yes\nsystem_uptime=no\n")
	fmt.Fprintf(&b, "upnp_table_name=%s\nupnp_nat_table_name=%s\n", o.Table, o.Table)
	b.WriteString("upnp_forward_chain=miniupnpd\nupnp_nat_chain=prerouting_miniupnpd\nupnp_nat_postrouting_chain=postrouting_miniupnpd\n")
	if o.MinLifetime > 0 {
		fmt.Fprintf(&b, "min_lifetime=%d\n", o.MinLifetime)
	}
	if o.MaxLifetime > 0 {
		fmt.Fprintf(&b, "max_lifetime=%d\n", o.MaxLifetime)
	}
	if o.ThirdParty {
		b.WriteString("pcp_allow_thirdparty=yes\n")
	}
	fmt.Fprintf(&b, "lease_file=%s\n", filepath.Join(o.Dir, "upnp.leases"))
	fmt.Fprintf(&b, "lease_file6=%s\n", filepath.Join(o.Dir, "upnp6.leases"))
	b.WriteString("uuid=3b1f0b6e-0c3a-4a6e-9c55-5c0a2f7e8d11\n")
	b.WriteString("allow 1-65535 0.0.0.0/0 1-65535\n")
	b.WriteString("deny 0-65535 0.0.0.0/0 0-65535\n")
	return b.String()
}

// Start configures the namespace (external address, nftables table) and
// starts miniupnpd in the foreground; it returns once the daemon answers
// a NAT-PMP external-address request on a LAN address, or fails after
// 10 s. Close undoes everything.
func Start(ns *netlab.NS, o Options) (*Daemon, error) {
	o.defaults()
	if _, err := os.Stat(o.Binary); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrNotInstalled, err)
	}
	d := &Daemon{ns: ns, ExternalIPv4: o.ExternalIPv4.Addr(), table: o.Table, extIf: o.ExtIf, extPfx: o.ExternalIPv4}
	if o.Dir == "" {
		dir, err := os.MkdirTemp("", "miniupnpd-")
		if err != nil {
			return nil, fmt.Errorf("miniupnpd: %w", err)
		}
		o.Dir, d.ownDir = dir, true
	}
	d.dir = o.Dir
	ok := false
	defer func() {
		if !ok {
			d.Close()
		}
	}()
	if _, err := ns.Run("ip", "addr", "add", o.ExternalIPv4.String(), "dev", o.ExtIf); err != nil {
		return nil, fmt.Errorf("miniupnpd: add external address: %w", err)
	}
	rules := filepath.Join(o.Dir, "ruleset.nft")
	if err := os.WriteFile(rules, []byte(fmt.Sprintf(ruleset, o.Table, o.LANIf)), 0o644); err != nil {
		return nil, fmt.Errorf("miniupnpd: %w", err)
	}
	if _, err := ns.Run("nft", "-f", rules); err != nil {
		return nil, fmt.Errorf("miniupnpd: install ruleset: %w", err)
	}
	conf := filepath.Join(o.Dir, "miniupnpd.conf")
	if err := os.WriteFile(conf, []byte(config(o)), 0o644); err != nil {
		return nil, fmt.Errorf("miniupnpd: %w", err)
	}
	log := o.Log
	if log == nil {
		log = io.Discard
	}
	cmd, err := ns.Start(func(c *exec.Cmd) { c.Stdout, c.Stderr = log, log },
		o.Binary, "-d", "-f", conf, "-P", filepath.Join(o.Dir, "miniupnpd.pid"))
	if err != nil {
		return nil, fmt.Errorf("miniupnpd: %w", err)
	}
	d.cmd, d.done = cmd, make(chan struct{})
	go func() { d.waitErr = cmd.Wait(); close(d.done) }()

	lan, err := d.lanIPv4(o.LANIf)
	if err != nil {
		return nil, err
	}
	if err := d.waitReady(lan); err != nil {
		return nil, err
	}
	ok = true
	return d, nil
}

// lanIPv4 finds the LAN interface's first IPv4 address.
func (d *Daemon) lanIPv4(ifname string) (netip.Addr, error) {
	out, err := d.ns.Run("ip", "-4", "-o", "addr", "show", "dev", ifname)
	if err != nil {
		return netip.Addr{}, fmt.Errorf("miniupnpd: %w", err)
	}
	for _, f := range strings.Fields(out) {
		if p, err := netip.ParsePrefix(f); err == nil {
			return p.Addr(), nil
		}
	}
	return netip.Addr{}, fmt.Errorf("miniupnpd: no IPv4 address on %s", ifname)
}

// waitReady polls with NAT-PMP external-address requests from inside the
// namespace (miniupnpd answers its LAN addresses, loopback included when
// it is on the LAN interface's subnet) until one is answered.
func (d *Daemon) waitReady(lan netip.Addr) error {
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case <-d.done:
			return fmt.Errorf("miniupnpd: exited during start-up: %v", d.waitErr)
		default:
		}
		var answered bool
		d.ns.Do(func() error {
			c, err := net.DialUDP("udp4", &net.UDPAddr{IP: lan.AsSlice()}, &net.UDPAddr{IP: lan.AsSlice(), Port: 5351})
			if err != nil {
				return err
			}
			defer c.Close()
			c.Write([]byte{0, 0})
			c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
			buf := make([]byte, 64)
			n, err := c.Read(buf)
			answered = err == nil && n >= 12 && bytes.Equal(buf[:2], []byte{0, 0x80})
			return nil
		})
		if answered {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return errors.New("miniupnpd: no NAT-PMP answer within 10 s")
}

// Restart kills the daemon (SIGKILL) and starts it again with the same
// configuration, as the conformance suite's restart hook wants.
func (d *Daemon) Restart() error {
	if d.cmd == nil {
		return errors.New("miniupnpd: not running")
	}
	d.cmd.Process.Kill()
	<-d.done
	args := d.cmd.Args[4:] // drop "ip netns exec NAME"
	cmd, err := d.ns.Start(func(c *exec.Cmd) { c.Stdout, c.Stderr = d.cmd.Stdout, d.cmd.Stderr }, args...)
	if err != nil {
		return fmt.Errorf("miniupnpd: restart: %w", err)
	}
	d.cmd, d.done = cmd, make(chan struct{})
	go func() { d.waitErr = cmd.Wait(); close(d.done) }()
	lan, err := d.lanIPv4Guess()
	if err != nil {
		return err
	}
	return d.waitReady(lan)
}

func (d *Daemon) lanIPv4Guess() (netip.Addr, error) {
	conf, err := os.ReadFile(filepath.Join(d.dir, "miniupnpd.conf"))
	if err != nil {
		return netip.Addr{}, fmt.Errorf("miniupnpd: %w", err)
	}
	for _, l := range strings.Split(string(conf), "\n") {
		if v, ok := strings.CutPrefix(l, "listening_ip="); ok {
			return d.lanIPv4(v)
		}
	}
	return netip.Addr{}, errors.New("miniupnpd: no listening_ip in configuration")
}

// Close stops the daemon and removes its table, address and files.
func (d *Daemon) Close() error {
	var errs []error
	if d.cmd != nil && d.cmd.Process != nil {
		d.cmd.Process.Kill()
		<-d.done
	}
	if d.table != "" {
		d.ns.Run("nft", "delete", "table", "inet", d.table)
	}
	if d.extPfx.IsValid() {
		d.ns.Run("ip", "addr", "del", d.extPfx.String(), "dev", d.extIf)
	}
	if d.ownDir && d.dir != "" {
		errs = append(errs, os.RemoveAll(d.dir))
	}
	return errors.Join(errs...)
}
