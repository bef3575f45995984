package store

import (
	"os"
	"syscall"
)

// fdatasyncOS flushes f's data, and its metadata only where needed to
// read the data back (size, extents): none when the data overwrote
// written space, which is what the log arranges.
func fdatasyncOS(f *os.File) error {
	for {
		err := syscall.Fdatasync(int(f.Fd()))
		if err != syscall.EINTR {
			if err != nil {
				return &os.PathError{Op: "fdatasync", Path: f.Name(), Err: err}
			}
			return nil
		}
	}
}

// freeSpace is how many octets an unprivileged writer may still claim on
// dir's file system.
func freeSpace(dir string) (int64, bool) {
	var fs syscall.Statfs_t
	if err := syscall.Statfs(dir, &fs); err != nil {
		return 0, false
	}
	return int64(fs.Bavail) * int64(fs.Bsize), true
}
