// Package server is pcpd's engine: it joins the codec (pcp), the policy
// (policy), the nftables backend (pinhole) and the durable store (store).
// A request goes: rate limit → decode → opcode handler → staged change in
// the lease table → group commit (one kernel transaction and one fsync for
// every request that arrived together) → reply. A SUCCESS is sent only after
// both the pinhole and the lease are in place (PROTOCOL.md choice (g)).
//
// One goroutine, the engine loop, owns all state changes; the operator API
// (Leases, Revoke, Status) takes the same lock.
package server

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/policy"
	"github.com/pcpd/pcpd/store"
)

// Server is the PCP and NAT-PMP engine.
type Server struct {
	cfg  Config
	fw   Firewall
	st   LeaseStore
	pol  Policy
	log  *zap.Logger
	plog *zap.Logger // per-packet, sampled: senders decide how much gets logged
	// now is the engine's clock: clk.now, or a test's Deps.Now as it is
	// (clk nil: no step detection; clock.go).
	now func() time.Time
	clk *runClock
	// steady is the clock of the rate limiters and the owner gate:
	// clk.steady, never rebased, or Deps.Now as it is (clk nil).
	steady func() time.Time
	m      *metrics
	rl     *policy.RateLimiter
	orl    *policy.OwnerRateLimiter // per owner, when the queue fills (admit)
	// hostKey is orl's key of hostOwner: the owner bucket of the host's
	// own addresses (bucketOwner).
	hostKey policy.OwnerKey
	deps    Deps
	// cutter, if fw has it, says which ended mappings' flows the ruleset
	// cuts by itself: their replies do not wait for the conntrack walk.
	cutter FlowCutter
	// recorder, if fw has it, records where admitted flows went
	// (FlowRecorder, skipUnflowed).
	recorder FlowRecorder
	unflowed unflowed // filters skipUnflowed left out, until a clean firewall check
	// flowedUnnamed: the kernel does not name a missing flowed6 element
	// (checkFlowedMisses): every IPv6 delete walks conntrack.
	flowedUnnamed atomic.Bool
	regain        regain // the record's rebuilds (FlowRegainer, flowregain.go)
	// natLister, if fw has it, lists the NAT-ed flows' external
	// endpoints (pruneNATPrior).
	natLister NATLister
	// foreign, if fw has it, reads the host's other DNAT rules (hostPorts).
	foreign ForeignDNATReader

	// watch is the firewall watch's state (fwwatch.go).
	watch fwWatch

	mu        sync.Mutex
	tab       *table
	quar      map[endpoint]quarantine
	quarBy    map[string][]endpoint // quar's endpoints per owner, oldest first (quarantine.go)
	quar4     quar4                 // quar's IPv4 ports for the pool's scan (pool4.go)
	hostPorts hostPorts
	epoch     epochClock
	started   time.Time
	restarted bool // the epoch continued from disk (EPO-04)
	// opsBudget is how many kernel ops a batch may collect before it is
	// cut: one more request must still fit in pinhole.MaxBatch.
	opsBudget int
	protected []netip.Prefix
	// meterOwners and meterHoles are what the firewall's owner meter was
	// last given (updateProtected); nil: not yet, or to be given again.
	meterOwners []pinhole.Owner
	meterHoles  []netip.Prefix
	// lookedUp is the owners RouteLookups reported at the last look
	// (noteRouteLookups), by ID: a log line tells when one enters.
	lookedUp struct {
		mu  sync.Mutex
		ids map[string]bool
	}
	// served is the addresses last given to the firewall's ServedSetter
	// (nil: none yet), the listener goroutine's alone (updateServed).
	served    []netip.Addr
	servedIfs []string // the interfaces of served (listener goroutine only)
	// storeDebt holds the keys whose stored state may differ from the
	// table: a kernel failure whose store commit had succeeded, and whose
	// write-back of the previous state failed too. Every store commit
	// includes the table's state for them (tx.changes) until one succeeds;
	// housekeep retries them alone meanwhile (payStoreDebt).
	storeDebt map[store.Key]struct{}
	// quarDebt is storeDebt's for MAP-22 quarantines (quarantine.go): the
	// endpoints whose stored quarantine may differ from quar.
	quarDebt map[endpoint]struct{}
	// dirty holds the leases whose renewal was absorbed (absorb.go): the
	// table has the promised expiry, the kernel and the store the one
	// here (synced) until the next flush.
	dirty map[store.Key]time.Time
	// dirtyNext is at or before the earliest synced expiry in dirty
	// (flushDue's quick check).
	dirtyNext time.Time
	// orphans are the internal addresses of pinholes found in the kernel
	// at start that no lease explained: clients to announce to even
	// though the store does not know them.
	orphans []netip.Addr
	// armOwed: a repair's re-install of every lease, or the Arm after it
	// or after the restore, failed: the ruleset's cut may be disarmed
	// (CutArmer), and the next firewall check that finds the layout
	// healthy arms (rearmOwed), re-installing every lease first only if
	// reinstallOwed (the re-install failed, or the restore's did). A
	// re-install that keeps failing is tried again at the next check,
	// then after 1, 3, 7 ... at most reinstallSkipMax checks skipped
	// (reinstallFails in a row, reinstallSkip left to skip).
	armOwed, reinstallOwed        bool
	reinstallFails, reinstallSkip int
	// undeleted holds pinholes of leases dropped at start (moved or
	// refused) whose deletion the kernel refused (reconcile), at most
	// maxUndeleted; retryUndeleted deletes them again at every firewall
	// check and audit until the kernel takes them. undeletedEnds are the
	// connections of those leases, flushed only once their pinholes are
	// gone (a flush before lets a flow come back through the open
	// pinhole and outlive the revocation).
	undeleted     []pinhole.Pinhole
	undeletedEnds []ctFilter
	// sweepAt is the table slot the periodic ownership check goes on
	// from (0: a new pass); sweepKeys its reused result buffer.
	sweepAt   uint32
	sweepKeys []store.Key
	// hostSeen is the Policy.HostGen every lease was last checked
	// against (NeverOpenable); hostPass the one the pass in progress
	// checks, hostCheck whether it does, hostFailed whether one of its
	// revocations failed (the check is then repeated).
	hostSeen, hostPass    uint64
	hostCheck, hostFailed bool
	// full is the full ownership sweep in progress (beginSweep), done a
	// step at a time (sweepMore).
	full fullSweep
	// rewriteAt is the table slot the store's rewrite after a wall-clock
	// step goes on from (0: none pending; clock.go); rewriteBuf its
	// reused buffer.
	rewriteAt  uint32
	rewriteBuf []store.Lease
	// rewriteWarn and debtWarn keep the warnings of a store refusing the
	// rewrite (retried every sweep tick) and the debt's write-back
	// (every tick in the rewrite's last step, every storeDebtRetry in
	// housekeep) to one every repeatEvery, and log the recovery
	// (repeatwarn.go; s.mu held).
	rewriteWarn, debtWarn repeatWarn
	// anchorRetry: the last Save of the boot anchor failed (saveAnchor):
	// checkClock tries again every tick (read there before it takes
	// s.mu).
	anchorRetry atomic.Bool
	// rewriteQuar: the rewrite is past the leases and writes the
	// quarantines in rewriteQuarList (clock.go).
	rewriteQuar     bool
	rewriteQuarList []endpoint
	// rebased: the rewrite after a rebase finished; housekeep then has
	// the store write its backup copy again (the copy held the old
	// frame's times: clock.go, rewriteStep).
	rebased chan struct{}

	in  chan packet
	lis *listener
	// tpq holds THIRD_PARTY requests waiting for a fresh enough
	// WireGuard view (--wireguard-fresh), off the socket readers.
	tpq *tpQueue
	// fresh is pol when its view may lag (freshPolicy), else nil.
	fresh freshPolicy
	ct    ctFlusher
	// flowedPrune: the addresses the flusher's last walk covered, pruned
	// from the record once its waiters are released (walkLive,
	// pruneAfterWalk; the flusher's goroutine only).
	flowedPrune []netip.Addr
	// natPrior: external endpoints whose flows may be DNAT-ed elsewhere
	// than their live mappings deliver (retarget.go). Under mu.
	natPrior map[ctTarget]natPrior
	// natPriorPrune: natPrior's size at which notePrior next drops the
	// entries whose flush's walk ended their flows.
	natPriorPrune int
	// priorDropAt: the start's walk (its flusher seq) whose natPrior
	// records dropWalkedPriors still owes a drop (0: none): its waiter
	// may be called after failed walks (ctHoldAttempts), then the
	// success that ends the run drops them (reportCtWalk; review
	// h/revleft10).
	priorDropAt atomic.Uint64
	// natPriorGen numbers notePrior's records (natPrior.gen);
	// natPriorTick is natPriorGen at the last pruneNATPrior check, and
	// natPriorDumpAt natPrior's size at which it next dumps conntrack.
	natPriorGen, natPriorTick uint64
	natPriorDumpAt            int
	// ctSock is the conntrack walk's socket, kept from walk to walk
	// while Serve runs (ctSocket).
	ctSock ctSocket
	// ctDumpFault, if set, sees every conntrack dump's result and may
	// change it (tests: faults injected at the dump, the flows real).
	ctDumpFault ctFault
	// announceYielded, if set, runs each time announceTargets has let go
	// of mu between chunks of its walk (tests: the engine can take it).
	announceYielded func()
	// serveEnded: Serve has returned (endConntrack, under mu): an
	// operator's revoke begins no chunk after it (revokeKeys).
	serveEnded bool
	// revokeStepHook, if set, runs after each chunk Revoke ended,
	// outside mu, with how many it ended so far (tests).
	revokeStepHook func(done int)
	// upd is the queue of unsolicited mapping updates (updates.go), under
	// mu; updateSend, if set, sends instead of the serving sockets (tests).
	upd        updates
	updateSend func(from netip.AddrPort, rs []reply) error

	// Engine-loop scratch, under mu: the last finished tx (its buffers
	// are reused), the decoded request and the reply being built (a
	// pcp.Request is 2 KB, with its filter array inline), and the
	// requests counter per label set (a WithLabelValues lookup per reply
	// was measurable).
	spare    *tx
	eng      engineBufs // serveBatch's, engine goroutine only
	pcpReq   pcp.Request
	pcpResp  pcp.Response
	counters map[reqLabels]prometheus.Counter
	outs     []outcome

	// announceDone is closed when the start-up announcements are over
	// (tests).
	announceDone chan struct{}
}

