package pinhole

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// Config says where pcpd's objects live.
type Config struct {
	// Table is the inet table: pcpd's own (standalone, created by Setup), or
	// the admin's existing table (Attached). Default "pcpd".
	Table string
	// Attached: create only pcpd's sets and chains inside the admin's
	// existing Table; the admin's forward chain must "jump" to Chain.
	Attached bool
	// Chain is, in attached mode, the regular chain the admin jumps to; it
	// also prefixes the names of all other objects pcpd creates there
	// (Chain + "_"). Default "pcpd". Unused standalone.
	Chain string
	// AllowEcho lets ICMPv6 echo requests reach the protected prefixes.
	AllowEcho bool
	// Meter is the kernel's per-source request meter (meter.go),
	// standalone only. Its Ports are the ports pcpd serves on, which the
	// notrack rules match too.
	Meter Meter
	// TrackControl leaves pcpd's own control traffic (UDP to and from
	// Meter.Ports on this host) to conntrack. By default, standalone, two
	// raw-priority chains mark it untracked (notrack.go); set it when the
	// host's other rules need those datagrams tracked.
	TrackControl bool
	// Routes answers which interfaces the host routes each owner's
	// prefixes through, for the owner meter's reverse-path check
	// (ownermeter.go, ownerRules): they pass it without a route lookup.
	// It must ask the network namespace conn is aimed at (pcpd:
	// NetlinkRoutes(), its own). Nil: every datagram of an owner's is
	// looked up, as before.
	Routes Routes
}

func (c *Config) fill() error {
	if c.Table == "" {
		c.Table = "pcpd"
	}
	if c.Chain == "" {
		c.Chain = "pcpd"
	}
	for _, n := range []string{c.Table, c.Chain} {
		// NFT_NAME_MAXLEN is 256 including the NUL; leave room for suffixes.
		if len(n) > 200 || slices.Contains([]byte(n), 0) {
			return fmt.Errorf("pinhole: bad object name %q: %w", n, ErrInvalid)
		}
	}
	if c.Meter.ReversePath > ReversePathOff {
		return fmt.Errorf("pinhole: %v: %w", c.Meter.ReversePath, ErrInvalid)
	}
	return c.Meter.fill()
}

// Backend manages pcpd's nftables objects over one netlink connection. It
// is safe for concurrent use; calls are serialized.
type Backend struct {
	mu sync.Mutex
	// conn is the caller's connection, until a failed write that may have
	// left replies of its batch unread on it (a lasting one) makes Backend
	// replace it with one of its own (ownConn; resetConn).
	conn    *nftables.Conn
	ownConn bool
	// nl is the netlink socket of conn when conn is the Backend's own
	// (dialConn), for flush's read deadline; nil on the caller's
	// connection (a fake-dialled test one, or the fallback when the dial
	// failed), which flush reads without one.
	nl *netlink.Conn
	// readSince: conn was read since the last flush (readConn), which
	// may have left replies queued; under mu.
	readSince bool
	// readHook, when set (tests only: CutReadAt), runs in readConn.
	readHook func()
	// flushHook, when set (tests only: QueueOversizedSet), runs on conn
	// just before flush sends its batch.
	flushHook func(*nftables.Conn)
	netns     int // conn's namespace (conn.NetNS), fixed: read without mu
	cfg       Config
	raw       rawRules // getRules' second dump, on conn's namespace; under mu
	// healthConn and healthRaw are Healthy's sockets for its reads without
	// mu, in conn's namespace, kept from check to check; under healthMu.
	// Dialling the raw one per check cost more than the dump; and closing
	// any NETLINK_NETFILTER socket makes the kernel take the namespace's
	// nftables commit lock and wait an RCU grace period under it (nf_tables'
	// NETLINK_URELEASE handler), which held every Apply's transaction
	// meanwhile: with healthConn dialled and closed per check, each
	// tamper check of the open80 bench row held 166-449 requests past
	// 5 ms (up to 10-13 ms; BENCHMARKS.md item 42).
	healthConn sideConn
	healthRaw  rawRules
	healthMu   sync.Mutex
	// listConn is List's connection, kept from call to call for the same
	// reason (it dialled a transient socket per set, 8 a call); under
	// listMu.
	listConn sideConn
	listMu   sync.Mutex
	// foreignConn is ForeignDNAT's connection (foreign.go), kept for the
	// same reason; under foreignMu.
	foreignConn sideConn
	foreignMu   sync.Mutex
	// foreignGen tells ForeignDNAT whether its last read still holds
	// (foreigngen.go); under foreignMu.
	foreignGen foreignGen
	// onForeign is OnForeignChange's function (nil: none).
	onForeign atomic.Pointer[func()]
	// ports are the netlink port ids of the Backend's own sockets, the
	// recent ones (watch.go): what they commit is not someone else's
	// change.
	ports ownPorts

	table                  *nftables.Table
	sets                   [numKinds]*nftables.Set
	snat                   [numSNAT]*nftables.Set
	protected6, protected4 *nftables.Set
	meter6, meter4         *nftables.Set // standalone only (meter.go)
	owners6, owners4       *nftables.Set // standalone only: the owner meter (ownermeter.go)
	served6, served4       *nftables.Set // standalone only: the serving addresses (notrack.go)
	servingIfs             *nftables.Set // the serving interfaces and lo (notrack.go; attached too: the guards match it)
	chainControlIn         string        // standalone only: the control chains (notrack.go)
	chainControlLocal      string
	chainNotrackOut        string
	chainEntry             string
	chainGuard6            string
	chainGuard4            string
	chainRecheck6          string        // the re-check of labelled flows (cutflows.go; attached: attcut.go)
	chainAdmit6            string        // standalone only: the admission's record of the flow (flowed.go)
	flowed6                *nftables.Set // standalone only: the addresses admitted flows went to (flowed.go)
	// flowed: FlowedAddrs' connection and trust; unrecorded: a Setup or
	// Healthy found flows may have been admitted unrecorded (flowed.go),
	// sticky for the Backend's life. Under mu.
	flowed     flowedState
	unrecorded bool
	// witnessOwed: the record untrusted (noteUnrecorded) and what says so
	// to a later pcpd over the table (admit6's counter at 1) not written
	// since: a write failed, or none was tried yet. Written again at each
	// Healthy that finds the layout intact and at Close (flowedlife.go:
	// the witness).
	witnessOwed      bool
	chainNATCut      string // the re-check of DNAT-ed flows, its base chain (natcut.go; attached, of both: attcut.go)
	chainRecheckNAT  string
	chainPrerouting  string
	chainPostrouting string
	// chainLocalOut drops what the host's own processes send from a
	// protected address that is not the host's (rules.go: localOut).
	chainLocalOut string

	// gen counts the writes that change what Healthy compares with
	// (Setup, SetProtected, SetOwners, RepairOwners, Teardown; not Apply):
	// Healthy reads without b.mu and reads again when one came between.
	gen uint64

	protected    []netip.Prefix // last SetProtected, re-applied by Setup
	hasProtected bool
	served       []netip.Addr // last SetServed (servedAddrs' form), re-applied by Setup
	hasServed    bool
	servedIfs    []string       // last SetServed's interface names ("lo" added, sorted), re-applied by Setup
	owners       []Owner        // last SetOwners, re-applied by Setup
	holes        []netip.Prefix // and its holes
	hasOwners    bool
	owned        bool // a Setup succeeded: the objects are pcpd's (ownership.go)
	// ownerCounts is each owner chain's drop counters (reverse path, rate;
	// unownedChain's: its rate, third)
	// as last read; drops their growth since this Backend first saw each
	// chain (MeterDrops, ownermeter.go).
	ownerCounts map[string][3]uint64
	// ownerIfs is, per owner chain, the interfaces its reverse-path rule
	// passes without a route lookup (ownerRules), as last written, and
	// ownerIfsSeq the routeSeq of the route ask that answered them: both
	// SetOwners and FollowRoutes ask the routes without the lock, so an
	// answer is adopted only over an older one (routes.go, adoptIfs).
	ownerIfs map[string][]int
	// listed is, per set of an owner chain's interfaces (ifsKey), its
	// rules as the kernel listed them once written (learnListed).
	listed      map[string][][]expr.Any
	ownerIfsSeq map[string]uint64
	routeSeq    atomic.Uint64
	// followed is the last FollowRoutes round that asked and wrote for
	// every owner: the Routes' watch generation (RouteWatcher) and b.gen
	// then, so that the next round skips its lookups when neither moved.
	followed struct {
		ok          bool
		routes, gen uint64
		at          time.Time
	}
	drops [3]atomic.Uint64
	// loopDrops is the host's loopback bucket's drops (loopbackRules),
	// MeterDrops.Loopback: what control_local's loopback limit counted
	// since this Backend wrote or first read the chain; loopCount its
	// counter as last read, loopSeen whether there is one to compare
	// (foldLoopbackCounter).
	loopDrops atomic.Uint64
	loopCount uint64
	loopSeen  bool
	// lookedUp is the owners whose chain's reverse-path rule has no
	// interfaces, as of the last SetOwners or FollowRoutes
	// (RouteLookupOwners); read without b.mu.
	lookedUp atomic.Pointer[[]Owner]
	// inPlace: the kernel updates an element's timeout when it is re-added
	// (Linux ≥ 6.10), found by the probe of the first successful Setup
	// (probed); without it Install and Refresh re-create the element
	// (probe.go).
	inPlace, probed bool
	// cutLabels: the layout labels the flows pinholes admit and re-checks
	// them (cutflows.go): standalone, unless the kernel refused labels
	// (Setup). cutting: a layout with them was committed (CutsFlows,
	// read without mu). refuseLabels (tests only) makes the label rules
	// ones the kernel refuses.
	cutLabels, refuseLabels bool
	cutting                 atomic.Bool
	// cuttingNAT: as cutting, for the DNAT-ed flows natcut re-checks
	// (natcut.go); natUnlabelled: as unlabelled, a Setup found pcpd's
	// DNAT rules translating without natLabel (an upgrade from a layout
	// before natcut.go, or a rule an admin altered).
	cuttingNAT    atomic.Bool
	natUnlabelled bool
	// natCut: the layout holds natcut's rules (with cutLabels): unless
	// the kernel refused them (EINVAL: a lookup into a map without a
	// destination register, before Linux 6.5; Setup). refuseNATCut
	// (tests only) makes them ones every kernel refuses so.
	natCut, refuseNATCut bool
	// natLabel: the label bit of this table's DNAT-ed flows (natLabelFor).
	natLabel int
	// natAsked: a Setup of this Backend asked conntrack for flows DNAT-ed
	// unlabelled (dnatFlowsUnlabelled), as it does once.
	natAsked bool
	// recheckFlows: a Healthy found the layout damaged (noteDamage) since
	// the last successful Setup, which may have let flows in unlabelled (a
	// flushed guard6 falls through to the forward chain's accept): the
	// next Setup reads conntrack again, whatever the marks say.
	recheckFlows bool
	// preReads are Setup's reads of conntrack made before it took mu
	// (arm.go): PrepareSetup's until the next Setup, then Setup's own;
	// nil otherwise.
	preReads *setupReads
	// prepared: PrepareSetup ran since the last Setup (its caller calls
	// VerifySetup after Setup); a Setup without it verifies itself
	// (h/left10). wrote: the running Setup's layout transaction was
	// committed.
	prepared, wrote bool
	// pinVerify, natVerify: the last Setup took "no flow admitted
	// (DNAT-ed) unlabelled" from PrepareSetup's read, made before the
	// caller's wait for its own lock, while the damaged layout let flows
	// in unlabelled (review h/revleft9): CutsFlows stays false for the
	// kind and its re-check chain unmarked until VerifySetup reads
	// conntrack again over the layout Setup wrote.
	pinVerify, natVerify bool
	// unlabelled: a Setup found guard6 admitting through a pinhole set
	// without labelling (a table laid out by a pcpd before cutflows.go,
	// or an admission rule an admin altered), or its first Setup found
	// conntrack holding a flow such a rule admitted (pinFlowsUnlabelled):
	// the flows those rules admitted live on unlabelled, not re-checked, so
	// CutsFlows stays false for this Backend's life (cutflows.go, review
	// h/revctcut).
	unlabelled bool
	// bitAsked: a Setup of this Backend looked for its label bit in
	// rules not its own (checkLabelBit, labelbit.go), as it does once.
	bitAsked bool
	// pinAsked: as natAsked, for the pinhole kinds (pinFlowsUnlabelled).
	pinAsked bool
	// disarmed: the cut is laid out disarmed until Arm (arm.go).
	disarmed bool
	// protectedFault, when set (tests only), runs before each of
	// syncProtected's transactions is queued: an error fails that
	// transaction unwritten, as a kernel error would.
	protectedFault func(set string) error

	// Apply's scratch, under mu: the elements of each step per set (the
	// nftables library encodes them at once and keeps nothing) and the
	// elements seen in the current phase.
	steps [numSteps][numSlots][]nftables.SetElement
	seen  map[string]struct{}
	enc   []encodedOp
}

