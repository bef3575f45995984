package store

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/pcpd/pcpd/internal/tmpfs"
)

// streamOneAtATime collects what st.Stream hands out, as streamAll, and
// fails unless State.Leases is nil and every lease came in the same
// scratch lease: never more than one stored lease decoded at a time.
func streamOneAtATime(t *testing.T, st State) []Lease {
	t.Helper()
	if st.Leases != nil {
		t.Fatalf("State.Leases holds %d leases, all decoded at once; want nil (State.Stream)", len(st.Leases))
	}
	if st.Stream == nil {
		t.Fatal("State.Stream is nil: the leases were not kept for it")
	}
	seen := map[*Lease]bool{}
	var got []Lease
	if err := st.Stream(func(l *Lease) error {
		seen[l] = true
		c := *l
		c.Filters = slices.Clone(l.Filters)
		got = append(got, c)
		return nil
	}); err != nil {
		t.Fatalf("Stream: %v", err)
	}
	if len(seen) > 1 {
		t.Fatalf("Stream handed out %d leases in %d places, want one scratch lease", len(got), len(seen))
	}
	return got
}

// backupImage is a state directory whose backup copy holds want (the
// leases of laterImage), and whose state file and log hold 10 leases more
// (200-209, committed after the copy, in the log only).
func backupImage(t *testing.T) (dir string, want []Lease) {
	t.Helper()
	img, want := laterImage(t, 0)
	dir = crashImage(t, img)
	s, _ := openT(t, dir, noCheckpoint, WithoutOpenSnapshot())
	if err := s.Snapshot(); err != nil {
		t.Fatal(err)
	}
	if err := s.Commit(leasesN(200, 210), nil); err != nil {
		t.Fatal(err)
	}
	return crashImage(t, dir), want
}

// openLogged opens dir with WithLeasesLater and returns the "state
// recovery" line's lease count.
func openLogged(t *testing.T, dir string) (*Store, State, any) {
	t.Helper()
	core, logs := observer.New(zap.InfoLevel)
	s, st, err := Open(dir, zap.New(core), WithLeasesLater(), WithoutOpenSnapshot())
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	var n any
	if lines := logs.FilterMessage("state recovery").All(); len(lines) == 1 {
		n = lines[0].ContextMap()["leases"]
	}
	return s, st, n
}

// TestLeasesLaterFromBackup: a state restored from the backup copy comes
// through State.Stream, one lease at a time (State.Leases nil), with the
// guarantees of a clean open: the copy's leases exactly (none of the
// moved-aside file's log), the counts in Recovered and in the "state
// recovery" line right, a panic of fn not taken for damage, and Stream
// refused after a commit. Before, the copy's leases came all decoded at
// once in State.Leases (≈ 500 MB peak at 1 000 000 leases).
func TestLeasesLaterFromBackup(t *testing.T) {
	for _, c := range []struct {
		name   string
		damage func(t *testing.T, path string)
	}{
		{"state file damaged", func(t *testing.T, p string) {
			writeFile(t, p, []byte("not a bbolt file, long enough to be looked at"))
		}},
		{"state file empty", func(t *testing.T, p string) { writeFile(t, p, nil) }},
		{"state file missing", func(t *testing.T, p string) {
			if err := os.Remove(p); err != nil {
				t.Fatal(err)
			}
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir, want := backupImage(t)
			c.damage(t, filepath.Join(dir, DBName))
			s, st, logged := openLogged(t, dir)
			if !st.Fresh || !strings.Contains(st.Recovered, fmt.Sprintf("restored %d leases from backup", len(want))) {
				t.Fatalf("Fresh = %v, Recovered = %q; want the backup's %d leases restored", st.Fresh, st.Recovered, len(want))
			}
			if logged != int64(len(want)) {
				t.Errorf("\"state recovery\" logs leases=%v, want %d", logged, len(want))
			}
			wantLeases(t, streamOneAtATime(t, st), want)
			wantLeases(t, streamOneAtATime(t, st), want) // the restore reads twice

			got := func() (r any) {
				defer func() { r = recover() }()
				_ = st.Stream(func(*Lease) error { panic("engine bug") })
				return nil
			}()
			if got != "engine bug" {
				t.Fatalf("Stream with a panicking fn: panic %v, want \"engine bug\"", got)
			}
			if err := s.Commit([]Lease{leaseN(70)}, nil); err != nil {
				t.Fatal(err)
			}
			if err := st.Stream(func(*Lease) error { return nil }); err == nil || !strings.Contains(err.Error(), "after a commit") {
				t.Fatalf("Stream after a commit = %v, want a refusal", err)
			}
		})
	}
}

