package store

import "syscall"

// dropMapped tells the kernel this process no longer needs the pages of
// the bbolt file mapping [addr, addr+n) resident. The mapping is a shared,
// read-only file mapping, so this only drops them from our RSS: later reads
// fault them back from the page cache. Loading a million leases touches the
// whole file once; without this the daemon would carry the file (≈ 300 MB)
// in its RSS next to the decoded leases.
func dropMapped(addr uintptr, n int64) {
	if addr == 0 || n <= 0 {
		return
	}
	_, _, _ = syscall.Syscall(syscall.SYS_MADVISE, addr, uintptr(n), syscall.MADV_DONTNEED)
}
