package policy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"go.uber.org/zap"
	"golang.zx2c4.com/wireguard/wgctrl"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/pcpd/pcpd/internal/ifname"
)

// Defaults for WireGuard ownership.
const (
	DefaultRefresh      = 5 * time.Second // periodic re-read of every serving interface
	DefaultMissInterval = time.Second     // at most one on-demand re-read per interval
	// DefaultFreshBound is how old a view a THIRD_PARTY target may be
	// judged by (Freshen): older, it is re-read first.
	DefaultFreshBound = time.Second
	// DefaultFreshWait is how long Freshen waits for a read it needs
	// (WithFreshWait): a read that takes longer (a userspace WireGuard
	// daemon stopped or stuck: wgctrl's UAPI read has no deadline) is
	// not waited for, and THIRD_PARTY targets are refused (PeersUnread)
	// until a read ends cleanly.
	DefaultFreshWait = time.Second
	// KeepFreshWindow is how long after the last request that opens a
	// pinhole (Stale's caller) Run keeps the view within half the fresh
	// bound by reading it again (Run, keepFresh): a busy server's
	// requests then find a fresh view and wait for no read, an idle one
	// reads nothing more than its periodic refresh.
	KeepFreshWindow = time.Second
	changeBuffer    = 1024
)

// Change reports ownership an owner lost: its peer was removed (or its
// interface vanished), its AllowedIPs shrank, or another peer took a more
// specific part of them. Lost lists exactly the address space lost, as the
// fewest prefixes; the engine revokes the owner's leases inside it (LIFE-05).
type Change struct {
	Owner   OwnerID
	Removed bool // the owner no longer exists at all
	Lost    []netip.Prefix
}

// deviceReader is the part of *wgctrl.Client WireGuard uses.
type deviceReader interface {
	Device(name string) (*wgtypes.Device, error)
}

// WireGuard is ownership by WireGuard cryptokey routing: each peer of the
// serving interfaces owns its AllowedIPs (DESIGN.md "Who owns what",
// PROTOCOL.md choice (a)). The view is re-read every refresh interval and,
// rate-limited, when a lookup misses; a lookup never waits for a re-read
// (the client's retransmission finds the fresh view).
//
// Handling of awkward AllowedIPs:
//   - prefixes shorter than MinOwnedBits6 / MinOwnedBits4 (notably ::/0 and
//     0.0.0.0/0 of full-tunnel peers) are ignored for ownership, with one
//     warning per peer and prefix;
//   - IPv4-mapped IPv6 prefixes are ignored (IPv4 ownership comes from IPv4
//     AllowedIPs), with one warning;
//   - the same peer on several interfaces is one owner;
//   - a prefix held by different peers on different interfaces, or lying
//     inside another peer's prefix on a different interface, belongs to
//     neither (a hole), with one warning: WireGuard checks a source only
//     against the peers of the interface it arrived on, so the source
//     alone cannot tell which peer sent it;
//   - for the same reason a request's source is its owner's only when the
//     request arrived on an interface where the owner's peer holds it
//     (LookupOn, Request.Iface): a peer of another interface, a
//     full-tunnel one included, may send from any address there.
//
// A failed read of an interface keeps its previous peers (a transient
// error must not revoke every lease). An interface that no longer exists
// loses its peers, at once without a grace period (WithGoneGrace), else
// once it has been gone for the grace: a wg-quick down/up or systemctl
// restart wg-quick@wg0 deletes the interface and re-creates it with the
// same peers seconds later, and a refresh caught in between revoked
// every lease of the interface, silently, until each client's next
// renewal. While held, the gone interface's last peers still own their
// AllowedIPs for Lookup, Owners and Holes (sweeps, revocation, the
// guard, holes across interfaces exactly as before it went), but for no
// request (LookupOn, nor as a THIRD_PARTY target: Authorize, but for a
// delete of the requester's own lease, Request.Delete): a request
// only counts on an interface that is there. If it comes back with other peers or AllowedIPs, what changed
// is lost at once, as any change.
type WireGuard struct {
	dev deviceReader
	// kernel resolves a configured name to the kernel's, and its index
	// (ifname.Lookup; 0: unknown): wgctrl finds a userspace device by its
	// kernel name only, and kernel WireGuard takes no name over 15 bytes.
	kernel func(name string) (kname string, index int, found bool, err error)
	// firstIndex is the index of each kernel name NewWireGuard read,
	// resolved before its device was read (FirstIndex); set once.
	firstIndex map[string]int
	ifaces     []string
	refresh    time.Duration
	missEvery  time.Duration
	grace      time.Duration  // WithGoneGrace; 0: a gone interface's peers own nothing at once
	freshness  time.Duration  // WithFreshBound
	freshWait  time.Duration  // WithFreshWait
	xlat       []netip.Prefix // WithTranslationPrefixes
	now        func() time.Time
	log        *zap.Logger
	labels     map[string]string

	t       atomic.Pointer[table]
	stats   wgCounters
	missCh  chan struct{}
	changes chan Change

	// readAt is when the read whose view w.t holds began (mono), for
	// Freshen; stored before the view's Changes are sent.
	readAt atomic.Int64
	// unsure: the view may lag by more than the fresh bound, as the
	// last read failed for some interface (its last good peers stay)
	// or Freshen gave up waiting for a read that hangs; THIRD_PARTY
	// targets are then refused (Unsure, Policy.Authorize: PeersUnread)
	// until a read ends cleanly. Stored with readAt.
	unsure atomic.Bool
	// fmu guards inflight: Freshen's read under way, shared by every
	// caller that needs one meanwhile.
	fmu      sync.Mutex
	inflight *freshRead
	// demand is when (mono) Stale was last called, to a millisecond:
	// Run reads again every half fresh bound while it is within
	// KeepFreshWindow (keepFresh). keeping says Run is doing so; a
	// Stale that finds it not asks Run to start (keepCh).
	demand  atomic.Int64
	keeping atomic.Bool
	keepCh  chan struct{}

	mu       sync.Mutex // serialises refreshes; guards the fields below
	last     time.Time
	runCtx   context.Context // Run's, for the Changes of Freshen's reads
	lastGood map[string][]wgtypes.Peer
	// kname is the kernel name each configured name was last read by:
	// two configured names of one interface (its kernel name and an
	// altname) are one interface to buildLocked.
	kname map[string]string
	// gone holds, by configured name, when each interface whose peers
	// are held for the grace (its lastGood and kname kept) was first
	// found gone.
	gone     map[string]time.Time
	warned   map[string]bool // warnings given by the last build
	warnNext map[string]bool // warnings of the build in progress

	// renamed is the kernel names whose interface changed under them
	// (InterfacesRenamed) since the last re-read began: the view in w.t
	// has no per-interface table for them (table.without), so LookupOn
	// and Authorize take no request arriving there as anybody's until a
	// re-read that began after the change rebuilds it. rmu (never held
	// while reading a device) guards it and orders the stores of w.t by
	// InterfacesRenamed and Refresh.
	rmu     sync.Mutex
	renamed map[string]bool
	renewCh chan struct{}   // InterfacesRenamed's re-read now, not rate-limited
	stuck   map[string]bool // renamed userspace ones, logged (guarded by mu)
	// replaced is, like renamed, the kernel names whose device is not
	// the one the last read found (DevicesChanged: re-created, deleted,
	// renamed) since the last re-read began; cleared by a clean read
	// (no userspace exception: a re-created wireguard-go makes its
	// socket under the name). Guarded by rmu.
	replaced map[string]bool
	// swapAt is when (mono) DevicesChanged was last called: a view whose
	// read began no later (readAt ≤ swapAt) may be the old device's, and
	// judges no request that opens a pinhole, however young (Stale,
	// Freshen). 0: never.
	swapAt atomic.Int64
}

