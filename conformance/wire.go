package conformance

import (
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"strings"

	"github.com/pcpd/pcpd/pcp"
)

// The suite builds and reads packets with its own small codec instead of
// pcp's: a conformance oracle that shared the implementation's encoder
// would share its bugs, and hostile packets (wrong lengths, bad padding,
// repeated options) need byte-level control anyway. Only constants and
// the result-code names come from package pcp.

var be = binary.BigEndian

// Opcodes and option codes as raw octets.
const (
	opAnnounce = byte(pcp.OpAnnounce)
	opMap      = byte(pcp.OpMap)
	opPeer     = byte(pcp.OpPeer)

	optThirdParty    = byte(pcp.OptThirdParty)
	optPreferFailure = byte(pcp.OptPreferFailure)
	optFilter        = byte(pcp.OptFilter)
	optDescription   = byte(pcp.OptDescription)
	optPortSet       = byte(pcp.OptPortSet)

	protoTCP = byte(pcp.ProtoTCP)
	protoUDP = byte(pcp.ProtoUDP)

	longLifetime  = 1800 // RFC 6887 §7.4 recommended long error lifetime
	shortLifetime = 30   // §7.4 recommended short error lifetime
)

// addr16 is a PCP address field: IPv6 as is, IPv4 as ::ffff:a.b.c.d, an
// invalid address as ::.
func addr16(a netip.Addr) [16]byte {
	if !a.IsValid() {
		return [16]byte{}
	}
	return a.As16()
}

// zeroAddr is the all-zeros address of a's family (PROTOCOL.md §2):
// :: for IPv6, ::ffff:0.0.0.0 for IPv4.
func zeroAddr(a netip.Addr) netip.Addr {
	if a.Is4() {
		return netip.IPv4Unspecified()
	}
	return netip.IPv6Unspecified()
}

// request is a PCP request as the suite wants it on the wire. Fields
// that do not apply to the opcode are not written.
type request struct {
	Version  byte // 0 means 2
	Op       byte
	Reserved uint16 // octets 2-3, normally 0
	Lifetime uint32
	Client   netip.Addr

	Nonce      [12]byte
	Proto      byte
	IntPort    uint16
	ExtPort    uint16
	ExtAddr    netip.Addr // invalid: the all-zeros address of Client's family
	RemotePort uint16     // PEER
	Remote     netip.Addr // PEER

	Opts [][]byte // encoded options, in order
}

func (r request) bytes() []byte {
	v := r.Version
	if v == 0 {
		v = pcp.Version
	}
	b := make([]byte, 24, 128)
	b[0] = v
	b[1] = r.Op
	be.PutUint16(b[2:], r.Reserved)
	be.PutUint32(b[4:], r.Lifetime)
	c := addr16(r.Client)
	copy(b[8:], c[:])
	if r.Op == opMap || r.Op == opPeer {
		d := make([]byte, 36)
		copy(d, r.Nonce[:])
		d[12] = r.Proto
		be.PutUint16(d[16:], r.IntPort)
		be.PutUint16(d[18:], r.ExtPort)
		ext := r.ExtAddr
		if !ext.IsValid() {
			ext = zeroAddr(r.Client)
		}
		x := addr16(ext)
		copy(d[20:], x[:])
		b = append(b, d...)
	}
	if r.Op == opPeer {
		d := make([]byte, 20)
		be.PutUint16(d[0:], r.RemotePort)
		x := addr16(r.Remote)
		copy(d[4:], x[:])
		b = append(b, d...)
	}
	for _, o := range r.Opts {
		b = append(b, o...)
	}
	return b
}

// option encodes one option: code, reserved 0, length, data, zero pad.
func option(code byte, data []byte) []byte {
	b := []byte{code, 0, byte(len(data) >> 8), byte(len(data))}
	b = append(b, data...)
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	return b
}

func thirdParty(a netip.Addr) []byte {
	x := addr16(a)
	return option(optThirdParty, x[:])
}

func preferFailure() []byte { return option(optPreferFailure, nil) }

// filter encodes FILTER with a wire prefix length (IPv4: 96 + n).
func filter(wireLen byte, port uint16, remote netip.Addr) []byte {
	d := make([]byte, 20)
	d[1] = wireLen
	be.PutUint16(d[2:], port)
	x := addr16(remote)
	copy(d[4:], x[:])
	return option(optFilter, d)
}

// filterPrefix encodes FILTER for p (IPv4 prefixes as 96 + n).
func filterPrefix(p netip.Prefix, port uint16) []byte {
	l := p.Bits()
	if p.Addr().Is4() {
		l += 96
	}
	return filter(byte(l), port, p.Addr())
}

func description(s string) []byte { return option(optDescription, []byte(s)) }

// response is a decoded PCP reply, loosely: the suite decodes whatever
// came back and judges it, so nothing is rejected here except replies too
// short for a header.
type response struct {
	Raw      []byte
	Version  byte
	R        bool
	Op       byte
	Octet2   byte
	Result   pcp.ResultCode
	Lifetime uint32
	Epoch    uint32

	Nonce      [12]byte
	Proto      byte
	IntPort    uint16
	ExtPort    uint16
	ExtAddr    netip.Addr
	RemotePort uint16
	Remote     netip.Addr

	Opts    []respOption
	OptsErr error
}

type respOption struct {
	Code byte
	Data []byte
}

