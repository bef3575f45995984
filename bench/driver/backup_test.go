package main

import (
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/pcpd/pcpd/store"
)

// TestDamageStateFileRestoresBackup: what the rssbig-backup-peak row
// does to the state directory makes the next Open restore the backup
// copy's leases (not start empty, not open the file as it is).
func TestDamageStateFileRestoresBackup(t *testing.T) {
	dir := t.TempDir()
	s, _, err := store.Open(dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	a := netip.MustParseAddr("2001:db8::10")
	l := store.Lease{Key: store.Key{Owner: "load", Protocol: 6, InternalAddr: a, InternalPort: 80},
		Kind: store.KindMap, ExternalAddr: a, ExternalPort: 80,
		ClientAddr: netip.AddrPortFrom(a, 5350), ServerAddr: netip.MustParseAddrPort("[2001:db8::1]:5351"),
		Created: time.Now(), Expires: time.Now().Add(time.Hour)}
	if err := s.Commit([]store.Lease{l}, nil); err != nil {
		t.Fatal(err)
	}
	if err := s.Snapshot(); err != nil {
		t.Fatal(err)
	}
	s.Close()
	if err := damageStateFile(dir); err != nil {
		t.Fatal(err)
	}
	s, st, err := store.Open(dir, nil, store.WithLeasesLater())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if !strings.Contains(st.Recovered, "restored 1 leases from backup") {
		t.Fatalf("after damageStateFile: Recovered = %q, want the backup's lease restored", st.Recovered)
	}
	if err := damageStateFile(t.TempDir()); err == nil {
		t.Fatal("damageStateFile of a directory without a state file: no error")
	}
}

// TestTablePeakRows: the three VmHWM rows of a restart at the big lease
// count are judged against the ≤ 400 MB target each.
func TestTablePeakRows(t *testing.T) {
	b := &bench{res: results{"pcpd": {
		"rssbig-restart-peak":  {value: 251, unit: "MB"},
		"rssbig-backup-peak":   {value: 498, unit: "MB"},
		"rssbig-readonly-peak": {value: 399, unit: "MB"},
	}}}
	md := markdown(b.tableRows())
	for _, want := range []string{
		"| peak RSS during that restart (VmHWM) | – | – | 251 MB | – |  |  |  | ≤ 400 MB | yes |",
		"| peak RSS during a start from the backup copy (state file damaged; VmHWM) | – | – | 498 MB | – |  |  |  | ≤ 400 MB | **no** |",
		"| peak RSS during a start on a read-only state directory (VmHWM) | – | – | 399 MB | – |  |  |  | ≤ 400 MB | yes |",
	} {
		if !strings.Contains(md, want+"\n") {
			t.Errorf("table lacks\n%s\ntable:\n%s", want, md)
		}
	}
}

// TestMountReadOnly: the rssbig-readonly-peak row's mount makes the state
// directory read-only as the store sees it (Open says so, a commit fails)
// and undo makes it writable again.
func TestMountReadOnly(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root (bind mount)")
	}
	dir := t.TempDir()
	s, _, err := store.Open(dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
	undo, err := mountReadOnly(dir)
	if err != nil {
		t.Fatal(err)
	}
	s, st, err := store.Open(dir, nil)
	if err != nil {
		undo()
		t.Fatal(err)
	}
	s.Close()
	werr := os.WriteFile(filepath.Join(dir, "probe"), nil, 0o600)
	undo()
	if !strings.Contains(st.Recovered, "read-only") || !errors.Is(werr, syscall.EROFS) {
		t.Fatalf("under mountReadOnly: Recovered %q, write %v; want read-only, EROFS", st.Recovered, werr)
	}
	if err := os.WriteFile(filepath.Join(dir, "probe"), nil, 0o600); err != nil {
		t.Fatalf("after undo: %v", err)
	}
}

// TestWipeStateDirUnmountsReadOnly (review h/revbk): a driver killed
// during the rssbig-readonly-peak row (timeout, ^C) leaves the state
// directory bind-mounted read-only; the next run's fresh start must
// still begin with an empty, writable directory. Before, RemoveAll failed
// unseen (EROFS) and that "fresh" pcpd read the old state.
func TestWipeStateDirUnmountsReadOnly(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root (bind mount)")
	}
	dir := filepath.Join(t.TempDir(), "pcpd-state")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, store.DBName), []byte("old state"), 0o600); err != nil {
		t.Fatal(err)
	}
	for range 2 { // twice: a leftover of two killed runs
		if _, err := mountReadOnly(dir); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() {
		for syscall.Unmount(dir, syscall.MNT_DETACH) == nil {
		}
	})
	err := wipeStateDir(dir)
	if _, serr := os.Stat(filepath.Join(dir, store.DBName)); err != nil || !errors.Is(serr, os.ErrNotExist) {
		t.Fatalf("wipeStateDir = %v; old state file after it: %v (want gone)", err, serr)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "probe"), nil, 0o600); err != nil {
		t.Fatalf("state directory after wipeStateDir: %v", err)
	}
}

// TestCheckStart (review h/revbk): the backup and read-only rows measure
// a start that holds the leases of the state they are about: all of
// them (a stale or missing copy, an empty start, would peak low and pass
// the target), and for the backup row, from the copy (the damaged file
// moved aside, not opened as it is).
func TestCheckStart(t *testing.T) {
	dir := t.TempDir()
	aside := t.TempDir()
	if err := os.WriteFile(filepath.Join(aside, store.DBName+".corrupt-20261205T050000.000000000Z"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name      string
		dir       string
		got, want int
		restored  bool
		ok        bool
	}{
		{"all leases, read-only", dir, 1000, 1000, false, true},
		{"all leases, restored", aside, 1000, 1000, true, true},
		{"empty start", aside, 0, 1000, true, false},
		{"stale copy", aside, 500, 1000, true, false},
		{"not a restore", dir, 1000, 1000, true, false},
	} {
		if err := checkStart(c.name, c.dir, c.got, c.want, c.restored); (err == nil) != c.ok {
			t.Errorf("%s: checkStart = %v, want ok %v", c.name, err, c.ok)
		}
	}
}
