package ctnl

// SetKernelFilter makes Scan send its status filter (true, as always) or
// leave it out (false: what a kernel before 6.1 sees, since it ignores
// CTA_STATUS and CTA_STATUS_MASK in a dump request). It returns a func
// that restores the setting.
func SetKernelFilter(on bool) (restore func()) {
	was := kernelFilter
	kernelFilter = on
	return func() { kernelFilter = was }
}

// SetBucketsFile makes Scan read the conntrack hash table's size from
// path, until restore.
func SetBucketsFile(path string) (restore func()) {
	old := bucketsFile
	bucketsFile = path
	return func() { bucketsFile = old }
}
