package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"net/http/pprof"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
	"github.com/google/nftables"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spf13/cobra"
	"github.com/vishvananda/netns"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"golang.zx2c4.com/wireguard/wgctrl"

	"github.com/pcpd/pcpd/config"
	"github.com/pcpd/pcpd/control"
	"github.com/pcpd/pcpd/internal/bootclock"
	"github.com/pcpd/pcpd/internal/ifname"
	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/policy"
	"github.com/pcpd/pcpd/server"
	"github.com/pcpd/pcpd/store"
)

func newServeCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "serve [--config FILE] [flags]",
		Short: "Run the PCP / NAT-PMP daemon",
		Long: `Run the daemon: answer PCP (RFC 6887) and NAT-PMP (RFC 6886) requests that
arrive on the serving interfaces (UDP port 5351), open and close nftables
pinholes for the addresses their senders own, keep every lease durable in
--state-dir, and serve the control socket that pcpd leases / revoke / status
use.

Ownership: with --client entries, each named client owns its prefixes and a
request is honoured only for addresses inside its sender's own prefixes.
Without them, ownership is WireGuard's: the request's source picks the peer
(longest match over every peer's AllowedIPs on --interface), and the address
to open must lie in that same peer's AllowedIPs. A peer that disappears or
whose AllowedIPs shrink loses its leases at once.

Firewall: by default pcpd creates its own inet table (--nft-table) whose
forward chain guards the owned prefixes: established traffic, essential
ICMPv6 and pinholes pass, the rest is dropped. With --nft-attach TABLE it
instead creates only its sets and one chain (--nft-chain) inside the admin's
existing table, which the admin's forward chain jumps to. Either way pcpd
touches only its own objects and never flushes the ruleset; pinholes are set
elements with kernel timeouts, so none outlives its lease, even if pcpd is
killed. A restart keeps leases, pinholes and the PCP epoch.

Every flag has a config file key of the same name (TOML; see
dist/pcpd.toml). Flags override the file. A configuration mistake is
reported as one line per mistake on stderr, and pcpd exits with code 2
before touching anything.

With systemd (Type=notify) pcpd reports readiness once its state is restored
and it is about to serve. SIGINT or SIGTERM stop it; pinholes stay in the
kernel with their timeouts.`,
		Example: `  pcpd serve --interface wg0
  pcpd serve --config /etc/pcpd/pcpd.toml
  pcpd serve --interface wg0 --external-ipv4 203.0.113.7 --metrics 127.0.0.1:9351
  pcpd serve --interface lan0 --client home=2001:db8:1:2::/64,192.168.1.0/24`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := config.Load(cmd.Flags())
			if err != nil {
				var errs config.Errors
				if errors.As(err, &errs) {
					for _, e := range errs {
						fmt.Fprintf(cmd.ErrOrStderr(), "pcpd: %v\n", e)
					}
					return silent(exitUsage)
				}
				return usage(err)
			}
			return serve(cmd.Context(), cfg, cmd.ErrOrStderr())
		},
	}
	config.AddFlags(cmd.Flags())
	cmd.Flags().SortFlags = false
	return cmd
}

// newLogger logs to w in the console format; under systemd (the journal
// adds its own timestamps) without the time.
func newLogger(level zapcore.Level, w zapcore.WriteSyncer) *zap.Logger {
	ec := zap.NewProductionEncoderConfig()
	ec.EncodeTime = zapcore.ISO8601TimeEncoder
	if os.Getenv("JOURNAL_STREAM") != "" {
		ec.TimeKey = ""
	}
	core := zapcore.NewCore(zapcore.NewConsoleEncoder(ec), w, zap.NewAtomicLevelAt(level))
	return zap.New(core)
}

