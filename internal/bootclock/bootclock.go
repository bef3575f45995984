// Package bootclock keeps pcpd's boot anchor: the boot it ran in and how
// its running clock (server/clock.go) stood against CLOCK_BOOTTIME, the
// clock that counts through suspend and is never stepped. pcpd writes it
// to a small file in the state directory whenever it (re)bases its
// running clock (at start, after a wall-clock step). A later start in the
// same boot predicts from it, by CLOCK_BOOTTIME, what the last run's
// running clock would read now; the wall clock's difference from that is
// a step made while pcpd was down (or after its last clock check), which
// the engine then treats as a step seen while running (issue 9: "the
// epoch never resets while state is intact").
//
// The anchor goes with one stored state: it records the epoch origin the
// state had when it was written (after a rebase: the one it has once the
// leases are rewritten, server/clock.go), and is used only for a state
// whose stored origin is that one (not for a state restored from the
// backup or reset since, whose times are in another frame, nor for one
// whose rewrite after a step did not finish: its origin is cleared).
package bootclock

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"
)

// FileName is the anchor's file in the state directory.
const FileName = "bootclock"

// Errors of Keeper.Step: why no step can be measured (the caller then
// goes on as if there were no anchor).
var (
	ErrMissing   = errors.New("bootclock: no boot anchor")
	ErrDamaged   = errors.New("bootclock: boot anchor damaged")
	ErrOtherBoot = errors.New("bootclock: boot anchor is from another boot")
	ErrMismatch  = errors.New("bootclock: boot anchor does not match the stored state")
	ErrClock     = errors.New("bootclock: cannot read the boot clock")
	// ErrStale (of Save): the anchor could not be written and the old
	// one could not be removed either: it is still there, describing
	// the running clock of before (the caller tries again).
	ErrStale = errors.New("bootclock: old boot anchor left in place")
)

// Anchor is what the file holds.
type Anchor struct {
	BootID string        // /proc/sys/kernel/random/boot_id
	Boot   time.Duration // CLOCK_BOOTTIME when Run was read
	Run    time.Time     // the running clock's reading at Boot
	Origin time.Time     // the stored epoch origin the anchor goes with
}

// Clocks are the readings a Keeper takes (tests inject their own).
type Clocks struct {
	Wall     func() time.Time
	Boottime func() (time.Duration, error)
	BootID   func() (string, error)
}

// System is the machine's clocks.
func System() Clocks {
	return Clocks{Wall: time.Now, Boottime: boottime, BootID: bootID}
}

func bootID() (string, error) {
	b, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		return "", err
	}
	id := strings.TrimSpace(string(b))
	if id == "" {
		return "", errors.New("empty boot id")
	}
	return id, nil
}

// Keeper reads and writes the anchor of one state directory.
type Keeper struct {
	dir string
	c   Clocks
	// taken is Unseen's measurement, for the next Step of the same
	// origin (see Unseen); Save drops it.
	mu    sync.Mutex
	taken *measured
}

type measured struct {
	origin time.Time
	d      time.Duration
}

// New is the Keeper of the anchor in dir.
func New(dir string, c Clocks) *Keeper { return &Keeper{dir: dir, c: c} }

// Path is the anchor file's path.
func (k *Keeper) Path() string { return filepath.Join(k.dir, FileName) }

// spread is the most time a measurement's two boot-clock readings may be
// apart (3 tries): a goroutine paused between them would otherwise count
// the pause in the step (as server/clock.go's measure).
const spread = 10 * time.Millisecond

