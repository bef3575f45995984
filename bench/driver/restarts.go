package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/pcpd/pcpd/store"
)

// Restart-only mode (--restarts N, BENCHMARKS.md item 62): the startbig
// row and the backup and read-only rows time one start each, after a
// growth to 1 000 000 leases of a minute or more; comparing two builds
// of pcpd on them takes a whole run a start. Here the state is grown
// once and kept (--prepared DIR: made if it holds no state file, with
// leases of --prepared-lifetime so it stays live for hours), then each
// start gets a fresh copy of it (synced to disk, as the state a stopped
// pcpd leaves behind is), and the builds (--pcpd, then each --pcpd-b)
// alternate: run i starts them in turn, the order reversed every other
// run. A first, untimed start loads the kernel with the pinholes, as at
// the bench's restart (a stopped pcpd leaves them). Each start is timed
// as startbig is: from exec to the first answer to an ANNOUNCE.
// --restart-kind picks the start: normal (startbig), backup (leases.db
// damaged: the copy restored, rssbig-backup-peak) or readonly (the
// state directory bind-mounted read-only, rssbig-readonly-peak).

// restartKinds are the --restart-kind values.
var restartKinds = []string{"normal", "backup", "readonly"}

// preparedFiles are the files of a state directory a start reads.
var preparedFiles = []string{store.DBName, store.DBName + ".bak", "leases.wal.0", "leases.wal.1", "bootclock"}

func (b *bench) runRestarts(ctx context.Context) error {
	if !containsString(restartKinds, b.o.restartKind) {
		return fmt.Errorf("driver: --restart-kind %q: want one of %s", b.o.restartKind, strings.Join(restartKinds, ", "))
	}
	if b.o.prepared == "" {
		return errors.New("driver: --restarts needs --prepared DIR")
	}
	if _, err := os.Stat(filepath.Join(b.o.prepared, store.DBName)); err != nil {
		if err := b.prepare(ctx); err != nil {
			return err
		}
	}
	bins := append([]string{b.o.pcpd}, b.o.pcpdB...)
	pcpdA := b.o.pcpd
	defer func() { b.o.pcpd = pcpdA }()
	// Untimed: the kernel gets the pinholes, as at the bench's restart.
	if _, _, _, err := b.restartOnce(ctx, bins[0], "normal"); err != nil {
		return err
	}
	for i := range b.o.restarts {
		order := bins
		if i%2 == 1 {
			order = make([]string, len(bins))
			for j := range bins {
				order[j] = bins[len(bins)-1-j]
			}
		}
		for _, bin := range order {
			took, peak, n, err := b.restartOnce(ctx, bin, b.o.restartKind)
			if err != nil {
				return err
			}
			line := fmt.Sprintf("restart %d %s %s: %.2f s to serving, peak %.0f MB, %d leases, load %s",
				i+1, b.o.restartKind, bin, took.Seconds(), peak, n, loadAvg())
			b.logf("%s", line)
			fmt.Println(line)
		}
	}
	return nil
}

// restartOnce starts bin on a fresh copy of the prepared state (kind: as
// the start is made) and returns how long until it answered, its VmHWM
// once serving and the leases it serves; it is stopped (SIGTERM) after.
func (b *bench) restartOnce(ctx context.Context, bin, kind string) (time.Duration, float64, int, error) {
	dir := b.pcpdStateDir()
	if err := wipeStateDir(dir); err != nil {
		return 0, 0, 0, err
	}
	if err := copyState(b.o.prepared, dir); err != nil {
		return 0, 0, 0, err
	}
	var undo func()
	switch kind {
	case "backup":
		if err := damageStateFile(dir); err != nil {
			return 0, 0, 0, err
		}
	case "readonly":
		var err error
		if undo, err = mountReadOnly(dir); err != nil {
			return 0, 0, 0, err
		}
		defer undo()
	}
	syscall.Sync()
	b.o.pcpd = bin
	t0 := time.Now()
	p, err := b.startPcpd(false)
	if err != nil {
		return 0, 0, 0, err
	}
	defer p.stop(syscall.SIGTERM)
	if _, err := b.waitServing(5 * time.Minute); err != nil {
		return 0, 0, 0, err
	}
	took := time.Since(t0)
	pp := p.(*proc)
	peak := peakRSSMB(pp.pid())
	n := b.leaseCount()
	if err := checkStart("restart "+kind, dir, n, b.o.bigLeases, kind == "backup"); err != nil {
		return 0, 0, 0, err
	}
	return took, peak, n, nil
}

// prepare grows a fresh pcpd to --big-leases leases of --prepared-lifetime
// and keeps its state directory, as it left it at SIGTERM, in --prepared.
func (b *bench) prepare(ctx context.Context) error {
	p, err := b.startPcpd(true)
	if err != nil {
		return err
	}
	stopped := false
	defer func() {
		if !stopped {
			p.stop(syscall.SIGTERM)
		}
	}()
	if _, err := b.waitServing(30 * time.Second); err != nil {
		return err
	}
	perClient := strconv.Itoa((b.o.bigLeases + b.o.clients - 1) / b.o.clients)
	r, err := b.load(ctx, "pcpd", "prepare", "--mix", "renew=100", "--concurrency", strconv.Itoa(b.o.concurrency), "--count", "1",
		"--prefill", strconv.Itoa(b.o.bigLeases), "--port-base", "1024", "--ports", perClient,
		"--lifetime", b.o.preparedLifetime.String())
	if err != nil {
		return err
	}
	n := b.leaseCount()
	b.logf("prepared: %d leases (%s)", n, lossNote(r.Prefill.Total))
	if n < b.o.bigLeases-b.o.bigLeases/100 {
		return fmt.Errorf("driver: prepare: pcpd holds %d leases, want %d", n, b.o.bigLeases)
	}
	p.stop(syscall.SIGTERM)
	stopped = true
	if err := os.MkdirAll(b.o.prepared, 0o700); err != nil {
		return err
	}
	return copyState(b.pcpdStateDir(), b.o.prepared)
}

// copyState copies the state files of from (those there) into to.
func copyState(from, to string) error {
	if err := os.MkdirAll(to, 0o700); err != nil {
		return err
	}
	for _, f := range preparedFiles {
		src := filepath.Join(from, f)
		if _, err := os.Stat(src); err != nil {
			continue
		}
		if out, err := exec.Command("cp", "--preserve=all", src, filepath.Join(to, f)).CombinedOutput(); err != nil {
			return fmt.Errorf("driver: copy %s: %v: %s", src, err, out)
		}
	}
	return nil
}

// loadAvg is the first field of /proc/loadavg.
func loadAvg() string {
	data, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	return strings.Fields(string(data))[0]
}

func containsString(l []string, s string) bool {
	for _, x := range l {
		if x == s {
			return true
		}
	}
	return false
}
