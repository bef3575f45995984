package pcp

import (
	"encoding/binary"
	"math"
	"net/netip"
	"time"
)

var be = binary.BigEndian

// v4MappedPrefix is the first 12 octets of an IPv4-mapped IPv6 address.
var v4MappedPrefix = [12]byte{10: 0xff, 11: 0xff}

// isMapped reports whether the 16-octet field holds an IPv4-mapped
// address, recognised by all 96 leading bits (RFC 6887 §5).
func isMapped(b []byte) bool { return [12]byte(b[:12]) == v4MappedPrefix }

// addrFrom16 decodes a 16-octet PCP address field; IPv4-mapped addresses
// come back as 4-byte addresses.
func addrFrom16(b []byte) netip.Addr {
	return netip.AddrFrom16([16]byte(b[:16])).Unmap()
}

// put16 writes a as a 16-octet PCP address field: IPv6 as is, IPv4 as
// IPv4-mapped, an invalid address as all zeros (::).
func put16(b []byte, a netip.Addr) {
	if !a.IsValid() {
		clear(b[:16])
		return
	}
	x := a.As16()
	copy(b[:16], x[:])
}

// seconds converts a lifetime to the 32-bit wire value: whole seconds,
// negative as 0, saturating at 2^32-1.
func seconds(d time.Duration) uint32 {
	if d <= 0 {
		return 0
	}
	s := d / time.Second
	if s > math.MaxUint32 {
		return math.MaxUint32
	}
	return uint32(s)
}

// duration converts a 32-bit wire lifetime to a Duration.
func duration(s uint32) time.Duration { return time.Duration(s) * time.Second }

// pad4 returns n rounded up to a multiple of 4.
func pad4(n int) int { return (n + 3) &^ 3 }

// grow extends dst by n zero octets and returns the extended slice and
// the new tail, without allocating when dst has the capacity.
func grow(dst []byte, n int) ([]byte, []byte) {
	l := len(dst)
	if cap(dst)-l < n {
		nd := make([]byte, l, 2*cap(dst)+n)
		copy(nd, dst)
		dst = nd
	}
	dst = dst[:l+n]
	tail := dst[l:]
	clear(tail)
	return dst, tail
}