// TestLeasesLaterDamagedBackup: with WithLeasesLater a damaged backup is
// still found damaged at Open, not handed out later: it is moved aside,
// Recovered says so and that the start is empty, and there is no
// State.Stream. The first row's damage (a changed octet inside a lease
// record) only decoding the record finds: its checksum is what the digest
// adds up, so counting the records would pass it.
func TestLeasesLaterDamagedBackup(t *testing.T) {
	for _, c := range []struct {
		name   string
		damage func(t *testing.T, path string)
	}{
		{"a lease record", func(t *testing.T, p string) { flipIn(t, p, "nextcloud") }},
		{"cut short", func(t *testing.T, p string) { truncate(t, p, 0.5, 0) }},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir, _ := backupImage(t)
			writeFile(t, filepath.Join(dir, DBName), []byte("not a bbolt file, long enough to be looked at"))
			c.damage(t, filepath.Join(dir, BackupName))
			_, st, logged := openLogged(t, dir)
			if !st.Fresh || !strings.Contains(st.Recovered, "backup unusable") ||
				!strings.Contains(st.Recovered, "started with no leases") || strings.Contains(st.Recovered, "restored") {
				t.Fatalf("Fresh = %v, Recovered = %q; want the backup reported unusable, an empty start", st.Fresh, st.Recovered)
			}
			if st.Stream != nil || st.Leases != nil {
				t.Fatalf("Stream set %v, %d leases: want none from a damaged backup", st.Stream != nil, len(st.Leases))
			}
			if logged != int64(0) {
				t.Errorf("\"state recovery\" logs leases=%v, want 0", logged)
			}
			aside, _ := filepath.Glob(filepath.Join(dir, BackupName+".corrupt-*"))
			if len(aside) != 1 {
				t.Fatalf("backup moved aside: %v", aside)
			}
		})
	}
}

// flipIn changes the first octet of what in the file at path.
func flipIn(t *testing.T, path, what string) {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	at := strings.Index(string(data), what)
	if at < 0 {
		t.Fatalf("%q not in %s", what, path)
	}
	data[at] ^= 0x20
	writeFile(t, path, data)
}

// TestLeasesLaterReadOnly: a read-only directory's state comes through
// State.Stream, one lease at a time (State.Leases nil), with the log
// applied on top as Open read it; still after a write refused while the
// directory is read-only (the read-only handle is opened again), and
// after the directory became writable and a write opened the file for
// writing (the read-only handle's lock must be let go first, or that
// open waits out the lock timeout and fails). Before, the leases came
// all decoded at once in State.Leases.
func TestLeasesLaterReadOnly(t *testing.T) {
	img, want := laterImage(t, 0)
	dir := crashImage(t, img)
	writable := bindReadOnly(t, dir)
	s, st, logged := openLogged(t, dir)
	if st.Fresh || !strings.Contains(st.Recovered, "read-only") {
		t.Fatalf("Fresh = %v, Recovered = %q", st.Fresh, st.Recovered)
	}
	if logged != int64(len(want)) {
		t.Errorf("\"state recovery\" logs leases=%v, want %d", logged, len(want))
	}
	wantLeases(t, streamOneAtATime(t, st), want)
	if err := s.ResetEpoch(time.Now()); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("ResetEpoch on a read-only directory = %v, want ErrUnavailable", err)
	}
	wantLeases(t, streamOneAtATime(t, st), want)
	writable()
	if err := s.Touch(time.Now()); err != nil {
		t.Fatalf("Touch once writable: %v", err)
	}
	wantLeases(t, streamOneAtATime(t, st), want)
	if err := s.Commit([]Lease{leaseN(70)}, nil); err != nil {
		t.Fatal(err)
	}
	if err := st.Stream(func(*Lease) error { return nil }); err == nil || !strings.Contains(err.Error(), "after a commit") {
		t.Fatalf("Stream after a commit = %v, want a refusal", err)
	}
	_, st = reopen(t, s)
	wantLeases(t, st.Leases, append(want, leaseN(70)))
}