// quarantine keeps a freed IPv4 external port for its last holder (MAP-22).
type quarantine struct {
	owner string // the last holder's owner: its quarantined ports are bounded (quarantine.go)
	addr  netip.Addr
	port  uint16
	nonce [12]byte
	until time.Time
}

// New checks cfg and builds a Server. It touches neither the kernel nor the
// network; Run does.
func New(cfg Config, deps Deps, log *zap.Logger) (*Server, error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	if deps.Firewall == nil || deps.Store == nil || deps.Policy == nil {
		return nil, fmt.Errorf("server: firewall, store and policy are required: %w", ErrInvalidConfig)
	}
	if log == nil {
		log = zap.NewNop()
	}
	var clk *runClock
	if deps.Now == nil || deps.Mono != nil {
		clk = newRunClock(deps.Now, deps.Mono)
		deps.Now = clk.now
	}
	log = log.Named("server")
	s := &Server{
		cfg:          cfg,
		fw:           deps.Firewall,
		st:           deps.Store,
		pol:          deps.Policy,
		log:          log,
		now:          deps.Now,
		clk:          clk,
		steady:       deps.Now,
		deps:         deps,
		rl:           policy.NewRateLimiter(cfg.RateLimit, cfg.RateBurst, cfg.RateSources, policy.WithIPv6Prefix(cfg.RatePrefix6)),
		orl:          policy.NewOwnerRateLimiter(ownerRateFactor*cfg.RateLimit, cfg.OwnerBurst, cfg.RateSources),
		tab:          newTable(),
		quar:         map[endpoint]quarantine{},
		quarBy:       map[string][]endpoint{},
		quar4:        quar4{bits: map[port4]*quarBits{}, byIn: map[[4]byte][]endpoint{}},
		storeDebt:    map[store.Key]struct{}{},
		quarDebt:     map[endpoint]struct{}{},
		dirty:        map[store.Key]time.Time{},
		counters:     map[reqLabels]prometheus.Counter{},
		in:           make(chan packet, cfg.QueueLen),
		rebased:      make(chan struct{}, 1),
		announceDone: make(chan struct{}),
		upd:          updates{wake: make(chan struct{}, 1)},
		// A request changes at most one lease: its old and new pinholes.
		opsBudget: pinhole.MaxBatch - 2*(cfg.MaxFilters+1),
	}
	if clk != nil {
		s.steady = clk.steady
	}
	s.plog = packetLogger(log, s.steady, time.Now)
	s.hostPorts.s = s
	s.hostPorts.kick = make(chan struct{}, 1)
	s.ct.walk = s.walkLive
	s.ct.settle = s.pruneAfterWalk
	s.ct.report = s.reportCtWalk
	s.m = newMetrics(func() float64 {
		s.mu.Lock()
		defer s.mu.Unlock()
		return float64(s.tab.len())
	})
	if om, ok := s.fw.(OwnerMeter); ok {
		s.m.kernelDrops = newKernelDrops(om.MeterDrops)
		if rl, ok := om.(RouteLookups); ok {
			s.m.lookupOwners = newLookupOwners(rl)
		}
	}
	if _, ok := s.fw.(FlowedChecker); ok {
		s.m.flowedUnnamed = newFlowedUnnamed(s.flowedUnnamed.Load)
	}
	if deps.Registerer != nil {
		for _, c := range s.m.collectors() {
			if err := deps.Registerer.Register(c); err != nil {
				return nil, fmt.Errorf("server: register metrics: %w", err)
			}
		}
	}
	s.lis = &listener{
		log:      log.Named("listen"),
		ifaces:   cfg.Interfaces,
		explicit: cfg.Listen,
		port:     Port,
		ns:       cfg.NetNS,
		lab:      cfg.loopbackLab,
		out:      s.in,
		// The readers' counter cache: WithLabelValues hashed the label
		// and took a lock per dropped packet, i.e. per packet of a flood.
		onDrop: func(reason string) { s.lis.es.counter(s.m, counterKey{res: reason}).Inc() },
		onFull: func(n int) { s.lis.es.counter(s.m, counterKey{res: "send-buffer-full"}).Add(float64(n)) },
		admit:  s.admit,
		clock:  s.steady,
		early:  s.earlyRead,
	}
	s.hostKey = s.orl.Key(hostOwner)
	s.tpq = newTPQueue()
	s.lis.thirdParty = s.deferThirdParty
	s.fresh, _ = s.pol.(freshPolicy)
	if rf, ok := s.pol.Ownership().(policy.RenameFollower); ok {
		s.lis.onRename = rf.InterfacesRenamed
	}
	if df, ok := s.pol.Ownership().(policy.DeviceFollower); ok {
		s.lis.onDevice, s.lis.firstIndex = df.DevicesChanged, df.FirstIndex
	}
	s.cutter, _ = s.fw.(FlowCutter)
	s.recorder, _ = s.fw.(FlowRecorder)
	s.natLister, _ = s.fw.(NATLister)
	s.foreign, _ = s.fw.(ForeignDNATReader)
	if ss, ok := s.fw.(ServedSetter); ok {
		s.lis.onServe = func(aps []netip.AddrPort, ifaces []string) { s.updateServed(ss, aps, ifaces) }
	}
	return s, nil
}

