// Command pcpload drives a PCP server (pcpd, miniupnpd, anything that
// speaks RFC 6887) from many simulated clients, and serves the UDP echo
// "floor" the server is compared against.
//
//	pcpload run   --server ADDR:PORT --src PFX [flags]   load, then a report
//	pcpload floor --listen ADDR:PORT [--listen ...]      echo every datagram
//
// Every client is its own UDP socket bound to its own source address
// (the first --clients addresses of --src; with --freebind the addresses
// need only a local route, not configuration). A worker owns a share of
// the clients and keeps one request in flight: --concurrency workers flat
// out (closed loop), or at most --concurrency requests in flight at a
// fixed --rate (open loop, latency counted from the intended send time to
// the kernel's receive stamp of the reply; one thread sends for every
// client on one socket, the source address set per datagram, see open.go).
// A reply later than --timeout is a loss.
//
// pcpload only ever sends to the --server it is given; run it inside the
// network namespace of a lab (bench/run does) or on loopback.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/signal"
	"runtime/pprof"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/pcpd/pcpd/pcp"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := runMain(ctx, os.Args[1:], os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, err)
		if errors.Is(err, errConfig) || errors.Is(err, errBadMix) || errors.Is(err, flag.ErrHelp) {
			os.Exit(2)
		}
		os.Exit(1)
	}
}

func runMain(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		return fmt.Errorf("pcpload: usage: pcpload run|floor [flags] (-h for help): %w", errConfig)
	}
	switch args[0] {
	case "run":
		return cmdRun(ctx, args[1:], stdout, stderr)
	case "floor":
		return cmdFloor(ctx, args[1:], stdout, stderr)
	}
	return fmt.Errorf("pcpload: unknown command %q (want run or floor): %w", args[0], errConfig)
}

// prefixValue and addrPortValue let flag parse typed values.
type prefixValue struct{ p *netip.Prefix }

func (v prefixValue) String() string {
	if v.p == nil || !v.p.IsValid() {
		return ""
	}
	return v.p.String()
}
func (v prefixValue) Set(s string) (err error) { *v.p, err = netip.ParsePrefix(s); return }

type addrPortValue struct{ a *netip.AddrPort }

func (v addrPortValue) String() string {
	if v.a == nil || !v.a.IsValid() {
		return ""
	}
	return v.a.String()
}
func (v addrPortValue) Set(s string) (err error) { *v.a, err = netip.ParseAddrPort(s); return }

func cmdRun(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("pcpload run", flag.ContinueOnError)
	fs.SetOutput(stderr)
	cfg := config{Freebind: true, Protocol: pcp.ProtoTCP}
	fs.Var(addrPortValue{&cfg.Server}, "server", "server `ADDR:PORT`, e.g. [2001:db8:1:2::1]:5351")
	fs.Var(prefixValue{&cfg.Src}, "src", "`PREFIX` the clients' source addresses are taken from (the server must consider them owned)")
	fs.Var(prefixValue{&cfg.UnauthSrc}, "unauth-src", "`PREFIX` of sources the server must refuse (for unauth in --mix)")
	fs.IntVar(&cfg.UnauthClients, "unauth-clients", 0, "sources used from --unauth-src (0 = as many as --clients)")
	fs.IntVar(&cfg.Clients, "clients", 256, "simulated clients (source addresses, one socket each)")
	fs.IntVar(&cfg.PerPrefix, "per-prefix", 0, "give each client address 1 of its own /`N` inside --src (and --unauth-src), e.g. 64 as WireGuard peers own prefixes; 0 = consecutive addresses")
	fs.BoolVar(&cfg.Freebind, "freebind", true, "bind sources with IP(V6)_FREEBIND (then a local route for --src suffices)")
	fs.IntVar(&cfg.Ports, "ports", 256, "lease slots per client (internal ports --port-base..)")
	fs.IntVar(&cfg.PortBase, "port-base", 10000, "first internal port")
	proto := fs.String("proto", "tcp", "protocol of the MAPs: tcp or udp")
	fs.DurationVar(&cfg.Lifetime, "lifetime", time.Hour, "requested lifetime of new MAPs and renewals")
	fs.IntVar(&cfg.Concurrency, "concurrency", 32, "closed loop: concurrent clients; open loop: most requests in flight")
	fs.Float64Var(&cfg.Rate, "rate", 0, "open loop at this many requests/s (0 = closed loop, flat out)")
	fs.DurationVar(&cfg.Tick, "tick", defaultTick, "open loop: shortest time between two sends; the requests due in between go out together (their wait is latency)")
	fs.DurationVar(&cfg.Duration, "duration", 0, "length of the measured phase (0 = until --count)")
	fs.Int64Var(&cfg.Count, "count", 0, "requests in the measured phase (0 = until --duration)")
	fs.DurationVar(&cfg.Timeout, "timeout", time.Second, "a reply later than this is a loss")
	fs.DurationVar(&cfg.ProbeTimeout, "probe-timeout", 5*time.Second, "how long to wait for the server to answer a first ANNOUNCE")
	fs.IntVar(&cfg.Prefill, "prefill", 0, "leases created before the measured phase (not measured in it)")
	mixStr := fs.String("mix", "new=100", "request mix, weights: new=..,renew=..,delete=..,malformed=..,unauth=..")
	fs.Uint64Var(&cfg.Seed, "seed", 1, "random seed for the op sequence")
	asJSON := fs.Bool("json", false, "print the report as JSON")
	mark := fs.Bool("mark", false, "print \"pcpload: measuring\" on stderr as the measured phase starts (for drivers that profile the server)")
	fs.DurationVar(&cfg.Timeline, "timeline", 0, "also report the measured phase as a timeline in buckets this long (JSON), to match slow requests with server events")
	cpuProfile := fs.String("cpuprofile", "", "write the generator's own CPU profile to `FILE`")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("pcpload: unexpected argument %q: %w", fs.Arg(0), errConfig)
	}
	var err error
	if cfg.Mix, err = parseMix(*mixStr); err != nil {
		return err
	}
	switch *proto {
	case "tcp":
		cfg.Protocol = pcp.ProtoTCP
	case "udp":
		cfg.Protocol = pcp.ProtoUDP
	default:
		return fmt.Errorf("pcpload: --proto %q: want tcp or udp: %w", *proto, errConfig)
	}
	if *cpuProfile != "" {
		f, err := os.Create(*cpuProfile)
		if err != nil {
			return fmt.Errorf("pcpload: %w", err)
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return fmt.Errorf("pcpload: %w", err)
		}
		defer pprof.StopCPUProfile()
	}
	if *mark {
		cfg.OnMeasure = func() { fmt.Fprintln(stderr, "pcpload: measuring") }
	}
	rep, err := run(ctx, cfg)
	if err != nil {
		return err
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(rep)
	}
	writeText(stdout, rep)
	return nil
}