// serve runs the daemon until ctx ends. Runtime errors exit 1.
func serve(ctx context.Context, cfg *config.Config, stderr io.Writer) (err error) {
	log := newLogger(cfg.LogLevel, zapcore.Lock(zapcore.AddSync(stderr)))
	defer log.Sync()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	// The control socket comes first: if another pcpd is running, this one
	// must stop before it touches that one's nftables table or state.
	ctl, err := control.Listen(cfg.Socket)
	if err != nil {
		return failure(err)
	}
	defer ctl.Close()

	// Ownership.
	var (
		own       policy.Ownership
		ownSource string
		changes   <-chan policy.Change
		bg        []func(context.Context) error
	)
	var wgStats *policy.WireGuard // nil with static ownership
	if len(cfg.Clients) > 0 {
		st, err := policy.NewStatic(cfg.Clients)
		if err != nil {
			return usage(err) // config.Load checked this already
		}
		own, ownSource = st, config.OwnershipStatic
		warnTranslated(log.Named("policy"), cfg.Clients, cfg.NAT64Prefixes)
		warnStaticOnWireGuard(log.Named("policy"), wireGuardInterfaces(cfg.Interfaces))
	} else {
		wg, err := wgctrl.New()
		if err != nil {
			return failure(fmt.Errorf("serve: open WireGuard control: %w", err))
		}
		defer wg.Close()
		w, err := policy.NewWireGuard(wg, cfg.Interfaces, 0, log.Named("policy"), policy.WithGoneGrace(cfg.WireGuardGoneGrace),
			policy.WithFreshBound(cfg.WireGuardFresh),
			policy.WithTranslationPrefixes(cfg.NAT64Prefixes))
		if err != nil {
			return failure(fmt.Errorf("serve: %w (ownership comes from WireGuard unless --client is given)", err))
		}
		own, ownSource = w, config.OwnershipWireGuard+":"+strings.Join(cfg.Interfaces, ",")
		changes = w.Changes()
		bg = append(bg, w.Run)
		wgStats = w
	}
	// The host's own addresses, its IPv4 subnets' broadcast addresses and
	// its IPv6 subnet-router anycast addresses: never openable.
	// Run re-reads them at each address change (netlink notifications)
	// and every policy.HostSetRefresh whatever they say.
	// Until a read succeeds (Run retries every policy.HostSetRefresh)
	// MAPs and PEERs are refused with NO_RESOURCES (HostAddrsRead): an
	// empty set would let a client open the host itself.
	host := &policy.HostSet{Log: log.Named("policy")}
	host.Refresh() // on error: logged, and refusing until a read succeeds
	bg = append(bg, host.Run)
	tp := policy.ThirdPartyOwned
	if cfg.ThirdParty == config.ThirdPartyOff {
		tp = policy.ThirdPartyOff
	}
	pol, err := policy.New(policy.Config{
		MinLifetime:        cfg.MinLifetime,
		MaxLifetime:        cfg.MaxLifetime,
		MaxLeasesPerClient: cfg.MaxLeasesPerClient,
		MaxLeases:          cfg.MaxLeases,
		ThirdParty:         tp,
		HostAddrs:          host.Contains,
		HostAddrsRead:      host.Read,
		HostAddrsGen:       host.Gen,
		AllowPorts:         portRanges(cfg.AllowPorts),
		DenyPorts:          portRanges(cfg.DenyPorts),
		AllowAllPorts:      cfg.AllowAllPorts,
		// 64:ff9b::/96, 64:ff9b:1::/48 and ::/96 always.
		TranslationPrefixes: cfg.NAT64Prefixes,
	}, own)
	if err != nil {
		return usage(err)
	}

	// Durable state.
	// The leases are read once more by Start, one at a time into the
	// lease table (State.Stream), not decoded all at once beside it: at
	// 1 000 000 leases that copy (≈ 280 MB) set the restart's peak RSS.
	// So are the leases of a state restored from the backup copy or read
	// from a read-only state directory.
	mem := chooseMemory(cfg, os.Getenv)
	mem.startGC()
	// The boot anchor (internal/bootclock): a wall-clock step made while
	// pcpd was down is seen at a start in the same boot, by the store's
	// clock-doubt check and by the engine.
	boot := bootclock.New(cfg.StateDir, bootclock.System())
	// SIGTERM/SIGINT (ctx) while it reads the state (≈ 1 s at 1 000 000
	// leases) ends it there (store.WithContext), as the restore below.
	// Open's check of the stored leases counts them for the restore
	// (server.Census): Start then reads them once, not twice.
	scfg := server.Config{
		Interfaces:       cfg.Interfaces,
		Listen:           cfg.Listen,
		NetNS:            netns.None(), // serve this process's namespace (the zero handle is fd 0)
		ExternalIPv4:     cfg.ExternalIPv4,
		IPv4Ports:        server.PortRange{First: cfg.IPv4PortLow, Last: cfg.IPv4PortHigh},
		ReservedPorts:    cfg.ReservedPorts,
		StrictNonce:      cfg.StrictNonce,
		RateLimit:        float64(cfg.RateLimit),
		RateBurst:        cfg.RateBurst,
		OwnerBurst:       cfg.OwnerRateBurst,
		TouchInterval:    cfg.TouchInterval,
		SnapshotInterval: cfg.SnapshotInterval,
		TamperInterval:   cfg.FirewallCheckInterval,
		NoFirewallWatch:  !cfg.FirewallWatch,
		DisableMap:       cfg.DisableMap,
		DisablePeer:      cfg.DisablePeer,
		DisableNATPMP:    cfg.DisableNATPMP,
	}
	census := server.NewCensus(scfg, time.Now())
	st, state, err := store.Open(cfg.StateDir, log.Named("store"), store.WithLeasesLater(), store.WithUnseenStep(boot.Unseen),
		store.WithContext(ctx), store.WithCensus(census.Add))
	if errors.Is(err, store.ErrOpenStopped) {
		log.Info("stopped while starting, reading the state", zap.Error(err))
		return nil
	}
	if err != nil {
		return failure(err)
	}
	defer st.Close()

	// Firewall. pinhole.New dials its own lasting netlink socket in nft's
	// namespace (opening and closing a socket per batch cost 5-14 ms a
	// batch: BENCHMARKS.md), with a receive buffer for a whole batch's
	// acknowledgements (review h/revnftconn); nft holds no socket.
	nft, err := nftables.New()
	if err != nil {
		return failure(fmt.Errorf("serve: open nftables: %w", err))
	}
	// The kernel's owner meter charges a translated source (an IPv4 host
	// through a NAT64 or SIIT translator) to the unowned bucket, as the
	// policy makes it nobody's, not to the holder of an enclosing prefix.
	meter := kernelMeter(cfg)
	meter.Unowned = pol.TranslationPrefixes()
	fw, err := pinhole.New(nft, pinhole.Config{Table: cfg.Table(), Attached: cfg.Attached(), Chain: cfg.NftChain,
		Meter: meter, TrackControl: !cfg.NftNotrack, Routes: pinhole.NetlinkRoutes()})
	if err != nil {
		return failure(err)
	}
	defer fw.Close()

	srv, err := server.New(scfg, server.Deps{
		Firewall:        fw,
		Store:           st,
		State:           state,
		Census:          census,
		Policy:          pol,
		Changes:         changes,
		OwnershipSource: ownSource,
		Boot:            lockedAnchor{boot, st},
	}, log)
	if err != nil {
		return failure(err)
	}

	// Metrics: bind now, so a taken port fails the start, not later.
	var metrics *http.Server
	if cfg.Metrics != "" {
		reg := prometheus.NewRegistry()
		reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
		if wgStats != nil {
			reg.MustRegister(wireGuardCollectors(wgStats)...)
		}
		for _, c := range srv.Collectors() {
			if err := reg.Register(c); err != nil {
				return failure(fmt.Errorf("serve: metrics: %w", err))
			}
		}
		ln, err := net.Listen("tcp", cfg.Metrics)
		if err != nil {
			return failure(fmt.Errorf("serve: metrics: %w", err))
		}
		warnWildcardMetrics(log, cfg.Metrics)
		metrics = newMetricsServer(reg, os.Getenv("PCPD_DEBUG_PPROF") == "1")
		go metrics.Serve(limitListener(ln, metricsMaxConns))
		defer metrics.Close()
	}

	// The server has its own reference to the stored leases and drops it
	// as it restores them; this one must not keep them alive.
	state.Leases, state.Stream = nil, nil

	// Restore leases into the kernel before serving (EPO-04). SIGINT or
	// SIGTERM (ctx) during a slow start (≈ 6 s at 1 000 000 leases) ends
	// it there: the restore gives up before writing to the store, the
	// deferred closes release the state directory's lock and the control
	// socket, exit 0. Before, the whole restore ran and pcpd served before
	// it stopped (TestServeStopDuringStart).
	if ctx.Err() != nil {
		log.Info("stopped while starting, before restoring the leases")
		return nil
	}
	if err := srv.StartContext(ctx); err != nil {
		if errors.Is(err, server.ErrStartStopped) {
			log.Info("stopped while starting; the stored leases are restored at the next start", zap.Error(err))
			return nil
		}
		return failure(err)
	}
	mem.apply(log)
	go trimMemory(ctx, log)
	for _, f := range bg {
		go f(ctx)
	}
	started := time.Now()
	ctlDone := make(chan error, 1)
	go func() {
		ctlDone <- control.Serve(ctx, ctl, &backend{srv: srv, cfg: cfg, started: started}, log.Named("control"))
	}()
	srvDone := make(chan error, 1)
	go func() { srvDone <- srv.Serve(ctx) }()

	log.Info("serving",
		zap.Strings("interfaces", cfg.Interfaces),
		zap.String("ownership", ownSource),
		zap.String("nft_table", cfg.Table()),
		zap.Bool("attached", cfg.Attached()),
		zap.String("state_dir", cfg.StateDir),
		zap.String("socket", cfg.Socket),
		zap.String("metrics", cfg.Metrics),
		zap.Int("leases_restored", srv.Status().Leases), // not len(srv.Leases()): a sorted copy of them all
	)
	if ok, err := daemon.SdNotify(false, daemon.SdNotifyReady); err != nil {
		log.Warn("systemd readiness notification failed", zap.Error(err))
	} else if ok {
		log.Debug("told systemd we are ready")
	}

	// control.Serve rides out transient accept failures (fd exhaustion)
	// and returns early only when its listener is unusable: then exit 1,
	// and systemd (Restart=on-failure) starts pcpd again on a fresh
	// socket, leases kept, rather than leave a daemon nobody can reach.
	select {
	case err = <-srvDone:
		cancel()
		<-ctlDone
	case err = <-ctlDone:
		cancel()
		<-srvDone
	}
	daemon.SdNotify(false, daemon.SdNotifyStopping)
	if err != nil {
		return failure(err)
	}
	return nil
}