var (
	_ Ownership       = (*WireGuard)(nil)
	_ Holes           = (*WireGuard)(nil)
	_ InterfaceLookup = (*WireGuard)(nil)
	_ RenameFollower  = (*WireGuard)(nil)
	_ DeviceFollower  = (*WireGuard)(nil)
)

// WireGuardOption adjusts NewWireGuard.
type WireGuardOption func(*WireGuard)

// WithLabels names peers for the operator: keys are base64 public keys.
func WithLabels(labels map[string]string) WireGuardOption {
	return func(w *WireGuard) { w.labels = labels }
}

// WithMissInterval sets the minimum gap between on-demand re-reads.
func WithMissInterval(d time.Duration) WireGuardOption {
	return func(w *WireGuard) {
		if d > 0 {
			w.missEvery = d
		}
	}
}

// WithFreshBound sets how old a view Freshen accepts (DefaultFreshBound);
// 0: only one whose read began after Freshen was called (a read for
// every call but those that arrive while a read is under way). A
// negative d is ignored.
func WithFreshBound(d time.Duration) WireGuardOption {
	return func(w *WireGuard) {
		if d >= 0 {
			w.freshness = d
		}
	}
}

// WithFreshWait sets how long Freshen waits for a read (DefaultFreshWait);
// d ≤ 0 is ignored.
func WithFreshWait(d time.Duration) WireGuardOption {
	return func(w *WireGuard) {
		if d > 0 {
			w.freshWait = d
		}
	}
}

// WithGoneGrace keeps a gone interface's last peers owning their
// AllowedIPs for d (for Lookup, not for requests: WireGuard's doc) before
// they own nothing and lose their leases; d ≤ 0 (the default) loses them
// at the first read that finds the interface gone.
func WithGoneGrace(d time.Duration) WireGuardOption {
	return func(w *WireGuard) { w.grace = max(d, 0) }
}

// WithTranslationPrefixes names the operator's translation prefixes
// (Config.TranslationPrefixes) for the warning about AllowedIPs that
// overlap one (OverlapsTranslation); the fixed ones are always checked.
func WithTranslationPrefixes(ps []netip.Prefix) WireGuardOption {
	return func(w *WireGuard) { w.xlat = slices.Clone(ps) }
}

// NewWireGuard reads the peers of ifaces once and returns their ownership.
// refresh ≤ 0 selects DefaultRefresh. Every interface must exist now.
func NewWireGuard(c *wgctrl.Client, ifaces []string, refresh time.Duration, log *zap.Logger, opts ...WireGuardOption) (*WireGuard, error) {
	if c == nil {
		return nil, fmt.Errorf("policy: nil wgctrl client: %w", ErrInvalidConfig)
	}
	return newWireGuard(c, ifaces, refresh, log, opts...)
}

func newWireGuard(dev deviceReader, ifaces []string, refresh time.Duration, log *zap.Logger, opts ...WireGuardOption) (*WireGuard, error) {
	if len(ifaces) == 0 {
		return nil, fmt.Errorf("policy: no WireGuard interface: %w", ErrInvalidConfig)
	}
	if refresh <= 0 {
		refresh = DefaultRefresh
	}
	if log == nil {
		log = zap.NewNop()
	}
	w := &WireGuard{
		dev:        dev,
		kernel:     ifname.Lookup,
		ifaces:     slices.Clone(ifaces),
		refresh:    refresh,
		missEvery:  DefaultMissInterval,
		freshness:  DefaultFreshBound,
		freshWait:  DefaultFreshWait,
		now:        time.Now,
		log:        log,
		missCh:     make(chan struct{}, 1),
		renewCh:    make(chan struct{}, 1),
		keepCh:     make(chan struct{}, 1),
		changes:    make(chan Change, changeBuffer),
		lastGood:   make(map[string][]wgtypes.Peer),
		kname:      make(map[string]string),
		firstIndex: make(map[string]int),
		gone:       make(map[string]time.Time),
		warned:     make(map[string]bool),
	}
	for _, o := range opts {
		o(w)
	}
	began := mono()
	for _, name := range w.ifaces {
		d, k, idx, err := w.device(name)
		if err != nil {
			return nil, fmt.Errorf("policy: reading WireGuard interface %q: %w", name, err)
		}
		w.kname[name] = k
		if idx > 0 {
			w.firstIndex[k] = idx
		}
		w.lastGood[name] = d.Peers
	}
	w.mu.Lock()
	w.t.Store(w.buildLocked())
	w.last = time.Now()
	w.readAt.Store(began)
	w.mu.Unlock()
	return w, nil
}