// New returns a Backend that talks to the kernel in conn's namespace. The
// caller builds conn (nftables.New, with nftables.WithNetNSFd to aim it at
// a network namespace). The Backend writes over a lasting connection of
// its own there, dialled with a receive buffer that holds every
// acknowledgement of its largest batch (replyBuffer); conn is kept only
// if that dial fails (or conn is a fake-dialled test connection). After a
// failed write that may leave the connection out of step with the
// kernel's replies, the Backend replaces it (resetConn); Close closes its
// own. New does not touch nftables; call Setup.
func New(conn *nftables.Conn, cfg Config) (*Backend, error) {
	if conn == nil {
		return nil, fmt.Errorf("pinhole: nil connection: %w", ErrInvalid)
	}
	if err := cfg.fill(); err != nil {
		return nil, err
	}
	b := &Backend{conn: conn, cfg: cfg, netns: conn.NetNS}
	b.ports.gen, b.foreignGen.fake = &b.foreignGen, conn.TestDial != nil
	b.healthConn.batches, b.flowed.conn.batches = true, true
	for slot, s := range map[int]*sideConn{keptHealth: &b.healthConn, keptList: &b.listConn, keptFlowed: &b.flowed.conn} {
		s.note = func(nl *netlink.Conn) { b.ports.keep(slot, nl) }
		s.forget = func(nl *netlink.Conn) { b.ports.forget(slot, nl) }
	}
	if conn.TestDial == nil {
		if c, nl, err := dialConn(b.netns); err == nil {
			b.conn, b.ownConn, b.nl = c, true, nl
			b.ports.keep(keptMain, nl)
		}
	}
	b.table = &nftables.Table{Family: nftables.TableFamilyINet, Name: cfg.Table}
	prefix := ""
	if cfg.Attached {
		prefix = cfg.Chain + "_"
		b.chainEntry = cfg.Chain
		b.attCutNames(prefix) // attcut.go
	} else {
		b.chainEntry = "forward"
		b.chainControlIn, b.chainControlLocal, b.chainNotrackOut = "control_in", "control_local", "notrack_out"
		b.meter6, b.meter4 = meterSets(b.table, prefix, cfg.Meter.Size)
		b.owners6, b.owners4 = ownerMaps(b.table, prefix)
		b.served6, b.served4 = servedSets(b.table)
		b.chainRecheck6, b.cutLabels = "recheck6", true
		b.chainAdmit6, b.flowed6 = "admit6", flowedSet(b.table)
		b.chainNATCut, b.chainRecheckNAT, b.natCut = "natcut", "recheck_nat", true
		b.natLabel = natLabelFor(cfg.Table)
	}
	b.servingIfs = servingIfsSet(b.table, prefix)
	b.chainGuard6 = prefix + "guard6"
	b.chainGuard4 = prefix + "guard4"
	b.chainPrerouting = prefix + "prerouting"
	b.chainPostrouting = prefix + "postrouting"
	b.chainLocalOut = prefix + "local_out"
	for k := range numKinds {
		b.sets[k] = newSet(b.table, prefix, specs[k])
	}
	for i := range numSNAT {
		b.snat[i] = newSet(b.table, prefix, snatSpecs[i])
	}
	b.protected6 = &nftables.Set{Table: b.table, Name: prefix + "protected6", KeyType: nftables.TypeIP6Addr,
		Interval: true, KeyByteOrder: binaryutil.BigEndian, Comment: "pcpd: guarded IPv6 prefixes"}
	b.protected4 = &nftables.Set{Table: b.table, Name: prefix + "protected4", KeyType: nftables.TypeIPAddr,
		Interval: true, KeyByteOrder: binaryutil.BigEndian, Comment: "pcpd: guarded IPv4 prefixes"}
	return b, nil
}

// allSets lists every set pcpd owns.
func (b *Backend) allSets() []*nftables.Set {
	all := append(append(b.sets[:], b.snat[:]...), b.protected6, b.protected4)
	if b.meter6 != nil {
		all = append(all, b.meter6, b.meter4)
	}
	if b.owners6 != nil {
		all = append(all, b.owners6, b.owners4)
	}
	if b.served6 != nil {
		all = append(all, b.served6, b.served4)
	}
	if b.flowed6 != nil {
		all = append(all, b.flowed6)
	}
	return append(all, b.servingIfs)
}

// Setup creates pcpd's table (standalone), sets and chains where missing,
// and rewrites the rules of pcpd's own chains, all in one transaction; then
// it brings the protected sets to the last SetProtected (writeProtected)
// and writes the owner meter's chains and maps, each in bounded
// transactions of their own. It is idempotent and keeps set contents, so
// it is also the repair step after Healthy fails and the first step after a
// restart (pinholes installed before the restart stay in place). It never
// touches other objects.
//
// Standalone, when the kernel refuses the layout's conntrack label rules
// (EOPNOTSUPP: a kernel without CONFIG_NF_CONNTRACK_LABELS), Setup writes
// it again without them, for good: the ruleset then does not cut a
// removed pinhole's flows (CutsFlows is false; cutflows.go).
func (b *Backend) Setup() error {
	// The reads of conntrack outside b.mu (arm.go): PrepareSetup's, if
	// still good; if it ran and they are not, none (unreadLocked: its
	// caller holds a lock of its own and verifies after); else now.
	b.mu.Lock()
	pre, prepared := b.preReads, b.prepared
	b.preReads, b.prepared = nil, false
	if pre != nil && pre.gen != b.gen {
		pre = nil
	}
	b.mu.Unlock()
	if pre == nil && !prepared {
		pre = b.prepareReads(false)
	}
	err := b.setupWith(pre, prepared)
	if !prepared {
		// A Setup on its own (a start): whether flows were let in
		// unlabelled is read once the layout is written, without b.mu
		// (VerifySetup): every such flow came before the layout, so the
		// read sees it. Before (review h/revleft9's left item), it was
		// read right before b.mu, and a flow the damaged layout let in
		// after that read (or in a bucket the dump had passed) was
		// missed: CutsFlows true and the re-check chain marked over a
		// ruleset that does not cut it (TestSetupSeesFlowLetInAfterItsRead).
		b.mu.Lock()
		wrote := b.wrote
		b.mu.Unlock()
		if wrote {
			b.VerifySetup()
		}
	}
	return err
}

// setupWith is Setup under b.mu, with the reads pre made before it;
// prepared: by PrepareSetup, whose caller holds a lock of its own and
// calls VerifySetup after it.
func (b *Backend) setupWith(pre *setupReads, prepared bool) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.wrote = false
	if pre != nil && pre.gen != b.gen {
		pre = nil // read again under b.mu, as before
	}
	if pre == nil && prepared {
		// PrepareSetup's answers voided, or none asked: nothing read
		// under the caller's lock nor b.mu (unreadLocked).
		pre = b.unreadLocked()
	}
	b.preReads = pre
	defer func() { b.preReads = nil }()
	err := b.setupLocked()
	if b.labelsRefusal(err) {
		return b.setupWithout(&b.cutLabels, labelsRefusal, err)
	}
	if b.natCutRefusal(err) {
		return b.setupWithout(&b.natCut, natCutRefusal, err)
	}
	return err
}

// setupWithout: Setup's layout was refused (err) as a kernel without a
// feature refuses it (refused: labelsRefusal, natCutRefusal); it is
// written again with the feature off (*on false), which stays off. Refused
// the same way without it too, the feature was not the cause: *on is set
// again and err returned. Caller holds b.mu.
func (b *Backend) setupWithout(on *bool, refused func(error) bool, err error) error {
	*on = false
	err2 := b.setupLocked()
	if refused(err2) {
		*on = true
		return err
	}
	return err2
}

// layoutError is Setup's layout transaction failing: labelsRefusal looks
// at it alone (an owner meter write refused with EOPNOTSUPP is not the
// labels').
type layoutError struct{ error }

func (e layoutError) Unwrap() error { return e.error }

// existing: pcpd's layout is there (or it cannot be told). Caller
// holds b.mu.
func (b *Backend) existing() bool { ok, err := b.laidOut(); return err != nil || ok }

// markTrusted: chain carries mark and the layout is as Setup writes it. A
// mark is trusted only over such a layout: one damaged while no pcpd ran
// (a guard6 flushed between a stop and this start: flows let in
// unlabelled through the forward chain's accept) was seen by no Healthy,
// so recheckFlows is not set (review h/revops,
// TestCutsFlowsAfterDamageWhileDown). Caller holds b.mu.
func (b *Backend) markTrusted(chain, mark string) bool {
	return b.markedChecked(chain, mark) && b.layoutIntact()
}