func portRanges(rs [][2]uint16) []policy.PortRange {
	var out []policy.PortRange
	for _, r := range rs {
		out = append(out, policy.PortRange{First: r[0], Last: r[1]})
	}
	return out
}

// backend adapts the engine to the control socket.
type backend struct {
	srv     *server.Server
	cfg     *config.Config
	started time.Time
}

// StreamLeases lists without a copy of every lease.
// After a large listing the memory it used goes back to the system at once
// (handBackAfter), before the reply's last lines are flushed.
func (b *backend) StreamLeases(count func(int) error, each func(*store.Lease) error) error {
	n := 0
	err := b.srv.ListLeases(func(c int) error { n = c; return count(c) }, each)
	handBackAfter(n)
	return err
}

// HasOwner spares revoke --client a copy of every lease.
func (b *backend) HasOwner(id string) bool { return b.srv.HasOwner(id) }

// Revoke is the engine's, given control's context (serve's: SIGTERM stops
// a revoke between chunks, server.ErrRevokeStopped).
func (b *backend) Revoke(ctx context.Context, r control.Revoke) (int, error) {
	f := server.RevokeFilter{Owner: r.Owner, Key: r.Key, All: r.All}
	for _, o := range r.Opens {
		f.Opens = append(f.Opens, server.Opening{Protocol: o.Protocol, InternalAddr: o.InternalAddr, InternalPort: o.InternalPort})
	}
	return b.srv.Revoke(ctx, f)
}

