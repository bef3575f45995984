package store

import (
	"encoding/binary"
	"fmt"
	"hash/fnv"
	"os"
)

// This file reads the bbolt file format itself, before bbolt does, for two
// reasons:
//
//  1. bbolt keeps two meta pages and silently uses the older one when the
//     newer is damaged. After a torn write at power loss that is right (the
//     newer transaction never returned to its caller), but after damage at
//     rest it rolls back an acknowledged transaction. We can not tell the
//     two apart, so a damaged meta page counts as possible loss: the leases
//     are kept (the older state is consistent and newer than any backup) and
//     the epoch resets. A kill -9 never tears a page write.
//
//  2. bbolt trusts its page headers. A flipped bit can send it into a cycle
//     (unbounded recursion: a fatal stack overflow), far outside the file (a
//     fault), or make tx.Check loop over billions of pages and fill a map
//     with them. walkTree checks the tree's shape with plain reads and
//     bounded work first, so bbolt only ever sees a file whose pages form a
//     proper tree inside the file.
//
// Format (bbolt on-disk version 2, native byte order):
//
//	page header: id(8) flags(2) count(2) overflow(4)
//	meta (after the header): magic(4) version(4) pageSize(4) flags(4)
//	  root bucket: root pgid(8) sequence(8), freelist pgid(8),
//	  high-water pgid(8), txid(8), checksum(8) = FNV-64a of the 56 octets before
//	branch element: pos(4) ksize(4) pgid(8); leaf element: flags(4) pos(4)
//	  ksize(4) vsize(4); pos counts from the element itself
//	bucket value: root pgid(8) sequence(8) [inline page when root = 0]
const (
	boltMagic      = 0xED0CDAED
	boltVersion    = 2
	pageHeaderSize = 16
	metaSumOff     = 56
	metaLen        = 64
	elemSize       = 16

	flagBranch   = 0x01
	flagLeaf     = 0x02
	flagMeta     = 0x04
	flagFreelist = 0x10
	flagBucket   = 0x01 // leaf element is a sub-bucket

	maxTreeDepth = 64
)

var ne = binary.NativeEndian

type boltMeta struct {
	pageSize uint32
	root     uint64
	freelist uint64
	hwm      uint64 // pages below this id are in use or free
	txid     uint64
}

// fileShape is what inspectFile learned.
type fileShape struct {
	damagedMeta string // non-empty: one meta page is bad (bbolt falls back to the other)
}

// inspectFile checks the meta pages and the shape of the tree bbolt will
// use. An error wrapping ErrCorrupt means bbolt must not open the file.
// stop (nil: none) is asked every stopPages pages whether to give up
// (Open's context, WithContext): its error is returned as it is.
func inspectFile(path string, stop func() error) (fileShape, error) {
	f, err := os.Open(path)
	if err != nil {
		return fileShape{}, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return fileShape{}, err
	}
	var sh fileShape
	m0, why0 := readMeta(f, 0)
	ps := int64(4096)
	if why0 == "" {
		ps = int64(m0.pageSize)
	}
	m1, why1 := readMeta(f, ps)
	var m boltMeta
	switch {
	case why0 != "" && why1 != "":
		return sh, fmt.Errorf("store: both meta pages bad (%s; %s): %w", why0, why1, ErrCorrupt)
	case why0 != "":
		m, sh.damagedMeta = m1, "meta page 0 "+why0
	case why1 != "":
		m, sh.damagedMeta = m0, "meta page 1 "+why1
	case m1.txid > m0.txid:
		m = m1
	default:
		m = m0
	}
	if int64(m.hwm)*int64(m.pageSize) > fi.Size() {
		return sh, fmt.Errorf("store: file is %d octets, its meta page needs %d: truncated: %w",
			fi.Size(), int64(m.hwm)*int64(m.pageSize), ErrCorrupt)
	}
	w := walker{f: f, m: m, seen: make([]bool, m.hwm), stop: stop}
	w.seen[0], w.seen[1] = true, true
	if err := w.freelist(); err != nil {
		return sh, err
	}
	if err := w.page(m.root, 0); err != nil {
		return sh, err
	}
	return sh, nil
}

func readMeta(f *os.File, off int64) (boltMeta, string) {
	b := make([]byte, pageHeaderSize+metaLen)
	if _, err := f.ReadAt(b, off); err != nil {
		return boltMeta{}, "unreadable (" + err.Error() + ")"
	}
	if ne.Uint16(b[8:10])&flagMeta == 0 {
		return boltMeta{}, "is not a meta page"
	}
	m := b[pageHeaderSize:]
	switch {
	case ne.Uint32(m[0:4]) != boltMagic:
		return boltMeta{}, "has a bad magic number"
	case ne.Uint32(m[4:8]) != boltVersion:
		return boltMeta{}, "has an unknown version"
	}
	h := fnv.New64a()
	h.Write(m[:metaSumOff])
	if h.Sum64() != ne.Uint64(m[metaSumOff:]) {
		return boltMeta{}, "fails its checksum"
	}
	bm := boltMeta{pageSize: ne.Uint32(m[8:12]), root: ne.Uint64(m[16:24]),
		freelist: ne.Uint64(m[32:40]), hwm: ne.Uint64(m[40:48]), txid: ne.Uint64(m[48:56])}
	if bm.pageSize < 512 || bm.pageSize > 1<<16 || bm.pageSize&(bm.pageSize-1) != 0 {
		return boltMeta{}, fmt.Sprintf("gives page size %d", bm.pageSize)
	}
	if bm.hwm < 3 || bm.hwm > 1<<40/uint64(bm.pageSize) {
		return boltMeta{}, fmt.Sprintf("gives high-water mark %d", bm.hwm)
	}
	return bm, ""
}

