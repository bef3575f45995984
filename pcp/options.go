package pcp

import (
	"bytes"
	"net/netip"
	"slices"
)

// Equal reports whether o and p hold the same options. The order the
// options were decoded in is not compared, nor is nil against empty, so a
// literal Options{...} in a test equals a decoded one. (go-cmp uses this
// method.)
func (o Options) Equal(p Options) bool {
	return o.ThirdParty == p.ThirdParty &&
		o.PreferFailure == p.PreferFailure &&
		slices.Equal(o.Filters, p.Filters) &&
		o.HasDescription == p.HasDescription &&
		bytes.Equal(o.Description, p.Description) &&
		o.HasPortSet == p.HasPortSet &&
		o.PortSet == p.PortSet
}

// Len returns the encoded size of the options.
func (o *Options) Len() int {
	n := 0
	if o.ThirdParty.IsValid() {
		n += thirdPartyOptSize
	}
	if o.PreferFailure {
		n += preferFailureOptSize
	}
	n += len(o.Filters) * filterOptSize
	if o.HasDescription {
		n += optHeaderSize + pad4(len(o.Description))
	}
	if o.HasPortSet {
		n += portSetOptSize
	}
	return n
}

// appendOptions writes the options in the order they were decoded
// (HDR-05: a reply echoes processed options in request order), then any
// not covered by that order in code order: THIRD_PARTY, PREFER_FAILURE,
// FILTERs, DESCRIPTION, PORT_SET. Reserved octets and padding are zero.
func appendOptions(dst []byte, o *Options) []byte {
	var done uint8
	fi := 0
	for _, code := range o.order[:o.norder] {
		switch code {
		case OptThirdParty:
			if done&seenTP == 0 && o.ThirdParty.IsValid() {
				dst = appendThirdParty(dst, o)
				done |= seenTP
			}
		case OptPreferFailure:
			if done&seenPF == 0 && o.PreferFailure {
				dst = appendOptionHeader(dst, OptPreferFailure, 0)
				done |= seenPF
			}
		case OptFilter:
			if fi < len(o.Filters) {
				dst = appendFilter(dst, o.Filters[fi])
				fi++
			}
		case OptDescription:
			if done&seenDesc == 0 && o.HasDescription {
				dst = appendDescription(dst, o.Description)
				done |= seenDesc
			}
		case OptPortSet:
			if done&seenPortSet == 0 && o.HasPortSet {
				dst = appendPortSet(dst, o.PortSet)
				done |= seenPortSet
			}
		}
	}
	if done&seenTP == 0 && o.ThirdParty.IsValid() {
		dst = appendThirdParty(dst, o)
	}
	if done&seenPF == 0 && o.PreferFailure {
		dst = appendOptionHeader(dst, OptPreferFailure, 0)
	}
	for _, f := range o.Filters[fi:] {
		dst = appendFilter(dst, f)
	}
	if done&seenDesc == 0 && o.HasDescription {
		dst = appendDescription(dst, o.Description)
	}
	if done&seenPortSet == 0 && o.HasPortSet {
		dst = appendPortSet(dst, o.PortSet)
	}
	return dst
}

func appendOptionHeader(dst []byte, code OptionCode, length int) []byte {
	return append(dst, byte(code), 0, byte(length>>8), byte(length))
}

func appendThirdParty(dst []byte, o *Options) []byte {
	dst = appendOptionHeader(dst, OptThirdParty, 16)
	dst, b := grow(dst, 16)
	put16(b, o.ThirdParty)
	return dst
}

// appendFilter writes FILTER (§13.3). IPv4 prefixes go out IPv4-mapped
// with length 96+n; a clearing filter as prefix length 0, address ::.
func appendFilter(dst []byte, f Filter) []byte {
	dst = appendOptionHeader(dst, OptFilter, 20)
	dst, b := grow(dst, 20)
	if f.Clear() {
		return dst
	}
	plen := f.Remote.Bits()
	if f.Remote.Addr().Is4() {
		plen += 96
	}
	b[1] = byte(plen)
	be.PutUint16(b[2:4], f.RemotePort)
	put16(b[4:20], f.Remote.Addr())
	return dst
}

func appendDescription(dst []byte, d []byte) []byte {
	dst = appendOptionHeader(dst, OptDescription, len(d))
	dst = append(dst, d...)
	dst, _ = grow(dst, pad4(len(d))-len(d))
	return dst
}

func appendPortSet(dst []byte, ps PortSet) []byte {
	dst = appendOptionHeader(dst, OptPortSet, 5)
	dst, b := grow(dst, 8)
	be.PutUint16(b[0:2], ps.Size)
	be.PutUint16(b[2:4], ps.FirstInternalPort)
	if ps.Parity {
		b[4] = 1
	}
	return dst
}

// nextOption splits the option at b[off:] (§7.3: code, reserved, 16-bit
// length, data padded to a multiple of 4 octets) into its code and data,
// and returns where the next option starts. The caller keeps off and
// len(b) multiples of 4, so the 4-octet header is always there; ok is
// false when the data or its padding runs past b.
func nextOption(b []byte, off int) (code OptionCode, data []byte, next int, ok bool) {
	l := int(be.Uint16(b[off+2:]))
	start := off + optHeaderSize
	next = start + pad4(l)
	if next > len(b) {
		return 0, nil, 0, false
	}
	return OptionCode(b[off]), b[start : start+l], next, true
}

// reset empties o before decoding into it, keeping its backing arrays.
func (o *Options) reset() {
	o.ThirdParty = netip.Addr{}
	o.PreferFailure = false
	o.Filters = o.filterBuf[:0]
	o.Description = nil
	o.HasDescription = false
	o.PortSet = PortSet{}
	o.HasPortSet = false
	o.Unknown = o.unknownBuf[:0]
	o.norder = 0
}

// add decodes one known option, already validated, into o and records
// its place in the order the options came in (HDR-05). Description data
// is not copied: it points into the message.
func (o *Options) add(code OptionCode, data []byte) {
	switch code {
	case OptThirdParty:
		o.ThirdParty = addrFrom16(data)
	case OptPreferFailure:
		o.PreferFailure = true
	case OptFilter:
		f, _ := decodeFilter(data)
		o.Filters = append(o.Filters, f)
	case OptDescription:
		o.Description = data
		o.HasDescription = true
	case OptPortSet:
		o.PortSet = decodePortSet(data)
		o.HasPortSet = true
	default:
		return
	}
	o.order[o.norder] = code
	o.norder++
}