// device reads the WireGuard interface configured as name, which may be
// one of its alternative names: userspace WireGuard's control socket is
// /var/run/wireguard/KERNELNAME.sock, and kernel WireGuard's genetlink
// refuses names over 15 bytes, so it is read by the kernel name the
// interface has now, in the calling thread's namespace (a re-created or
// renamed interface is followed at the next read). A name no interface
// there answers to is read as given, as before altnames were resolved
// (a userspace device's socket is seen from every namespace), and is then
// gone if wgctrl knows no such device either; one over 15 bytes, which
// can be no kernel name, is gone at once (kernel WireGuard would refuse
// it, EINVAL: a failed read, which keeps the peers). index is the
// interface's index as resolved before the read (0: not found).
func (w *WireGuard) device(name string) (d *wgtypes.Device, kname string, index int, err error) {
	k, idx, found, err := w.kernel(name)
	switch {
	case err != nil:
		// Not wrapped: a failed resolution is a failed read (the last
		// good peers stay), never "gone" (os.ErrNotExist), which
		// revokes.
		return nil, "", 0, fmt.Errorf("resolving the interface name: %v", err)
	case !found && len(name) >= syscall.IFNAMSIZ:
		return nil, "", 0, fmt.Errorf("no interface answers to the alternative name: %w", os.ErrNotExist)
	case !found:
		k, idx = name, 0
	}
	d, err = w.dev.Device(k)
	return d, k, idx, err
}

// FirstIndex implements DeviceFollower: the interface index kname had
// when NewWireGuard read it, resolved before its device was read (so a
// device swapped under kname after the resolution has another index).
// ok is false for a kernel name NewWireGuard did not read, or read as
// given (no interface answered to it in this thread's namespace: a
// userspace device's socket is seen from every namespace).
func (w *WireGuard) FirstIndex(kname string) (index int, ok bool) {
	index, ok = w.firstIndex[kname]
	return index, ok
}

// Lookup implements Ownership. A miss asks Run for a re-read.
func (w *WireGuard) Lookup(src netip.Addr) (Owner, bool) {
	o, ok := w.t.Load().lookup(src)
	if !ok {
		w.miss()
	}
	return o, ok
}

// LookupOn implements InterfaceLookup: src's owner if its peer holds src
// on the interface whose kernel name is iface, the one the request
// arrived on. A miss asks Run for a re-read, as Lookup's.
func (w *WireGuard) LookupOn(src netip.Addr, iface string) (Owner, bool) {
	o, ok := w.t.Load().lookupOn(src, iface)
	if !ok {
		w.miss()
	}
	return o, ok
}

// InterfacesRenamed implements RenameFollower: the interfaces now known by
// knames (kernel names) are not the ones the last read found under those
// names (renamed, or another interface renamed to one; the listener sees
// it first: it re-binds its sockets at once). Requests arriving on them
// are nobody's (their per-interface tables are dropped from the view at
// once) until a re-read, asked for now, rebuilds the view from the
// interfaces as they are named then. It does not wait for the re-read.
func (w *WireGuard) InterfacesRenamed(knames []string) {
	if len(knames) == 0 {
		return
	}
	w.unserve(&w.renamed, knames, false)
	w.log.Info("served interface renamed; its peers own nothing there until the next read", zap.Strings("kernel_names", knames))
	w.renew()
}

// DevicesChanged implements DeviceFollower: the devices now under knames
// (kernel names) are not the ones the last read found there: the
// interface was deleted, created again (a new index under the name, as
// wg-quick down/up or systemctl restart wg-quick@ makes it), or renamed;
// the listener sees it in the kernel's link events, before it serves the
// new device. From now on no view read before this call judges a request
// that opens a pinhole, however young (Stale, Freshen: such a request
// waits for a read), and requests arriving under knames are nobody's
// (their per-interface tables are dropped, as InterfacesRenamed's)
// until a read that ends cleanly rebuilds them. Before (h/fresh), a view
// read up to the fresh bound before a swap judged the new device's first
// requests by the old device's peers: a source the old device gave to
// its peer was that peer's, even from a new peer that owns nothing
// (TestE2EWireGuardDeviceSwapWithinBound). A device still there asks Run
// for a re-read at once, so that the next request waits little; a
// deleted one does not (the first read that finds it gone starts its
// grace, as before). It does not wait for the re-read.
func (w *WireGuard) DevicesChanged(knames []string, gone bool) {
	if len(knames) == 0 {
		return
	}
	w.unserve(&w.replaced, knames, true)
	w.log.Info("served WireGuard interface changed; no request that opens a pinhole is judged by a view read before it",
		zap.Strings("kernel_names", knames), zap.Bool("gone", gone))
	if !gone {
		w.renew()
	}
}

// unserve marks knames in *set (w.renamed or w.replaced) and drops their
// per-interface tables from the view; swap also makes every view read
// so far serve no request that opens a pinhole (swapAt).
func (w *WireGuard) unserve(set *map[string]bool, knames []string, swap bool) {
	w.rmu.Lock()
	defer w.rmu.Unlock()
	if *set == nil {
		*set = make(map[string]bool)
	}
	for _, k := range knames {
		(*set)[k] = true
	}
	if swap {
		w.swapAt.Store(mono())
	}
	w.t.Store(w.t.Load().without(w.unservedLocked()))
}

// renew asks Run for a re-read at once (not rate-limited).
func (w *WireGuard) renew() {
	select {
	case w.renewCh <- struct{}{}:
	default:
	}
}

// unservedLocked is the kernel names whose per-interface tables the view
// lacks (renamed and replaced); w.rmu is held.
func (w *WireGuard) unservedLocked() map[string]bool {
	if len(w.replaced) == 0 {
		return w.renamed
	}
	u := maps.Clone(w.replaced)
	maps.Copy(u, w.renamed)
	return u
}

