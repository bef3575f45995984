package store

import (
	"encoding/binary"
	"fmt"
	"hash/fnv"
	"io"
	"os"
)

// bbolt keeps two meta pages and silently uses the older one when the newer
// is damaged. After a torn write at power loss that is right (the newer
// transaction never returned to its caller), but after damage at rest it
// rolls back a transaction that was acknowledged. We can not tell the two
// apart, so a damaged meta page counts as possible loss: the leases are
// kept (the older state is consistent and newer than any backup) and the
// epoch resets. A kill -9 never tears a page write, so it does not trigger
// this.
//
// Layout (bbolt on-disk format version 2, native byte order): page header
// of 16 octets, then magic(4) version(4) pageSize(4) flags(4) root(16)
// freelist(8) pgid(8) txid(8) checksum(8), the checksum being FNV-64a over
// the 56 octets before it.
const (
	boltMagic       = 0xED0CDAED
	boltVersion     = 2
	boltPageHeader  = 16
	boltMetaSumOff  = 56
	boltMetaLen     = 64
	boltMaxPageSize = 1 << 16
)

// damagedMeta returns a description when either meta page of the bbolt
// file at path fails its checksum, "" when both are sound.
func damagedMeta(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	m0, err := readMeta(f, 0)
	if err != nil {
		return "", err
	}
	if why := checkMeta(m0); why != "" {
		return "meta page 0 " + why, nil
	}
	ps := int64(binary.NativeEndian.Uint32(m0[8:12]))
	if ps < 1024 || ps > boltMaxPageSize {
		return fmt.Sprintf("meta page 0 gives page size %d", ps), nil
	}
	m1, err := readMeta(f, ps)
	if err != nil {
		return "", err
	}
	if why := checkMeta(m1); why != "" {
		return "meta page 1 " + why, nil
	}
	return "", nil
}

func readMeta(f *os.File, off int64) ([]byte, error) {
	b := make([]byte, boltMetaLen)
	_, err := f.ReadAt(b, off+boltPageHeader)
	if err == io.EOF {
		return nil, nil // too short: bbolt's own open reports it
	}
	return b, err
}

func checkMeta(m []byte) string {
	if m == nil {
		return "missing"
	}
	switch {
	case binary.NativeEndian.Uint32(m[0:4]) != boltMagic:
		return "has a bad magic number"
	case binary.NativeEndian.Uint32(m[4:8]) != boltVersion:
		return "has an unknown version"
	}
	h := fnv.New64a()
	h.Write(m[:boltMetaSumOff])
	if h.Sum64() != binary.NativeEndian.Uint64(m[boltMetaSumOff:]) {
		return "fails its checksum"
	}
	return ""
}
