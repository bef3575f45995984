//go:build !linux

package store

func dropMapped(addr uintptr, n int64) {}
