package server

import (
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
// recovery. Not zap's sampler (Server.plog's): it counts its window on
// the entry's wall-clock time, so a step back (the very event that starts
// the rewrite; a second one while the store still fails) silenced the
// warning for as long as the step, and it neither reports what it dropped
// nor knows when the failure ends. Times here are the steady clock's
// (Server.steady), which no step moves. Its user serialises calls (s.mu).
type repeatWarn struct {
	since  time.Time // the failure's first; zero: no failure
	logged time.Time // the last line's
	fails  int       // failures since since
	quiet  int       // failures since the last line, not logged
}

// warn records a failure at now and logs msg with fields unless a line
// was logged less than repeatEvery ago.
func (w *repeatWarn) warn(log *zap.Logger, now time.Time, msg string, fields ...zap.Field) {
	w.fails++
	if w.since.IsZero() {
		w.since = now
	} else if now.Sub(w.logged) < repeatEvery {
		w.quiet++
		return
	}
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