// Collectors returns the engine's Prometheus collectors (for a caller that
// did not pass a Registerer).
func (s *Server) Collectors() []prometheus.Collector { return s.m.collectors() }

// Run restores state into the kernel, then serves until ctx ends. On return
// the pinholes stay in the kernel with their timeouts, so a restart does
// not interrupt traffic.
func (s *Server) Run(ctx context.Context) error {
	if err := s.Start(); err != nil {
		return err
	}
	return s.Serve(ctx)
}

// Start restores the leases of Deps.State (State.Leases, or read through
// State.Stream when Leases is nil): drops expired ones, reconciles
// the kernel with them, continues or resets the epoch (EPO-03, EPO-04). It
// is Run's first half, separate so tests can drive the engine without
// sockets.
func (s *Server) Start() error { return s.StartContext(context.Background()) }

// ErrStartStopped is StartContext's error when its context ended before
// the restore was done (pcpd serve: SIGTERM during a slow start).
var ErrStartStopped = errors.New("server: start stopped before the leases were restored")

// StartContext is Start, given up when ctx ends: the restore checks it
// every stopCheck stored leases read and before each kernel batch, and
// returns ErrStartStopped (with ctx's error) before it writes anything to
// the store (dropped leases, a new epoch, the boot anchor). The Server is
// then not to be served; what it left is what a kill at that point would
// leave (kill -9 is safe at any moment): every stored lease still in the
// store (Fresh too, if it was), pinholes re-installed or deleted so far
// in the kernel with their timeouts, the next start does the rest. Before,
// SIGTERM during a start restoring 1 000 000 leases (≈ 6-9 s) waited for
// the whole restore and served before stopping.
func (s *Server) StartContext(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	// restore judges each lease by the host's addresses as now read
	// (Policy.Rules): the sweep need re-check them only after a change.
	s.hostSeen = s.pol.HostGen()
	// The stored times are restored in their own frame, then follow a
	// step made since (boot anchor, clock.go).
	unseen := s.resumeFrame(s.deps.State.EpochOrigin)
	err := s.restore(ctx)
	if err == nil {
		s.seedNATPrior()
	}
	// The table holds its own copies; the stored ones (≈ 290 bytes a
	// lease) need not live on.
	s.deps.State.Leases, s.deps.State.Stream = nil, nil
	if err != nil {
		return err
	}
	if unseen {
		if d, ok := s.clk.stepped(); ok {
			s.rebase(d) // saves the anchor
			return nil
		}
	}
	s.saveAnchor()
	return nil
}

