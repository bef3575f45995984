package store

import (
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"math"
	"net/netip"
	"time"
)

// On-disk record format, version 1. A lease is stored as one bbolt key/value
// pair; both are compact binary (not JSON) so that a million leases load in
// well under a second and stay small in memory and on disk.
//
// key:   ownerLen(1) owner  protocol(1)  addr(internal)  port(2)  addr(remote) port(2)
// value: version(1)=1 kind(1) flags(1) nonce(12) extPort(2) created(8) expires(8)
//        addr(external) addr(client) port(2) addr(server) port(2)
//        descLen(2) desc  nFilters(1) { addr(prefix) bits(1) port(2) }*
//        crc32c(4) over key || value-without-crc
//
// addr:  tag(1): 0 = none (zero netip.Addr), 4 = IPv4 + 4 octets,
//        6 = IPv6 + 16 octets, 7 = IPv6 + 16 octets + zoneLen(1) zone.
// Times are Unix nanoseconds, math.MinInt64 for the zero time.
//
// The key fields are not repeated in the value. The checksum covers the key
// too, so bit rot anywhere in a record is caught: bbolt checksums only its
// meta pages, not the data pages that hold our records.

const (
	recordVersion = 1

	flagThirdParty    = 1 << 0
	flagPreferFailure = 1 << 1
	knownFlags        = flagThirdParty | flagPreferFailure

	addrNone   = 0
	addrV4     = 4
	addrV6     = 6
	addrV6Zone = 7

	zeroTime = math.MinInt64
)

var crcTable = crc32.MakeTable(crc32.Castagnoli)

// Times must fit int64 nanoseconds; this range is safely inside it.
var (
	minTime = time.Date(1700, 1, 1, 0, 0, 0, 0, time.UTC)
	maxTime = time.Date(2200, 1, 1, 0, 0, 0, 0, time.UTC)
)

// validate checks everything the encoder relies on, so that encoding itself
// cannot fail and a bad lease is refused before a transaction starts.
func (l *Lease) validate() error {
	switch {
	case len(l.Owner) > MaxOwner:
		return fmt.Errorf("store: owner is %d octets, limit %d: %w", len(l.Owner), MaxOwner, ErrInvalidLease)
	case !l.InternalAddr.IsValid():
		return fmt.Errorf("store: lease has no internal address: %w", ErrInvalidLease)
	case l.Kind != KindMap && l.Kind != KindPeer && l.Kind != KindNATPMP:
		return fmt.Errorf("store: unknown lease kind %d: %w", l.Kind, ErrInvalidLease)
	case len(l.Description) > MaxDescription:
		return fmt.Errorf("store: description is %d octets, limit %d: %w", len(l.Description), MaxDescription, ErrInvalidLease)
	case len(l.Filters) > MaxFilters:
		return fmt.Errorf("store: %d filters, limit %d: %w", len(l.Filters), MaxFilters, ErrInvalidLease)
	}
	if err := validateKey(&l.Key); err != nil {
		return err
	}
	for _, a := range []netip.Addr{l.ExternalAddr, l.ClientAddr.Addr(), l.ServerAddr.Addr()} {
		if len(a.Zone()) > 255 {
			return fmt.Errorf("store: zone of %v too long: %w", a, ErrInvalidLease)
		}
	}
	for i, f := range l.Filters {
		if !f.Prefix.IsValid() {
			return fmt.Errorf("store: filter %d has an invalid prefix: %w", i, ErrInvalidLease)
		}
	}
	for _, t := range []time.Time{l.Created, l.Expires} {
		if !t.IsZero() && (t.Before(minTime) || t.After(maxTime)) {
			return fmt.Errorf("store: time %v out of range: %w", t, ErrInvalidLease)
		}
	}
	return nil
}

func validateKey(k *Key) error {
	if len(k.Owner) > MaxOwner {
		return fmt.Errorf("store: owner is %d octets, limit %d: %w", len(k.Owner), MaxOwner, ErrInvalidLease)
	}
	if len(k.InternalAddr.Zone()) > 255 || len(k.Remote.Addr().Zone()) > 255 {
		return fmt.Errorf("store: zone too long: %w", ErrInvalidLease)
	}
	return nil
}