// serves reports whether a view whose read began at read (mono) may judge
// a request that opens a pinhole and arrived at now (mono): the read
// began no more than the fresh bound before now (bound 0: not before),
// and after the last DevicesChanged (before it, it may have read a
// device that is gone).
func (w *WireGuard) serves(now, read int64) bool {
	if at := w.swapAt.Load(); at != 0 && read <= at {
		return false
	}
	return now-read <= int64(w.freshness)
}

// Owners implements Ownership.
func (w *WireGuard) Owners() []Owner { return w.t.Load().snapshot() }

// Holes implements Holes: the AllowedIPs nobody owns because they overlap
// another peer's on a different interface.
func (w *WireGuard) Holes() []netip.Prefix { return w.t.Load().holesCopy() }

func (w *WireGuard) current() *table { return w.t.Load() }

func (w *WireGuard) miss() {
	select {
	case w.missCh <- struct{}{}:
	default:
	}
}

// WireGuardStats counts ownership refreshes, for the operator's metrics.
type WireGuardStats struct {
	Refreshes uint64 // re-reads of the interfaces, periodic or on a miss
	Failures  uint64 // re-reads in which some interface could not be read
	Rebuilds  uint64 // re-reads that found a change and rebuilt the view
}

type wgCounters struct{ refreshes, failures, rebuilds atomic.Uint64 }

// Stats returns the refresh counters; safe for concurrent use.
func (w *WireGuard) Stats() WireGuardStats {
	return WireGuardStats{
		Refreshes: w.stats.refreshes.Load(),
		Failures:  w.stats.failures.Load(),
		Rebuilds:  w.stats.rebuilds.Load(),
	}
}

// Changes delivers ownership losses. The engine must keep draining it while
// Run runs: Run blocks on a full channel rather than drop a revocation.
func (w *WireGuard) Changes() <-chan Change { return w.changes }

// Run re-reads the interfaces every refresh interval, on lookup misses
// (at most once per miss interval) and at once on InterfacesRenamed, until
// ctx ends; it then returns nil.
// Read errors are logged, not returned: ownership keeps its last good view.
func (w *WireGuard) Run(ctx context.Context) error {
	w.mu.Lock()
	w.runCtx = ctx
	w.mu.Unlock()
	tick := time.NewTicker(w.refresh)
	defer tick.Stop()
	var delayed, graceEnd <-chan time.Time
	var graceTimer *time.Timer
	var keep keepTimer
	defer func() {
		if graceTimer != nil {
			graceTimer.Stop()
		}
		keep.stop()
	}()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		case <-graceEnd:
		case <-delayed:
		case <-w.renewCh: // a served interface renamed: at once
		case <-w.keepCh: // requests after a quiet spell
			if !w.keepFresh(&keep) {
				continue
			}
		case <-keep.c:
			if !w.keepFresh(&keep) {
				continue
			}
		case <-w.missCh:
			w.mu.Lock()
			wait := w.missEvery - time.Since(w.last)
			w.mu.Unlock()
			if wait > 0 {
				if delayed == nil {
					delayed = time.After(wait)
				}
				continue
			}
		}
		// Whatever caused it, this re-read serves every miss so far.
		delayed = nil
		if err := w.Refresh(ctx); err != nil && ctx.Err() == nil {
			w.log.Warn("refreshing WireGuard ownership", zap.Error(err))
		}
		// A held interface's grace ends at its own time, not up to a
		// refresh interval later.
		if graceTimer != nil {
			graceTimer.Stop()
		}
		graceTimer, graceEnd = nil, nil
		if end, ok := w.graceEnd(); ok {
			// An end already past is one this refresh could not end (the
			// interface failed to read: its peers stay): retry no sooner
			// than a miss would, not in a loop.
			d := end.Sub(w.now())
			if d <= 0 {
				d = w.missEvery
			}
			graceTimer = time.NewTimer(d)
			graceEnd = graceTimer.C
		}
		if w.keeping.Load() {
			w.keepFresh(&keep) // the next keeping read, from this one's start
		}
	}
}

// keepTimer is Run's timer of the next keeping read (keepFresh).
type keepTimer struct {
	t *time.Timer
	c <-chan time.Time
}

func (k *keepTimer) stop() {
	if k.t != nil {
		k.t.Stop()
	}
	k.t, k.c = nil, nil
}

// keepFresh decides Run's next keeping read: while a request that opens
// a pinhole came (Stale) within KeepFreshWindow, the view is read again
// once its read began half the fresh bound ago, so such requests find a
// view within the bound and wait for no read (under load, about two
// reads a bound; a read that takes longer than half the bound is
// followed by the next at once). With no such request in the window it
// stops (keeping false: idle costs no read but the periodic one), until
// Stale finds it stopped. With a bound of 0 there is none: no read begun
// before a request serves it. It reports whether Run should read now,
// else arms k (or leaves it stopped).
func (w *WireGuard) keepFresh(k *keepTimer) bool {
	k.stop()
	half := int64(w.freshness / 2)
	now := mono()
	if half <= 0 || now-w.demand.Load() > int64(KeepFreshWindow) {
		w.keeping.Store(false)
		// A Stale that stored its demand before the store above may
		// have found keeping true and not asked: look once more.
		if half <= 0 || now-w.demand.Load() > int64(KeepFreshWindow) {
			return false
		}
		w.keeping.Store(true)
	}
	d := w.readAt.Load() + half - now
	if d <= 0 {
		// Older than the bound too after a quiet spell: the request
		// that found it so waits for a Freshen read as well (one
		// more read at the change from idle to busy, at most).
		return true
	}
	k.t = time.NewTimer(time.Duration(d))
	k.c = k.t.C
	return false
}

// graceEnd is when the first grace of a held interface ends.
func (w *WireGuard) graceEnd() (time.Time, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	var end time.Time
	for _, since := range w.gone {
		if e := since.Add(w.grace); end.IsZero() || e.Before(end) {
			end = e
		}
	}
	return end, !end.IsZero()
}

