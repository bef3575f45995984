package server

import (
	"testing"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
)

// TestEndConntrackWaitsForSettle (review h/revlife): Serve's end
// (endConntrack) waits for the settle after the last walk (the flowed6
// prune, pruneAfterWalk: two holds of s.mu and a transaction) as it waits
// for the walk, within the same ctEndWait; the caller closes the firewall
// once Serve returns. The settle here waits for endConntrack's return:
// with the wait, endConntrack gives up at ctEndWait and says so; before,
// it returned as the walk's waiters were released, the settle still to
// run ('endConntrack returned while the settle after the last walk ran').
func TestEndConntrackWaitsForSettle(t *testing.T) {
	core, logs := observer.New(zap.WarnLevel)
	s := &Server{log: zap.New(core)}
	ended := make(chan struct{})
	settled := make(chan struct{})
	s.ct = ctFlusher{gap: -1,
		walk: func(fs []ctFilter) ([]ctFilter, error) { return nil, nil },
		settle: func() {
			defer close(settled)
			<-ended // released by endConntrack's return, however it comes
		},
	}
	s.ct.add([]ctFilter{{t: ctTarget{port: 1}}})
	s.endConntrack()
	close(ended)
	<-settled
	if logs.FilterMessageSnippet("still running at shutdown").Len() == 0 {
		t.Error("endConntrack returned while the settle after the last walk ran (no 'still running at shutdown' warning)")
	}
}