func appendAddr(b []byte, a netip.Addr) []byte {
	switch {
	case !a.IsValid():
		return append(b, addrNone)
	case a.Is4():
		v := a.As4()
		return append(append(b, addrV4), v[:]...)
	case a.Zone() == "":
		v := a.As16()
		return append(append(b, addrV6), v[:]...)
	default:
		v := a.As16()
		b = append(append(b, addrV6Zone), v[:]...)
		return append(append(b, byte(len(a.Zone()))), a.Zone()...)
	}
}

func appendTime(b []byte, t time.Time) []byte {
	n := int64(zeroTime)
	if !t.IsZero() {
		n = t.UnixNano()
	}
	return binary.BigEndian.AppendUint64(b, uint64(n))
}

// appendKey appends the bbolt key of k. Keys sort by owner first, so one
// client's leases sit together.
func appendKey(b []byte, k *Key) []byte {
	b = append(b, byte(len(k.Owner)))
	b = append(b, k.Owner...)
	b = append(b, k.Protocol)
	b = appendAddr(b, k.InternalAddr)
	b = binary.BigEndian.AppendUint16(b, k.InternalPort)
	b = appendAddr(b, k.Remote.Addr())
	return binary.BigEndian.AppendUint16(b, k.Remote.Port())
}

// appendValue appends the value record of l; key must be appendKey(l.Key),
// it goes into the checksum. l must have passed validate.
func appendValue(b []byte, key []byte, l *Lease) []byte {
	start := len(b)
	var flags byte
	if l.ThirdParty {
		flags |= flagThirdParty
	}
	if l.PreferFailure {
		flags |= flagPreferFailure
	}
	b = append(b, recordVersion, byte(l.Kind), flags)
	b = append(b, l.Nonce[:]...)
	b = binary.BigEndian.AppendUint16(b, l.ExternalPort)
	b = appendTime(b, l.Created)
	b = appendTime(b, l.Expires)
	b = appendAddr(b, l.ExternalAddr)
	b = appendAddr(b, l.ClientAddr.Addr())
	b = binary.BigEndian.AppendUint16(b, l.ClientAddr.Port())
	b = appendAddr(b, l.ServerAddr.Addr())
	b = binary.BigEndian.AppendUint16(b, l.ServerAddr.Port())
	b = binary.BigEndian.AppendUint16(b, uint16(len(l.Description)))
	b = append(b, l.Description...)
	b = append(b, byte(len(l.Filters)))
	for _, f := range l.Filters {
		b = appendAddr(b, f.Prefix.Addr())
		b = append(b, byte(f.Prefix.Bits()))
		b = binary.BigEndian.AppendUint16(b, f.Port)
	}
	crc := crc32.Update(crc32.Checksum(key, crcTable), crcTable, b[start:])
	return binary.BigEndian.AppendUint32(b, crc)
}

// reader consumes a record; the first failure sticks, so decoders read
// everything and check once (a failed parse never yields a half lease).
type reader struct {
	b   []byte
	err error
}

func (r *reader) fail(format string, args ...any) {
	if r.err == nil {
		r.err = fmt.Errorf("store: "+format+": %w", append(args, ErrCorrupt)...)
	}
}

func (r *reader) next(n int) []byte {
	if r.err != nil {
		return nil
	}
	if len(r.b) < n {
		r.fail("record truncated")
		return nil
	}
	v := r.b[:n]
	r.b = r.b[n:]
	return v
}

func (r *reader) u8() uint8 {
	if v := r.next(1); v != nil {
		return v[0]
	}
	return 0
}

func (r *reader) u16() uint16 {
	if v := r.next(2); v != nil {
		return binary.BigEndian.Uint16(v)
	}
	return 0
}

func (r *reader) u64() uint64 {
	if v := r.next(8); v != nil {
		return binary.BigEndian.Uint64(v)
	}
	return 0
}

func (r *reader) time() time.Time {
	n := int64(r.u64())
	if r.err != nil || n == zeroTime {
		return time.Time{}
	}
	t := time.Unix(0, n).UTC()
	if t.Before(minTime) || t.After(maxTime) {
		r.fail("time %d out of range", n)
		return time.Time{}
	}
	return t
}

func (r *reader) addr() netip.Addr {
	switch tag := r.u8(); tag {
	case addrNone:
		return netip.Addr{}
	case addrV4:
		if v := r.next(4); v != nil {
			return netip.AddrFrom4([4]byte(v))
		}
	case addrV6, addrV6Zone:
		v := r.next(16)
		if v == nil {
			return netip.Addr{}
		}
		a := netip.AddrFrom16([16]byte(v))
		if tag == addrV6 {
			return a
		}
		zone := r.next(int(r.u8()))
		if len(zone) == 0 {
			r.fail("empty zone")
			return netip.Addr{}
		}
		return a.WithZone(string(zone))
	default:
		r.fail("unknown address tag %d", tag)
	}
	return netip.Addr{}
}

