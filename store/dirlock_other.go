//go:build !unix

package store

import (
	"os"
	"time"
)

// lockDir: no directory lock here; bbolt's lock on leases.db is all.
func lockDir(dir string, timeout time.Duration) (*os.File, error) { return nil, nil }