// TestStreamSkipsQuarantines: a State.Stream pass reads leases only; the
// quarantines were read (and any damage reported) by Open. Before, every
// pass decoded them again and threw them away.
func TestStreamSkipsQuarantines(t *testing.T) {
	img, _ := laterImage(t, 0)
	s, _ := openT(t, crashImage(t, img), WithoutOpenSnapshot())
	if err := s.CommitQuar(nil, nil, &QuarChange{Put: []Quarantine{quarN(1), quarN(2)}}); err != nil {
		t.Fatal(err)
	}
	dir := s.Dir()
	s.Close()
	calls := 0
	orig := readQuar
	readQuar = func(tx *bolt.Tx, ov *overlay, in interner) ([]Quarantine, string) {
		calls++
		return orig(tx, ov, in)
	}
	t.Cleanup(func() { readQuar = orig })
	_, st := openT(t, dir, WithLeasesLater(), WithoutOpenSnapshot())
	if len(st.Quarantines) != 2 || calls != 1 {
		t.Fatalf("Open: %d quarantines, %d reads; want 2, 1", len(st.Quarantines), calls)
	}
	streamAll(t, st)
	streamAll(t, st)
	if calls != 1 {
		t.Fatalf("quarantines read %d times after two Stream passes, want once (Open)", calls)
	}
}

// TestBackupKeptOnFullDisk: a backup copy that can not be restored for
// want of space (the copy to leases.db.tmp fails with ENOSPC) is not
// damaged: Open fails, the copy stays where it is, and the next Open,
// with space back, restores it. Before, the copy was moved aside as
// "backup unusable (… no space left on device)" and the next Open, with
// no state file and no copy, started with no leases.
func TestBackupKeptOnFullDisk(t *testing.T) {
	dir := fullDiskWithBackupOnly(t)
	if s, _, err := Open(dir, testLog(t), WithLeasesLater()); err == nil {
		s.Close()
		t.Fatal("Open restored the backup on a full disk: nothing to test")
	}
	if _, err := os.Stat(filepath.Join(dir, BackupName)); err != nil {
		t.Fatalf("backup copy after a full-disk Open: %v (moved aside as damaged?)", err)
	}
	if err := os.Remove(filepath.Join(dir, "fill")); err != nil {
		t.Fatal(err)
	}
	_, st := openT(t, dir, WithLeasesLater())
	if !strings.Contains(st.Recovered, "restored 3000 leases from backup") {
		t.Fatalf("with space back: Recovered = %q, want the backup's 3000 leases", st.Recovered)
	}
	wantLeases(t, streamOneAtATime(t, st), leasesN(0, 3000))
}

// fullDiskWithBackupOnly leaves a state directory on a full 8 MiB tmpfs
// whose state file is garbage and whose backup copy holds 3 000 leases:
// restoring the copy needs space there is not.
func fullDiskWithBackupOnly(t *testing.T) string {
	t.Helper()
	dir := tmpfs.Mount(t, "8m")
	s, _ := openT(t, dir, WithoutOpenSnapshot())
	if err := s.Commit(leasesN(0, 3000), nil); err != nil {
		t.Fatal(err)
	}
	if err := s.Snapshot(); err != nil {
		t.Fatal(err)
	}
	s.Close()
	writeFile(t, filepath.Join(dir, DBName), []byte("not a bbolt file, long enough to be looked at"))
	tmpfs.Fill(t, dir, "fill")
	return dir
}