func (r *reader) addrPort() netip.AddrPort {
	a := r.addr()
	p := r.u16()
	if !a.IsValid() && p != 0 {
		r.fail("port %d without address", p)
	}
	return netip.AddrPortFrom(a, p)
}

// interner shares the memory of equal strings (owners) across leases.
type interner map[string]string

func (in interner) get(b []byte) string {
	if in == nil {
		return string(b)
	}
	if s, ok := in[string(b)]; ok { // no allocation for the lookup
		return s
	}
	s := string(b)
	in[s] = s
	return s
}

func decodeKey(b []byte, in interner) (Key, error) {
	r := reader{b: b}
	var k Key
	owner := r.next(int(r.u8()))
	k.Protocol = r.u8()
	k.InternalAddr = r.addr()
	k.InternalPort = r.u16()
	k.Remote = r.addrPort()
	if r.err == nil && len(r.b) != 0 {
		r.fail("%d trailing octets in key", len(r.b))
	}
	if r.err == nil && !k.InternalAddr.IsValid() {
		r.fail("key without internal address")
	}
	if r.err != nil {
		return Key{}, r.err
	}
	k.Owner = in.get(owner)
	return k, nil
}

// decodeLease parses one stored record. It never panics and never returns a
// partly filled lease with a non-nil error, whatever the input.
func decodeLease(key, val []byte, in interner) (Lease, error) {
	var l Lease
	err := decodeLeaseInto(&l, key, val, in)
	return l, err
}

// decodeLeaseInto is decodeLease writing straight into *l, which must be
// zero (a fresh slot of the loaded slice: a Lease is 280 octets, copying
// each one twice costs a second at a million); *l is zero again when it
// fails.
func decodeLeaseInto(l *Lease, key, val []byte, in interner) (err error) {
	defer func() {
		if err != nil {
			*l = Lease{}
		}
	}()
	if len(val) < 4 {
		return fmt.Errorf("store: record of %d octets: %w", len(val), ErrCorrupt)
	}
	body, sum := val[:len(val)-4], binary.BigEndian.Uint32(val[len(val)-4:])
	if got := crc32.Update(crc32.Checksum(key, crcTable), crcTable, body); got != sum {
		return fmt.Errorf("store: record checksum %08x, want %08x: %w", got, sum, ErrCorrupt)
	}
	k, err := decodeKey(key, in)
	if err != nil {
		return err
	}
	r := reader{b: body}
	if v := r.u8(); r.err == nil && v != recordVersion {
		r.fail("record version %d, want %d", v, recordVersion)
	}
	l.Key = k
	l.Kind = Kind(r.u8())
	flags := r.u8()
	if r.err == nil && flags&^knownFlags != 0 {
		r.fail("unknown flags %#x", flags)
	}
	l.ThirdParty = flags&flagThirdParty != 0
	l.PreferFailure = flags&flagPreferFailure != 0
	copy(l.Nonce[:], r.next(12))
	l.ExternalPort = r.u16()
	l.Created = r.time()
	l.Expires = r.time()
	l.ExternalAddr = r.addr()
	l.ClientAddr = r.addrPort()
	l.ServerAddr = r.addrPort()
	if desc := r.next(int(r.u16())); len(desc) > 0 {
		l.Description = string(desc)
	}
	if n := int(r.u8()); n > 0 && r.err == nil {
		l.Filters = make([]Filter, 0, n)
		for range n {
			a := r.addr()
			bits := int(r.u8())
			port := r.u16()
			if r.err != nil {
				break
			}
			p := netip.PrefixFrom(a, bits)
			if !p.IsValid() || a.Zone() != "" {
				r.fail("invalid filter prefix %v/%d", a, bits)
				break
			}
			l.Filters = append(l.Filters, Filter{Prefix: p, Port: port})
		}
	}
	if r.err == nil && len(r.b) != 0 {
		r.fail("%d trailing octets in record", len(r.b))
	}
	if r.err == nil {
		if err := l.validate(); err != nil {
			r.fail("decoded lease invalid (%v)", err)
		}
	}
	return r.err
}
