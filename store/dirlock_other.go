//go:build !unix

package store

import (
	"os"
	"time"
)

// lockState: no lock here; bbolt's lock on leases.db is all.
func lockState(dir string, timeout time.Duration) (f, dirShared *os.File, noFile, err error) {
	return nil, nil, nil, nil
}

func (s *Store) lockFileLater() error { return nil }
