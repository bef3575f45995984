// Command driver runs the end-to-end benchmark behind BENCHMARKS.md
// "End to end (pcpload)": it builds a throwaway lab (internal/netlab: a
// client namespace and a tunnel-host namespace joined by a veth), then
// puts the two UDP echo floors (the batched one and issue 8's bare one,
// see bareFloor), pcpd and miniupnpd in turn on the host side at the same
// address and drives each with the same pcpload scenarios from the client
// side. The floors' and pcpd's closed loops run in rounds (--rounds,
// rounds.go), the server order rotated each round. It prints a markdown
// table of rates and of pcpd's ratios to both floors, each round's and
// their median (also written as table.md and table.json), and keeps every
// pcpload JSON report.
//
// Run it through bench/run (make bench), which builds the binaries. It
// needs root (namespaces, nftables) and removes everything it made.
package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/store"
)

// The load comes from addresses that exist only as a local route in the
// client namespace (pcpload binds them with IPV6_FREEBIND); the host
// routes them back via the client's one real address, so neither side
// keeps thousands of addresses or neighbour entries. Each simulated
// client sends from its own /64 (pcpload --per-prefix 64), as WireGuard
// peers own prefixes: pcpd rate-limits per /64 (PKT-08), and thousands of
// clients in one /64 would share one bucket of 50 requests/s.
var (
	srcPrefix    = netip.MustParsePrefix("2001:db8:1:4000::/50") // owned: 16384 /64s
	unauthPrefix = netip.MustParsePrefix("2001:db8:2:4000::/50") // owned by nobody
	ownedPrefix  = netip.MustParsePrefix("2001:db8:1::/48")      // pcpd --client load=
)

type options struct {
	pcpload, pcpd string
	servers       []string
	duration      time.Duration
	clients       int
	concurrency   int
	openInFlight  int
	timeout       time.Duration
	out           string
	scale         bool
	bigLeases     int
	scaleLeases   int
	pcpdArgs      []string
	pprofURL      string
	mupnpPrefill  int
	perf          bool
	perfLoad      bool
	scaleOnly     bool
	pcpdEnv       []string
	scenarios     map[string]bool // nil: all
	openRate      float64
	steadyRate    float64 // --steady-rate: the steady rows' rate (0: 80 % of each kind's own)
	openPre       time.Duration
	timeline      time.Duration
	metrics       string // pcpd --metrics ADDR (in the host namespace), scraped after each run
	stateRoot     string // where pcpd-state goes; "": the output directory
	fifo          bool   // run the server under test and pcpload as SCHED_FIFO (chrt -f 1)
	fifoLimit     time.Duration
	trace         time.Duration
	cpuProfile    time.Duration
	rounds        int // closed-loop rows measured in this many rounds (rounds.go)
	// Restart-only mode (restarts.go).
	restarts         int
	prepared         string
	preparedLifetime time.Duration
	pcpdB            []string
	restartKind      string
}

// want reports whether scenario key is to be run (--scenarios).
func (o *options) want(key string) bool { return o.scenarios == nil || o.scenarios[key] }