// Serve opens the serving sockets and runs the engine loop until ctx ends.
func (s *Server) Serve(ctx context.Context) error {
	s.mu.Lock()
	started := !s.started.IsZero()
	s.mu.Unlock()
	if !started {
		return fmt.Errorf("server: Serve before Start: %w", ErrInvalidConfig)
	}
	// Leases restored from disk whose peers were removed while pcpd was
	// down were revoked by the start (restoring.owned); the ownership may
	// have changed since (LIFE-05): a full sweep, its steps run by the
	// loop below between requests (sweepMore). Its first step here,
	// before serving, guards the owned prefixes (updateProtected).
	sweeping := s.beginSweep()
	// The record's conntrack read owed since the start's Setup and
	// SetProtected (beginSweep), done before the first request: lazily,
	// the first delete's walk did it while the engine committed, and its
	// socket's close held nftables' commit_mutex ≈ 25 ms (BENCHMARKS.md
	// item 81).
	if v, ok := s.recorder.(FlowVerifier); ok {
		v.VerifyFlowed()
	}
	// Last: failed conntrack walks are not retried once Serve returns,
	// and the walk's socket is closed (a walk in flight closes its own).
	s.ctSock.open()
	defer s.ctSock.close()
	defer s.endConntrack()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	lisErr := make(chan error, 1)
	go func() { lisErr <- s.lis.run(ctx) }()
	// The THIRD_PARTY queue's goroutine ends before Serve returns (it
	// waits for a read at most the ownership's fresh wait).
	tpDone := make(chan struct{})
	go func() { defer close(tpDone); s.serveThirdParty(ctx) }()
	defer func() { cancel(); <-tpDone }()
	go s.announce(ctx)
	updDone := make(chan struct{})
	go func() { defer close(updDone); s.sendUpdates(ctx) }()
	defer func() { cancel(); <-updDone }()
	// Housekeeping ends after the last flush of absorbed renewals (below),
	// so its shutdown snapshot has them.
	hkCtx, hkCancel := context.WithCancel(context.WithoutCancel(ctx))
	hkDone := make(chan struct{})
	go func() { defer close(hkDone); s.housekeep(hkCtx) }()
	// The shutdown snapshot is written before Serve returns.
	defer func() { hkCancel(); <-hkDone }()

	// Tamper check and audit run beside the engine loop: neither blocks
	// serving (the audit's kernel dump takes seconds at 100 000 leases).
	fwDone := make(chan struct{})
	go func() { defer close(fwDone); s.watchFirewall(ctx) }()
	defer func() { cancel(); <-fwDone }()
	sweep := time.NewTicker(sweepEvery)
	defer sweep.Stop()
	flush := time.NewTicker(absorbFlush)
	defer flush.Stop()
	flushMore := time.NewTimer(time.Hour) // the next flush step while more are due
	flushMore.Stop()
	defer flushMore.Stop()
	// Absorbed renewals are written before Serve returns, whyever it does
	// (deferred after the housekeeping's, so it runs first).
	defer s.flushDirty("shutdown")
	// Before it: a step not yet noticed, and the rest of a rewrite.
	defer s.finishRebase()
	expiry := time.NewTimer(time.Hour)
	defer expiry.Stop()
	batch := make([]packet, 0, s.cfg.MaxBatch)
	for {
		s.resetExpiry(expiry)
		// While a full sweep runs, its next step is always ready: select
		// picks among it, requests, timers and the stop at random, so
		// each waits a step at most (≈ 10 ms).
		var sweepNext <-chan struct{}
		if sweeping {
			sweepNext = readyChan
		}
		select {
		case <-ctx.Done():
			<-lisErr
			s.log.Info("stopped; pinholes stay in the kernel until their leases expire")
			return nil
		case err := <-lisErr:
			return err
		case p := <-s.in:
			// Everything already waiting joins this batch: one kernel
			// transaction and one fsync for all of it (group commit).
			batch = append(batch[:0], p)
		drain:
			for len(batch) < s.cfg.MaxBatch {
				select {
				case p := <-s.in:
					batch = append(batch, p)
				default:
					break drain
				}
			}
			s.serveBatch(batch)
		case <-expiry.C:
			s.expire()
		case <-flush.C:
			if s.flushDue() {
				flushMore.Reset(flushGap)
			}
		case <-flushMore.C:
			if s.flushDue() {
				flushMore.Reset(flushGap)
			}
		case <-sweepNext:
			sweeping = s.sweepMore()
		case <-sweep.C:
			s.sweepStep()
			s.checkClock()
		case c := <-s.deps.Changes:
			s.log.Debug("ownership lost", zap.String("peer", string(c.Owner)), zap.Bool("removed", c.Removed), zap.Any("lost", c.Lost))
			// Drain what else is queued: one sweep covers all of it.
		more:
			for {
				select {
				case <-s.deps.Changes:
				default:
					break more
				}
			}
			sweeping = s.beginSweep()
		}
	}
}