func (b *Backend) setupLocked() (err error) {
	// A failed attempt drops what it queued (dropUnsent), before Setup
	// tries again without the labels or returns.
	defer b.dropUnsent(&err)
	b.gen++
	if err := b.checkOwnershipLocked(); err != nil {
		return err
	}
	if err := b.checkLabelBit(); err != nil {
		return err
	}
	// Before the layout makes the sets: a cut over sets made now is laid
	// out disarmed while labelled flows live (arm.go).
	b.checkDisarm()
	if b.disarmed {
		// Nothing cuts from here until Arm, even if this Setup fails
		// (attached: the admin's table not back yet, ErrNoTable):
		// CutsFlows kept what the last Setup stored (review h/revarm,
		// finding 3; TestSetupDisarmedFailsCutsFlows).
		b.cutting.Store(false)
		b.cuttingNAT.Store(false)
	}
	// A start over an existing layout: flows an unlabelled layout admitted
	// or DNAT-ed may outlive the Setup that relabelled it
	// (pinFlowsUnlabelled, dnatFlowsUnlabelled). Asked once, and not over
	// a layout an earlier Setup marked checked (checkedMark); again by the
	// Setup after a Healthy found damage (recheckFlows).
	existing, marked := b.existing, b.markTrusted
	unguarded := false
	if b.recordsFlows() && !b.unrecorded {
		var unrecorded bool
		if unrecorded, unguarded = b.flowsUnrecorded(); unrecorded {
			b.noteUnrecorded() // admit6's counter is written at 1 (flowed.go)
		}
	}
	if b.cutLabels && !b.unlabelled {
		b.unlabelled = b.admitsUnlabelled()
		if !b.unlabelled && (!b.pinAsked || b.recheckFlows) {
			b.pinAsked = true
			if (b.recheckFlows || !marked(b.chainRecheck6, flowsCheckedMark)) && existing() {
				b.unlabelled = b.pinFlowsUnlabelled()
			} else if b.recheckFlows {
				// Damage found, the layout gone (an admin's reload
				// deleted the table): nothing of pcpd's filtered
				// meanwhile, and a flow let in then carries no label.
				// Not readable before the layout (no protected sets):
				// read over the written one (VerifySetup); before,
				// asked nothing, and CutsFlows said true over it
				// (review h/revrepair, TestRepairSeesFlowLetInWhileTableGone).
				b.pinVerify = true
			}
		}
	}
	if b.natCutting() && !b.natUnlabelled {
		b.natUnlabelled = b.translatesUnlabelled()
		if !b.natUnlabelled && (!b.natAsked || b.recheckFlows) {
			b.natAsked = true
			if (b.recheckFlows || !marked(b.chainRecheckNAT, natCheckedMark)) && existing() {
				b.natUnlabelled = b.dnatFlowsUnlabelled()
			} else if b.recheckFlows {
				b.natVerify = true // as pinVerify above
			}
		}
	}
	if b.cfg.Attached {
		ok, err := b.tableExists()
		if err != nil {
			return err
		}
		if !ok {
			return fmt.Errorf("pinhole: attached mode: inet table %q: %w", b.cfg.Table, ErrNoTable)
		}
	} else {
		b.conn.AddTable(b.table)
	}
	for _, s := range b.allSets() {
		s.ID = 0 // fresh batch-local ID; the kernel matches existing sets by name
		if err := b.conn.AddSet(s, nil); err != nil {
			return fmt.Errorf("pinhole: set %s: %w", s.Name, err)
		}
	}
	if err := b.queueSentinels(); err != nil {
		return err
	}
	if b.hasServed {
		if err := b.queueServed(b.served, b.servedIfs); err != nil {
			return err
		}
	}
	// The protected sets' contents are not in this transaction: with
	// thousands of static clients' prefixes it exceeded the netlink
	// socket's send buffer (EMSGSIZE at about 4 000 prefixes), and pcpd
	// could not start. This transaction leaves them as they are (AddSet
	// keeps an existing set's elements), so it never turns the guard off
	// for a prefix the kernel guards: it only puts back what guards them
	// (the entry chain's rules, guard6/guard4), and writeProtected below
	// then adds and removes prefixes in bounded transactions that never
	// uncover an address guarded before and after.
	// Before the layout is written: the owner chains of a table laid out
	// before control_meter (main's, review9 U1) return, and once
	// control_local ends "goto unowned" their datagrams would be charged
	// to the unowned bucket too until the owner meter's write.
	onward, err := b.ownerChainsWithoutOnward()
	if err != nil {
		return err
	}
	if err := b.queueStaleControlRemoval(); err != nil {
		return err
	}
	if err := b.queueStaleCutRemoval(); err != nil {
		return err
	}
	chains := b.chains()
	if chains[unownedChain] != nil {
		// Its rule (and counter) is written again below: fold in what it
		// counted since its last read (MeterDrops).
		b.readOwnerCounters(unownedChain)
	}
	if b.metering() {
		b.readLoopbackCounter() // control_local too: its loopback bucket's
	}
	if err := b.queueMisshapenChainRemoval(chains); err != nil {
		return err
	}
	for _, c := range chains {
		b.conn.AddChain(c)
	}
	for _, cr := range b.layout() {
		b.queueRewrite(chains[cr.name], cr, true)
	}
	if testHookSetupLayout != nil {
		testHookSetupLayout()
	}
	if err := b.flush(); err != nil {
		return layoutError{fmt.Errorf("pinhole: setup of inet %s: %w", b.cfg.Table, classify(err))}
	}
	b.owned = true
	b.wrote = true
	b.recheckFlows = false
	// The lease sets' gc interval (setgc.go). Not fatal and not returned:
	// a kernel that refuses it keeps its default (1 s), which every set
	// had before; the next Setup (a repair) asks again.
	_ = b.setLeaseGC()
	b.cutting.Store(b.cutLabels && !b.unlabelled && !b.disarmed && !b.pinVerify)
	if unguarded {
		b.flowed.verify.Store(true) // until verifyFlowed (flowed.go)
	}
	b.flowed.recorded.Store(b.recordsFlows() && !b.unrecorded)
	if b.recordsFlows() && b.unrecorded {
		b.witnessOwed = false // admit6 written with its counter at 1 above
		b.writeMark()         // and the mark (flowedlife.go)
	}
	b.cuttingNAT.Store(b.natCutting() && !b.natUnlabelled && !b.disarmed && !b.natVerify)
	// Not fatal: the layout is committed, and the owner meter's write
	// below (or RepairOwners) rewrites the chains anyway.
	var onwardErr error
	if err := b.writeOwnerChainsOnward(onward); err != nil {
		onwardErr = fmt.Errorf("pinhole: setup of inet %s: %w", b.cfg.Table, err)
	}
	if chains[unownedChain] != nil {
		// Written anew: its drops count from 0 (MeterDrops), also those
		// before the first Healthy.
		if b.ownerCounts == nil {
			b.ownerCounts = map[string][3]uint64{}
		}
		b.ownerCounts[unownedChain] = [3]uint64{}
	}
	// control_local written anew: the loopback bucket's drops count from
	// 0, also those before the first Healthy.
	b.loopSeen, b.loopCount = b.metering(), 0
	// Now the guard's prefixes, in transactions of at most protectedTxn
	// elements (writeProtected). Between them the sets hold, for every
	// address, either what they held before or what they must hold, and
	// an address guarded both before and after is guarded throughout: a
	// repair of a damaged set (Healthy: checkProtected) adds what the set
	// lost and removes only what nobody gave (an element added by hand),
	// never a wanted prefix's guard, and at a first start, in a table
	// made anew, the clients not yet added are as unguarded as they were
	// before pcpd ran. Before the owner meter (as updateProtected does in
	// the server): the guard is what keeps clients' inbound traffic out.
	//
	// A failure here does not fail the layout either: Setup goes on to the
	// owner meter and returns an error wrapping ErrProtected, so the
	// caller re-installs its pinholes and retries with RepairProtected.
	// The sets then hold, for every address, the old or the new guard
	// (writeProtected), and the pinholes only open what each lease was
	// authorised for inside it; returning early left every pinhole set
	// as the damage left it (flushed: every mapping closed) for as long
	// as the protected sets could not be written.
	var protErr error
	if b.hasProtected {
		if err := b.writeProtected(b.protected); err != nil {
			protErr = fmt.Errorf("pinhole: setup of inet %s: %w: %w", b.cfg.Table, ErrProtected, err)
		}
	}
	// The owner meter's chains and maps after the layout, in transactions
	// of their own (writeOwners: one would overflow the netlink socket with
	// many owners). Until they are written, the maps hold what they held
	// (or, in a table made anew, nothing: no owner is metered for that
	// moment).
	//
	// A failure here does not fail the layout, which is committed: Setup
	// returns an error wrapping ErrOwnerMeter, and the caller installs its
	// pinholes all the same and retries with RepairOwners (RELIABILITY.md
	// bug 4, review S3: before, one owner meter write error failed all of
	// Setup, and the server re-installed no lease until it could write
	// the meter). That opens nothing: the owner meter only drops requests
	// to pcpd's own port before they reach the socket (a flood beyond an
	// owner's rate, or spoofed owned sources: the reverse-path rule). The
	// guard, the pinhole sets and the per-source meter are in the layout
	// above, and the leases to re-install were each authorised when made
	// and held before the damage. Without the meter's chains or map
	// elements an owner's sources are metered per source only, as sources
	// nobody owns, and pcpd's own per-source and per-owner buckets still
	// apply; the requests that pass for want of its reverse-path rule
	// would pass the same way whether or not the pinholes are back.
	var meterErr error
	if b.hasOwners && b.ownerMetering() {
		if err := b.writeOwners(b.owners, b.holes, true); err != nil {
			meterErr = fmt.Errorf("pinhole: setup of inet %s: %w: %w", b.cfg.Table, ErrOwnerMeter, err)
		}
	}
	if !b.probed {
		ok, err := b.probeInPlace()
		if err != nil {
			return err
		}
		b.inPlace, b.probed = ok, true
	}
	return errors.Join(protErr, onwardErr, meterErr)
}

// queueMisshapenChainRemoval queues the deletion of every layout chain
// present with another type, hook, priority or policy than chains gives
// it (chainShapeIs): AddChain cannot make a regular chain a base chain or
// move a base chain to another hook, so Setup could not repair one
// (review6 F3). Every present layout chain is flushed first, in the same
// transaction, so that no goto holds a deleted chain; Setup then makes
// them all again and writes their rules. Caller holds b.mu.
func (b *Backend) queueMisshapenChainRemoval(chains map[string]*nftables.Chain) error {
	ok, err := b.tableExists()
	if err != nil || !ok {
		return err
	}
	got, err := b.view().chainsOf()
	if err != nil {
		return err
	}
	var bad []*nftables.Chain
	for name, want := range chains {
		if c, ok := got[name]; ok && !chainShapeIs(c, want) {
			bad = append(bad, want)
		}
	}
	if len(bad) == 0 {
		return nil
	}
	for name := range chains {
		if got[name] != nil {
			b.conn.FlushChain(&nftables.Chain{Table: b.table, Name: name})
		}
	}
	for _, c := range bad {
		b.conn.DelChain(&nftables.Chain{Table: b.table, Name: c.Name})
	}
	return nil
}

// dnatPriority is pcpd's DNAT chain's (prerouting, standalone and
// attached): one after dstnat (-100), where every other DNAT of the host
// sits (nft's "priority dstnat", iptables' nat PREROUTING, Docker,
// kube-proxy, CNI hostPort). Security (issue 9, h/natprio): the kernel
// runs the NAT chains of a hook in priority order and stops at the first
// that binds a new connection (nf_nat_inet_fn), and chains of EQUAL
// priority newest-registered first (nf_hook_entries_grow). At dstnat
// pcpd's chain, registered after a firewall loaded at boot, ran before
// the admin's own port forwards: a client granted a public port that the
// admin forwards with a DNAT rule of their own (no socket holds it, so
// the host port scan cannot see it) took its new connections
// (TestNAPTBesideAdminPortForward). One later, every DNAT at the
// standard priority is consulted first, whatever the load order: the
// admin's forward keeps its traffic, and pcpd's translates only what no
// such rule took (a NAT chain's accept without a binding passes on to
// the next). The client is still told SUCCESS (pcpd cannot read other
// tables' rules); README's --reserved-ports says to list such ports.
//
// Nothing else's order changes: natcut (-150, natCutPriority) and
// attached pcpd_cut still run before it, on established packets that
// the NAT hook (registered at -100 whatever its chains' priorities)
// translates by their binding without any chain; the guards
// (forward, filter) run after prerouting as before; the SNAT chain
// (postrouting, srcnat - 1) is another hook. pcpd has no output-hook
// NAT chain (the host's own connections to a mapped endpoint are not
// translated), so none to move. A table laid out by an older pcpd, its
// chain at dstnat, is re-made at Setup in its one transaction
// (queueMisshapenChainRemoval: chainShapeIs compares the priority); the
// maps keep their elements and conntrack its bindings, so mappings and
// their connections carry on (TestSetupMovesDNATChainPriority).
var dnatPriority = *nftables.ChainPriorityNATDest + 1