func (b *backend) Status() control.Status {
	s := b.srv.Status()
	if s.Started.IsZero() {
		s.Started = b.started
	}
	out := control.Status{
		Version:         version(),
		PID:             os.Getpid(),
		Started:         s.Started.UTC().Truncate(time.Second),
		Epoch:           uint32(s.Epoch),
		Leases:          s.Leases,
		Owners:          s.Owners,
		Restarted:       s.Restarted,
		OwnershipSource: s.OwnershipSource,
		NftTable:        b.cfg.Table(),
		StateDir:        b.cfg.StateDir,
	}
	for _, a := range s.Listen {
		out.Listen = append(out.Listen, a.String())
	}
	return out
}

// wireGuardCollectors exports how often WireGuard ownership is re-read:
// a stalled refresh (Refreshes flat) or a failing one (Failures rising)
// means revocations are late.
func wireGuardCollectors(w *policy.WireGuard) []prometheus.Collector {
	counter := func(name, help string, get func(policy.WireGuardStats) uint64) prometheus.Collector {
		return prometheus.NewCounterFunc(prometheus.CounterOpts{Namespace: "pcpd", Subsystem: "ownership", Name: name, Help: help},
			func() float64 { return float64(get(w.Stats())) })
	}
	return []prometheus.Collector{
		counter("refreshes_total", "Re-reads of the WireGuard peers (periodic and on lookup misses).",
			func(s policy.WireGuardStats) uint64 { return s.Refreshes }),
		counter("refresh_failures_total", "Re-reads in which some WireGuard interface could not be read.",
			func(s policy.WireGuardStats) uint64 { return s.Failures }),
		counter("rebuilds_total", "Re-reads that found changed peers and rebuilt the ownership view.",
			func(s policy.WireGuardStats) uint64 { return s.Rebuilds }),
	}
}

