package server

import (
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/store"
)

// errStore is a store whose commits fail with the error err holds (nil:
// they go through): the engine's store with its disk gone, say; the
// epoch origin goes through.
type errStore struct {
	*store.Store
	err atomic.Pointer[error]
}

// errInjected is a store failure a test injects (errStore.set).
var errInjected = errors.New("injected store failure")

func (f *errStore) set(err error) {
	if err == nil {
		f.err.Store(nil)
		return
	}
	f.err.Store(&err)
}

func (f *errStore) Commit(put []store.Lease, del []store.Key) error {
	return f.CommitQuar(put, del, nil)
}

func (f *errStore) CommitQuar(put []store.Lease, del []store.Key, q *store.QuarChange) error {
	if e := f.err.Load(); e != nil {
		return *e
	}
	return f.Store.CommitQuar(put, del, q)
}

const (
	rewriteRefused = "cannot rewrite leases after a wall-clock step; retrying"
	rewriteBack    = "the store takes the rewrite after the wall-clock step again"
	rewriteDone    = "the rewrite after the wall-clock step is done"
)

// warnings returns the warning entries with message msg.
func warnings(logs *observer.ObservedLogs, msg string) []observer.LoggedEntry {
	var out []observer.LoggedEntry
	for _, e := range logs.FilterMessage(msg).All() {
		if e.Level >= zapcore.WarnLevel {
			out = append(out, e)
		}
	}
	return out
}

// TestRewriteWarnEndsWithRewrite (review h/revstoreq): the rewrite after a
// wall-clock step can end without a commit of its own leases succeeding:
// the leases it was retrying expire while the store refuses (their keys
// owed), and its last step writes the debt back once the store takes
// writes again. On main (7dd74fb) the rewrite's run of refused commits
// (rewriteWarn) then never ended: no line said the failure was over, and
// at the next step the store refusing again was taken for the same run:
// its first warning held back when the old run's last line was less than
// 30 s before (row "ticking": the step 100 s into the leases' 120 s, the
// new step 22 s after that line: no warning), or logged with the old
// run's repeats and failing_for (row "quiet": repeats 1, failing_for
// 2m10.5s).
func TestRewriteWarnEndsWithRewrite(t *testing.T) {
	const tick = 125 * time.Millisecond
	for _, tc := range []struct {
		name string
		// pre: time before the step. ticking: checkClock every tick
		// while the store refuses, until the leases expired; else two
		// ticks, then 130 s at once.
		pre     time.Duration
		ticking bool
	}{
		{"ticking", 100 * time.Second, true},
		{"quiet", 0, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rig := newBootRig(t, "8d1c2a4e-0000-4000-8000-0000000000a1")
			c := rig.c
			h, fst := rig.startErrStore(t)
			for _, port := range []uint16{8080, 8081} {
				h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, port, 0, 120*time.Second, 1)), pcp.Success)
			}
			c.advance(tc.pre)
			c.step(-time.Hour)
			fst.set(errInjected)
			h.logs.TakeAll()
			tickOnce := func() {
				c.advance(tick)
				h.s.expire()
				h.s.checkClock()
			}
			if tc.ticking {
				for len(h.s.Leases()) > 0 {
					tickOnce()
				}
			} else {
				tickOnce()
				tickOnce()
				c.advance(130 * time.Second)
				tickOnce()
			}
			if n := len(h.s.Leases()); n != 0 {
				t.Fatalf("%d leases left, want them expired", n)
			}
			if len(warnings(h.logs, rewriteRefused)) == 0 {
				t.Fatal("no warning of the refused rewrite")
			}
			// The store takes writes again: the debt (the expired leases'
			// deletes) is written, the rewrite done.
			fst.set(nil)
			tickOnce()
			if h.s.rewriteAt != 0 {
				t.Fatal("rewrite not done once the store took writes again")
			}
			ended := len(h.logs.FilterMessage(rewriteBack).All()) + len(h.logs.FilterMessage(rewriteDone).All())
			if ended != 1 {
				t.Errorf("%d lines ending the refused rewrite's run once it was done, want 1", ended)
			}

			// A new lease, a second step, the store refusing again: a new
			// failure, logged at once as a first one.
			h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 8082, 0, 600*time.Second, 1)), pcp.Success)
			h.logs.TakeAll()
			c.step(-time.Hour)
			fst.set(errInjected)
			tickOnce()
			got := warnings(h.logs, rewriteRefused)
			if len(got) != 1 {
				t.Fatalf("%d warnings %q at the first refusal after the second step, want 1", len(got), rewriteRefused)
			}
			if m := got[0].ContextMap(); m["repeats"] != nil || m["failing_for"] != nil {
				t.Errorf("the new failure's first warning carries the old run: repeats %v, failing_for %v", m["repeats"], m["failing_for"])
			}
		})
	}
}

// TestRewriteWarnNewError (review h/revstoreq): a store refusing the
// rewrite with another error than the one already logged (read-only,
// then disk full; or the log damaged) is a failure an operator must see:
// on main (7dd74fb) the rate limit held it back for up to 30 s, and the
// line that came then showed only the latest error. Now each distinct
// error is logged the first time it comes in a run (repeats as before),
// and errors that alternate are not logged again at once (a bounded
// number of distinct errors a run).
func TestRewriteWarnNewError(t *testing.T) {
	const tick = 125 * time.Millisecond
	rig := newBootRig(t, "8d1c2a4e-0000-4000-8000-0000000000a2")
	c := rig.c
	h, fst := rig.startErrStore(t)
	h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 8080, 0, 600*time.Second, 1)), pcp.Success)
	c.step(time.Hour)
	errRO := errors.New("store: reopen leases.db: state not writable: read-only file system")
	errFull := errors.New("store: commit: state not writable: no space left on device")
	h.logs.TakeAll()
	seq := []error{errRO, errRO, errRO, errFull, errFull, errRO, errFull, errRO, errFull}
	for _, e := range seq {
		fst.set(e)
		c.advance(tick)
		h.s.checkClock()
	}
	got := warnings(h.logs, rewriteRefused)
	var errs []string
	for _, e := range got {
		s, _ := e.ContextMap()["error"].(string)
		errs = append(errs, s)
	}
	want := []string{errRO.Error(), errFull.Error()}
	if len(errs) != len(want) {
		t.Fatalf("warnings' errors %q over %d refusals (%v), want %q (each distinct error once, alternation not logged)", errs, len(seq), time.Duration(len(seq))*tick, want)
	}
	for i := range want {
		if errs[i] != want[i] {
			t.Errorf("warning %d: error %q, want %q", i+1, errs[i], want[i])
		}
	}
	if m := got[1].ContextMap(); m["repeats"] != int64(2) {
		t.Errorf("the new error's line: repeats %v, want 2 (the first error's two held back)", m["repeats"])
	}
}