// chains returns pcpd's chain objects, regular chains first so jumps to
// them resolve within the batch.
func (b *Backend) chains() map[string]*nftables.Chain {
	outAccept := nftables.ChainPolicyAccept
	m := map[string]*nftables.Chain{
		b.chainGuard6: {Table: b.table, Name: b.chainGuard6},
		b.chainGuard4: {Table: b.table, Name: b.chainGuard4},
		b.chainPrerouting: {Table: b.table, Name: b.chainPrerouting, Type: nftables.ChainTypeNAT,
			Hooknum: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityRef(dnatPriority)},
		// One below srcnat: the kernel takes the first NAT binding a
		// chain at the hook sets up, so pcpd's SNAT of a mapped internal
		// port wins over the host's general masquerade at srcnat.
		b.chainPostrouting: {Table: b.table, Name: b.chainPostrouting, Type: nftables.ChainTypeNAT,
			Hooknum: nftables.ChainHookPostrouting, Priority: nftables.ChainPriorityRef(*nftables.ChainPriorityNATSource - 1)},
		b.chainLocalOut: {Table: b.table, Name: b.chainLocalOut, Type: nftables.ChainTypeFilter,
			Hooknum: nftables.ChainHookOutput, Priority: nftables.ChainPriorityFilter, Policy: &outAccept},
	}
	if b.cutLabels {
		m[b.chainRecheck6] = &nftables.Chain{Table: b.table, Name: b.chainRecheck6}
	}
	if b.recordsFlows() {
		m[b.chainAdmit6] = &nftables.Chain{Table: b.table, Name: b.chainAdmit6}
	}
	if b.natCutting() {
		m[b.chainRecheckNAT] = &nftables.Chain{Table: b.table, Name: b.chainRecheckNAT}
	}
	if b.natCutting() || b.attCut() {
		m[b.chainNATCut] = b.attCutChain() // natcut, or attached pcpd_cut (attcut.go)
	}
	if b.cfg.Attached {
		m[b.chainEntry] = &nftables.Chain{Table: b.table, Name: b.chainEntry}
	} else {
		accept := nftables.ChainPolicyAccept
		m[b.chainEntry] = &nftables.Chain{Table: b.table, Name: b.chainEntry, Type: nftables.ChainTypeFilter,
			Hooknum: nftables.ChainHookForward, Priority: nftables.ChainPriorityFilter, Policy: &accept}
	}
	for _, c := range b.controlChains() {
		m[c.Name] = c
	}
	return m
}

// SetProtected replaces the protected prefixes: traffic to them is dropped
// (standalone) unless a pinhole, an established flow or essential ICMPv6
// lets it in. Traffic to any other address is left alone. Both families
// may be given; overlapping prefixes are merged. Only what changed is
// written, in transactions of bounded size (writeProtected): an address
// protected before and after stays protected throughout; one no longer
// given may be unguarded, and one newly given guarded, before the call
// returns. On error the sets hold a mix of the old and new prefixes, each
// address one or the other (a family whose set could be written holds the
// new ones).
//
// Once they are valid, the prefixes given are what the kernel should
// hold, even if writing them fails part way (as SetOwners' owners):
// Healthy then reports the difference wrapping ErrProtected, and
// RepairProtected or Setup write them. Before, a failed SetProtected kept
// the old list: Healthy reported the half-written sets as damage, the
// server's full repair (Setup, and a re-install of every lease) wrote the
// old list back, uncovering the new clients the call had guarded, the
// server gave the new list again, and so on, every check while the
// failure lasted (review of 2026-12-03, h/review2 finding 3).
func (b *Backend) SetProtected(prefixes []netip.Prefix) (err error) {
	if err := validProtected(prefixes); err != nil {
		return err // not adopted: every repair would fail on it
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	defer b.dropUnsent(&err)
	b.gen++
	if b.recordsFlows() && (!b.hasProtected || protects6More(b.protected, prefixes)) {
		// Flows to the new addresses let in before, through no guard,
		// are unrecorded: read conntrack first (verifyFlowed). The
		// first call too: the prefixes may have changed while no pcpd
		// ran (a start over the kernel's set).
		b.flowed.verify.Store(true)
	}
	b.protected = slices.Clone(prefixes)
	b.hasProtected = true
	if err := b.writeProtected(b.protected); err != nil {
		return fmt.Errorf("pinhole: set protected prefixes: %w: %w", ErrProtected, err)
	}
	return nil
}

// RepairProtected writes the protected sets again from the last
// SetProtected (only the difference, as SetProtected). It touches nothing
// else, so it is the retry after Setup or Healthy reported ErrProtected,
// without re-installing pinholes.
func (b *Backend) RepairProtected() (err error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	defer b.dropUnsent(&err)
	b.gen++
	if !b.hasProtected {
		return nil
	}
	if err := b.writeProtected(b.protected); err != nil {
		return fmt.Errorf("pinhole: repair of the protected sets: %w: %w", ErrProtected, err)
	}
	// The check noteDamage owed: its chains unmarked until VerifySetup
	// (a failure only leaves a stale mark, as before).
	if b.unmarkOwed() {
		if ferr := b.flush(); ferr != nil {
			b.dropUnsent(&ferr)
		}
	}
	return nil
}

// validProtected: every prefix is valid.
func validProtected(prefixes []netip.Prefix) error {
	for _, p := range prefixes {
		if !p.IsValid() {
			return fmt.Errorf("pinhole: protected prefix %v: %w", p, ErrInvalid)
		}
	}
	return nil
}

// protectedTxn bounds the set elements (deleted and added) of one
// transaction of writeProtected. One transaction is one sendmsg, which
// the netlink socket's send buffer bounds (208 KiB by default; a protected
// element takes 30 to 50 bytes): Setup, which held every protected element
// in its one transaction, failed with EMSGSIZE at about 4 000 prefixes, and
// SetProtected, a flush and every element in one transaction, at about
// 10 000.
const protectedTxn = 1024

// writeProtected brings both protected sets to prefixes. It reads what the
// kernel holds and writes only the difference, in transactions of at most
// protectedTxn elements (planIntervalSync) that never uncover an address
// guarded before and after (a range the kernel holds is deleted only in a
// transaction that adds what covers its addresses still wanted) and never
// add a range overlapping one the set still holds (the kernel refuses
// that). An unchanged set costs a dump and nothing else. A failure in one
// family's set does not keep the other's from being written (before,
// protected6 failing left a new IPv4 client unguarded): the error joins
// both. Caller holds b.mu.
func (b *Backend) writeProtected(prefixes []netip.Prefix) error {
	if err := validProtected(prefixes); err != nil {
		return err
	}
	v6, v4 := splitProtected(prefixes)
	return errors.Join(b.syncProtected(b.protected6, v6), b.syncProtected(b.protected4, v4))
}

// syncProtected brings one protected set to prefixes (writeProtected),
// stopping at the first failed transaction: the set then holds, for every
// address, what it held before or what it must hold.
func (b *Backend) syncProtected(s *nftables.Set, prefixes []netip.Prefix) error {
	held, err := b.readIntervals(s)
	if err != nil {
		return err
	}
	have := make([][2]netip.Addr, len(held))
	for i, r := range held {
		have[i] = [2]netip.Addr{r.first, r.last}
	}
	for _, txn := range planIntervalSync(have, elementRanges(intervalElements(prefixes)), protectedTxn) {
		if f := b.protectedFault; f != nil {
			if err := f(s.Name); err != nil {
				return fmt.Errorf("pinhole: set %s: %w", s.Name, err)
			}
		}
		if err := b.queueElements(s, b.conn.SetDeleteElements, rangesElements(txn.del)); err != nil {
			return fmt.Errorf("pinhole: set %s: %w", s.Name, err)
		}
		if err := b.queueElements(s, b.conn.SetAddElements, rangesElements(txn.add)); err != nil {
			return fmt.Errorf("pinhole: set %s: %w", s.Name, err)
		}
		if err := b.flush(); err != nil {
			return fmt.Errorf("pinhole: set %s: %w", s.Name, classify(err))
		}
	}
	return nil
}

// intervalTxn is one transaction of planIntervalSync: ranges to delete
// from an interval set, then ranges to add, inclusive.
type intervalTxn struct{ del, add [][2]netip.Addr }

// planIntervalSync plans the transactions that take an interval set from
// the ranges it holds (have) to want, each sorted and disjoint. After
// every transaction each address held before and wanted after is covered
// (the guard never lapses for a client that stays), the set's ranges never
// overlap (the kernel refuses that), and no transaction has more than
// limit elements (one transaction is one sendmsg; limit below 6 counts
// as 6).
//
// Ranges of both lists that overlap, directly or through others, form a
// component, whose union is one range. A component whose only ranges are
// one held and an equal one wanted is left alone. One of at most limit
// elements is replaced whole in one transaction (its held ranges deleted,
// its wanted ones added), several packed into a transaction. A larger one
// (thousands of clients' /64s held and the site's /48 wanted, or back)
// is changed in steps that never uncover a kept address, since an
// interval set element is any range, not just a prefix (growComponent,
// shrinkComponent): first its held ranges are merged, a batch at a time,
// into one range that grows from the component's start (each step deletes
// the growing range and the next held ranges and adds their hull, which
// lies within the component's union: held or wanted addresses), until it
// is the whole union; then that range is cut down, a batch at a time, to
// the wanted ranges (each step deletes the rest, adds the next wanted
// ranges and a rest that starts at the following wanted range). Held
// addresses not wanted stay guarded until the shrinking drops them, and
// wanted ones not held are guarded from the growing on; an address held
// and wanted is guarded throughout.
func planIntervalSync(have, want [][2]netip.Addr, limit int) []intervalTxn {
	limit = max(limit, 6)
	type item struct {
		r      [2]netip.Addr
		wanted bool
	}
	items := make([]item, 0, len(have)+len(want))
	for _, r := range have {
		items = append(items, item{r, false})
	}
	for _, r := range want {
		items = append(items, item{r, true})
	}
	slices.SortStableFunc(items, func(a, b item) int { return a.r[0].Compare(b.r[0]) })
	var (
		txns []intervalTxn
		cur  intervalTxn
		n    int
	)
	for i := 0; i < len(items); {
		j, end := i+1, items[i].r[1]
		for ; j < len(items) && items[j].r[0].Compare(end) <= 0; j++ {
			if items[j].r[1].Compare(end) > 0 {
				end = items[j].r[1]
			}
		}
		comp := items[i:j]
		i = j
		if len(comp) == 2 && comp[0].wanted != comp[1].wanted && comp[0].r == comp[1].r {
			continue // held as wanted
		}
		m := 0
		var held, wanted [][2]netip.Addr
		for _, it := range comp {
			m += rangeElementCount(it.r)
			if it.wanted {
				wanted = append(wanted, it.r)
			} else {
				held = append(held, it.r)
			}
		}
		if m > limit {
			if n > 0 {
				txns, cur, n = append(txns, cur), intervalTxn{}, 0
			}
			union := [2]netip.Addr{comp[0].r[0], end}
			txns = append(txns, growComponent(held, union, limit)...)
			txns = append(txns, shrinkComponent(wanted, union, limit)...)
			continue
		}
		if n > 0 && n+m > limit {
			txns, cur, n = append(txns, cur), intervalTxn{}, 0
		}
		cur.del = append(cur.del, held...)
		cur.add = append(cur.add, wanted...)
		n += m
	}
	if n > 0 {
		txns = append(txns, cur)
	}
	return txns
}

// growComponent plans the transactions that take held, the sorted held
// ranges of one component, to its union as one range. Each deletes the
// range grown so far (none at first) and the next held ranges and adds
// their hull from union's start: the addresses it newly covers lie within
// union, so each is held or wanted, and it overlaps no held range left
// (those start past the last one deleted). At most limit elements each
// (limit >= 6): 2 for the grown range, 2 for the hull, 2 per held range.
func growComponent(held [][2]netip.Addr, union [2]netip.Addr, limit int) []intervalTxn {
	if len(held) == 1 && held[0] == union {
		return nil
	}
	batch := max((limit-4)/2, 1)
	var (
		txns  []intervalTxn
		grown [][2]netip.Addr // the range grown so far, once there is one
	)
	for len(held) > 0 {
		k := min(batch, len(held))
		txn := intervalTxn{del: append(slices.Clone(grown), held[:k]...)}
		hull := [2]netip.Addr{union[0], held[k-1][1]}
		if held = held[k:]; len(held) == 0 {
			hull = union
		}
		txn.add = [][2]netip.Addr{hull}
		grown = [][2]netip.Addr{hull}
		txns = append(txns, txn)
	}
	if len(txns) == 0 { // nothing held: the union is wanted
		txns = append(txns, intervalTxn{add: [][2]netip.Addr{union}})
	}
	return txns
}

// shrinkComponent plans the transactions that take one component's union,
// held as one range, to wanted, its sorted wanted ranges. Each deletes
// the rest (the union at first), adds the next wanted ranges and, unless
// they are the last, a new rest from the following wanted range to the
// last one's end: everything wanted stays covered, and the rest overlaps
// no range added (wanted ranges are merged, so a gap of at least one
// address lies between two of them). At most limit elements each (limit
// >= 6).
func shrinkComponent(wanted [][2]netip.Addr, union [2]netip.Addr, limit int) []intervalTxn {
	if len(wanted) == 1 && wanted[0] == union {
		return nil
	}
	batch := max((limit-4)/2, 1)
	var txns []intervalTxn
	rest := union
	for {
		k := min(batch, len(wanted))
		if len(wanted)-k == 1 {
			k++ // the last one in place of a rest that would equal it
		}
		txn := intervalTxn{del: [][2]netip.Addr{rest}, add: slices.Clone(wanted[:k])}
		if wanted = wanted[k:]; len(wanted) > 0 {
			rest = [2]netip.Addr{wanted[0][0], wanted[len(wanted)-1][1]}
			txn.add = append(txn.add, rest)
		}
		txns = append(txns, txn)
		if len(wanted) == 0 {
			return txns
		}
	}
}

// rangeElementCount is how many elements an interval set holds for r: a
// start, and an end unless r runs to the top of the address space.
func rangeElementCount(r [2]netip.Addr) int {
	if r[1].Next().IsValid() {
		return 2
	}
	return 1
}

// rangesElements encodes disjoint inclusive ranges as interval set
// elements, as intervalElements does.
func rangesElements(rs [][2]netip.Addr) []nftables.SetElement {
	var elems []nftables.SetElement
	for _, r := range rs {
		elems = append(elems, nftables.SetElement{Key: r[0].AsSlice()})
		if end := r[1].Next(); end.IsValid() {
			elems = append(elems, nftables.SetElement{Key: end.AsSlice(), IntervalEnd: true})
		}
	}
	return elems
}

// splitProtected masks valid prefixes and sorts them by family (IPv4-mapped
// ones as IPv4), as the protected sets hold them.
func splitProtected(prefixes []netip.Prefix) (v6, v4 []netip.Prefix) {
	for _, p := range prefixes {
		if !p.IsValid() {
			continue
		}
		if p.Addr().Is4In6() && p.Bits() >= 96 {
			p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96)
		}
		if p.Addr().Is4() {
			v4 = append(v4, p.Masked())
		} else {
			v6 = append(v6, p.Masked())
		}
	}
	return v6, v4
}