var errShortReply = errors.New("conformance: reply shorter than 4 octets")

func parseResponse(b []byte) (*response, error) {
	if len(b) < 4 {
		return nil, errShortReply
	}
	r := &response{Raw: b, Version: b[0], R: b[1]&0x80 != 0, Op: b[1] & 0x7f, Octet2: b[2], Result: pcp.ResultCode(b[3])}
	if len(b) >= 8 {
		r.Lifetime = be.Uint32(b[4:])
	}
	if len(b) >= 12 {
		r.Epoch = be.Uint32(b[8:])
	}
	end := 24
	if (r.Op == opMap || r.Op == opPeer) && len(b) >= 60 {
		r.Nonce = [12]byte(b[24:36])
		r.Proto = b[36]
		r.IntPort = be.Uint16(b[40:])
		r.ExtPort = be.Uint16(b[42:])
		r.ExtAddr = netip.AddrFrom16([16]byte(b[44:60])).Unmap()
		end = 60
	}
	if r.Op == opPeer && len(b) >= 80 {
		r.RemotePort = be.Uint16(b[60:])
		r.Remote = netip.AddrFrom16([16]byte(b[64:80])).Unmap()
		end = 80
	}
	if r.Op > opPeer || len(b) < end {
		return r, nil
	}
	for off := end; off < len(b); {
		if off+4 > len(b) {
			r.OptsErr = fmt.Errorf("option header cut at octet %d", off)
			break
		}
		l := int(be.Uint16(b[off+2:]))
		next := off + 4 + (l+3)&^3
		if next > len(b) {
			r.OptsErr = fmt.Errorf("option %d at octet %d runs past the end", b[off], off)
			break
		}
		r.Opts = append(r.Opts, respOption{Code: b[off], Data: b[off+4 : off+4+l]})
		off = next
	}
	return r, nil
}

// opt returns the first echoed option with this code.
func (r *response) opt(code byte) (respOption, bool) {
	for _, o := range r.Opts {
		if o.Code == code {
			return o, true
		}
	}
	return respOption{}, false
}

func (r *response) optCodes() []byte {
	var c []byte
	for _, o := range r.Opts {
		c = append(c, o.Code)
	}
	return c
}

// String is a one-line summary for details.
func (r *response) String() string {
	if r == nil {
		return "no reply"
	}
	s := fmt.Sprintf("v%d op=%d R=%t %s lifetime=%d epoch=%d len=%d", r.Version, r.Op, r.R, r.Result, r.Lifetime, r.Epoch, len(r.Raw))
	if r.Op == opMap || r.Op == opPeer {
		s += fmt.Sprintf(" ext=%s", netip.AddrPortFrom(r.ExtAddr, r.ExtPort))
	}
	return s
}

// hexdump renders bytes as PROTOCOL.md writes them: hex, a space every 4
// octets, long packets shortened in the middle.
func hexdump(b []byte) string {
	const max = 96
	var sb strings.Builder
	write := func(p []byte, base int) {
		for i := 0; i < len(p); i += 4 {
			if sb.Len() > 0 {
				sb.WriteByte(' ')
			}
			sb.WriteString(hex.EncodeToString(p[i:min(i+4, len(p))]))
		}
	}
	if len(b) <= max {
		write(b, 0)
		return sb.String()
	}
	write(b[:64], 0)
	fmt.Fprintf(&sb, " …(%d octets)… ", len(b)-96)
	write(b[len(b)-32:], len(b)-32)
	return sb.String()
}

// NAT-PMP (RFC 6886) messages.

func pmpAddress() []byte { return []byte{0, 0} }

func pmpMap(op byte, intPort, extPort uint16, lifetime uint32) []byte {
	b := make([]byte, 12)
	b[1] = op
	be.PutUint16(b[4:], intPort)
	be.PutUint16(b[6:], extPort)
	be.PutUint32(b[8:], lifetime)
	return b
}

// pmpReply is a decoded NAT-PMP reply.
type pmpReply struct {
	Raw     []byte
	Version byte
	Op      byte // with the 0x80 bit
	Result  pcp.PMPResultCode
	Epoch   uint32
	Ext     netip.Addr // address replies
	IntPort uint16     // map replies
	ExtPort uint16
	Life    uint32
}

func parsePMP(b []byte) (*pmpReply, error) {
	if len(b) < 4 {
		return nil, errShortReply
	}
	r := &pmpReply{Raw: b, Version: b[0], Op: b[1], Result: pcp.PMPResultCode(be.Uint16(b[2:]))}
	if len(b) >= 8 {
		r.Epoch = be.Uint32(b[4:])
	}
	switch {
	case r.Op == 0x80 && len(b) >= 12:
		r.Ext = netip.AddrFrom4([4]byte(b[8:12]))
	case (r.Op == 0x81 || r.Op == 0x82) && len(b) >= 16:
		r.IntPort = be.Uint16(b[8:])
		r.ExtPort = be.Uint16(b[10:])
		r.Life = be.Uint32(b[12:])
	}
	return r, nil
}

func (r *pmpReply) String() string {
	if r == nil {
		return "no reply"
	}
	return fmt.Sprintf("v%d op=0x%02x result=%s epoch=%d len=%d int=%d ext=%d life=%d addr=%s", r.Version, r.Op, r.Result, r.Epoch, len(r.Raw), r.IntPort, r.ExtPort, r.Life, r.Ext)
}