// Refresh re-reads every interface now, swaps in the new view and sends the
// resulting Changes. It returns the read errors (the view is still updated
// from the interfaces that could be read) or ctx's error if ctx ends while
// a Change waits to be delivered.
func (w *WireGuard) Refresh(ctx context.Context) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.refreshLocked(ctx)
}

// Freshen makes sure the view is one whose read began no more than the
// fresh bound (WithFreshBound, DefaultFreshBound) ago, and after the last
// DevicesChanged, re-reading every interface first if it is older (or
// began before), and reports whether THIRD_PARTY targets
// may be judged by it (not Unsure). It is for THIRD_PARTY targets
// (Policy.Freshen): a requester's own source WireGuard checks per
// packet, but a target lying in a prefix just carved out of the
// requester's for another peer was judged by the view of up to a refresh
// interval before (h/tpfresh). Concurrent callers share one read: those
// that find it under way wait for it and take its view, so a flood of
// them causes at most one read per bound (with a bound of 0, one per
// caller that arrives before the read under way began). The read runs in
// a goroutine of its own, and no caller waits for it longer than the
// fresh wait (WithFreshWait) from its start: a read that hangs (a stopped
// userspace WireGuard daemon: wgctrl's read has no deadline) blocked the
// socket reader that called, and every other one at its next THIRD_PARTY
// request, for as long as it hung (review h/revtp); it now makes the view
// Unsure, which refuses THIRD_PARTY targets (fail closed), and the
// callers after the first return at once. So does a read in which some
// interface failed (its last good peers stay, of any age): before, it
// counted as fresh. The server calls it (FreshenAt) from a goroutine of
// its own, never from a socket reader (h/tpqueue): the readers ask Stale
// and hand a request that needs a read to it. The read delivers its
// Changes itself (the engine drains them). A view read before the call (within the bound) asks Run
// for a re-read (miss, at most one per miss interval): a target it
// allowed in a prefix carved out since is revoked by that read, about a
// second later, where it lived until the periodic one (review h/revtp).
func (w *WireGuard) Freshen() bool { return w.freshenSince(mono()) }

// FreshenAt is Freshen for a request that arrived at at (a reading of
// time.Now, with its monotonic clock): the view must be one whose read
// began no more than the fresh bound before at (bound 0: after at), so a
// request that waited in a queue (the server's THIRD_PARTY queue) is
// served by any read begun since it arrived, not only by one begun
// after this call.
func (w *WireGuard) FreshenAt(at time.Time) bool {
	return w.freshenSince(int64(at.Sub(monoStart)))
}

// Stale reports, without waiting, whether a request that opens or
// extends a pinhole (a THIRD_PARTY target, and since h/fresh every MAP,
// PEER and NAT-PMP mapping but deletes) judged now needs a fresher view
// first (Freshen would re-read): the view's read began more than the
// fresh bound ago, or before the last DevicesChanged (the device it read
// may be gone). A view within the bound but read before the call asks
// Run for a re-read, as Freshen's does. Each call is a request: Run keeps
// the view within the bound while they come (keepFresh), so that under
// load they seldom find it stale.
func (w *WireGuard) Stale() bool {
	now := mono()
	if now-w.demand.Load() > int64(time.Millisecond) {
		w.demand.Store(now)
	}
	if !w.keeping.Load() && w.freshness > 0 && w.keeping.CompareAndSwap(false, true) {
		select {
		case w.keepCh <- struct{}{}:
		default:
		}
	}
	read := w.readAt.Load()
	if !w.serves(now, read) {
		return true
	}
	if now-read >= 0 {
		w.miss()
	}
	return false
}

// SwapPending reports, without waiting, whether the view was read no
// later than the last DevicesChanged: it lacks the changed interfaces'
// peers (DevicesChanged dropped their tables) until a read that began
// after the change, so a request arriving there is nobody's by it, a
// delete included. A request that opens a pinhole waits for that read
// (Stale, Freshen); the server has a delete (and a PEER query) wait for
// it too when this says so (FreshenAt: the read serves every request
// that arrived before it began), and only then: an ordinary delete
// costs these loads and no read, and counts as no request for the
// keeping reads (Stale's demand). Before (h/delwait), a delete sent
// between a device change and the read was refused NOT_AUTHORIZED,
// with a 30-minute error lifetime, though the fresh view held its
// owner (h/flake's left).
func (w *WireGuard) SwapPending() bool {
	at := w.swapAt.Load()
	return at != 0 && w.readAt.Load() <= at
}

func (w *WireGuard) freshenSince(now int64) bool {
	for {
		if read := w.readAt.Load(); w.serves(now, read) {
			if now-read >= 0 {
				// Read before the call: what this view allows may
				// lie in a prefix carved out since. Run re-reads
				// within the miss interval, and that read's Changes
				// revoke it then, not at the periodic read.
				w.miss()
			}
			return !w.unsure.Load()
		}
		w.fmu.Lock()
		if w.serves(now, w.readAt.Load()) {
			w.fmu.Unlock()
			continue // a read that began since served it
		}
		r := w.inflight
		if r == nil {
			r = &freshRead{began: mono(), done: make(chan struct{})}
			w.inflight = r
			go w.freshRead(r)
		}
		w.fmu.Unlock()
		if wait := time.Duration(r.began + int64(w.freshWait) - mono()); wait > 0 {
			t := time.NewTimer(wait)
			select {
			case <-r.done:
				t.Stop()
				continue // its view, or (bound 0) one more read
			case <-t.C:
			}
		}
		w.fmu.Lock()
		if w.inflight == r && !w.unsure.Swap(true) {
			w.log.Warn("WireGuard read for a THIRD_PARTY target still under way after the wait; THIRD_PARTY targets are refused until a read ends cleanly",
				zap.Duration("wait", w.freshWait))
		}
		w.fmu.Unlock()
		return false
	}
}