type walker struct {
	f    *os.File
	m    boltMeta
	seen []bool // page ids already claimed by some page
	// stop, if set, is asked every stopPages pages read whether to give
	// up; n counts them.
	stop func() error
	n    int
}

// stopPages is how many pages the walk reads between two looks at stop
// (≈ 8 ms at 1 000 000 leases, whose walk reads ≈ 60 000 pages in
// 200-250 ms).
const stopPages = 2048

func corruptf(format string, args ...any) error {
	return fmt.Errorf("store: "+format+": %w", append(args, ErrCorrupt)...)
}

// read returns page id with its overflow pages, after checking that it
// lies inside the file and no other page claims any of it.
func (w *walker) read(id uint64, wantFlags uint16) ([]byte, error) {
	if id < 2 || id >= w.m.hwm {
		return nil, corruptf("page %d outside the file (high-water mark %d)", id, w.m.hwm)
	}
	if w.n++; w.stop != nil && w.n%stopPages == 0 {
		if err := w.stop(); err != nil {
			return nil, err
		}
	}
	ps := int64(w.m.pageSize)
	buf := make([]byte, ps)
	if _, err := w.f.ReadAt(buf, int64(id)*ps); err != nil {
		return nil, corruptf("page %d unreadable (%v)", id, err)
	}
	if got := ne.Uint64(buf[0:8]); got != id {
		return nil, corruptf("page %d says it is page %d", id, got)
	}
	if flags := ne.Uint16(buf[8:10]); flags&wantFlags == 0 {
		return nil, corruptf("page %d has flags %#x, want %#x", id, flags, wantFlags)
	}
	over := uint64(ne.Uint32(buf[12:16]))
	if id+over >= w.m.hwm {
		return nil, corruptf("page %d overflows past the file (%d more pages)", id, over)
	}
	for i := id; i <= id+over; i++ {
		if w.seen[i] {
			return nil, corruptf("page %d referenced twice", i)
		}
		w.seen[i] = true
	}
	if over > 0 {
		buf = append(buf, make([]byte, int64(over)*ps)...)
		if _, err := w.f.ReadAt(buf[ps:], int64(id+1)*ps); err != nil {
			return nil, corruptf("page %d unreadable (%v)", id, err)
		}
	}
	return buf, nil
}

func (w *walker) freelist() error {
	if w.m.freelist == ^uint64(0) { // not synced (NoFreelistSync; we never set it)
		return nil
	}
	p, err := w.read(w.m.freelist, flagFreelist)
	if err != nil {
		return fmt.Errorf("freelist: %w", err)
	}
	n, start := uint64(ne.Uint16(p[10:12])), uint64(pageHeaderSize)
	if n == 0xFFFF { // the real count is the first id
		if len(p) < pageHeaderSize+8 {
			return corruptf("freelist page too short")
		}
		n, start = ne.Uint64(p[pageHeaderSize:]), pageHeaderSize+8
	}
	if n > (uint64(len(p))-start)/8 {
		return corruptf("freelist claims %d ids in %d octets", n, len(p))
	}
	for i := range n {
		if id := ne.Uint64(p[start+8*i:]); id < 2 || id >= w.m.hwm {
			return corruptf("freelist holds page %d outside the file", id)
		}
	}
	return nil
}

// page walks the subtree at id.
func (w *walker) page(id uint64, depth int) error {
	if depth > maxTreeDepth {
		return corruptf("tree deeper than %d at page %d", maxTreeDepth, id)
	}
	p, err := w.read(id, flagBranch|flagLeaf)
	if err != nil {
		return err
	}
	return w.elements(p, id, depth)
}

// elements checks the elements of page p (a real page or an inline
// bucket's page) and descends into children and sub-buckets.
func (w *walker) elements(p []byte, id uint64, depth int) error {
	if len(p) < pageHeaderSize {
		return corruptf("page %d: %d octets", id, len(p))
	}
	flags, count := ne.Uint16(p[8:10]), int(ne.Uint16(p[10:12]))
	if pageHeaderSize+count*elemSize > len(p) {
		return corruptf("page %d: %d elements do not fit", id, count)
	}
	for i := range count {
		off := pageHeaderSize + i*elemSize
		e := p[off : off+elemSize]
		switch {
		case flags&flagBranch != 0:
			pos, ksize := int(ne.Uint32(e[0:4])), int(ne.Uint32(e[4:8]))
			if off+pos+ksize > len(p) || off+pos+ksize < off {
				return corruptf("page %d: branch element %d outside the page", id, i)
			}
			if err := w.page(ne.Uint64(e[8:16]), depth+1); err != nil {
				return err
			}
		case flags&flagLeaf != 0:
			eflags, pos := ne.Uint32(e[0:4]), int(ne.Uint32(e[4:8]))
			ksize, vsize := int(ne.Uint32(e[8:12])), int(ne.Uint32(e[12:16]))
			end := off + pos + ksize + vsize
			if pos < 0 || ksize < 0 || vsize < 0 || end > len(p) || end < off {
				return corruptf("page %d: leaf element %d outside the page", id, i)
			}
			if eflags&flagBucket == 0 {
				continue
			}
			v := p[off+pos+ksize : end]
			if len(v) < 16 {
				return corruptf("page %d: bucket value of %d octets", id, len(v))
			}
			if root := ne.Uint64(v[0:8]); root != 0 {
				if err := w.page(root, depth+1); err != nil {
					return err
				}
			} else if err := w.elements(v[16:], id, depth+1); err != nil {
				return err
			}
		default:
			return corruptf("page %d has flags %#x", id, flags)
		}
	}
	return nil
}