// elemChunk bounds the elements of one set-element message. The nftables
// library puts all the elements of a SetAddElements call in one netlink
// attribute, whose length field has 16 bits: past 64 KiB (about 1 600
// elements of an interval set, 750 of an owner map) it wrapped, and the
// kernel silently took only the start of the list (SetProtected of 2 000
// prefixes kept 976; SetOwners of 1 000 owners kept 345 ranges).
const elemChunk = 256

// queueAddElements queues adding elems to s in messages of at most
// elemChunk elements, all in the caller's transaction.
func (b *Backend) queueAddElements(s *nftables.Set, elems []nftables.SetElement) error {
	return b.queueElements(s, b.conn.SetAddElements, elems)
}

// queueElements queues op (adding or deleting) on elems of s in messages
// of at most elemChunk elements, all in the caller's transaction.
func (b *Backend) queueElements(s *nftables.Set, op func(*nftables.Set, []nftables.SetElement) error, elems []nftables.SetElement) error {
	for len(elems) > 0 {
		n := min(len(elems), elemChunk)
		if err := op(s, elems[:n]); err != nil {
			return err
		}
		elems = elems[n:]
	}
	return nil
}

// intervalElements encodes prefixes (one family) for a plain interval set:
// a start element, and an end element one past the last address. The
// kernel refuses overlapping intervals, so they are merged first.
func intervalElements(prefixes []netip.Prefix) []nftables.SetElement {
	type span struct{ first, last netip.Addr }
	var spans []span
	for _, p := range prefixes {
		f, l := prefixRange(p)
		spans = append(spans, span{f, l})
	}
	slices.SortFunc(spans, func(a, b span) int { return a.first.Compare(b.first) })
	var merged []span
	for _, s := range spans {
		if n := len(merged); n > 0 {
			last := &merged[n-1]
			if next := last.last.Next(); !next.IsValid() || s.first.Compare(next) <= 0 {
				if s.last.Compare(last.last) > 0 {
					last.last = s.last
				}
				continue
			}
		}
		merged = append(merged, s)
	}
	var elems []nftables.SetElement
	for _, s := range merged {
		elems = append(elems, nftables.SetElement{Key: s.first.AsSlice()})
		if end := s.last.Next(); end.IsValid() {
			elems = append(elems, nftables.SetElement{Key: end.AsSlice(), IntervalEnd: true})
		}
	}
	return elems
}

// Protected returns the protected prefixes the kernel holds.
func (b *Backend) Protected() ([]netip.Prefix, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	var out []netip.Prefix
	for _, s := range []*nftables.Set{b.protected6, b.protected4} {
		rs, err := b.readIntervals(s)
		if err != nil {
			return nil, err
		}
		for _, r := range rs {
			out = append(out, rangePrefixes(r.first, r.last)...)
		}
	}
	return out, nil
}

// intervalRange is one range of an interval set or map as the kernel
// holds it, with a map's data for it.
type intervalRange struct {
	first, last netip.Addr
	val         []byte
}

// readIntervals returns the ranges of interval set s in address order.
// Caller holds b.mu.
func (b *Backend) readIntervals(s *nftables.Set) ([]intervalRange, error) {
	return b.view().readIntervals(s)
}

// readIntervals returns the ranges of interval set s in address order.
// The kernel dumps the elements highest first, each range as its start
// and, unless it runs to the top of the address space, its end (the first
// address past it, flagged IntervalEnd).
func (v kview) readIntervals(s *nftables.Set) ([]intervalRange, error) {
	elems, err := v.conn.GetSetElements(s)
	if err != nil {
		return nil, fmt.Errorf("pinhole: read set %s: %w", s.Name, classify(err))
	}
	slices.SortFunc(elems, func(a, b nftables.SetElement) int {
		x, _ := netip.AddrFromSlice(a.Key)
		y, _ := netip.AddrFromSlice(b.Key)
		if c := x.Compare(y); c != 0 {
			return c
		}
		// An end and the next range's start share a key: end first, or
		// the range before would read as running to the top.
		switch {
		case a.IntervalEnd && !b.IntervalEnd:
			return -1
		case !a.IntervalEnd && b.IntervalEnd:
			return 1
		}
		return 0
	})
	var out []intervalRange
	for i, e := range elems {
		if e.IntervalEnd {
			continue
		}
		first, _ := netip.AddrFromSlice(e.Key)
		last := allOnes(first)
		if i+1 < len(elems) && elems[i+1].IntervalEnd {
			end, _ := netip.AddrFromSlice(elems[i+1].Key)
			last = end.Prev()
		}
		out = append(out, intervalRange{first: first, last: last, val: e.Val})
	}
	return out, nil
}

func allOnes(a netip.Addr) netip.Addr {
	b := a.AsSlice()
	for i := range b {
		b[i] = 0xff
	}
	r, _ := netip.AddrFromSlice(b)
	return r
}

// rangePrefixes splits first..last into the fewest prefixes.
func rangePrefixes(first, last netip.Addr) []netip.Prefix {
	var out []netip.Prefix
	for first.IsValid() && first.Compare(last) <= 0 {
		bits := first.BitLen()
		for bits > 0 {
			p := netip.PrefixFrom(first, bits-1)
			if p.Masked().Addr() != first {
				break
			}
			if _, l := prefixRange(p); l.Compare(last) > 0 {
				break
			}
			bits--
		}
		p := netip.PrefixFrom(first, bits)
		out = append(out, p)
		_, l := prefixRange(p)
		first = l.Next()
	}
	return out
}

// Close closes the netlink sockets the Backend dialled itself (the raw
// rule dumps of getRules and Healthy, Healthy's and List's connections,
// and its own conn if a failed write replaced the caller's: resetConn);
// the caller's conn stays open unless resetConn closed it, and so do
// pcpd's kernel objects
// (Teardown removes those). A Backend must not be used after Close (a
// later call would dial them again).
func (b *Backend) Close() {
	b.mu.Lock()
	b.writeWitnessOwed(true) // a stop after a failed write (flowedlife.go)
	b.raw.close()
	if b.ownConn {
		_ = b.conn.CloseLasting()
	}
	b.mu.Unlock()
	b.healthMu.Lock()
	b.healthRaw.close()
	b.healthConn.close()
	b.healthMu.Unlock()
	b.listMu.Lock()
	b.listConn.close()
	b.flowed.mu.Lock()
	b.flowed.conn.close()
	b.flowed.raw.close()
	b.flowed.mu.Unlock()
	b.listMu.Unlock()
	b.foreignMu.Lock()
	b.foreignConn.close()
	b.foreignGen.mu.Lock()
	b.foreignGen.close()
	b.foreignGen.mu.Unlock()
	b.foreignMu.Unlock()
}

// sideConn is an nftables connection of the Backend's own beside conn (for
// Healthy's and List's reads without b.mu), kept from call to call: each
// NETLINK_NETFILTER socket closed costs a wait for the namespace's
// nftables commit lock and an RCU grace period, during which the engine's
// transactions wait too (≈ 10-16 ms under load; BENCHMARKS.md items 41,
// 42). Its user serialises the calls.
type sideConn struct {
	c  *nftables.Conn
	nl *netlink.Conn // c's socket, for checkSentinels' read deadline
	// note, if set, is told of each socket dialled (ownPorts.note: the
	// watcher leaves out what the Backend's own sockets commit), and
	// forget of each before it is closed (ownPorts.forget).
	note, forget func(*netlink.Conn)
	// batches: c sends transactions (Healthy's sentinels, flowed6's
	// writes), so its socket caps its error replies (capAck).
	batches bool
}

// get returns the kept connection, dialled into namespace netns (conn's)
// first if there is none.
func (s *sideConn) get(netns int) (*nftables.Conn, error) {
	if s.c == nil {
		c, nl, err := dialSide(netns)
		if err != nil {
			return nil, err
		}
		if s.batches {
			capAck(nl)
		}
		s.c, s.nl = c, nl
		if s.note != nil {
			s.note(nl)
		}
	}
	return s.c, nil
}

// dialSide dials a lasting connection in namespace netns and returns its
// netlink socket too (checkSentinels' read deadline).
func dialSide(netns int) (*nftables.Conn, *netlink.Conn, error) {
	var nl *netlink.Conn
	c, err := nftables.New(nftables.WithNetNSFd(netns), nftables.AsLasting(),
		nftables.WithSockOptions(func(c *netlink.Conn) error { nl = c; return nil }))
	if err != nil {
		return nil, nil, err
	}
	return c, nl, nil
}

// capAck sets NETLINK_CAP_ACK on nl, a socket that sends transactions:
// the kernel then quotes only a failing message's header in its error
// reply, not the whole message (netlink_ack). An acknowledgement quotes
// only the header whatever the option (36 bytes, a NEWSETELEM of 256
// elements with or without it), so a committed batch reads the same; a
// refused one (a conflict, blame's replays of it, a sentinel missing)
// no longer has each failing message copied back (a delete of 256
// absent elements: 4 168 -> 36 bytes, read by mdlayher/netlink in three
// syscalls and 12 KiB of buffers -> two and 4 KiB; BENCHMARKS.md item
// 79). The errno, the reply's first field, is all readReplies reads.
// Not with NETLINK_EXT_ACK (google/nftables does not set it): an error
// reply then carries the failing element's offset (nf_tables'
// NL_SET_BAD_ATTR), and mdlayher/netlink looks for it past the quoted
// header's nlmsg_len, beyond the capped reply's end: "not enough data
// for netlink error code" in place of the errno. Best effort: without
// it (kernels before 4.3) the replies are as before.
func capAck(nl *netlink.Conn) { _ = nl.SetOption(netlink.CapAcknowledge, true) }