// freshRead is a read Freshen started: when (mono), and closed when done.
type freshRead struct {
	began int64
	done  chan struct{}
}

func (w *WireGuard) freshRead(r *freshRead) {
	w.mu.Lock()
	ctx := w.runCtx
	if ctx == nil {
		ctx = context.Background()
	}
	err := w.refreshLocked(ctx)
	w.mu.Unlock()
	if err != nil && ctx.Err() == nil {
		w.log.Warn("refreshing WireGuard ownership for a THIRD_PARTY target", zap.Error(err))
	}
	w.fmu.Lock()
	w.inflight = nil
	w.fmu.Unlock()
	close(r.done)
}

// Unsure reports whether the view may lag by more than the fresh bound:
// the last read failed for some interface, or Freshen gave up waiting
// for one. Policy.Authorize refuses THIRD_PARTY targets meanwhile.
func (w *WireGuard) Unsure() bool { return w.unsure.Load() }

// monoStart anchors mono.
var monoStart = time.Now()

// mono is a monotonic clock reading in nanoseconds.
func mono() int64 { return int64(time.Since(monoStart)) }

func (w *WireGuard) refreshLocked(ctx context.Context) error {
	began := mono()
	// This read serves the renames so far; later ones stay marked.
	w.rmu.Lock()
	pending, replaced := w.renamed, w.replaced
	w.renamed, w.replaced = nil, nil
	w.rmu.Unlock()
	var errs []error
	changed := len(pending) > 0 || len(replaced) > 0 // the view lacks their tables: rebuild
	// userspace is the renamed kernel names read from a userspace device
	// (wireguard-go, boringtun): wgctrl finds one by the name its UAPI
	// socket was made with, which a rename does not change, so the name
	// may find another device than the one named so now (after two
	// interfaces trade names, the other's). They stay marked.
	var userspace []string
	now := w.now()
	readNow := make(map[string]bool, len(w.ifaces)) // kernel names read now
	// failed is the kernel names whose read failed ("": one whose name
	// could not be resolved), whose last good peers stay: only a
	// replaced one among them may still be judged by the old device's.
	failed := make(map[string]bool)
	for _, name := range w.ifaces {
		d, k, _, err := w.device(name)
		switch {
		case err == nil:
			if pending[k] && d.Type == wgtypes.Userspace {
				userspace = append(userspace, k)
			}
			old, had := w.lastGood[name]
			same := had && samePeers(old, d.Peers) && w.kname[name] == k
			if since, held := w.gone[name]; held {
				// Back: requests count on it again (a rebuild either
				// way); other peers or AllowedIPs lose what changed.
				delete(w.gone, name)
				w.log.Info("WireGuard interface back within its grace", zap.String("interface", name),
					zap.Duration("gone_for", now.Sub(since).Round(time.Millisecond)), zap.Bool("same_peers", same))
				same = false
			}
			if !same {
				changed = true
			}
			w.lastGood[name] = d.Peers
			w.kname[name] = k
			readNow[k] = true
		case errors.Is(err, os.ErrNotExist) || errors.Is(err, syscall.ECONNREFUSED):
			// Gone, or a userspace daemon's stale socket: no traffic can
			// reach these peers. They own nothing once the grace is over
			// (at once without one).
			if _, had := w.lastGood[name]; !had {
				break
			}
			since, held := w.gone[name]
			switch {
			case !held && w.grace > 0:
				// Held: a rebuild takes it out of the tables requests
				// are judged by (no owner, no hole changes).
				w.gone[name] = now
				w.log.Warn("WireGuard interface gone; its peers keep their AllowedIPs for the grace, then own nothing",
					zap.String("interface", name), zap.Duration("grace", w.grace))
				changed = true
			case held && now.Sub(since) < w.grace:
				// Still within the grace: nothing changes.
			default:
				f := []zap.Field{zap.String("interface", name)}
				if held {
					f = append(f, zap.Duration("gone_for", now.Sub(since).Round(time.Millisecond)))
				}
				w.log.Warn("WireGuard interface gone; its peers own nothing", f...)
				delete(w.lastGood, name)
				delete(w.kname, name)
				delete(w.gone, name)
				changed = true
			}
		default:
			errs = append(errs, fmt.Errorf("policy: reading WireGuard interface %q: %w", name, err))
			failed[k], failed[w.kname[name]] = true, true
		}
	}
	// A held name whose kernel name was read now under another configured
	// name (wg0 back without its altname) is superseded for good: its
	// peers are the interface's of before, stale once it changes, and
	// must not own again if it goes once more (its own peers are held
	// then). Left out of the view already (buildLocked), so no rebuild.
	for name := range w.gone {
		if readNow[w.kname[name]] {
			delete(w.gone, name)
			delete(w.lastGood, name)
			delete(w.kname, name)
		}
	}
	w.last = time.Now()
	w.stats.refreshes.Add(1)
	if len(errs) > 0 {
		w.stats.failures.Add(1)
	}
	if changed {
		w.stats.rebuilds.Add(1)
	}
	if !changed {
		// The common periodic case: one wgctrl read, no rebuild.
		w.unsure.Store(len(errs) > 0) // before readAt: a view fresh by readAt is judged by its read's outcome
		w.readAt.Store(began)
		return errors.Join(errs...)
	}
	old := w.t.Load()
	nt := w.buildLocked()
	w.rmu.Lock()
	keep := userspace
	if len(errs) > 0 {
		// Some interface kept its last good peers, maybe read by its
		// old name: the renamed ones wait for a clean read. So do the
		// replaced ones that failed: their last good peers may be the
		// old device's. One read cleanly is served by what was read,
		// whatever another interface's failure (review h/revsw: before,
		// a re-created wg0 was nobody's for as long as wg1 failed,
		// TestWireGuardDevicesChangedOtherFails).
		keep = slices.Collect(maps.Keys(pending))
		for k := range replaced {
			if failed[k] || failed[""] {
				if w.replaced == nil {
					w.replaced = make(map[string]bool)
				}
				w.replaced[k] = true
			}
		}
	}
	for _, k := range keep {
		if w.renamed == nil {
			w.renamed = make(map[string]bool)
		}
		if slices.Contains(userspace, k) && !w.stuck[k] {
			if w.stuck == nil {
				w.stuck = make(map[string]bool)
			}
			w.stuck[k] = true
			w.log.Error("served userspace WireGuard interface renamed: wgctrl finds a userspace device by the name it was started with, so requests arriving under this name own nothing until pcpd restarts",
				zap.String("kernel_name", k))
		}
		w.renamed[k] = true
	}
	if len(w.renamed) > 0 || len(w.replaced) > 0 {
		nt = nt.without(w.unservedLocked())
	}
	w.t.Store(nt)
	w.unsure.Store(len(errs) > 0)
	w.readAt.Store(began)
	w.rmu.Unlock()
	for _, c := range diff(old, nt) {
		w.log.Info("WireGuard ownership lost",
			zap.String("owner", string(c.Owner)), zap.Bool("removed", c.Removed),
			zap.Stringers("lost", c.Lost))
		select {
		case w.changes <- c:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return errors.Join(errs...)
}

// buildLocked turns the last good peers of every interface into a table.
//
// WireGuard checks a packet's source only against the peers of the
// interface it arrived on, and Lookup (sweeps, revocation, the guard) does
// not know that interface; LookupOn, for requests, does, through the
// per-interface tables built last (table.ifaces). So a prefix is a hole (owned by nobody, with a warning) when it overlaps —
// equals, or lies inside — a prefix of a different peer on a different
// interface: there, a source could come from either peer. Nested prefixes of
// one interface keep WireGuard's longest match, which its own routing
// enforces.
func (w *WireGuard) buildLocked() *table {
	// Warnings are remembered only while their cause persists, so a bad
	// prefix that goes away and comes back is reported again.
	w.warnNext = make(map[string]bool)
	defer func() { w.warned, w.warnNext = w.warnNext, nil }()
	var owners []Owner
	idx := make(map[OwnerID]int32)
	type holder struct {
		owner int32
		iface int
	}
	type claim struct {
		span
		p       netip.Prefix
		holders []holder
		hole    bool
	}
	claims := make(map[netip.Prefix]*claim)
	// An interface is known by its kernel name: configured twice (kernel
	// name and altname), it is still one interface, whose nested peers
	// keep WireGuard's longest match instead of becoming holes.
	first := make(map[string]int)
	for i, name := range w.ifaces {
		if _, ok := first[w.kname[name]]; !ok {
			first[w.kname[name]] = i
		}
	}
	// A gone interface whose peers are held (w.gone) is known by its last
	// kernel name. If an interface of that name is read now (the same one
	// back under another configured name: wg-quick does not restore an
	// altname), its peers now are what counts, and the held ones are
	// left out: kept, they would stand beside the new ones as a second
	// interface and make holes of nested AllowedIPs.
	live := make(map[string]bool, len(first)) // kernel names read now, not held
	for _, name := range w.ifaces {
		_, read := w.lastGood[name]
		if _, held := w.gone[name]; read && !held {
			live[w.kname[name]] = true
		}
	}
	heldOnly := func(name string) bool { // held and not superseded
		_, held := w.gone[name]
		return held && !live[w.kname[name]]
	}
	for _, name := range w.ifaces {
		peers, ok := w.lastGood[name]
		if _, held := w.gone[name]; !ok || held && !heldOnly(name) {
			continue
		}
		ifi := first[w.kname[name]]
		for _, peer := range peers {
			k := peer.PublicKey.String()
			id := OwnerID("wg:" + k)
			i, ok := idx[id]
			if !ok {
				i = int32(len(owners))
				idx[id] = i
				owners = append(owners, Owner{ID: id, Label: w.labels[k]})
			}
			for _, ipn := range peer.AllowedIPs {
				p, ok := prefixFromIPNet(ipn)
				if !ok {
					continue
				}
				if err := checkOwnedPrefix(p); err != nil {
					w.warnOnce(id, p, "AllowedIP ignored for ownership", err)
					continue
				}
				p = p.Masked()
				if t, ok := OverlapsTranslation(p, w.xlat); ok {
					// Still owned (the peer may be the NAT64 gateway), but
					// no target there is openable, and no request from
					// there is the peer's (an IPv4 host's, through the
					// translator: Policy.translated): say so, once.
					w.warnOnce(id, p, "AllowedIP overlaps an IPv6-to-IPv4 translation prefix; its addresses there are never openable",
						fmt.Errorf("overlaps %s", t))
				}
				h := holder{i, ifi}
				switch c := claims[p]; {
				case c == nil:
					claims[p] = &claim{span: spanOf(p), p: p, holders: []holder{h}}
					owners[i].Prefixes = append(owners[i].Prefixes, p)
				case !slices.Contains(c.holders, h):
					if c.holders[0].owner != i && !c.hole {
						c.hole = true
						w.warnOnce(id, p, "AllowedIP held by two peers on different interfaces; neither owns it",
							fmt.Errorf("also held by %s", owners[c.holders[0].owner].ID))
					}
					c.holders = append(c.holders, h)
				}
			}
		}
	}
	// conflict: some holder of a and some of b are different peers on
	// different interfaces.
	conflict := func(a, b *claim) (int32, bool) {
		for _, x := range a.holders {
			for _, y := range b.holders {
				if x.owner != y.owner && x.iface != y.iface {
					return x.owner, true
				}
			}
		}
		return 0, false
	}
	sorted := make([]*claim, 0, len(claims))
	for _, c := range claims {
		sorted = append(sorted, c)
	}
	slices.SortFunc(sorted, func(a, b *claim) int {
		if a.first != b.first {
			if a.first.less(b.first) {
				return -1
			}
			return 1
		}
		return a.bits - b.bits
	})
	// Prefixes are nested or disjoint: in (first, shorter-first) order the
	// stack holds exactly the prefixes enclosing the current one (at most
	// one per length). Conflict is not transitive, so check them all.
	var stack []*claim
	for _, c := range sorted {
		for len(stack) > 0 && stack[len(stack)-1].last.less(c.first) {
			stack = stack[:len(stack)-1]
		}
		for _, outer := range stack {
			if c.hole {
				break
			}
			if o, ok := conflict(outer, c); ok {
				c.hole = true
				w.warnOnce(owners[c.holders[0].owner].ID, c.p,
					"AllowedIP overlaps another peer's on a different interface; neither owns the overlap",
					fmt.Errorf("inside %s of %s", outer.p, owners[o].ID))
			}
		}
		stack = append(stack, c)
	}
	spans := make([]span, 0, len(claims))
	for _, c := range sorted {
		s := c.span
		s.owner = c.holders[0].owner
		if c.hole {
			s.owner = noOwner
			// The first claimant listed it; it owns it no more.
			o := &owners[c.holders[0].owner]
			o.Prefixes = slices.DeleteFunc(o.Prefixes, func(q netip.Prefix) bool { return q == c.p })
		}
		spans = append(spans, s)
	}
	for i := range owners {
		slices.SortFunc(owners[i].Prefixes, comparePrefix)
	}
	t := build(owners, spans)
	// Per interface, its peers' prefixes alone (table.findOn), holes or
	// not: a request is a peer's only if it arrived on an interface where
	// WireGuard's source check took it as that peer's. A held interface
	// (gone) has none: no request counts on it.
	present := make(map[string]int, len(first)) // kernel name → interface index, for those read
	for k := range live {
		if k != "" {
			present[k] = first[k]
		}
	}
	held := 0
	for _, name := range w.ifaces {
		if heldOnly(name) {
			held++
		}
	}
	t.ifaces = make(map[string]*table, len(present))
	if len(present) == 1 && held == 0 {
		// One interface (and no held one, whose peers are in t): no
		// prefix is a hole across interfaces, and one prefix of two of
		// its peers is nobody's in t too, so t labels every address as
		// its sub-table would (table.only).
		for k := range present {
			t.only, t.ifaces[k] = k, t
		}
		return t
	}
	byIface := make(map[int][]span)
	for _, c := range sorted {
		for _, h := range c.holders {
			ss := byIface[h.iface]
			if n := len(ss); n > 0 && ss[n-1].first == c.first && ss[n-1].bits == c.bits {
				// Two peers of one interface with one prefix: WireGuard
				// moves an AllowedIP to the last peer given it, so this
				// is a read caught mid-change; neither is trusted.
				if ss[n-1].owner != h.owner {
					ss[n-1].owner = noOwner
				}
				continue
			}
			s := c.span
			s.owner = h.owner
			byIface[h.iface] = append(ss, s)
		}
	}
	for k, ifi := range present {
		sub := build(owners, byIface[ifi])
		sub.byID, sub.holes = nil, nil
		t.ifaces[k] = sub
	}
	return t
}

func (w *WireGuard) warnOnce(id OwnerID, p netip.Prefix, msg string, err error) {
	k := string(id) + " " + p.String() + " " + msg
	if w.warnNext[k] {
		return
	}
	w.warnNext[k] = true
	if w.warned[k] {
		return
	}
	w.log.Warn(msg, zap.String("owner", string(id)), zap.Stringer("prefix", p), zap.Error(err))
}

// samePeers reports whether two reads list the same peers with the same
// AllowedIPs in the same order (what ownership depends on).
func samePeers(a, b []wgtypes.Peer) bool {
	return slices.EqualFunc(a, b, func(p, q wgtypes.Peer) bool {
		return p.PublicKey == q.PublicKey && slices.EqualFunc(p.AllowedIPs, q.AllowedIPs, func(x, y net.IPNet) bool {
			return x.IP.Equal(y.IP) && bytes.Equal(x.Mask, y.Mask)
		})
	})
}

func prefixFromIPNet(n net.IPNet) (netip.Prefix, bool) {
	ones, size := n.Mask.Size()
	a, ok := netip.AddrFromSlice(n.IP)
	if !ok || (size != 32 && size != 128) {
		return netip.Prefix{}, false
	}
	if size == 32 {
		if !a.Unmap().Is4() {
			return netip.Prefix{}, false
		}
		a = a.Unmap()
	}
	return netip.PrefixFrom(a, ones), true
}

// diff returns the ownership each owner of old lost in new: one sweep over
// both tables' intervals, which together partition the address space.
func diff(old, new *table) []Change {
	remap := make([]int32, len(old.owners))
	for i, o := range old.owners {
		if j, ok := new.byID[o.ID]; ok {
			remap[i] = j
		} else {
			remap[i] = noOwner - 1 // equal to no owner index of new
		}
	}
	type rng struct{ a, b u128 }
	lost := make(map[int32][]rng)
	maxU := u128{^uint64(0), ^uint64(0)}
	end := func(t *table, i int) u128 {
		if i+1 < len(t.starts) {
			return t.starts[i+1].subOne()
		}
		return maxU
	}
	for i, j := 0, 0; ; {
		a := old.starts[i]
		if a.less(new.starts[j]) {
			a = new.starts[j]
		}
		oe, ne := end(old, i), end(new, j)
		b := oe
		if ne.less(b) {
			b = ne
		}
		if o := old.owner[i]; o >= 0 && remap[o] != new.owner[j] {
			rs := lost[o]
			if n := len(rs); n > 0 {
				if next, _ := rs[n-1].b.addOne(); next == a {
					rs[n-1].b = b
					lost[o] = rs
					goto advance
				}
			}
			lost[o] = append(rs, rng{a, b})
		}
	advance:
		if b == maxU {
			break
		}
		if oe == b {
			i++
		}
		if ne == b {
			j++
		}
	}
	var out []Change
	for i, o := range old.owners {
		rs, ok := lost[int32(i)]
		if !ok {
			continue
		}
		c := Change{Owner: o.ID, Removed: remap[i] < 0}
		for _, r := range rs {
			c.Lost = appendRange(c.Lost, r.a, r.b)
		}
		out = append(out, c)
	}
	return out
}