// runs reports whether runServer runs closed-loop scenario key: the ones
// asked for, and the new-MAP closed loop whenever the open loop needs
// its rate (open80 runs at 80 % of the server's own new-MAP maximum in
// the same run; without --open-rate, --scenarios open80 alone used to
// fail with "answered no new MAP").
func (o *options) runs(key string) bool {
	return o.want(key) || key == "new" && o.want("open80") && o.openRate <= 0 || o.steadyNeeds(key)
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

type listFlag []string

func (l *listFlag) String() string     { return strings.Join(*l, " ") }
func (l *listFlag) Set(s string) error { *l = append(*l, s); return nil }

func run(ctx context.Context, args []string) error {
	var o options
	fs := flag.NewFlagSet("driver", flag.ContinueOnError)
	fs.StringVar(&o.pcpload, "pcpload", "", "pcpload binary")
	fs.StringVar(&o.pcpd, "pcpd", "", "pcpd binary")
	servers := fs.String("servers", "floor,bare-floor,pcpd,miniupnpd", "servers to measure, in order: floor (pcpload floor, batched recvmmsg/sendmmsg, the stricter reference), bare-floor (pcpload floor --batch 1, issue 8's reference: a recvfrom and a sendto a datagram), pcpd, miniupnpd")
	fs.DurationVar(&o.duration, "duration", 5*time.Second, "length of each measured run")
	fs.IntVar(&o.rounds, "rounds", defaultRounds, "measure the closed-loop rows in this many rounds: in each, every server (miniupnpd only in the first) runs each closed-loop scenario on a fresh start, the order rotated between rounds; the table gives each round's ratio (pcpd over the same round's floor) and judges the median. 1: one pass, as before")
	fs.IntVar(&o.clients, "clients", 4096, "simulated clients (source addresses)")
	fs.IntVar(&o.concurrency, "concurrency", 32, "closed-loop clients in flight")
	fs.IntVar(&o.openInFlight, "open-inflight", 256, "open loop: most requests in flight")
	fs.DurationVar(&o.timeout, "timeout", time.Second, "a reply later than this is a loss")
	fs.StringVar(&o.out, "out", "bench/results", "directory for reports (a dated subdirectory is made)")
	fs.BoolVar(&o.scale, "scale", true, "pcpd only: also run with 100 000 and --big-leases live leases")
	fs.IntVar(&o.bigLeases, "big-leases", 1_000_000, "leases for the memory / start-up / listing figures")
	fs.IntVar(&o.scaleLeases, "scale-leases", 100_000, "leases the scale rows (…100k) grow to first; a small count (e.g. 4096) is a control for what the lease count costs: the same growth, settle and order, the table's labels unchanged")
	var extra, env listFlag
	fs.Var(&extra, "pcpd-arg", "extra argument for pcpd serve (repeatable)")
	fs.Var(&env, "pcpd-env", "NAME=VALUE in pcpd's environment, e.g. GODEBUG=gctrace=1 (repeatable)")
	fs.IntVar(&o.mupnpPrefill, "miniupnpd-prefill", 64, "leases renewed in miniupnpd's renewal run (it slows to a crawl with many)")
	fs.BoolVar(&o.scaleOnly, "scale-only", false, "pcpd: run only the lease-count figures (implies --scale)")
	fs.BoolVar(&o.perfLoad, "perf-load", false, "profile pcpload itself in each closed-loop row: perf stat of its context switches and read, write, socket, poll and futex system calls from 0.5 to 1.5 s into the measured phase (N-<server>-<scenario>.load.stat.txt), then perf record -g -F 999 for 2 s (N-<server>-<scenario>.load.perf.data, kept); for where the client's CPU a request goes")
	fs.BoolVar(&o.perf, "perf", false, "profile the server under test with perf(1) during each run (reports in the output directory)")
	scenarios := fs.String("scenarios", "", "comma-separated scenarios to run (malformed,unauth,renew,renew-wt,mixed,new,open80, and the steady open-loop rows open80-renew,open80-malformed,open80-unauth,open80-churn); empty: all")
	fs.Float64Var(&o.steadyRate, "steady-rate", 0, "run pcpd's steady open-loop rows (open80-renew, -malformed, -unauth, -churn) at this rate instead of 80 % of pcpd's closed-loop rate for the kind, without that closed loop (A/B pairs at one rate)")
	fs.Float64Var(&o.openRate, "open-rate", 0, "open loop at this rate instead of 80 % of the closed-loop new-MAP rate (lets open80 run alone, or at the same rate before and after a change)")
	fs.DurationVar(&o.openPre, "open-delay", 0, "open loop: wait this long after the fresh start before measuring (0: at once, as the table figure does; the start-up announcements then overlap the run)")
	fs.StringVar(&o.metrics, "metrics", "", "pcpd only: serve metrics on `ADDR` in the host namespace (e.g. 127.0.0.1:9400) and keep a scrape after each run (<server>-<scenario>.metrics.txt)")
	fs.StringVar(&o.stateRoot, "state-root", "", "pcpd only: put its state directory under `DIR` instead of the output directory, e.g. /dev/shm to take the disk's fsync latency out of a run (a diagnostic, not the table's figure)")
	fs.DurationVar(&o.timeline, "timeline", 0, "open loop: have pcpload report a timeline in buckets this long (in the JSON report)")
	fs.BoolVar(&o.fifo, "fifo", false, "run the server under test and pcpload at real-time priority (chrt -f 1), the same for every server: other tenants' processes on a shared machine then stop adding 10-100 ms stalls to the latency tail (a diagnostic; the kernel's own threads, e.g. the journal's, stay at normal priority)")
	fs.DurationVar(&o.fifoLimit, "fifo-limit", 2*time.Minute, "with --fifo: the most any real-time process may live (at most 10m): then it is set back to SCHED_OTHER and killed, and the kernel kills it sooner once it has used that much CPU (RLIMIT_CPU), so a stuck run cannot hold the machine")
	fs.DurationVar(&o.trace, "trace", 0, "pcpd open loop: take a Go execution trace of pcpd this long as the measured phase starts (pcpd-open80.trace; needs --metrics, sets PCPD_DEBUG_PPROF=1; view with go tool trace)")
	fs.DurationVar(&o.cpuProfile, "cpuprofile", 0, "pcpd closed loop: take a Go CPU profile of pcpd this long as each scenario's measured phase starts (pcpd-<scenario>.pprof; needs --metrics, sets PCPD_DEBUG_PPROF=1; bench/pgo merges them into cmd/pcpd/default.pgo)")
	var pcpdB listFlag
	fs.IntVar(&o.restarts, "restarts", 0, "restart-only mode (restarts.go): time this many starts of each pcpd build (--pcpd, --pcpd-b) on a copy of the state in --prepared, alternating; nothing else is run")
	fs.StringVar(&o.prepared, "prepared", "", "with --restarts: a state directory kept between runs; made (pcpd grown to --big-leases leases) when it holds no state file")
	fs.DurationVar(&o.preparedLifetime, "prepared-lifetime", 6*time.Hour, "with --restarts: the lifetime of the leases a new --prepared state is grown with")
	fs.Var(&pcpdB, "pcpd-b", "with --restarts: another pcpd build to time against --pcpd (repeatable)")
	fs.StringVar(&o.restartKind, "restart-kind", "normal", "with --restarts: normal (startbig), backup (leases.db damaged: the backup copy restored) or readonly (the state directory mounted read-only)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	o.pcpdB = pcpdB
	if err := o.checkFIFO(); err != nil {
		return err
	}
	if o.rounds < 1 {
		return fmt.Errorf("driver: --rounds %d: want at least 1", o.rounds)
	}
	if o.trace > 0 || o.cpuProfile > 0 {
		if o.metrics == "" {
			return errors.New("driver: --trace and --cpuprofile need --metrics")
		}
		env = append(env, "PCPD_DEBUG_PPROF=1")
	}
	if *scenarios != "" {
		o.scenarios = map[string]bool{}
		for _, k := range strings.Split(*scenarios, ",") {
			o.scenarios[strings.TrimSpace(k)] = true
		}
	}
	o.servers = strings.Split(*servers, ",")
	o.pcpdArgs = extra
	o.pcpdEnv = env
	if os.Geteuid() != 0 {
		return errors.New("driver: needs root (network namespaces, nftables)")
	}
	stamp := time.Now().UTC().Format("20060102-150405")
	// Absolute: pcpd serve refuses a relative --state-dir or --socket,
	// and both are derived from this directory.
	abs, err := filepath.Abs(filepath.Join(o.out, stamp))
	if err != nil {
		return err
	}
	o.out = abs
	if o.stateRoot != "" {
		if o.stateRoot, err = filepath.Abs(o.stateRoot); err != nil {
			return err
		}
	}
	if err := os.MkdirAll(o.out, 0o755); err != nil {
		return err
	}
	b := &bench{o: o, res: map[string]map[string]*figure{}}
	if o.stateRoot != "" {
		// Outside the results: not kept (on tmpfs it would hold memory).
		defer os.RemoveAll(b.pcpdStateDir())
	}
	if err := b.setup(); err != nil {
		return err
	}
	defer b.topo.Close()
	go func() { <-ctx.Done(); b.topo.Close(); os.Exit(130) }()
	if o.restarts > 0 {
		return b.runRestarts(ctx)
	}

	// The closed loops of the floors and pcpd, in rounds (rounds.go).
	inRounds := o.roundServers()
	for r := range o.rounds {
		order := roundOrder(inRounds, r)
		b.roundOrders = append(b.roundOrders, order)
		if o.rounds > 1 {
			b.logf("round %d of %d: %s", r+1, o.rounds, strings.Join(order, ", "))
		}
		for _, s := range order {
			if err := b.closedLoop(ctx, s, r, b.starter(s)); err != nil {
				b.logf("%s (round %d): %v", s, r+1, err)
				b.notes = append(b.notes, fmt.Sprintf("%s (round %d): %v", s, r+1, err))
			}
		}
	}
	b.foldRounds()
	// Then each server's open loop (at 80 % of its median new-MAP rate),
	// pcpd's lease-count figures, and miniupnpd.
	for _, s := range o.servers {
		var err error
		switch s {
		case batchedFloor, bareFloor:
			err = b.open80(ctx, s, b.starter(s))
		case "pcpd":
			if !o.scaleOnly {
				err = b.open80(ctx, s, b.starter(s))
				// The steady rows, each at 80 % of pcpd's own closed-loop
				// rate for its kind (steady.go); their errors are noted
				// per row.
				b.openSteady(ctx, b.starter(s))
			}
			if err == nil && (o.scale || o.scaleOnly) {
				err = b.runScale(ctx)
			}
		case "miniupnpd":
			err = b.runServer(ctx, "miniupnpd", b.starter(s))
		default:
			err = fmt.Errorf("driver: unknown server %q", s)
		}
		if err != nil {
			b.logf("%s: %v", s, err)
			b.notes = append(b.notes, fmt.Sprintf("%s: %v", s, err))
		}
	}
	// The floors at pcpd's own open-loop rate: their open80 runs at their
	// own 80 % (three to four times pcpd's rate), which says little
	// about how much of pcpd's tail the bed adds at pcpd's load.
	for _, fl := range []string{batchedFloor, bareFloor} {
		if b.pcpdOpenRate > 0 && slices.Contains(o.servers, fl) {
			if err := b.openLoop(ctx, fl, "open80-at-pcpd", b.floorStarter(fl), b.pcpdOpenRate); err != nil {
				b.notes = append(b.notes, fmt.Sprintf("%s open80-at-pcpd: %v", fl, err))
			}
		}
	}
	b.steadyFloors(ctx)
	table := b.table()
	fmt.Print(table)
	js, err := json.MarshalIndent(b.tableJSON(), "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(o.out, "table.json"), append(js, '\n'), 0o644); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(o.out, "table.md"), []byte(table), 0o644)
}

// figure is one measured number (with the run it came from).
type figure struct {
	value float64
	unit  string
	note  string
}

type bench struct {
	o        options
	topo     *netlab.Topology
	server   netip.AddrPort
	res      map[string]map[string]*figure // server → figure name → value
	notes    []string
	log      *os.File
	cur      server // the server under test, for perf
	loadRows int    // rows profiled by --perf-load so far
	// rounds holds the closed-loop figures of each round (putRound):
	// server → figure name → one per round (nil: not measured then);
	// foldRounds puts their medians into res. roundOrders is each
	// round's server order, round the one running (0-based).
	rounds      map[string]map[string][]*figure
	roundOrders [][]string
	round       int
	// tag marks the reports of a round when there are several (".r2":
	// pcpd-new.r2.json); profiles (--perf, --perf-load, --cpuprofile)
	// are taken in the first round only.
	tag string
	// pcpdOpenRate is the rate of pcpd's open80 run, at which the floor
	// runs the open loop again (open80-at-pcpd): the same offered load.
	pcpdOpenRate float64
	// steadyRate is the rate of each of pcpd's steady open-loop rows
	// (steadyRows, by key), at which the floors then run the same row.
	steadyRate map[string]float64
}

// server is a server under test.
type server interface {
	pid() int
	stop(syscall.Signal)
}

func (b *bench) path(name string) string { return filepath.Join(b.o.out, name) }

func runOut(name string, args ...string) (string, error) {
	out, err := exec.Command(name, args...).Output()
	return string(out), err
}

func (b *bench) logf(format string, args ...any) {
	msg := fmt.Sprintf("%s "+format+"\n", append([]any{time.Now().Format("15:04:05")}, args...)...)
	os.Stderr.WriteString(msg)
	if b.log != nil {
		b.log.WriteString(msg)
	}
}

func (b *bench) put(server, name string, v float64, unit, note string) {
	if b.res[server] == nil {
		b.res[server] = map[string]*figure{}
	}
	b.res[server][name] = &figure{value: v, unit: unit, note: note}
}

func (b *bench) setup() error {
	var err error
	b.log, err = os.Create(filepath.Join(b.o.out, "driver.log"))
	if err != nil {
		return err
	}
	b.topo, err = netlab.BuildTopology(netlab.TopologyOptions{})
	if err != nil {
		return err
	}
	t := b.topo
	b.server = netip.AddrPortFrom(t.HostTunnelV6, pcp.Port)
	for _, p := range []netip.Prefix{srcPrefix, unauthPrefix} {
		if _, err := t.Client.Run("ip", "-6", "route", "add", "local", p.String(), "dev", "lo"); err != nil {
			t.Close()
			return err
		}
		if _, err := t.Host.Run("ip", "-6", "route", "add", p.String(), "via", t.ClientV6.String(), "dev", t.HostLANIf); err != nil {
			t.Close()
			return err
		}
	}
	// The client's whole prefix (pcpd --client load=) is routed to it, as
	// a tunnel host routes each client's delegated prefix (WireGuard
	// AllowedIPs, a static route). Without this route the host routed
	// only pieces of the /48 (the LAN /64, the load's /50), so pcpd's
	// route check found no one interface for the owner and its owner
	// chain made a fib lookup for every request from the load's
	// sources (BENCHMARKS.md "What changed" 28).
	if _, err := t.Host.Run("ip", "-6", "route", "add", ownedPrefix.String(), "via", t.ClientV6.String(), "dev", t.HostLANIf); err != nil {
		t.Close()
		return err
	}
	b.logf("lab: client %s, host %s (%s), server %s", t.Client.Name, t.Host.Name, t.HostLANIf, b.server)
	return nil
}

// proc is a server under test.
type proc struct {
	cmd   *exec.Cmd
	logf  *os.File
	watch *time.Timer // --fifo: demotes and kills the process at the limit
	name  string
	// grace is how long stop waits after its signal before SIGKILL
	// (stopGrace unless a test sets it); say, if set, logs a stop that
	// took long or had to kill.
	grace time.Duration
	say   func(format string, args ...any)
	// What the last stop saw: how long the process took to exit, and
	// whether the grace ran out and SIGKILL ended it.
	stopped time.Duration
	killed  bool
}

func (p *proc) pid() int { return p.cmd.Process.Pid }

// stopGrace bounds a server's shutdown after SIGTERM. pcpd's shutdown
// writes the state backup copy and a final checkpoint: at 1 000 000
// leases a copy of the ≈ 231 MB state file with its fsync: 0.53-0.66 s
// in the 2026-12-05 10:07 run (stopbig in the results), longer when the
// disk is shared and busy. The old bound, 10 s, could cut that short, leaving the next
// start (startbig, the backup and read-only rows) a different state than
// the one the row names; 60 s leaves room for 231 MB at 4 MB/s, and a
// server that is stuck still ends.
const stopGrace = 60 * time.Second

// sigName names the signals stop is sent ("terminated" says less).
func sigName(sig syscall.Signal) string {
	switch sig {
	case syscall.SIGTERM:
		return "SIGTERM"
	case syscall.SIGINT:
		return "SIGINT"
	case syscall.SIGKILL:
		return "SIGKILL"
	}
	return sig.String()
}

// stopLogAfter: a stop that takes longer is logged with its duration.
const stopLogAfter = 500 * time.Millisecond

// stop ends the process group: sig, then SIGKILL after the grace (which
// it logs: the server's shutdown was cut short).
func (p *proc) stop(sig syscall.Signal) {
	if p.watch != nil {
		p.watch.Stop()
	}
	grace := p.grace
	if grace <= 0 {
		grace = stopGrace
	}
	t0 := time.Now()
	syscall.Kill(-p.cmd.Process.Pid, sig)
	done := make(chan struct{})
	go func() { p.cmd.Wait(); close(done) }()
	p.killed = false
	select {
	case <-done:
	case <-time.After(grace):
		p.killed = true
		syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
		<-done
	}
	p.stopped = time.Since(t0)
	if p.say != nil {
		switch {
		case p.killed:
			p.say("%s: still running %s after %s: SIGKILL (its shutdown was cut short)", p.name, grace, sigName(sig))
		case p.stopped >= stopLogAfter:
			p.say("%s: exited %s after %s", p.name, p.stopped.Round(time.Millisecond), sigName(sig))
		}
	}
	if p.logf != nil {
		p.logf.Close()
	}
}

func (b *bench) startIn(ns *netlab.NS, name string, args ...string) (*proc, error) {
	lf, err := os.OpenFile(filepath.Join(b.o.out, name+".log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	if b.o.fifo {
		args = fifoArgs(b.o.fifoLimit, args)
	}
	fmt.Fprintf(lf, "# %s: %s\n", time.Now().Format(time.RFC3339), strings.Join(args, " "))
	cmd, err := ns.Start(func(c *exec.Cmd) { c.Stdout, c.Stderr = lf, lf }, args...)
	if err != nil {
		lf.Close()
		return nil, err
	}
	p := &proc{cmd: cmd, logf: lf, name: name, say: b.logf}
	if b.o.fifo {
		p.watch = b.fifoWatch(cmd.Process.Pid, name)
	}
	b.cur = p
	return p, nil
}

// floorStarter starts the floor named name: pcpload floor with its
// default batches (batchedFloor) or with --batch 1 (bareFloor).
func (b *bench) floorStarter(name string) func(fresh bool) (server, error) {
	return func(fresh bool) (server, error) {
		p, err := b.startIn(b.topo.Host, name, b.floorArgs(name)...)
		if err != nil {
			return nil, err
		}
		return p, nil
	}
}

// floorArgs is the command line of the floor named name.
func (b *bench) floorArgs(name string) []string {
	args := []string{b.o.pcpload, "floor", "--listen", b.server.String()}
	if name == bareFloor {
		args = append(args, "--batch", "1")
	}
	return args
}

func (b *bench) pcpdStateDir() string {
	if b.o.stateRoot != "" {
		return filepath.Join(b.o.stateRoot, "pcpd-state-"+filepath.Base(b.o.out))
	}
	return filepath.Join(b.o.out, "pcpd-state")
}

// pcpdSocket is beside the state directory, not in it: the
// rssbig-readonly-peak row mounts that read-only.
func (b *bench) pcpdSocket() string { return b.path("pcpd.sock") }

// startPcpd starts pcpd serve on the host side with static ownership of
// the client's /64; fresh wipes its state first.
func (b *bench) startPcpd(fresh bool) (server, error) {
	if b.o.pcpd == "" {
		return nil, errors.New("no pcpd binary (cmd/pcpd did not build)")
	}
	if fresh {
		if err := wipeStateDir(b.pcpdStateDir()); err != nil {
			return nil, err
		}
		// Leftover pinholes of a previous pcpd would be reconciled away;
		// deleting the table makes the fresh start independent of that.
		b.topo.Host.Run("nft", "delete", "table", "inet", "pcpdbench")
	}
	if err := os.MkdirAll(b.pcpdStateDir(), 0o700); err != nil {
		return nil, err
	}
	big := strconv.Itoa(4 * b.o.bigLeases)
	args := []string{b.o.pcpd, "serve",
		"--interface", b.topo.HostLANIf,
		"--client", "load=" + ownedPrefix.String(),
		"--state-dir", b.pcpdStateDir(),
		"--socket", b.pcpdSocket(),
		"--nft-table", "pcpdbench",
		"--max-leases", big,
		"--max-leases-per-client", big,
		// One log line per decision (the default, info) would measure the
		// logger; a production tunnel host under load would run at warn.
		"--log-level", "warn",
		// The write-through renewal scenario (renew-wt) asks for 4 s; the
		// others ask for an hour, which this does not change.
		"--min-lifetime", "1s",
		// The kernel's per-client meter (400/s by default) would hold
		// the bench's 4096 simulated clients, one static client "load"
		// here, to one client's rate. Out of reach, its rule still runs
		// on every request, so its cost is in the figures.
		"--kernel-owner-rate-limit", "16000000",
		// Likewise the kernel's one bucket for the sources nobody owns
		// (400/s by default), which would hold the unauth scenario's
		// requests, all from unauthPrefix, to 400 a second.
		"--kernel-unowned-rate-limit", "16000000",
	}
	if b.o.metrics != "" {
		args = append(args, "--metrics", b.o.metrics)
	}
	args = append(args, b.o.pcpdArgs...)
	if len(b.o.pcpdEnv) > 0 {
		args = append(append([]string{"env"}, b.o.pcpdEnv...), args...)
	}
	p, err := b.startIn(b.topo.Host, "pcpd", args...)
	if err != nil {
		return nil, err
	}
	return p, nil
}

// waitServing sends ANNOUNCE from the client's own address every 20 ms
// until the server answers, and returns how long that took.
func (b *bench) waitServing(timeout time.Duration) (time.Duration, error) {
	var conn *net.UDPConn
	err := b.topo.Client.Do(func() (err error) {
		conn, err = net.DialUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(b.topo.ClientV6, 0)), net.UDPAddrFromAddrPort(b.server))
		return err
	})
	if err != nil {
		return 0, err
	}
	defer conn.Close()
	req := pcp.AppendRequest(nil, &pcp.Request{Opcode: pcp.OpAnnounce, ClientAddr: b.topo.ClientV6})
	buf := make([]byte, 2048)
	t0 := time.Now()
	for time.Since(t0) < timeout {
		conn.Write(req)
		conn.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
		if _, err := conn.Read(buf); err == nil {
			return time.Since(t0), nil
		}
		var ne net.Error
		if err != nil && !(errors.As(err, &ne) && ne.Timeout()) {
			time.Sleep(20 * time.Millisecond) // ECONNREFUSED: not listening yet
		}
	}
	return 0, fmt.Errorf("driver: %s did not answer ANNOUNCE within %s", b.server, timeout)
}

// loadReport is the part of pcpload's JSON the driver reads.
type loadReport struct {
	Prefill *loadPhase `json:"prefill"`
	Run     *loadPhase `json:"run"`
	// The leases pcpload believed live as the measured phase began and
	// at its end.
	LiveAtStart int `json:"live_leases_at_start"`
	LiveLeases  int `json:"live_leases"`
}

type loadPhase struct {
	ElapsedSec float64 `json:"elapsed_s"`
	CPU        *struct {
		UserSec      float64 `json:"user_s"`
		SysSec       float64 `json:"sys_s"`
		PerRequestUs float64 `json:"us_per_request"`
	} `json:"cpu"`
	// ServerCPUUs is the server's CPU per request over the run (the
	// driver's, from /proc; not in pcpload's JSON).
	ServerCPUUs float64 `json:"-"`
	// OthersCores is the CPU the machine's other processes used over the
	// run, in cores (othersCPU; the driver's, not in pcpload's JSON).
	OthersCores float64              `json:"-"`
	Total       loadStats            `json:"total"`
	Ops         map[string]loadStats `json:"ops"`
	// The open loop's: the latency from the intended send time (the
	// measure before 2026-12-03; Total's runs from the send), how late
	// the requests went out, and how many a wake-up sent.
	LatencyFromDue map[string]float64 `json:"latency_from_due_us"`
	SendLag        map[string]float64 `json:"send_lag_us"`
	Burst          map[string]float64 `json:"burst"`
}

type loadStats struct {
	Sent       uint64             `json:"sent"`
	Answered   uint64             `json:"answered"`
	Timeouts   uint64             `json:"timeouts"`
	SendErrors uint64             `json:"send_errors"`
	Results    map[string]uint64  `json:"results"`
	Latency    map[string]float64 `json:"latency_us"`
	Rate       float64            `json:"rate_per_s"`
}

func (s loadStats) String() string {
	return fmt.Sprintf("%.0f/s sent %d answered %d timeouts %d p50 %.0fµs p99 %.0fµs p99.9 %.0fµs %v",
		s.Rate, s.Sent, s.Answered, s.Timeouts, s.Latency["p50"], s.Latency["p99"], s.Latency["p99_9"], s.Results)
}

// load runs pcpload in the client namespace and keeps its JSON report.
func (b *bench) load(ctx context.Context, server, name string, args ...string) (*loadReport, error) {
	full := []string{"ip", "netns", "exec", b.topo.Client.Name, b.o.pcpload, "run",
		"--server", b.server.String(),
		"--src", srcPrefix.String(),
		"--unauth-src", unauthPrefix.String(),
		"--per-prefix", "64",
		"--clients", strconv.Itoa(b.o.clients),
		"--timeout", b.o.timeout.String(),
		"--mark",
		"--probe-timeout", "60s",
		"--json"}
	full = append(full, args...)
	b.logf("%s %s: %s", server, name, strings.Join(full[4:], " "))
	if b.o.fifo {
		full = append(full[:4:4], fifoArgs(b.o.fifoLimit, full[4:])...)
	}
	cmd := exec.CommandContext(ctx, full[0], full[1:]...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout = &stdout
	errPipe, err := cmd.StderrPipe()
	if err != nil {
		return nil, err
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("driver: pcpload %s: %w", name, err)
	}
	if b.o.fifo {
		defer b.fifoWatch(cmd.Process.Pid, "pcpload "+name).Stop()
	}
	var perfDone, loadPerfDone chan struct{}
	var srvCPU0, srvWait0 time.Duration
	var box0 boxTicks
	srvMeasured := false
	sc := bufio.NewScanner(errPipe)
	for sc.Scan() {
		line := sc.Text()
		if line == "pcpload: measuring" {
			if b.o.perfLoad && b.round == 0 && b.o.duration >= 5*time.Second && loadPerfDone == nil {
				loadPerfDone = make(chan struct{})
				b.loadRows++ // a server measured twice (floor,pcpd,floor) keeps both
				row := fmt.Sprintf("%d-%s-%s", b.loadRows, server, name)
				go func() { defer close(loadPerfDone); b.profileLoad(row, cmd.Process.Pid) }()
			}
			if b.cur != nil {
				srvCPU0, srvMeasured = procCPU(b.cur.pid()), true
				srvWait0 = procRunWait(b.cur.pid())
				box0 = boxCPU()
			}
			if b.o.trace > 0 && server == "pcpd" && name == "open80" && perfDone == nil {
				perfDone = make(chan struct{})
				go func() {
					defer close(perfDone)
					url := fmt.Sprintf("http://%s/debug/pprof/trace?seconds=%g", b.o.metrics, b.o.trace.Seconds())
					if _, err := b.topo.Host.Run("curl", "-sS", "--max-time", "60", "-o", filepath.Join(b.o.out, server+"-"+name+".trace"), url); err != nil {
						b.logf("trace: %v", err)
					}
				}()
				continue
			}
			if b.o.cpuProfile > 0 && server == "pcpd" && name != "open80" && b.round == 0 && perfDone == nil {
				perfDone = make(chan struct{})
				go func() {
					defer close(perfDone)
					url := fmt.Sprintf("http://%s/debug/pprof/profile?seconds=%d", b.o.metrics, max(int(b.o.cpuProfile.Seconds()), 1))
					if _, err := b.topo.Host.Run("curl", "-sS", "--fail", "--max-time", "60", "-o", filepath.Join(b.o.out, server+"-"+name+".pprof"), url); err != nil {
						b.logf("cpuprofile: %v", err)
					}
				}()
				continue
			}
			if b.o.perf && b.round == 0 && b.cur != nil && b.o.duration >= 3*time.Second && perfDone == nil {
				perfDone = make(chan struct{})
				go func() { defer close(perfDone); b.profile(server+"-"+name, b.cur.pid()) }()
			}
			continue
		}
		stderr.WriteString(line + "\n")
	}
	err = cmd.Wait()
	var srvCPU, srvWait time.Duration
	var idleFrac float64
	var box1 boxTicks
	if b.cur != nil && srvMeasured {
		box1 = boxCPU()
		idleFrac = float64(box1.idle-box0.idle) / float64(max(box1.all-box0.all, 1))
		srvCPU = procCPU(b.cur.pid()) - srvCPU0
		srvWait = procRunWait(b.cur.pid()) - srvWait0
	}
	if perfDone != nil {
		<-perfDone
	}
	if loadPerfDone != nil {
		<-loadPerfDone
	}
	if err != nil {
		return nil, fmt.Errorf("driver: pcpload %s: %v: %s", name, err, bytes.TrimSpace(stderr.Bytes()))
	}
	os.WriteFile(filepath.Join(b.o.out, server+"-"+name+b.tag+".json"), stdout.Bytes(), 0o644)
	if b.o.metrics != "" && server == "pcpd" {
		// The counters and histograms are cumulative since pcpd's start.
		if out, err := b.topo.Host.Run("curl", "-sS", "--max-time", "5", "http://"+b.o.metrics+"/metrics"); err != nil {
			b.logf("metrics: %v", err)
		} else {
			os.WriteFile(filepath.Join(b.o.out, server+"-"+name+b.tag+".metrics.txt"), []byte(out), 0o644)
		}
	}
	var r loadReport
	if err := json.Unmarshal(stdout.Bytes(), &r); err != nil {
		return nil, fmt.Errorf("driver: pcpload %s: %w", name, err)
	}
	if r.Prefill != nil {
		b.logf("  prefill: %s", r.Prefill.Total)
	}
	b.logf("  run:     %s", r.Run.Total)
	if n := float64(max(r.Run.Total.Sent, 1)); r.Run.CPU != nil {
		// Both sides' CPU per request: on a 2-core box their sum
		// decides the highest rate the pair can carry at all.
		r.Run.ServerCPUUs = float64(srvCPU.Microseconds()) / n
		b.logf("  cpu:     %s %.1f µs a request (%.2f cores), pcpload %.1f µs (%.2f cores)", server,
			r.Run.ServerCPUUs, srvCPU.Seconds()/max(r.Run.ElapsedSec, 1e-9),
			r.Run.CPU.PerRequestUs, (r.Run.CPU.UserSec+r.Run.CPU.SysSec)/max(r.Run.ElapsedSec, 1e-9))
		// Time the server's threads were ready to run but waited for a
		// core: on a shared box, the other tenants' (and pcpload's) share
		// of its latency.
		others := ""
		if r.Run.ElapsedSec >= minOthersRun.Seconds() {
			o := othersCPU(box0, box1, srvCPU, time.Duration((r.Run.CPU.UserSec+r.Run.CPU.SysSec)*float64(time.Second)))
			r.Run.OthersCores = o.Seconds() / r.Run.ElapsedSec
			others = fmt.Sprintf(", other processes %.2f cores", r.Run.OthersCores)
		}
		b.logf("  wait:    %s threads runnable but not running %.0f ms in all (%.1f%% of the run's wall time, summed over threads); machine %.0f%% idle%s",
			server, float64(srvWait.Microseconds())/1e3, 100*srvWait.Seconds()/max(r.Run.ElapsedSec, 1e-9), 100*idleFrac, others)
	}
	return &r, nil
}

// profile samples pid with perf(1) for the middle of a run (after the
// prefill and probe, 1 s before the end) and keeps two views: the hottest
// functions, and the call tree with children's time included, which shows
// where in pcpd's own code the time goes.
func (b *bench) profile(name string, pid int) {
	time.Sleep(time.Second) // past the start-up of the run
	data := filepath.Join(b.o.out, name+".perf.data")
	secs := fmt.Sprintf("%.1f", (b.o.duration - 2*time.Second).Seconds())
	if out, err := exec.Command("perf", "record", "-F", "499", "-g", "-p", strconv.Itoa(pid), "-o", data, "--", "sleep", secs).CombinedOutput(); err != nil {
		b.logf("perf record: %v: %s", err, bytes.TrimSpace(out))
		return
	}
	defer os.Remove(data)
	var report bytes.Buffer
	for _, args := range [][]string{
		{"--no-children", "--sort", "dso,symbol", "-g", "none", "--percent-limit", "0.7"},
		{"--children", "--sort", "symbol", "-g", "none", "--percent-limit", "3"},
	} {
		out, _ := exec.Command("perf", append([]string{"report", "-i", data, "--stdio"}, args...)...).Output()
		for _, line := range strings.Split(string(out), "\n") {
			if strings.Contains(line, "%") || strings.HasPrefix(line, "# Samples") || strings.HasPrefix(line, "# Event count") {
				report.WriteString(strings.TrimRight(line, " -") + "\n")
			}
		}
		report.WriteString("\n")
	}
	os.WriteFile(filepath.Join(b.o.out, name+".perf.txt"), report.Bytes(), 0o644)
}

// profileLoad samples pcpload (pid: ip netns exec execs it, so the pid
// is pcpload's) for --perf-load: counts of its context switches and
// system calls from 0.5 to 1.5 s into the measured phase, then a
// call-graph profile from ≈ 1.7 to 3.7 s (recording's start-up and the
// write-out stay inside the 5-s run). perf -p counts the softirq work the kernel
// runs in pcpload's context (on veth, the receive path of the other
// namespace runs in the sender's system call).
func (b *bench) profileLoad(name string, pid int) {
	time.Sleep(500 * time.Millisecond)
	ev := "task-clock,context-switches,cpu-migrations"
	for _, sc := range []string{"write", "read", "sendto", "recvfrom", "sendmmsg", "recvmmsg", "epoll_pwait", "futex", "nanosleep", "sched_yield"} {
		ev += ",syscalls:sys_enter_" + sc
	}
	out, err := exec.Command("perf", "stat", "-x", ",", "-e", ev, "-p", strconv.Itoa(pid), "--", "sleep", "1").CombinedOutput()
	if err != nil {
		b.logf("perf stat (pcpload): %v: %s", err, bytes.TrimSpace(out))
	}
	os.WriteFile(filepath.Join(b.o.out, name+".load.stat.txt"), out, 0o644)
	time.Sleep(200 * time.Millisecond)
	data := filepath.Join(b.o.out, name+".load.perf.data")
	if out, err := exec.Command("perf", "record", "-F", "999", "-g", "-p", strconv.Itoa(pid), "-o", data, "--", "sleep", "2").CombinedOutput(); err != nil {
		b.logf("perf record (pcpload): %v: %s", err, bytes.TrimSpace(out))
	}
}

func (b *bench) dur() string { return b.o.duration.String() }

// starter is the start function of the server named name.
func (b *bench) starter(name string) func(fresh bool) (server, error) {
	switch name {
	case "pcpd":
		return b.startPcpd
	case "miniupnpd":
		return b.startMiniupnpd
	}
	return b.floorStarter(name)
}

// runServer measures one server once: every closed-loop scenario on a
// fresh start, then (restarted fresh, so the lease count is small again)
// the open loop at 80 % of the server's own new-MAP rate. miniupnpd's
// path; the floors and pcpd run their closed loops in rounds.
func (b *bench) runServer(ctx context.Context, name string, start func(fresh bool) (server, error)) error {
	err := b.closedLoop(ctx, name, 0, start)
	b.foldRounds()
	if err != nil {
		return err
	}
	return b.open80(ctx, name, start)
}

// closedLoop runs every closed-loop scenario on a fresh start of the
// server as round r (0-based) of the run's rounds.
func (b *bench) closedLoop(ctx context.Context, name string, r int, start func(fresh bool) (server, error)) error {
	b.round = r
	if b.o.rounds > 1 && slices.Contains(b.o.roundServers(), name) {
		b.tag = fmt.Sprintf(".r%d", r+1)
	}
	defer func() { b.round, b.tag = 0, "" }()
	p, err := start(true)
	if err != nil {
		return err
	}
	if d, err := b.waitServing(30 * time.Second); err != nil {
		p.stop(syscall.SIGTERM)
		return err
	} else {
		b.logf("%s: serving after %s", name, d.Round(time.Millisecond))
	}
	c := strconv.Itoa(b.o.concurrency)
	prefill := b.o.clients
	if name == "miniupnpd" {
		prefill = b.o.mupnpPrefill
	}
	type scen struct {
		key  string
		args []string
	}
	scens := []scen{
		{"malformed", []string{"--mix", "malformed=100", "--concurrency", c, "--duration", b.dur()}},
		{"unauth", []string{"--mix", "unauth=100", "--concurrency", c, "--duration", b.dur()}},
		{"renew", []string{"--mix", "renew=100", "--concurrency", c, "--duration", b.dur(),
			"--prefill", strconv.Itoa(prefill), "--port-base", "20000", "--ports", "1"}},
		// Renewals pcpd cannot absorb (server/absorb.go): a 4 s lifetime
		// leaves less than the 5 s an absorbed renewal needs in the kernel
		// and the store, so each is a kernel transaction and a store
		// commit, as every renewal was before. pcpd runs with
		// --min-lifetime 1s (startPcpd) so that 4 s is granted.
		{"renew-wt", []string{"--mix", "renew=100", "--concurrency", c, "--duration", b.dur(), "--lifetime", "4s",
			"--prefill", strconv.Itoa(prefill), "--port-base", "22000", "--ports", "1"}},
		{"mixed", []string{"--mix", "new=20,renew=60,delete=10,malformed=5,unauth=5", "--concurrency", c,
			"--duration", b.dur(), "--prefill", strconv.Itoa(prefill), "--port-base", "21000", "--ports", "16"}},
		{"new", []string{"--mix", "new=100", "--concurrency", c, "--duration", b.dur(), "--port-base", "30000", "--ports", "256"}},
	}
	for _, s := range scens {
		if !b.o.runs(s.key) {
			continue
		}
		res, err := b.load(ctx, name, s.key, s.args...)
		if err != nil {
			// One scenario that the server cannot answer (miniupnpd stops
			// answering at all after a few thousand requests) must not
			// cost the rest of its row: note it, start the server afresh
			// and go on.
			b.logf("%s %s%s: %v", name, s.key, b.tag, err)
			b.notes = append(b.notes, fmt.Sprintf("%s %s%s: %v", name, s.key, b.tag, err))
			p.stop(syscall.SIGTERM)
			if p, err = start(true); err != nil {
				return err
			}
			if _, err := b.waitServing(30 * time.Second); err != nil {
				p.stop(syscall.SIGTERM)
				return err
			}
			continue
		}
		st := res.Run.Total
		b.putRound(name, s.key, r, st.Rate, "/s", rowNote(res.Run))
		b.putRound(name, s.key+"-p99", r, st.Latency["p99"], "µs", "")
		if s.key == "renew" && res.Prefill != nil {
			b.putRound(name, "prefill", r, res.Prefill.Total.Rate, "/s", lossNote(res.Prefill.Total))
		}
	}
	p.stop(syscall.SIGTERM)
	return nil
}

// open80 runs the open loop on a fresh start at 80 % of the server's
// own new-MAP rate (its median over the rounds; --open-rate instead).
func (b *bench) open80(ctx context.Context, name string, start func(fresh bool) (server, error)) error {
	if !b.o.want("open80") {
		return nil
	}
	var newRate float64
	if f := b.get(name, "new"); f != nil {
		newRate = f.value
	}
	rate := 0.8 * newRate
	if b.o.openRate > 0 {
		rate = b.o.openRate
	}
	if rate < 1 {
		return fmt.Errorf("driver: %s answered no new MAP: no open-loop run", name)
	}
	return b.openLoop(ctx, name, "open80", start, rate)
}

// openLoop runs the open loop (mix new=100) at rate against a fresh start
// of the server and records its latency as key-p99: the growth row, from
// no lease to rate × duration of them.
func (b *bench) openLoop(ctx context.Context, name, key string, start func(fresh bool) (server, error), rate float64) error {
	return b.openRun(ctx, name, key, start, rate, b.o.openPre,
		[]string{"--mix", "new=100", "--port-base", "30000", "--ports", "256"})
}

// openRun runs pcpload's open loop with shape (its mix, slots, prefill)
// at rate against a fresh start of the server, after waiting delay from
// that start, and records its latency as key-p99, with the lease counts
// before and after the measured phase in the note.
func (b *bench) openRun(ctx context.Context, name, key string, start func(fresh bool) (server, error), rate float64, delay time.Duration, shape []string) error {
	p, err := start(true)
	if err != nil {
		return err
	}
	started := time.Now()
	defer p.stop(syscall.SIGTERM)
	if _, err := b.waitServing(30 * time.Second); err != nil {
		return err
	}
	if d := delay - time.Since(started); d > 0 {
		time.Sleep(d)
	}
	args := append([]string{"--rate", fmt.Sprintf("%.0f", rate),
		"--concurrency", strconv.Itoa(min(b.o.openInFlight, b.o.clients)), "--duration", b.dur()}, shape...)
	if b.o.timeline > 0 {
		args = append(args, "--timeline", b.o.timeline.String())
	}
	b.logf("%s %s: server started at %s", name, key, started.UTC().Format(time.RFC3339Nano))
	r, err := b.load(ctx, name, key, args...)
	if err != nil {
		return err
	}
	st := r.Run.Total
	cpu := ""
	if c := r.Run.CPU; c != nil {
		cpu = fmt.Sprintf("; CPU a request: %s %.0f µs, pcpload %.0f µs", name, r.Run.ServerCPUUs, c.PerRequestUs)
	}
	leases := ""
	if name == "pcpd" {
		// The lease count the figure was measured at (the floors keep
		// none): pcpload's books, and pcpd's own count after the run.
		listed := -1
		if _, n, err := b.timeLeases(); err == nil {
			listed = n
		} else {
			b.logf("%s %s: %v", name, key, err)
		}
		leases = leaseNote(r, listed)
	}
	b.put(name, key+"-p99", st.Latency["p99"], "µs", fmt.Sprintf("at %.0f/s; p50 %.0f µs, p99.9 %.0f µs%s%s%s%s%s", rate, st.Latency["p50"], st.Latency["p99_9"], lossSuffix(st), leases, opsNote(r.Run), fromDue(r.Run), cpu))
	if name == "pcpd" && key == "open80" {
		b.pcpdOpenRate = rate
	}
	return nil
}

// fromDue is the open loop's old measure (from the intended send time,
// the send lag included) for the table's note.
func fromDue(p *loadPhase) string {
	if p.LatencyFromDue == nil {
		return ""
	}
	return fmt.Sprintf("; from the intended send time p50 %.0f µs, p99 %.0f µs, p99.9 %.0f µs (send lag p99 %.0f µs)",
		p.LatencyFromDue["p50"], p.LatencyFromDue["p99"], p.LatencyFromDue["p99_9"], p.SendLag["p99"])
}

func lossNote(s loadStats) string {
	lost := s.Timeouts + s.SendErrors
	if lost == 0 {
		return ""
	}
	return fmt.Sprintf("%.2f%% lost", 100*float64(lost)/float64(max(s.Sent, 1)))
}

// crowdedCores is how much of the machine other processes must have used
// during a closed-loop row for its figure to say so (rowNote): a tenth of
// a core, 5 % of the 2-core box, is where a row's rate starts to follow
// them (BENCHMARKS.md item 32).
const crowdedCores = 0.1

// minOthersRun is the shortest measured phase others' CPU is reckoned
// for: /proc/stat counts 10-ms ticks, and a phase of one request (the
// growth rows' run after their prefill) would divide a tick by nothing.
const minOthersRun = time.Second

// rowNote is a closed-loop row's note: its losses, and the other
// processes' CPU when they used crowdedCores or more, so that a table
// shows which ratios were measured beside someone else's work.
func rowNote(p *loadPhase) string {
	var n []string
	if l := lossNote(p.Total); l != "" {
		n = append(n, l)
	}
	if p.OthersCores >= crowdedCores {
		n = append(n, fmt.Sprintf("others %.2f cores", p.OthersCores))
	}
	return strings.Join(n, "; ")
}

func lossSuffix(s loadStats) string {
	if n := lossNote(s); n != "" {
		return "; " + n
	}
	return ""
}

// scaleRows are the closed-loop rows at 100 000 leases, in the order
// runScale measures them: the error rows, which write nothing, before the
// rows that add leases (TestScaleRowsOrder).
var scaleRows = []struct{ key, mix, base, ports string }{
	{"malformed100k", "malformed=100", "", ""},
	{"unauth100k", "unauth=100", "", ""},
	{"renew100k", "renew=100", "20000", "1"},
	{"new100k", "new=100", "30000", "256"},
}

// runScale grows pcpd to 100 000 live leases, measures the closed-loop
// rates again, times `pcpd leases --json`, then grows to bigLeases and
// reads memory and the restart time.
func (b *bench) runScale(ctx context.Context) error {
	started := time.Now()
	p, err := b.startPcpd(true)
	if err != nil {
		return err
	}
	defer func() { p.stop(syscall.SIGTERM) }()
	if _, err := b.waitServing(30 * time.Second); err != nil {
		return err
	}
	c := strconv.Itoa(b.o.concurrency)
	hundredK := b.o.scaleLeases
	// Slots: clients x ports per run; separate port ranges per run.
	perClient := func(n int) string { return strconv.Itoa((n + b.o.clients - 1) / b.o.clients) }
	r, err := b.load(ctx, "pcpd", "grow100k", "--mix", "renew=100", "--concurrency", c, "--count", "1",
		"--prefill", strconv.Itoa(hundredK), "--port-base", "1024", "--ports", perClient(hundredK))
	if err != nil {
		return err
	}
	b.put("pcpd", "grow100k", r.Prefill.Total.Rate, "/s", lossNote(r.Prefill.Total))
	b.put("pcpd", "rss100k", rssMB(p.pid()), "MB", "")
	// The error rows first, at 100 000 leases and once the growth's log
	// is folded (settle); the renewal row adds 4 096 leases and the
	// new-MAP row as many as it answers (≈ 140 000 in 5 s), and it leaves
	// ≈ 20 MiB of log that the store folds in the background, for about
	// half a second of CPU with the collections it causes: run after it,
	// the error rows measured at ≈ 240 000 leases, with or without that
	// fold depending on timing (BENCHMARKS.md "What changed" 20).
	b.settle(p.pid(), started)
	for _, s := range scaleRows {
		args := []string{"--mix", s.mix, "--concurrency", c, "--duration", b.dur()}
		if s.key == "renew100k" {
			args = append(args, "--prefill", strconv.Itoa(b.o.clients))
		}
		if s.base != "" {
			args = append(args, "--port-base", s.base, "--ports", s.ports)
		}
		r, err := b.load(ctx, "pcpd", s.key, args...)
		if err != nil {
			return err
		}
		b.put("pcpd", s.key, r.Run.Total.Rate, "/s", rowNote(r.Run))
	}
	if d, n, err := b.timeLeases(); err != nil {
		b.notes = append(b.notes, "pcpd leases --json: "+err.Error())
	} else {
		b.put("pcpd", "leases-json", d.Seconds(), "s", fmt.Sprintf("%d leases", n))
	}

	// Grow to bigLeases, on ports above the 100k run's.
	have := b.leaseCount()
	need := b.o.bigLeases - have
	if need > 0 {
		r, err := b.load(ctx, "pcpd", "growbig", "--mix", "renew=100", "--concurrency", c, "--count", "1",
			"--prefill", strconv.Itoa(need), "--port-base", "40000", "--ports", perClient(need))
		if err != nil {
			return err
		}
		b.put("pcpd", "growbig", r.Prefill.Total.Rate, "/s", lossNote(r.Prefill.Total))
	}
	n := b.leaseCount()
	b.put("pcpd", "rssbig", rssMB(p.pid()), "MB", fmt.Sprintf("%d live leases; %s", n, rssParts(p.pid())))
	if d, n, err := b.timeLeases(); err == nil {
		b.put("pcpd", "leases-json-big", d.Seconds(), "s", fmt.Sprintf("%d leases", n))
	}
	// Restart: SIGTERM, then time from exec to the first answer (pcpd
	// serves only once its state is loaded and the kernel reconciled).
	p.stop(syscall.SIGTERM)
	if pp, ok := p.(*proc); ok {
		note := fmt.Sprintf("%d leases: SIGTERM to exit (backup copy and final checkpoint)", n)
		if pp.killed {
			note += fmt.Sprintf("; NOT exited within %s: killed", stopGrace)
		}
		b.put("pcpd", "stopbig", pp.stopped.Seconds(), "s", note)
	}
	t0 := time.Now()
	if p, err = b.startPcpd(false); err != nil {
		return err
	}
	if _, err := b.waitServing(5 * time.Minute); err != nil {
		return err
	}
	b.put("pcpd", "startbig", time.Since(t0).Seconds(), "s", fmt.Sprintf("%d leases", n))
	time.Sleep(2 * time.Second)
	b.put("pcpd", "rssbig-restart", rssMB(p.pid()), "MB", "after restart; "+rssParts(p.pid()))
	// The restored process's high-water mark: the peak of the restore
	// itself (the stored leases decoded beside the table built from
	// them), which is what a memory limit (cgroup) must leave room for.
	b.put("pcpd", "rssbig-restart-peak", peakRSSMB(p.pid()), "MB", "VmHWM of the restarted process: the peak while it restored")
	// A start that restores the backup copy (issue 9: a damaged state
	// file): the shutdown just now left leases.db.bak holding every
	// lease; with leases.db damaged, Open checks the copy and the
	// leases come from it.
	p.stop(syscall.SIGTERM)
	if err := damageStateFile(b.pcpdStateDir()); err != nil {
		return err
	}
	t0 = time.Now()
	if p, err = b.startPcpd(false); err != nil {
		return err
	}
	if _, err := b.waitServing(5 * time.Minute); err != nil {
		return err
	}
	took := time.Since(t0)
	peak := peakRSSMB(p.pid())
	got := b.leaseCount()
	if err := checkStart("rssbig-backup-peak", b.pcpdStateDir(), got, n, true); err != nil {
		return err
	}
	b.put("pcpd", "rssbig-backup-peak", peak, "MB",
		fmt.Sprintf("VmHWM of a start that restored the backup copy (leases.db damaged; %d leases); start to serving %.2f s", got, took.Seconds()))
	// A start on a read-only state directory (issue 9): the same state,
	// bind-mounted read-only onto itself; pcpd reads it, serves, and
	// refuses every change.
	p.stop(syscall.SIGTERM)
	undo, err := mountReadOnly(b.pcpdStateDir())
	if err != nil {
		return err
	}
	defer undo() // before the deferred stop: a lazy unmount, pcpd keeps its files
	t0 = time.Now()
	if p, err = b.startPcpd(false); err != nil {
		return err
	}
	if _, err := b.waitServing(5 * time.Minute); err != nil {
		return err
	}
	took = time.Since(t0)
	peak = peakRSSMB(p.pid())
	got = b.leaseCount()
	if err := checkStart("rssbig-readonly-peak", b.pcpdStateDir(), got, n, false); err != nil {
		return err
	}
	b.put("pcpd", "rssbig-readonly-peak", peak, "MB",
		fmt.Sprintf("VmHWM of a start on a read-only state directory (%d leases); start to serving %.2f s", got, took.Seconds()))
	return nil
}

// checkStart: the start a row measured holds got leases of the want
// the state had (≥ 99 %: a stale or missing backup copy, an empty start,
// peaks low and would pass the target unseen), and with restored, they
// came from the backup copy (the damaged state file moved aside, not
// opened as it is). Review h/revbk: the rows checked neither.
func checkStart(row, dir string, got, want int, restored bool) error {
	if got < want-want/100 {
		return fmt.Errorf("driver: %s: pcpd serves %d leases of the %d stored: not the start the row measures", row, got, want)
	}
	if restored {
		if aside, _ := filepath.Glob(filepath.Join(dir, store.DBName+".corrupt-*")); len(aside) == 0 {
			return fmt.Errorf("driver: %s: no state file moved aside in %s: not a start from the backup copy", row, dir)
		}
	}
	return nil
}

// wipeStateDir removes pcpd's state directory for a fresh start, first
// undoing read-only bind mounts a killed rssbig-readonly-peak row left
// (else RemoveAll fails with EROFS and the "fresh" pcpd reads the old
// state; review h/revbk).
func wipeStateDir(dir string) error {
	for syscall.Unmount(dir, syscall.MNT_DETACH) == nil {
	}
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("driver: wipe %s: %w", dir, err)
	}
	return nil
}

// mountReadOnly bind-mounts dir read-only onto itself (new mounts reach
// the namespaces ip netns exec starts later); undo unmounts it.
func mountReadOnly(dir string) (undo func(), err error) {
	if err := syscall.Mount(dir, dir, "", syscall.MS_BIND, ""); err != nil {
		return nil, fmt.Errorf("driver: bind mount %s: %w", dir, err)
	}
	undo = func() { _ = syscall.Unmount(dir, syscall.MNT_DETACH) }
	if err := syscall.Mount("", dir, "", syscall.MS_REMOUNT|syscall.MS_BIND|syscall.MS_RDONLY, ""); err != nil {
		undo()
		return nil, fmt.Errorf("driver: remount %s read-only: %w", dir, err)
	}
	return undo, nil
}

// damageStateFile zeroes the start of the state file in dir (both bbolt
// meta pages), as a bad disk could: the next Open finds it unusable,
// moves it aside and restores the backup copy.
func damageStateFile(dir string) error {
	f, err := os.OpenFile(filepath.Join(dir, store.DBName), os.O_WRONLY, 0)
	if err != nil {
		return fmt.Errorf("driver: damage the state file: %w", err)
	}
	_, err = f.WriteAt(make([]byte, 16<<10), 0)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("driver: damage the state file: %w", err)
	}
	return nil
}

// Settling: pcpd counts as idle once it uses less than settleIdle of a
// core over settleWindow; settle gives up after settleMax.
const (
	settleIdle   = 0.05
	settleWindow = 500 * time.Millisecond
	settleMax    = 90 * time.Second
)

// settle waits, after the growth to 100 000 leases, until pcpd has folded
// the growth's log into its state file and is idle, so that the rows
// after it measure pcpd holding 100 000 leases and not a checkpoint
// running beside them. The store folds its log in the background when a
// segment reaches 16 MiB and at every tick of its checkpoint interval
// since it opened (store.DefaultCheckpointInterval); 100 000 new leases
// are ≈ 16 MiB of log, and what a fold leaves waits for the next tick. So
// settle waits for the first tick after the growth (reckoned from the
// process start: the store opens a little later, hence the margin), for
// leases.db to have been written since the growth ended (the fold seen,
// not guessed: on a loaded box the store may open later than the margin),
// then until pcpd's CPU stays low for settleWindow. Error requests write
// nothing, so the log stays empty until the renewal row. How long it took
// and whether pcpd was idle go into the results (settle100k).
func (b *bench) settle(pid int, started time.Time) {
	t0 := time.Now()
	tick := nextTick(started, t0, store.DefaultCheckpointInterval)
	time.Sleep(time.Until(tick) + 500*time.Millisecond)
	db := filepath.Join(b.pcpdStateDir(), store.DBName)
	folded := func() bool {
		fi, err := os.Stat(db)
		return err == nil && fi.ModTime().After(t0)
	}
	cpu0, idle := procCPU(pid), false
	for !idle && time.Since(t0) < settleMax {
		time.Sleep(settleWindow)
		cpu := procCPU(pid)
		idle = float64(cpu-cpu0) < settleIdle*float64(settleWindow) && folded()
		cpu0 = cpu
	}
	took := time.Since(t0)
	b.logf("pcpd settle: %s after the growth (checkpoint tick at +%s since start; folded: %v; idle: %v)",
		took.Round(100*time.Millisecond), tick.Sub(started).Round(time.Second), folded(), idle)
	note := "folded and idle"
	if !idle {
		note = fmt.Sprintf("NOT settled after %s: the rows may include a fold", settleMax)
	}
	b.put("pcpd", "settle100k", took.Seconds(), "s", note)
}

// nextTick is the first tick of a ticker started at start with period
// every that comes after now (a tick at now itself may have found the
// growth's last records not yet logged).
func nextTick(start, now time.Time, every time.Duration) time.Time {
	if now.Before(start) {
		return start.Add(every)
	}
	return start.Add((now.Sub(start)/every + 1) * every)
}

// leaseCount counts pcpd's live leases by listing them (pcpd leases
// --json is the interface the issue names; status output is for people).
func (b *bench) leaseCount() int {
	_, n, err := b.timeLeases()
	if err != nil {
		return 0
	}
	return n
}

// timeLeases times `pcpd leases --json` (output to a file, then counted).
func (b *bench) timeLeases() (time.Duration, int, error) {
	path := filepath.Join(b.o.out, "leases.json")
	f, err := os.Create(path)
	if err != nil {
		return 0, 0, err
	}
	defer os.Remove(path)
	cmd := exec.Command("ip", "netns", "exec", b.topo.Host.Name, b.o.pcpd, "leases", "--socket", b.pcpdSocket(), "--json")
	var stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = f, &stderr
	t0 := time.Now()
	err = cmd.Run()
	d := time.Since(t0)
	f.Close()
	if err != nil {
		return 0, 0, fmt.Errorf("pcpd leases: %v: %s", err, bytes.TrimSpace(stderr.Bytes()))
	}
	rf, err := os.Open(path)
	if err != nil {
		return 0, 0, err
	}
	defer rf.Close()
	dec := json.NewDecoder(bufio.NewReaderSize(rf, 1<<20))
	if _, err := dec.Token(); err != nil { // [
		return 0, 0, fmt.Errorf("pcpd leases --json: %w", err)
	}
	n := 0
	for dec.More() {
		var v json.RawMessage
		if err := dec.Decode(&v); err != nil {
			return 0, 0, fmt.Errorf("pcpd leases --json: lease %d: %w", n, err)
		}
		n++
	}
	b.logf("pcpd leases --json: %d leases in %s", n, d.Round(time.Millisecond))
	return d, n, nil
}

// procRunWait is the time pid's threads have spent runnable but waiting
// for a CPU (the second field of each thread's schedstat), summed over
// the threads alive now.
func procRunWait(pid int) time.Duration {
	tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/schedstat", pid))
	var sum time.Duration
	for _, t := range tasks {
		data, err := os.ReadFile(t)
		if err != nil {
			continue
		}
		if f := strings.Fields(string(data)); len(f) >= 2 {
			ns, _ := strconv.ParseInt(f[1], 10, 64)
			sum += time.Duration(ns)
		}
	}
	return sum
}

// boxTicks is the machine's CPU time so far, in USER_HZ ticks (the first
// line of /proc/stat): idle (idle, iowait), busy (every task's, the
// kernel's threads and the interrupts', i.e. everything but idle and
// steal) and all.
type boxTicks struct{ idle, busy, all uint64 }

func boxCPU() boxTicks {
	data, err := os.ReadFile("/proc/stat")
	if err != nil {
		return boxTicks{}
	}
	line, _, _ := strings.Cut(string(data), "\n")
	return parseBoxTicks(line)
}

// parseBoxTicks reads the "cpu" line of /proc/stat: user nice system idle
// iowait irq softirq steal guest guest_nice (proc(5)). guest and
// guest_nice are already counted in user and nice, so they are left out.
func parseBoxTicks(line string) boxTicks {
	var t boxTicks
	f := strings.Fields(line)
	if len(f) == 0 || f[0] != "cpu" {
		return t
	}
	for i, v := range f[1:] {
		if i >= 8 {
			break
		}
		n, _ := strconv.ParseUint(v, 10, 64)
		t.all += n
		switch i {
		case 3, 4: // idle, iowait
			t.idle += n
		case 7: // steal: the hypervisor's, nobody's on this machine
		default:
			t.busy += n
		}
	}
	return t
}

// othersCPU is the CPU the machine's other processes (and kernel threads)
// used between two readings, given what the server and pcpload used in
// the same interval: busy time not theirs. On a shared box this is the
// load that decides a closed-loop row as much as the server does
// (BENCHMARKS.md item 32). With tick-based accounting a task's time
// includes the softirqs that ran on its ticks, as busy does, so the
// difference holds no packet work of the two. Never negative: the
// readings are a few ms apart from the processes' own.
func othersCPU(t0, t1 boxTicks, srv, load time.Duration) time.Duration {
	const ticks = 100 // USER_HZ
	busy := time.Duration(t1.busy-t0.busy) * time.Second / ticks
	return max(busy-srv-load, 0)
}

// maxFIFOLimit bounds --fifo-limit: a real-time process on a shared
// 2-core machine starves everyone else's (one was left at SCHED_FIFO for
// 35 minutes once).
const maxFIFOLimit = 10 * time.Minute

// checkFIFO refuses --fifo without a limit or with a long one.
func (o *options) checkFIFO() error {
	if o.fifo && (o.fifoLimit <= 0 || o.fifoLimit > maxFIFOLimit) {
		return fmt.Errorf("driver: --fifo-limit %s: want > 0 and <= %s", o.fifoLimit, maxFIFOLimit)
	}
	return nil
}

// fifoArgs runs args at SCHED_FIFO 1 with RLIMIT_CPU set to limit (the
// kernel sends SIGXCPU there and SIGKILL 5 s of CPU later). prlimit and
// chrt both exec their command, so the pid stays the process's own (for
// perf, /proc readings and the watchdog).
func fifoArgs(limit time.Duration, args []string) []string {
	sec := max(int(limit.Seconds()), 1)
	return append([]string{"prlimit", fmt.Sprintf("--cpu=%d:%d", sec, sec+5), "chrt", "-f", "1"}, args...)
}

// fifoWatch is the wall-clock half of --fifo-limit: after the limit it
// sets every thread of pid back to SCHED_OTHER and kills it (a process
// blocked most of the time never reaches its CPU limit, yet may hold a
// core in bursts for as long as it lives). Stop the timer when the
// process ends.
func (b *bench) fifoWatch(pid int, name string) *time.Timer {
	return time.AfterFunc(b.o.fifoLimit, func() {
		b.logf("%s: --fifo-limit %s reached: demoting and killing pid %d", name, b.o.fifoLimit, pid)
		exec.Command("chrt", "-a", "-o", "-p", "0", strconv.Itoa(pid)).Run()
		syscall.Kill(pid, syscall.SIGKILL)
	})
}

// procCPU is pid's user+system CPU time so far (0 if unknown).
func procCPU(pid int) time.Duration {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	// Fields after the command name, which may hold spaces: state is
	// field 3, utime and stime 14 and 15 (proc(5)).
	i := bytes.LastIndexByte(data, ')')
	if i < 0 {
		return 0
	}
	f := strings.Fields(string(data[i+1:]))
	if len(f) < 13 {
		return 0
	}
	ut, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	const ticks = 100 // USER_HZ: sysconf(_SC_CLK_TCK) on Linux
	return time.Duration(ut+st) * time.Second / ticks
}

// rssMB reads VmRSS of pid in MB (10^6 bytes).
func rssMB(pid int) float64 { return procStatusMB(pid, "VmRSS") }

// peakRSSMB reads VmHWM of pid in MB: the most it has had resident since
// it started (the kernel's high-water mark of VmRSS). For a process that
// has just restored its state, that is the restore's peak, which VmRSS
// read afterwards no longer shows.
func peakRSSMB(pid int) float64 { return procStatusMB(pid, "VmHWM") }

// procStatusMB reads field (e.g. "VmRSS") of /proc/<pid>/status in MB; 0
// when pid or the field is missing.
func procStatusMB(pid int, field string) float64 {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	mb, _ := statusFieldMB(string(data), field)
	return mb
}

// statusFieldMB finds "<field>:  <n> kB" in the text of a
// /proc/<pid>/status file and returns n in MB (10^6 bytes). ok is false
// when the field is absent or its value is not a count of kB.
func statusFieldMB(status, field string) (mb float64, ok bool) {
	for _, line := range strings.Split(status, "\n") {
		f := strings.Fields(line)
		if len(f) != 3 || f[0] != field+":" || f[2] != "kB" {
			continue
		}
		kb, err := strconv.ParseUint(f[1], 10, 64)
		if err != nil {
			return 0, false
		}
		return float64(kb) * 1024 / 1e6, true
	}
	return 0, false
}

// rssParts says what VmRSS of pid is made of (MB): anonymous memory (the
// Go heap and stacks), file pages mapped (the bbolt file), shared memory.
func rssParts(pid int) string {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return ""
	}
	var parts []string
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		switch f[0] {
		case "RssAnon:", "RssFile:", "RssShmem:":
			kb, _ := strconv.ParseFloat(f[1], 64)
			parts = append(parts, fmt.Sprintf("%s %.0f", strings.ToLower(strings.TrimSuffix(f[0][3:], ":")), kb*1024/1e6))
		}
	}
	return strings.Join(parts, ", ")
}

// machine describes where the numbers come from.
func machine() string {
	kernel, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	cpu := ""
	if data, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, line := range strings.Split(string(data), "\n") {
			if strings.HasPrefix(line, "model name") {
				_, cpu, _ = strings.Cut(line, ": ")
				break
			}
		}
	}
	rev, _ := exec.Command("git", "rev-parse", "--short", "HEAD").Output()
	return fmt.Sprintf("%d cores (%s), Linux %s, %s, commit %s, %s",
		numCPU(), cpu, strings.TrimSpace(string(kernel)), goVersion(), strings.TrimSpace(string(rev)), time.Now().UTC().Format("2006-01-02 15:04 MST"))
}

func numCPU() int {
	out, err := exec.Command("nproc").Output()
	if err != nil {
		return 0
	}
	n, _ := strconv.Atoi(strings.TrimSpace(string(out)))
	return n
}

func goVersion() string {
	out, err := exec.Command("go", "version").Output()
	if err != nil {
		return "go ?"
	}
	f := strings.Fields(string(out))
	if len(f) >= 3 {
		return f[2]
	}
	return "go ?"
}