// close closes the socket; the next get dials another. Its users call it
// after any error of a read on it, so that a socket an error may have left
// mid-dump (unread replies, an overrun) is not read again: errors are rare
// (a damaged firewall), a dial is cheap beside them.
func (s *sideConn) close() {
	if s.c != nil {
		if s.forget != nil {
			s.forget(s.nl)
		}
		_ = s.c.CloseLasting()
		s.c, s.nl = nil, nil
	}
}

// flushDeadline bounds how long flush waits for the kernel's replies to a
// batch on the Backend's own connection, counted from the end of the send
// (flushConn). nfnetlink handles a batch within the sender's sendmsg and
// queues every reply to it then, so a read that blocks after the send
// means replies that will never come; google/nftables' Flush read one per
// message sent and would wait for ever, under mu, and pcpd would answer
// no request again. The replies flushConn knows to end a batch (an ENOMEM
// or EPERM for the whole batch: replies.go) end its reads at once
// (h/nftenomem; until then an ENOMEM waited out this deadline, 30 s under
// mu per batch); the deadline is left for batch-wide errors that say
// nothing of ending it (no nf_tables, a refused batch header), which
// nothing pcpd sends raises. Reading queued replies takes milliseconds
// (MaxBatch included); 30 s is kept generous because a read past it
// reports failed a batch the kernel may have committed.
// A variable for tests only (SetFlushDeadline).
var flushDeadline = 30 * time.Second

// flush sends the transaction queued on conn. On the Backend's own
// connection it reads the replies itself (flushConn: it stops at a reply
// that ends the batch, and at flushDeadline). After an error that may have
// left conn out of step with the kernel's replies (outOfStep; flushConn:
// a batch-wide error, replies missing, dropped or more than messages sent),
// conn is replaced by a fresh connection (resetConn). Under mu.
func (b *Backend) flush() error {
	if b.flushHook != nil {
		b.flushHook(b.conn)
	}
	if b.readSince && b.nl != nil {
		// Replies a failed read left (readConn) would be read as this
		// batch's.
		drain(b.nl)
	}
	b.readSince = false
	inStep, err := flushConn(b.conn, b.nl)
	if !inStep {
		b.resetConn()
	}
	return err
}

// dropUnsent drops what a failed write left queued on conn (*errp: the
// write's result; nothing is done when it is nil). google/nftables keeps
// queued messages until the next Flush, which sends all of them, so a
// write that failed between queueing a transaction and flushing it (a read
// in between failing: Setup's reads after its AddTable and sets, attached
// Teardown's presentSets after its FlushChain and DelChains, FollowRoutes'
// reads between its ReplaceRules) left them to the next transaction of any
// caller, which committed them as its own: after a failed attached
// Teardown an Apply deleted pcpd's guard chains, after a failed Setup an
// Apply sent 33 messages, not 1 (TestFailedWriteLeavesNothingQueued,
// review h/revenomem). On the Backend's own socket a Flush with a write
// deadline in the past fails before its send reaches the kernel (no
// syscall; Flush clears its queue whatever happens); elsewhere (the
// fallback connection), and after an encoding error, conn is replaced. A fake-dialled test connection is
// kept as it is. Under mu.
func (b *Backend) dropUnsent(errp *error) {
	if *errp == nil {
		return
	}
	if b.nl == nil || b.nl.SetWriteDeadline(time.Unix(1, 0)) != nil {
		// No deadline, the Flush would send: a new connection instead.
		b.resetConn()
		return
	}
	err := b.conn.Flush()
	_ = b.nl.SetWriteDeadline(time.Time{})
	if err != nil && !errors.Is(err, os.ErrDeadlineExceeded) {
		// An encoding error the connection keeps (google/nftables
		// returns it from every Flush after): a connection of its own.
		b.resetConn()
	}
}

// outOfStep reports whether a failed Flush may have left replies of its
// batch unread, or read fewer than it sent messages. nfnetlink answers a
// batch with one reply per message (an acknowledgement or its error)
// except when (nfnetlink_rcv_batch, 6.18): a message fails with ENOMEM
// (one reply for the whole batch); the commit fails (its error for the
// batch, then an acknowledgement per message); or the replies
// overflow the socket's receive buffer (the rest dropped, ENOBUFS on the
// next read, on which google/nftables' Flush returns at once, the queued
// ones unread: TestApplyAfterRepliesLeftQueued, with a 256-op batch of
// 384 messages). Flush reads one reply per message without checking
// sequence numbers, so replies left over are read by the next Flush as its
// own: a refused batch reported as applied (a pinhole kept open that pcpd
// thinks deleted), or, with the buffer still congested, the next
// overflow unreported and Flush waiting for ever under mu. So only a
// batch's own per-message errors (a join of errnos, none ENOMEM: blame's
// probes, conflicts) leave conn in step; any other error resets it, a
// read past flushDeadline (replies missing: ENOMEM) among them. Since
// h/nftenomem flushConn reads the replies on the Backend's own connection
// itself and judges them (replies.go); outOfStep judges a Flush it could
// not read (a send that failed; fake or fallback connections).
func outOfStep(err error) bool {
	if err == nil {
		return false
	}
	var j interface{ Unwrap() []error }
	if !errors.As(err, &j) || errors.Is(err, unix.ENOMEM) || errors.Is(err, os.ErrDeadlineExceeded) {
		return true
	}
	for _, e := range j.Unwrap() {
		var errno unix.Errno
		if !errors.As(e, &errno) {
			return true
		}
	}
	return false
}

// resetConn replaces conn with a lasting connection of the Backend's own
// in the same namespace, and closes the old one's socket (a
// NETLINK_NETFILTER close waits for the namespace's nftables commit lock
// and an RCU grace period: BENCHMARKS.md items 41-42; rare, on an error
// path). When the dial fails, the old connection goes on without its
// lasting socket (google/nftables then dials a socket per call: in step,
// slower). A fake-dialled test connection is kept. Under mu.
func (b *Backend) resetConn() {
	if b.conn.TestDial != nil {
		return
	}
	b.ports.forget(keptMain, b.nl)
	_ = b.conn.CloseLasting()
	b.nl = nil
	c, nl, err := dialConn(b.netns)
	if err != nil {
		return
	}
	b.conn, b.ownConn, b.nl = c, true, nl
	b.ports.keep(keptMain, nl)
}

// replyBuffer is the receive buffer of the Backend's connections. The
// kernel queues a batch's acknowledgements after its commit; past the
// buffer the rest are dropped and Flush fails with ENOBUFS, so a batch
// the kernel took was reported failed (review h/revnftconn: 200 and 256
// ops, 100 and 128 pinholes deleted and installed in turn, about 3
// messages a phase; the default 208 KiB holds about 300 acknowledgements,
// a MaxBatch batch can send a few per op). 8 MiB holds some 6000 (an ack
// costs about 1.3 KiB of buffer). Memory is only charged while replies
// are queued.
var replyBuffer = 8 << 20 // a variable for tests only: SetReplyBuffer

// dialConn dials a lasting connection in namespace netns with a receive
// buffer of replyBuffer (SO_RCVBUFFORCE: pcpd has CAP_NET_ADMIN; else
// SO_RCVBUF, capped by net.core.rmem_max) and NETLINK_CAP_ACK (capAck),
// and returns its netlink socket too (flush's read deadline).
func dialConn(netns int) (*nftables.Conn, *netlink.Conn, error) {
	var nl *netlink.Conn
	c, err := nftables.New(nftables.WithNetNSFd(netns), nftables.AsLasting(),
		nftables.WithSockOptions(func(c *netlink.Conn) error {
			nl = c
			capAck(c)
			rc, err := c.SyscallConn()
			if err != nil {
				return err
			}
			var serr error
			if err := rc.Control(func(fd uintptr) {
				serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, replyBuffer)
			}); err != nil {
				return err
			}
			if serr != nil {
				return c.SetReadBuffer(replyBuffer)
			}
			return nil
		}))
	if err != nil {
		return nil, nil, err
	}
	return c, nl, nil
}

// Teardown removes pcpd's objects, and nothing else. Standalone, that is
// pcpd's table. Attached, it is pcpd's sets and chains; the entry chain is
// left in place, empty, while the admin's ruleset still jumps to it.
func (b *Backend) Teardown() (err error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	defer b.dropUnsent(&err)
	b.gen++
	ok, err := b.tableExists()
	if err != nil || !ok {
		return err // nothing of ours can be left without the table
	}
	if err := b.checkOwnershipLocked(); err != nil {
		return err
	}
	if !b.cfg.Attached {
		b.conn.DelTable(b.table)
		if err := b.flush(); err != nil {
			return fmt.Errorf("pinhole: teardown: %w", classify(err))
		}
		return nil
	}
	present, err := b.presentChains()
	if err != nil {
		return err
	}
	if present[b.chainEntry] {
		b.conn.FlushChain(&nftables.Chain{Table: b.table, Name: b.chainEntry})
	}
	for _, name := range append([]string{b.chainGuard6, b.chainGuard4, b.chainPrerouting, b.chainPostrouting, b.chainLocalOut}, b.attCutChainNames()...) {
		if present[name] {
			b.conn.DelChain(&nftables.Chain{Table: b.table, Name: name})
		}
	}
	sets, err := b.presentSets()
	if err != nil {
		return err
	}
	for _, s := range b.allSets() {
		if sets[s.Name] {
			b.conn.DelSet(s)
		}
	}
	if err := b.flush(); err != nil {
		return fmt.Errorf("pinhole: teardown: %w", classify(err))
	}
	if present[b.chainEntry] {
		b.conn.DelChain(&nftables.Chain{Table: b.table, Name: b.chainEntry})
		if err := b.flush(); err != nil && !errors.Is(err, unix.EBUSY) {
			return fmt.Errorf("pinhole: teardown: chain %s: %w", b.chainEntry, classify(err))
		}
	}
	return nil
}

// kview reads pcpd's table through conn: the Backend's own connection
// (under b.mu), or, for Healthy, a connection of its own that it uses
// without b.mu.
type kview struct {
	conn  *nftables.Conn
	table *nftables.Table
	raw   *rawRules     // for getRules (nil: not checked)
	nl    *netlink.Conn // conn's socket, for checkSentinels' deadline (nil: none)
	// counts: the table's rules' expression counts, dumped once for a
	// whole Healthy (nil: getRules dumps each chain's).
	counts map[string]map[uint64]int
}

// view reads through the Backend's connection. Caller holds b.mu.
func (b *Backend) view() kview { return kview{conn: b.readConn(), table: b.table, raw: &b.raw} }

// readConn returns conn for a read, having dropped what is queued on its
// socket (drain): a read that failed after its request went (a dump cut
// short by a socket error) leaves its reply queued, and its dump running,
// which queues its next part at each later read; google/nftables reads
// without checking sequence numbers, so the next read took them for its
// own (TestReadsAfterReadCutShort: EBUSY, then a set's elements missing).
// A read is answered within its send, so what is queued before it is
// owed to no one. One syscall; flush drains before a batch the same way
// when a read came since the last (readSince). Not a reset: a read may come between messages queued for a batch,
// which a new connection would lose. Caller holds b.mu.
func (b *Backend) readConn() *nftables.Conn {
	if b.nl != nil {
		drain(b.nl)
	}
	if b.readHook != nil {
		b.readHook()
	}
	b.readSince = true // flush drains too: the read may fail
	return b.conn
}

// tableExists asks the kernel whether the configured table exists; only a
// definite "no such table" counts as absent.
func (b *Backend) tableExists() (bool, error) { return b.view().tableExists() }