func (s *Server) resetExpiry(t *time.Timer) {
	s.mu.Lock()
	next, ok := s.tab.next()
	now := s.now()
	s.mu.Unlock()
	d := time.Hour
	if ok {
		d = max(next.Sub(now), 0) + 10*time.Millisecond
	}
	if !t.Stop() {
		select {
		case <-t.C:
		default:
		}
	}
	t.Reset(d)
}

// engineBufs are serveBatch's buffers, kept from batch to batch.
type engineBufs struct {
	reqs    []Request
	replies [][]byte
	rs      []reply
}

// serveBatch handles packets that arrived together and sends the replies.
// When the batch ended mappings whose flows the ruleset does not cut by
// itself (mustWaitFlush), the replies of the requests that ended them
// wait for their conntrack flush (PMP-12), sent from the flusher; the
// engine goes on meanwhile.
//
// Its requests, replies and reply list live in buffers of the engine's
// (Server.eng), kept from batch to batch: at 30 000 new MAPs a second they
// were a few hundred bytes of garbage per request.
func (s *Server) serveBatch(batch []packet) {
	e := &s.eng
	reqs := slices.Grow(e.reqs[:0], len(batch))[:len(batch)]
	for i, p := range batch {
		reqs[i] = Request{Local: p.conn.local, Source: p.src, Iface: p.conn.kname, Data: p.b, admitted: true,
			ifk: sourceKey(ifaceKey(p.conn.index, p.conn.kname), p.src.Addr(), p.conn.local.Addr())}
	}
	defer func() {
		// Keep the arrays, not what they point to (datagrams, replies).
		clear(reqs)
		clear(e.replies)
		e.reqs, e.replies = reqs[:0], e.replies[:0]
	}()
	seq := s.ct.seq()
	replies, ends := s.handleBatch(reqs, e.replies)
	e.replies = replies
	if after := s.ct.seq(); after != seq {
		// Only the replies of requests that ended a mapping wait; batch
		// is the engine loop's buffer, reused for the next batch.
		var held []packet
		var heldReplies [][]byte
		for i := range replies {
			if ends != nil && ends[i] && replies[i] != nil {
				held = append(held, batch[i])
				heldReplies = append(heldReplies, replies[i])
				replies[i] = nil
			}
		}
		e.rs = s.sendReplies(batch, replies, e.rs)
		if len(held) > 0 {
			s.ct.after(after, func() { s.sendReplies(held, heldReplies, nil) })
		}
		return
	}
	e.rs = s.sendReplies(batch, replies, e.rs)
}

// sendReplies sends a batch's replies, per socket in one sendmmsg. It
// lists them in rs's array and returns it, emptied, for the next call.
func (s *Server) sendReplies(batch []packet, replies [][]byte, rs []reply) []reply {
	for i := 0; i < len(batch); {
		conn := batch[i].conn
		rs = rs[:0]
		j := i
		for ; j < len(batch) && batch[j].conn == conn; j++ {
			if replies[j] != nil {
				rs = append(rs, reply{b: replies[j], to: batch[j].src})
			}
		}
		if len(rs) > 0 {
			if err := conn.sendBatch(rs); err != nil {
				s.plog.Debug("send replies", zap.Stringer("from", conn.local), zap.Error(err))
			}
		}
		now := time.Now()
		for k := i; k < j; k++ {
			if replies[k] != nil {
				s.m.latency.Observe(now.Sub(batch[k].at).Seconds())
			}
		}
		i = j
	}
	clear(rs[:cap(rs)]) // keep the array, not the replies
	return rs[:0]
}

// expire ends every lease whose time is up. The kernel has removed (or is
// about to remove) their pinholes by itself; the store is told, and their
// connections are flushed (flushConntrack: queued, the walk runs beside
// the engine). Nothing due, it costs a look at the expiry heap's root.
func (s *Server) expire() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.expireLocked(s.now())
}

func (s *Server) expireLocked(now time.Time) {
	keys := s.tab.expired(now)
	if len(keys) == 0 {
		return
	}
	t := s.begin(now)
	for _, k := range keys {
		t.set(k, nil, true)
	}
	if err := t.commit(); err != nil {
		// The leases are gone from the kernel anyway; keeping them out of
		// the table is right. Their keys are owed (storeDebt): the next
		// commit, or housekeep's payStoreDebt, deletes them, their
		// ports' quarantines (MAP-22) with them. Left to the next start
		// (as before review h/revrw), the rewrite after a wall-clock
		// step, which writes the table's leases only, stored the moved
		// origin over their old-frame expiries: after a step back the
		// next start restored them live, pinholes re-opened
		// (TestBootClockRewriteExpiredUnrecorded). Their connections end
		// all the same (commit flushes only on success).
		t.owe()
		s.log.Warn("cannot record expired leases; retrying (the next commit, or the next start, drops them)", zap.Error(err))
		s.flushConntrack(t.ended)
	}
	s.release(t)
	s.log.Debug("leases expired", zap.Int("count", len(keys)))
}

