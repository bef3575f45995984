//go:build !linux

package store

import "os"

func fdatasyncOS(f *os.File) error { return f.Sync() }

// freeSpace: unknown here, so the spare segment is not filled ahead.
func freeSpace(dir string) (int64, bool) { return 0, false }