func (v kview) tableExists() (bool, error) {
	ok, _, err := v.tableState()
	return ok, err
}

// tableState is whether pcpd's table exists and whether it is dormant
// (NFT_TABLE_F_DORMANT: every base chain unregistered, so nothing of
// pcpd's sees a packet, however intact its chains list).
func (v kview) tableState() (exists, dormant bool, err error) {
	t, err := v.conn.ListTableOfFamily(v.table.Name, nftables.TableFamilyINet)
	switch {
	case err == nil:
		return true, tableFlags(t)&unix.NFT_TABLE_F_DORMANT != 0, nil
	case errors.Is(err, unix.ENOENT):
		return false, false, nil
	}
	return false, false, fmt.Errorf("pinhole: look up inet %s: %w", v.table.Name, err)
}

// tableFlags are t's NFTA_TABLE_FLAGS as the kernel sent them: the
// library decodes them in host order, the kernel sends them in network
// order.
func tableFlags(t *nftables.Table) uint32 {
	var f [4]byte
	binary.NativeEndian.PutUint32(f[:], t.Flags)
	return binary.BigEndian.Uint32(f[:])
}

// presentChains returns the names of the chains in pcpd's table; an absent
// table has none.
func (b *Backend) presentChains() (map[string]bool, error) { return b.view().presentChains() }

func (v kview) presentChains() (map[string]bool, error) {
	chains, err := v.chainsOf()
	m := make(map[string]bool, len(chains))
	for name := range chains {
		m[name] = true
	}
	return m, err
}

// chainsOf returns the chains in pcpd's table as the kernel lists them,
// by name.
func (v kview) chainsOf() (map[string]*nftables.Chain, error) {
	all, err := v.conn.ListChainsOfTableFamily(nftables.TableFamilyINet)
	if err != nil {
		return nil, fmt.Errorf("pinhole: list chains: %w", classify(err))
	}
	m := map[string]*nftables.Chain{}
	for _, c := range all {
		if c.Table.Name == v.table.Name {
			m[c.Name] = c
		}
	}
	return m, nil
}

// chainShapeIs: got, a chain as the kernel lists it, has want's type,
// hook and priority (both regular, or both base chains of the same kind)
// and, if want sets one, its policy. A chain is found by name, so the
// forward chain deleted and made again as a regular chain (or on another
// hook) with the same rules kept every guard off and passed Healthy
// (review6 F3, TestHealthyEntryChainUnhooked).
func chainShapeIs(got, want *nftables.Chain) bool {
	if (got.Hooknum == nil) != (want.Hooknum == nil) || (got.Priority == nil) != (want.Priority == nil) {
		return false
	}
	if want.Hooknum == nil {
		return true // regular: no type, hook, priority or policy
	}
	if got.Type != want.Type || *got.Hooknum != *want.Hooknum || *got.Priority != *want.Priority {
		return false
	}
	return want.Policy == nil || got.Policy != nil && *got.Policy == *want.Policy
}

func (b *Backend) presentSets() (map[string]bool, error) { return b.view().presentSets() }

func (v kview) presentSets() (map[string]bool, error) {
	m := map[string]bool{}
	if ok, err := v.tableExists(); err != nil || !ok {
		return m, err
	}
	sets, err := v.conn.GetSets(v.table)
	if err != nil {
		return nil, fmt.Errorf("pinhole: list sets: %w", classify(err))
	}
	for _, s := range sets {
		m[s.Name] = true
	}
	return m, nil
}

// healthWant is what Healthy compares the kernel with, copied under b.mu
// so that the reads can go on without it.
type healthWant struct {
	gen   uint64
	table nftables.Table
	// ownTable: standalone, the table is pcpd's, and Setup wakes it if
	// dormant; attached, it is the admin's, whose to wake.
	ownTable bool
	sets     []string // every set's name
	layout   []struct {
		name  string
		chain nftables.Chain // as Setup makes it (chains)
		rules [][]expr.Any   // as Setup writes them, as listed (asListed)
	}
	sentineled             []nftables.Set
	sentinels              []nftables.SetElement
	protected6, protected4 nftables.Set
	hasProtected           bool
	protected              []netip.Prefix
	meter                  bool // the owner meter is to hold owners and holes
	owners                 []Owner
	holes                  []netip.Prefix
	unowned                []netip.Prefix // Meter.Unowned
	owners6, owners4       nftables.Set
	ownerRules             map[string][][]expr.Any // per owner chain
	servedSets             bool                    // the served address sets exist (standalone mode)
	hasServed              bool
	served                 []netip.Addr
	served6, served4       nftables.Set
	servedIfs              []string
	servingIfs             nftables.Set
	// loopback is the chain holding the host's loopback bucket
	// (control_local, when the layout has the meter; "" none): its
	// rules go to read, for the bucket's drop counter.
	loopback string
}

// healthWantLocked copies what Healthy compares the kernel with. The
// slices it shares (protected, owners, holes) are replaced, never changed
// in place, by the calls that set them. Caller holds b.mu.
func (b *Backend) healthWantLocked() *healthWant {
	w := &healthWant{gen: b.gen, table: *b.table, ownTable: !b.cfg.Attached, hasProtected: b.hasProtected, protected: b.protected,
		protected6: *b.protected6, protected4: *b.protected4}
	for _, s := range b.allSets() {
		w.sets = append(w.sets, s.Name)
	}
	specs := b.chains()
	for _, cr := range b.layout() {
		for _, r := range cr.rules {
			for j := range r {
				r[j] = asListed(r[j])
			}
		}
		w.layout = append(w.layout, struct {
			name  string
			chain nftables.Chain
			rules [][]expr.Any
		}{cr.name, *specs[cr.name], cr.rules})
	}
	sets, elems := b.sentineled()
	for _, s := range sets {
		w.sentineled = append(w.sentineled, *s)
	}
	w.sentinels = elems
	if b.served6 != nil {
		w.servedSets, w.served = true, b.served
		w.served6, w.served4 = *b.served6, *b.served4
	}
	w.hasServed, w.servedIfs, w.servingIfs = b.hasServed, b.servedIfs, *b.servingIfs
	if b.metering() {
		w.loopback = b.chainControlLocal
	}
	if b.hasOwners && b.ownerMetering() {
		w.meter, w.owners, w.holes, w.unowned = true, b.owners, b.holes, b.cfg.Meter.Unowned
		w.owners6, w.owners4 = *b.owners6, *b.owners4
		w.ownerRules = map[string][][]expr.Any{}
		for _, name := range OwnerChains(b.owners) {
			w.ownerRules[name] = b.wantOwnerRules(b.ownerIfs[name])
		}
	}
	return w
}

// healthTries bounds how often Healthy reads the kernel again because one
// of the Backend's own writes (b.gen) ran during the read.
const healthTries = 3

// Healthy checks that every object pcpd owns is present, that its chains
// hold exactly the rules Setup wrote (every expression's values compared,
// as listed: layoutRuleIs; before review4 F3 only counted) and that no
// pinhole set was flushed (its sentinel element is there; see
// sentinel.go), and that the owner maps, protected sets and served sets
// hold what was given. Its cost does not depend on how many pinholes
// there are: no pinhole set is dumped (the sets it dumps are as large as
// the configuration). On error (wrapping ErrUnhealthy) the daemon should run
// Setup and re-install its leases; existing set elements survive Setup.
// Single elements deleted by hand are not noticed here; List finds them.
//
// It reads the kernel without holding the Backend's lock, on netlink
// sockets of its own (kept from check to check: healthConn), against a copy of what the Backend last wrote: one
// GetRules per owner chain and a dump of each owner map and protected set
// took 53-61 ms at 1 000 owners, every 5 s, and every Apply (a lease
// install) waited meanwhile (RELIABILITY.md bug 4, review N3). Apply does
// not change anything Healthy reads (it adds and deletes pinhole
// elements, never a sentinel); the Backend's other writes (Setup,
// SetProtected, SetServed, SetOwners, RepairOwners, Teardown) count in
// b.gen, and a
// read that overlapped one is done again, so a write in progress is never
// reported as damage. The last of healthTries reads, after reads that
// each overlapped a write, is done under the lock, as before N3, so a
// stream of writes delays a check but cannot hide damage from it.
func (b *Backend) Healthy() error {
	err := b.healthy()
	if err == nil {
		// The layout intact: a witness owed is written now (the
		// repairing Setup writes it over a damaged one).
		b.mu.Lock()
		b.writeWitnessOwed(false)
		b.mu.Unlock()
	}
	return err
}

// healthy is Healthy's check.
func (b *Backend) healthy() error {
	for try := 1; ; try++ {
		b.mu.Lock()
		w := b.healthWantLocked()
		if b.conn.TestDial != nil || try == healthTries {
			// A fake-dialled test connection, used as it is, under the
			// lock; and the last try, after every read overlapped a write
			// of the Backend's: held under the lock, so that writes that
			// never stop (a failing SetProtected the server retries each
			// sweep) cannot hide damage from every check (review of
			// 2026-12-03: a flushed served set went unreported in 10 of 10
			// checks with a writer running back to back).
			defer b.mu.Unlock()
			read, err := w.check(kview{conn: b.readConn(), table: &w.table, raw: &b.raw, nl: b.nl})
			b.noteDamage(err)
			if err != nil {
				// As healthConn is closed after any error: a sentinel
				// transaction ended early (ENOMEM, replies missing) or a
				// read cut short may leave replies on b.conn. Errors are
				// rare (damage, memory pressure); a reset is cheap beside.
				b.resetConn()
			}
			b.foldOwnerReads(read)
			return err
		}
		b.mu.Unlock()
		var read map[string][]*nftables.Rule
		var err error
		if b.healthMu.TryLock() {
			// The kept sockets (healthConn, healthRaw): none dialled or
			// closed per check. healthConn is closed after any error of
			// the read (sideConn.close), healthRaw after one of its own
			// dumps (exprCounts); the next check dials them again.
			conn, derr := b.healthConn.get(b.netns)
			if derr != nil {
				b.healthMu.Unlock()
				return fmt.Errorf("pinhole: health check: %w", derr)
			}
			read, err = w.check(kview{conn: conn, table: &w.table, raw: &b.healthRaw, nl: b.healthConn.nl})
			if err != nil {
				b.healthConn.close()
			}
			b.healthMu.Unlock()
		} else { // another Healthy has them: sockets of this one's own
			conn, nl, derr := dialSide(b.netns)
			if derr != nil {
				return fmt.Errorf("pinhole: health check: %w", derr)
			}
			capAck(nl) // its sentinels' transaction
			b.ports.note(nl)
			raw := &rawRules{}
			read, err = w.check(kview{conn: conn, table: &w.table, raw: raw, nl: nl})
			raw.close()
			_ = conn.CloseLasting()
		}
		b.mu.Lock()
		same := b.gen == w.gen
		if same {
			// The counters are folded only when no write of the Backend's
			// (which resets the counts of the chains it writes) came
			// between: they would count again what a rewrite zeroed.
			b.foldOwnerReads(read)
			b.noteDamage(err)
		}
		b.mu.Unlock()
		if same {
			return err
		}
	}
}

