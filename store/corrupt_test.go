package store

import (
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// corruptFixture leaves dir with a backup holding leases 0..300 and a state
// file holding 0..400 and an epoch origin, closed cleanly.
func corruptFixture(t *testing.T) string {
	t.Helper()
	return stateFixture(t, nil, nil)
}

// stateFixture is corruptFixture with the quarantines q1 stored with
// leases 0..300 (in the backup too) and q2 with 300..400 (none: no
// quarantine written).
func stateFixture(t *testing.T, q1, q2 []Quarantine) string {
	t.Helper()
	dir := t.TempDir()
	s, _ := openT(t, dir, fixedClock(t0))
	commit := func(ls []Lease, qs []Quarantine) {
		t.Helper()
		var qc *QuarChange // Commit's
		if qs != nil {
			qc = &QuarChange{Put: qs}
		}
		if err := s.CommitQuar(ls, nil, qc); err != nil {
			t.Fatal(err)
		}
	}
	commit(leasesN(0, 300), q1)
	if err := s.ResetEpoch(t0); err != nil {
		t.Fatal(err)
	}
	// backup = 0..300. Taken synchronously: Open's own snapshot runs in
	// the background and could otherwise copy the file after the next
	// commit (a race seen once in CI: "restored 400 leases").
	s, _ = reopen(t, s, fixedClock(t0), WithoutOpenSnapshot())
	if err := s.Snapshot(); err != nil {
		t.Fatal(err)
	}
	commit(leasesN(300, 400), q2)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	return dir
}

// readStateFiles reads dir's state file and its backup.
func readStateFiles(t *testing.T, dir string) (orig, bak []byte) {
	t.Helper()
	orig, err := os.ReadFile(filepath.Join(dir, DBName))
	if err != nil {
		t.Fatal(err)
	}
	bak, err = os.ReadFile(filepath.Join(dir, BackupName))
	if err != nil {
		t.Fatal(err)
	}
	return orig, bak
}

// copyLog copies the log segments of dir to nd: a state file's walgen
// says which segments it still needs, and without them Open would rightly
// refuse to claim continuity.
func copyLog(t testing.TB, dir, nd string) {
	t.Helper()
	for i := range 2 {
		if err := copyFile(filepath.Join(dir, segName(i)), filepath.Join(nd, segName(i))); err != nil {
			t.Fatal(err)
		}
	}
}

func garbage(n int, seed uint64) []byte {
	r := rand.New(rand.NewPCG(seed, 1))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

func writeFile(t *testing.T, path string, b []byte) {
	t.Helper()
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

func truncate(t *testing.T, path string, frac float64, abs int64) {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	n := int64(float64(fi.Size()) * frac)
	if abs >= 0 {
		n = abs
	}
	if err := os.Truncate(path, n); err != nil {
		t.Fatal(err)
	}
}

func asideFiles(t *testing.T, dir, prefix string) []string {
	t.Helper()
	m, err := filepath.Glob(filepath.Join(dir, prefix+".corrupt-*"))
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// TestANN03Corruption: a truncated, garbled, empty or missing state file is
// never read as "no leases, epoch continues": Open restores the backup or
// starts empty, says so, keeps the broken file for inspection, and asks
// for an epoch reset (ANN-03, EPO-03; issue 9 "state file truncated or
// corrupted").
func TestANN03Corruption(t *testing.T) {
	type outcome int
	const (
		fromBackup outcome = iota
		empty
	)
	tests := []struct {
		name        string
		damage      func(t *testing.T, dir string)
		want        outcome
		mainAside   bool
		backupAside bool
		recovered   string
	}{
		{name: "truncated to half", damage: func(t *testing.T, dir string) { truncate(t, filepath.Join(dir, DBName), 0.5, -1) },
			want: fromBackup, mainAside: true, recovered: "restored 300 leases"},
		{name: "truncated to 100 octets", damage: func(t *testing.T, dir string) { truncate(t, filepath.Join(dir, DBName), 0, 100) },
			want: fromBackup, mainAside: true, recovered: "restored 300 leases"},
		{name: "zero length", damage: func(t *testing.T, dir string) { truncate(t, filepath.Join(dir, DBName), 0, 0) },
			want: fromBackup, mainAside: true, recovered: "is empty"},
		{name: "garbage", damage: func(t *testing.T, dir string) {
			fi, _ := os.Stat(filepath.Join(dir, DBName))
			writeFile(t, filepath.Join(dir, DBName), garbage(int(fi.Size()), 1))
		}, want: fromBackup, mainAside: true, recovered: "restored 300 leases"},
		{name: "both meta pages garbage", damage: func(t *testing.T, dir string) {
			f, _ := os.OpenFile(filepath.Join(dir, DBName), os.O_RDWR, 0)
			f.WriteAt(garbage(8192, 2), 0)
			f.Close()
		}, want: fromBackup, mainAside: true, recovered: "restored 300 leases"},
		{name: "data pages garbage", damage: func(t *testing.T, dir string) {
			fi, _ := os.Stat(filepath.Join(dir, DBName))
			f, _ := os.OpenFile(filepath.Join(dir, DBName), os.O_RDWR, 0)
			f.WriteAt(garbage(int(fi.Size())-8192, 3), 8192)
			f.Close()
		}, want: fromBackup, mainAside: true, recovered: "restored 300 leases"},
		{name: "missing", damage: func(t *testing.T, dir string) { os.Remove(filepath.Join(dir, DBName)) },
			want: fromBackup, recovered: "missing"},
		{name: "a directory in its place", damage: func(t *testing.T, dir string) {
			os.Remove(filepath.Join(dir, DBName))
			os.Mkdir(filepath.Join(dir, DBName), 0o700)
		}, want: fromBackup, mainAside: true, recovered: "restored 300 leases"},
		{name: "truncated, backup garbage", damage: func(t *testing.T, dir string) {
			truncate(t, filepath.Join(dir, DBName), 0.5, -1)
			writeFile(t, filepath.Join(dir, BackupName), garbage(40000, 4))
		}, want: empty, mainAside: true, backupAside: true, recovered: "backup unusable"},
		{name: "truncated, backup empty", damage: func(t *testing.T, dir string) {
			truncate(t, filepath.Join(dir, DBName), 0.5, -1)
			truncate(t, filepath.Join(dir, BackupName), 0, 0)
		}, want: empty, mainAside: true, backupAside: true, recovered: "started with no leases"},
		{name: "truncated, no backup", damage: func(t *testing.T, dir string) {
			truncate(t, filepath.Join(dir, DBName), 0.5, -1)
			os.Remove(filepath.Join(dir, BackupName))
		}, want: empty, mainAside: true, recovered: "no backup copy"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := corruptFixture(t)
			tt.damage(t, dir)
			s, st := openT(t, dir, fixedClock(t0.Add(time.Minute)))
			if !st.Fresh || !st.EpochOrigin.IsZero() {
				t.Fatalf("Fresh = %v, EpochOrigin = %v: continuity claimed after damage", st.Fresh, st.EpochOrigin)
			}
			if !strings.Contains(st.Recovered, tt.recovered) {
				t.Fatalf("Recovered = %q, want it to mention %q", st.Recovered, tt.recovered)
			}
			switch tt.want {
			case fromBackup:
				wantLeases(t, st.Leases, leasesN(0, 300))
			case empty:
				wantLeases(t, st.Leases, nil)
			}
			if got := len(asideFiles(t, dir, DBName)); (got == 1) != tt.mainAside {
				t.Errorf("%d state files moved aside, want aside = %v", got, tt.mainAside)
			}
			if got := len(asideFiles(t, dir, BackupName)); (got == 1) != tt.backupAside {
				t.Errorf("%d backups moved aside, want aside = %v", got, tt.backupAside)
			}
			// The repaired store works, the reset stays pending until the
			// engine does it, and then continuity holds again.
			if err := s.Commit([]Lease{leaseN(1000)}, nil); err != nil {
				t.Fatalf("Commit after recovery: %v", err)
			}
			s, st = reopen(t, s, fixedClock(t0.Add(2*time.Minute)))
			if !st.Fresh || !strings.Contains(st.Recovered, "pending") {
				t.Fatalf("second start before ResetEpoch: Fresh = %v, Recovered = %q", st.Fresh, st.Recovered)
			}
			if err := s.ResetEpoch(t0.Add(2 * time.Minute)); err != nil {
				t.Fatal(err)
			}
			_, st = reopen(t, s, fixedClock(t0.Add(3*time.Minute)))
			if st.Fresh || st.Recovered != "" {
				t.Fatalf("after ResetEpoch: Fresh = %v, Recovered = %q", st.Fresh, st.Recovered)
			}
		})
	}
}

// TestANN03PageSweep damages each page of a state file in turn, three ways,
// and checks the one property that matters: Open never claims continuity
// (Fresh == false) unless it returns exactly the leases that were stored;
// whenever it does not, it says why. No damage may crash the process.
func TestANN03PageSweep(t *testing.T) {
	dir := corruptFixture(t)
	orig, bak := readStateFiles(t, dir)
	const ps = 4096
	pages := len(orig) / ps
	damages := []struct {
		name string
		fn   func(page []byte, seed uint64)
	}{
		{"garbage", func(p []byte, seed uint64) { copy(p, garbage(len(p), seed)) }},
		{"zeroed", func(p []byte, _ uint64) { clear(p) }},
		{"bit flip", func(p []byte, seed uint64) { p[int(seed*7919)%len(p)] ^= 1 << (seed % 8) }},
		{"header bit flip", func(p []byte, seed uint64) { p[int(seed)%16] ^= 1 << (seed % 8) }},
		{"count bit flip", func(p []byte, seed uint64) { p[10+int(seed)%2] ^= 1 << (seed % 8) }},
		{"overflow bit flip", func(p []byte, seed uint64) { p[12+int(seed)%4] ^= 1 << (seed % 8) }},
		{"element bit flip", func(p []byte, seed uint64) { p[16+int(seed*31)%256] ^= 1 << (seed % 8) }},
		{"element bit flip 2", func(p []byte, seed uint64) { p[16+int(seed*17+5)%256] ^= 1 << ((seed + 3) % 8) }},
	}
	var fresh, intact int
	for pg := range pages {
		for di, d := range damages {
			buf := append([]byte(nil), orig...)
			d.fn(buf[pg*ps:(pg+1)*ps], uint64(pg*10+di+1))
			nd := t.TempDir()
			writeFile(t, filepath.Join(nd, DBName), buf)
			writeFile(t, filepath.Join(nd, BackupName), bak)
			copyLog(t, dir, nd)
			s, st, err := Open(nd, nil, fixedClock(t0.Add(time.Minute)), WithoutOpenSnapshot())
			if err != nil {
				t.Fatalf("page %d %s: Open: %v", pg, d.name, err)
			}
			if !st.Fresh {
				intact++
				if st.Recovered != "" {
					t.Errorf("page %d %s: not Fresh but Recovered = %q", pg, d.name, st.Recovered)
				}
				if len(st.Leases) != 400 {
					t.Fatalf("page %d %s: continuity claimed with %d leases, stored 400", pg, d.name, len(st.Leases))
				}
				wantLeases(t, st.Leases, leasesN(0, 400))
			} else {
				fresh++
				if st.Recovered == "" {
					t.Errorf("page %d %s: Fresh without saying why", pg, d.name)
				}
			}
			s.Close()
		}
	}
	t.Logf("%d pages × %d damages: %d detected (epoch reset), %d harmless (free or unused space)", pages, len(damages), fresh, intact)
	if fresh == 0 {
		t.Fatal("no damage detected at all")
	}
}

// TestANN03DamagedMetaPage: bbolt silently falls back to the older meta
// page when the newer one is damaged, losing the last transaction. Open
// notices either meta page failing its checksum and resets the epoch, but
// keeps the (consistent) leases instead of going back to the backup. The
// last transaction was a checkpoint (Close folds the log), and the log
// segment it folded is still there and not yet stale for the older meta
// page's state, so the replay brings those changes back: all 400 leases
// either way.
func TestANN03DamagedMetaPage(t *testing.T) {
	txids := map[uint64]bool{}
	for _, page := range []int64{0, 1} {
		dir := corruptFixture(t) // last transaction: 300 → 400 leases
		f, err := os.OpenFile(filepath.Join(dir, DBName), os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		// Inside the meta (after the 16-octet page header): txid's octets.
		var txid [8]byte
		if _, err := f.ReadAt(txid[:], page*4096+16+48); err != nil {
			t.Fatal(err)
		}
		txids[ne.Uint64(txid[:])] = true
		if _, err := f.WriteAt([]byte{0xde, 0xad}, page*4096+16+48); err != nil {
			t.Fatal(err)
		}
		f.Close()
		s, st := openT(t, dir, fixedClock(t0.Add(time.Minute)))
		if !st.Fresh || !strings.Contains(st.Recovered, fmt.Sprintf("meta page %d", page)) {
			t.Fatalf("meta page %d damaged: Fresh = %v, Recovered = %q", page, st.Fresh, st.Recovered)
		}
		if len(asideFiles(t, dir, DBName)) != 0 {
			t.Fatal("state file moved aside for a damaged meta page")
		}
		wantLeases(t, st.Leases, leasesN(0, 400))
		// The next transaction rewrites the damaged page.
		if err := s.Commit([]Lease{leaseN(5000)}, nil); err != nil {
			t.Fatal(err)
		}
		if err := s.Commit([]Lease{leaseN(5001)}, nil); err != nil {
			t.Fatal(err)
		}
		_, st = reopen(t, s, fixedClock(t0.Add(2*time.Minute)))
		if !st.Fresh || strings.Contains(st.Recovered, "meta page") {
			t.Fatalf("after two commits: Fresh = %v, Recovered = %q", st.Fresh, st.Recovered)
		}
	}
	if len(txids) != 2 {
		t.Fatalf("meta page txids %v: expected one damage to hit the newer and one the older meta page", txids)
	}
}

// TestANN03RandomDamage: several random octets changed at once, anywhere in
// the file, a few hundred times (fixed seed): the same property as the page
// sweep, and no crash or hang.
func TestANN03RandomDamage(t *testing.T) {
	dir := corruptFixture(t)
	orig, bak := readStateFiles(t, dir)
	iterations := 300
	if testing.Short() {
		iterations = 50
	}
	r := rand.New(rand.NewPCG(6887, 14))
	var fresh int
	for it := range iterations {
		buf := append([]byte(nil), orig...)
		for range 1 + r.IntN(8) {
			buf[r.IntN(len(buf))] = byte(r.Uint32())
		}
		nd := t.TempDir()
		writeFile(t, filepath.Join(nd, DBName), buf)
		writeFile(t, filepath.Join(nd, BackupName), bak)
		copyLog(t, dir, nd)
		s, st, err := Open(nd, nil, fixedClock(t0.Add(time.Minute)), WithoutOpenSnapshot())
		if err != nil {
			t.Fatalf("iteration %d: Open: %v", it, err)
		}
		if st.Fresh {
			fresh++
			if st.Recovered == "" {
				t.Errorf("iteration %d: Fresh without saying why", it)
			}
		} else {
			if st.Recovered != "" || len(st.Leases) != 400 {
				t.Fatalf("iteration %d: continuity claimed with %d leases, Recovered %q", it, len(st.Leases), st.Recovered)
			}
			wantLeases(t, st.Leases, leasesN(0, 400))
		}
		s.Close()
	}
	t.Logf("%d damaged files: %d detected, %d harmless", iterations, fresh, iterations-fresh)
}
