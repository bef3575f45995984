package store

import (
	"context"
	"errors"
	"testing"

	"go.uber.org/zap"
)

// TestOpenStopsFreshDir (review h/revops): Open of a new state directory
// whose context ends after it created the state file (createEmpty: no
// epoch on record) and before it returned: the next Open is to take the
// directory as new (Fresh, nothing recovered), not report a recovery
// ("epoch reset still pending from an earlier run", logged as an error
// at every such start).
func TestOpenStopsFreshDir(t *testing.T) {
	for limit := int64(2); limit <= 6; limit++ {
		dir := t.TempDir()
		ctx := &countdown{Context: context.Background()}
		ctx.limit.Store(limit)
		s, _, err := Open(dir, zap.NewNop(), WithLeasesLater(), WithContext(ctx))
		if err == nil {
			s.Close()
			continue
		}
		if !errors.Is(err, ErrOpenStopped) {
			t.Fatalf("look %d: Open: %v", limit, err)
		}
		s, st, err := Open(dir, zap.NewNop(), WithLeasesLater())
		if err != nil {
			t.Fatalf("look %d: Open after the stop: %v", limit, err)
		}
		s.Close()
		t.Logf("stopped at look %d; next Open: fresh %v, recovered %q", limit, st.Fresh, st.Recovered)
		if !st.Fresh || st.Recovered != "" {
			t.Errorf("stopped at look %d of a new directory's Open; next Open: fresh %v, recovered %q; want a new directory (fresh, nothing recovered)",
				limit, st.Fresh, st.Recovered)
		}
	}
}