// pair reads CLOCK_BOOTTIME around read and returns the midpoint. If the
// readings stay more than spread apart it fails (ErrClock): the midpoint
// can then be off by half the pause, a step of its own (a 4 s pause of a
// VM's thread, 3 times running: +2 s, over stepThreshold, every lease 2 s
// longer; review h/revboot, TestStepPaused).
func (k *Keeper) pair(read func()) (time.Duration, error) {
	for range 3 {
		b1, err := k.c.Boottime()
		if err != nil {
			return 0, fmt.Errorf("%w: %v", ErrClock, err)
		}
		read()
		b2, err := k.c.Boottime()
		if err != nil {
			return 0, fmt.Errorf("%w: %v", ErrClock, err)
		}
		if b2-b1 <= spread {
			return b1 + (b2-b1)/2, nil
		}
	}
	return 0, fmt.Errorf("%w: readings more than %v apart 3 times (paused)", ErrClock, spread)
}

// Save anchors the running clock run (its reading now) to this boot, for
// the state whose epoch origin is origin: written to a temporary file,
// synced, renamed over the anchor and the directory synced, so a crash
// leaves the old anchor or the new one.
//
// A Save that fails removes the old anchor: it describes the last run's
// running clock, and the caller's stores times in its own from now on. A
// later start in the same boot would otherwise restore those in the old
// frame: a step made before this run (which it could not measure: boot
// id unreadable) would lengthen every lease it wrote by the step (review
// h/revboot, TestBootClockStaleAnchor). If that fails too the error is
// ErrStale.
func (k *Keeper) Save(run func() time.Time, origin time.Time) error {
	k.mu.Lock()
	k.taken = nil
	k.mu.Unlock()
	err := k.save(run, origin)
	if err == nil {
		return nil
	}
	if rerr := k.drop(); rerr != nil {
		return fmt.Errorf("%w; %w: %v", err, ErrStale, rerr)
	}
	return err
}