// kernelMeter is the kernel's request meter (PKT-08): per source, the
// configured rate on every port pcpd serves. Attached mode installs none
// (pinhole.Meter documents the rule the admin can add).
func kernelMeter(cfg *config.Config) pinhole.Meter {
	m := pinhole.Meter{Rate: uint32(cfg.KernelRateLimit), Burst: uint32(cfg.KernelRateBurst),
		OwnerRate: uint32(cfg.KernelOwnerRateLimit), OwnerBurst: uint32(cfg.KernelOwnerRateBurst),
		UnownedRate: uint32(cfg.KernelUnownedRateLimit), UnownedBurst: uint32(cfg.KernelUnownedRateBurst)}
	// config has validated the name (were it unknown, the zero value is
	// strict: the safe side).
	m.ReversePath, _ = pinhole.ParseReversePath(cfg.KernelReversePath)
	for _, ap := range cfg.Listen {
		m.Ports = append(m.Ports, ap.Port())
	}
	if len(m.Ports) == 0 {
		m.Ports = []uint16{config.DefaultPort}
	}
	return m
}

// The metrics endpoint's bounds. Its address is reachable by every local
// user (loopback, by default) and has no authentication: without them
// anyone on the host could hold LimitNOFILE idle keep-alive connections
// (net/http keeps an idle one forever when IdleTimeout and ReadTimeout are
// zero) and leave pcpd unable to open its WAL segments, snapshots,
// conntrack and listen sockets. A scraper needs one connection; 16 leave
// room for several and for curl.
var (
	metricsIdleTimeout = 2 * time.Minute
	metricsMaxConns    = 16
)

// limitListener accepts at most n connections at once; more wait in the
// listen backlog until one closes (as the control socket's maxConns).
func limitListener(ln net.Listener, n int) net.Listener {
	return &limitedListener{Listener: ln, sem: make(chan struct{}, n)}
}

type limitedListener struct {
	net.Listener
	sem chan struct{}
}

func (l *limitedListener) Accept() (net.Conn, error) {
	l.sem <- struct{}{}
	c, err := l.Listener.Accept()
	if err != nil {
		<-l.sem
		return nil, err
	}
	return &limitedConn{Conn: c, release: func() { <-l.sem }}, nil
}

type limitedConn struct {
	net.Conn
	once    sync.Once
	release func()
}

func (c *limitedConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(c.release)
	return err
}

// warnTranslated warns, once at start, of each static client prefix that
// overlaps an IPv6-to-IPv4 translation prefix (policy.OverlapsTranslation;
// extra: --nat64-prefix): the client keeps it, but no address the two
// share is ever opened for it (policy: never openable). A WireGuard
// peer's AllowedIPs are checked as they are read (policy.WireGuard).
func warnTranslated(log *zap.Logger, clients map[string][]netip.Prefix, extra []netip.Prefix) {
	for _, name := range slices.Sorted(maps.Keys(clients)) {
		for _, p := range clients[name] {
			if t, ok := policy.OverlapsTranslation(p, extra); ok {
				log.Warn("client prefix overlaps an IPv6-to-IPv4 translation prefix; its addresses there are never openable",
					zap.String("client", name), zap.Stringer("prefix", p), zap.Stringer("translation", t))
			}
		}
	}
}