// sweepOwnership revokes every lease whose internal address its owner no
// longer owns (peer removed, AllowedIPs shrunk: LIFE-05), walking the
// whole table: a full sweep (beginSweep) run to its end. Serve runs the
// same sweep, at start and when the ownership source reports a loss
// (Deps.Changes), a step at a time between requests (sweepMore). The
// periodic check is sweepStep.
func (s *Server) sweepOwnership() {
	if s.beginSweep() {
		for s.sweepMore() {
		}
	}
}

// fullSweep is a full ownership sweep in progress (h/sweepchunk). Before,
// the full sweep was one hold of s.mu and one transaction: 1 000 000
// restored leases no longer owned kept the engine (and SIGTERM) waiting
// 3 min 18 s at start. Now each step is one hold: it reads sweepSlots
// table slots (table.unowned, as sweepStep), or ends the next revokeChunk
// of the leases found unowned in one transaction (revokeKeysLocked, the
// operator's Revoke's), those still unowned then.
type fullSweep struct {
	on     bool
	again  bool // a loss reported meanwhile: another sweep follows
	at     uint32
	walked bool // the walk reached the table's end
	gen    uint64
	check  bool // with the never-openable check (swept)
	failed bool
	keys   []store.Key // found unowned, not yet ended
}

// readyChan is always ready to receive from.
var readyChan = func() chan struct{} { c := make(chan struct{}); close(c); return c }()

// beginSweep starts a full sweep (one already running: another follows
// it, which the walk so far needs: it was checked against the ownership
// before the loss). It reports whether a sweep runs (true).
func (s *Server) beginSweep() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.updateProtected()
	if s.full.on {
		s.full.again = true
		return true
	}
	g := s.pol.HostGen()
	s.full = fullSweep{on: true, gen: g, check: g != s.hostSeen, keys: s.full.keys[:0]}
	return true
}

// sweepMore does the full sweep's next step, one hold of s.mu, and
// reports whether more are to come. A transaction that fails ends the
// sweep: what it left is the periodic sweep's (sweepStep) to retry, as
// when the full sweep was one transaction.
func (s *Server) sweepMore() bool {
	s.mu.Lock()
	f := &s.full
	if !f.on {
		s.mu.Unlock()
		return false
	}
	if len(f.keys) == 0 {
		if !f.walked {
			f.keys, f.at = s.tab.unowned(f.at, sweepSlots, s.swept(f.check), f.keys[:0])
			f.walked = f.at == 0
			slices.SortFunc(f.keys, compareKeys)
			s.mu.Unlock()
			return true
		}
		more := s.endSweepLocked()
		s.mu.Unlock()
		return more
	}
	chunk := f.keys[:min(len(f.keys), revokeChunk)]
	own := s.swept(f.check)
	gone, err := s.revokeKeysLocked(chunk, func(l *store.Lease) bool {
		o, ok := own.Lookup(l.InternalAddr)
		return !ok || string(o.ID) != l.Owner
	}, true)
	never := make([]bool, len(gone))
	for i := range gone {
		never[i] = s.pol.NeverOpenable(gone[i].InternalAddr)
	}
	more := true
	if err != nil {
		f.failed = true
		more = s.endSweepLocked()
	} else {
		f.keys = f.keys[len(chunk):]
		s.queueUpdates(gone, pcp.NotAuthorized) // UPD-03 (updates.go)
	}
	s.mu.Unlock()
	if err != nil {
		s.log.Error("cannot revoke leases no longer owned; retrying at the next sweep", zap.Error(err))
	}
	s.logUnowned(gone, never)
	return more
}

// endSweepLocked ends the full sweep and starts the one asked for
// meanwhile, if any (it reports whether it did).
func (s *Server) endSweepLocked() bool {
	f := &s.full
	if f.check && !f.failed {
		s.hostSeen = f.gen
	}
	s.sweepAt = 0 // a full walk covers the periodic pass in progress
	again := f.again
	*f = fullSweep{keys: f.keys[:0]}
	if !again {
		return false
	}
	s.updateProtected()
	g := s.pol.HostGen()
	*f = fullSweep{on: true, gen: g, check: g != s.hostSeen, keys: f.keys}
	return true
}

// sweepSlots is how many table slots one periodic ownership step reads.
// A step holds the engine for 50-85 ns a slot at a million leases
// (BenchmarkSweepStep: 0.4-0.7 ms a step on the shared 2-core box), where
// the walk of the whole table at once held it ≈ 140 ms every 10 s and
// every request arriving meanwhile waited, then queued behind the backlog
// (the open-loop p99 in BENCHMARKS.md). At sweepEvery, a pass over a
// million slots takes ≈ 15 s.
const (
	sweepSlots = 8192
	sweepEvery = 125 * time.Millisecond
)

// sweepStep is the periodic safety net behind Deps.Changes (an ownership
// source without change reports, or a loss it did not report): it checks
// the next sweepSlots slots of the table and revokes what is no longer
// owned. The prefixes the firewall guards follow the ownership at the
// start of every pass (additions are not reported as changes).
func (s *Server) sweepStep() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.full.on {
		return // the full sweep covers it
	}
	if s.sweepAt == 0 {
		s.updateProtected()
		s.hostPass = s.pol.HostGen()
		s.hostCheck, s.hostFailed = s.hostPass != s.hostSeen, false
	}
	keys, next := s.tab.unowned(s.sweepAt, sweepSlots, s.swept(s.hostCheck), s.sweepKeys[:0])
	s.sweepKeys = keys
	s.sweepAt = next
	if !s.revokeUnowned(keys) {
		s.hostFailed = true
	}
	if next == 0 && s.hostCheck && !s.hostFailed {
		s.hostSeen = s.hostPass
	}
}