// drop removes the anchor, durably.
func (k *Keeper) drop() error {
	if err := os.Remove(k.Path()); errors.Is(err, os.ErrNotExist) {
		return nil
	} else if err != nil {
		return err
	}
	d, err := os.Open(k.dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

func (k *Keeper) save(run func() time.Time, origin time.Time) error {
	id, err := k.c.BootID()
	if err != nil {
		return fmt.Errorf("%w: boot id: %v", ErrClock, err)
	}
	var r time.Time
	b, err := k.pair(func() { r = run() })
	if err != nil {
		return err
	}
	return k.write(Anchor{BootID: id, Boot: b, Run: r, Origin: origin})
}

// Step returns the wall clock's step since the anchor was saved: the wall
// clock's reading now minus what the anchored running clock reads now by
// CLOCK_BOOTTIME. origin is the stored state's epoch origin. The error
// (ErrMissing, ErrDamaged, ErrOtherBoot, ErrMismatch, ErrClock) says why
// there is none to measure.
func (k *Keeper) Step(origin time.Time) (time.Duration, error) {
	k.mu.Lock()
	m := k.taken
	k.taken = nil
	k.mu.Unlock()
	if m != nil && m.origin.Equal(origin) {
		return m.d, nil
	}
	return k.step(origin)
}

func (k *Keeper) step(origin time.Time) (time.Duration, error) {
	a, err := k.Load()
	if err != nil {
		return 0, err
	}
	id, err := k.c.BootID()
	if err != nil {
		return 0, fmt.Errorf("%w: boot id: %v", ErrClock, err)
	}
	if id != a.BootID {
		return 0, fmt.Errorf("%w (%s, now %s)", ErrOtherBoot, a.BootID, id)
	}
	if origin.IsZero() || !origin.Equal(a.Origin) {
		return 0, fmt.Errorf("%w: epoch origin %s, anchored %s", ErrMismatch,
			fmtTime(origin), fmtTime(a.Origin))
	}
	var w time.Time
	b, err := k.pair(func() { w = k.c.Wall() })
	if err != nil {
		return 0, err
	}
	if b < a.Boot {
		return 0, fmt.Errorf("%w: boot clock %v behind the anchor's %v", ErrDamaged, b, a.Boot)
	}
	return w.Sub(a.Run.Add(b - a.Boot)), nil
}

func fmtTime(t time.Time) string {
	if t.IsZero() {
		return "none"
	}
	return t.UTC().Format(time.RFC3339Nano)
}

// The file: magic, boot id (length-prefixed), then Boot, Run and Origin
// as big-endian int64 nanoseconds (Origin 0: none), then a CRC-32C of all
// that.
const magic = "pcpdbck1"

var crcTable = crc32.MakeTable(crc32.Castagnoli)

func encode(a Anchor) []byte {
	b := append([]byte(magic), byte(len(a.BootID)))
	b = append(b, a.BootID...)
	var origin int64
	if !a.Origin.IsZero() {
		origin = a.Origin.UnixNano()
	}
	b = binary.BigEndian.AppendUint64(b, uint64(a.Boot))
	b = binary.BigEndian.AppendUint64(b, uint64(a.Run.UnixNano()))
	b = binary.BigEndian.AppendUint64(b, uint64(origin))
	return binary.BigEndian.AppendUint32(b, crc32.Checksum(b, crcTable))
}

func decode(b []byte) (Anchor, error) {
	if len(b) < len(magic)+1+24+4 || string(b[:len(magic)]) != magic {
		return Anchor{}, fmt.Errorf("%w: not an anchor (%d bytes)", ErrDamaged, len(b))
	}
	n := int(b[len(magic)])
	if len(b) != len(magic)+1+n+24+4 {
		return Anchor{}, fmt.Errorf("%w: %d bytes, want %d", ErrDamaged, len(b), len(magic)+1+n+24+4)
	}
	body, sum := b[:len(b)-4], binary.BigEndian.Uint32(b[len(b)-4:])
	if crc32.Checksum(body, crcTable) != sum {
		return Anchor{}, fmt.Errorf("%w: checksum", ErrDamaged)
	}
	p := body[len(magic)+1:]
	a := Anchor{BootID: string(p[:n])}
	p = p[n:]
	a.Boot = time.Duration(binary.BigEndian.Uint64(p))
	a.Run = time.Unix(0, int64(binary.BigEndian.Uint64(p[8:])))
	if o := int64(binary.BigEndian.Uint64(p[16:])); o != 0 {
		a.Origin = time.Unix(0, o)
	}
	return a, nil
}

// Load reads the anchor.
func (k *Keeper) Load() (Anchor, error) {
	b, err := os.ReadFile(k.Path())
	if errors.Is(err, os.ErrNotExist) {
		return Anchor{}, ErrMissing
	}
	if err != nil {
		return Anchor{}, fmt.Errorf("%w: %v", ErrDamaged, err)
	}
	return decode(b)
}

func (k *Keeper) write(a Anchor) error {
	if len(a.BootID) > 255 {
		return fmt.Errorf("bootclock: boot id of %d bytes", len(a.BootID))
	}
	tmp := k.Path() + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("bootclock: %w", err)
	}
	_, err = f.Write(encode(a))
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, k.Path())
	}
	if err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("bootclock: write anchor: %w", err)
	}
	d, err := os.Open(k.dir)
	if err != nil {
		return fmt.Errorf("bootclock: sync %s: %w", k.dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("bootclock: sync %s: %w", k.dir, err)
	}
	return nil
}

// Unseen is Step's step, 0 when there is none to measure (for
// store.WithUnseenStep; the engine's own Step call logs why). The next
// Step for the same origin returns a step Unseen measured, not a new one:
// the store's clock-doubt check and the engine act on one. Measured twice, a
// second that failed (a boot clock pair paused, the boot id unreadable a
// moment) left the engine restoring by the wall clock a state the store
// had kept for a step back it measured: every lease looked longer by the
// step, clamped up to its whole lifetime, expired ones back, and the
// epoch reset (review h/revboot, TestBootClockOneMeasurement).
func (k *Keeper) Unseen(origin time.Time) time.Duration {
	d, err := k.step(origin)
	if err != nil {
		return 0 // the store judged without it: the engine measures anew
	}
	k.mu.Lock()
	k.taken = &measured{origin: origin, d: d}
	k.mu.Unlock()
	return d
}
