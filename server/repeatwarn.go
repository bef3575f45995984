package server

import (
	"slices"
	"time"

	"go.uber.org/zap"
)

// repeatEvery is how often a warning that every retry would repeat is
// logged while the failure lasts (repeatWarn). The rewrite after a
// wall-clock step retries at every sweep tick (125 ms): a store that
// refuses writes (disk full, read-only state directory) logged 8 lines a
// second, 28 800 an hour, burying everything else. 30 s is journald's
// rate-limit window (RateLimitIntervalSec's default): an operator
// following the log still sees within half a minute that the failure
// lasts (and the line says for how long and how many retries failed),
// and the count of failed writes is pcpd_store_errors_total.
const repeatEvery = 30 * time.Second

// repeatWarn logs a warning that a retry loop would repeat while a
// failure lasts: the first failure's at once, then at most one every
// repeatEvery, with the number of failures not logged since the last
// line ("repeats") and how long the failure has lasted; end logs the
// recovery. Not zap's sampler: it neither reports what it dropped nor
// knows when the failure ends, and it counts its window on the entry's
// wall-clock time, so a step back (the very event that starts the
// rewrite; a second one while the store still fails) silenced the warning
// for as long as the step (Server.plog's sampler is timed on the steady
// clock for that reason: packetLogger). Times here are the steady clock's
// (Server.steady), which no step moves. Its user serialises calls (s.mu).
//
// A failure whose message and error differ from every one logged in the
// run so far is logged at once all the same (review h/revstoreq: the
// store refusing with "no space left" after "read-only file system", or
// the log damaged, waited up to repeatEvery, and the line then showed the
// latest error only), for the first repeatKinds distinct ones of a run:
// errors that alternate, or whose text varies, are not logged at every
// retry again.
type repeatWarn struct {
	since  time.Time // the failure's first; zero: no failure
	logged time.Time // the last line's
	fails  int       // failures since since
	quiet  int       // failures since the last line, not logged
	seen   []string  // the run's distinct failures (message and error), at most repeatKinds
}

// repeatKinds is how many distinct failures a run logs at once.
const repeatKinds = 8

// warn records a failure (err) at now and logs msg with err and fields
// unless a line was logged less than repeatEvery ago and the failure is
// not a new one of the run.
func (w *repeatWarn) warn(log *zap.Logger, now time.Time, msg string, err error, fields ...zap.Field) {
	w.fails++
	key := msg
	if err != nil {
		key += ": " + err.Error()
	}
	fresh := !slices.Contains(w.seen, key) && len(w.seen) < repeatKinds
	if fresh {
		w.seen = append(w.seen, key)
	}
	if w.since.IsZero() {
		w.since = now
	} else if !fresh && now.Sub(w.logged) < repeatEvery {
		w.quiet++
		return
	}
	fields = append(fields, zap.Error(err))
	if w.quiet > 0 {
		fields = append(fields, zap.Int("repeats", w.quiet), zap.Duration("failing_for", now.Sub(w.since)))
	}
	log.Warn(msg, fields...)
	w.logged, w.quiet = now, 0
}

// failing reports whether a failure is recorded and not ended.
func (w *repeatWarn) failing() bool { return !w.since.IsZero() }

// end ends the failure, if any: logs msg at info level with the number
// of failures and how long they lasted.
func (w *repeatWarn) end(log *zap.Logger, now time.Time, msg string, fields ...zap.Field) {
	if !w.failing() {
		return
	}
	log.Info(msg, append(fields, zap.Int("failures", w.fails), zap.Duration("failed_for", now.Sub(w.since)))...)
	*w = repeatWarn{}
}