// sweptOwnership is the ownership the sweep holds leases to: an address
// no one may open now (Policy.NeverOpenable: the host gained it after the
// lease was granted on an older read of its addresses, or the lease was
// restored while the first read failed) is nobody's. Before, such a lease
// kept its pinhole and DNAT to the host's own address until it expired;
// only its renewals were refused (review revedge,
// TestLeaseRevokedWhenHostGainsTarget).
type sweptOwnership struct {
	policy.Ownership
	never func(netip.Addr) bool
}

func (o sweptOwnership) Lookup(a netip.Addr) (policy.Owner, bool) {
	if ow, ok := o.Ownership.Lookup(a); ok && !o.never(a) {
		return ow, true
	}
	return policy.Owner{}, false
}

// swept is the ownership the sweep checks leases against: with the
// never-openable check (sweptOwnership) in a pass after the host's
// addresses changed (Policy.HostGen), which a pass otherwise skips: it
// doubled a step's cost (BenchmarkSweepStepNeverOpenable, 52 → 104
// ns/slot).
func (s *Server) swept(check bool) policy.Ownership {
	if !check {
		return s.pol.Ownership()
	}
	return sweptOwnership{Ownership: s.pol.Ownership(), never: s.pol.NeverOpenable}
}

// revokeUnowned ends the leases at keys in one transaction and logs each
// (the caller holds s.mu and found them unowned under it: not owned, or
// never openable now). It reports whether it ended them all.
func (s *Server) revokeUnowned(keys []store.Key) bool {
	if len(keys) == 0 {
		return true
	}
	slices.SortFunc(keys, compareKeys)
	gone := make([]store.Lease, 0, len(keys))
	t := s.begin(s.now())
	t.revoking = true // its deletes stand if the store fails (tx.commit)
	for _, k := range keys {
		if l, ok := s.tab.get(k); ok {
			gone = append(gone, *l)
			t.set(k, nil, true)
		}
	}
	if err := t.commit(); err != nil {
		t.rollback()
		s.release(t)
		s.log.Error("cannot revoke leases no longer owned; retrying at the next sweep", zap.Error(err))
		return false
	}
	s.release(t)
	s.queueUpdates(gone, pcp.NotAuthorized) // UPD-03 (updates.go)
	never := make([]bool, len(gone))
	for i := range gone {
		never[i] = s.pol.NeverOpenable(gone[i].InternalAddr)
	}
	s.logUnowned(gone, never)
	return true
}

// logUnowned logs and counts the leases the ownership sweep ended; never
// says which of them were ended as never openable.
func (s *Server) logUnowned(gone []store.Lease, never []bool) {
	for i := range gone {
		l := &gone[i]
		if never[i] {
			s.m.revocations.WithLabelValues("policy").Inc()
			s.log.Info("revoked: the address is now never openable (one the host reaches itself)",
				zap.String("peer", l.Owner), zap.Stringer("address", l.InternalAddr),
				zap.Uint16("port", l.InternalPort), zap.String("protocol", protoName(l.Protocol)),
				zap.Stringer("external", netip.AddrPortFrom(l.ExternalAddr, l.ExternalPort)))
			continue
		}
		s.m.revocations.WithLabelValues("ownership").Inc()
		s.logRevokedUnowned(l)
	}
}

// logRevokedUnowned is the log line of a lease revoked as no longer
// owned (the sweep's, and the start's: restoring.revoked).
func (s *Server) logRevokedUnowned(l *store.Lease) {
	s.log.Info("revoked: address no longer owned by the client",
		zap.String("peer", l.Owner), zap.Stringer("address", l.InternalAddr),
		zap.Uint16("port", l.InternalPort), zap.String("protocol", protoName(l.Protocol)),
		zap.Stringer("external", netip.AddrPortFrom(l.ExternalAddr, l.ExternalPort)))
}

// updateProtected tells the firewall which prefixes to guard: every owned
// prefix, and every hole (policy.Holes: AllowedIPs held on two served
// interfaces, owned by nobody but still routed to a client); and, when
// it meters requests per owner (OwnerMeter), which owner has which.
//
// A hole is guarded like an owned prefix: WireGuard still delivers it
// to a peer, and out of the protected sets every port of every host in
// it was open from the Internet with no pinhole at all (review of
// request decisions 2026-12-04, F1, TestE2EHoleStaysGuarded). Nobody
// can map in it (no owner), so it is closed.
func (s *Server) updateProtected() {
	owners := s.pol.Ownership().Owners()
	// The guard first, the meter after: a new owner's prefix is protected
	// without waiting for the owner meter's transactions (≈ 40 ms at 1 000
	// owners); the meter only limits requests (review of the bug-4 fix).
	defer s.updateMeterOwners(owners)
	var pfx []netip.Prefix
	for _, o := range owners {
		pfx = append(pfx, o.Prefixes...)
	}
	if h, ok := s.pol.Ownership().(policy.Holes); ok {
		pfx = append(pfx, h.Holes()...)
	}
	slices.SortFunc(pfx, func(a, b netip.Prefix) int {
		if c := a.Addr().Compare(b.Addr()); c != 0 {
			return c
		}
		return a.Bits() - b.Bits()
	})
	pfx = slices.Compact(pfx)
	if slices.Equal(pfx, s.protected) && s.protected != nil {
		return
	}
	if err := s.fw.SetProtected(pfx); err != nil {
		s.log.Error("cannot update the protected prefixes", zap.Error(err))
		return
	}
	if s.protected == nil {
		s.protected = []netip.Prefix{}
	}
	s.protected = append(s.protected[:0], pfx...)
}