// noteDamage: Healthy's check of the layout the Backend last wrote
// returned err. Damage to anything but the protected sets' and the owner
// meter's contents (the table, a pinhole set, a chain or rule of the
// layout: guard6, recheck6, natcut, recheck_nat, the DNAT rules among
// them) may have undone the ruleset's cut of ended pinholes' flows, so
// CutsFlows is false from here until a Setup writes the layout again
// (setupLocked stores cutting and cuttingNAT). Before, CutsFlows kept
// what the last successful Setup had said: while the repairing Setup
// kept failing, the server answered deletes without waiting for the walk
// though the ruleset no longer cut (review h/revnatcut, finding 4;
// TestCutsFlowsFalseWhileDamaged). Caller holds b.mu.
func (b *Backend) noteDamage(err error) {
	if errors.Is(err, ErrUnhealthy) && !errors.Is(err, ErrProtected) && !errors.Is(err, ErrOwnerMeter) {
		b.noteUnrecorded() // flows let in meanwhile may be unrecorded (flowed.go)
		b.cutting.Store(false)
		b.cuttingNAT.Store(false)
		b.recheckFlows = true
	}
	if errors.Is(err, ErrProtected) && b.hasProtected {
		// The protected sets differ from the last SetProtected: one
		// that lost a prefix ("nft flush set inet pcpd protected6")
		// sends that prefix's traffic past guard6/guard4 ("daddr
		// @protected6 goto guard6") to the forward chain's accept, and
		// a flow let in so carries no label. The server repairs the sets
		// alone (RepairProtected, no Setup): CutsFlows is false for the
		// kinds from here until VerifySetup reads conntrack over the
		// repaired sets (the server's next healthy check), and their
		// re-check chains lose the checked mark at the repair. Before,
		// CutsFlows stayed true and such a flow outlived its pinhole's
		// delete (review h/revrepair, finding 2,
		// TestRepairProtectedSeesFlowLetInUnguarded).
		if b.cutLabels && !b.unlabelled {
			b.pinVerify = true
			b.cutting.Store(false)
		}
		b.noteUnrecorded() // a flow let in unguarded is unrecorded too
		if b.natCutting() && !b.natUnlabelled {
			b.natVerify = true
			b.cuttingNAT.Store(false)
		}
	}
}

// unmarkOwed writes the re-check chains of the kinds whose check for
// flows let in unlabelled is owed (pinVerify, natVerify) again, as Setup
// lays them out: without the checked mark (checkedMark), so that a
// start before VerifySetup reads conntrack; whether it queued any.
// Caller holds b.mu and flushes.
func (b *Backend) unmarkOwed() bool {
	if b.cfg.Attached || !b.pinVerify && !b.natVerify {
		return false
	}
	n := 0
	for _, cr := range b.layout() {
		if b.pinVerify && cr.name == b.chainRecheck6 || b.natVerify && cr.name == b.chainRecheckNAT {
			b.queueRewrite(&nftables.Chain{Table: b.table, Name: cr.name}, cr, true)
			n++
		}
	}
	return n > 0
}

// foldOwnerReads folds the owner chains' rules Healthy read into the drop
// counts (MeterDrops). Caller holds b.mu.
func (b *Backend) foldOwnerReads(read map[string][]*nftables.Rule) {
	for name, rules := range read {
		if b.metering() && name == b.chainControlLocal {
			b.foldLoopbackCounter(rules)
			continue
		}
		b.foldOwnerCounters(name, rules)
	}
}

// check is Healthy's reading of the kernel through v, compared with w. It
// changes nothing of the Backend's; it returns the owner chains' rules it
// read, for their counters.
func (w *healthWant) check(v kview) (map[string][]*nftables.Rule, error) {
	read := map[string][]*nftables.Rule{}
	if ok, dormant, err := v.tableState(); err != nil {
		return read, err
	} else if !ok {
		return read, fmt.Errorf("pinhole: table inet %s missing: %w", w.table.Name, ErrUnhealthy)
	} else if dormant && w.ownTable {
		// Every guard off, every rule listed as written (review6 F2,
		// TestHealthyTableDormant); Setup's AddTable (flags 0) wakes it.
		return read, fmt.Errorf("pinhole: table inet %s is dormant: %w", w.table.Name, ErrUnhealthy)
	}
	if v.raw != nil && v.conn.TestDial == nil && v.counts == nil { // counts given: a test's (CheckRulesReplacedMidway)
		// One dump of the table's expression counts for every chain
		// this check reads (getRules), not one per chain: with a dump
		// per chain, Healthy at 1 000 owners took 121-130 ms, not 81-90.
		counts, err := v.raw.exprCounts(v.conn.NetNS, v.table, "")
		if err != nil {
			return read, fmt.Errorf("pinhole: %w: %w", ErrUnhealthy, err)
		}
		v.counts = counts
		if v.counts == nil {
			v.counts = map[string]map[uint64]int{}
		}
	}
	sets, err := v.presentSets()
	if err != nil {
		return read, err
	}
	for _, s := range w.sets {
		if !sets[s] {
			return read, fmt.Errorf("pinhole: set %s missing: %w", s, ErrUnhealthy)
		}
	}
	chains, err := v.chainsOf()
	if err != nil {
		return read, err
	}
	present := make(map[string]bool, len(chains))
	for name := range chains {
		present[name] = true
	}
	if err := w.checkLayout(v, chains, present, read); err != nil {
		return read, err
	}
	if err := w.checkServed(v); err != nil {
		return read, err
	}
	if err := w.checkSentinels(v); err != nil {
		return read, err
	}
	// Last, the protected sets and the owner meter, which hold no
	// pinhole: an error wrapping ErrProtected or ErrOwnerMeter (or both)
	// means all else is intact, and the caller repairs those alone
	// (RepairProtected, RepairOwners), without re-installing every
	// pinhole (a SetProtected that failed part way made every check a
	// full repair: review of 2026-12-03).
	perr := w.checkProtected(v)
	if perr != nil && !errors.Is(perr, ErrProtected) {
		return read, perr
	}
	oerr := w.checkOwnerChains(v, present, read)
	if oerr != nil && !errors.Is(oerr, ErrOwnerMeter) {
		return read, oerr
	}
	return read, errors.Join(perr, oerr)
}

// layoutIntact reports whether the kernel's table holds the layout's
// chains and rules as Setup writes them (Healthy's checkLayout); false
// when it cannot be read. Caller holds b.mu.
func (b *Backend) layoutIntact() bool {
	w := b.healthWantLocked()
	v := kview{conn: b.readConn(), table: &w.table, raw: &b.raw, nl: b.nl}
	chains, err := v.chainsOf()
	if err != nil {
		return false
	}
	present := make(map[string]bool, len(chains))
	for name := range chains {
		present[name] = true
	}
	return w.checkLayout(v, chains, present, map[string][]*nftables.Rule{}) == nil
}

// checkLayout is check's part for the layout's chains and rules: each
// present, of the shape Setup made, holding the rules it wrote (those of
// unownedChain put in read).
func (w *healthWant) checkLayout(v kview, chains map[string]*nftables.Chain, present map[string]bool, read map[string][]*nftables.Rule) error {
	for _, cr := range w.layout {
		if !present[cr.name] {
			return fmt.Errorf("pinhole: chain %s missing: %w", cr.name, ErrUnhealthy)
		}
		if !chainShapeIs(chains[cr.name], &cr.chain) {
			return fmt.Errorf("pinhole: chain %s is not the chain Setup made (type, hook, priority or policy): %w", cr.name, ErrUnhealthy)
		}
		rules, err := v.getRules(cr.name)
		if err != nil {
			return fmt.Errorf("pinhole: rules of %s: %w: %w", cr.name, ErrUnhealthy, err)
		}
		if cr.name == unownedChain || cr.name == w.loopback {
			read[cr.name] = rules // their drop counters (MeterDrops)
		}
		if len(rules) != len(cr.rules) {
			return fmt.Errorf("pinhole: chain %s has %d rules, want %d: %w", cr.name, len(rules), len(cr.rules), ErrUnhealthy)
		}
		for i, r := range rules {
			if j, ok := layoutRuleIs(r, cr.rules[i]); !ok {
				return fmt.Errorf("pinhole: chain %s rule %d (handle %d) differs from what Setup wrote at expression %d: %w",
					cr.name, i, r.Handle, j, ErrUnhealthy)
			}
		}
	}
	return nil
}

// checkProtected is Healthy's part for the inbound guard: the protected
// sets hold exactly the ranges SetProtected gave them. A flushed or edited
// protected set turns the guard off for the clients it lost (their
// forwarded traffic no longer reaches guard6/guard4, and the forward
// chain's policy lets it through), so it is damage Setup must repair, not
// a detail. Like the owner maps, the sets are as large as the configured
// prefixes, never the traffic, so dumping them is cheap.
//
// Every error it returns wraps ErrUnhealthy and ErrProtected.
func (w *healthWant) checkProtected(v kview) (err error) {
	if !w.hasProtected {
		return nil
	}
	defer func() {
		if err != nil && !errors.Is(err, ErrMissing) {
			// A set gone (deleted under this read) needs Setup, not
			// RepairProtected.
			err = fmt.Errorf("%w (%w)", err, ErrProtected)
		}
	}()
	v6, v4 := splitProtected(w.protected)
	for _, x := range []struct {
		s *nftables.Set
		p []netip.Prefix
	}{{&w.protected6, v6}, {&w.protected4, v4}} {
		got, err := v.readIntervals(x.s)
		if err != nil {
			return fmt.Errorf("pinhole: set %s: %w: %w", x.s.Name, ErrUnhealthy, err)
		}
		want := elementRanges(intervalElements(x.p))
		if len(got) != len(want) {
			return fmt.Errorf("pinhole: set %s holds %d ranges, want %d: %w", x.s.Name, len(got), len(want), ErrUnhealthy)
		}
		for i, r := range got {
			if r.first != want[i][0] || r.last != want[i][1] {
				return fmt.Errorf("pinhole: set %s holds %v-%v, want %v-%v: %w", x.s.Name, r.first, r.last, want[i][0], want[i][1], ErrUnhealthy)
			}
		}
	}
	return nil
}

// elementRanges turns intervalElements' output back into inclusive
// ranges, the form readIntervals returns.
func elementRanges(elems []nftables.SetElement) [][2]netip.Addr {
	var out [][2]netip.Addr
	for i := 0; i < len(elems); i++ {
		first, _ := netip.AddrFromSlice(elems[i].Key)
		var last netip.Addr
		if i+1 < len(elems) && elems[i+1].IntervalEnd {
			end, _ := netip.AddrFromSlice(elems[i+1].Key)
			last = end.Prev()
			i++
		} else {
			_, last = prefixRange(netip.PrefixFrom(first, 0))
		}
		out = append(out, [2]netip.Addr{first, last})
	}
	return out
}

// classify adds this package's sentinel to a kernel error.
func classify(err error) error {
	err = recoverErrno(err)
	switch {
	case err == nil:
		return nil
	case errors.Is(err, unix.EEXIST), errors.Is(err, unix.ENOTEMPTY), errors.Is(err, unix.EBUSY):
		return fmt.Errorf("%w: %w", ErrConflict, err)
	case errors.Is(err, unix.ENOENT):
		return fmt.Errorf("%w: %w", ErrMissing, err)
	case errors.Is(err, unix.ENFILE), errors.Is(err, unix.ENOSPC), errors.Is(err, unix.E2BIG):
		return fmt.Errorf("%w: %w", ErrFull, err)
	}
	return err
}

// flattenedErrnos are the errnos recoverErrno looks for.
var flattenedErrnos = []unix.Errno{unix.ENOENT, unix.EEXIST, unix.ENOTEMPTY, unix.EBUSY, unix.ENFILE, unix.ENOSPC, unix.E2BIG}

// recoverErrno puts back the errno of a kernel error the nftables library
// reported as text: its reads (GetSetElements, GetRules, GetSets) format
// the netlink error with %v ("receiveAckAware: netlink receive: no such
// file or directory"), so errors.Is found no ENOENT, and a set or chain
// deleted under pcpd read as an unknown error rather than ErrMissing
// (review of 2026-12-03): List, which the audit calls, and SetProtected
// reported it as a failure of their own, and Healthy's reads of the
// protected sets and owner maps as damage RepairProtected or RepairOwners
// could fix, which cannot re-create a set.
func recoverErrno(err error) error {
	if err == nil {
		return nil
	}
	var errno unix.Errno
	if errors.As(err, &errno) {
		return err
	}
	msg := err.Error()
	for _, e := range flattenedErrnos {
		if strings.HasSuffix(msg, ": "+e.Error()) {
			return fmt.Errorf("%w (%w)", err, e)
		}
	}
	return err
}
