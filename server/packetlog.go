package server

import (
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// The per-packet logger's sampling (Server.plog): in each second, the
// first packetLogFirst lines of a message, then every packetLogThereafter-th.
const (
	packetLogFirst      = 20
	packetLogThereafter = 1000
)

// packetLogger returns log with zap's sampler (per-packet lines: senders
// decide how much gets logged), its one-second windows timed on steady,
// which no wall-clock step moves. zap's sampler times them on each entry's
// own time, the wall clock's: after a step back its window's end lay as far
// ahead as the step, so for that long (an hour, for a step of an hour) it
// logged only every 1000th line of each message (h/storeq). The entries
// still carry the wall time, read by wall (zap's own clock: time.Now) once
// the sampler has let them through.
func packetLogger(log *zap.Logger, steady, wall func() time.Time) *zap.Logger {
	return log.WithOptions(zap.WrapCore(func(c zapcore.Core) zapcore.Core {
		sampled := zapcore.NewSamplerWithOptions(timedCore{c, wall}, time.Second, packetLogFirst, packetLogThereafter)
		return timedCore{sampled, steady}
	}))
}

// timedCore is a Core whose entries' Time is at's reading when checked.
type timedCore struct {
	zapcore.Core
	at func() time.Time
}

func (c timedCore) With(fs []zapcore.Field) zapcore.Core { return timedCore{c.Core.With(fs), c.at} }

func (c timedCore) Check(e zapcore.Entry, ce *zapcore.CheckedEntry) *zapcore.CheckedEntry {
	e.Time = c.at()
	return c.Core.Check(e, ce)
}