// updateMeterOwners gives the firewall's owner meter (pinhole/ownermeter.go)
// the owners and their prefixes when they changed: the kernel then holds a
// flood from all of one owner's sources (a fresh /64 each) to the owner's
// rate before it reaches the socket (issue 9). The ownership's holes
// (policy.Holes: WireGuard AllowedIPs that overlap across interfaces) go
// with them: without them the kernel would charge a hole's sources to the
// owner whose prefix encloses it, and a peer of another interface could
// drain that owner's bucket.
func (s *Server) updateMeterOwners(owners []policy.Owner) {
	om, ok := s.fw.(OwnerMeter)
	if !ok {
		return
	}
	meter := make([]pinhole.Owner, 0, len(owners))
	for _, o := range owners {
		meter = append(meter, pinhole.Owner{ID: string(o.ID), Prefixes: o.Prefixes})
	}
	slices.SortFunc(meter, func(a, b pinhole.Owner) int { return strings.Compare(a.ID, b.ID) })
	holes := []netip.Prefix{}
	if h, ok := s.pol.Ownership().(policy.Holes); ok {
		holes = append(holes, h.Holes()...)
	}
	if s.meterOwners != nil && slices.Equal(holes, s.meterHoles) && slices.EqualFunc(meter, s.meterOwners, func(a, b pinhole.Owner) bool {
		return a.ID == b.ID && slices.Equal(a.Prefixes, b.Prefixes)
	}) {
		return
	}
	err := om.SetOwners(meter, holes)
	// The owners given are adopted even when writing them failed
	// (pinhole's SetOwners), and their routes were asked.
	s.noteRouteLookups()
	if err != nil {
		// Retried at the next pass (s.meterOwners unchanged).
		s.m.meterErrors.Inc()
		s.log.Error("cannot update the owner meter's prefixes", zap.Error(err))
		return
	}
	s.meterOwners, s.meterHoles = meter, holes
}

// maxLookupLogs bounds the owners noteRouteLookups names at one look: a
// host whose policy rules pcpd's lookups cannot stand for (pinhole's
// NetlinkRoutes) puts every owner in that state at once.
const maxLookupLogs = 10

// noteRouteLookups logs each owner that entered the state where every
// request of its costs the kernel a route lookup (RouteLookups) since the
// last look: on the bench's load that lookup and its RCU frees were 3.3 %
// of all CPU samples (BENCHMARKS.md item 28), and nothing told the
// operator. Only transitions are logged, so a lasting state is told once;
// pcpd_owner_meter_route_lookup_owners has the count.
func (s *Server) noteRouteLookups() {
	rl, ok := s.fw.(RouteLookups)
	if !ok {
		return
	}
	owners := rl.RouteLookupOwners()
	s.lookedUp.mu.Lock()
	defer s.lookedUp.mu.Unlock()
	now := make(map[string]bool, len(owners))
	entered := 0
	for _, o := range owners {
		now[o.ID] = true
		if s.lookedUp.ids[o.ID] {
			continue
		}
		if entered++; entered <= maxLookupLogs {
			s.log.Info("kernel owner meter: every request of this client costs a route lookup: its prefixes are not routed as one through one interface; route them through the client's interface",
				zap.String("owner", o.ID), zap.Stringers("prefixes", o.Prefixes))
		}
	}
	if entered > maxLookupLogs {
		s.log.Info("kernel owner meter: more clients whose every request costs a route lookup (see pcpd_owner_meter_route_lookup_owners)",
			zap.Int("unnamed", entered-maxLookupLogs))
	}
	s.lookedUp.ids = now
}

// updateServed gives the firewall the addresses the listener serves when
// they changed since the last success (ServedSetter): the kernel meters
// and untracks the requests to them, and to no other address (pinhole's
// notrack.go has why). It runs on the listener's goroutine only, which
// owns s.served; a failure is retried at the listener's next pass (at
// most 2 s later). A firewall repair (checkFirewall's Setup) re-applies
// the backend's last addresses itself.
func (s *Server) updateServed(fw ServedSetter, aps []netip.AddrPort, ifaces []string) {
	addrs := make([]netip.Addr, 0, len(aps))
	for _, ap := range aps {
		addrs = append(addrs, ap.Addr().WithZone(""))
	}
	slices.SortFunc(addrs, netip.Addr.Compare)
	addrs = slices.Compact(addrs)
	ifaces = slices.Clone(ifaces)
	slices.Sort(ifaces)
	ifaces = slices.Compact(ifaces)
	if s.served != nil && slices.Equal(addrs, s.served) && slices.Equal(ifaces, s.servedIfs) {
		return
	}
	if err := fw.SetServed(addrs, ifaces); err != nil {
		s.log.Error("cannot update the kernel's set of served addresses; retrying", zap.Error(err))
		return
	}
	s.served, s.servedIfs = addrs, ifaces
}

func compareKeys(a, b store.Key) int {
	if a.Owner != b.Owner {
		if a.Owner < b.Owner {
			return -1
		}
		return 1
	}
	if c := a.InternalAddr.Compare(b.InternalAddr); c != 0 {
		return c
	}
	if a.Protocol != b.Protocol {
		return int(a.Protocol) - int(b.Protocol)
	}
	if a.InternalPort != b.InternalPort {
		return int(a.InternalPort) - int(b.InternalPort)
	}
	return a.Remote.Compare(b.Remote)
}

func protoName(p uint8) string { return pcp.Protocol(p).String() }

func zapErr(err error) zap.Field { return zap.Error(err) }