// warnStaticOnWireGuard warns, once at start, that static ownership
// (--client) serves the WireGuard interfaces wg (configured names): the
// clients' prefixes alone decide who owns what there, and the peers'
// AllowedIPs are not read. A --client prefix spanning two peers'
// AllowedIPs lets either open the other's addresses; a peer removed, or
// whose AllowedIPs shrink, keeps its leases until they expire or are
// revoked. Not refused: the list is the operator's explicit choice, it
// works where pcpd may not read WireGuard (kernel WireGuard's genetlink
// and wireguard-go's socket need CAP_NET_ADMIN and root's socket
// directory), and WireGuard still checks every request's source against
// its peer's AllowedIPs. Before (h/putback), nothing was said: an
// operator who added --client to a WireGuard setup lost WireGuard
// ownership silently.
func warnStaticOnWireGuard(log *zap.Logger, wg []string) {
	if len(wg) == 0 {
		return
	}
	log.Warn("ownership comes from the --client list: the peers' AllowedIPs on these WireGuard interfaces are not consulted (leave out --client for WireGuard ownership)",
		zap.Strings("interfaces", wg))
}

// wireGuardInterfaces are the names of names (as configured) that are
// WireGuard interfaces in this namespace now: wgctrl reads them by their
// kernel names (ifname.Kernel: userspace WireGuard's control socket is
// /var/run/wireguard/KERNELNAME.sock). A name no interface here answers
// to is left out (a userspace device's socket is seen from every
// namespace), as is everything when wgctrl cannot be opened (nothing to
// say then).
func wireGuardInterfaces(names []string) []string {
	wg, err := wgctrl.New()
	if err != nil {
		return nil
	}
	defer wg.Close()
	var out []string
	for _, name := range names {
		k, found, err := ifname.Kernel(name)
		if err != nil || !found {
			continue
		}
		if _, err := wg.Device(k); err == nil {
			out = append(out, name)
		}
	}
	return out
}

// warnWildcardMetrics warns when the metrics address (config-validated
// HOST:PORT) is a wildcard: ":9351", "0.0.0.0:9351", "[::]:9351" serve
// the unauthenticated endpoint on every interface, the WAN included.
// Not refused: some operators filter it with their own firewall.
func warnWildcardMetrics(log *zap.Logger, addr string) {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return
	}
	if a, perr := netip.ParseAddr(host); host != "" && (perr != nil || !a.Unmap().IsUnspecified()) {
		return
	}
	log.Warn("metrics served on every interface, the WAN included, without authentication: give a loopback or management address, or firewall it",
		zap.String("metrics", addr))
}

// newMetricsServer serves reg at /metrics and, with pprof, Go's profiles
// beside it.
func newMetricsServer(reg *prometheus.Registry, pprofOn bool) *http.Server {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
	if pprofOn {
		// Opt-in, for profiling a running daemon (bench/driver
		// --trace): Go's profiles and execution trace beside the
		// metrics, on the same (operator-chosen, usually loopback)
		// address. Off by default: a trace costs the daemon CPU.
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	}
	return &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second, IdleTimeout: metricsIdleTimeout}
}

// lockedAnchor writes the boot anchor, a file in the state directory, only
// while the store holds that directory's lock file (store.HoldLock). Review
// h/revstatelock: a pcpd started on a read-only directory without one
// (locked by the directory only, writing nothing) saved its anchor as soon
// as the directory was writable, over that of a second pcpd started then
// and holding the lock file: that one's next start measured the wall
// clock's step from the first one's running clock. Refused, the Save says
// bootclock.ErrStale (no anchor written or removed) and the server tries
// again every tick.
type lockedAnchor struct {
	*bootclock.Keeper
	st interface{ HoldLock() error }
}

func (a lockedAnchor) Save(run func() time.Time, origin time.Time) error {
	if err := a.st.HoldLock(); err != nil {
		return fmt.Errorf("%w: %w", bootclock.ErrStale, err)
	}
	return a.Keeper.Save(run, origin)
}