func writeText(w io.Writer, r *report) {
	mode := fmt.Sprintf("closed loop, %d in flight", r.Concurrency)
	if r.Mode == "open" {
		mode = fmt.Sprintf("open loop at %.0f/s, at most %d in flight", r.Rate, r.Concurrency)
	}
	fmt.Fprintf(w, "pcpload → %s: %s, %d clients, mix %s, timeout %s\n", r.Server, mode, r.Clients, r.Mix, r.Timeout)
	if r.Prefill != nil {
		fmt.Fprintf(w, "\nprefill (%.2fs):\n", r.Prefill.ElapsedSec)
		writePhase(w, r.Prefill)
	}
	fmt.Fprintf(w, "\nrun (%.2fs):\n", r.Run.ElapsedSec)
	writePhase(w, r.Run)
	if l := r.Run.SendLag; l != nil {
		fmt.Fprintf(w, "  sent late by (generator's share, not in the latency): p50 %.0f µs, p99 %.0f µs, max %.0f µs\n", l.P50, l.P99, l.Max)
	}
	if l := r.Run.LatencyFromDue; l != nil {
		fmt.Fprintf(w, "  latency from the intended send time (with the send lag): p50 %.0f µs, p99 %.0f µs, p99.9 %.0f µs\n", l.P50, l.P99, l.P999)
	}
	if l := r.Run.SendCall; l != nil {
		fmt.Fprintf(w, "  sendmmsg call (bound on the send stamp's error): p50 %.0f µs, p99 %.0f µs, max %.0f µs\n", l.P50, l.P99, l.Max)
	}
	if l := r.Run.Burst; l != nil {
		fmt.Fprintf(w, "  requests a wake-up: p50 %.0f, p99 %.0f, max %.0f; %d held for a free in-flight slot\n", l.P50, l.P99, l.Max, r.Run.WindowHeld)
	}
	if l := r.Run.RecvLag; l != nil {
		fmt.Fprintf(w, "  read late by (after the kernel's receive stamp, not in the latency): p50 %.0f µs, p99 %.0f µs, max %.0f µs\n", l.P50, l.P99, l.Max)
	}
	if c := r.Run.CPU; c != nil {
		fmt.Fprintf(w, "  generator CPU: user %.2fs sys %.2fs, %.1f µs a request\n", c.UserSec, c.SysSec, c.PerRequestUs)
	}
	fmt.Fprintf(w, "\nlive leases at the end (as this run knows them): %d\n", r.LiveLeases)
}

func writePhase(w io.Writer, p *phase) {
	fmt.Fprintf(w, "  %-9s %9s %9s %8s %8s %10s %8s %8s %8s %8s  %s\n",
		"op", "sent", "answered", "timeout", "senderr", "rate/s", "p50µs", "p90µs", "p99µs", "p99.9µs", "results")
	line := func(name string, s *opStats) {
		fmt.Fprintf(w, "  %-9s %9d %9d %8d %8d %10.0f %8.1f %8.1f %8.1f %8.1f  %s\n",
			name, s.Sent, s.Answered, s.Timeouts, s.SendErrors, s.RatePerSec,
			s.Latency.P50, s.Latency.P90, s.Latency.P99, s.Latency.P999, formatResults(s.Results))
	}
	for o := range numOps {
		if s, ok := p.Ops[op(o).String()]; ok {
			line(op(o).String(), s)
		}
	}
	line("total", &p.Total)
	if p.Unmatched > 0 {
		fmt.Fprintf(w, "  unmatched (late) replies: %d\n", p.Unmatched)
	}
	if p.Announces > 0 {
		fmt.Fprintf(w, "  unsolicited ANNOUNCEs received: %d\n", p.Announces)
	}
	if len(p.Fallbacks) > 0 {
		fmt.Fprintf(w, "  substituted ops (nothing live / no free slot): %s\n", formatResults(p.Fallbacks))
	}
}

func formatResults(m map[string]uint64) string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b strings.Builder
	for i, k := range keys {
		if i > 0 {
			b.WriteString(" ")
		}
		fmt.Fprintf(&b, "%s=%d", k, m[k])
	}
	return b.String()
}
