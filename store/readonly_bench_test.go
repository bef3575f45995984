package store

import (
	"errors"
	"fmt"
	"testing"
	"time"

	"go.uber.org/zap"
)

// BenchmarkRefusedWriteReadOnly: one Commit of one lease to a store whose
// state directory is read-only (root: a read-only bind mount), refused
// with ErrUnavailable; per refused write. leasesLater is pcpd's Open
// (WithLeasesLater: the read-only handle is kept for State.Stream);
// plain, without it.
func BenchmarkRefusedWriteReadOnly(b *testing.B) {
	for _, n := range []int{50, 100000} {
		for _, later := range []bool{true, false} {
			name := fmt.Sprintf("leases=%d/plain", n)
			if later {
				name = fmt.Sprintf("leases=%d/leasesLater", n)
			}
			b.Run(name, func(b *testing.B) {
				dir := b.TempDir()
				s, _, err := Open(dir, zap.NewNop(), WithoutOpenSnapshot())
				if err != nil {
					b.Fatal(err)
				}
				if err := s.ResetEpoch(time.Now()); err != nil {
					b.Fatal(err)
				}
				for i := 0; i < n; i += 10000 {
					if err := s.Commit(leasesN(i, min(i+10000, n)), nil); err != nil {
						b.Fatal(err)
					}
				}
				s.Close()
				bindReadOnly(b, dir)
				opts := []Option{WithoutOpenSnapshot()}
				if later {
					opts = append(opts, WithLeasesLater())
				}
				s, _, err = Open(dir, zap.NewNop(), opts...)
				if err != nil {
					b.Fatal(err)
				}
				defer s.Close()
				put := []Lease{leaseN(n + 1)}
				b.ReportAllocs()
				b.ResetTimer()
				for range b.N {
					if err := s.Commit(put, nil); !errors.Is(err, ErrUnavailable) {
						b.Fatalf("Commit on a read-only directory = %v, want ErrUnavailable", err)
					}
				}
			})
		}
	}
}
